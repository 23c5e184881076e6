"""``autorecbench export``: back-fill finished run folders into an experiment tracker
(``autorecbench/results/tracking.py``; live runs use ``logger=mlflow|tensorboard``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autorecbench.console import out_console
from autorecbench.errors import UserError

EPILOG = ("Examples:\n\n"
          "* `autorecbench export results/ --to mlflow` (local file store `./mlruns`; `mlflow ui` shows it)\n\n"
          "* `autorecbench export results/ --to mlflow --tracking-uri sqlite:///mlflow.db --experiment table1`\n\n"
          "* `autorecbench export results/ --to tensorboard` (event files in each run folder)")


def export(
    paths: Annotated[list[str], typer.Argument(help="Run folders, folders of runs, or globs.")],
    to: Annotated[str, typer.Option("--to", help="mlflow | tensorboard")],
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store (default: the local "
                                                        "file store ./mlruns, or $AUTORECBENCH_HOME/mlruns).")] = None,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment name.")] = "autorecbench",
) -> None:
    """Log every complete run folder (config as params, curve points, final metrics, the folder as an artefact);
    runs already there are skipped, failed and interrupted ones are never exported."""
    import os

    from autorecbench.results.collect import load_results
    from autorecbench.results.tracking import read_export, tracker

    options = {"name": to, "experiment": experiment, "tracking_uri": tracking_uri}
    if to == "none":
        raise UserError("--to: choose mlflow or tensorboard")
    results = load_results(paths)
    if results.runs.height == 0:
        raise UserError(f"no complete runs under {', '.join(paths)}")
    target = tracker(options, Path(os.environ.get("AUTORECBENCH_HOME", ".")))
    assert target is not None
    logged = skipped = 0
    for folder in results.paths.values():
        where = target.log(read_export(folder))
        logged, skipped = (logged + 1, skipped) if where else (logged, skipped + 1)
        out_console.print(f"{folder.name}: {where or 'already exported'}", highlight=False, soft_wrap=True)
    out_console.print(f"{to}: {logged} run(s) exported, {skipped} already there, {len(results.excluded)} incomplete "
                      "left out", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(export)
