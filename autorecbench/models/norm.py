"""Batch-norm variants: over distinct rows that stand for several rows of a batch (:func:`batch_norm`), and
with statistics per group of rows (:class:`SizeNorm`, ESAPN's per-size batch-norm).

ESAPN's policy networks read a state (frequency, current size) per row, and a batch of 500 rows holds only
~160 distinct states. Evaluating the network once per distinct state is exact when each distinct row carries
its multiplicity into the batch-norm statistics: with ``p_j = c_j / N`` (``c_j`` rows of the batch share
distinct row j, ``N = Σ c_j``)

    mean = Σ_j p_j x_j,   var = Σ_j p_j (x_j − mean)²,   y_j = (x_j − mean) / sqrt(var + eps) · γ + β

are the batch's statistics and outputs. The gradient with respect to ``x_j`` collects the rows it stands for:
with ``G_j`` the sum of those rows' output gradients and ``x̂_j`` the normalised input,

    ∂L/∂x_j = γ / sqrt(var + eps) · (G_j − p_j Σ_k G_k − p_j x̂_j Σ_k G_k x̂_k),
    ∂L/∂γ = Σ_k G_k x̂_k,   ∂L/∂β = Σ_k G_k

(the row-wise batch-norm gradient summed over each distinct row's copies). Running statistics, when the
module tracks them, are updated as ``nn.BatchNorm1d`` does (unbiased variance, ``N / (N − 1)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _WeightedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = p @ x
        centred = x - mean
        var = p @ (centred * centred)
        rstd = torch.rsqrt(var + eps)
        normed = centred.mul_(rstd)
        ctx.save_for_backward(normed, rstd, p, gamma)
        ctx.mark_non_differentiable(mean, var)
        return torch.addcmul(beta, normed, gamma), mean, var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        normed, rstd, p, gamma = ctx.saved_tensors
        grad_beta = grad.sum(0)
        grad_gamma = (grad * normed).sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            shared = torch.addcmul(grad_beta, normed, grad_gamma)  # Σ G + x̂_j Σ G x̂, per distinct row
            grad_x = torch.addcmul(grad, p[:, None], shared, value=-1.0).mul_(gamma * rstd)
        return grad_x, None, grad_gamma, grad_beta, None


def batch_norm(module: nn.BatchNorm1d, x: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """``module(x)``; with ``counts`` (``[rows]``, how many batch rows each row of ``x`` stands for) the outputs
    are those ``module`` gives on the expanded batch, row for row (see the module docstring)."""
    if counts is None or not (module.training or module.running_mean is None):
        return module(x)  # no weights, or running statistics: every row is normalised on its own
    if module.weight is None:
        raise ValueError("weighted batch-norm needs an affine module")
    total = counts.sum()
    out, mean, var = _WeightedBatchNorm.apply(x, counts.to(x.dtype) / total, module.weight, module.bias,
                                              module.eps)
    if module.training and module.running_mean is not None:
        with torch.no_grad():
            module.num_batches_tracked.add_(1)
            momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
            module.running_mean.lerp_(mean, momentum)
            module.running_var.lerp_(var * (total / (total - 1).clamp_min(1)), momentum)
    return out


NORM_AFFINE = ("shared", "per_size")


class SizeNorm(nn.Module):
    """Batch-norm whose statistics are taken per group of rows: the rows at each candidate embedding size
    (ESAPN ``method.norm_scope=per_size``). Row r of group k = g(r) becomes

        y_r = (x_r − μ_k) / sqrt(σ²_k + eps) · γ + β,   μ_k, σ²_k the mean and (biased) variance over the rows of
                                                          the batch in group k,

    with one (γ, β) for all groups (``affine="shared"``, the official ESAPN code: one ``BatchNorm1d`` applied to
    each size's block) or one per group (``affine="per_size"``). A group of one row normalises to β (its
    variance is 0). With ``batch_norm="running"`` (``model.batch_norm``) each group keeps running statistics,
    updated in training mode from groups of at least two rows (unbiased variance, momentum 0.1, as
    ``nn.BatchNorm1d``) and used in evaluation mode. Vectorised over the batch: segment sums with
    ``index_add``, no loop over groups, no host synchronisation.
    """

    def __init__(self, n_groups: int, dim: int, batch_norm: str, affine: str = "shared", eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        if affine not in NORM_AFFINE:
            raise ValueError(f"affine must be one of {NORM_AFFINE}, got {affine!r}")
        self.n_groups, self.eps, self.momentum = n_groups, eps, momentum
        shape = (n_groups if affine == "per_size" else 1, dim)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        # Named as nn.BatchNorm1d's flag: ``set_training`` switches modes only for modules that have it set.
        self.track_running_stats = batch_norm == "running"
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(n_groups, dim))
            self.register_buffer("running_var", torch.ones(n_groups, dim))

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """``x`` ``[rows, dim]``, ``group`` ``[rows]`` (int64 in ``[0, n_groups)``)."""
        if self.track_running_stats and not self.training:
            rstd = torch.rsqrt(self.running_var + self.eps)
            normed = (x - self.running_mean.index_select(0, group)) * rstd.index_select(0, group)
        else:
            # Rows per group by a segment sum, not bincount (whose output length depends on the data): static
            # shapes, the same integer counts.
            count = x.new_zeros(self.n_groups).index_add_(0, group, x.new_ones(group.shape))[:, None]
            normed, mean, var = _GroupBatchNorm.apply(x, group, count, self.eps)
            if self.track_running_stats:
                with torch.no_grad():
                    update = (count >= 2) * self.momentum
                    unbiased = var * (count / (count - 1).clamp_min(1.0))
                    self.running_mean.add_(update * (mean - self.running_mean))
                    self.running_var.add_(update * (unbiased - self.running_var))
        if self.weight.shape[0] == 1:
            return torch.addcmul(self.bias, normed, self.weight)
        return torch.addcmul(self.bias.index_select(0, group), normed, self.weight.index_select(0, group))


class _GroupBatchNorm(torch.autograd.Function):
    """``x̂ = (x − μ_g) / sqrt(σ²_g + eps)`` with each row's group statistics, and its closed-form gradient
    (the batch-norm gradient within each group: ``∂L/∂x = r_g (G − mean_g(G) − x̂ mean_g(G x̂))``, means over
    the rows of the row's group) — a handful of segment sums instead of autograd's graph of them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: torch.Tensor, count: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        share = 1.0 / count.clamp_min(1.0)
        mean = x.new_zeros(count.shape[0], x.shape[1]).index_add_(0, group, x).mul_(share)
        centred = x - mean.index_select(0, group)
        var = x.new_zeros(mean.shape).index_add_(0, group, centred * centred).mul_(share)
        rstd = torch.rsqrt(var + eps).index_select(0, group)
        normed = centred.mul_(rstd)
        ctx.save_for_backward(normed, rstd, group, share)
        ctx.mark_non_differentiable(mean, var)
        return normed, mean, var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        normed, rstd, group, share = ctx.saved_tensors
        sums = grad.new_zeros(share.shape[0], grad.shape[1])
        grad_mean = sums.index_add(0, group, grad).mul_(share).index_select(0, group)
        grad_dot = sums.index_add_(0, group, grad * normed).mul_(share).index_select(0, group)
        grad_x = (grad - grad_mean).sub_(normed * grad_dot).mul_(rstd)
        return grad_x, None, None, None
