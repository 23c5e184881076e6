"""The synthetic CTR generator: real-format files whose planted truth survives the loaders exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from autorecbench.data.cache import DatasetConfig, PreparedData, prepare
from autorecbench.data.ctr import MISSING, OOV, block_paths
from autorecbench.data.synthetic_ctr import CTRGenerator, generate_ctr
from autorecbench.errors import UserError

SMALL = {"rows": 4000, "n_fields": 10, "n_informative": 5, "n_pairs": 3, "cardinality_min": 3, "cardinality_max": 40}


def _prepare(tmp_path: Path, kind: str, **spec: object) -> tuple[PreparedData, Path]:
    options = {**SMALL, **spec}
    cfg = DatasetConfig.from_mapping({
        "name": f"synthetic-{kind}", "family": kind, "path": str(tmp_path / "raw"),
        "processed_dir": str(tmp_path / "processed"),
        "sources": [{"file": "train.txt" if kind == "criteo" else "train.csv",
                     "format": "criteo_tsv" if kind == "criteo" else "avazu_csv"}],
        "generator": {"kind": kind, **options},
    })
    prepared = prepare(cfg)
    return prepared, cfg.raw_dir()


def _recomputed_click_probability(prepared: PreparedData, truth_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The planted click probability recomputed from the *cache's codes* (through the vocabularies and the
    truth's category tokens), for rows with no out-of-vocabulary active field; and those rows' indices."""
    truth = json.loads((truth_dir / "truth.json").read_text())
    arrays = np.load(truth_dir / "truth.npz")
    codes = pl.concat([pl.read_parquet(p) for p in block_paths(prepared.directory)])
    categories = {}
    keep = np.ones(codes.height, dtype=bool)
    for field in truth["active_fields"]:
        vocab = pl.read_parquet(prepared.directory / "vocab" / f"{field}.parquet")
        truth_tokens = {t: i for i, t in enumerate(arrays[f"tokens_{field}"].tolist())}
        lookup = np.full(vocab["code"].max() + 1, -1)
        for code, token in zip(vocab["code"].to_list(), vocab["token"].to_list()):
            if code == MISSING:
                lookup[code] = truth["cardinalities"][field]
            elif code != OOV:
                lookup[code] = truth_tokens[token]  # every kept token is a generator category
        cats = lookup[codes[field].to_numpy()]
        keep &= cats >= 0
        categories[field] = np.where(cats >= 0, cats, 0)
    logit = np.full(codes.height, truth["bias"])
    for field in truth["informative_fields"]:
        logit += arrays[f"linear_{field}"][categories[field]]
    for a, b in truth["planted_pairs"]:
        fa, fb = arrays[f"pairA_{a}__{b}"], arrays[f"pairB_{a}__{b}"]
        logit += truth["pair_scale"] * np.einsum("nr,nr->n", fa[categories[a]], fb[categories[b]])
    rows = np.flatnonzero(keep)
    return 1 / (1 + np.exp(-logit[rows])), rows


@pytest.mark.parametrize("kind", ["criteo", "avazu"])
def test_planted_truth_survives_the_loader(tmp_path: Path, kind: str) -> None:
    prepared, truth_dir = _prepare(tmp_path, kind)
    truth = json.loads((truth_dir / "truth.json").read_text())
    assert prepared.schema.n_rows == SMALL["rows"]
    recomputed, rows = _recomputed_click_probability(prepared, truth_dir)
    assert rows.size > 0.9 * SMALL["rows"]  # only unseen validation/test categories are OOV
    saved = np.load(truth_dir / "truth.npz")["p_click"]
    np.testing.assert_allclose(recomputed, saved[rows], atol=1e-5)
    # The labels are the file's clicks, and the structure is as asked.
    codes = pl.concat([pl.read_parquet(p) for p in block_paths(prepared.directory)])
    assert abs(codes["label"].mean() - truth["click_rate"]) < 1e-9 and abs(truth["click_rate"] - 0.25) < 0.03
    assert len(truth["active_fields"]) == 10 and len(truth["informative_fields"]) == 5
    assert sorted(truth["informative_fields"] + truth["noise_fields"]) == sorted(truth["active_fields"])
    assert len(truth["planted_pairs"]) == 3
    assert all(a in truth["informative_fields"] and b in truth["informative_fields"] for a, b in truth["planted_pairs"])
    inactive = [f for f in prepared.schema.field_names if f not in truth["active_fields"] and f not in ("hour", "weekday", "weekend")]
    for field in inactive:  # empty (Criteo) or one constant value (Avazu)
        assert codes[field].n_unique() == 1


def test_planted_pairs_have_no_first_order_effect() -> None:
    """Centred factors: averaged over a field's value distribution, a planted pair's factor is zero, so the
    pair shifts no category's click rate on its own (only the interaction carries signal)."""
    from autorecbench.data.synthetic_ctr import _build_fields, _click_model

    spec = CTRGenerator(**SMALL)
    rng = np.random.default_rng(spec.seed)
    _, fields = _build_fields(spec, "criteo", rng)
    model = _click_model(spec, fields, rng)
    assert len(model.factors) == 3
    for (i, j), (fa, fb) in model.factors.items():
        assert np.abs(fa).max() > 0.1 and np.abs(fb).max() > 0.1
        np.testing.assert_allclose(fields[i].category_frequencies(spec.missing_rate) @ fa, 0, atol=1e-12)
        np.testing.assert_allclose(fields[j].category_frequencies(spec.missing_rate) @ fb, 0, atol=1e-12)


def test_generator_is_deterministic_and_no_signal_is_flat(tmp_path: Path) -> None:
    spec = CTRGenerator(**{**SMALL, "rows": 600})
    a = generate_ctr("avazu", spec, tmp_path / "a")
    b = generate_ctr("avazu", spec, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    c = generate_ctr("avazu", CTRGenerator(**{**SMALL, "rows": 600, "seed": 1}), tmp_path / "c")
    assert c.read_bytes() != a.read_bytes()
    flat = generate_ctr("criteo", CTRGenerator(**{**SMALL, "rows": 600, "linear_std": 0.0, "pair_strength": 0.0}),
                        tmp_path / "d")
    p = np.load(flat.parent / "truth.npz")["p_click"]
    assert np.ptp(p) < 1e-6 and abs(p[0] - 0.25) < 1e-3
    lines = a.read_text().splitlines()
    assert lines[0].startswith("id,click,hour,C1,") and lines[1].split(",")[2] == "14102100"
    assert lines[-1].split(",")[2].startswith("141030")  # ten days, in time order


def test_generator_options_are_checked() -> None:
    with pytest.raises(UserError, match="n_pairs"):
        CTRGenerator(n_informative=3, n_pairs=4)
    with pytest.raises(UserError, match="cardinality"):
        CTRGenerator(cardinality_min=50, cardinality_max=10)
