"""AutoIAS (Wei, Wang, Zhu; CIKM 2021): integrated architecture search over embedding sizes, projection sizes,
interaction functions, interaction selection, insertion layers and MLP widths, with a supernet trained by
knowledge distillation and an architecture generator trained by REINFORCE.

There is no public code: the paper (``../shared/papers/002_…``) is the spec, read section by section in
``../shared/docs/ameir-autoias.md`` Part B. Equation by equation:

- **Search space** (§3.2, Table 3; :class:`AutoIASSpace`), n fields, P = C(n, 2) pairs (second order only):
  S1 embedding size per field (Eq. 4), S2 projection size per pair, ``ê_i = P_{i→k}(e_i)`` linear (Eq. 5),
  S3 interaction function per pair, ``v_ij = f(ê_i, ê_j)`` with f ∈ {product ê_i⊙ê_j, concat
  ``Linear([ê_i, ê_j])``: R^{2d}→R^d, plus, elementwise max} (Eq. 6–7), S4 selection of every first-order
  field and pair, S5 the MLP layer each selected vector is inserted at, ``o_l = f_l([vectors inserted at l,
  o_{l−1}])`` (Eq. 8), S6 the hidden units of each of the ``layers`` MLP layers. Sizes come from ``dims``
  (Table 3: {4, …, 128}), widths from ``hidden`` ({64, 128, 256}), ``layers: 5``.
- **Supernet with ordinal parameter sharing** (Eq. 9, §3.3.1, §4.2.2; :class:`AutoIASSupernet`): every sized
  decision is stored at its maximum and a child uses the leading slice, applied as masks
  (``models/supernet.py``) so that the N students of a batch run as one batched computation. The super-MLP
  connects every vector to every layer (``W_{l,v} ∈ R^{H×D}``); a child's insertion switches one connection
  on. Two exact ways to compute the students' inputs: on a GPU every vector of every student is computed with
  all four functions and the insertion gates are folded into the weights (no host synchronisation); on the
  CPU the architectures are read on the host and only the selected vectors are computed, each with its own
  function, grouped per student and layer (5–8× less work on Criteo's 741 pairs). A child sliced out equals
  the standalone network :class:`ChildNet` with copied weights, on both ways (tested).
- **KD training** (Eq. 10–16, Algorithm 1; :meth:`AutoIAS.search`): per training batch, one Adam step of the
  teacher (the largest architecture) on its logloss (Eq. 10–11); the teacher's prediction ŷ_t after that step
  (Eq. 12); N = ``students`` architectures drawn from the generator (Eq. 13); one Adam step on
  ``(1/N) Σ_i [β CE(ŷ_t, y_i) + (1 − β) CE(y, y_i)]`` with β = ``beta`` (Eq. 14–16). One Adam optimiser (lr
  ``lr``) takes both steps.
- **Generator** (Eq. 17, §4.2.3; ``models.supernet.PolicyGenerator``): components in the order S1→S6; a learned
  state embedding per candidate; component i's 3-layer MLP reads a start state and the states of the
  components before it and gives one softmax per decision.
- **REINFORCE** (Eq. 18–23): M = ``reward_samples`` architectures per batch, reward ``R = τ − τ̄`` with τ the
  AUC of the architecture (inherited weights) on a reward batch and ``τ̄ ← α_τ τ̄ + (1 − α_τ) τ``; one Adam step
  (lr ``generator_lr``) on ``−(1/M) Σ log P(a_i; θ) R_i``.
- **Stopping and output** (Algorithm 1): at every runner evaluation an architecture a* is derived from the
  generator and validated with the supernet's weights (the loop's validation AUC); the search stops when it
  stops improving (the runner's patience); the best a* is re-trained from scratch (:meth:`AutoIAS.build`).

Choices the paper leaves open ([D] in the spec), with their defaults (``conf/method/autoias.yaml``):
- ``teacher_function: concat`` (§3.3.1: "the concatenation operation has the most parameters"; the same
  section also says function choices are "enumerated"); the teacher takes every largest size, selects
  everything and inserts everything at layer 0.
- ``P_{i→k}`` is one ``D×D`` map per field without bias, sliced to ``[:d_k, :d_i]`` (the notation depends on i
  and k only); concat's map is per pair, ``R^{D×2D}`` with bias, sliced to rows ``[:d]`` and columns
  ``[:d] ∪ [D:D+d]``; f_l is Linear + ReLU; layer 0 takes only its inserted vectors; a first-order field is
  inserted at its own size; the logit is a Linear over the last layer. Supernet weights start as
  ``nn.Linear`` of the teacher's fan-in would; embeddings N(0, ``init_std``²) (the project's default).
- Generator: ``generator_state_dim: 16`` (a component's state is the mean of its chosen candidates'
  embeddings), ``generator_hidden: [64, 64]`` with ``generator_activation: tanh``.
- ``reward_split: valid``: τ on ``loop.valid_batch()`` (§3.4's text); ``train`` is Algorithm 1's ``x_tra``.
  ``baseline_alpha: 0.9`` (α_τ); τ̄ starts at the first batch's mean τ.
- ``derive: argmax`` (the issue's reading): a* is each decision's most likely choice, the greedy walk through
  the components; ``sample`` draws a* from the generator as Algorithm 1 writes it.
- ``search_epochs`` / ``search_patience`` (null: the runner's epochs and patience; the search is checked at
  every runner evaluation).
- ``kd: true``; ``kd: false`` drops the teacher step and the soft loss (students on the labels only: the
  "KD disabled" setting of Fig. 5); β = 0 keeps the teacher step with a zero soft weight (Fig. 3's β = 0).
- ``search: generator``; ``random`` (Fig. 5): students uniform, no generator, and at each evaluation a* is the
  best of ``random_candidates`` uniform architectures scored on the validation subset (null: M per step since
  the last evaluation, the generator's number of scored architectures).
- ``valid_rows: 100000``: the seeded validation subset for random search and for the probe: at every
  evaluation the mean validation logloss of ``probe_architectures: 8`` fixed uniform architectures (seeded by
  the run's seed) with the supernet's weights is recorded (``search.parquet``; Fig. 3's supernet quality).
- ``max_chunk_elements: null``: the students run in chunks so that one ``[students, rows, vectors, D]`` tensor
  stays under this many elements (gradients accumulate: the same update); null: 4e6 on the CPU (larger
  tensors are served by fresh memory maps, and their page faults cost more than the batching saves: one
  student per pass on Criteo), 2e8 on a GPU.
- ``budget: paper | quick``: ``quick`` shrinks the space (``dims``, ``hidden``) and the search so that search
  and re-train of ~80k Criteo-format rows fit in 10 minutes on 2 CPU cores; every key it sets can be overridden.
- The re-train uses Adam (``lr``), batch size and early stopping of the runner; an embedding table is
  allocated only for a field the derived architecture uses (selected, or in a selected pair).
The ``model=`` group does not shape the network (AutoIAS searches the whole model); only its
``embedding_init_std`` and ``embedding_optimizer`` are read, as by the other methods.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from autorecbench.errors import UserError
from autorecbench.methods.base import MemoryReport, MethodContext, OfflineLoop, register_method
from autorecbench.methods.offline_common import BackboneMethod, CostedSearch, check_positive, embedding_tables
from autorecbench.models.layers import field_offsets, pair_index
from autorecbench.models.supernet import (
    Architecture,
    ArchCost,
    ArchSpace,
    Component,
    MovingBaseline,
    OrdinalEmbedding,
    OrdinalLinear,
    PolicyGenerator,
    arch_cost,
    batched_auc,
    child_scores,
    ordinal_mask,
    reinforce_loss,
    score_children,
)
from autorecbench.train.optim import tensor_bytes

if TYPE_CHECKING:
    from autorecbench.data.offline import OfflineBatch

FUNCTIONS = ("product", "concat", "plus", "max")
PRODUCT, CONCAT, PLUS, MAX = range(4)
SEARCHES = ("generator", "random")
REWARD_SPLITS = ("valid", "train")
DERIVES = ("argmax", "sample")
SCORE_ROWS = 20_000  # validation rows per batched pass when scoring architectures
CPU_CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS = 4e6, 2e8  # method.max_chunk_elements=null
COST_ROWS = 4096  # rows of the synthetic batch the derived network's FLOPs and QPS are measured on


# ---------------------------------------------------------------- the search space (Table 3)

@dataclass
class Decoded:
    """S architectures as value tensors: ``field_dim [S, n]``, ``pair_dim [S, P]``, ``function [S, P]`` (index
    into FUNCTIONS), ``selected [S, V]`` and ``layer [S, V]`` over the V = n + P vectors (fields, then pairs),
    ``hidden [S, L]``."""

    field_dim: torch.Tensor
    pair_dim: torch.Tensor
    function: torch.Tensor
    selected: torch.Tensor
    layer: torch.Tensor
    hidden: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.field_dim.shape[0])

    def one(self, s: int) -> dict[str, list[Any]]:
        """Architecture ``s`` as Python lists."""
        return {k: getattr(self, k)[s].tolist() for k in ("field_dim", "pair_dim", "function", "selected", "layer", "hidden")}


class AutoIASSpace:
    """Table 3's space over the given fields: components ``embedding_dim`` (per field), ``projection_dim``,
    ``function`` (per pair), ``selected``, ``layer`` (per field and pair) and ``hidden`` (per MLP layer)."""

    def __init__(self, fields: Sequence[str], dims: Sequence[int], hidden: Sequence[int], layers: int) -> None:
        self.fields = list(fields)
        rows, cols = pair_index(len(self.fields))
        self.pairs = list(zip(rows.tolist(), cols.tolist()))
        self.pair_names = [(self.fields[i], self.fields[j]) for i, j in self.pairs]
        pair_keys = tuple(f"{a}|{b}" for a, b in self.pair_names)
        self.dims = sorted(int(d) for d in dims)
        self.hidden = sorted(int(h) for h in hidden)
        self.layers = int(layers)
        vectors = (*self.fields, *pair_keys)
        self.space = ArchSpace([
            Component("embedding_dim", tuple(self.fields), tuple(self.dims)),
            Component("projection_dim", pair_keys, tuple(self.dims)),
            Component("function", pair_keys, FUNCTIONS),
            Component("selected", vectors, (False, True)),
            Component("layer", vectors, tuple(range(self.layers))),
            Component("hidden", tuple(f"layer{l}" for l in range(self.layers)), tuple(self.hidden)),
        ])

    @property
    def n_fields(self) -> int:
        return len(self.fields)

    @property
    def n_vectors(self) -> int:
        return len(self.fields) + len(self.pairs)

    def teacher(self, function: str, device: torch.device | str = "cpu") -> Architecture:
        """The architecture with the most parameters (§3.3.1): largest sizes, everything selected at layer 0."""
        return self.space.constant({"embedding_dim": self.dims[-1], "projection_dim": self.dims[-1],
                                    "function": function, "selected": True, "layer": 0,
                                    "hidden": self.hidden[-1]}, device)

    def decode(self, arch: Architecture) -> Decoded:
        """Value tensors of one (``[K]``) or a batch (``[S, K]``) of architectures."""
        batched = arch if arch["embedding_dim"].dim() == 2 else {k: v[None] for k, v in arch.items()}
        values = self.space.values
        return Decoded(values(batched, "embedding_dim"), values(batched, "projection_dim"), batched["function"],
                       batched["selected"].bool(), batched["layer"], values(batched, "hidden"))

    def describe(self, arch: Architecture) -> dict[str, Any]:
        """``architecture.json``'s view of one architecture (and every decision under ``decisions``)."""
        d = self.decode(arch).one(0)
        n = self.n_fields
        chosen = [p for p in range(len(self.pairs)) if d["selected"][n + p]]
        return {
            "embedding_dim": dict(zip(self.fields, d["field_dim"])),
            "selected_fields": [self.fields[f] for f in range(n) if d["selected"][f]],
            "field_layers": [d["layer"][f] for f in range(n) if d["selected"][f]],
            "selected_pairs": [list(self.pair_names[p]) for p in chosen],
            "pair_functions": [FUNCTIONS[d["function"][p]] for p in chosen],
            "pair_projection_dims": [d["pair_dim"][p] for p in chosen],
            "pair_layers": [d["layer"][n + p] for p in chosen],
            "hidden": d["hidden"],
            "used_fields": [self.fields[f] for f in sorted(used_fields(d, self.pairs, n))],
            "decisions": self.space.to_json(arch),
        }


