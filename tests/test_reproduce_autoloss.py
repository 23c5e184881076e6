"""`make reproduce-autoloss-table2`: the small-data variant runs the whole grid and prints it beside the
paper's numbers; other papers' methods are marked, not faked; missing raw data stops before any run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from autorecbench.reproduce.autoloss_table2 import TABLE2, TABLE3, load_reference
from conftest import REPO, one_line_error, read_run, run_cli, run_folders


def run_module(*args: str, home: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AUTORECBENCH_HOME=str(home), COLUMNS="250",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-m", "autorecbench.reproduce.autoloss_table2", *args], capture_output=True,
                          text=True, env=env, cwd=home, timeout=timeout)


def test_reference_file_holds_tables_2_and_3() -> None:
    ref = load_reference()
    assert "KDD 2021" in ref["source"] and ref["table2"]["columns"] == list(TABLE2)
    assert ref["table3"]["columns"] == list(TABLE3)
    for dataset in ("criteo", "ml-20m"):
        for model in ("deepfm", "ipnn"):
            cell = ref["table2"][dataset][model]
            assert len(cell["auc"]) == len(cell["logloss"]) == 9
            assert cell["auc"][-1] == max(cell["auc"]) and cell["logloss"][-1] == min(cell["logloss"])  # AutoLoss best
    assert ref["table2"]["criteo"]["deepfm"]["auc"][-1] == 0.8092 and ref["table3"]["criteo"]["ipnn"]["auc"][0] == 0.8081


def test_small_grid_beside_the_paper(home: Path) -> None:
    done = run_module("--small", "--format", "markdown", "--output", str(home / "table2.md"), home=home)
    assert done.returncode == 0, done.stderr
    lines = [line for line in (home / "table2.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["dataset", "model", "metric", "source", *TABLE2, "AL-1", "AL-2"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    assert len(rows) == 2 * 2 * 2 * 2  # datasets x models x metrics x (paper, ours)
    for row in rows:
        cells = dict(zip(header, row))
        if cells["source"] == "paper":
            continue
        for column in TABLE2:
            if TABLE2[column] is None:
                assert cells[column] == "not implemented"
            else:
                value = float(cells[column])
                assert 0 < value < (1 if cells["metric"].startswith("AUC") else 5)
        ablation = cells["dataset"].startswith("criteo")
        assert (cells["AL-1"] != "–") == ablation and (cells["AL-2"] != "–") == ablation
    paper = {(r[0], r[1], r[2]): r for r in rows if r[3] == "paper"}
    assert paper[("criteo (synthetic stand-in)", "deepfm", "AUC ↑")][4:] == [
        "0.8046", "0.8042", "0.8049", "0.8056", "0.8063", "0.8065", "0.8067", "0.8081", "0.8092", "0.8052", "0.8083"]
    assert paper[("ml-20m (synthetic stand-in)", "ipnn", "Logloss ↓")][12] == "1.2236"
    folders = run_folders(home)
    assert len(folders) == 2 * 2 * 6 + 2 * 2  # six implemented Table-2 columns everywhere, AL-1/AL-2 on Criteo
    infos = [read_run(f) for f in folders]
    assert all(i["status"] == "complete" and i["method"] == "autoloss" for i in infos)
    assert {i["task"] for i in infos} == {"binary", "multiclass"} and {i["model"] for i in infos} == {"deepfm", "ipnn"}
    assert "not comparable" in done.stdout
    notes = (home / "table2.md").read_text()  # says which KL the KL column is, and the baseline
    assert "KL: KL(y_ε ‖ ŷ) against a label-smoothed target" in notes and "ε = 0.1" in notes
    assert "ξ = 0.001" in notes and "CE is FIXED on it" in notes


def test_missing_raw_data_stops_with_instructions(home: Path) -> None:
    line = one_line_error(run_module(home=home))
    assert "raw data missing, nothing run" in line and "criteo" in line and "ml-20m.zip" in line
    assert not (home / "results").exists()
    line = one_line_error(run_module("--data", "avazu", home=home))
    assert "unknown or no datasets/models" in line


def test_the_cli_subcommand_is_the_same_command(home: Path) -> None:
    """`autorecbench reproduce autoloss-table2` (what the Makefile calls) checks raw data the same way."""
    line = one_line_error(run_cli("reproduce", "autoloss-table2", "--data", "ml-20m", home=home))
    assert "raw data missing, nothing run" in line and "ml-20m.zip" in line
    assert not (home / "results").exists()
