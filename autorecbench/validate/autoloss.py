"""AutoLoss's planted-truth validation: with label noise confined to a known subset of the training rows, a
per-example loss weighting that helps gives the noisy rows less weight than the clean ones.

Cases (click data from the synthetic Criteo generator, 12 fields, click rate 0.5 and a strong signal — first-order
weights N(0, 0.8²), 4 planted pairs at strength 2 — on DeepFM with the paper's §3.3 settings):
- ``planted``: a designated 30% of the training rows have their click replaced by a draw from the training
  click rate (independent of the features: pure noise, the same marginal); validation and test are clean, so
  down-weighting the noisy rows helps by construction (the oracle gains 0.04 test AUC over CE on seed 0);
- ``control``: the same rows and designated subset with every label as drawn (no noise).

Subjects:
- ``method``: AutoLoss (its defaults; ``method_overrides`` runs another setting, e.g. ``method.val_objective=ce``);
- ``oracle``: the truth weights — weight 0 on the noisy rows, 1 on the others (on the control: 1 everywhere),
  trained as CE on the rows with weight 1 through AutoLoss' code (``method.variant=ce``);
- ``null``: fixed CE (``method.variant=ce``) on every row.

Statistics:
- ``noisy_weight_separation``: each training row's effective weight relative to CE,
  ``r = |Σ_i E[p_i] ∂ℓ_i/∂s| / |∂CE/∂s|`` at the trained model's logit s (the gradient the row gives the DRS
  over CE's: 1 for fixed CE; E[p] = α for AutoLoss, :meth:`~autorecbench.methods.autoloss.AutoLoss.expected_weights`),
  and the share of (clean, noisy) row pairs with the clean row weighted higher, ties 1/2
  (:func:`~autorecbench.validate.offline_cases.rank_share`). Fixed CE scores 0.5 exactly, the truth 1;
  threshold 0.6 (margin 0.1). The controller sees only (y, ŷ): the best any weight of (y, ŷ) can reach is the
  separation of P(clean | y, ŷ), ≈ 0.68 on seed 0 (binned on CE's predictions); the signal is strong and the
  click rate 0.5 so that this ceiling sits clear of the threshold (with the generator's defaults it is ≈ 0.60).
  A loss whose gradient shrinks on badly-fit rows (hinge) separates by its shape alone; the statistic measures
  what the training does to the noisy rows, whoever decides it.
- ``auc_minus_ce``: test AUC minus fixed CE's on the same backbone (the capacity-matched baseline: AutoLoss
  changes the loss, not the model), threshold 0.001 (the paper's "significant" level, §3.2); no expectation.

Small-file settings: batches of 500, early stopping as the runner's; 40,000 rows with ``quick``, 100,000
otherwise; the method's controller steps at every DRS step (``method.update_every=1``: the paper's f = 7 gives
~2,600 controller steps per Criteo epoch, these files have 64-160 DRS steps per epoch).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from autorecbench.data.offline import SplitData
from autorecbench.data.splits import TRAIN, random_split
from autorecbench.data.synthetic_ctr import CTRGenerator, draw_clicks
from autorecbench.methods.autoloss import AutoLoss
from autorecbench.train.losses import candidate_losses
from autorecbench.validate.base import Statistic, register_validation
from autorecbench.validate.offline_cases import (SPLIT_RATIO, CaseData, OfflineRun, OfflineValidation, rank_share,
                                                  run_method, split_data)

NOISY_SHARE = 0.3
# The paper's f = 7 gives ~2,600 controller steps per Criteo epoch (18,000 DRS steps of 2,000 rows); these files
# have 64-160 DRS steps per epoch, so the controller steps at every DRS step.
SMALL_FILE = ["method.update_every=1"]
SEPARATION_THRESHOLD = 0.6
AUC_GAIN = 0.001


def relative_weights(method: AutoLoss, split: SplitData, batch_size: int = 50_000) -> torch.Tensor:
    """Per row of ``split``: ``|Σ_i E[p_i] ∂ℓ_i/∂s| / |∂CE/∂s|`` at the trained DRS's logit (binary task)."""
    model = method.module()
    model.eval()
    if method.weigher is not None:
        method.weigher.eval()
    task = method.ctx.task
    out = []
    for start, end in split.bounds(batch_size):
        batch = split.rows(slice(start, end))
        with torch.no_grad():
            logits = model(batch.x)
            weights = method.expected_weights(logits, batch.label)
        logits.requires_grad_(True)
        losses = candidate_losses(task, logits, batch.label, method.names, method.options)
        ce = candidate_losses(task, logits, batch.label, ["ce"], method.options)
        # each row's losses depend on its own logit only: the gradient of a column sum is per row; CE's through
        # the same code, so that fixed CE gives exactly 1
        (grad,) = torch.autograd.grad((losses * weights).sum(), logits)
        (ce_grad,) = torch.autograd.grad(ce.sum(), logits)
        out.append(grad[:, 0].abs() / ce_grad[:, 0].abs().clamp_min(1e-12))
    return torch.cat(out)


