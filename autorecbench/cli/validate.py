"""``autorecbench validate method=NAME [--quick] [--seeds 0,1,2] [method.KEY=VALUE ...]``: planted-truth
validation of a search method (the harness is :mod:`autorecbench.validate.harness`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from autorecbench.console import out_console, print_error
from autorecbench.errors import UserError

log = logging.getLogger("autorecbench")

EPILOG = ("Examples:\n\n"
          "* `autorecbench validate method=esapn` (3 seeds, full budget; the verdict table and `validation/<time>_esapn/`)\n\n"
          "* `autorecbench validate method=darts --quick --seeds 0,1` (≤ 3 minutes per method on 2 CPU cores)\n\n"
          "* `autorecbench validate method=esapn method.norm_scope=selected` (validate a variant)\n\n"
          "Exit codes: 0 whatever the method's verdict; 1 when the references do not discriminate (the oracle fails "
          "or the null passes on the planted case, or something passes on the control: the harness is broken); "
          "2 for a user error.")
OVERRIDE_PREFIXES = ("method.", "model.", "device=")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must be distinct non-negative integers separated by commas (e.g. 0,1,2), got {text!r}")
    return seeds


def parse_arguments(arguments: list[str]) -> tuple[str, list[str]]:
    """``method=NAME`` and the overrides that may go with it."""
    names = [a.split("=", 1)[1] for a in arguments if a.startswith("method=")]
    if len(names) != 1 or not names[0]:
        raise UserError("say which method to validate, once: `autorecbench validate method=NAME`")
    overrides = [a for a in arguments if not a.startswith("method=")]
    for item in overrides:
        if item.startswith("-"):
            raise UserError(f"unknown option {item!r} (see `autorecbench validate --help`)")
        if "=" not in item or not item.startswith(OVERRIDE_PREFIXES):
            raise UserError(f"{item!r}: validate takes method.KEY=VALUE, model.KEY=VALUE and device=NAME overrides "
                            "(data, task and seeds are the validation's own)")
    return names[0], overrides


def validate(
    arguments: Annotated[Optional[list[str]], typer.Argument(
        help="`method=NAME`, then optional `method.KEY=VALUE`, `model.KEY=VALUE`, `device=cpu|cuda` overrides "
        "applied to the method and its references alike.", show_default=False)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="The small budget: ≤ 3 minutes per method on 2 CPU cores (a "
                                        "check of the harness; the full budget is what the README reports).")] = False,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds; each seeds the data and the runs.")] = "0,1,2",
) -> None:
    """Planted-truth validation of a search method: its statistics on a planted and a control case, beside an
    oracle (decisions from the truth) and a null (random or constant decisions), all through the same code.
    Prints the verdict table and writes `validation/<time>_<method>/` (`validation.parquet`, `run.json`)."""
    from autorecbench import envinfo
    from autorecbench.config import compose, resolve_device, validate as check_config
    from autorecbench.methods.base import all_methods
    from autorecbench.validate.base import load_validations
    from autorecbench.validate.harness import run_to_folder, summary_rows, verdict_lines

    name, overrides = parse_arguments(list(arguments or []))
    seed_list = parse_seeds(seeds)
    validations = load_validations()
    if name not in validations:
        known = ", ".join(sorted(validations))
        if name in all_methods():
            raise UserError(f"method {name!r} has no planted-truth validation (validations: {known})")
        raise UserError(f"unknown method {name!r}; methods with a validation: {known}")
    validation = validations[name]()
    if overrides and not validation.accepts_overrides:
        raise UserError(f"the {name} validation takes no overrides, got {' '.join(overrides)}")
    cfg = compose([f"method={name}", *overrides] if overrides else [])
    if overrides:
        check_config(cfg)  # every bad value is a user error now, before anything is written
    validation.overrides = tuple(overrides)
    device = resolve_device(str(cfg.device))
    info = {"overrides": overrides, "hardware": envinfo.hardware(device)}

    def progress(row, seconds: float) -> None:  # type: ignore[no-untyped-def]
        log.info("%s %s/%s seed %d: %s = %.4g (%s %g) [%.1fs]", row.method, row.case, row.subject, row.seed,
                 row.statistic, row.value, "pass" if row.passed else "fail", row.threshold, seconds)

    root = Path(str(cfg.paths.root)) / "validation"
    result, folder = run_to_folder(validation, seed_list, quick, root, info, progress)

    from rich.table import Table

    rows = summary_rows(validation, result)
    table = Table(title=f"validate {name} ({'quick' if quick else 'full'} budget, seeds {seeds})")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    out_console.print(table)
    for line in verdict_lines(result):
        out_console.print(line, highlight=False, soft_wrap=True)
    out_console.print(f"results: {folder}", highlight=False, soft_wrap=True)
    if not result.discriminates:
        print_error("the references do not discriminate: the harness or a case is broken (exit 1)")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Register the command on the CLI app."""
    app.command(epilog=EPILOG, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(validate)
