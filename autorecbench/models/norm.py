"""Batch-norm over distinct rows that stand for several rows of a batch.

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
