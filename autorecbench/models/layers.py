"""Building blocks of the CTR backbones (``backbones.py``): field embeddings, the first-order term, FM and
inner-product interactions, and the MLP of the AutoLoss paper (§2.2, §3.3).

Inputs are ``x``: ``[batch, fields]`` int32 codes, one column per schema field; every field's codes index its
own rows of one shared table (per-field offsets), so all fields are looked up in one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autorecbench.errors import UserError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


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
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
