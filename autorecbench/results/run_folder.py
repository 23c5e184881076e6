"""Run folders: written atomically, in a documented Parquet schema, and read back for ``compare``.

A run writes into ``<results_dir>/<run_id>.partial/`` and renames it to ``<results_dir>/<run_id>/`` once
every file is complete, so a folder without the suffix is always a finished run. A run that fails keeps
its ``.partial`` folder with ``run.json`` saying ``"status": "failed"`` and the error (``"diverged"`` with the
stage, step and reason when training diverged); a run killed outright leaves ``"status": "running"`` with a
process that no longer exists: :func:`read_record` reports it as ``interrupted`` (resumable when its
``checkpoint/`` holds a checkpoint, see ``results/checkpoint.py``). ``compare`` lists all of these apart and
never averages them.

Files of a finished run (all Parquet tables in long format; the first six columns identify the run:
run_id, dataset, task, method, seed, model):
- ``config.yaml``: the resolved config.
- ``run.json``: status, seed, overrides, config hash, git commit, package versions, hardware, wall time,
  throughput, evaluation window or split, memory, dataset provenance.
- ``metrics.parquet``: ids, split, metric, value.
- streaming runs: ``curve.parquet`` (ids, window, start, end, n, metric, value) and ``buckets.parquet`` (ids,
  entity, bucket, freq_min, freq_max, label, n, metric, value).
- offline runs: ``epochs.parquet`` (ids, stage, evaluation, epoch, step, samples, split, metric, value).
- ``architecture.json``: what the method's search chose.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from autorecbench.results.checkpoint import alive, has_checkpoint

PARTIAL_SUFFIX = ".partial"

ID_SCHEMA: dict[str, Any] = {
    "run_id": pl.String,
    "dataset": pl.String,
    "task": pl.String,
    "method": pl.String,
    "seed": pl.Int64,
    "model": pl.String,
}
TABLE_SCHEMAS: dict[str, dict[str, Any]] = {
    "metrics": {"split": pl.String, "metric": pl.String, "value": pl.Float64},
    "curve": {
        "window": pl.Int64, "start": pl.Int64, "end": pl.Int64, "n": pl.Int64,
        "metric": pl.String, "value": pl.Float64,
    },
    "buckets": {
        "entity": pl.String, "bucket": pl.Int64, "freq_min": pl.Int64, "freq_max": pl.Int64,
        "label": pl.String, "n": pl.Int64, "metric": pl.String, "value": pl.Float64,
    },
    "epochs": {
        "stage": pl.String, "evaluation": pl.Int64, "epoch": pl.Float64, "step": pl.Int64, "samples": pl.Int64,
        "split": pl.String, "metric": pl.String, "value": pl.Float64,
    },
}


def make_run_id(started: dt.datetime, dataset: str, task: str, method: str, seed: int, model: str | None = None) -> str:
    """``<time>_<dataset>_<task>[_<model>]_<method>_s<seed>`` (the model where a protocol has several)."""
    model_part = f"_{model}" if model else ""
    return f"{started:%Y%m%d-%H%M%S}_{dataset}_{task}{model_part}_{method}_s{seed}"


class RunFolder:
    """A run's folder while it is being written; ``finalize`` makes it visible under its final name."""

    def __init__(self, results_dir: Path, run_id: str) -> None:
        results_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir = results_dir
        for attempt in range(1000):
            candidate = run_id if attempt == 0 else f"{run_id}-{attempt}"
            partial = results_dir / f"{candidate}{PARTIAL_SUFFIX}"
            if (results_dir / candidate).exists():
                continue
            try:
                partial.mkdir()  # atomic reservation: concurrent runs never share a folder
            except FileExistsError:
                continue
            self.run_id, self.path = candidate, partial
            return
        raise RuntimeError(f"could not reserve a run folder for {run_id} in {results_dir}")

    @classmethod
    def attach(cls, partial: Path) -> RunFolder:
        """An existing ``<run_id>.partial`` folder (a resumed run), published under ``<run_id>`` when done."""
        folder = cls.__new__(cls)
        folder.results_dir, folder.path = partial.parent, partial
        folder.run_id = partial.name.removesuffix(PARTIAL_SUFFIX)
        return folder

    def write_json(self, name: str, payload: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        tmp.replace(self.path / name)

    def write_text(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)

    def write_table(self, table: str, ids: dict[str, Any], rows: Iterable[dict[str, Any]]) -> None:
        """One Parquet table: id columns, then the table's documented columns (or, for a method's own
        report, the columns its rows have)."""
        base = {**dict.fromkeys(ID_SCHEMA), **ids, "run_id": self.run_id}  # an id not given is null
        rows = [{**base, **row} for row in rows]
        if table in TABLE_SCHEMAS:
            schema = {**ID_SCHEMA, **TABLE_SCHEMAS[table]}
            frame = pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)
        else:
            frame = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame(schema=ID_SCHEMA)
            frame = frame.select(pl.col(*ID_SCHEMA), pl.exclude(*ID_SCHEMA)).cast(ID_SCHEMA)
        frame.write_parquet(self.path / f"{table}.parquet")

    def finalize(self) -> Path:
        """Rename to the final name; if another run took that name meanwhile, take the next free one."""
        base = self.run_id
        for attempt in range(1000):
            name = base if attempt == 0 else f"{base}-{attempt}"
            final = self.results_dir / name
            if final.exists():
                continue
            try:
                os.rename(self.path, final)
            except OSError:
                continue
            self.path = final
            return final
        raise RuntimeError(f"could not publish run folder {self.path}")

    def record_failure(self, info: dict[str, Any], exc: BaseException) -> None:
        """Keep the ``.partial`` folder and say in ``run.json`` that the run failed or was interrupted, and why
        (the caller re-raises)."""
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        info.update(status=status, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        try:
            self.write_json("run.json", info)
        except OSError:
            pass

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class RunRecord:
    """One run folder found on disk. ``status``: complete | running | interrupted | failed | diverged |
    missing-run-json | unreadable; ``resumable``: an interrupted (or failed) run with a checkpoint."""

    path: Path
    status: str
    info: dict[str, Any] | None
    error: str | None = None
    resumable: bool = False

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def label(self) -> str:
        """The status as ``runs`` and ``compare`` print it."""
        if self.status == "interrupted":
            return "interrupted — resumable" if self.resumable else "interrupted — no checkpoint"
        if self.status == "unreadable":
            return f"unreadable: {self.error}"
        if self.status == "failed" and self.resumable:
            return "failed — resumable"
        return self.status


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "run.json").is_file() or path.name.endswith(PARTIAL_SUFFIX))