@register_validation
class AutoLossValidation(OfflineValidation):
    method = "autoloss"
    model = "deepfm"

    def __init__(self, method_overrides: list[str] | None = None) -> None:
        super().__init__(method_overrides)
        self._noisy: dict[tuple[str, int, bool], torch.Tensor] = {}
        self._ce: dict[tuple[str, int, bool], OfflineRun] = {}

    def generator(self, case: str, seed: int, quick: bool) -> CTRGenerator:
        return CTRGenerator(seed=seed, rows=40_000 if quick else 100_000, n_fields=12, n_informative=8, n_pairs=4,
                            base_ctr=0.5, linear_std=0.8, pair_strength=2.0)

    def runner_overrides(self, quick: bool) -> list[str]:
        return ["runner.batch_size=500"]

    def expected(self, case: str, subject: str, statistic: str) -> bool | None:
        if statistic == "auc_minus_ce":
            return None
        return super().expected(case, subject, statistic)

    def make_case(self, case: str, seed: int, quick: bool) -> CaseData:
        clicks = draw_clicks("criteo", self.generator(case, seed, quick))
        train = random_split(len(clicks.clicks), SPLIT_RATIO, seed) == TRAIN  # split_data's split
        rng = np.random.default_rng([seed, 31])
        designated = (rng.random(len(clicks.clicks)) < NOISY_SHARE) & train
        labels = clicks.clicks.copy()
        if case == "planted":
            rate = float(clicks.clicks[train].mean())
            labels[designated] = (rng.random(int(designated.sum())) < rate).astype(labels.dtype)
        self._noisy[(case, seed, quick)] = torch.from_numpy(designated[train])
        return split_data(clicks, split_seed=seed, labels=labels)

    def noisy_rows(self, case: str, seed: int, quick: bool) -> torch.Tensor:
        """The designated rows of the training split (noisy on the planted case)."""
        self.case_data(case, seed, quick)
        return self._noisy[(case, seed, quick)]

    def ce_run(self, case: str, seed: int, quick: bool) -> OfflineRun:
        """Fixed CE on every training row: the null, and the capacity-matched baseline of every subject."""
        key = (case, seed, quick)
        if key not in self._ce:
            self._ce[key] = run_method(self.case_data(case, seed, quick), "autoloss", self.model,
                                       [*self.runner_overrides(quick), "method.variant=ce"], seed)
        return self._ce[key]

    def measure(self, case: str, subject: str, seed: int, quick: bool, workdir: Path) -> list[Statistic]:
        data = self.case_data(case, seed, quick)
        designated = self.noisy_rows(case, seed, quick)
        noisy = designated if case == "planted" else torch.zeros_like(designated)
        if subject == "method":
            run = run_method(data, "autoloss", self.model,
                             [*self.runner_overrides(quick), *SMALL_FILE, *self.method_overrides], seed)
            method = run.method
            assert isinstance(method, AutoLoss)
            weights = relative_weights(method, data.data.train)
        elif subject == "null":
            run = self.ce_run(case, seed, quick)
            assert isinstance(run.method, AutoLoss)
            weights = relative_weights(run.method, data.data.train)
        else:  # the truth weights: CE on the rows it keeps (weight 1), none on the noisy ones (weight 0)
            weights = (~noisy).to(torch.float64)
            if noisy.any():
                keep = ~noisy.to(data.data.train.device)
                train = data.data.train
                kept = SplitData("train", train.x[keep], train.label[keep], train.device)
                run = run_method(replace(data, data=replace(data.data, train=kept)), "autoloss", self.model,
                                 [*self.runner_overrides(quick), "method.variant=ce"], seed)
            else:  # weight 1 everywhere: the null's run
                run = self.ce_run(case, seed, quick)
        gain = run.test_auc - self.ce_run(case, seed, quick).test_auc
        return [Statistic("noisy_weight_separation", rank_share(weights, ~designated), SEPARATION_THRESHOLD),
                Statistic("auc_minus_ce", gain, AUC_GAIN)]
