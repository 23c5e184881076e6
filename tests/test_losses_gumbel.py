"""The candidate losses (AutoLoss Eq. 7) against their formulas; Gumbel-softmax (Eq. 9-10) and the
temperature schedule (§3.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autorecbench.data.schema import TaskSpec
from autorecbench.errors import UserError
from autorecbench.train.gumbel import TemperatureSchedule, gumbel_noise, gumbel_softmax
from autorecbench.train.losses import CANDIDATES, LossOptions, candidate_losses, check_names

BINARY, MULTI = TaskSpec("binary", 2), TaskSpec("multiclass", 5)


def test_binary_losses_match_their_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 1, generator=gen, dtype=torch.float64)
    label = (torch.rand(200, generator=gen) < 0.4).to(torch.float64)
    out = candidate_losses(BINARY, logits, label, CANDIDATES, LossOptions(focal_gamma=2.0, hinge_margin=1.0))
    p = torch.sigmoid(logits[:, 0])
    p_y = torch.where(label == 1, p, 1 - p)
    ce = F.binary_cross_entropy_with_logits(logits[:, 0], label, reduction="none")
    target = 0.9 * label + 0.05  # label smoothing ε = 0.1 over 2 classes: y_ε = 0.9 y + 0.05
    kl = target * torch.log(target / p) + (1 - target) * torch.log((1 - target) / (1 - p))
    expected = {"focal": (1 - p_y) ** 2 * ce, "kl": kl, "hinge": 2 * (1 - p_y), "ce": ce}
    for i, name in enumerate(CANDIDATES):
        assert torch.allclose(out[:, i], expected[name], atol=1e-10), name


@pytest.mark.parametrize("task", [BINARY, MULTI])
def test_kl_differs_from_ce_unless_the_target_is_one_hot(task: TaskSpec) -> None:
    """Against a one-hot label KL(y ‖ ŷ) is exactly the cross-entropy (the issue's finding: the paper's KL column
    would repeat CE); against the smoothed target it is CE(y_ε) - H(y_ε), another loss."""
    gen = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(300, task.n_outputs, generator=gen, dtype=torch.float64)
    label = (torch.randint(0, task.n_classes, (300,), generator=gen)).to(torch.float64 if task.is_binary else torch.int64)
    one_hot = candidate_losses(task, logits, label, ["kl", "ce"], LossOptions(kl_smoothing=0.0))
    assert torch.equal(one_hot[:, 0], one_hot[:, 1]) or (one_hot[:, 0] - one_hot[:, 1]).abs().max() < 1e-12
    smoothed = candidate_losses(task, logits, label, ["kl", "ce"], LossOptions(kl_smoothing=0.1))
    assert (smoothed[:, 0] - smoothed[:, 1]).abs().max() > 0.1 and (smoothed[:, 0] >= 0).all()
    log_p = torch.log_softmax(torch.cat([torch.zeros_like(logits), logits], 1), 1) if task.is_binary \
        else torch.log_softmax(logits, 1)
    target = F.one_hot(label.to(torch.int64), task.n_classes).to(torch.float64) * 0.9 + 0.1 / task.n_classes
    entropy = -(target * target.log()).sum(1)
    assert torch.allclose(smoothed[:, 0], -(target * log_p).sum(1) - entropy, atol=1e-10)  # CE(y_ε) - H(y_ε)
    with pytest.raises(UserError):
        LossOptions(kl_smoothing=1.0)


def test_multiclass_losses_match_their_formulas() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(100, 5, generator=gen, dtype=torch.float64)
    label = torch.randint(0, 5, (100,), generator=gen)
    out = candidate_losses(MULTI, logits, label, ["ce", "kl", "focal", "hinge"], LossOptions(0.5, 0.3))
    p = torch.softmax(logits, 1)
    p_y = p[torch.arange(100), label]
    others = p.clone()
    others[torch.arange(100), label] = -1
    ce = F.cross_entropy(logits, label, reduction="none")
    target = F.one_hot(label, 5).to(torch.float64) * 0.9 + 0.02  # ε = 0.1 (the default) over 5 classes
    assert torch.allclose(out[:, 0], ce) and torch.allclose(out[:, 1], (target * (target.log() - p.log())).sum(1))
    assert torch.allclose(out[:, 2], (1 - p_y) ** 0.5 * ce)
    assert torch.allclose(out[:, 3], (0.3 - (p_y - others.max(1).values)).clamp_min(0))
    assert (out[:, 3] == 0).any() and (out[:, 3] > 0).any()  # the margin is really active on some rows


def test_losses_are_stable_for_extreme_logits() -> None:
    logits = torch.tensor([[-200.0], [200.0], [0.0]])
    out = candidate_losses(BINARY, logits, torch.tensor([1.0, 0.0, 1.0]), CANDIDATES)
    assert torch.isfinite(out).all() and out[0, 3] == pytest.approx(200.0)


def test_loss_names_are_checked() -> None:
    assert check_names(["ce", "focal"]) == ("ce", "focal")
    for bad in (["mse"], [], ["ce", "ce"]):
        with pytest.raises(UserError):
            check_names(bad)


def test_temperature_schedule() -> None:
    tau = TemperatureSchedule()
    assert [tau(t) for t in (0, 1, 10_000, 19_800, 19_900, 10**7)] == pytest.approx(
        [1.0, 0.99995, 0.5, 0.01, 0.01, 0.01])
    with pytest.raises(UserError):
        TemperatureSchedule(floor=0.0)


def test_gumbel_softmax_soft_hard_and_straight_through() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 4, requires_grad=True)
    log_alpha = F.log_softmax(logits, 1)
    noise = gumbel_noise(log_alpha.shape, log_alpha.device)
    soft = gumbel_softmax(log_alpha, 0.5, hard=False, noise=noise)
    assert torch.allclose(soft, torch.softmax((log_alpha + noise) / 0.5, 1))
    hard = gumbel_softmax(log_alpha, 0.5, hard=True, noise=noise)
    assert torch.equal(hard.detach(), F.one_hot((log_alpha + noise).argmax(1), 4).float())  # Eq. 9
    weights = torch.randn(64, 4)
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), logits, retain_graph=True)
    (g_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    assert torch.allclose(g_hard, g_soft)  # straight-through: Eq. 10's gradient


def test_gumbel_max_draws_follow_alpha() -> None:
    torch.manual_seed(0)
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draws = gumbel_softmax(alpha.log().expand(40_000, -1), 1.0, hard=True)
    assert torch.allclose(draws.mean(0), alpha, atol=0.01)