def discover(inputs: Iterable[str]) -> list[Path]:
    """Run folders under each input (a run folder, a folder of runs, or a glob), sorted, without repeats."""
    import glob

    found: set[Path] = set()
    for item in inputs:
        matches = [Path(p) for p in glob.glob(item, recursive=True)] or ([Path(item)] if Path(item).exists() else [])
        for path in matches:
            if _is_run_folder(path):
                found.add(path)
            elif path.is_dir():
                for run_json in path.rglob("run.json"):
                    found.add(run_json.parent)
                found.update(p for p in path.rglob(f"*{PARTIAL_SUFFIX}") if p.is_dir())
    return sorted(found)


def read_record(path: Path) -> RunRecord:
    run_json = path / "run.json"
    if not run_json.is_file():
        return RunRecord(path, "missing-run-json", None, "no run.json: the run was interrupted before starting")
    try:
        info = json.loads(run_json.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return RunRecord(path, "unreadable", None, f"run.json unreadable: {exc}")
    status = str(info.get("status", "unknown"))
    partial = path.name.endswith(PARTIAL_SUFFIX)
    if status in ("running", "complete") and partial:  # complete but never published: cut short at the end
        status = "running" if alive(info) else "interrupted"
    if status == "complete" and not (path / "metrics.parquet").is_file():
        return RunRecord(path, "unreadable", info, "metrics.parquet missing")
    resumable = partial and status in ("interrupted", "failed") and (
        has_checkpoint(path) or info.get("status") == "complete")
    error = info.get("error")
    if status == "diverged" and isinstance(info.get("divergence"), dict):
        d = info["divergence"]
        error = f"{d.get('stage')} stage, step {d.get('step')}: {d.get('reason')}"
    return RunRecord(path, status, info, error, resumable)
