"""`autorecbench reproduce autoias` and `autoias-ablations`: the paper's Table 1 held with each row's protocol, the
capacity match counted from real modules, missing raw data stopping before any run, and the `--small` grids
(slow)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from autorecbench.config import compose
from autorecbench.data.schema import FieldSpec, TaskSpec
from autorecbench.errors import UserError
from autorecbench.models.backbones import build_backbone
from autorecbench.reproduce.autoias_ablations import command as ablations_command
from autorecbench.reproduce.autoias_ablations import load_reference as ablation_reference
from autorecbench.reproduce.autoias_ablations import settings
from autorecbench.reproduce.autoias_table1 import PAPER_ONLY, ROWS, load_reference, matched_embedding_dim
from autorecbench.reproduce.autoias_table1 import command as table1_command
from conftest import run_cli


def test_reference_rows_and_their_protocols() -> None:
    ref = load_reference()
    rows = {r["model"]: r for r in ref["rows"]}
    assert len(rows) == 8 and "CIKM 2021" in ref["source"]
    assert rows["AutoIAS"]["overall"] == min(r["overall"] for r in rows.values())  # the paper's claim
    assert rows["AutoIAS"]["criteo"] == [0.8059, 0.5356, 3] and rows["AutoFeature(2)"]["avazu"][2] == 1
    kaggle = {m for m, r in rows.items() if r["criteo_protocol"] == "criteo-kaggle"}
    assert kaggle == {"AutoInt+", "AutoCTR"} and all(rows[m]["criteo"][1] < 0.45 for m in kaggle)
    assert all(r["criteo"][1] > 0.53 for m, r in rows.items() if m not in kaggle)  # the down-sampled Criteo-8d
    assert {m for m in rows if m not in ROWS} == {"PIN", "AutoInt+", "AutoCTR", "AutoFeature(2)"}
    groups = ablation_reference()["groups"]
    assert list(groups) == ["kd", "students", "generator", "reward_samples"]
    chosen = settings(list(groups))
    assert ("students", "N=13", ("method.students=13",)) in chosen and len(chosen) == 17


def test_capacity_match_is_counted_from_the_real_module() -> None:
    fields = [FieldSpec(f"f{i}", c) for i, c in enumerate([12, 40, 7, 300])]
    model_cfg = compose(["model=deepfm"]).model

    def params(dim: int) -> int:
        model_cfg.embedding_dim = dim
        return sum(p.numel() for p in build_backbone("deepfm", fields, TaskSpec.from_name("binary"),
                                                     model_cfg).parameters())

    assert params(9) - params(8) == params(2) - params(1)  # linear in the size
    assert matched_embedding_dim(fields, (params(7) + params(8)) / 2 + 1) == 8  # nearer to 8
    assert matched_embedding_dim(fields, params(3) - 1) == 3
    assert matched_embedding_dim(fields, 0) == 1


def test_missing_raw_data_stops_before_any_run(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process (``console.run_app`` turns every UserError into one line and exit code 2 for the whole CLI)."""
    monkeypatch.chdir(home)
    monkeypatch.setenv("AUTORECBENCH_HOME", str(home))
    with pytest.raises(UserError) as error:
        table1_command(small=False, data="avazu,criteo", seeds="0", fmt="table", output=None, extra=None)
    line = str(error.value)
    assert "raw data missing, nothing run" in line and "day_7" in line and "train" in line and "--small" in line
    with pytest.raises(UserError, match="--groups"):
        ablations_command(groups="nope")
    with pytest.raises(UserError, match="raw data missing"):
        ablations_command(data="criteo", groups="kd")
    assert not (home / "results").exists()


@pytest.mark.slow
def test_small_table1_grid(home: Path) -> None:
    done = run_cli("reproduce", "autoias", "--small", "--format", "markdown", "--output", str(home / "t1.md"),
                   home=home, timeout=1800)
    assert done.returncode == 0, done.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in (home / "t1.md").read_text().splitlines()[2:]]
    ours = {r[0]: r for r in rows if r[1] == "ours"}
    assert set(ours) == {"FM", "DeepFM", "PIN", "AutoInt+", "AutoCTR", "AutoFIS(2nd)", "AutoFeature(2)", "AutoIAS",
                         "FIXED (capacity-matched)"}
    assert ours["PIN"][3] == PAPER_ONLY and 0.5 < float(ours["AutoIAS"][3]) < 1
    assert "embedding" in ours["FIXED (capacity-matched)"][5]


@pytest.mark.slow
def test_small_ablations_write_curves(home: Path) -> None:
    out = home / "abl"
    done = run_cli("reproduce", "autoias-ablations", "--small", "--groups", "generator,reward_samples",
                   "--output", str(out), home=home, timeout=1800)
    assert done.returncode == 0, done.stderr
    curves, final = pl.read_parquet(out / "curves.parquet"), pl.read_parquet(out / "final.parquet")
    assert set(final["setting"]) == {"generator", "random search", "M=1", "M=2", "M=4", "M=8"}
    assert curves.filter(pl.col("setting") == "M=8").height >= 1 and "probe_valid_logloss" in curves.columns
    assert "Fig. 5" in done.stdout and "Fig. 6" in done.stdout
    assert torch.isfinite(torch.tensor(final["test_auc"].to_list())).all()