def used_fields(d: dict[str, list[Any]], pairs: Sequence[tuple[int, int]], n: int) -> set[int]:
    """The fields a derived network needs a table for: selected first-order, or in a selected pair."""
    used = {f for f in range(n) if d["selected"][f]}
    for p, (i, j) in enumerate(pairs):
        if d["selected"][n + p]:
            used |= {i, j}
    return used


# ---------------------------------------------------------------- the supernet (Eq. 4-9)

class AutoIASSupernet(nn.Module):
    """Every architecture of the space at once, with ordinal parameter sharing (Eq. 9) applied as masks.

    ``forward(x, arch)`` runs the S architectures of ``arch`` (a :class:`Decoded`) on the same rows as one
    batched computation and returns ``[S, B]`` logits; each row equals what the sliced child computes.
    """

    def __init__(self, cardinalities: Sequence[int], space: AutoIASSpace, init_std: float, sparse: bool) -> None:
        super().__init__()
        n, n_pairs, layers = space.n_fields, len(space.pairs), space.layers
        d, h = space.dims[-1], space.hidden[-1]
        self.max_dim, self.max_hidden, self.n_layers, self.n_vectors = d, h, layers, space.n_vectors
        self.n_fields = n
        # Where the inserted inputs are computed: from the selected vectors, grouped on the host (None: on the
        # CPU), or with gates folded into the weights (on a GPU: no host synchronisation).
        self.host_grouping: bool | None = None
        rows, cols = (torch.tensor(t, dtype=torch.int64) for t in zip(*space.pairs)) if space.pairs else (
            torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.embedding = OrdinalEmbedding(cardinalities, d, init_std, sparse)  # Eq. 4
        self.projection = OrdinalLinear(d, d, groups=n, bias=False)  # Eq. 5: P_{i→k} = W_i[:d_k, :d_i]
        self.concat = OrdinalLinear(2 * d, d, groups=max(n_pairs, 1))  # Eq. 6's concat, per pair
        teacher_fan_in = self.n_vectors * d
        bound = 1 / math.sqrt(teacher_fan_in)
        # W_{l,v}: layer l's weight for vector v, rows v*D .. v*D + D of mlp_input[l] (Eq. 8's super-MLP).
        self.mlp_input = nn.Parameter(torch.empty(layers, self.n_vectors * d, h).uniform_(-bound, bound))
        self.mlp_hidden = OrdinalLinear(h, h, groups=max(layers - 1, 1), bias=False, fan_in=h + teacher_fan_in)
        self.mlp_bias = nn.Parameter(torch.empty(layers, h).uniform_(-bound, bound))
        self.head = OrdinalLinear(h, 1)

    def vectors(self, x: torch.Tensor, arch: Decoded) -> torch.Tensor:
        """Every first-order and pair vector of S architectures, zero beyond each size: ``[S, B, V*D]``.

        Computed vector-major (``[vectors, S, B, D]``): the pair gathers and the per-field and per-pair maps are
        then batched over the leading dimension without copies."""
        s, b, d = arch.count, x.shape[0], self.max_dim
        field_mask = ordinal_mask(arch.field_dim.T, d)[:, :, None]  # [n, S, 1, D]
        e = (self.embedding(x).transpose(0, 1)[:, None] * field_mask).reshape(-1, s * b, d)  # Eq. 4
        projected = torch.bmm(e, self.projection.weight.transpose(1, 2))  # P_i e_i at the largest output size
        pair_mask = ordinal_mask(arch.pair_dim.T, d)[:, :, None]  # [P, S, 1, D]
        left = (projected[self.rows].view(-1, s, b, d) * pair_mask).view(-1, s * b, d)  # Eq. 5
        right = (projected[self.cols].view(-1, s, b, d) * pair_mask).view(-1, s * b, d)
        weight = self.concat.weight.transpose(1, 2)  # [P, 2D, D]: rows [:D] read ê_i, rows [D:] read ê_j
        concat = torch.baddbmm(torch.baddbmm(self.concat.bias[:, None], left, weight[:, :d]), right, weight[:, d:])
        function = arch.function.T[:, :, None, None]  # [P, S, 1, 1]
        shape = (-1, s, b, d)
        left, right = left.view(shape), right.view(shape)
        v = torch.where(function == PRODUCT, left * right, concat.view(shape) * pair_mask)  # Eq. 6-7
        v = torch.where(function == PLUS, left + right, v)
        v = torch.where(function == MAX, torch.maximum(left, right), v)
        return torch.cat([e.view(shape), v], dim=0).permute(1, 2, 0, 3).reshape(s, b, -1)

    def _gated(self, vectors: torch.Tensor, arch: Decoded, layers: list[int]) -> list[torch.Tensor | None]:
        """Every layer's inserted input in one batched product, the gates folded into per-architecture weights
        (no host synchronisation; the products of the other layers' vectors are computed and zeroed)."""
        s, b, _ = vectors.shape
        d, h = self.max_dim, self.max_hidden
        gate = arch.selected[..., None] & (arch.layer[..., None] == torch.tensor(layers, device=vectors.device))
        weight = self.mlp_input[layers].view(len(layers), self.n_vectors, d, h).permute(1, 2, 0, 3)
        gated = (weight[None] * gate[:, :, None, :, None].to(weight.dtype)).reshape(s, self.n_vectors * d, -1)
        z = torch.bmm(vectors, gated).view(s, b, len(layers), h)
        out: list[torch.Tensor | None] = [None] * self.n_layers
        for i, l in enumerate(layers):
            out[l] = z[:, :, i]
        return out

    def _selected_inputs(self, x: torch.Tensor, arch: Decoded) -> list[torch.Tensor | None]:
        """The same sums computed from the selected vectors only, each with its own function, grouped on the
        host (the architectures are read on the CPU, where that costs nothing): per architecture and layer one
        product over the vectors inserted there. The same numbers as :meth:`_gated` without the work on
        unselected vectors, other functions and other layers."""
        s, b, d, h, n = arch.count, x.shape[0], self.max_dim, self.max_hidden, self.n_fields
        selected, layer, function = arch.selected.cpu(), arch.layer.cpu(), arch.function.cpu()
        field_mask = ordinal_mask(arch.field_dim.T, d)[:, :, None]  # [n, S, 1, D]
        e = self.embedding(x).transpose(0, 1)[:, None] * field_mask  # [n, S, B, D] (Eq. 4)
        projected = torch.bmm(e.reshape(n, s * b, d), self.projection.weight.transpose(1, 2)).view(n, s, b, d)
        pair_mask = ordinal_mask(arch.pair_dim, d)  # [S, P, D]
        chosen_s, chosen_f = torch.nonzero(selected[:, :n], as_tuple=True)
        pieces, owner, vector = [e[chosen_f, chosen_s]], [chosen_s], [chosen_f]
        for fn in range(len(FUNCTIONS)):
            ps, pp = torch.nonzero(selected[:, n:] & (function == fn), as_tuple=True)
            if ps.numel() == 0:
                continue
            mask = pair_mask[ps, pp][:, None]  # [m, 1, D]
            left = projected[self.rows[pp], ps] * mask  # ê_i (Eq. 5)
            right = projected[self.cols[pp], ps] * mask
            if fn == PRODUCT:  # Eq. 6-7
                v = left * right
            elif fn == PLUS:
                v = left + right
            elif fn == MAX:
                v = torch.maximum(left, right)
            else:
                weight = self.concat.weight[pp].transpose(1, 2)  # [m, 2D, D]
                assert self.concat.bias is not None
                v = torch.baddbmm(torch.baddbmm(self.concat.bias[pp][:, None], left, weight[:, :d]), right,
                                  weight[:, d:]) * mask
            pieces.append(v)
            owner.append(ps)
            vector.append(pp + n)
        vectors = torch.cat(pieces)  # [m, B, D], one row per selected (architecture, vector)
        owner_t, vector_t = torch.cat(owner), torch.cat(vector)
        slot = owner_t * self.n_layers + layer[owner_t, vector_t]
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=s * self.n_layers).tolist()
        offsets = torch.arange(d)
        out: list[list[torch.Tensor]] = [[] for _ in range(self.n_layers)]
        start = 0
        for index, count in enumerate(counts):
            arch_index, l = divmod(index, self.n_layers)
            rows = order[start:start + count]
            start += count
            if count == 0:
                out[l].append(vectors.new_zeros(b, h))
                continue
            columns = (vector_t[rows][:, None] * d + offsets).flatten().to(x.device)
            inputs = vectors[rows.to(x.device)].transpose(0, 1).reshape(b, -1)
            out[l].append(inputs @ self.mlp_input[l][columns])
        return [torch.stack(z) for z in out]

    def forward(self, x: torch.Tensor, arch: Decoded, input_layers: Sequence[int] | None = None) -> torch.Tensor:
        """``[S, B]`` logits. ``input_layers``: the only layers any vector is inserted at, when known (the
        teacher: layer 0), to skip the others' input products."""
        s, b, h = arch.count, x.shape[0], self.max_hidden
        layers = list(range(self.n_layers)) if input_layers is None else list(input_layers)
        # Eq. 8: z_l = Σ_v g_{l,v} W_{l,v} v, g = selected ∧ (insertion layer = l).
        if (x.device.type == "cpu") if self.host_grouping is None else self.host_grouping:
            inserted = self._selected_inputs(x, arch)
        else:
            inserted = self._gated(self.vectors(x, arch), arch, layers)
        hidden_mask = ordinal_mask(arch.hidden, h)[:, None]  # [S, 1, L, H]
        out: torch.Tensor | None = None
        for l in range(self.n_layers):
            pre = self.mlp_bias[l].expand(s, b, h)
            if inserted[l] is not None:
                pre = pre + inserted[l]
            if out is not None:
                pre = pre + out @ self.mlp_hidden.weight[l - 1].T  # W_h[:h_l, :h_{l-1}] on the masked o_{l-1}
            out = F.relu(pre) * hidden_mask[:, :, l]
        assert out is not None
        return self.head.masked(out[:, :, None, :])[:, :, 0, 0]


