"""A small results folder of real runs for the views' tests (plot, report, export): FIXED and ESAPN streaming
on ml-100k (2 seeds), FIXED, AutoFIS, AutoDim and AutoLoss offline on synthetic Criteo, a failed, a diverged and
an interrupted run, and a ``validation.parquet`` in the layout `autorecbench validate` writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl

from autorecbench.config import compose
from autorecbench.errors import RunFailed
from autorecbench.execute import execute

STREAMING = ["runner.max_rows=4000", "device=cpu", "quiet=true"]
OFFLINE = ["data=synthetic-criteo", "model=fm", "data.generator.rows=6000", "data.generator.n_fields=8",
           "runner.epochs=2", "device=cpu", "quiet=true"]
VALIDATION_CASES = ("planted", "control")
VALIDATION_SUBJECTS = ("method", "oracle", "null")


def _run(root: Path, overrides: list[str], hook=None) -> Path | None:  # type: ignore[no-untyped-def]
    cfg = compose([f"paths.root={root}", *overrides])
    try:
        return execute(cfg, overrides, hook=hook)
    except (RuntimeError, KeyboardInterrupt):  # the failed and interrupted runs keep their folders
        return None


def _raise(error: BaseException):  # type: ignore[no-untyped-def]
    def hook(event, batch, value):  # type: ignore[no-untyped-def]
        if batch.index == 2:
            raise error
    return hook


def write_validation(folder: Path) -> pl.DataFrame:
    """A verdict table with the columns `autorecbench validate` writes: two statistics, both cases, all subjects."""
    rows = []
    for case in VALIDATION_CASES:
        for subject in VALIDATION_SUBJECTS:
            for seed in (0, 1):
                for statistic, threshold in (("recall", 0.8), ("auc_gain", 0.002)):
                    good = case == "planted" and subject != "null"
                    value = (0.9 if good else 0.3) + 0.01 * seed if statistic == "recall" else (0.01 if good else 0.0)
                    rows.append({"method": "autofis", "case": case, "subject": subject, "seed": seed,
                                 "statistic": statistic, "value": value, "threshold": threshold,
                                 "passed": value >= threshold})
    frame = pl.DataFrame(rows)
    folder.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(folder / "validation.parquet")
    return frame


def build_results(root: Path, ml100k_dir: Path) -> Path:
    ml100k = [f"data.path={ml100k_dir}"]
    for method in ("fixed", "esapn"):
        for seed in (0, 1):
            _run(root, [f"method={method}", f"seed={seed}", *ml100k, *STREAMING])
    for method in ("fixed", "autofis", "autodim", "autoloss"):
        _run(root, [f"method={method}", *OFFLINE])
    # Never drawn, never averaged: a failure, a divergence (non-finite predictions) and an interruption.
    _run(root, ["seed=7", *ml100k, *STREAMING], hook=_raise(RuntimeError("simulated crash")))
    _run(root, ["seed=8", *ml100k, *STREAMING],
         hook=_raise(RunFailed("non-finite prediction at stream row 1000: the model diverged")))
    _run(root, ["seed=9", *ml100k, *STREAMING], hook=_raise(KeyboardInterrupt()))
    write_validation(root / "results" / "validate")
    return root / "results"


def copy_results(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
