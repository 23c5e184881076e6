"""CUDA checks; skipped on machines without a GPU."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from autorecbench.data.schema import TaskSpec
from autorecbench.metrics import task_metrics
from conftest import REPO, read_run, run_cli, run_folders

pytestmark = pytest.mark.gpu
ML100K = ["data.path=" + str(REPO / "data" / "raw" / "ml-100k")]


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_metrics_on_cuda_equal_cpu(task: str) -> None:
    spec = TaskSpec.from_name(task)
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    if spec.is_binary:
        pred = torch.rand(n, generator=gen)
        label = (torch.rand(n, generator=gen) < 0.5).float()
    else:
        pred = torch.softmax(torch.randn(n, 5, generator=gen), dim=1)
        label = torch.randint(0, 5, (n,), generator=gen)
    cpu = task_metrics(spec, pred, label)
    gpu = task_metrics(spec, pred.cuda(), label.cuda())
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-9, abs=1e-12), k


def test_cuda_run_is_reproducible_and_learns(home: Path, ml100k_dir: Path) -> None:
    args = ["run", "device=cuda", "task=multiclass", "runner.max_rows=30000", *ML100K, "-q"]
    run_cli(*args, home=home, check=True)
    run_cli(*args, home=home, check=True)
    a, b = run_folders(home)
    info = read_run(a)
    assert info["device"].startswith("cuda") and info["hardware"]["gpu"]
    assert info["cuda_peak_bytes"] > 0
    ma = pl.read_parquet(a / "metrics.parquet").filter(pl.col("split") != "cost").drop("run_id")
    mb = pl.read_parquet(b / "metrics.parquet").filter(pl.col("split") != "cost").drop("run_id")
    assert ma.equals(mb)
    evals = dict(ma.filter(pl.col("split") == "eval").select("metric", "value").iter_rows())
    assert evals["ce"] < 1.6094  # better than a uniform guess over 5 classes (ln 5)


def test_cpu_and_cuda_runs_agree_closely(home: Path, ml100k_dir: Path) -> None:
    for device in ("cpu", "cuda"):
        run_cli("run", f"device={device}", "runner.max_rows=20000", *ML100K, "-q", home=home, check=True)
    runs = {read_run(f)["device"].split(":")[0]: read_run(f)["metrics"] for f in run_folders(home)}
    # Same initialisation (made on the CPU) and data; float rounding differs, so close, not identical.
    assert runs["cuda"]["accuracy"] == pytest.approx(runs["cpu"]["accuracy"], abs=0.03)
    assert runs["cuda"]["mse"] == pytest.approx(runs["cpu"]["mse"], abs=0.02)


CTR_SMALL = ["data=synthetic-criteo", "data.generator.rows=20000", "data.generator.n_fields=12",
             "data.generator.n_informative=6", "data.generator.n_pairs=3", "data.generator.cardinality_max=20",
             "runner.epochs=6", "-q"]


def test_offline_cuda_resident_and_pinned_data(home: Path) -> None:
    """The CTR path on a GPU: splits resident on the device or pinned on the CPU give the same batches; the
    same seed gives the same numbers; DeepFM learns the planted interactions."""
    for placement in ("device", "device", "pinned"):
        run_cli("run", "device=cuda", f"runner.data_on_device={placement}", *CTR_SMALL, home=home, check=True)
    infos = [read_run(f) for f in run_folders(home)]
    resident = [i for i in infos if i["split"]["on_device"]]
    pinned = [i for i in infos if not i["split"]["on_device"]]
    assert len(resident) == 2 and len(pinned) == 1
    assert resident[0]["metrics"] == resident[1]["metrics"]
    assert pinned[0]["metrics"]["auc"] == pytest.approx(resident[0]["metrics"]["auc"], abs=1e-3)
    assert resident[0]["metrics"]["auc"] > 0.7
    assert resident[0]["offline"]["fit"]["samples_per_second"] > 0 and "train_gpu_seconds" in str(
        pl.read_parquet(next(iter(run_folders(home))) / "metrics.parquet")["metric"].to_list())
