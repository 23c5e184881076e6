"""Building blocks of the CTR backbones (``backbones.py``, ``din.py``): field embeddings, the first-order term,
FM and inner-product interactions, the MLP of the AutoLoss paper (§2.2, §3.3), and for behaviour sequences the
activations PReLU and Dice, masked sum pooling and DIN's local activation unit (Zhou et al., KDD 2018).

Inputs are ``x``: ``[batch, fields]`` int32 codes, one column per schema field; every field's codes index its
own rows of one shared table (per-field offsets), so all fields are looked up in one call. A behaviour
sequence is ``[batch, T]`` int32 codes of the field whose table it shares (``FieldEmbedding.embed_field``),
post-padded, with its valid length per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from autorecbench.errors import UserError

DICE_EPSILON = 1e-8  # DIN §5.2 (the DeepCTR code uses 1e-9)
PRELU_INIT = 0.25  # torch's default; the DIN paper does not give one


class Dice(nn.Module):
    """DIN's data-adaptive activation (Zhou et al., KDD 2018, §5.2):
    ``f(s) = p(s) s + (1 - p(s)) α s`` with ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + ε))``, per channel (the
    last dimension; every other dimension is pooled into the statistics). E and Var are the batch's in
    training and running averages (momentum 0.1, torch's batch-norm default; Keras' 0.99 in the DeepCTR code
    equals 0.01) in evaluation; α (one per channel) starts at 0, so Dice starts as a smooth ReLU-like gate."""

    def __init__(self, width: int, epsilon: float = DICE_EPSILON, momentum: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(width, eps=epsilon, momentum=momentum, affine=False)
        self.alpha = nn.Parameter(torch.zeros(width))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.norm(s.reshape(-1, s.shape[-1]))).reshape(s.shape)
        return s * (self.alpha + p * (1 - self.alpha))


# name -> the activation layer for a given width (PReLU and Dice have one parameter per channel)
ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda width: nn.ReLU(),
    "tanh": lambda width: nn.Tanh(),
    "sigmoid": lambda width: nn.Sigmoid(),
    "prelu": lambda width: nn.PReLU(width, init=PRELU_INIT),
    "dice": lambda width: Dice(width),
}


def field_offsets(cardinalities: Sequence[int]) -> torch.Tensor:
    """Row offset of each field in a table stacking all fields (int32, so ``x + offsets`` stays int32)."""
    total = sum(cardinalities)
    if total >= 2**31:
        raise UserError(f"{total:,} feature values do not fit int32 indices; raise data.min_count")
    offsets = torch.zeros(len(cardinalities), dtype=torch.int32)
    if len(cardinalities) > 1:
        offsets[1:] = torch.cumsum(torch.tensor(cardinalities[:-1], dtype=torch.int64), 0).to(torch.int32)
    return offsets


class FieldEmbedding(nn.Module):
    """Eq. 1–2 of the AutoLoss paper: one ``dim``-vector per feature value, ``x [B, F] -> E [B, F, dim]``.

    One table of ``sum(cardinalities)`` rows (fields stacked), initialised N(0, init_std^2); ``sparse=True``
    gives sparse gradients for a lazy (row-wise) optimiser. ``dim`` is the output width every consumer reads.
    """

    def __init__(self, cardinalities: Sequence[int], dim: int, init_std: float, sparse: bool = False) -> None:
        super().__init__()
        self.cardinalities = list(cardinalities)
        self.dim = dim
        self.register_buffer("offsets", field_offsets(self.cardinalities), persistent=False)
        self.table = nn.Embedding(sum(self.cardinalities), dim, sparse=sparse)
        nn.init.normal_(self.table.weight, 0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x + self.offsets)

    def embed_field(self, index: int, codes: torch.Tensor) -> torch.Tensor:
        """The rows of field ``index`` for ``codes`` of any shape (a behaviour sequence sharing its table)."""
        return self.table(codes + self.offsets[index])

    def embed_with(self, x: torch.Tensor, lookups: Sequence[tuple[int, torch.Tensor]]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward(x)`` and :meth:`embed_field` for each (field index, codes) of ``lookups``, in one table
        lookup (one gradient for the table instead of one per lookup)."""
        parts = [(x + self.offsets).reshape(-1)] + [(codes + self.offsets[i]).reshape(-1) for i, codes in lookups]
        rows = self.table(torch.cat(parts)).split([p.numel() for p in parts])
        shapes = [x.shape] + [codes.shape for _, codes in lookups]
        e, *items = [r.reshape(*shape, self.dim) for r, shape in zip(rows, shapes)]
        return e, items


