"""CTR end to end through the CLI: planted interactions need a model with interactions, no signal gives
AUC 0.5, in both raw formats; compare lines CTR runs up; bad input stops with one line."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from conftest import REPO, one_line_error, read_run, run_cli, run_folders

# Small enough for CPU tests, strong enough that the planted pairs dominate: 12 active fields (6 informative,
# 3 planted pairs), 4-20 values per field, 30,000 rows (24,000 train / 3,000 valid / 3,000 test).
PLANTED = ["data.generator.rows=30000", "data.generator.n_fields=12", "data.generator.n_informative=6",
           "data.generator.n_pairs=3", "data.generator.cardinality_min=4", "data.generator.cardinality_max=20"]
NO_SIGNAL = [*PLANTED, "data.generator.linear_std=0", "data.generator.pair_strength=0"]


def test_auc(folder: Path) -> float:
    metrics = pl.read_parquet(folder / "metrics.parquet")
    return float(metrics.filter((pl.col("split") == "test") & (pl.col("metric") == "auc"))["value"][0])


test_auc.__test__ = False  # type: ignore[attr-defined]  (a helper, not a test)


@pytest.mark.parametrize("dataset", ["synthetic-criteo", "synthetic-avazu"])
def test_deepfm_beats_lr_on_planted_pairs_and_no_signal_is_chance(home: Path, dataset: str) -> None:
    run_cli("run", "-m", f"data={dataset}", "model=lr,deepfm", *PLANTED, "runner.epochs=15", "-q",
            home=home, check=True)
    run_cli("run", f"data={dataset}", "model=deepfm", *NO_SIGNAL, "runner.epochs=15", "-q", home=home, check=True)
    runs = {(read_run(f)["model"], "data.generator.linear_std=0" in read_run(f)["variant"]): f for f in run_folders(home)}
    lr, deepfm, flat = runs[("lr", False)], runs[("deepfm", False)], runs[("deepfm", True)]
    assert test_auc(deepfm) > test_auc(lr) + 0.05, (test_auc(deepfm), test_auc(lr))
    assert test_auc(deepfm) > 0.72
    assert abs(test_auc(flat) - 0.5) < 0.04, test_auc(flat)

    info = read_run(deepfm)
    assert deepfm.name.endswith(f"_{dataset}_binary_deepfm_fixed_s0")
    assert info["runner"] == "offline" and info["headline_split"] == "test" and info["model"] == "deepfm"
    assert info["split"]["rule"] == "random" and info["split"]["rows"] == {"train": 24000, "valid": 3000, "test": 3000}
    fit = info["offline"]["fit"]
    assert 1 <= fit["best_epoch"] <= fit["epochs_run"] <= 15 and fit["samples_per_second"] > 0
    assert info["offline"]["searched"] is False and info["memory"]["embedding_bytes"] > 0
    assert {p.name for p in deepfm.iterdir()} == {"config.yaml", "run.json", "metrics.parquet", "epochs.parquet",
                                                  "architecture.json"}
    epochs = pl.read_parquet(deepfm / "epochs.parquet")
    assert epochs.columns[:6] == ["run_id", "dataset", "task", "method", "seed", "model"]
    assert epochs.filter(pl.col("metric") == "auc")["evaluation"].to_list() == list(range(fit["evaluations"]))
    import duckdb

    assert duckdb.sql(f"select count(*) from read_parquet('{deepfm / 'metrics.parquet'}') where split = 'cost'"
                      ).fetchall()[0][0] >= 8

    # compare: dataset x model x method, with AUC, logloss, parameters, embedding bytes, search and train time.
    payload = json.loads(run_cli("compare", "results", "--format", "json", home=home, check=True).stdout)
    assert payload["metrics"] == ["auc", "logloss", "parameters", "embedding_bytes", "search_seconds", "train_seconds"]
    groups = {(g["model"], g["variant"]): g for g in payload["groups"]}
    assert {(g["dataset"], g["model"], g["method"]) for g in payload["groups"]} == {
        (dataset, "lr", "fixed"), (dataset, "deepfm", "fixed")}
    assert groups[("deepfm", " ".join(sorted([*PLANTED, "runner.epochs=15"])))]["auc_mean"] == pytest.approx(test_auc(deepfm))
    assert groups[("lr", " ".join(sorted([*PLANTED, "runner.epochs=15"])))]["embedding_bytes_mean"] == 0
    table = run_cli("compare", "results", "--format", "markdown", home=home, check=True).stdout
    header = table.splitlines()[0]
    for column in ("model", "auc", "logloss", "params", "emb MiB", "search s", "train s"):
        assert f" {column} " in header
    # capacity stays beside the metric whatever --metric selects, in every export
    csv_header = run_cli("compare", "results", "--metric", "auc", "--format", "csv", home=home,
                         check=True).stdout.splitlines()[0].split(",")
    assert {"auc_mean", "parameters_mean", "embedding_bytes_mean"} <= set(csv_header)


def test_movielens_offline_binary_with_gauc_and_multiclass(home: Path, ml100k_dir: Path) -> None:
    run_cli("run", "-m", "data=ml-100k", f"data.path={ml100k_dir}", "model=fm", "task=binary,multiclass",
            "runner.max_rows=20000", "runner.epochs=2", "-q", home=home, check=True)
    by_task = {read_run(f)["task"]: f for f in run_folders(home)}
    binary = pl.read_parquet(by_task["binary"] / "metrics.parquet").filter(pl.col("split") == "test")
    assert {"auc", "logloss", "gauc"} <= set(binary["metric"].to_list())
    multi = read_run(by_task["multiclass"])
    assert {"auc", "ce", "accuracy"} <= set(multi["metrics"]) and "gauc" not in multi["metrics"]
    assert multi["split"]["rows"] == {"train": 16000, "valid": 2000, "test": 2000}
    assert multi["data"]["n_users"] == 943


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def _nothing_written(home: Path) -> None:
    for sub in ("results", "data/processed"):
        folder = home / sub
        assert not folder.exists() or list(folder.iterdir()) == []


def _criteo_file(home: Path, bad_line: int | None) -> Path:
    raw = home / "rawdata"
    raw.mkdir(exist_ok=True)
    good = "\t".join(["1", *["3"] * 13, *["68fd1e64"] * 26])
    lines = [good] * 40
    if bad_line is not None:
        lines[bad_line - 1] = good.replace("\t3\t", "\t3.5\t", 1)
    (raw / "train.txt").write_text("\n".join(lines) + "\n")
    return raw


def test_malformed_criteo_row_exit_2_and_skip_bad_rows(home: Path) -> None:
    raw = _criteo_file(home, bad_line=5)
    line = one_line_error(run_cli("run", "data=criteo", f"data.path={raw}", home=home))
    assert "train.txt:5: I1 is not an integer: '3.5'" in line
    _nothing_written(home)
    done = run_cli("data", "prepare", "criteo", f"data.path={raw}", "--skip-bad-rows", home=home, check=True)
    assert "39 rows (train 31 / valid 4 / test 4" in done.stdout
    assert "skipped 1 malformed row(s); first:" in done.stdout and "train.txt:5:" in done.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["runner=streaming"], "model 'deepfm' runs with runner=offline"),
        (["runner=streaming", "model=rating_mlp"], "not a user-item rating stream"),
        (["task=multiclass"], "use task=binary"),
        (["model=rating_mlp", "runner=offline"], "model 'rating_mlp' runs with runner=streaming"),
        (["runner.monitor=f1"], "runner.monitor"),
        (["model.dropout=1.5"], "model.dropout"),
        (["data.min_count=0"], "min_count"),
    ],
)
def test_bad_ctr_combinations_exit_2(home: Path, args: list[str], fragment: str) -> None:
    raw = _criteo_file(home, bad_line=None)
    line = one_line_error(run_cli("run", "data=criteo", f"data.path={raw}", *args, home=home))
    assert fragment in line
    _nothing_written(home)


def test_missing_criteo_says_where_to_get_it(home: Path) -> None:
    line = one_line_error(run_cli("run", "data=criteo", home=home))
    assert "train.txt not found in" in line and "criteo" in line.lower()
    line = one_line_error(run_cli("run", "data=criteo-1tb", "data.days=[0,3]", home=home))
    assert "day_0, day_3 not found" in line


def test_methods_lists_both_fixed_protocols() -> None:
    out = run_cli("methods", check=True).stdout
    assert "streaming" in out and "offline" in out
