"""End to end through the CLI, in subprocesses, as a user would type it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from conftest import REPO, one_line_error, read_run, run_cli, run_folders

ML100K = ["data.path=" + str(REPO / "data" / "raw" / "ml-100k")]


def test_default_run_writes_a_complete_folder(home: Path, ml100k_dir: Path) -> None:
    done = run_cli("run", "runner.max_rows=20000", *ML100K, home=home, check=True)
    folders = run_folders(home)
    assert len(folders) == 1
    folder = folders[0]
    assert f"results: {folder.relative_to(home)}" in done.stdout or str(folder) in done.stdout
    assert folder.name.endswith("_ml-100k_binary_fixed_s0")
    assert {p.name for p in folder.iterdir()} == {
        "config.yaml", "run.json", "metrics.parquet", "curve.parquet", "buckets.parquet", "architecture.json"}
    info = read_run(folder)
    assert info["status"] == "complete" and info["seed"] == 0 and info["method"] == "fixed"
    for key in ("git", "versions", "hardware", "wall_seconds", "stream", "memory", "config_hash"):
        assert key in info
    assert info["versions"]["torch"] and info["hardware"]["cpu_count"]
    assert info["stream"]["eval_window"] == {"rule": "last_fraction", "start": 16000, "end": 20000,
                                             "eval_last": 5000000, "eval_fraction": 0.2, "n": 4000}
    assert info["data"]["n_rows"] == 100_000 and info["stream"]["n_rows"] == 20_000
    assert info["memory"]["embedding_bytes"] == (943 + 1682) * 128 * 4
    metrics = pl.read_parquet(folder / "metrics.parquet")
    assert metrics.columns == ["run_id", "dataset", "task", "method", "seed", "model", "split", "metric", "value"]
    evals = dict(metrics.filter(pl.col("split") == "eval").select("metric", "value").iter_rows())
    assert set(evals) == {"accuracy", "mse", "logloss", "auc", "n"} and evals["n"] == 4000
    assert 0.4 < evals["accuracy"] < 0.9 and 0.0 < evals["mse"] < 0.5
    curve = pl.read_parquet(folder / "curve.parquet")
    assert curve["window"].n_unique() == 2  # 40 batches, 20 per window
    buckets = pl.read_parquet(folder / "buckets.parquet")
    assert set(buckets["entity"].unique()) == {"user", "item"}
    assert buckets.filter(pl.col("metric") == "accuracy").group_by("entity").agg(pl.col("n").sum())["n"].to_list() == [4000, 4000]
    _readable_by_pandas_and_duckdb(folder)


def _readable_by_pandas_and_duckdb(folder: Path) -> None:
    """The README promises the tables read with pandas and duckdb too (both are dev dependencies)."""
    import duckdb
    import pandas as pd

    for table in ("metrics", "curve", "buckets"):
        path = folder / f"{table}.parquet"
        height = pl.read_parquet(path).height
        assert len(pd.read_parquet(path)) == height
        assert duckdb.sql(f"select count(*) from read_parquet('{path}')").fetchall()[0][0] == height


def test_same_seed_twice_gives_identical_metrics(home: Path, ml_latest_small_dir: Path) -> None:
    args = ["run", "data=ml-latest-small", f"data.path={ml_latest_small_dir}", "task=multiclass", "seed=3",
            "method.embedding_dim=64", "runner.max_rows=15000", "-q"]
    run_cli(*args, home=home, check=True)
    run_cli(*args, home=home, check=True)
    a, b = run_folders(home)
    assert a.name != b.name  # never overwritten
    for table in ("metrics", "curve", "buckets"):
        fa, fb = pl.read_parquet(a / f"{table}.parquet"), pl.read_parquet(b / f"{table}.parquet")
        if table == "metrics":
            fa, fb = (f.filter(pl.col("split") != "cost") for f in (fa, fb))
        assert fa.drop("run_id").equals(fb.drop("run_id")), table
    info = read_run(a)
    assert info["task"] == "multiclass" and info["seed"] == 3
    assert info["memory"]["dims"]["user"] == {"64": 610}
    assert info["data"]["n_rows"] == 100_836 and info["data"]["n_items"] == 9_724
    assert "method.embedding_dim=64" in info["variant"]


def test_multirun_sweep_and_compare(home: Path, ml100k_dir: Path) -> None:
    run_cli("run", "-m", "seed=0,1", "method.embedding_dim=8,16", "runner.max_rows=3000", *ML100K, "-q",
            home=home, check=True)
    folders = run_folders(home)
    assert len(folders) == 4
    assert sorted((read_run(f)["seed"], read_run(f)["variant"]) for f in folders) == [
        (0, "method.embedding_dim=16 runner.max_rows=3000"), (0, "method.embedding_dim=8 runner.max_rows=3000"),
        (1, "method.embedding_dim=16 runner.max_rows=3000"), (1, "method.embedding_dim=8 runner.max_rows=3000")]
    done = run_cli("compare", "results/", "--format", "json", home=home, check=True)
    payload = json.loads(done.stdout)
    assert payload["runs"] == 4 and len(payload["groups"]) == 2
    group = next(g for g in payload["groups"] if g["variant"] == "method.embedding_dim=8 runner.max_rows=3000")
    accs = [read_run(f)["metrics"]["accuracy"] for f in folders if read_run(f)["variant"] == group["variant"]]
    assert group["n"] == 2 and group["seeds"] == [0, 1]
    assert group["accuracy_mean"] == pytest.approx(sum(accs) / 2)
    table = run_cli("compare", str(home / "results"), home=home, check=True).stdout
    assert "ml-100k" in table and "fixed" in table and "method.embedding_dim=8" in table and "±" in table
    # What every row shares is printed once under the table, not in each row's variant.
    assert table.count("runner.max_rows=3000") == 1 and "every row: runner.max_rows=3000" in table
    md = run_cli("compare", str(home / "results"), "-f", "markdown", home=home, check=True).stdout
    rows = [line for line in md.splitlines() if line.startswith("| ml-100k")]
    assert len(rows) == 2 and not any("max_rows" in r for r in rows) and "Every row: runner.max_rows=3000" in md


def test_joblib_launcher(home: Path, ml100k_dir: Path) -> None:
    run_cli("run", "-m", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "runner.max_rows=2000",
            *ML100K, "-q", home=home, check=True)
    assert len(run_folders(home)) == 2


def test_compare_baseline_formats_and_incomplete_runs(home: Path, ml100k_dir: Path) -> None:
    run_cli("run", "-m", "seed=0,1,2", "method.embedding_dim=8,32", "runner.max_rows=3000", *ML100K, "-q",
            home=home, check=True)
    # A failed run and an interrupted one: listed apart, never averaged.
    failed = home / "results" / "20990101-000000_ml-100k_binary_fixed_s9.partial"
    failed.mkdir()
    (failed / "run.json").write_text(json.dumps({"status": "failed", "error": "RunFailed: diverged"}))
    (home / "results" / "20990101-000001_ml-100k_binary_fixed_s8.partial").mkdir()
    # The baseline row for a fixed variant is the fixed run whose overrides are a subset of its own.
    run_cli("run", "-m", "seed=0,1,2", "runner.max_rows=3000", *ML100K, "-q", home=home, check=True)
    done = run_cli("compare", "results", "--baseline", "fixed", "--format", "json", home=home, check=True)
    payload = json.loads(done.stdout)
    assert payload["runs"] == 9
    assert sorted(r["status"] for r in payload["incomplete"]) == ["failed", "missing-run-json"]
    small = next(g for g in payload["groups"] if g["variant"] == "method.embedding_dim=8 runner.max_rows=3000")
    base = next(g for g in payload["groups"] if g["variant"] == "runner.max_rows=3000")
    assert small["accuracy_delta"] == pytest.approx(small["accuracy_mean"] - base["accuracy_mean"])
    assert small["accuracy_test"] == "paired" and 0 <= small["accuracy_p"] <= 1
    md = run_cli("compare", "results", "--baseline", "fixed", "--format", "markdown", home=home, check=True).stdout
    assert md.splitlines()[0].startswith("| dataset") and "Δ accuracy" in md and "failed" in md
    csv = run_cli("compare", "results", "--format", "csv", home=home, check=True).stdout
    assert csv.splitlines()[0].startswith("status,dataset,task,model,method,variant,tuning,n,seeds")
    # Three groups, then the two runs left out of the means, each with its status (not dropped).
    assert [line.split(",")[0] for line in csv.strip().splitlines()[1:]] == [
        "complete", "complete", "complete", "failed", "missing-run-json"]
    tex = run_cli("compare", "results", "--format", "latex", "-o", "table.tex", home=home, check=True)
    assert "\\toprule" in (home / "table.tex").read_text() and tex.stdout == ""
    rich_out = run_cli("compare", "results", home=home, check=True).stdout
    assert "Incomplete, failed or unreadable runs" in rich_out and "s9.partial" in rich_out


def test_compare_without_results(home: Path) -> None:
    line = one_line_error(run_cli("compare", "results/", home=home))
    assert "no runs found" in line
    (home / "results" / "x.partial").mkdir(parents=True)
    done = run_cli("compare", "results/", home=home)
    assert done.returncode == 2 and "no complete runs" in done.stderr


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing on disk

def _assert_nothing_written(home: Path) -> None:
    assert not (home / "results").exists() or list((home / "results").iterdir()) == []
    processed = home / "data" / "processed"
    assert not processed.exists() or list(processed.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,2,3.0,4,9\n", "ratings.csv:3: expected 4"),
        ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,two,3.0,4\n", "ratings.csv:3: item id is not an integer"),
        ("userId,movieId,rating,timestamp\n1,2,7.0,4\n", "ratings.csv:2: rating out of range"),
        ("user,movie,rating,time\n1,2,3.0,4\n", "ratings.csv:1: expected header"),
        ("", "ratings.csv: empty file"),
    ],
)
def test_malformed_data_exit_2_nothing_written(home: Path, content: str, fragment: str) -> None:
    raw = home / "rawdata"
    raw.mkdir()
    (raw / "ratings.csv").write_text(content)
    line = one_line_error(run_cli("run", "data=ml-latest-small", f"data.path={raw}", home=home))
    assert fragment in line
    _assert_nothing_written(home)


def test_truncated_gzip_exit_2(home: Path, ml_latest_small_dir: Path) -> None:
    import gzip

    raw = home / "rawdata"
    raw.mkdir()
    data = gzip.compress((ml_latest_small_dir / "ratings.csv").read_bytes())
    (raw / "ratings.csv.gz").write_bytes(data[:-100])
    line = one_line_error(run_cli("run", "data=ml-latest-small", f"data.path={raw}", home=home))
    assert "ratings.csv.gz: truncated gzip" in line
    _assert_nothing_written(home)


def test_missing_dataset_says_where_to_get_it(home: Path) -> None:
    line = one_line_error(run_cli("run", "data=ml-20m", home=home))
    assert "ratings.csv not found in" in line and "ml-20m.zip" in line
    _assert_nothing_written(home)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["method=nope"], "method"),
        (["data=nope"], "data"),
        (["task=ternary"], "unknown task"),
        (["method.no_such_key=1"], "no_such_key"),
        (["seed=0,1"], "add -m"),
        (["seed"], "key=value"),
        (["runner.order=sideways"], "runner.order"),
        (["runner.batch_size=1"], "batch_size"),
        (["method.embedding_optimizer=fancy"], "embedding_optimizer"),
    ],
)
def test_bad_overrides_exit_2(home: Path, args: list[str], fragment: str, ml100k_dir: Path) -> None:
    line = one_line_error(run_cli("run", *args, *ML100K, home=home))
    assert fragment in line
    _assert_nothing_written(home)


def test_bad_sweep_combination_stops_before_any_run(home: Path, ml100k_dir: Path) -> None:
    line = one_line_error(run_cli("run", "-m", "task=binary,ternary", "runner.max_rows=2000", *ML100K, home=home))
    assert "ternary" in line
    _assert_nothing_written(home)


# ---------------------------------------------------------------- data, methods, help

def test_data_commands(home: Path, ml_latest_small_dir: Path) -> None:
    listing = run_cli("data", "list", home=home, check=True).stdout
    for name in ("ml-100k", "ml-1m", "ml-20m", "ml-latest", "ml-latest-small", "synthetic"):
        assert name in listing
    assert "missing" in listing
    args = ["data", "prepare", "ml-latest-small", f"data.path={ml_latest_small_dir}"]
    first = run_cli(*args, home=home, check=True).stdout
    assert "100,836 rows, 610 users, 9,724 items" in first and "cache built" in first
    assert "1996-03-29 .. 2018-09-24" in first
    assert "cache reused" in run_cli(*args, home=home, check=True).stdout
    rebuilt = run_cli(*args, "data.min_user_count=50", home=home, check=True).stdout
    assert "cache built" in rebuilt
    assert len(list((home / "data" / "processed").iterdir())) == 2
    info = run_cli("data", "info", "ml-latest-small", f"data.path={ml_latest_small_dir}", home=home, check=True).stdout
    assert "rows: 100,836" in info and "sha256" in info and "4: 26,818" in info
    synth = run_cli("data", "prepare", "synthetic", "data.generator.n_interactions=5000", home=home, check=True).stdout
    assert "5,000 rows" in synth
    assert "unknown dataset" in one_line_error(run_cli("data", "prepare", "nope", home=home))


def test_methods_lists_fixed() -> None:
    out = run_cli("methods", check=True).stdout
    assert "fixed" in out and "streaming" in out and "faithful" in out


@pytest.mark.parametrize("command", [[], ["run"], ["compare"], ["methods"], ["data"], ["data", "list"],
                                     ["data", "prepare"], ["data", "info"], ["data", "fetch"], ["validate"]])
def test_help_everywhere(command: list[str]) -> None:
    done = run_cli(*command, "--help", check=True)
    assert "Usage" in done.stdout and len(done.stdout) > 200


def test_show_config(home: Path) -> None:
    out = run_cli("run", "--show-config", "method.embedding_dim=7", home=home, check=True).stdout
    assert "embedding_dim: 7" in out and "batch_size: 500" in out
    _assert_nothing_written(home)


def test_smoke_experiment(home: Path, ml100k_dir: Path) -> None:
    run_cli("run", "experiment=smoke", *ML100K, "-q", home=home, check=True)
    (folder,) = run_folders(home)
    assert read_run(folder)["stream"]["n_rows"] == 20_000
    shutil.rmtree(folder)
