"""Candidate loss functions, per example, for binary and 5-class tasks (AutoLoss §2.2 Eq. 7, §3.4).

Every loss is written once, over class probabilities: a binary prediction ŷ = σ(s) is the two-class
distribution ``[1 - ŷ, ŷ]`` (computed from the logit s in log space, so it is as stable as
``binary_cross_entropy_with_logits``), a 5-class prediction the softmax of the five logits. With ``p_y``
the probability of the true class:

| name | loss | note |
| --- | --- | --- |
| ``ce`` | ``-log p_y`` | binary: the logloss |
| ``focal`` | ``-(1 - p_y)^γ log p_y`` | Lin et al. 2017, ``γ = focal_gamma`` (2, their default) |
| ``kl`` | ``KL(y_ε ‖ ŷ) = Σ_k y_ε,k (log y_ε,k - log ŷ_k)``, ``y_ε = (1 - ε) one_hot(y) + ε / C`` | PyTorch's ``kl_div`` (0 log 0 = 0) against a label-smoothed target, ``ε = kl_smoothing`` (0.1) |
| ``hinge`` | ``max(0, m - (p_y - max_{k≠y} p_k))`` | categorical hinge (Keras' form, named in §2.2) on probabilities, margin ``m = hinge_margin`` (1); binary: ``2 (1 - p_y)`` |

The paper names the losses but gives no formula, γ, margin or target: the table above is this package's
reading, and ``focal_gamma`` / ``hinge_margin`` / ``kl_smoothing`` are config values. Why the smoothed target:
for a hard (one-hot) label the KL divergence to the label distribution *is* the cross-entropy
(``Σ_k y_k log y_k = 0``), so with ε = 0 the KL candidate repeats CE exactly (max difference 0), yet the paper
reports the two apart (Table 2: 0.8042 vs 0.8056 AUC on Criteo/DeepFM). Against ``y_ε``,
``KL = CE(y_ε, ŷ) - H(y_ε)``: the label-smoothed cross-entropy (Szegedy et al. 2016, ε = 0.1 their setting)
minus a constant, whose gradient pulls ŷ towards ``1 - ε + ε/C`` instead of 1 — a different loss that a
controller can choose for a different purpose. ``kl_smoothing: 0`` restores KL = CE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from autorecbench.data.schema import TaskSpec
from autorecbench.errors import UserError

CANDIDATES = ("focal", "kl", "hinge", "ce")


@dataclass(frozen=True)
class LossOptions:
    focal_gamma: float = 2.0
    hinge_margin: float = 1.0
    kl_smoothing: float = 0.1  # ε of the KL candidate's label-smoothed target (0: KL = CE)

    def __post_init__(self) -> None:
        if self.focal_gamma < 0 or self.hinge_margin <= 0 or not 0 <= self.kl_smoothing < 1:
            raise UserError(f"focal_gamma must be >= 0, hinge_margin > 0 and kl_smoothing in [0, 1), got {self}")


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(n) for n in names)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise UserError(f"unknown or no candidate losses {list(unknown) or list(names)}; choose from {', '.join(CANDIDATES)}")
    if len(set(names)) != len(names):
        raise UserError(f"candidate losses listed twice: {list(names)}")
    return names


def class_log_probs(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """Log class probabilities ``[B, C]``: ``[log(1 - σ(s)), log σ(s)]`` for binary, log-softmax otherwise."""
    if task.is_binary:
        s = logits[:, 0]
        return torch.stack([F.logsigmoid(-s), F.logsigmoid(s)], dim=1)
    return F.log_softmax(logits, dim=1)


def class_probs(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    return class_log_probs(task, logits).exp()


def candidate_losses(task: TaskSpec, logits: torch.Tensor, label: torch.Tensor, names: Sequence[str],
                     options: LossOptions = LossOptions()) -> torch.Tensor:
    """Eq. 7: ``[B, len(names)]``, the loss ``names[i]`` of every example in column i."""
    log_p = class_log_probs(task, logits)
    target = label.to(torch.int64)
    log_p_y = log_p.gather(1, target[:, None])[:, 0]
    p = log_p.exp()
    p_y = p.gather(1, target[:, None])[:, 0]
    columns = []
    for name in names:
        if name == "ce":
            columns.append(-log_p_y)
        elif name == "focal":
            columns.append(-((1.0 - p_y).clamp_min(0.0) ** options.focal_gamma) * log_p_y)
        elif name == "kl":
            n_classes = log_p.shape[1]
            eps = options.kl_smoothing
            smoothed = F.one_hot(target, n_classes).to(log_p.dtype) * (1.0 - eps) + eps / n_classes
            columns.append(F.kl_div(log_p, smoothed, reduction="none").sum(dim=1))
        elif name == "hinge":
            others = p.masked_fill(F.one_hot(target, p.shape[1]).bool(), float("-inf")).amax(dim=1)
            columns.append((options.hinge_margin - (p_y - others)).clamp_min(0.0))
        else:
            raise UserError(f"unknown loss {name!r}; choose from {', '.join(CANDIDATES)}")
    return torch.stack(columns, dim=1)
