"""Gumbel-softmax selection with an annealed temperature, shared by AutoDim and AutoLoss.

Survey §3.2.2 (Eq. 11–12), AutoLoss §2.3 (Eq. 9–10): given probabilities α over n candidates, the Gumbel-max
trick draws a hard choice ``z = one_hot(argmax_i (log α_i + g_i))`` with ``g_i = -log(-log u_i)``,
``u_i ~ U(0, 1)`` (Eq. 9); its differentiable relaxation is
``p_i = softmax((log α_i + g_i) / τ)`` (Eq. 10). The straight-through estimator (Jang et al. 2017, the
papers' reference [18]) uses ``z`` in the forward pass and the gradient of ``p`` in the backward pass:
``z - stopgrad(p) + p``.

The temperature follows the AutoLoss paper's annealing (§3.3), which the AutoDim paper shares:
``τ(t) = max(τ_min, τ_0 - decay · t)`` with ``τ_0 = 1``, ``decay = 5e-5``, ``τ_min = 0.01`` and ``t`` the
training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from autorecbench.errors import UserError

# u is drawn in [EPS, 1 - EPS] so that -log(-log u) stays finite.
EPS = 1e-10


@dataclass(frozen=True)
class TemperatureSchedule:
    """τ(t) = max(floor, start - decay · t) (AutoLoss §3.3: start 1, decay 0.00005, floor 0.01)."""

    start: float = 1.0
    decay: float = 5e-5
    floor: float = 0.01

    def __post_init__(self) -> None:
        if not self.start > 0 or not self.floor > 0 or self.decay < 0:
            raise UserError(f"temperature schedule needs start > 0, floor > 0, decay >= 0; got {self}")

    def __call__(self, step: int) -> float:
        return max(self.floor, self.start - self.decay * step)


def gumbel_noise(shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """i.i.d. Gumbel(0, 1) samples g = -log(-log u) (Eq. 9), from torch's seeded global generator."""
    u = torch.rand(shape, device=device).clamp_(EPS, 1.0 - EPS)
    return -torch.log(-torch.log(u))


def gumbel_softmax(log_alpha: torch.Tensor, tau: float, hard: bool, dim: int = -1,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 10 (``hard=False``), or Eq. 9's one-hot with Eq. 10's gradient (``hard=True``, straight-through).

    ``log_alpha``: log-probabilities (or unnormalised logits: the softmax is shift-invariant) over ``dim``.
    ``noise``: the Gumbel samples to use (default: fresh ones).
    """
    if noise is None:
        noise = gumbel_noise(log_alpha.shape, log_alpha.device)
    soft = F.softmax((log_alpha + noise) / tau, dim=dim)
    if not hard:
        return soft
    # argmax of (log α + g) / τ is argmax of log α + g: Eq. 9's sample, whatever τ.
    index = soft.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return one_hot - soft.detach() + soft
