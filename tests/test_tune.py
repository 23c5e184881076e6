"""``autorecbench tune``: trials of the method's declared space select on validation only (streaming: the rows
before the evaluation window), the best configuration is rerun with the final seeds, and the results carry the
budget ("tuned (N trials)" in ``compare``)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from conftest import ML100K_DIR, read_run, run_cli, run_folders

BASE = ["method=fixed", f"data.path={ML100K_DIR}", "runner.max_rows=5000", "-q"]


def test_tune_selects_on_validation_and_records_its_budget(home: Path, ml100k_dir: Path) -> None:
    run_cli("tune", *BASE, "--trials", "3", "--metric", "valid/auc", "--seeds", "0,1", home=home, check=True)
    (study,) = (home / "tune").iterdir()
    summary = json.loads((study / "tune.json").read_text())
    assert summary["trials"] == 3 and summary["metric"] == "valid/auc" and summary["direction"] == "maximize"
    assert set(summary["space"]) == {"method.lr", "method.embedding_dim"}  # model.dropout: not a rating_mlp option
    trials = pl.read_parquet(study / "trials.parquet")
    assert trials.height == 3 and (trials["status"] == "complete").all()
    # Validation only: every trial streamed the 4,000 rows before the evaluation window [4000, 5000) of the
    # final runs, and was scored on its own window (the last 20% of that prefix).
    for folder in (Path(p) for p in trials["path"].to_list()):
        stream = read_run(folder)["stream"]
        assert stream["n_rows"] == 4000 and stream["eval_window"]["start"] == 3200
        assert read_run(folder)["tuning"]["trial"] is True
    best = trials.sort("value", descending=True).row(0, named=True)
    assert summary["best"]["value"] == pytest.approx(best["value"])
    # The final runs: the best trial's values, the full stream, both seeds, the budget in run.json.
    finals = run_folders(home)
    assert sorted(read_run(f)["seed"] for f in finals) == [0, 1]
    for folder in finals:
        info = read_run(folder)
        assert info["stream"]["n_rows"] == 5000 and info["tuning"]["trials"] == 3
        assert f"method.lr={best['param.method.lr']}" in info["overrides"]
        assert f"method.embedding_dim={best['param.method.embedding_dim']}" in info["overrides"]
    from autorecbench.results.compare import compare, display_rows

    cmp = compare([str(home / "results")])
    (group,) = cmp.rows.to_dicts()
    assert group["tuning"] == "tuned (3 trials)" and group["n"] == 2
    header, (row,) = display_rows(cmp, [])
    assert row[header.index("method")] == "fixed, tuned (3 trials)"


def test_tune_refuses_test_selection_and_an_undeclared_space(home: Path, ml100k_dir: Path) -> None:
    from typer.testing import CliRunner

    from omegaconf import OmegaConf

    from autorecbench.cli.app import app
    from autorecbench.config import compose
    from autorecbench.errors import UserError
    from autorecbench.tune import search_space

    runner = CliRunner()
    for args, expected in ((["--metric", "test/auc"], "validation only"),
                           (["method.tune=null"], "declares no search space"),
                           (["method.lr=0.01"], "method.lr is in fixed's search space"),
                           (["seed=0,1"], "no comma sweeps")):
        done = runner.invoke(app, ["tune", *BASE, f"paths.root={home}", *args])
        assert isinstance(done.exception, UserError) and expected in str(done.exception), (args, done.exception)
    assert not (home / "tune").exists() and not (home / "results").exists()
    # A search space with a key that is no config value, or an expression the sweeper cannot read.
    cfg = compose(["method=fixed"])
    for block, expected in (({"method.nope": "choice(1,2)"}, "tune.method.nope: no such config value"),
                            ({"method.lr": "interval(1,"}, "is not a sweeper expression")):
        cfg.method.tune = OmegaConf.create(block)
        with pytest.raises(UserError, match=expected):
            search_space(cfg, [])
