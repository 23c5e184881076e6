"""``autorecbench plot``: figures from run folders (kinds in ``autorecbench/results/figures/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autorecbench.console import out_console
from autorecbench.errors import UserError

EPILOG = ("Examples:\n\n"
          "* `autorecbench plot results/ --out figures/` (every kind that applies, PNG)\n\n"
          "* `autorecbench plot results/ --out figures/ --kind frequency --kind pareto --format png,svg,pdf`\n\n"
          "* `autorecbench plot --list-kinds`")


def plot(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Run folders, folders of runs, or globs (e.g. `results/`); "
                                                         "`validation.parquet` files under them too.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the figures (created).")] = None,
    kind: Annotated[Optional[list[str]], typer.Option("--kind", "-k", help="Figure kind (repeatable; default: every kind "
                                                      "that applies). `--list-kinds` lists them.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="png, svg, pdf, or several: `png,svg`.")] = "png",
    metric: Annotated[Optional[str], typer.Option("--metric", help="Metric to draw instead of each kind's default "
                                                  "(accuracy streaming, AUC offline), e.g. `auc`, `logloss`.")] = None,
    list_kinds: Annotated[bool, typer.Option("--list-kinds", help="List the figure kinds and exit.")] = False,
) -> None:
    """Draw figures from run folders: one per kind and dataset × task (× model). Only complete runs are drawn."""
    from autorecbench.results.collect import load_results
    from autorecbench.results.plot import draw, load_kinds, parse_formats, save

    if list_kinds:
        for item in load_kinds().values():
            out_console.print(f"[bold]{item.name}[/]: {item.help}", highlight=False, soft_wrap=True)
        return
    if not paths or out is None:
        raise UserError("plot needs RESULTS... and --out DIR (see `autorecbench plot --help`)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    formats = parse_formats(fmt)
    results = load_results(paths)
    plots = draw(results, kind, metric)
    if not plots:
        raise UserError(f"nothing to draw under {', '.join(paths)}: {results.runs.height} complete run(s) hold no table "
                        f"for {'the kind(s) ' + ', '.join(kind) if kind else 'any figure kind'}")
    for path in save(plots, out, formats):
        out_console.print(str(path), highlight=False, soft_wrap=True)
    if results.excluded:
        out_console.print(f"not drawn: {len(results.excluded)} failed, diverged or interrupted run(s)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(plot)
