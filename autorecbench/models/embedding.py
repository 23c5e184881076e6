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
- All of this is vectorised over a batch; loops run over candidate sizes (six), never over entities.

The store is trained with its own Adam (``torch.optim.Adam``'s update rule, moments kept per slot beside the
table, so they move and grow with it; a slot's moments are zeroed when it is handed to a new owner):
``lazy`` updates the moments and values of the slots a batch touches only (``torch.optim.SparseAdam``'s
algorithm, one global step count for bias correction); ``dense`` applies Adam to every slot in use at every
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

from autorecbench.optim import check_mode, embedding_table, tensor_bytes

_M32 = 0xFFFFFFFF


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow (split c in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (``lowbias32``): well-mixed bits from consecutive inputs."""
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_normal(seed: int, stream: int, rows: torch.Tensor, dim: int, std: float) -> torch.Tensor:
    """N(0, std^2) values ``[len(rows), dim]`` that depend only on (seed, stream, row, column).

    Counter-based: two hashed 32-bit uniforms per value and the Box-Muller transform, computed with integer
    ops on ``rows``' device. Used for initial embeddings, so an entity's first values exist before it is
    stored, identical whenever they are asked for.
    """
    key = _mix32(torch.tensor((seed * 0x9E3779B9 + stream * 0x85EBCA6B) & _M32, dtype=torch.int64, device=rows.device))
    cols = torch.arange(dim, device=rows.device, dtype=torch.int64)
    counter = rows.to(torch.int64)[:, None] * (2 * dim) + 2 * cols[None, :]  # two counters per value
    high = _mix32((counter >> 32) ^ key)
    u1 = (_mix32((counter & _M32) ^ high).to(torch.float64) + 0.5) / 2.0**32
    u2 = (_mix32(((counter + 1) & _M32) ^ high ^ 0x68E31DA4).to(torch.float64) + 0.5) / 2.0**32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (z * std).to(torch.float32)


@dataclass
class Lookup:
    """Rows of a batch grouped by embedding size.

    ``size_index``: each row's size index (batch order). ``perm``: row positions sorted by size (stable);
    ``counts[k]`` rows of size k follow each other in that order. ``slots[k]``/``values[k]``: the slots and
    the ``[counts[k], sizes[k]]`` values of those rows (``slots`` is -1 for rows never stored).
    """

    ids: torch.Tensor
    size_index: torch.Tensor
    perm: torch.Tensor
    counts: list[int]
    slots: list[torch.Tensor]
    values: list[torch.Tensor]

    def rows_of(self, k: int) -> torch.Tensor:
        start = sum(self.counts[:k])
        return self.perm[start:start + self.counts[k]]


def group_by_size(size_index: torch.Tensor, n_sizes: int) -> tuple[torch.Tensor, list[int]]:
    """Row positions sorted by size (stable) and the number of rows per size (one host sync)."""
    perm = torch.sort(size_index, stable=True).indices
    counts = torch.bincount(size_index, minlength=n_sizes).tolist()
    return perm, counts


def unpermute(values: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Rows given in ``perm`` order back in batch order."""
    out = torch.empty_like(values)
    out[perm] = values
    return out


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
        self.exp_avg = [torch.empty(0, d, device=device) for d in self.sizes]
        self.exp_avg_sq = [torch.empty(0, d, device=device) for d in self.sizes]
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
        return torch.where(unstored, torch.full_like(s, self.initial_size), s), unstored

    def size_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Each id's size index (int64); ids never stored read as ``initial_size``."""
        return self._size_index(ids)[0]

    def lookup(self, ids: torch.Tensor) -> Lookup:
        """Values of ``ids`` at their current sizes, grouped by size (copies, safe to give ``requires_grad``)."""
        size_index, unstored = self._size_index(ids)
        perm, counts = group_by_size(size_index, self.n_sizes)
        all_stored = not bool(unstored.any())
        slots, values, start = [], [], 0
        for k, c in enumerate(counts):
            rows = perm[start:start + c]
            start += c
            ids_k = ids[rows]
            slot = self.slot_of[ids_k].to(torch.int64)
            if all_stored or k != self.initial_size:
                vals = self.tables[k][slot]
            else:  # rows never stored (all at the initial size) read their initial values
                unstored = (slot < 0).nonzero().squeeze(1)
                vals = self.tables[k][slot.clamp_min(0)] if self.capacity(k) else self.tables[k].new_empty(c, self.sizes[k])
                if unstored.numel():
                    vals[unstored] = self.initial_values(ids_k[unstored], k)
            slots.append(slot)
            values.append(vals)
        return Lookup(ids, size_index, perm, counts, slots, values)

    def counts(self) -> list[int]:
        """How many entities are stored at each size."""
        s = self.size_of[self.size_of >= 0].to(torch.int64)
        return torch.bincount(s, minlength=self.n_sizes).tolist()

    def n_stored(self) -> int:
        return int((self.size_of >= 0).sum())

    # --------------------------------------------------------------- allocation

    def _reserve(self, k: int, m: int) -> torch.Tensor:
        """``m`` slots of size ``k``: reused ones from the free list first, then fresh ones (growing the table)."""
        take = min(m, self.n_free[k])
        reused = self.free[k][self.n_free[k] - take:self.n_free[k]].to(torch.int64)
        self.n_free[k] -= take
        fresh = m - take
        if self.high_water[k] + fresh > self.capacity(k):
            self._grow(k, self.high_water[k] + fresh)
        new = torch.arange(self.high_water[k], self.high_water[k] + fresh, device=self.device)
        self.high_water[k] += fresh
        slots = torch.cat([reused, new])
        self.exp_avg[k][slots] = 0.0  # a new owner starts with fresh Adam moments
        self.exp_avg_sq[k][slots] = 0.0
        return slots

    def _grow(self, k: int, needed: int) -> None:
        cap = max(needed, math.ceil(self.capacity(k) * self.growth), self.min_capacity)
        for store in (self.tables, self.exp_avg, self.exp_avg_sq):
            old = store[k]
            grown = torch.zeros(cap, self.sizes[k], device=self.device)
            grown[: old.shape[0]] = old
            store[k] = grown
        free = torch.empty(cap, dtype=torch.int32, device=self.device)
        free[: self.n_free[k]] = self.free[k][: self.n_free[k]]
        self.free[k] = free

    def _release(self, k: int, slots: torch.Tensor) -> None:
        m = int(slots.numel())
        self.free[k][self.n_free[k]:self.n_free[k] + m] = slots.to(torch.int32)
        self.n_free[k] += m

    def ensure(self, ids: torch.Tensor) -> torch.Tensor:
        """Store every entity of ``ids`` not stored yet, at ``initial_size`` with its initial values.
        Returns the newly stored (unique) ids."""
        new = torch.unique(ids[self.size_of[ids] < 0])
        if new.numel():
            k = self.initial_size
            slots = self._reserve(k, int(new.numel()))
            self.tables[k][slots] = self.initial_values(new, k)
            self.size_of[new] = k
            self.slot_of[new] = slots.to(torch.int32)
        return new

    def move(self, ids: torch.Tensor, values_by_size: Sequence[torch.Tensor | None], target: torch.Tensor) -> None:
        """Move stored, unique ``ids`` to size index ``target`` (same length), with the given new values.

        ``values_by_size[k]`` holds the new values of ``ids[target == k]`` (in that order). Old slots are freed.
        """
        old_k = self.size_of[ids].to(torch.int64)
        old_slot = self.slot_of[ids].to(torch.int64)
        for k in range(self.n_sizes):
            leaving = old_k == k
            if bool(leaving.any()):
                self._release(k, old_slot[leaving])
        for k in range(self.n_sizes):
            arriving = (target == k).nonzero().squeeze(1)
            if arriving.numel() == 0:
                continue
            slots = self._reserve(k, int(arriving.numel()))
            values = values_by_size[k]
            assert values is not None and values.shape == (arriving.numel(), self.sizes[k])
            self.tables[k][slots] = values.to(self.tables[k].dtype)
            self.size_of[ids[arriving]] = k
            self.slot_of[ids[arriving]] = slots.to(torch.int32)

    # ----------------------------------------------------------------- training

    def apply_gradients(self, lookup: Lookup, grads: Sequence[torch.Tensor | None]) -> None:
        """One Adam step from the gradients of ``lookup.values`` (rows of stored entities only)."""
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1 - b1**self.step_count
        bc2_sqrt = math.sqrt(1 - b2**self.step_count)
        step = self.lr / bc1
        for k in range(self.n_sizes):
            grad = grads[k]
            if self.mode == "lazy":
                if grad is None or grad.shape[0] == 0:
                    continue
                slots = lookup.slots[k]
                if bool((slots < 0).any()):
                    raise RuntimeError("gradient for an entity that is not stored: call ensure() first")
                # Coalesce rows of the same entity (duplicates in a batch), as a sparse gradient would.
                unique, inverse = torch.unique(slots, return_inverse=True)
                g = torch.zeros(unique.numel(), self.sizes[k], device=self.device).index_add_(0, inverse, grad)
                m = self.exp_avg[k][unique].mul_(b1).add_(g, alpha=1 - b1)
                v = self.exp_avg_sq[k][unique].mul_(b2).addcmul_(g, g, value=1 - b2)
                self.exp_avg[k][unique] = m
                self.exp_avg_sq[k][unique] = v
                denom = v.sqrt_().div_(bc2_sqrt).add_(self.eps)
                self.tables[k].index_add_(0, unique, m.div_(denom), alpha=-step)
            else:
                used = self.high_water[k]
                if used == 0:
                    continue
                g = torch.zeros(used, self.sizes[k], device=self.device)
                if grad is not None and grad.shape[0]:
                    g.index_add_(0, lookup.slots[k], grad)
                m, v = self.exp_avg[k][:used], self.exp_avg_sq[k][:used]
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
        return sum(tensor_bytes(t) for t in self.exp_avg + self.exp_avg_sq)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the store holds (for tests that check an operation left no trace)."""
        out = {"size_of": self.size_of, "slot_of": self.slot_of}
        for k in range(self.n_sizes):
            out[f"table{k}"] = self.tables[k]
            out[f"exp_avg{k}"] = self.exp_avg[k]
            out[f"exp_avg_sq{k}"] = self.exp_avg_sq[k]
            out[f"free{k}"] = self.free[k][: self.n_free[k]]
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

    def forward(self, lookup: Lookup) -> torch.Tensor:
        """``[batch, d_n]`` in batch order: rows of size k pass maps k, k+1, ..., n-1.

        Rows are processed smallest size first, each level's rows joining the running block before the
        next map, so each map runs once per batch on every row below it.
        """
        h = lookup.values[0]
        for k in range(1, len(self.sizes)):
            h = torch.cat([self.maps[k - 1](h), lookup.values[k]])
        return unpermute(h, lookup.perm)


class SoftSizeTables(nn.Module):
    """Soft selection over candidate sizes (DARTS, AutoEmb): ``(1/K) sum_k w_k tanh(BN_k(W_k e_k + b_k))``.

    One ``n x sum(sizes)`` table holds every size's embedding of every entity (column blocks); ``W_k`` maps
    size k to the largest size (survey Eq. 19); a batch-norm + tanh per size makes the candidates' magnitudes
    comparable before the weighted sum (Eq. 20). The weights come from the method (α or a controller).
    """

    def __init__(self, n: int, sizes: Sequence[int], mode: str, init_std: float, batch_norm: str) -> None:
        super().__init__()
        from autorecbench.models.rating import embedding_norm

        self.sizes = tuple(int(d) for d in sizes)
        self.offsets = [0, *torch.cumsum(torch.tensor(self.sizes), 0).tolist()]
        top = self.sizes[-1]
        self.table = embedding_table(n, self.offsets[-1], mode, init_std)
        self.maps = nn.ModuleList(nn.Linear(d, top) for d in self.sizes)
        # One norm over [batch, K * d_n]: per size and channel statistics and affine parameters.
        self.norm = embedding_norm(len(self.sizes) * top, batch_norm)

    def candidates(self, ids: torch.Tensor) -> torch.Tensor:
        """``[batch, K, d_n]``: every candidate size's embedding, mapped, normalised and squashed."""
        e = self.table(ids)
        mapped = [m(e[:, a:b]) for m, a, b in zip(self.maps, self.offsets[:-1], self.offsets[1:])]
        stacked = torch.cat(mapped, dim=1)
        return torch.tanh(self.norm(stacked)).view(ids.shape[0], len(self.sizes), -1)

    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eq. 20: ``(1/K) sum_k weights[:, k] * candidate_k``, ``[batch, d_n]``."""
        return torch.einsum("bk,bkd->bd", weights, self.candidates(ids)) / len(self.sizes)

    def size_bytes(self) -> list[int]:
        """Bytes of each size's column block (the table's storage split by columns)."""
        item = self.table.weight.element_size()
        return [self.table.weight.shape[0] * d * item for d in self.sizes]
