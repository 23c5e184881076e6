"""AMEIR's network (Zhao et al., IJCAI 2021, §2.1-2.2, Fig. 1): behaviour blocks, high-order interactions, the
MLP and the SE shortcut, as one module that is a standalone child or, with more options allocated, the one-shot
supernet of a search step (the method is ``methods/ameir.py``; this file knows no search).

- Stage 0: one embedding table of size K per field; a behaviour is the concatenation of its sequence fields'
  embeddings (the tables they share), D_a = N_a K; the target is ``[e_cate, e_brand]`` (the shared fields).
- Stage 1 (Eq. 1): ``H_l = Act_l(Layer_l(Norm_l(H_{l-1}))) + H_{l-1}`` for the blocks; Norm ∈ {layernorm,
  none}, Act ∈ {relu, gelu, swish, identity}, Layer ∈ :data:`LAYERS`. Padded positions (post-padding) are zero
  before every block and after every op, so nothing a padded position holds reaches a valid one: convolutions
  see zeros (SAME padding), pooling averages / maximises over valid positions only, the BiGRU's backward
  direction reverses each row within its length, attention masks padded keys, target attention weights them 0.
  ``zero`` makes the block the identity (Act(0) = 0): a dynamic depth.
- Readout: ``[h_pool, h_last, h_att]`` (masked sum, last valid position, DIN's local activation unit); an
  empty history reads 0.
- Stage 2: interactions ``p_m = e_{i1} ⊙ … ⊙ e_{ir}`` over distinct non-sequential fields.
- Stage 3 (Eq. 2): ``h_l = Act_l(W_l h_{l-1} + b_l)`` over ``h_0 = [h^a, e^b, p^b]``; a child of width w uses the
  leading ``W[:w, :w_in]`` of the allocated weight (ordinal slicing); Dice has its own statistics per width.
- SE: ``a = σ(W_2 ReLU(W_1 Q v))`` over ``Q = [e^b; p^b]``, ``h^se = Σ_i a_i q_i``; ``ŷ = σ(w^T [h_L, h^se] + b)``.
- ``interaction_mode``: where p^b goes (Table 5): ``none``, ``mlp`` (MLP input), ``fm`` (``Σ_m 1^T p_m`` added to
  the logit), ``mlp+fm``, ``mlp+se`` (AMEIR's). ``first_order``: DeepFM's ``<w, x> + b`` (AMEIR-I).
- The M interactions are M weight slots (p_m's MLP columns and SE entry): a :class:`Choice` may name its own
  field sets (``Choice.interactions``), as the children of a one-shot model over the joint space do; otherwise the
  spec's are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from autorecbench.models.layers import Dice, FieldEmbedding, FirstOrder, LocalActivationUnit

LAYERS = ("conv1", "conv3", "dconv3", "dconv5", "dconv7", "avgpool3", "maxpool3", "bigru", "attention2",
          "attention4", "target_attention", "zero")
NORMS = ("layernorm", "none")
BLOCK_ACTIVATIONS = ("relu", "gelu", "swish", "identity")
MLP_ACTIVATIONS = ("relu", "swish", "identity", "dice")
READOUTS = ("sum", "last", "attention")
INTERACTION_MODES = ("none", "mlp", "fm", "mlp+fm", "mlp+se")
MASK_FILL = -1e9  # attention scores of padded keys (finite: an empty history stays finite)

_PLAIN = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "identity": lambda h: h}


@dataclass(frozen=True)
class Choice:
    """The path a forward pass takes: ``(norm, layer, activation)`` per block, the MLP's widths and activations,
    and the field sets of the M interaction slots (None: the spec's)."""

    blocks: tuple[tuple[str, str, str], ...] = ()
    hidden: tuple[int, ...] = ()
    activations: tuple[str, ...] = ()
    interactions: tuple[tuple[int, ...], ...] | None = None


@dataclass
class NetSpec:
    """What an :class:`AMEIRNet` allocates. A child allocates exactly its choice; a supernet every option."""

    block_layers: list[list[str]] = field(default_factory=list)  # per block, the Layer ops held
    block_norm: list[bool] = field(default_factory=list)  # per block, whether a LayerNorm is held
    readout: list[str] = field(default_factory=list)
    interactions: list[tuple[int, ...]] = field(default_factory=list)  # field indices per kept interaction
    interaction_mode: str = "none"
    first_order: bool = False
    hidden: list[int] = field(default_factory=list)  # allocated widths per MLP layer
    dice_widths: list[list[int]] = field(default_factory=list)  # per layer, the widths that get a Dice
    dilation: int = 2
    attention_hidden: tuple[int, ...] = (64, 16)
    attention_activation: str = "dice"
    se_ratio: float = 3.0
    default: Choice = field(default_factory=Choice)


# ---------------------------------------------------------------- Stage 1 ops: [B, T, D] -> [B, T, D]

class Conv(nn.Module):
    """conv1d, stride 1, SAME padding (``dilation`` > 1: a dilated conv)."""

    def __init__(self, dim: int, kernel: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


class Pool(nn.Module):
    """Average or max pooling over a window of 3, valid positions only."""

    def __init__(self, kind: str, kernel: int = 3) -> None:
        super().__init__()
        self.kind, self.kernel = kind, kernel

    def forward(self, h: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k, pad = self.kernel, self.kernel // 2
        if self.kind == "max":
            filled = h.masked_fill(~mask, -math.inf).transpose(1, 2)
            return F.max_pool1d(filled, k, 1, pad).transpose(1, 2)
        total = F.avg_pool1d(h.transpose(1, 2), k, 1, pad, count_include_pad=True) * k
        count = F.avg_pool1d(mask.transpose(1, 2).to(h.dtype), k, 1, pad, count_include_pad=True) * k
        return (total / count.clamp_min(1.0)).transpose(1, 2)


class BiGRU(nn.Module):
    """Two GRUs of D/2 units, the backward one over each row reversed within its valid length (a packed
    bidirectional GRU, without packing); outputs concatenated."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.forward_gru = nn.GRU(dim, dim - dim // 2, batch_first=True)
        self.backward_gru = nn.GRU(dim, dim // 2, batch_first=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = torch.arange(h.shape[1], device=h.device)[None]
        last = lengths[:, None].to(torch.int64) - 1
        reverse = torch.where(t <= last, last - t, t)[..., None]  # [B, T, 1]
        fw, _ = self.forward_gru(h)
        bw, _ = self.backward_gru(h.gather(1, reverse.expand_as(h)))
        return torch.cat([fw, bw.gather(1, reverse.expand_as(bw))], dim=2)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention (no positional encoding), padded keys masked."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, max(1, math.ceil(dim / heads))
        inner = heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask[:, None, None, :, 0], MASK_FILL)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


class TargetAttention(nn.Module):
    """``h'_i = a_i h_i`` with ``a_i`` from DIN's local activation unit over ``[h_i, t, h_i - t, h_i ⊙ t]``."""

    def __init__(self, dim: int, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        self.unit = LocalActivationUnit(dim, hidden, activation)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return h * self.unit(h, target, lengths)[..., None]


def make_op(name: str, dim: int, spec: NetSpec) -> nn.Module:
    if name in ("conv1", "conv3"):
        return Conv(dim, int(name[-1]))
    if name.startswith("dconv"):
        return Conv(dim, int(name[-1]), spec.dilation)
    if name.endswith("pool3"):
        return Pool(name[:3])
    if name == "bigru":
        return BiGRU(dim)
    if name.startswith("attention"):
        return SelfAttention(dim, int(name[-1]))
    if name == "target_attention":
        return TargetAttention(dim, spec.attention_hidden, spec.attention_activation)
    raise ValueError(f"unknown layer {name!r}")


class Block(nn.Module):
    """Eq. 1 with the ops it holds (``zero`` holds none)."""

    def __init__(self, dim: int, layers: Sequence[str], norm: bool, spec: NetSpec) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else None
        self.ops = nn.ModuleDict({name: make_op(name, dim, spec) for name in layers if name != "zero"})

    def forward(self, h: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor,
                choice: tuple[str, str, str]) -> torch.Tensor:
        norm, layer, activation = choice
        if layer == "zero":
            return h
        x = h
        if norm == "layernorm":
            assert self.norm is not None, "this block holds no LayerNorm"
            x = torch.where(mask, self.norm(h), 0.0)
        y = torch.where(mask, self.ops[layer](x, mask, lengths, target), 0.0)
        return torch.where(mask, _PLAIN[activation](y), 0.0) + h


class SqueezeExcitation(nn.Module):
    """The SE shortcut over the vectors ``Q [B, n, K]``: ``Σ_i a_i q_i`` with ``a = σ(W_2 ReLU(W_1 Q v))``."""

    def __init__(self, n_vectors: int, dim: int, ratio: float) -> None:
        super().__init__()
        reduced = max(1, math.ceil(n_vectors / ratio))
        self.v = nn.Linear(dim, 1, bias=False)
        self.squeeze = nn.Linear(n_vectors, reduced)
        self.excite = nn.Linear(reduced, n_vectors)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.excite(F.relu(self.squeeze(self.v(q)[..., 0]))))
        return torch.einsum("bn,bnk->bk", a, q)


# ---------------------------------------------------------------- the network

class AMEIRNet(nn.Module):
    """``forward(x, seq, seq_len, choice=None) -> [B, 1]`` logits (see the module docstring); ``choice`` None:
    the spec's default path (a child's only one)."""

    def __init__(self, cardinalities: Sequence[int], shared_fields: Sequence[int], sequence_names: Sequence[str],
                 dim: int, init_std: float, sparse: bool, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.n_fields, self.dim = len(cardinalities), int(dim)
        self.sequence_names = list(sequence_names) if spec.readout else []
        self.shared_fields = list(shared_fields) if spec.readout else []
        self.behaviour_dim = len(self.sequence_names) * self.dim
        self.embedding = FieldEmbedding(cardinalities, self.dim, init_std, sparse)
        self.blocks = nn.ModuleList(Block(self.behaviour_dim, layers, norm, spec)
                                    for layers, norm in zip(spec.block_layers, spec.block_norm))
        self.readout_unit = (LocalActivationUnit(self.behaviour_dim, spec.attention_hidden, spec.attention_activation)
                             if "attention" in spec.readout else None)
        m = len(spec.interactions)
        self.register_buffer("interaction_index", self.index_of(spec.interactions), persistent=False)
        mode = spec.interaction_mode
        self.in_dim = len(spec.readout) * self.behaviour_dim + self.n_fields * self.dim + (
            m * self.dim if "mlp" in mode else 0)
        self.mlp = nn.ModuleList()
        width = self.in_dim
        for h in spec.hidden:
            self.mlp.append(nn.Linear(width, h))
            width = h
        self.dice = nn.ModuleList(nn.ModuleDict({f"w{w}": Dice(w) for w in widths}) for widths in spec.dice_widths)
        self.out = nn.Linear(width, 1)
        self.se = SqueezeExcitation(self.n_fields + m, self.dim, spec.se_ratio) if mode == "mlp+se" else None
        self.se_out = nn.Linear(self.dim, 1, bias=False) if self.se is not None else None
        self.linear = FirstOrder(list(cardinalities), 1, sparse) if spec.first_order else None

    # ------------------------------------------------------------ pieces (a search reuses the embeddings)

    def index_of(self, interactions: Sequence[Sequence[int]], device: torch.device | None = None) -> torch.Tensor:
        """``[M, max order]`` field indices of interactions, padded with N (a row of ones): interactions of
        different orders in one gather and product; copied to ``device`` without waiting for it."""
        order = max((len(i) for i in interactions), default=1)
        rows = [list(i) + [self.n_fields] * (order - len(i)) for i in interactions]
        index = torch.tensor(rows, dtype=torch.int64) if rows else torch.full((0, 1), self.n_fields, dtype=torch.int64)
        return index if device is None else index.to(device, non_blocking=True)

    def embed(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Field embeddings ``[B, N, K]`` and the behaviours ``[B, T, D_a]`` (None without readout)."""
        if not self.sequence_names:
            return self.embedding(x), None
        assert seq is not None, "this network reads behaviour sequences: pass seq and seq_len"
        lookups = [(j, seq[name]) for name, j in zip(self.sequence_names, self.shared_fields)]
        e, items = self.embedding.embed_with(x, lookups)
        return e, torch.cat(items, dim=-1)

    def behaviour(self, e: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor,
                  blocks: Sequence[tuple[str, str, str]]) -> torch.Tensor:
        """Stage 1 and the readout: ``h^a [B, len(readout) D_a]``."""
        mask = (torch.arange(items.shape[1], device=items.device)[None] < lengths[:, None])[..., None]
        target = e[:, self.shared_fields].flatten(1)
        h = torch.where(mask, items, 0.0)
        for block, choice in zip(self.blocks, blocks):
            h = block(h, mask, lengths, target, choice)
        parts = []
        for kind in self.spec.readout:
            if kind == "sum":
                parts.append(h.sum(dim=1))
            elif kind == "last":
                last = (lengths.to(torch.int64) - 1).clamp_min(0)[:, None, None].expand(-1, 1, h.shape[2])
                parts.append(h.gather(1, last)[:, 0] * (lengths > 0)[:, None].to(h.dtype))
            else:
                assert self.readout_unit is not None
                parts.append(self.readout_unit.pool(h, target, lengths))
        return torch.cat(parts, dim=1)

    def interactions(self, e: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``p^b [B, M, K]`` of the spec's interactions, or of ``index`` (:meth:`index_of`) in the same slots."""
        ones = torch.ones_like(e[:, :1])
        return torch.cat([e, ones], dim=1)[:, self.interaction_index if index is None else index].prod(dim=2)

    def features(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None, seq_len: torch.Tensor | None,
                 blocks: Sequence[tuple[str, str, str]],
                 interactions: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_0, the logit terms outside the MLP)``: what every MLP of a step-3 search shares; ``interactions``
        (None: the spec's) fill the M slots."""
        if interactions is not None and len(interactions) != self.interaction_index.shape[0]:
            raise ValueError(f"{len(interactions)} interactions for {self.interaction_index.shape[0]} slots")
        e, items = self.embed(x, seq)
        p = self.interactions(e, None if interactions is None else self.index_of(interactions, e.device))
        parts = []
        if items is not None:
            assert seq_len is not None
            parts.append(self.behaviour(e, items, seq_len, blocks))
        parts.append(e.flatten(1))
        mode = self.spec.interaction_mode
        if "mlp" in mode:
            parts.append(p.flatten(1))
        extra = torch.zeros(x.shape[0], 1, device=e.device, dtype=e.dtype)
        if self.se is not None and self.se_out is not None:
            extra = extra + self.se_out(self.se(torch.cat([e, p], dim=1)))
        if "fm" in mode:
            extra = extra + p.sum(dim=(1, 2))[:, None]
        if self.linear is not None:
            extra = extra + self.linear(x)
        return torch.cat(parts, dim=1), extra

    def head(self, h: torch.Tensor, hidden: Sequence[int], activations: Sequence[str]) -> torch.Tensor:
        """Eq. 2 over the leading slices of the allocated layers, then the output: ``[B, 1]``."""
        for layer, (linear, w, act) in enumerate(zip(self.mlp, hidden, activations)):
            h = F.linear(h, linear.weight[:w, :h.shape[1]], linear.bias[:w])
            h = self.dice[layer][f"w{w}"](h) if act == "dice" else _PLAIN[act](h)
        return F.linear(h, self.out.weight[:, :h.shape[1]], self.out.bias)

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None, choice: Choice | None = None) -> torch.Tensor:
        c = choice or self.spec.default
        h, extra = self.features(x, seq, seq_len, c.blocks, c.interactions)
        return self.head(h, c.hidden, c.activations) + extra


def child_spec(spec: NetSpec, choice: Choice) -> NetSpec:
    """The spec of the standalone child of a supernet's ``choice``: only the chosen ops and widths."""
    return NetSpec(
        block_layers=[[layer] for _, layer, _ in choice.blocks],
        block_norm=[norm == "layernorm" for norm, _, _ in choice.blocks],
        readout=list(spec.readout),
        interactions=list(spec.interactions if choice.interactions is None else choice.interactions),
        interaction_mode=spec.interaction_mode,
        first_order=spec.first_order, hidden=list(choice.hidden),
        dice_widths=[[w] if a == "dice" else [] for w, a in zip(choice.hidden, choice.activations)],
        dilation=spec.dilation, attention_hidden=spec.attention_hidden,
        attention_activation=spec.attention_activation, se_ratio=spec.se_ratio,
        default=replace(choice, interactions=None))  # the child's own interactions are its spec's


class InteractionSupernet(nn.Module):
    """Step 2's one-shot model (§2.3): the first hidden pre-activation is ``Σ_i W_i e_i + W_s p_s + b`` with
    ``p_s`` one candidate interaction, then a pre-defined MLP; no behaviour modelling. ``W_s`` is one weight
    per candidate (``weights[key]``), created when the candidate first appears and kept across cycles."""

    def __init__(self, cardinalities: Sequence[int], dim: int, init_std: float, sparse: bool,
                 hidden: Sequence[int]) -> None:
        super().__init__()
        self.n_fields, self.dim = len(cardinalities), int(dim)
        self.embedding = FieldEmbedding(cardinalities, self.dim, init_std, sparse)
        self.first = nn.Linear(self.n_fields * self.dim, hidden[0])
        self.weights = nn.ParameterDict()
        self.rest = nn.ModuleList(nn.Linear(a, b) for a, b in zip(hidden[:-1], hidden[1:]))
        self.out = nn.Linear(hidden[-1], 1)

    def add(self, key: str) -> None:
        if key not in self.weights:  # nn.Linear's default initialisation (fan-in K)
            device = self.first.weight.device
            self.weights[key] = nn.Parameter(nn.Linear(self.dim, self.first.out_features, bias=False).weight.data.to(device))

    @staticmethod
    def product(e: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``[B, N, K]`` and ``[C, order]`` indices (N: ones) -> the candidates' products ``[C, B, K]``."""
        ones = torch.ones_like(e[:, :1])
        return torch.cat([e, ones], dim=1)[:, index].prod(dim=2).transpose(0, 1)

    def after_first(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(z)
        for layer in self.rest:
            h = F.relu(layer(h))
        return self.out(h)[..., 0]

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per row r the candidate ``index[r]`` with ``weight[r] [H, K]``: logits ``[B]``."""
        e = self.embedding(x)
        p = torch.cat([e, torch.ones_like(e[:, :1])], dim=1).gather(
            1, index[..., None].expand(-1, -1, self.dim)).prod(dim=1)  # [B, K]
        return self.after_first(self.first(e.flatten(1)) + torch.einsum("bhk,bk->bh", weight, p))

    @torch.no_grad()
    def score(self, x: torch.Tensor, index: torch.Tensor, keys: Sequence[str], chunk: int = 64) -> torch.Tensor:
        """Logits ``[C, B]`` of every candidate (``index [C, order]``, weights by ``keys``) on the rows ``x``."""
        e = self.embedding(x)
        base = self.first(e.flatten(1))
        out = []
        for start in range(0, len(keys), chunk):
            w = torch.stack([self.weights[k] for k in keys[start:start + chunk]])  # [c, H, K]
            p = self.product(e, index[start:start + chunk])  # [c, B, K]
            out.append(self.after_first(base[None] + torch.einsum("chk,cbk->cbh", w, p)))
        return torch.cat(out)