# ---------------------------------------------------------------- one architecture, standalone

class _Group(nn.Module):
    """Index buffers (and optional parameters) of one group of same-shaped members."""

    def __init__(self, **index: Sequence[int]) -> None:
        super().__init__()
        for name, values in index.items():
            self.register_buffer(name, torch.tensor(list(values), dtype=torch.int64), persistent=False)


class ChildNet(nn.Module):
    """One architecture as a standalone network holding only its own (compact) tensors: a table of size d_f for
    each used field, ``P_{i→k}`` as ``k × d_i`` maps, concat maps ``R^{2k}→R^k`` for concat pairs, and MLP
    layers whose input width is the sizes of the vectors inserted there (+ the previous layer's width).

    Members of the same shape are batched: fields by size, projections by (d_i, k), pairs by (k, function).
    ``columns[l]`` lists the (vector, size) of layer l's input columns in order (for :meth:`copy_from`).
    """

    def __init__(self, space: AutoIASSpace, arch: Architecture, cardinalities: Sequence[int], init_std: float,
                 sparse: bool) -> None:
        super().__init__()
        d = space.decode(arch).one(0)
        n = space.n_fields
        self.arch = d
        self.pairs = space.pairs
        chosen = [p for p in range(len(space.pairs)) if d["selected"][n + p]]
        used = sorted(used_fields(d, space.pairs, n))
        # Embeddings, grouped by size (Eq. 4).
        self.fields = nn.ModuleList()
        self.field_at: dict[int, tuple[int, int]] = {}
        for size in sorted({d["field_dim"][f] for f in used}):
            members = [f for f in used if d["field_dim"][f] == size]
            group = _Group(fields=members)
            group.register_buffer("offsets", field_offsets([cardinalities[f] for f in members]), persistent=False)
            group.table = nn.Embedding(sum(cardinalities[f] for f in members), size, sparse=sparse)
            nn.init.normal_(group.table.weight, 0.0, init_std)
            self.field_at.update({f: (len(self.fields), i) for i, f in enumerate(members)})
            self.fields.append(group)
        # Projections P_{i→k}, grouped by (d_i, k) (Eq. 5); their outputs are banked by k.
        needed = sorted({(i, d["pair_dim"][p]) for p in chosen for i in space.pairs[p]})
        self.projections = nn.ModuleList()
        banks: dict[int, list[tuple[int, int]]] = defaultdict(list)  # k -> (field, k) in bank order
        for d_in, k in sorted({(d["field_dim"][i], k) for i, k in needed}):
            members = [i for i, kk in needed if kk == k and d["field_dim"][i] == d_in]
            group = _Group(positions=[self.field_at[i][1] for i in members])
            group.source, group.k = self.field_at[members[0]][0], k
            group.weight = nn.Parameter(torch.empty(len(members), k, d_in).uniform_(-d_in**-0.5, d_in**-0.5))
            self.projections.append(group)
            banks[k] += [(i, k) for i in members]
        bank_at = {key: pos for keys in banks.values() for pos, key in enumerate(keys)}
        # Interactions, grouped by (k, function) (Eq. 6-7).
        self.interactions = nn.ModuleList()
        self.pair_at: dict[int, tuple[int, int]] = {}
        for k, fn in sorted({(d["pair_dim"][p], d["function"][p]) for p in chosen}):
            members = [p for p in chosen if (d["pair_dim"][p], d["function"][p]) == (k, fn)]
            group = _Group(left=[bank_at[(space.pairs[p][0], k)] for p in members],
                           right=[bank_at[(space.pairs[p][1], k)] for p in members])
            group.k, group.function = k, fn
            if fn == CONCAT:
                bound = (2 * k) ** -0.5
                group.weight = nn.Parameter(torch.empty(len(members), k, 2 * k).uniform_(-bound, bound))
                group.bias = nn.Parameter(torch.empty(len(members), k).uniform_(-bound, bound))
            group.members = members
            self.pair_at.update({p: (len(self.interactions), i) for i, p in enumerate(members)})
            self.interactions.append(group)
        # MLP (Eq. 8): layer l reads the vectors inserted at l, then o_{l-1}.
        self.routes: list[list[tuple[str, int, str]]] = []
        self.columns: list[list[tuple[int, int]]] = []
        self.mlp = nn.ModuleList()
        self.route_index = nn.ModuleList()
        previous = 0
        for l, width in enumerate(d["hidden"]):
            inserted = [v for v in range(space.n_vectors) if d["selected"][v] and d["layer"][v] == l]
            routes, columns, index = [], [], _Group()
            for kind, placement, count in (("field", self.field_at, len(self.fields)),
                                           ("pair", self.pair_at, len(self.interactions))):
                for g in range(count):
                    here = [(v, placement[v if kind == "field" else v - n][1]) for v in inserted
                            if (v < n) == (kind == "field") and placement[v if kind == "field" else v - n][0] == g]
                    if not here:
                        continue
                    name = f"{kind}{g}"
                    index.register_buffer(name, torch.tensor([i for _, i in here], dtype=torch.int64), persistent=False)
                    routes.append((kind, g, name))
                    columns += [(v, d["field_dim"][v] if v < n else d["pair_dim"][v - n]) for v, _ in here]
            self.routes.append(routes)
            self.columns.append(columns)
            self.route_index.append(index)
            with warnings.catch_warnings():  # a layer nothing is inserted at (layer 0) has no input weights
                warnings.filterwarnings("ignore", "Initializing zero-element tensors")
                self.mlp.append(nn.Linear(sum(size for _, size in columns) + previous, width))
            previous = width
        self.head = nn.Linear(previous, 1)

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, n]`` -> ``[B, 1]`` logits. Behaviour sequences (``seq``, ``seq_len``) are not in Table 3's
        space: the derived network reads the categorical fields only."""
        embedded = [g.table(x[:, g.fields] + g.offsets) for g in self.fields]
        banks: dict[int, list[torch.Tensor]] = defaultdict(list)
        for g in self.projections:
            banks[g.k].append(torch.einsum("bmd,mkd->bmk", embedded[g.source][:, g.positions], g.weight))
        bank = {k: torch.cat(parts, dim=1) for k, parts in banks.items()}
        pairs = []
        for g in self.interactions:
            left, right = bank[g.k][:, g.left], bank[g.k][:, g.right]
            if g.function == PRODUCT:
                v = left * right
            elif g.function == PLUS:
                v = left + right
            elif g.function == MAX:
                v = torch.maximum(left, right)
            else:
                v = torch.einsum("bmi,moi->bmo", torch.cat([left, right], dim=2), g.weight) + g.bias
            pairs.append(v)
        sources = {"field": embedded, "pair": pairs}
        out: torch.Tensor | None = None
        for routes, index, layer in zip(self.routes, self.route_index, self.mlp):
            pieces = [sources[kind][g][:, getattr(index, name)].flatten(1) for kind, g, name in routes]
            if out is not None:
                pieces.append(out)
            inputs = torch.cat(pieces, dim=1) if pieces else x.new_zeros((x.shape[0], 0), dtype=torch.float32)
            out = F.relu(layer(inputs))
        assert out is not None
        return self.head(out)

    @torch.no_grad()
    def copy_from(self, supernet: AutoIASSupernet) -> None:
        """Take every weight from the supernet's slices (Eq. 9): this child of the supernet, standalone."""
        big_d = supernet.max_dim
        for g in self.fields:
            size = g.table.weight.shape[1]
            g.table.weight.copy_(torch.cat([supernet.embedding.child_table(f, size) for f in g.fields.tolist()]))
        for g in self.projections:
            _, k, d_in = g.weight.shape
            fields = self.fields[g.source].fields[g.positions].tolist()
            g.weight.copy_(supernet.projection.weight[fields, :k, :d_in])
        for g in self.interactions:
            if g.function != CONCAT:
                continue
            k = g.k
            w = supernet.concat.weight[g.members]
            g.weight.copy_(torch.cat([w[:, :k, :k], w[:, :k, big_d:big_d + k]], dim=2))
            assert supernet.concat.bias is not None
            g.bias.copy_(supernet.concat.bias[g.members, :k])
        for l, (layer, columns) in enumerate(zip(self.mlp, self.columns)):
            width = layer.out_features
            blocks = [supernet.mlp_input[l, v * big_d:v * big_d + size, :width].T for v, size in columns]
            if l > 0:
                blocks.append(supernet.mlp_hidden.weight[l - 1, :width, :self.mlp[l - 1].out_features])
            if blocks:
                layer.weight.copy_(torch.cat(blocks, dim=1))
            layer.bias.copy_(supernet.mlp_bias[l, :width])
        last = self.mlp[-1].out_features
        self.head.weight.copy_(supernet.head.weight[0, :, :last])
        assert supernet.head.bias is not None
        self.head.bias.copy_(supernet.head.bias[0])