class FirstOrder(nn.Module):
    """The linear term <w, x> + b of LR / FM / DeepFM / Wide&Deep: one weight per feature value and output
    (zero-initialised), summed over the fields."""

    def __init__(self, cardinalities: Sequence[int], n_outputs: int, sparse: bool = False) -> None:
        super().__init__()
        self.register_buffer("offsets", field_offsets(cardinalities), persistent=False)
        self.weight = nn.Embedding(sum(cardinalities), n_outputs, sparse=sparse)
        nn.init.zeros_(self.weight.weight)
        self.bias = nn.Parameter(torch.zeros(n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight(x + self.offsets).sum(dim=1) + self.bias


def pair_index(n_fields: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The field pairs (i < j) in row-major order: (0,1), (0,2), ..., (F-2,F-1)."""
    rows, cols = torch.triu_indices(n_fields, n_fields, offset=1, device=device)
    return rows, cols


def inner_products(e: torch.Tensor) -> torch.Tensor:
    """<e_i, e_j> for every field pair i < j (AutoLoss Eq. 3): ``[B, F, d] -> [B, F(F-1)/2]``.

    Read off the upper triangle of the Gram matrices ``E E^T`` (one batched matmul): several times faster,
    forward and backward, than gathering both members of every pair."""
    n_fields = e.shape[1]
    rows, cols = pair_index(n_fields, e.device)
    gram = torch.bmm(e, e.transpose(1, 2))
    return gram.flatten(1).index_select(1, rows * n_fields + cols)


def fm_vector(e: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} e_i ⊙ e_j in O(F d): 0.5 ((sum_i e_i)^2 - sum_i e_i^2), ``[B, F, d] -> [B, d]``. Summed over
    d it is the FM term sum_{i<j} <e_i, e_j> (AutoLoss Eq. 4)."""
    total = e.sum(dim=1)
    return 0.5 * (total * total - (e * e).sum(dim=1))


class AddBias(nn.Module):
    """``h + b`` with a learned ``b`` (zeros at the start)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.bias


class MLP(nn.Module):
    """Eq. 5: fully connected layers, each Linear -> BatchNorm -> activation -> Dropout (§3.3: two layers of
    128, batch-norm, dropout 0.2, ReLU). ``out_dim`` is the width of the last layer. ``affine``: the batch-norm
    has a learned scale and shift (PyTorch's default); without, a layer is ``BN(W h) + b`` — no scale, the
    layer's bias after the normalisation (the AutoFIS code's MLP), with as many parameters as a Linear layer."""

    def __init__(self, in_dim: int, hidden: Sequence[int], batch_norm: bool, dropout: float, activation: str,
                 affine: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            if batch_norm and not affine:
                layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h, affine=False), AddBias(h)]
            else:
                layers.append(nn.Linear(width, h))
            if batch_norm and affine:
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[activation](h))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def sequence_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, T]`` bool: position t < the row's length (histories are post-padded)."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


def masked_sum(items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum pooling of the valid prefix of each row (DIN Eq. 1, the baselines' pooling): ``[B, T, d] -> [B, d]``;
    an empty history gives 0."""
    mask = sequence_mask(lengths, items.shape[1]).to(items.dtype)
    return torch.einsum("btd,bt->bd", items, mask)


class LocalActivationUnit(nn.Module):
    """DIN's local activation unit (§4.3, Eq. 3): one weight per history item h_t for the target t,
    ``w_t = Linear(MLP([h_t, t, h_t - t, h_t ⊙ t]))``, an MLP of ``hidden`` units (64, 16 in the DIN and DSIN code)
    with ``activation`` (PReLU or Dice), no softmax (the paper keeps the weights unnormalised so that they
    carry the intensity of the user's interest), padding positions weighted 0. The paper's figure feeds the
    outer product of h and t; the DIN/DSIN code (DeepCTR) feeds h - t and h ⊙ t, as here. Dice's statistics
    cover every position, padding included (the code's). ``forward`` returns the weights ``[B, T]``;
    :meth:`pool` the weighted sum ``sum_t w_t h_t`` (``[B, D]``).

    The first layer W [h, t, h - t, h ⊙ t] + b is computed as (W_h + W_d) h + W_p (h ⊙ t) + ((W_t - W_d) t + b),
    the target's part once per row instead of once per item: the same function (``first`` holds W, one
    ``Linear(4D, hidden[0])``) without building the [B, T, 4D] input."""

    def __init__(self, dim: int, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        self.dim = dim
        self.first = nn.Linear(4 * dim, hidden[0])
        self.first_activation = ACTIVATIONS[activation](hidden[0])
        self.mlp = MLP(hidden[0], hidden[1:], batch_norm=False, dropout=0.0, activation=activation)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, items: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, length, dim = items.shape
        w_h, w_t, w_d, w_p = self.first.weight.split(dim, dim=1)
        per_row = nn.functional.linear(target, w_t - w_d, self.first.bias)  # [B, H]
        z = nn.functional.linear(items, w_h + w_d) + nn.functional.linear(items * target[:, None, :], w_p)
        z = self.first_activation((z + per_row[:, None, :]).reshape(batch * length, -1))
        weights = self.out(self.mlp(z)).reshape(batch, length)
        return weights * sequence_mask(lengths, length).to(weights.dtype)

    def pool(self, items: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btd,bt->bd", items, self.forward(items, target, lengths))
