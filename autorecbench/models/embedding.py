"""Embedding storage for embedding-size search: a real mixed-dimension store, and the soft-selection tables.

``MixedDimEmbedding`` (ESAPN's hard selection, paper §2.3.3 "Advantages of Hard Selection"): each entity
holds one embedding, at its current size only. Per candidate size there is one table whose rows ("slots")
are handed out on demand:

- ``size_of[e]`` / ``slot_of[e]`` (tensors) say where entity ``e`` lives; -1 while it has never been stored.
- An entity is stored the first time it is trained on, at ``initial_size``. Until then every read gets the
  values it will be stored with: initial values are a pure function of (seed, field, entity, size)
  (:func:`hashed_normal`), so prediction before the first update needs no memory and changes nothing.
- Enlarging ``e`` from size k to k+1 takes a slot at k+1, writes the caller's new values (ESAPN: W e + b,
  Eq. 1) and returns the old slot to size k's free list, from which later enlargements to size k are served.
- A table grows geometrically (x ``growth``, at least ``min_capacity`` rows), never one row per entity, so
  allocation costs amortised O(1) per entity and the slack is at most a factor ``growth``.
- All of this is vectorised over a batch; loops run over candidate sizes (six, skipping empty ones), never
  over entities. A :class:`Lookup` groups a batch by size with one sort; a ``distinct`` lookup (prediction,
  training) holds each entity once, so the chained maps run on the batch's distinct entities and duplicate
  rows' gradients add up in their entry as a sparse gradient's would (ESAPN uses only these); a row lookup
  holds every row (the reference its tests compare with). Gathers use ``index_select`` (on the CPU ~9x faster than ``t[idx]``
  for wide rows, and its backward is an ``index_add``, not an accumulating ``index_put``).

The store is trained with its own Adam (``torch.optim.Adam``'s update rule, both moments kept per slot beside
the table in one ``[capacity, 2, d]`` tensor, so they move and grow with it; a slot's moments are zeroed when
it is handed to a new owner): ``lazy`` updates the moments and values of the slots a batch touches only
(``torch.optim.SparseAdam``'s algorithm, one global step count for bias correction; the arithmetic of all
sizes runs as one set of multi-tensor ``torch._foreach_*`` ops); ``dense`` applies Adam to every slot in use at every
step (rows not in the batch get a zero gradient, so they keep moving while their first moment decays, as
plain Adam over full tables does). ``memory`` bytes are measured from the tensors' storages.

``SoftSizeTables`` (DARTS and AutoEmb, soft selection): every entity holds one embedding of every candidate
size, stored as one ``n x sum(sizes)`` table per field (222 dims per entity for {2,...,128}), with per-size
linear maps to the largest size (survey Eq. 19), a batch-norm + tanh per size, and a weighted sum (Eq. 20).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autorecbench.data.stream import BatchGroups
from autorecbench.models.activations import tanh
from autorecbench.train.optim import check_mode, embedding_table, tensor_bytes

_M32 = 0xFFFFFFFF


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32) and ``c`` < 2**32 without int64 overflow: for
    c >= 2**31, ``x c = x (c - 2**31) + x 2**31`` and ``x 2**31 mod 2**32`` is the low bit of x shifted up."""
    if c < 2**31:
        return (x * c) & _M32
    return (x * (c - 2**31) + ((x & 1) << 31)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (``lowbias32``): well-mixed bits from consecutive inputs."""
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """:func:`_mix32` on a Python int (for keys: no tensor ops)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hashed_normal(seed: int, stream: int, rows: torch.Tensor, dim: int, std: float) -> torch.Tensor:
    """N(0, std^2) values ``[len(rows), dim]`` that depend only on (seed, stream, row, column).

    Counter-based: value j of row r uses counters ``2 dim r + 2j`` and ``+1``; each counter's low 32 bits,
    xor-ed with a key from (seed, stream) and with its high bits scrambled, go through one 32-bit finaliser
    (a bijection, so distinct counters below 2**32 never collide), giving two uniforms per value for the
    Box-Muller transform. Integer ops on ``rows``' device. Used for initial embeddings, so an entity's first
    values exist before it is stored, identical whenever they are asked for.
    """
    key = _mix32_int((seed * 0x9E3779B9 + stream * 0x85EBCA6B) & _M32)
    counter = rows.to(torch.int64)[:, None] * (2 * dim) + torch.arange(2 * dim, device=rows.device)
    bits = _mix32((counter & _M32) ^ (((counter >> 32) * 0x27D4EB2F) & _M32) ^ key).to(torch.float64)
    uniform = bits.add_(0.5).div_(2.0**32).view(-1, dim, 2)
    z = uniform[..., 0].log().mul_(-2.0).sqrt_().mul_(torch.cos(uniform[..., 1] * (2.0 * math.pi)))
    return z.mul_(std).to(torch.float32)


def group_slice(counts: Sequence[int], k: int) -> slice:
    """Positions of group k when groups of ``counts`` follow each other."""
    start = sum(counts[:k])
    return slice(start, start + counts[k])


@dataclass
class Lookup:
    """A batch's ids grouped by embedding size.

    The lookup holds one *entry* per distinct entity of the batch (``distinct=True``: duplicate rows share
    it, so their gradients add up there, as a sparse gradient's rows would) or one per row
    (``distinct=False``). Entries are sorted by size index; the ``counts[k]`` entries of size k follow each
    other (in increasing entity id, or row order).

    ``ids``, ``size_index``: the batch's ids and each row's size index (batch order).
    ``entry_ids``, ``entry_size``: each entry's entity and size index. ``entry_of_row``: each batch row's entry,
    so per-row values are entry values gathered with it. ``row_of_entry``: each entry's row (row lookups only).
    ``slots[k]`` (int32; -1 for entities never stored) and ``values[k]`` (``[counts[k], sizes[k]]``, copies)
    of the entries of size k. ``all_stored``: every entry's entity is stored.
    """

    ids: torch.Tensor
    size_index: torch.Tensor
    entry_ids: torch.Tensor
    entry_size: torch.Tensor
    entry_of_row: torch.Tensor
    row_of_entry: torch.Tensor | None
    counts: list[int]
    slots: list[torch.Tensor]
    values: list[torch.Tensor]
    all_stored: bool

    @property
    def distinct(self) -> bool:
        return self.row_of_entry is None

    def group(self, k: int) -> slice:
        """Entry positions of size k."""
        return group_slice(self.counts, k)

    def row_value(self, row: int) -> torch.Tensor:
        """The stored-size value of batch row ``row``."""
        k = int(self.size_index[row])
        return self.values[k][int(self.entry_of_row[row]) - self.group(k).start]


class MixedDimEmbedding:
    """One embedding per entity at its current size; per-size tables with slots allocated on demand."""

    def __init__(
        self,
        n: int,
        sizes: Sequence[int],
        *,
        init_std: float,
        seed: int,
        stream: int,
        device: torch.device,
        mode: str = "lazy",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        initial_size: int = 0,
        growth: float = 2.0,
        min_capacity: int = 64,
    ) -> None:
        if list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"sizes must be distinct, positive and increasing, got {list(sizes)}")
        if not 0 <= initial_size < len(sizes):
            raise ValueError(f"initial_size must index sizes, got {initial_size}")
        if growth <= 1.0 or min_capacity < 1:
            raise ValueError("growth must be > 1 and min_capacity >= 1")
        self.n, self.sizes, self.device = n, tuple(int(d) for d in sizes), device
        self.init_std, self.seed, self.stream = float(init_std), int(seed), int(stream)
        self.mode = check_mode(mode)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.initial_size, self.growth, self.min_capacity = int(initial_size), float(growth), int(min_capacity)
        # int8 / int32 index: 5 bytes per entity (counted in ``index_bytes``).
        self.size_of = torch.full((n,), -1, dtype=torch.int8, device=device)
        self.slot_of = torch.full((n,), -1, dtype=torch.int32, device=device)
        k = len(self.sizes)
        self.tables = [torch.empty(0, d, device=device) for d in self.sizes]
        # Adam's two moments per slot, side by side ([capacity, 2, d]): one gather and one write per step.
        self.moments = [torch.empty(0, 2, d, device=device) for d in self.sizes]
        self.free = [torch.empty(0, dtype=torch.int32, device=device) for _ in range(k)]
        self.n_free = [0] * k
        self.high_water = [0] * k  # slots ever handed out per size; [high_water, capacity) never used
        self.step_count = 0

    # ------------------------------------------------------------------ reading

    @property
    def n_sizes(self) -> int:
        return len(self.sizes)

    def capacity(self, k: int) -> int:
        return int(self.tables[k].shape[0])

    def initial_values(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """The values entity ``ids`` would be stored with at size index ``k`` (a pure function)."""
        return hashed_normal(self.seed, self.stream * 64 + k, ids, self.sizes[k], self.init_std)

    def _size_index(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each id's size index (int64, ``initial_size`` for ids never stored) and the never-stored mask."""
        s = self.size_of[ids].to(torch.int64)
        unstored = s < 0
        return torch.where(unstored, self.initial_size, s), unstored

    def size_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Each id's size index (int64); ids never stored read as ``initial_size``."""
        return self._size_index(ids)[0]

    def lookup(self, ids: torch.Tensor, distinct: bool = False) -> Lookup:
        """Values of ``ids`` at their current sizes, grouped by size (copies, safe to give ``requires_grad``).

        ``distinct``: one entry per distinct entity (for training: duplicates' gradients are summed by
        autograd); else one per row. Entries are grouped with one sort of (size, entity or row) keys.
        """
        size_index, unstored = self._size_index(ids)
        n_rows = int(ids.shape[0])
        base = self.n if distinct else max(n_rows, 1)
        member = ids.to(torch.int64) if distinct else torch.arange(n_rows, device=ids.device)
        keys, entry_of_row = torch.unique(size_index * base + member, return_inverse=True)
        entry_size = torch.div(keys, base, rounding_mode="floor")
        member_of_entry = keys - entry_size * base
        row_of_entry = None if distinct else member_of_entry
        entry_ids = member_of_entry if distinct else ids[member_of_entry]
        counts = torch.bincount(entry_size, minlength=self.n_sizes).tolist()
        all_stored = not bool(unstored.any())
        slots = list(torch.split(self.slot_of.index_select(0, entry_ids), counts))
        values = []
        for k, (c, slot) in enumerate(zip(counts, slots)):
            table = self.tables[k]
            if c == 0:
                values.append(table.new_empty(0, self.sizes[k]))
            elif all_stored or k != self.initial_size:
                values.append(table.index_select(0, slot))
            else:  # entities never stored (all at the initial size) read their initial values
                missing = (slot < 0).nonzero().squeeze(1)
                vals = table.index_select(0, slot.clamp_min(0)) if self.capacity(k) else table.new_empty(c, self.sizes[k])
                vals[missing] = self.initial_values(entry_ids[group_slice(counts, k)][missing], k)
                values.append(vals)
        return Lookup(ids, size_index, entry_ids, entry_size, entry_of_row, row_of_entry, counts, slots, values,
                      all_stored)

    def counts(self) -> list[int]:
        """How many entities are stored at each size."""
        s = self.size_of[self.size_of >= 0].to(torch.int64)
        return torch.bincount(s, minlength=self.n_sizes).tolist()

    def n_stored(self) -> int:
        return int((self.size_of >= 0).sum())

    @property
    def exp_avg(self) -> list[torch.Tensor]:
        """Adam's first moment per size (views into ``moments``)."""
        return [m[:, 0] for m in self.moments]

    @property
    def exp_avg_sq(self) -> list[torch.Tensor]:
        """Adam's second moment per size (views into ``moments``)."""
        return [m[:, 1] for m in self.moments]

    # --------------------------------------------------------------- allocation

    def _reserve(self, k: int, m: int) -> torch.Tensor:
        """``m`` slots of size ``k`` (int32): reused ones from the free list first, then fresh ones (growing the
        table)."""
        take = min(m, self.n_free[k])
        reused = self.free[k][self.n_free[k] - take:self.n_free[k]]
        self.n_free[k] -= take
        fresh = m - take
        if self.high_water[k] + fresh > self.capacity(k):
            self._grow(k, self.high_water[k] + fresh)
        new = torch.arange(self.high_water[k], self.high_water[k] + fresh, dtype=torch.int32, device=self.device)
        self.high_water[k] += fresh
        if take == 0:
            return new  # never-used slots: their moments are still the zeros the table grew with
        self.moments[k][reused] = 0.0  # a new owner starts with fresh Adam moments
        return torch.cat([reused, new])

    def _grow(self, k: int, needed: int) -> None:
        cap = max(needed, math.ceil(self.capacity(k) * self.growth), self.min_capacity)
        for store in (self.tables, self.moments):
            old = store[k]
            grown = old.new_zeros(cap, *old.shape[1:])
            grown[: old.shape[0]] = old
            store[k] = grown
        free = torch.empty(cap, dtype=torch.int32, device=self.device)
        free[: self.n_free[k]] = self.free[k][: self.n_free[k]]
        self.free[k] = free

    def _release(self, k: int, slots: torch.Tensor) -> None:
        m = int(slots.numel())
        self.free[k][self.n_free[k]:self.n_free[k] + m] = slots
        self.n_free[k] += m

    def ensure(self, ids: torch.Tensor) -> torch.Tensor:
        """Store every entity of ``ids`` not stored yet, at ``initial_size`` with its initial values.
        Returns the newly stored (unique) ids."""
        new = torch.unique(ids[self.size_of[ids] < 0])
        if new.numel():
            self._place(self.initial_size, new, self.initial_values(new, self.initial_size))
        return new

    def _place(self, k: int, ids: torch.Tensor, values: torch.Tensor | None) -> None:
        """Store unique ``ids`` (none of them holding a slot) at size k with ``values``."""
        assert values is not None and values.shape == (ids.numel(), self.sizes[k])
        slots = self._reserve(k, int(ids.numel()))
        self.tables[k][slots] = values.to(self.tables[k].dtype)
        self.size_of[ids] = k
        self.slot_of[ids] = slots

    def move(self, ids: torch.Tensor, values_by_size: Sequence[torch.Tensor | None], target: torch.Tensor) -> None:
        """Move stored, unique ``ids`` to size index ``target`` (same length), with the given new values.

        ``values_by_size[k]`` holds the new values of ``ids[target == k]`` (in that order). Old slots are freed
        first, so an arrival at size k can take a slot another entity left at size k in the same move.
        """
        old_k = self.size_of[ids].to(torch.int64)
        old_slot = self.slot_of[ids]
        leaving = torch.bincount(old_k, minlength=self.n_sizes).tolist()
        by_old = torch.sort(old_k, stable=True).indices
        start = 0
        for k, c in enumerate(leaving):
            if c:
                self._release(k, old_slot[by_old[start:start + c]])
                start += c
        arriving = torch.bincount(target, minlength=self.n_sizes).tolist()
        by_target = torch.sort(target, stable=True).indices  # stable: ids[target == k] in order
        start = 0
        for k, c in enumerate(arriving):
            if c:
                self._place(k, ids[by_target[start:start + c]], values_by_size[k])
                start += c

    def move_up(self, lookup: Lookup, values_by_size: Sequence[torch.Tensor | None]) -> None:
        """:meth:`move` for the entries of a ``distinct`` lookup of stored entities below the top size, each
        one size up: ``values_by_size[k + 1]`` holds the new values of the entries of size k (in order). The
        lookup already knows their sizes and slots, so nothing is read back or sorted."""
        if not (lookup.distinct and lookup.all_stored) or lookup.counts[-1]:
            raise ValueError("move_up needs a distinct lookup of stored entities below the top size")
        for k, c in enumerate(lookup.counts):
            if c:
                self._release(k, lookup.slots[k])
        for k, c in enumerate(lookup.counts):
            if c:
                self._place(k + 1, lookup.entry_ids[lookup.group(k)], values_by_size[k + 1])

    # ----------------------------------------------------------------- training

    def apply_gradients(self, lookup: Lookup, grads: Sequence[torch.Tensor | None]) -> None:
        """One Adam step from the gradients of ``lookup.values`` (entries of stored entities only).

        Lazy mode: the touched slots' moments of every size are gathered, updated with multi-tensor ops
        (``torch._foreach_*``, one call for all sizes) and written back; rows of the same entity in a
        row lookup are summed first, as a sparse gradient would be.
        """
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1 - b1**self.step_count
        bc2_sqrt = math.sqrt(1 - b2**self.step_count)
        step = self.lr / bc1
        if self.mode == "lazy":
            if not lookup.all_stored:
                raise RuntimeError("gradient for an entity that is not stored: call ensure() first")
            active, slots, g = [], [], []
            for k in range(self.n_sizes):
                grad = grads[k]
                if grad is None or grad.shape[0] == 0:
                    continue
                slot = lookup.slots[k]
                if not lookup.distinct:  # coalesce rows of the same entity
                    slot, inverse = torch.unique(slot, return_inverse=True)
                    grad = grad.new_zeros(slot.numel(), self.sizes[k]).index_add_(0, inverse, grad)
                active.append(k)
                slots.append(slot)
                g.append(grad)
            if not active:
                return
            moments = [self.moments[k].index_select(0, slot) for k, slot in zip(active, slots)]
            m, v = [x[:, 0] for x in moments], [x[:, 1] for x in moments]
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, g, alpha=1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, value=1 - b2)
            for k, slot, x in zip(active, slots, moments):
                self.moments[k][slot] = x
            torch._foreach_sqrt_(v)
            torch._foreach_div_(v, bc2_sqrt)
            torch._foreach_add_(v, self.eps)
            torch._foreach_div_(m, v)
            for k, slot, update in zip(active, slots, m):
                self.tables[k].index_add_(0, slot, update, alpha=-step)
            return
        for k in range(self.n_sizes):
            used = self.high_water[k]
            if used == 0:
                continue
            grad = grads[k]
            g = torch.zeros(used, self.sizes[k], device=self.device)
            if grad is not None and grad.shape[0]:
                g.index_add_(0, lookup.slots[k], grad)
            m, v = self.moments[k][:used, 0], self.moments[k][:used, 1]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().div_(bc2_sqrt).add_(self.eps)
            self.tables[k][:used].addcdiv_(m, denom, value=-step)

    # ------------------------------------------------------------------- memory

    def table_bytes(self) -> list[int]:
        """Bytes allocated per size table (capacity x size x 4, from the storages)."""
        return [tensor_bytes(t) for t in self.tables]

    def index_bytes(self) -> int:
        """Entity -> (size, slot) index and the free lists."""
        return tensor_bytes(self.size_of) + tensor_bytes(self.slot_of) + sum(tensor_bytes(f) for f in self.free)

    def nbytes(self) -> int:
        return sum(self.table_bytes()) + self.index_bytes()

    def optimizer_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.moments)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the store holds (for tests that check an operation left no trace)."""
        out = {"size_of": self.size_of, "slot_of": self.slot_of}
        for k in range(self.n_sizes):
            out[f"table{k}"] = self.tables[k]
            out[f"moments{k}"] = self.moments[k]
            out[f"free{k}"] = self.free[k][: self.n_free[k]]
        return out


@dataclass
class RowLookup:
    """A batch's rows read from a :class:`StaticMixedDimEmbedding`, one entry per row (static shapes).

    ``size_index``, ``slot``: each row's size index and slot (int64; slot 0, the sink, for an entity never
    stored); ``values[k]``: ``[rows, sizes[k]]``, the row's stored value in the rows at size k and the sink's
    zeros (unused) in the others."""

    size_index: torch.Tensor
    slot: torch.Tensor
    values: list[torch.Tensor]


class StaticMixedDimEmbedding(MixedDimEmbedding):
    """:class:`MixedDimEmbedding` whose per-batch operations have static shapes and read nothing back to the
    host (ESAPN ``method.static_shapes=true``): reads, allocation, moves and Adam are per row, masked.

    - Row 0 of every size's table is a **sink**: reads of rows at other sizes and writes of masked rows go
      there (gathers and scatters of fixed length); it stays zero, and so do its Adam moments. Real slots are
      ``1 .. capacity``.
    - Free lists and counters are device tensors: ``n_free[k]``, ``high_water[k]`` (the next never-used slot).
      The rows that need a slot at size k take positions from one cumulative sum: the first ``n_free[k]`` of
      them pop free slots (top first), the others take fresh slots from the high water mark.
    - **Growth is a host decision between steps** (:meth:`make_room`): the host keeps an upper bound on each
      high water mark (a step hands out at most ``arrivals`` fresh slots per size, one per batch row) and reads
      the device's marks only when that bound passes a capacity; it then grows every size short of
      ``headroom`` steps of arrivals (geometrically, by ``growth``). A step never grows a table, so its
      shapes stay fixed between growths.
    - Adam (``lazy``: the touched slots; ``dense``: every slot) is :class:`MixedDimEmbedding`'s arithmetic
      (``torch.optim.Adam``'s update) with the step count on the device; duplicate rows of one entity sum their
      gradients per entity (:class:`~autorecbench.data.stream.BatchGroups`) and write the same values.
    """

    def __init__(self, n: int, sizes: Sequence[int], *, headroom: int = 8, **kwargs: object) -> None:
        super().__init__(n, sizes, **kwargs)  # type: ignore[arg-type]
        if headroom < 1:
            raise ValueError("headroom must be >= 1")
        self.headroom = int(headroom)
        device, k = self.device, self.n_sizes
        self.tables = [torch.zeros(1, d, device=device) for d in self.sizes]  # the sink row only
        self.moments = [torch.zeros(1, 2, d, device=device) for d in self.sizes]
        self.free = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(k)]  # positions 1..n_free
        self.n_free_t = torch.zeros(k, dtype=torch.int64, device=device)
        self.high_water_t = torch.ones(k, dtype=torch.int64, device=device)
        self.bound = [1] * k  # host: an upper bound on high_water_t, raised by every step's worst case
        self.step_t = torch.zeros((), dtype=torch.float64, device=device)
        self.device_reads = 0  # how often make_room read the device (a host sync each)

    def capacity(self, k: int) -> int:
        return int(self.tables[k].shape[0]) - 1

    # ---------------------------------------------------------- host, between steps

    def make_room(self, arrivals: int) -> None:
        """Before a step in which at most ``arrivals`` rows can take a fresh slot at each size: grow what could
        overflow. Reads the device's high water marks only when the host's bound passes a capacity."""
        receiving = range(self.initial_size, self.n_sizes)  # no entity is ever below its initial size
        if any(self.bound[k] + arrivals > self.capacity(k) + 1 for k in receiving):
            high_water = self.high_water_t.tolist()  # the only device read, between steps
            self.device_reads += 1
            for k in receiving:
                self.bound[k] = high_water[k]
                target = high_water[k] + self.headroom * arrivals - 1
                if target > self.capacity(k):
                    self._grow(k, target)
        for k in receiving:
            self.bound[k] += arrivals

    def _grow(self, k: int, needed: int) -> None:
        cap = max(needed, math.ceil(self.capacity(k) * self.growth), self.min_capacity)
        for store in (self.tables, self.moments, self.free):
            old = store[k]
            grown = old.new_zeros(cap + 1, *old.shape[1:])
            grown[: old.shape[0]] = old
            store[k] = grown

    # ---------------------------------------------------------------- per step

    def rows(self, ids: torch.Tensor, maybe_unstored: bool = False) -> RowLookup:
        """Each row's size, slot and value (gathered copies, safe to give ``requires_grad``). ``maybe_unstored``:
        rows of entities never stored read their initial values (otherwise every entity must be stored)."""
        stored_size = self.size_of.index_select(0, ids).to(torch.int64)
        unstored = stored_size < 0
        size_index = torch.where(unstored, self.initial_size, stored_size)
        slot = self.slot_of.index_select(0, ids).to(torch.int64).clamp_min(0)
        values = []
        for k in range(self.n_sizes):
            value = self.tables[k].index_select(0, torch.where(size_index == k, slot, 0))
            if maybe_unstored and k == self.initial_size:
                value = torch.where(unstored[:, None], self.initial_values(ids, k), value)
            values.append(value)
        return RowLookup(size_index, slot, values)

    def _allocate(self, k: int, need: torch.Tensor) -> torch.Tensor:
        """A slot at size k for each row where ``need`` (0, the sink, elsewhere): free slots first (popped from
        the top), then fresh ones; their Adam moments start at zero."""
        position = torch.cumsum(need, 0) - 1
        n_free = self.n_free_t[k]
        reuse = need & (position < n_free)
        reused = self.free[k].index_select(0, torch.where(reuse, n_free - position, 0))
        fresh = self.high_water_t[k] + position - n_free
        slot = torch.where(reuse, reused, torch.where(need, fresh, 0))
        taken = need.sum()
        from_free = torch.minimum(taken, n_free)
        self.n_free_t[k] -= from_free
        self.high_water_t[k] += taken - from_free
        self.moments[k].index_fill_(0, slot, 0.0)
        return slot

    def _free_rows(self, k: int, leaving: torch.Tensor, slot: torch.Tensor) -> None:
        """Push the slots of the rows where ``leaving`` onto size k's free list."""
        position = torch.where(leaving, self.n_free_t[k] + torch.cumsum(leaving, 0), 0)
        self.free[k].index_copy_(0, position, torch.where(leaving, slot, 0))
        self.n_free_t[k] += leaving.sum()

    def _assign(self, ids: torch.Tensor, groups: BatchGroups, moved: torch.Tensor, size: torch.Tensor,
                leader_slot: torch.Tensor) -> None:
        """Rows where ``moved`` (all rows of an entity, or none) now hold ``size``; their slot is the one their
        entity's leader row got (``leader_slot``, 0 on other rows). Duplicates write equal values."""
        slot = leader_slot.new_zeros(leader_slot.shape).index_add_(0, groups.group, leader_slot)
        slot = slot.index_select(0, groups.group)
        old_size = self.size_of.index_select(0, ids)
        old_slot = self.slot_of.index_select(0, ids)
        self.size_of.index_copy_(0, ids, torch.where(moved, size.to(old_size.dtype), old_size))
        self.slot_of.index_copy_(0, ids, torch.where(moved, slot.to(old_slot.dtype), old_slot))

    def ensure_rows(self, ids: torch.Tensor, groups: BatchGroups) -> None:
        """Store every entity of ``ids`` not stored yet at ``initial_size`` with its initial values
        (:meth:`MixedDimEmbedding.ensure`, static shapes)."""
        k = self.initial_size
        unstored = self.size_of.index_select(0, ids) < 0
        need = unstored & groups.leader
        slot = self._allocate(k, need)
        self.tables[k].index_copy_(0, slot, torch.where(need[:, None], self.initial_values(ids, k), 0.0))
        self._assign(ids, groups, unstored, torch.full_like(ids, k), slot)

    def move_rows_up(self, ids: torch.Tensor, groups: BatchGroups, rows: RowLookup, moves: torch.Tensor,
                     new_values: Sequence[torch.Tensor]) -> None:
        """Move the entities of the rows where ``moves`` (stored, below the top size; all rows of an entity or
        none) one size up; ``new_values[k]`` (``[rows, sizes[k + 1]]``) is the new value of a row at size k.
        Old slots are freed first, so an arrival can take a slot freed at its size in the same move
        (:meth:`MixedDimEmbedding.move_up`)."""
        leader = moves & groups.leader
        for k in range(self.n_sizes - 1):
            self._free_rows(k, leader & (rows.size_index == k), rows.slot)
        new_slot = torch.zeros_like(rows.slot)
        for k in range(self.n_sizes - 1):
            arriving = leader & (rows.size_index == k)
            slot = self._allocate(k + 1, arriving)
            self.tables[k + 1].index_copy_(0, slot, torch.where(arriving[:, None], new_values[k], 0.0))
            new_slot += slot
        self._assign(ids, groups, moves, rows.size_index + 1, new_slot)

    def step_rows(self, groups: BatchGroups, rows: RowLookup, grads: Sequence[torch.Tensor]) -> None:
        """One Adam step from the gradients of ``rows.values`` (``[rows, sizes[k]]``, zero in the rows at other
        sizes): :meth:`MixedDimEmbedding.apply_gradients`' update, per row."""
        self.step_t += 1
        b1, b2 = self.betas
        step = (self.lr / (1 - b1**self.step_t)).to(torch.float32)
        bc2_sqrt = torch.sqrt(1 - b2**self.step_t).to(torch.float32)
        for k in range(self.n_sizes):
            index = torch.where(rows.size_index == k, rows.slot, 0)  # rows at other sizes: the sink, zero gradient
            if self.mode == "dense":  # every slot, those not in the batch with a zero gradient
                grad = torch.zeros_like(self.tables[k]).index_add_(0, index, grads[k])
                index = torch.arange(self.capacity(k) + 1, device=self.device)
            else:
                grad = groups.per_group_sum(grads[k])  # an entity's rows are all at one size
            moments = self.moments[k].index_select(0, index)
            m, v = moments[:, 0], moments[:, 1]
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            self.moments[k].index_copy_(0, index, moments)
            update = m / v.sqrt().div_(bc2_sqrt).add_(self.eps)
            self.tables[k].index_copy_(0, index, self.tables[k].index_select(0, index) + update * -step)

    # ------------------------------------------------------------------ reports

    def index_bytes(self) -> int:
        return super().index_bytes() + tensor_bytes(self.n_free_t) + tensor_bytes(self.high_water_t)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        n_free = self.n_free_t.tolist()
        for k in range(self.n_sizes):
            out[f"free{k}"] = self.free[k][1: n_free[k] + 1]
        return out


class ChainedMaps(nn.Module):
    """ESAPN Eq. 1: ``e_{k+1} = W_{k->k+1} e_k + b_{k->k+1}`` between adjacent sizes, chained up to d_n."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.sizes = tuple(sizes)
        self.maps = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    def step(self, k: int, values: torch.Tensor) -> torch.Tensor:
        """One map, size index k -> k+1 (the initialisation of an enlarged embedding)."""
        return self.maps[k](values)

    def unified(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[entries, d_n]``: entries given per size (``values[k]``: ``[count_k, sizes[k]]``) pass maps k, k+1,
        ..., n-1; entries are processed smallest size first, each level's joining the running block before the
        next map, so each map runs once on every entry below it. Output rows follow the input order (size 0's
        entries first)."""
        h: torch.Tensor | None = None
        for k, v in enumerate(values):
            if h is not None:
                h = self.maps[k - 1](h)
                if v.shape[0]:
                    h = torch.cat([h, v])
            elif v.shape[0]:
                h = v
        if h is None:
            return values[-1].new_empty(0, self.sizes[-1])
        return h

    def rows(self, lookup: RowLookup) -> torch.Tensor:
        """``[rows, d_n]`` from a per-row lookup, static shapes: level by level, a row takes its own value at its
        size and the map of the level below otherwise, ``h_k = where(size == k, e_k, W_{k-1->k} h_{k-1} + b)``
        (every map runs on every row; a row's levels below its size are unused)."""
        h = lookup.values[0]
        for k in range(1, len(self.sizes)):
            h = torch.where((lookup.size_index == k)[:, None], lookup.values[k], self.maps[k - 1](h))
        return h

    def forward(self, lookup: Lookup) -> torch.Tensor:
        """``[batch, d_n]`` in batch order: each row gets its entry's unified embedding."""
        # index_select: a much faster gather (and backward) than h[...]
        return self.unified(lookup.values).index_select(0, lookup.entry_of_row)


class SoftSizeTables(nn.Module):
    """Soft selection over candidate sizes (DARTS, AutoEmb): ``(1/K) sum_k w_k tanh(BN_k(W_k e_k + b_k))``.

    One ``n x sum(sizes)`` table holds every size's embedding of every entity (column blocks); ``W_k`` maps
    size k to the largest size (survey Eq. 19); a batch-norm + tanh per size makes the candidates' magnitudes
    comparable before the weighted sum (Eq. 20). The weights come from the method (α or a controller).
    Batch-norm statistics are per size (and channel) over the batch; its affine parameters are one (γ, β) for
    all sizes (``affine="shared"``, the official code's single ``BatchNorm1d`` applied to each size's block) or
    one per size (``"per_size"``).
    """

    def __init__(self, n: int, sizes: Sequence[int], mode: str, init_std: float, batch_norm: str,
                 affine: str = "shared") -> None:
        super().__init__()
        from autorecbench.models.rating import embedding_norm

        self.sizes = tuple(int(d) for d in sizes)
        self.offsets = [0, *torch.cumsum(torch.tensor(self.sizes), 0).tolist()]
        top = self.sizes[-1]
        self.table = embedding_table(n, self.offsets[-1], mode, init_std)
        self.maps = nn.ModuleList(nn.Linear(d, top) for d in self.sizes)
        if affine not in ("shared", "per_size"):
            raise ValueError(f"affine must be 'shared' or 'per_size', got {affine!r}")
        # One norm over [batch, K * d_n]: per size and channel statistics (and affine parameters, per_size).
        self.norm = embedding_norm(len(self.sizes) * top, batch_norm, affine=affine == "per_size")
        self.shared = None if affine == "per_size" else nn.ParameterList(
            [nn.Parameter(torch.ones(top)), nn.Parameter(torch.zeros(top))])

    def candidates(self, e: torch.Tensor) -> torch.Tensor:
        """``[batch, K, d_n]``: every candidate size's embedding (``e``: table rows ``[batch, Σ d]``), mapped,
        normalised and squashed."""
        mapped = [m(e[:, a:b]) for m, a, b in zip(self.maps, self.offsets[:-1], self.offsets[1:])]
        normed = self.norm(torch.cat(mapped, dim=1)).view(e.shape[0], len(self.sizes), -1)
        if self.shared is not None:
            normed = torch.addcmul(self.shared[1], normed, self.shared[0])
        return tanh(normed)

    def mix(self, e: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eq. 20 from table rows ``e``: ``(1/K) sum_k weights[:, k] * candidate_k``, ``[batch, d_n]``."""
        return torch.einsum("bk,bkd->bd", weights, self.candidates(e)) / len(self.sizes)

    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eq. 20 for entities ``ids``."""
        return self.mix(self.table(ids), weights)

    def size_bytes(self) -> list[int]:
        """Bytes of each size's column block (the table's storage split by columns)."""
        item = self.table.weight.element_size()
        return [self.table.weight.shape[0] * d * item for d in self.sizes]