# ---------------------------------------------------------------- losses (Eq. 10-16)

def kd_loss(student_logits: torch.Tensor, teacher_prob: torch.Tensor, label: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 14–16 per student: ``β CE(ŷ_t, y_i) + (1 − β) CE(y, y_i)``, each CE the mean over the batch's rows of
    Eq. 10 with the soft (ŷ_t) or hard (y) target. ``student_logits [S, B]`` -> ``[S]``."""
    soft = F.binary_cross_entropy_with_logits(student_logits, teacher_prob.expand_as(student_logits), reduction="none")
    hard = F.binary_cross_entropy_with_logits(student_logits, label.expand_as(student_logits), reduction="none")
    return beta * soft.mean(1) + (1 - beta) * hard.mean(1)


# ---------------------------------------------------------------- the method

@register_method
class AutoIAS(CostedSearch, BackboneMethod):
    name = "autoias"
    description = ("Integrated search (sizes, projections, functions, selection, insertion, MLP): KD-trained "
                   "ordinal supernet + REINFORCE generator, then re-train (Eq. 4-23)")
    paper = "Wei, Wang, Zhu, CIKM 2021 (AutoIAS)"
    fidelity = "faithful, deviations documented"
    deviations = ("no public code: every choice the paper leaves open is a method.* key; derive=argmax (Alg. 1 "
                  "samples a*: derive=sample); budget=quick shrinks the space for CPUs")
    # The supernet's students and the generator's samples are drawn per step outside any DDP backward: each
    # process would train and reward different architectures.
    data_parallel_refusal = ("its supernet search samples students and rewards per process (no synchronised "
                             "sampling yet)")

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        self.space = AutoIASSpace([f.name for f in ctx.schema.fields], [int(d) for d in cfg.dims],
                                  [int(h) for h in cfg.hidden], int(cfg.layers))
        self.cardinalities = [f.cardinality for f in ctx.schema.fields]
        self.searched: dict[str, Any] = {}
        self.search_rows: list[dict[str, Any]] = []
        self.choice_rows: list[dict[str, Any]] = []
        self.cost: ArchCost | None = None
        self.supernet: AutoIASSupernet | None = None
        self.generator: PolicyGenerator | None = None

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        if str(cfg.budget) not in cfg.budgets:
            raise UserError(f"method.budget must be one of {', '.join(cfg.budgets)}, got {cfg.budget!r}")
        dims, hidden = [int(d) for d in cfg.dims], [int(h) for h in cfg.hidden]
        if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
            raise UserError(f"method.dims must be distinct sizes >= 1, got {dims}")
        if not hidden or min(hidden) < 1 or len(set(hidden)) != len(hidden):
            raise UserError(f"method.hidden must be distinct widths >= 1, got {hidden}")
        check_positive(cfg, "layers", "students", "reward_samples", "lr", "generator_lr", "generator_state_dim",
                       "valid_rows")
        if cfg.max_chunk_elements is not None and float(cfg.max_chunk_elements) <= 0:
            raise UserError(f"method.max_chunk_elements must be > 0 (or null), got {cfg.max_chunk_elements}")
        if not 0 <= float(cfg.beta) <= 1:
            raise UserError(f"method.beta must be in [0, 1], got {cfg.beta}")
        if not 0 <= float(cfg.baseline_alpha) < 1:
            raise UserError(f"method.baseline_alpha must be in [0, 1), got {cfg.baseline_alpha}")
        for key, options in (("search", SEARCHES), ("reward_split", REWARD_SPLITS), ("derive", DERIVES),
                             ("teacher_function", FUNCTIONS)):
            if str(cfg[key]) not in options:
                raise UserError(f"method.{key} must be one of {', '.join(options)}, got {cfg[key]!r}")
        if str(cfg.task) != "binary":
            raise UserError("AutoIAS predicts clicks (Eq. 10's logloss): use task=binary")
        for key in ("search_epochs", "search_patience", "random_candidates"):
            if cfg[key] is not None and int(cfg[key]) < 1:
                raise UserError(f"method.{key} must be >= 1 (or null), got {cfg[key]}")
        if int(cfg.probe_architectures) < 0:
            raise UserError("method.probe_architectures must be >= 0")

    # ------------------------------------------------------------ search (Algorithm 1)

    def search(self, loop: OfflineLoop) -> dict[str, Any]:
        cfg, device = self.ctx.cfg, self.ctx.device
        space = self.space
        supernet = AutoIASSupernet(self.cardinalities, space, float(cfg.init_std), self.sparse).to(device)
        generator = PolicyGenerator(space.space, int(cfg.generator_state_dim), [int(h) for h in cfg.generator_hidden],
                                    str(cfg.generator_activation)).to(device)
        self.supernet, self.generator = supernet, generator
        optimizer = self.adam(supernet, float(cfg.lr))
        generator_optimizer = torch.optim.Adam(generator.parameters(), lr=float(cfg.generator_lr))
        baseline = MovingBaseline(float(cfg.baseline_alpha))
        rng = torch.Generator(device=device).manual_seed(self.ctx.seed)
        teacher = space.decode(space.teacher(str(cfg.teacher_function), device))
        n_students, beta, kd = int(cfg.students), float(cfg.beta), bool(cfg.kd)
        use_generator = str(cfg.search) == "generator"
        valid_x, valid_y = self._valid_subset(loop)
        probe = space.space.sample_uniform(int(cfg.probe_architectures),
                                           torch.Generator().manual_seed(self.ctx.seed + 1), device)
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # teacher loss, student loss, hard loss, τ, steps

        def step(batch: OfflineBatch, loop: OfflineLoop) -> torch.Tensor:
            y = batch.label[None]
            teacher_prob = y
            if kd:  # Eq. 10-12: one teacher step, then its prediction after the step
                optimizer.zero_grad()
                teacher_loss = F.binary_cross_entropy_with_logits(supernet(batch.x, teacher, (0,))[0], batch.label)
                teacher_loss.backward()
                optimizer.step()
                sums[0] += teacher_loss.detach()
                with torch.no_grad():
                    teacher_prob = torch.sigmoid(supernet(batch.x, teacher, (0,)))
            with torch.no_grad():  # Eq. 13: N students from the generator (or uniform: random search)
                archs = (generator.sample(n_students, rng).arch if use_generator
                         else space.space.sample_uniform(n_students, rng, device))
            optimizer.zero_grad()
            total = torch.zeros((), device=device)
            chunk = self._chunk(len(batch))
            for start in range(0, n_students, chunk):  # Eq. 14-16, the mean over students
                part = space.decode(ArchSpace.select(archs, slice(start, start + chunk)))
                logits = supernet(batch.x, part)
                losses = kd_loss(logits, teacher_prob, y, beta if kd else 0.0)
                (losses.sum() / n_students).backward()
                total = total + losses.detach().sum()
                sums[2] += F.binary_cross_entropy_with_logits(logits.detach(), y.expand_as(logits)).detach() * part.count
            optimizer.step()
            sums[1] += total / n_students
            sums[4] += 1
            if use_generator:  # Eq. 18-23
                reward_batch = loop.valid_batch() if str(cfg.reward_split) == "valid" else batch
                sampled = generator.sample(int(cfg.reward_samples), rng)
                with torch.no_grad():
                    tau = batched_auc(supernet(reward_batch.x, space.decode(sampled.arch)), reward_batch.label)
                tau = torch.nan_to_num(tau, nan=0.5)
                reward = baseline.rewards(tau)
                generator_optimizer.zero_grad()
                reinforce_loss(sampled.log_prob, reward).backward()
                generator_optimizer.step()
                sums[3] += tau.mean()
            state["now"] = loop.step + 1  # the runner's step count once it has counted this one
            return total / n_students

        derived: dict[int, Architecture] = {}
        # The runner's step (``now``) is tracked here, not read from the loop: ``predict`` must not hold the loop
        # (its closure is written into checkpoints, and a loop holds live iterators).
        state = {"step": -1, "since": 0, "now": 0}

        def start_evaluation(now: int) -> None:
            """A new runner evaluation: derive a*, record the interval's training numbers and the probe."""
            with torch.no_grad():
                derived[now] = self._derive(now - state["since"], generator, supernet, valid_x, valid_y, rng)
                counts = sums.tolist()
                steps = max(counts[4], 1)
                row = {"step": now, "teacher_loss": counts[0] / steps if kd else math.nan,
                       "student_loss": counts[1] / steps, "student_hard_loss": counts[2] / steps / n_students,
                       "reward_auc": counts[3] / steps if use_generator else math.nan,
                       "baseline_auc": float(baseline.value) if baseline.value is not None else math.nan}
                if ArchSpace.count(probe):
                    rows = min(len(valid_x), SCORE_ROWS)
                    logits = child_scores(lambda x, a: supernet(x, space.decode(a)), probe, valid_x,
                                          self._chunk(rows), rows)
                    row["probe_valid_logloss"] = float(F.binary_cross_entropy_with_logits(
                        logits, valid_y[None].expand_as(logits).float()))
                self.search_rows.append(row)
                sums.zero_()
            state["step"], state["since"] = now, now

        def predict(batch: OfflineBatch) -> torch.Tensor:
            now = state["now"]
            if now != state["step"]:
                start_evaluation(now)
            return torch.sigmoid(supernet(batch.x, space.decode(derived[now]))[0])

        fit = loop.fit("search", step, predict, _Pair(supernet, generator),
                       epochs=int(cfg.search_epochs) if cfg.search_epochs is not None else None,
                       patience=int(cfg.search_patience) if cfg.search_patience is not None else None,
                       restore_best=False)
        best_step = fit.best_step if fit.best_step is not None else max(derived)
        best = derived[best_step]
        for row in self.search_rows:
            row["derived_valid_auc"] = next((h["value"] for h in loop.history if h["stage"] == "search"
                                             and h["step"] == row["step"] and h["metric"] == "auc"), math.nan)
        marginals = generator.marginals(256, torch.Generator(device=device).manual_seed(self.ctx.seed + 2))
        self.choice_rows = [
            {"component": c.name, "key": key, "choice": str(choice), "probability": float(marginals[c.name][k, a]),
             "chosen": bool(int(best[c.name][k]) == a)}
            for c in space.space.components for k, key in enumerate(c.keys) for a, choice in enumerate(c.choices)]
        selected = marginals["selected"][:, 1].tolist()
        n = space.n_fields
        self.searched = {
            **space.describe(best),
            "search": str(cfg.search), "derive": str(cfg.derive), "budget": str(cfg.budget),
            "space_log10_size": space.space.log10_size(),
            "search_steps": fit.steps, "best_step": best_step, "search_valid_auc": fit.best_value,
            "p_select_fields": dict(zip(space.fields, selected[:n])),
            "p_select_pairs": {f"{a}|{b}": p for (a, b), p in zip(space.pair_names, selected[n:])},
        }
        return self.searched

    def _valid_subset(self, loop: OfflineLoop) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded subset of ``valid_rows`` validation rows (all when fewer) on the device."""
        rows = min(int(self.ctx.cfg.valid_rows), len(loop.valid))
        order = torch.randperm(len(loop.valid), generator=torch.Generator().manual_seed(self.ctx.seed))[:rows]
        batch = loop.valid.rows(order.sort().values.to(loop.valid.x.device))
        return batch.x, batch.label

    def _chunk(self, rows: int) -> int:
        """Architectures per batched pass over ``rows`` rows: ``[chunk, rows, V, D]`` stays under
        ``max_chunk_elements`` (the same update whatever the chunks, up to float rounding)."""
        budget = self.ctx.cfg.max_chunk_elements
        if budget is None:  # measured: on 2 CPU cores, 39 fields, one student per pass is 2.4x faster than four
            budget = CPU_CHUNK_ELEMENTS if self.ctx.device.type == "cpu" else GPU_CHUNK_ELEMENTS
        per_arch = rows * self.space.n_vectors * self.space.dims[-1]
        return max(1, int(float(budget) // per_arch))

    def _derive(self, steps: int, generator: PolicyGenerator, supernet: AutoIASSupernet, valid_x: torch.Tensor,
                valid_y: torch.Tensor, rng: torch.Generator) -> Architecture:
        """a* at an evaluation (Algorithm 1): the generator's argmax or a draw; for random search the best of
        uniform architectures on the validation subset."""
        cfg = self.ctx.cfg
        if str(cfg.search) == "random":
            count = int(cfg.random_candidates) if cfg.random_candidates is not None else \
                max(1, int(cfg.reward_samples) * steps)
            candidates = self.space.space.sample_uniform(count, rng, self.ctx.device)
            rows = min(len(valid_x), SCORE_ROWS)
            aucs = score_children(lambda x, a: supernet(x, self.space.decode(a)), candidates, valid_x, valid_y,
                                  chunk=self._chunk(rows), rows=rows)
            return ArchSpace.select(candidates, int(torch.nan_to_num(aucs, nan=0.0).argmax()))
        if str(cfg.derive) == "sample":
            return ArchSpace.select(generator.sample(1, rng).arch, 0)
        return generator.argmax()

    # ------------------------------------------------------------ re-train from scratch

    def build(self, architecture: dict[str, Any] | None) -> None:
        if architecture is None:
            raise RuntimeError("AutoIAS builds from its search result")
        arch = self.space.space.from_json(architecture["decisions"])
        self.model = ChildNet(self.space, arch, self.cardinalities, float(self.ctx.cfg.init_std),
                              self.sparse).to(self.ctx.device)
        self.optimizer = self.adam(self.model, float(self.ctx.cfg.lr))
        cost_x = torch.zeros((COST_ROWS, self.space.n_fields), dtype=torch.int32, device=self.ctx.device)
        self.cost = arch_cost(self.model, cost_x)

    def module(self) -> nn.Module:  # type: ignore[override]
        assert self.model is not None, "build() first"
        return self.model

    def memory(self) -> MemoryReport:
        model = self.module()
        assert isinstance(model, ChildNet)
        tables = embedding_tables(model)
        dims = {name: {str(model.arch["field_dim"][f]): self.cardinalities[f]} if f in model.field_at else {"0": self.cardinalities[f]}
                for f, name in enumerate(self.space.fields)}
        return MemoryReport(
            embedding_bytes=sum(tensor_bytes(t) for t in tables),
            embedding_optimizer_bytes=self.optimizer.state_bytes(tables) if self.optimizer else 0,
            parameters=sum(p.numel() for p in model.parameters()),
            embedding_parameters=sum(t.numel() for t in tables),
            dims=dims,
        )

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """``search.parquet``: per search evaluation, the interval's mean teacher and student losses, reward AUC
        and baseline, the probe architectures' validation logloss and a*'s validation AUC; ``choices.parquet``:
        per decision and candidate, the generator's final (marginal) probability and whether a* took it."""
        if not self.search_rows:
            return {}
        return {"search": self.search_rows, "choices": self.choice_rows}


class _Pair(nn.Module):
    """The search's state as one module (the loop snapshots ``module``; restore_best is off)."""

    def __init__(self, supernet: nn.Module, generator: nn.Module) -> None:
        super().__init__()
        self.supernet, self.generator = supernet, generator
