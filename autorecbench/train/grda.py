"""Generalised regularised dual averaging (GRDA; Chao & Cheng 2019, arXiv:1909.10072), the optimiser
AutoFIS uses for its interaction gates α (survey §5, Eq. 26-28).

For a parameter w with initial value w_0, learning rate γ and gradients g_1 .. g_n:

    a_n = w_0 - γ Σ_{i=1..n} g_i                  (the dual average, kept as state)
    w_n = S(a_n, t_n),  S(a, t) = sign(a) · max(|a| - t, 0)      (soft thresholding)
    t_n = c · γ^(1/2 + μ) · n^μ                   (the threshold g(n, γ) = c √γ (nγ)^μ)

``c`` sets the strength of the ℓ1 penalty and ``μ`` how fast it grows with the step count: larger ``c``
drives more weights to exactly 0. With ``c = 0`` it is dual averaging without regularisation (w_n = a_n,
i.e. constant-step SGD from w_0); with ``μ = 0`` the threshold is constant, as in ℓ1-RDA. Unlike
subgradient ℓ1 penalties, weights that reach zero are exactly zero, which AutoFIS reads as "drop this
interaction".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class GRDA(Optimizer):
    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], lr: float = 1.0,
                 c: float = 0.005, mu: float = 0.6) -> None:
        if lr <= 0:
            raise ValueError(f"GRDA lr must be > 0, got {lr}")
        if c < 0 or mu < 0:
            raise ValueError(f"GRDA c and mu must be >= 0, got c={c}, mu={mu}")
        super().__init__(params, {"lr": lr, "c": c, "mu": mu})

    @staticmethod
    def threshold(step: int, lr: float, c: float, mu: float) -> float:
        """t_n = c γ^(1/2+μ) n^μ."""
        return c * lr ** (0.5 + mu) * step**mu

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, c, mu = group["lr"], group["c"], group["mu"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GRDA does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["dual"] = p.detach().clone()  # a_0 = w_0
                state["step"] += 1
                dual = state["dual"]
                dual.add_(p.grad, alpha=-lr)
                t = self.threshold(state["step"], lr, c, mu)
                p.copy_(torch.sign(dual) * (dual.abs() - t).clamp_min(0))
        return loss
