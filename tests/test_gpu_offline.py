"""CUDA checks of the offline runner and the CTR search methods; skipped on machines without a GPU."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from conftest import read_run, run_cli, run_folders

pytestmark = pytest.mark.gpu
SMALL_CRITEO = ["data=synthetic-criteo", "data.generator.rows=20000", "data.generator.n_fields=10",
                "data.generator.n_informative=5", "data.generator.n_pairs=2", "data.generator.cardinality_max=50",
                "runner.epochs=4", "runner.batch_size=1000", "-q"]
METHODS = {
    "fixed": ["method=fixed", "model=deepfm"],
    "autodim": ["method=autodim", "model=deepfm"],
    "autofis": ["method=autofis", "model=fm"],
    "autoloss": ["method=autoloss", "model=ipnn"],
}


def _tables(folder: Path) -> dict[str, pl.DataFrame]:
    """Every Parquet table of a run without its run id and its timing rows."""
    out = {}
    for path in sorted(folder.glob("*.parquet")):
        frame = pl.read_parquet(path)
        frame = frame.drop("run_id") if "run_id" in frame.columns else frame
        if "split" in frame.columns:
            frame = frame.filter(pl.col("split") != "cost")
        out[path.stem] = frame
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_offline_methods_on_cuda_are_reproducible_and_learn(home: Path, method: str) -> None:
    for _ in range(2):
        run_cli("run", *METHODS[method], *SMALL_CRITEO, "device=cuda", home=home, check=True)
    a, b = run_folders(home)
    info = read_run(a)
    assert info["device"].startswith("cuda") and info["cuda_peak_bytes"] > 0
    ta, tb = _tables(a), _tables(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].equals(tb[name]), name
    assert info["metrics"]["auc"] > 0.6  # planted signal is learnable; no-signal would give ≈ 0.5


def test_dien_on_cuda_is_reproducible(home: Path) -> None:
    """DIEN's GRUs (cuDNN) and its negatives' generator on the device: the same seed gives the same tables."""
    from test_sequence_models import SMALL

    for _ in range(2):
        run_cli("run", "model=dien", *SMALL, "device=cuda", "-q", home=home, check=True)
    a, b = run_folders(home)
    assert read_run(a)["device"].startswith("cuda")
    ta, tb = _tables(a), _tables(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].equals(tb[name]), name
