"""The offline search methods' planted-truth validations (``autorecbench/validate/autodim.py``, ``autofis.py``,
``autoloss.py``), called through ``measure`` as the harness calls them.

- The statistics against brute force (rank shares, F1, AutoLoss' relative weights), and the null's chance of
  clearing AutoDim's threshold.
- On tiny files (seconds): every validation runs end to end for the references, through the method's own build
  and fit, and the structural statistics discriminate.
- Slow: on 2 seeds at the quick budget, the references discriminate for each method (oracle passes on the
  planted case, the null fails, nothing passes on the control); the verdicts and times are printed.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from autorecbench.data.synthetic_ctr import CTRGenerator
from autorecbench.methods.autoloss import AutoLoss
from autorecbench.train.losses import candidate_losses
from autorecbench.validate.autodim import SHARE_THRESHOLD, AutoDimValidation
from autorecbench.validate.autofis import AutoFISValidation, kept_f1, same_mlp
from autorecbench.validate.autoloss import AutoLossValidation, relative_weights
from autorecbench.validate.base import MethodValidation, load_validations
from autorecbench.validate.offline_cases import ordered_share, rank_share, run_method


def test_the_three_offline_validations_are_registered() -> None:
    found = load_validations()
    assert {"autodim", "autofis", "autoloss"} <= set(found)
    assert found["autodim"] is AutoDimValidation and found["autoloss"] is AutoLossValidation


def test_rank_statistics_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.integers(0, 4, size=int(rng.integers(2, 25))).astype(float)
        positive = rng.random(len(scores)) < 0.4
        if positive.all() or not positive.any():
            continue
        pairs = [(1.0 if h > l else 0.5 if h == l else 0.0)
                 for h, l in itertools.product(scores[positive], scores[~positive])]
        assert ordered_share(list(scores[positive]), list(scores[~positive])) == pytest.approx(np.mean(pairs))
        assert rank_share(torch.tensor(scores), torch.tensor(positive)) == pytest.approx(np.mean(pairs))
    assert ordered_share([3, 3], [3]) == 0.5 and np.isnan(ordered_share([], [1]))
    alpha, positive = torch.tensor([0.5, 0.0, -0.2, 0.0]), torch.tensor([True, True, False, False])
    assert kept_f1(alpha, positive) == pytest.approx(2 * 0.5 * 0.5 / 1.0)  # precision 1/2, recall 1/2
    assert kept_f1(torch.zeros(4), positive) == 0.0


def test_a_random_architecture_rarely_clears_the_autodim_threshold() -> None:
    """The null draws a uniform candidate per field; over 5 informative × 5 noise fields its share has mean 0.5
    and clears the 0.9 threshold in 1.5% of draws (0.8: 6% — the 25 pairs share 10 draws); the mean over 3 seeds
    clears 0.8 in 0.2% (the slow test's margin)."""
    rng = np.random.default_rng(1)
    draws = rng.integers(0, 6, size=(60_000, 10))
    high, low = draws[:, :5, None], draws[:, None, 5:]
    shares = ((high > low) + 0.5 * (high == low)).mean(axis=(1, 2))
    assert abs(shares.mean() - 0.5) < 0.005 and 0.01 < (shares >= SHARE_THRESHOLD).mean() < 0.02
    assert 0.05 < (shares >= 0.8).mean() < 0.07 and (shares.reshape(-1, 3).mean(1) >= 0.8).mean() < 0.004


def test_relative_weights_of_fixed_losses_and_of_a_controller(tmp_path: Path) -> None:
    """r = |Σ_i E[p_i] ∂ℓ_i/∂s| / |∂CE/∂s|: exactly 1 for fixed CE, 2 p_y for fixed hinge (2(1 - p_y)), and for a
    controller its α-weighted per-row gradient, checked against autograd row by row."""
    validation = TinyAutoLoss()
    data = validation.case_data("planted", 0, True)
    split = data.data.train
    for variant in ("ce", "hinge", "autoloss"):
        run = run_method(data, "autoloss", "deepfm", ["runner.epochs=1", "runner.batch_size=500",
                                                     f"method.variant={variant}"], seed=0)
        method = run.method
        assert isinstance(method, AutoLoss)
        r = relative_weights(method, split, batch_size=700)
        method.module().eval()
        with torch.no_grad():
            logits = method.module()(split.x)
        p_y = torch.where(split.label == 1, torch.sigmoid(logits[:, 0]), 1 - torch.sigmoid(logits[:, 0]))
        if variant == "ce":
            assert torch.allclose(r, torch.ones_like(r), atol=1e-5)
        elif variant == "hinge":
            assert torch.allclose(r, 2 * p_y, atol=1e-4)
        else:
            method.weigher.eval()
            for row in range(0, len(split), 97):  # brute force: one row at a time
                s = logits[row:row + 1].clone().requires_grad_(True)
                y = split.label[row:row + 1]
                alpha = method.expected_weights(s.detach(), y)
                loss = (candidate_losses(method.ctx.task, s, y, method.names, method.options) * alpha).sum()
                (g,) = torch.autograd.grad(loss, s)
                ce_g = torch.sigmoid(s.detach()) - y
                assert float(r[row]) == pytest.approx(float((g / ce_g).abs()), rel=1e-4)


def test_autofis_fixed_baseline_gets_the_same_mlp() -> None:
    assert same_mlp("fm") == []
    assert same_mlp("deepfm") == ["model.hidden=[700,700,700,700,700]", "model.dropout=0.0",
                                  "model.batch_norm_affine=false"]


# ---------------------------------------------------------------- tiny files: the plumbing, end to end

class TinyAutoDim(AutoDimValidation):
    search_epochs = {True: 1, False: 1}

    def generator(self, case: str, seed: int, quick: bool) -> CTRGenerator:
        return replace(super().generator(case, seed, quick), rows=3000, cardinality_min=5, cardinality_max=10)

    def runner_overrides(self, quick: bool) -> list[str]:
        return ["runner.batch_size=500", "runner.epochs=1"]


class TinyAutoFIS(AutoFISValidation):
    def generator(self, case: str, seed: int, quick: bool) -> CTRGenerator:
        return replace(super().generator(case, seed, quick), rows=3000, n_fields=8, n_informative=4, n_pairs=2)

    def runner_overrides(self, quick: bool) -> list[str]:
        return ["runner.batch_size=500", "runner.epochs=1"]


class TinyAutoLoss(AutoLossValidation):
    def generator(self, case: str, seed: int, quick: bool) -> CTRGenerator:
        return replace(super().generator(case, seed, quick), rows=3000, n_fields=6, n_informative=4, n_pairs=1,
                       cardinality_max=20)

    def runner_overrides(self, quick: bool) -> list[str]:
        return ["runner.batch_size=500", "runner.epochs=1"]


def _discriminates(validation: MethodValidation, seeds: list[int], quick: bool, workdir: Path
                   ) -> list[tuple[str, str, int, str, float, bool]]:
    """Every reference statistic with an expectation: (case, subject, seed, statistic, value, as expected)."""
    out = []
    for case, subject, seed in itertools.product(validation.cases, ("oracle", "null"), seeds):
        started = time.perf_counter()
        stats = validation.measure(case, subject, seed, quick, workdir)
        print(f"{validation.method} {case:8s} {subject:6s} seed {seed}: "
              + ", ".join(f"{s.name} {s.value:.3f}" for s in stats) + f" ({time.perf_counter() - started:.0f}s)")
        for s in stats:
            expected = validation.expected(case, subject, s.name)
            if expected is not None:
                out.append((case, subject, seed, s.name, s.value, s.passed == expected))
    return out


@pytest.mark.parametrize("validation", [TinyAutoDim, TinyAutoFIS, TinyAutoLoss], ids=lambda c: c.method)
def test_references_run_end_to_end_on_a_tiny_file(tmp_path: Path, validation: type[MethodValidation]) -> None:
    rows = _discriminates(validation(), [0], True, tmp_path)
    assert rows and all(ok for *_, ok in rows), [r for r in rows if not r[-1]]


def test_a_method_subject_runs_on_a_tiny_file(tmp_path: Path) -> None:
    stats = TinyAutoDim().measure("planted", "method", 0, True, tmp_path)
    assert [s.name for s in stats] == ["noise_smaller_share", "auc_minus_fixed", "bytes_vs_fixed"]
    assert 0 <= stats[0].value <= 1 and stats[2].value > 0


# ---------------------------------------------------------------- the quick budget, 2 seeds

@pytest.mark.slow
@pytest.mark.parametrize("validation", [AutoDimValidation, AutoFISValidation, AutoLossValidation],
                         ids=lambda c: c.method)
def test_references_discriminate_on_two_seeds_at_the_quick_budget(tmp_path: Path,
                                                                   validation: type[MethodValidation]) -> None:
    started = time.perf_counter()
    rows = _discriminates(validation(), [0, 1], True, tmp_path)
    print(f"{validation.method}: references on 2 cases x 2 seeds in {time.perf_counter() - started:.0f}s")
    assert rows and all(ok for *_, ok in rows), [r for r in rows if not r[-1]]
