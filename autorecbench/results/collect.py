"""Run folders gathered for the views (``plot``, ``report``): the complete runs with their tables, and the
runs that are never drawn (failed, diverged, interrupted, unpublished) kept apart.

A run is *diverged* when its folder says failed with a non-finite prediction or loss (``RunFailed``), or when
it completed with a non-finite headline metric; both are listed with the failures, never drawn or averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from autorecbench.errors import UserError
from autorecbench.results.run_folder import PARTIAL_SUFFIX, RunRecord, discover, read_record

# The columns every run row carries (``ResultSet.runs``) and every table gets joined with.
RUN_COLUMNS = ["run_id", "dataset", "task", "model", "method", "seed", "variant", "runner", "headline_split",
               "config_hash", "tuning", "series", "path"]
DIVERGED_MARKERS = ("non-finite", "diverged")


@dataclass
class ResultSet:
    """Complete runs (``runs``: one row each) and the others (``excluded``, with the reason)."""

    runs: pl.DataFrame
    excluded: list[RunRecord]
    inputs: list[Path]
    _cache: dict[str, pl.DataFrame | None] = field(default_factory=dict, repr=False)

    @property
    def paths(self) -> dict[str, Path]:
        return {r: Path(p) for r, p in self.runs.select("run_id", "path").iter_rows()}

    def table(self, name: str) -> pl.DataFrame | None:
        """``<name>.parquet`` of every complete run that has one, with the run columns (series, variant, runner,
        ...) joined on ``run_id``; None when no run has it."""
        if name not in self._cache:
            frames = []
            for run_id, path in self.paths.items():
                file = path / f"{name}.parquet"
                if file.is_file():
                    frame = pl.read_parquet(file).with_columns(pl.lit(run_id).alias("run_id"))
                    frames.append(frame.drop([c for c in RUN_COLUMNS if c in frame.columns and c != "run_id"]))
            self._cache[name] = (pl.concat(frames, how="diagonal_relaxed").join(self.runs, on="run_id")
                                 if frames else None)
        return self._cache[name]

    def loose_table(self, name: str) -> pl.DataFrame | None:
        """``<name>.parquet`` files under the inputs that are not part of a run folder (e.g. ``validate``'s
        ``validation.parquet``), concatenated; None when there is none."""
        files: set[Path] = set()
        for item in self.inputs:
            candidates = [item] if item.is_file() else sorted(item.rglob(f"{name}.parquet")) if item.is_dir() else []
            files.update(p for p in candidates if p.name == f"{name}.parquet" and not _in_run_folder(p))
        frames = [pl.read_parquet(p) for p in sorted(files)]
        return pl.concat(frames, how="diagonal_relaxed") if frames else None


def _in_run_folder(path: Path) -> bool:
    return (path.parent / "run.json").is_file() or path.parent.name.endswith(PARTIAL_SUFFIX)


def _diverged_metric(record: RunRecord) -> str | None:
    """The first headline metric of a complete run that is not finite."""
    info = record.info or {}
    for name, value in (info.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return name
    return None


def run_status(record: RunRecord) -> str:
    """``complete``, ``diverged``, ``failed``, ``interrupted``, ``running`` (never published), ..."""
    if record.status == "failed" and any(m in (record.error or "") for m in DIVERGED_MARKERS):
        return "diverged"
    if record.complete and _diverged_metric(record):
        return "diverged"
    return record.status


def tuning_label(tuning: Any) -> str:
    """``tuned (N trials)`` for a final run of `autorecbench tune`, ``tuning trial`` for one of its trials,
    else empty."""
    if not isinstance(tuning, dict) or tuning.get("trials") is None:
        return ""
    return "tuning trial" if tuning.get("trial") else f"tuned ({tuning['trials']} trials)"


def _run_row(record: RunRecord) -> dict[str, Any]:
    info = record.info or {}
    return {
        "run_id": str(info.get("run_id", record.path.name)),
        **{k: str(info.get(k) or "") for k in ("dataset", "task", "model", "method", "variant", "config_hash")},
        "seed": int(info.get("seed", 0)),
        "runner": str(info.get("runner", "streaming")),
        "headline_split": str(info.get("headline_split", "eval")),
        "tuning": tuning_label(info.get("tuning")),
        "path": str(record.path),
    }


def _labels(runs: pl.DataFrame) -> pl.DataFrame:
    """Series name per run (column ``series``): the method, the overrides that set it apart from the other runs
    of its dataset × task × model (those they all share left out) and the tuning budget, e.g.
    ``autoloss method.variant=ce`` or ``fixed, tuned (20 trials)``."""
    shared: dict[tuple[str, str, str], set[str]] = {}
    for key, part in runs.group_by("dataset", "task", "model"):
        shared[tuple(str(k) for k in key)] = set.intersection(*(set(v.split()) for v in part["variant"].to_list()))

    def label(dataset: str, task: str, model: str, method: str, variant: str, tuning: str) -> str:
        rest = " ".join(i for i in variant.split() if i not in shared[(dataset, task, model)])
        return ", ".join(p for p in (" ".join(p for p in (method, rest) if p), tuning) if p)

    names = [label(*row) for row in runs.select("dataset", "task", "model", "method", "variant", "tuning").iter_rows()]
    return runs.with_columns(pl.Series("series", names, dtype=pl.String))


def load_results(inputs: Sequence[str]) -> ResultSet:
    """Every run folder under ``inputs`` (run folders, folders of runs, globs); UserError when none exists."""
    folders = discover(inputs)
    paths = [Path(p) for p in inputs]
    if not folders and not any(p.is_dir() or p.is_file() for p in paths):
        raise UserError(f"no runs found under {', '.join(inputs)}")
    complete, excluded = [], []
    for record in (read_record(p) for p in folders):
        status = run_status(record)
        if status == "complete":
            complete.append(record)
        else:
            if status == "diverged" and record.complete:
                record = RunRecord(record.path, "diverged", record.info,
                                   f"non-finite {_diverged_metric(record)} (diverged)")
            elif status != record.status:
                record = RunRecord(record.path, status, record.info, record.error)
            excluded.append(record)
    schema = {c: pl.String for c in RUN_COLUMNS} | {"seed": pl.Int64}
    runs = pl.DataFrame([_run_row(r) for r in complete], schema={c: t for c, t in schema.items() if c != "series"})
    runs = _labels(runs) if runs.height else runs.with_columns(pl.lit(None, dtype=pl.String).alias("series"))
    return ResultSet(runs.select(RUN_COLUMNS), excluded, paths)
