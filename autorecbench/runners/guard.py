"""The divergence guard: a run whose training diverged stops there and is recorded as ``diverged``.

Three rules (``runner.divergence_*``, :class:`~autorecbench.runners.base.LifecycleConfig`):
- a non-finite training loss or prediction, at the batch / step where it happens;
- a training loss above ``divergence_factor`` (100) times the running minimum of the losses so far, once
  ``divergence_warmup`` (20) batches / steps have passed (the minimum counts the warm-up's losses too);
- at every evaluation (offline: each validation evaluation of every stage; streaming: every ``curve_window``
  batches, over that window), a logloss (CE for 5 classes) worse than a constant prediction's by more than
  ``divergence_margin`` (50%): the constant is the training split's label rate (offline) or the window's own
  (streaming, the best constant in hindsight).

Losses are read back to the host once per batch on the CPU (free there) and once per
:data:`CUDA_SYNC_EVERY` batches on a GPU (no host sync in the hot loop); the step reported is always the
exact one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from autorecbench.data.schema import TaskSpec
from autorecbench.errors import RunDiverged
from autorecbench.metrics import cross_entropy, logloss

CUDA_SYNC_EVERY = 32


def loss_metric(task: TaskSpec) -> str:
    """The evaluation metric the third rule reads: logloss (binary) or cross-entropy (5 classes)."""
    return "logloss" if task.is_binary else "ce"


def evaluation_loss(task: TaskSpec, predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """The metric of :func:`loss_metric` alone (no AUC: the streaming guard reads it every window)."""
    labels = labels.to(predictions.device)
    value = logloss(predictions, labels) if task.is_binary else cross_entropy(predictions, labels)
    return float(value)


def constant_loss(task: TaskSpec, rate_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """The logloss (CE) on ``labels`` of one constant prediction: the label rate (class shares) of
    ``rate_labels``."""
    if task.is_binary:
        rate = rate_labels.to(torch.float64).mean()
        pred = rate.expand(labels.shape[0]).to(torch.float32)
    else:
        shares = torch.bincount(rate_labels.to(torch.int64), minlength=task.n_classes).to(torch.float64)
        pred = (shares / shares.sum()).expand(labels.shape[0], -1).to(torch.float32)
    return evaluation_loss(task, pred, labels)


def chance_loss(task: TaskSpec) -> float:
    """The logloss (CE) of the uniform prediction (1/2, 1/C): where an untrained model starts, so an evaluation
    near it is not a divergence, however skewed the labels (a 3% click rate's constant logloss is 0.13)."""
    return math.log(2 if task.is_binary else task.n_classes)


class DivergenceGuard:
    """One stage's guard (``stage`` names it in the record). :meth:`observe` each training loss;
    :meth:`evaluation` each evaluation; :meth:`flush` before anything that must not hold a diverged state (a
    checkpoint, the end of the stage)."""

    def __init__(self, stage: str, cfg: Any, device: torch.device) -> None:
        self.stage = stage
        self.factor: float | None = cfg.divergence_factor
        self.warmup: int = cfg.divergence_warmup
        self.margin: float | None = cfg.divergence_margin
        self.sync_every = 1 if device.type == "cpu" else CUDA_SYNC_EVERY
        self.pending: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []
        self.running_min = math.inf

    def observe(self, step: int, loss: torch.Tensor | None, predictions: torch.Tensor | None = None) -> None:
        """The training loss of ``step`` (a 0-d tensor; None: the method reported none) and, where the protocol
        predicts while training (streaming), that step's predictions (probabilities: their sum is finite
        exactly when each is)."""
        finite = predictions.sum() if predictions is not None else None
        if self.sync_every == 1:  # the CPU: reading a value back costs nothing
            self._check(step, None if loss is None else float(loss), finite is None or math.isfinite(float(finite)))
            return
        if loss is None and finite is None:
            return
        self.pending.append((step, loss.detach().reshape(()) if loss is not None else None, finite))
        if len(self.pending) >= self.sync_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        device = next(t.device for _, loss, finite in self.pending for t in (loss, finite) if t is not None)
        parts = []
        for _, loss, finite in self.pending:  # (loss, sum of predictions) per step; NaN / 0 where not observed
            parts.append(loss.to(torch.float64) if loss is not None
                         else torch.full((), math.nan, dtype=torch.float64, device=device))
            parts.append(finite.to(torch.float64) if finite is not None
                         else torch.zeros((), dtype=torch.float64, device=device))
        flat = torch.stack(parts).tolist()  # one host sync for the pending steps
        steps = [(step, loss is not None) for step, loss, _ in self.pending]
        self.pending.clear()
        for (step, has_loss), value, total in zip(steps, flat[0::2], flat[1::2]):
            self._check(step, value if has_loss else None, math.isfinite(total))

    def _check(self, step: int, loss: float | None, predictions_finite: bool) -> None:
        if not predictions_finite:
            raise RunDiverged(self.stage, step, "non-finite prediction")
        if loss is None:
            return
        if not math.isfinite(loss):
            raise RunDiverged(self.stage, step, f"non-finite training loss ({loss})")
        self.running_min = min(self.running_min, loss)
        if self.factor is not None and step > self.warmup and loss > self.factor * self.running_min:
            raise RunDiverged(self.stage, step, f"training loss {loss:.4g} is more than {self.factor:g} times "
                              f"its running minimum {self.running_min:.4g} (runner.divergence_factor)")

    def predictions(self, step: int, predictions: torch.Tensor, first_row: int = 0) -> None:
        """Stop at the first non-finite prediction of ``predictions`` (rows from ``first_row``)."""
        finite = torch.isfinite(predictions.reshape(predictions.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            row = first_row + int((~finite).nonzero()[0])
            raise RunDiverged(self.stage, step, f"non-finite prediction (row {row})")

    def evaluation(self, step: int, where: str, metric: str, value: float, constant: float, chance: float) -> None:
        """An evaluation's ``metric`` against the worse of a constant prediction's (the label rate) and the
        uniform prediction's (:func:`chance_loss`) (``where``: e.g. ``valid split``)."""
        if not math.isfinite(value):
            raise RunDiverged(self.stage, step, f"non-finite {metric} on the {where}")
        reference = max(constant, chance)
        if self.margin is not None and value > (1 + self.margin) * reference:
            raise RunDiverged(self.stage, step, f"{metric} {value:.4g} on the {where} is worse than a constant "
                              f"prediction's {constant:.4g} and the uniform prediction's {chance:.4g} by more than "
                              f"{self.margin:.0%} (runner.divergence_margin)")

    def state(self) -> dict[str, Any]:
        self.flush()
        return {"running_min": self.running_min}

    def load(self, state: dict[str, Any]) -> None:
        self.running_min = float(state["running_min"])
