"""AutoDim's planted-truth validation: informative fields should get larger embeddings than pure-noise fields.

Cases (click data from the synthetic Criteo generator, 10 fields on FM):
- ``planted``: 5 informative fields, every pair of them interacting through rank-16 factors (so an informative
  field needs a large size), 5 pure-noise fields;
- ``control``: the same fields, value draws and click rate with no signal at all (every field noise).

Subjects, all judged on the sizes they give each field:
- ``method``: AutoDim's search (its defaults; small-file settings below);
- ``oracle``: the truth — an informative field gets the largest candidate, a noise field the smallest (on the
  control every field is noise);
- ``null``: a uniformly random candidate per field (seeded).

Statistics:
- ``noise_smaller_share``: over every (informative, noise) field pair, the share where the informative field's
  size is larger, ties counting 1/2 (:func:`~autorecbench.validate.offline_cases.ordered_share`). A random or
  constant choice scores 0.5 in expectation; threshold 0.9 (margin 0.4 over the null's 0.5). The 25 pairs
  share 10 draws, so a uniformly random choice still reaches 0.9 with probability 1.5% per seed (0.8: 6%;
  simulated in the tests); over 3 seeds its mean reaches 0.8 with probability 0.2%, the margin the slow test
  of the method uses. The oracle scores 1 on the planted case and 0.5 on the control.
- ``auc_minus_fixed``: test AUC of the re-trained architecture minus FIXED's with every field at the unified
  size (the capacity-matched baseline: AutoDim maps every field to that size), threshold -0.005;
  ``bytes_vs_fixed``: the re-trained embedding bytes over that FIXED's (lower is better, threshold 1). Both
  have no expectation (a random architecture may pass them); they put the search's result beside the fair
  baseline.

Small-file settings for the method (the tests' planted file, ``tests/test_autodim.py``): batches of 500, α with
Adam at 0.01, a search without early stopping and α read at its end; the search runs 8 epochs with ``quick``
(50,000 rows), 40 otherwise (the tests' setting). Every fit stage (re-train, references, FIXED) trains to the
runner's early stopping (at most ``FIT_EPOCHS``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from autorecbench.data.synthetic_ctr import CTRGenerator
from autorecbench.validate.base import Statistic, register_validation
from autorecbench.validate.offline_cases import FIT_EPOCHS, OfflineRun, OfflineValidation, ordered_share, run_method

SHARE_THRESHOLD = 0.9
AUC_TOLERANCE = -0.005
INFORMATIONAL = ("auc_minus_fixed", "bytes_vs_fixed")


@register_validation
class AutoDimValidation(OfflineValidation):
    method = "autodim"
    model = "fm"
    search_epochs: ClassVar[dict[bool, int]] = {True: 8, False: 40}

    def generator(self, case: str, seed: int, quick: bool) -> CTRGenerator:
        planted = CTRGenerator(seed=seed, rows=50_000, n_fields=10, n_informative=5, n_pairs=10, pair_rank=16,
                               cardinality_min=20, cardinality_max=100)
        return planted if case == "planted" else replace(planted, linear_std=0.0, pair_strength=0.0)

    def runner_overrides(self, quick: bool) -> list[str]:
        return ["runner.batch_size=500", f"runner.epochs={FIT_EPOCHS}"]

    def expected(self, case: str, subject: str, statistic: str) -> bool | None:
        if statistic in INFORMATIONAL:
            return None
        return super().expected(case, subject, statistic)

    def candidates(self) -> list[int]:
        from autorecbench.validate.offline_cases import compose_method

        return sorted(int(c) for c in compose_method("autodim", self.model, []).method.candidates)

    def measure(self, case: str, subject: str, seed: int, quick: bool, workdir: Path) -> list[Statistic]:
        data = self.case_data(case, seed, quick)
        model = data.clicks.model
        names = data.clicks.names
        informative = [names[i] for i in model.informative]
        noise = [n for n in names if n not in informative]
        overrides = [*self.runner_overrides(quick), "method.arch_lr=0.01", "method.search_patience=1000",
                     "method.search_restore_best=false", f"method.search_epochs={self.search_epochs[quick]}"]
        if subject == "method":
            run = run_method(data, "autodim", self.model, [*overrides, *self.method_overrides], seed)
        else:
            candidates = self.candidates()
            if subject == "oracle":
                useful = set(informative) if case == "planted" else set()
                dims = {n: candidates[-1] if n in useful else candidates[0] for n in names}
            else:
                rng = np.random.default_rng([seed, 17])
                dims = {n: int(rng.choice(candidates)) for n in names}
            run = run_method(data, "autodim", self.model, overrides, seed, architecture={"chosen_dim": dims})
        chosen = dict(zip(names, run.method.field_dims()))  # the sizes the fit stage really trained
        share = ordered_share([chosen[n] for n in informative], [chosen[n] for n in noise])
        return [Statistic("noise_smaller_share", share, SHARE_THRESHOLD), *self.against_fixed(case, seed, quick, run)]

    def against_fixed(self, case: str, seed: int, quick: bool, run: OfflineRun) -> list[Statistic]:
        """The re-trained architecture against FIXED with every field at the unified size."""
        unified = int(run.method.module().dim)
        fixed = self.fixed_run(case, seed, quick, [f"method.embedding_dim={unified}"])
        return [Statistic("auc_minus_fixed", run.test_auc - fixed.test_auc, AUC_TOLERANCE),
                Statistic("bytes_vs_fixed", run.embedding_bytes / fixed.embedding_bytes, 1.0, higher_is_better=False)]
