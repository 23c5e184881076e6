"""``autorecbench report``: one self-contained HTML report of run folders (``autorecbench/results/report.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autorecbench.console import out_console

EPILOG = ("Examples:\n\n"
          "* `autorecbench report results/ --out report.html --baseline fixed`\n\n"
          "* `autorecbench report results/table1 --out table1.html --kind frequency --kind pareto`")


def report(
    paths: Annotated[list[str], typer.Argument(help="Run folders, folders of runs, or globs (e.g. `results/`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")],
    baseline: Annotated[Optional[str], typer.Option("--baseline", "-b", help="Method to compare against: Δ, t-test "
                                                    "and significance markers in the tables.")] = None,
    kind: Annotated[Optional[list[str]], typer.Option("--kind", "-k", help="Figure kinds to include (default: all "
                                                      "that apply; `autorecbench plot --list-kinds`).")] = None,
    metric: Annotated[Optional[str], typer.Option("--metric", help="Metric the figures draw instead of their "
                                                  "default.")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="The page's heading.")] = None,
) -> None:
    """Write one HTML file that opens offline: comparison tables, figures, per-run metadata, and the failed,
    diverged and interrupted runs apart."""
    from autorecbench.results.collect import load_results
    from autorecbench.results.report import build_report, check_out, write_report

    check_out(out)
    results = load_results(paths)
    write_report(build_report(results, paths, baseline, kind, metric, title), out)
    out_console.print(f"report: {out} ({results.runs.height} complete run(s), {len(results.excluded)} excluded)",
                      highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(report)
