"""Experiment-tracker export: a finished run folder -> MLflow or TensorBoard (``logger=mlflow|tensorboard``,
``autorecbench export RESULTS --to mlflow``).

What is logged, from the run folder's own files (so a live run and a back-filled one log the same):
- params: the resolved config (``config.yaml``), flattened to dotted keys;
- curve points: streaming ``curve.parquet`` as ``curve/<metric>`` at step = interactions seen; offline
  ``epochs.parquet`` as ``<stage>/<split>/<metric>`` at the optimisation step of that stage;
- final metrics: every row of ``metrics.parquet`` as ``<split>/<metric>`` (headline, validation, cost);
- the run folder itself as an artefact (MLflow: under ``run/``; TensorBoard writes its event files *into* the
  run folder, ``<run>/tensorboard/``).

A live run logs when its folder is complete, just before it is published; only complete runs are logged.
MLflow's default store is the embedded local file store ``<paths.root>/mlruns`` (``file:`` URI). MLflow 3.x keeps
that store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``: the exporter sets that
variable for a ``file:`` URI it was asked to use (``logger.tracking_uri=sqlite:///mlflow.db`` or a server URL
avoid it). Export is idempotent: a run already in the experiment (tag ``autorecbench.run_id``) or a folder
that already holds TensorBoard events is skipped.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import yaml

from autorecbench.errors import UserError
from autorecbench.results.run_folder import PARTIAL_SUFFIX

log = logging.getLogger("autorecbench")

RUN_ID_TAG = "autorecbench.run_id"


@dataclass
class RunExport:
    """What a tracker logs of one run folder."""

    folder: Path
    info: dict[str, Any]
    params: dict[str, str]
    curve: list[tuple[str, int, float]]  # (tag, step, value)
    final: dict[str, float]

    @property
    def run_id(self) -> str:
        return str(self.info.get("run_id", self.folder.name))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists and scalars become their YAML flow text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
    return out


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def read_export(folder: Path) -> RunExport:
    """The params, curve points and final metrics of a finished run folder."""
    info = json.loads((folder / "run.json").read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    curve: list[tuple[str, int, float]] = []
    if (folder / "curve.parquet").is_file():
        frame = pl.read_parquet(folder / "curve.parquet")
        curve += [(f"curve/{m}", int(end), float(v)) for end, m, v in frame.select("end", "metric", "value").iter_rows()]
    if (folder / "epochs.parquet").is_file():
        frame = pl.read_parquet(folder / "epochs.parquet")
        curve += [(f"{stage}/{split}/{m}", int(step), float(v))
                  for stage, split, m, step, v in frame.select("stage", "split", "metric", "step", "value").iter_rows()]
    metrics = pl.read_parquet(folder / "metrics.parquet")
    final = {f"{split}/{m}": float(v) for split, m, v in metrics.select("split", "metric", "value").iter_rows()}
    return RunExport(folder, info, flatten(config),
                     [c for c in curve if _finite(c[2])], {k: v for k, v in final.items() if _finite(v)})


def _millis(stamp: str | None) -> int | None:
    if not stamp:
        return None
    try:
        return int(dt.datetime.fromisoformat(stamp).timestamp() * 1000)
    except ValueError:
        return None


class Tracker(ABC):
    """One experiment tracker; ``options`` is the ``logger`` config group (less ``name``)."""

    name: ClassVar[str]
    requires: ClassVar[str]  # the module it imports
    extra: ClassVar[str]  # `pip install 'autorecbench[EXTRA]'`

    def __init__(self, options: Mapping[str, Any], root: Path) -> None:
        self.options = dict(options)
        self.root = root

    @abstractmethod
    def log(self, run: RunExport) -> str | None:
        """Log one run; returns where it went, or None when it was there already."""


class MlflowTracker(Tracker):
    name = "mlflow"
    requires = "mlflow"
    extra = "mlflow"

    def __init__(self, options: Mapping[str, Any], root: Path) -> None:
        super().__init__(options, root)
        uri = self.options.get("tracking_uri") or (root / "mlruns").resolve().as_uri()
        if str(uri).startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = str(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = str(self.options.get("experiment") or "autorecbench")
        found = self.client.get_experiment_by_name(name)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(name)

    def log(self, run: RunExport) -> str | None:
        from mlflow.entities import Metric, Param, RunTag

        done = self.client.search_runs([self.experiment_id], f"tags.`{RUN_ID_TAG}` = '{run.run_id}'", max_results=1)
        if done:
            return None
        info = run.info
        tags = {RUN_ID_TAG: run.run_id, **{f"autorecbench.{k}": str(info.get(k)) for k in
                                           ("dataset", "task", "method", "model", "seed", "runner", "variant")}}
        created = self.client.create_run(self.experiment_id, start_time=_millis(info.get("started_at")),
                                         tags=tags, run_name=run.run_id)
        run_id = created.info.run_id
        now = int(time.time() * 1000)
        params = [Param(k, v[:6000]) for k, v in run.params.items()]
        metrics = [Metric(tag, value, now, step) for tag, step, value in run.curve]
        last_step = max((step for _, step, _ in run.curve), default=0)
        metrics += [Metric(tag, value, now, last_step) for tag, value in run.final.items()]
        for i in range(0, len(params), 100):  # MLflow's per-call limits: 100 params, 1000 metrics
            self.client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])
        # A live run logs just before its folder is published under the name without ``.partial``.
        folder = str(run.folder.resolve()).removesuffix(PARTIAL_SUFFIX)
        self.client.log_batch(run_id, tags=[RunTag("autorecbench.folder", folder)])
        self.client.log_artifacts(run_id, str(run.folder), artifact_path="run")
        self.client.set_terminated(run_id, "FINISHED", end_time=_millis(info.get("finished_at")))
        return f"{self.uri} (experiment {self.experiment_id}, run {run_id})"


class TensorboardTracker(Tracker):
    name = "tensorboard"
    requires = "tensorboard"
    extra = "tensorboard"

    def log(self, run: RunExport) -> str | None:
        from torch.utils.tensorboard import SummaryWriter

        target = run.folder / str(self.options.get("subdir") or "tensorboard")
        if target.is_dir() and any(target.iterdir()):
            return None
        writer = SummaryWriter(log_dir=str(target))
        try:
            yaml_text = (run.folder / "config.yaml").read_text()
            writer.add_text("config", "```\n" + yaml_text + "\n```", 0)
            for tag, step, value in run.curve:
                writer.add_scalar(tag, value, step)
            for tag, value in run.final.items():
                writer.add_scalar(f"final/{tag}", value, 0)
            headline = {f"hparam/{k}": v for k, v in run.final.items() if not k.startswith("cost/")}
            writer.add_hparams(run.params, headline, run_name=".")
        finally:
            writer.close()
        return str(target)


TRACKERS: dict[str, type[Tracker]] = {cls.name: cls for cls in (MlflowTracker, TensorboardTracker)}


def check_logger(logger: Mapping[str, Any] | None) -> None:
    """Reject an unknown tracker, or one whose extra is not installed, before anything runs."""
    name = str((logger or {}).get("name", "none"))
    if name == "none":
        return
    if name not in TRACKERS:
        raise UserError(f"unknown logger {name!r}; choose none, {', '.join(TRACKERS)}")
    cls = TRACKERS[name]
    if importlib.util.find_spec(cls.requires) is None:
        raise UserError(f"logger={name} needs {cls.requires}: pip install 'autorecbench[{cls.extra}]'")


def tracker(logger: Mapping[str, Any], root: Path) -> Tracker | None:
    """The configured tracker (None for ``logger=none``)."""
    check_logger(logger)
    name = str(logger.get("name", "none"))
    if name == "none":
        return None
    return TRACKERS[name]({k: v for k, v in logger.items() if k != "name"}, root)


def log_finished_run(logger: Mapping[str, Any] | None, root: Path, folder: Path) -> None:
    """What a live run calls once its folder is complete. A tracker that fails is a warning: the run folder,
    not the tracker, is the record."""
    if not logger or str(logger.get("name", "none")) == "none":
        return
    try:
        where = tracker(logger, root)
        if where is not None:
            logged = where.log(read_export(folder))
            log.info("%s: logged to %s", logger.get("name"), logged)
    except Exception as exc:  # noqa: BLE001 - any tracker failure leaves the run itself intact
        log.warning("logger=%s failed, the run folder is complete: %s: %s", logger.get("name"), type(exc).__name__, exc)
