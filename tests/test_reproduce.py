"""`autorecbench reproduce table1`: the raw-file check, a smoke version of the grid, the paper's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from autorecbench.reproduce.esapn_table1 import METHODS, TASKS, grid_overrides, paper_values, table1_cells

from conftest import one_line_error, read_run, run_cli, run_folders


def test_missing_raw_files_stop_before_anything_runs(home: Path) -> None:
    line = one_line_error(run_cli("reproduce", "table1", home=home))
    for fragment in ("nothing was run", "ml-20m: put ratings.csv in", "ml-20m.zip",
                     "ml-latest: put ratings.csv in", "ml-latest.zip", str(home / "data" / "raw" / "ml-20m")):
        assert fragment in line, fragment
    assert not (home / "results").exists() and not (home / "data" / "processed").exists()
    # One present, one missing: still nothing runs, and only the missing one is named.
    raw = home / "data" / "raw" / "ml-20m"
    raw.mkdir(parents=True)
    (raw / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n")
    line = one_line_error(run_cli("reproduce", "table1", home=home))
    assert "ml-latest: put" in line and "ml-20m: put" not in line
    assert not (home / "results").exists()


def test_smoke_grid_on_ml_latest_small_prints_table1(home: Path, ml_latest_small_dir: Path) -> None:
    """`make reproduce-table1 DATA=ml-latest-small`, cut to a few batches per run."""
    done = run_cli("reproduce", "table1", "--data", "ml-latest-small", f"data.path={ml_latest_small_dir}",
                   "runner.max_rows=1500", "-q", home=home, check=True, timeout=900)
    assert [p.name for p in run_folders(home)] == ["table1"]  # experiment=table1 keeps its runs apart
    runs = sorted((home / "results" / "table1").iterdir())
    assert len(runs) == len(METHODS) * len(TASKS)
    assert {(read_run(r)["method"], read_run(r)["task"]) for r in runs} == {(m, t) for m in METHODS for t in TASKS}
    assert all(read_run(r)["stream"]["n_rows"] == 1500 for r in runs)
    out = done.stdout
    assert "Table 1, ml-latest-small" in out and "paper (ml-latest, stand-in)" in out
    for label in ("FIXED", "DARTS", "AutoEmb", "ESAPN"):
        assert label in out
    assert "72.88" in out and "1.1147" in out  # ml-latest's ESAPN row from the paper
    assert "difference to FIXED" in out
    assert "Table 2, ESAPN (binary)" in out  # entities per size, beside FIXED
    # The same table from the finished runs, without running anything; markdown too.
    shown = run_cli("reproduce", "table1", "--show", "results/table1", "--format", "markdown", home=home, check=True)
    assert "| ESAPN" in shown.stdout and "doi:10.1145/3397271.3401436" in shown.stdout
    assert len(sorted((home / "results" / "table1").iterdir())) == len(runs)


def test_paper_values_are_complete_and_consistent() -> None:
    """Every cell of Table 1 is there; Table 2's counts add up to its totals (catches transcription slips)."""
    paper = paper_values()
    assert "10.1145/3397271.3401436" in paper["source"]
    for dataset in ("ml-20m", "ml-latest"):
        for task, loss in (("binary", "mse"), ("multiclass", "ce")):
            for method in METHODS:
                cell = paper["table1"][dataset][task][method]
                assert 40 < cell["accuracy"] < 80 and 0.1 < cell[loss] < 1.2
        for entity in ("user", "item"):
            row = paper["table2"][dataset][entity]
            dims = sum(c * d for c, d in zip(row["counts"], paper["table2"]["sizes"]))
            assert dims == row["total_dims"] and sum(row["counts"]) * 128 == row["fixed"]
            assert row["ratio"] == pytest.approx(100 * dims / row["fixed"], abs=0.01)


def test_table1_cells_put_ours_beside_the_papers() -> None:
    rows = [{"dataset": "ml-20m", "task": "binary", "method": "esapn", "n": 2, "variant": "",
             "accuracy_mean": 0.73, "accuracy_std": 0.001, "mse_mean": 0.18, "mse_std": None}]
    cells = table1_cells(rows, paper_values())["ml-20m"]
    acc = cells["binary", "esapn", "accuracy"]
    assert acc.ours == pytest.approx(73.0) and acc.paper == 72.98 and acc.std == pytest.approx(0.1) and acc.n == 2
    assert cells["binary", "esapn", "mse"].paper == 0.1785
    assert cells["multiclass", "fixed", "ce"].ours is None and cells["multiclass", "fixed", "ce"].paper == 1.1517


def test_grid_is_the_papers_sixteen_runs_per_seed() -> None:
    overrides = grid_overrides(["ml-20m", "ml-latest"], [0], [])
    from autorecbench.config import expand_sweep

    combos = expand_sweep(overrides)
    assert len(combos) == 16 and all("experiment=table1" in c for c in combos)
