"""CUDA checks of the embedding-size search methods; skipped on machines without a GPU."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from conftest import REPO, read_run, run_cli, run_folders

pytestmark = pytest.mark.gpu
ML100K = ["data.path=" + str(REPO / "data" / "raw" / "ml-100k")]


@pytest.mark.parametrize("method", ["esapn", "darts", "autoemb"])
def test_search_methods_on_cuda_are_reproducible_and_close_to_cpu(home: Path, ml100k_dir: Path, method: str) -> None:
    args = ["run", f"method={method}", "task=multiclass", "runner.max_rows=20000", *ML100K, "-q"]
    for device in ("cuda", "cuda", "cpu"):
        run_cli(*args, f"device={device}", home=home, check=True)
    runs = [(read_run(f), f) for f in run_folders(home)]
    cuda = [(i, f) for i, f in runs if i["device"].startswith("cuda")]
    (cpu_info, _), = [(i, f) for i, f in runs if i["device"] == "cpu"]
    assert len(cuda) == 2 and cuda[0][0]["cuda_peak_bytes"] > 0
    tables = ["metrics", "size_by_frequency", "embedding_sizes"]
    for table in tables:
        a, b = (pl.read_parquet(f / f"{table}.parquet").drop("run_id") for _, f in cuda)
        if table == "metrics":
            a, b = (x.filter(pl.col("split") != "cost") for x in (a, b))
        assert a.equals(b), table
    # Same initial values (counter-based, device-independent) and data; float rounding differs.
    assert cuda[0][0]["metrics"]["accuracy"] == pytest.approx(cpu_info["metrics"]["accuracy"], abs=0.03)
    assert cuda[0][0]["metrics"]["ce"] == pytest.approx(cpu_info["metrics"]["ce"], abs=0.03)
