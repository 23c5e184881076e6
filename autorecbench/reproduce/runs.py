"""What the grid reproductions share: stopping before any run when raw files are missing, running one
configuration in process and reading its results back, seeds from the command line, and printing a table."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import polars as pl
import typer

from autorecbench.console import out_console
from autorecbench.errors import UserError

log = logging.getLogger("autorecbench")

# Command-line options the reproductions share.
Small = Annotated[bool, typer.Option("--small", help="Small synthetic stand-ins: a check of the pipeline, not a reproduction.")]
Seeds = Annotated[str, typer.Option("--seeds", help="Comma-separated seeds; cells show mean ± std over them.")]
Format = Annotated[str, typer.Option("--format", help="table | markdown")]
Extra = Annotated[Optional[list[str]], typer.Argument(help="Further overrides for every run, e.g. device=cuda runner.max_rows=2000000.")]


def main(command: Any) -> None:
    """Run a reproduction's ``command`` on its own (``python -m autorecbench.reproduce.MODULE``)."""
    from autorecbench.console import run_app

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    run_app(app)


def check_format(fmt: str) -> None:
    if fmt not in ("table", "markdown"):
        raise UserError(f"--format must be table or markdown, got {fmt!r}")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {text!r}") from None
    return seeds or [0]


def require_raw_data(datasets: Mapping[str, Sequence[str]], small_hint: str) -> None:
    """Stop (one line) before any run when a dataset's raw files are missing; ``datasets``: name -> overrides."""
    from autorecbench.config import compose
    from autorecbench.data.cache import DatasetConfig, locate_sources, missing_message

    missing = []
    for overrides in datasets.values():
        cfg = DatasetConfig.from_mapping(compose(list(overrides)).data)
        if cfg.generator is None and locate_sources(cfg) is None:
            missing.append(missing_message(cfg))
    if missing:
        raise UserError("raw data missing, nothing run: " + " | ".join(missing) + f" (or run {small_hint})")


def run_once(overrides: Sequence[str], label: str) -> Path:
    """Compose, check and run one configuration in this process; the finished run folder."""
    from autorecbench.config import compose, validate
    from autorecbench.execute import execute

    cfg = compose(list(overrides))
    validate(cfg)
    log.info("%s", label)
    return execute(cfg, list(overrides))


def run_metrics(folder: Path, split: str) -> dict[str, float]:
    """One split's metrics of a finished run (``test``, ``valid``, ``cost``, ``fit``)."""
    frame = pl.read_parquet(folder / "metrics.parquet").filter(pl.col("split") == split)
    return dict(zip(frame["metric"].to_list(), frame["value"].to_list()))


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``mean ± std`` over seeds (``mean`` alone for one value, ``–`` for none)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def show(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, output: Path | None = None) -> None:
    """Print the table (``table``: rich, ``markdown``: text); ``output``: also write it there as markdown."""
    if fmt == "markdown":
        out_console.print(f"**{title}**\n\n" + markdown(header, rows) + "\n", highlight=False, soft_wrap=True)
    else:
        from rich.table import Table

        table = Table(title=title)
        for name in header:
            table.add_column(name, overflow="fold")
        for row in rows:
            table.add_row(*[str(c) for c in row])
        out_console.print(table)
    if output is not None:
        output.write_text(markdown(header, rows) + "\n")
        out_console.print(f"written: {output}", highlight=False)


def finish(output: Path | None, text: str, small: bool) -> None:
    """Write the markdown ``text`` to ``output`` (when given) and, for ``--small``, say the numbers are a check."""
    if output is not None:
        output.write_text(text)
        out_console.print(f"written: {output}", highlight=False)
    if small:
        out_console.print("synthetic stand-ins: the paper's rows show the layout, they are not comparable",
                          highlight=False)
