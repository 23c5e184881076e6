"""Tracker export: the MLflow local file store round trip (``export --to mlflow`` and ``logger=mlflow``),
TensorBoard event files under the run folder, and a missing extra refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from conftest import run_cli


def _complete(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p / "run.json").is_file() and not p.name.endswith(".partial"))


def test_export_to_mlflow_file_store_round_trip(views_results: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from autorecbench.cli.app import app

    store = (tmp_path / "mlruns").as_uri()
    args = ["export", str(views_results), "--to", "mlflow", "--tracking-uri", store, "--experiment", "views"]
    done = run_cli(*args, check=True)
    folders = _complete(views_results)
    assert f"mlflow: {len(folders)} run(s) exported, 0 already there, 3 incomplete left out" in done.stdout
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("views")
    runs = {r.data.tags["autorecbench.run_id"]: r for r in client.search_runs([experiment.experiment_id])}
    assert len(runs) == len(folders)
    for folder in folders:
        info = json.loads((folder / "run.json").read_text())
        run = runs[info["run_id"]]
        assert run.info.status == "FINISHED" and run.info.run_name == info["run_id"]
        assert run.data.params["method.name"] == info["method"] and run.data.params["seed"] == str(info["seed"])
        metrics = pl.read_parquet(folder / "metrics.parquet")
        for split, metric, value in metrics.select("split", "metric", "value").iter_rows():
            assert run.data.metrics[f"{split}/{metric}"] == pytest.approx(value), (split, metric)
        if info["runner"] == "streaming":
            tag, expected = "curve/accuracy", pl.read_parquet(folder / "curve.parquet").filter(pl.col("metric") == "accuracy")
            steps = expected["end"].to_list()
        else:
            tag = "fit/valid/auc"
            expected = pl.read_parquet(folder / "epochs.parquet").filter(
                (pl.col("stage") == "fit") & (pl.col("split") == "valid") & (pl.col("metric") == "auc"))
            steps = expected["step"].to_list()
        history = client.get_metric_history(run.info.run_id, tag)
        assert [m.step for m in history] == steps and len(steps) > 0
        assert [m.value for m in history] == pytest.approx(expected["value"].to_list())
        artefacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "run")}
        assert {"run.json", "config.yaml", "metrics.parquet"} <= artefacts
    # Back-filling twice adds nothing.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and f"0 run(s) exported, {len(folders)} already there" in again.output
    assert len(client.search_runs([experiment.experiment_id])) == len(folders)


def test_live_loggers(tmp_path: Path, ml100k_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from autorecbench.config import compose
    from autorecbench.execute import execute

    base = [f"paths.root={tmp_path}", f"data.path={ml100k_dir}", "runner.max_rows=2000", "device=cpu"]
    folder = execute(compose([*base, "logger=mlflow"]), ["logger=mlflow"])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())  # the embedded default: <root>/mlruns
    (run,) = client.search_runs([client.get_experiment_by_name("autorecbench").experiment_id])
    info = json.loads((folder / "run.json").read_text())
    assert run.data.tags["autorecbench.run_id"] == info["run_id"] == folder.name
    assert run.data.metrics["eval/accuracy"] == pytest.approx(info["metrics"]["accuracy"])
    assert run.data.params["logger.name"] == "mlflow"
    folder = execute(compose([*base, "logger=tensorboard", "seed=1"]), ["logger=tensorboard"])
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "curve/accuracy" in scalars and "final/eval/accuracy" in scalars
    accuracy = json.loads((folder / "run.json").read_text())["metrics"]["accuracy"]
    assert events.Scalars("final/eval/accuracy")[0].value == pytest.approx(accuracy)
    curve = pl.read_parquet(folder / "curve.parquet").filter(pl.col("metric") == "accuracy")
    assert [e.step for e in events.Scalars("curve/accuracy")] == curve["end"].to_list()


def test_a_tracker_without_its_extra_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from autorecbench.errors import UserError
    from autorecbench.results import tracking

    class Missing(tracking.MlflowTracker):
        name, requires, extra = "missing", "no_such_tracker_module", "missing"

    monkeypatch.setitem(tracking.TRACKERS, "missing", Missing)
    with pytest.raises(UserError, match=r"pip install 'autorecbench\[missing\]'"):
        tracking.check_logger({"name": "missing"})
    with pytest.raises(UserError, match="unknown logger"):
        tracking.check_logger({"name": "wandb"})
    tracking.check_logger({"name": "none"})
    tracking.check_logger(None)
