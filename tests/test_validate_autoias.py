"""AutoIAS' planted-truth validation (``validate/autoias.py``): its statistics against hand-made architectures, the
oracle read from the truth, what the references are expected to do, and (slow) a measurement of every subject."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from autorecbench.methods.autoias import AutoIASSpace
from autorecbench.validate.autoias import AutoIASValidation, chance_band, oracle_architecture, structure_statistics
from autorecbench.validate.base import VALIDATIONS, load_validations

FIELDS = ["a", "b", "c", "d"]
TRUTH = {"informative_fields": ["a", "b"], "noise_fields": ["c", "d"], "planted_pairs": [["a", "b"]]}


class _Runs:
    def space(self) -> AutoIASSpace:
        return AutoIASSpace(FIELDS, [2, 4, 8], [16, 32], 2)


def test_the_oracle_is_read_from_the_truth_and_passes_the_structure_checks() -> None:
    arch = oracle_architecture(TRUTH, _Runs())
    assert arch["selected_pairs"] == [["a", "b"]] and arch["pair_functions"] == ["product"]
    assert arch["selected_fields"] == ["a", "b"] and arch["embedding_dim"] == {"a": 8, "b": 8, "c": 2, "d": 2}
    assert arch["used_fields"] == ["a", "b"] and arch["hidden"] == [32, 32]
    stats = structure_statistics({**arch, "p_select_pairs": {"a|b": 1.0, "a|c": 0.0, "a|d": 0.0, "b|c": 0.0,
                                                              "b|d": 0.0, "c|d": 0.0}}, TRUTH, FIELDS)
    assert stats == {"planted_pairs_kept": 1.0, "noise_pairs_kept_share": 0.0, "informative_minus_noise_size": 6.0,
                     "informative_minus_noise_used_size": 8.0, "p_select_planted_min": 1.0, "p_select_noise_mean": 0.0}
    # Control: everything selected at equal sizes keeps the planted pair, all noise pairs, no size gap.
    space = _Runs().space()
    flat = space.describe(space.space.constant({"embedding_dim": 4, "projection_dim": 4, "function": "plus",
                                                "selected": True, "layer": 0, "hidden": 16}))
    stats = structure_statistics({**flat, "p_select_pairs": None}, TRUTH, FIELDS)
    assert stats["noise_pairs_kept_share"] == 1.0 and stats["informative_minus_noise_size"] == 0.0
    assert "p_select_planted_min" not in stats


def test_the_references_are_expected_to_discriminate() -> None:
    v = AutoIASValidation()
    assert v.expected("planted", "oracle", "planted_pairs_kept") is True
    assert v.expected("planted", "null", "auc_lift_over_random") is False
    assert v.expected("planted", "method", "p_select_planted_min") is None  # the finding
    assert v.expected("control", "null", "auc_lift_over_random") is False  # 0 by construction
    assert v.expected("control", "oracle", "auc_lift_over_random") is None  # no signal: a coin flip
    assert v.expected("control", "null", "auc_distance_from_half") is True
    assert v.expected("control", "oracle", "planted_pairs_kept") is None  # the oracle copies the truth anyway
    assert v.expected("planted", "oracle", "kd_probe_logloss_gain") is None
    load_validations()
    assert VALIDATIONS["autoias"] is AutoIASValidation and AutoIASValidation.cases == ("planted", "control")
    planted, control = (v.data_overrides(case, 3, True) for case in ("planted", "control"))
    assert "data.generator.seed=3" in planted and "data.generator.n_pairs=3" in planted
    assert set(control) - set(planted) == {"data.generator.linear_std=0", "data.generator.pair_strength=0"}


@pytest.mark.slow
def test_measure_every_subject_on_the_planted_file(tmp_path: Path) -> None:
    v = AutoIASValidation()
    results = {subject: {s.name: s for s in v.measure("planted", subject, 0, True, tmp_path)}
               for subject in ("oracle", "null", "method")}
    for subject in ("oracle", "null"):
        for name, stat in results[subject].items():
            want = v.expected("planted", subject, name)
            if want is not None:
                assert stat.passed == want, (subject, stat)
    method = results["method"]
    assert "kd_probe_logloss_gain" in method and all(math.isfinite(s.value) for s in method.values())


def test_the_chance_band_follows_the_test_split() -> None:
    assert chance_band(torch.tensor([1.0] * 1000 + [0.0] * 3000)) == pytest.approx(0.0211, abs=1e-4)
    assert chance_band(torch.tensor([1.0] * 25_000 + [0.0] * 75_000)) == 0.01  # large splits: the 0.01
    assert chance_band(torch.ones(10)) == 0.01
