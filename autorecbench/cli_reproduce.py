"""``autorecbench reproduce``: run a paper's experiment grid and print it beside the paper's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autorecbench.console import out_console
from autorecbench.errors import UserError

reproduce_app = typer.Typer(help="Reproduce a paper's table: run its grid, print ours beside the paper's values.",
                            no_args_is_help=True, rich_markup_mode="markdown")


def _snapshot(results: Path) -> set[Path]:
    return {p for p in results.iterdir() if p.is_dir()} if results.is_dir() else set()


@reproduce_app.command(
    "table1",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Examples:\n\n"
    "* `autorecbench reproduce table1` (16 runs: ml-20m and ml-latest must be in data/raw/)\n\n"
    "* `autorecbench reproduce table1 --data ml-latest-small` (the same grid on a small real dataset)\n\n"
    "* `autorecbench reproduce table1 --data ml-100k runner.max_rows=5000` (a smoke version)\n\n"
    "* `autorecbench reproduce table1 --show results/table1` (print runs made before)",
)
def table1(
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="Extra Hydra overrides for every run, e.g. `device=cuda` or `runner.max_rows=5000`.", show_default=False)] = None,
    data: Annotated[str, typer.Option("--data", help="Comma-separated datasets (the paper: ml-20m,ml-latest).")] = "ml-20m,ml-latest",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds; results are means over them.")] = "0",
    jobs: Annotated[int, typer.Option("--jobs", help="Runs in parallel (Hydra's joblib launcher); 1 runs them in turn.")] = 1,
    show: Annotated[Optional[list[str]], typer.Option("--show", help="Run nothing: print Table 1 from these run folders or folders of runs.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | markdown")] = "table",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log lines only, no progress bars.")] = False,
) -> None:
    """ESAPN paper (SIGIR 2020) Table 1: FIXED, DARTS, AutoEmb, ESAPN × datasets × binary, multiclass.

    Checks every raw file first and stops, naming what to download and where, if one is missing. Then runs
    the grid with `experiment=table1` (runs land in `results/table1/`) and prints our accuracy and loss beside
    the paper's, with the differences, and each method's difference to FIXED (ours and the paper's).
    """
    from autorecbench.reproduce import check_raw_files, grid_overrides, table1_from_results

    if fmt not in ("table", "markdown"):
        raise UserError(f"unknown format {fmt!r}; choose table or markdown")
    if show:
        text = table1_from_results(show, out_console, fmt)
        if text is not None:
            out_console.out(text, end="", highlight=False)
        return
    datasets = [d.strip() for d in data.split(",") if d.strip()]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if not datasets or not seed_list:
        raise UserError("--data and --seeds need at least one value each")
    if jobs < 1:
        raise UserError("--jobs must be >= 1")
    extra = list(overrides or [])
    for item in extra:
        if item.startswith("-") or "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
    check_raw_files(datasets, extra)

    from autorecbench.cli import run
    from autorecbench.config import compose

    if jobs > 1:
        extra += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    results = Path(str(compose(["experiment=table1", *[o for o in extra if o.startswith("paths.")]]).paths.results_dir))
    before = _snapshot(results)
    run(overrides=grid_overrides(datasets, seed_list, extra), multirun=True, quiet=quiet, show_config=False)
    new = sorted(_snapshot(results) - before)
    if not new:
        raise UserError(f"no runs were written to {results}")
    text = table1_from_results([str(p) for p in new], out_console, fmt)
    if text is not None:
        out_console.out(text, end="", highlight=False)


def _register_autoloss_table2() -> None:
    """`autorecbench reproduce autoloss-table2` is the same command as `python -m autorecbench.reproduce_autoloss`."""
    from autorecbench.reproduce_autoloss import main as autoloss_table2

    reproduce_app.command(
        "autoloss-table2",
        help="AutoLoss paper (KDD 2021) Table 2 (+ Table 3's AL-1, AL-2): Criteo, ML-20m × DeepFM, IPNN × the "
             "losses, beside the paper's numbers. Stops with download instructions if a raw file is missing; "
             "`--small` runs synthetic stand-ins in seconds.",
        epilog="Examples:\n\n"
        "* `autorecbench reproduce autoloss-table2 --small` (pipeline check on synthetic stand-ins)\n\n"
        "* `autorecbench reproduce autoloss-table2 --seeds 0,1,2 device=cuda`",
    )(autoloss_table2)


_register_autoloss_table2()
