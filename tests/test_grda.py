"""GRDA against its closed form; sparsity grows with c."""

from __future__ import annotations

import pytest
import torch

from autorecbench.train.grda import GRDA


def test_c_zero_is_dual_averaging_from_the_initial_point() -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, generator=gen)
    w = torch.nn.Parameter(w0.clone())
    opt = GRDA([w], lr=0.1, c=0.0, mu=0.0)
    grads = [torch.randn(50, generator=gen) for _ in range(7)]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    assert torch.allclose(w.detach(), w0 - 0.1 * torch.stack(grads).sum(0), atol=1e-6)


def test_soft_threshold_matches_the_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(100, generator=gen)
    w = torch.nn.Parameter(w0.clone())
    lr, c, mu = 0.5, 0.3, 0.6
    opt = GRDA([w], lr=lr, c=c, mu=mu)
    total = torch.zeros(100)
    for n in range(1, 6):
        g = torch.randn(100, generator=gen)
        total += g
        w.grad = g
        opt.step()
        dual = w0 - lr * total
        t = c * lr ** (0.5 + mu) * n**mu
        assert torch.allclose(w.detach(), torch.sign(dual) * (dual.abs() - t).clamp_min(0), atol=1e-6)


def test_larger_c_gives_more_exact_zeros() -> None:
    def zeros(c: float) -> int:
        gen = torch.Generator().manual_seed(2)
        w = torch.nn.Parameter(torch.full((500,), 0.6) + 0.001 * torch.randn(500, generator=gen))
        opt = GRDA([w], lr=1.0, c=c, mu=0.6)
        for _ in range(50):
            w.grad = 0.05 * torch.randn(500, generator=gen)
            opt.step()
        return int((w == 0).sum())

    counts = [zeros(c) for c in (0.0, 0.005, 0.02, 0.05)]
    assert counts[0] == 0
    assert counts == sorted(counts) and counts[-1] > counts[1]


def test_a_gradient_pulls_towards_zero_only_past_the_threshold() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.01]))
    opt = GRDA([w], lr=1.0, c=0.05, mu=0.0)
    w.grad = torch.zeros(3)
    opt.step()
    assert w.tolist() == pytest.approx([0.95, -0.95, 0.0])


def test_bad_hyper_parameters() -> None:
    with pytest.raises(ValueError):
        GRDA([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    with pytest.raises(ValueError):
        GRDA([torch.nn.Parameter(torch.zeros(1))], c=-1.0)
