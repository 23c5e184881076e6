"""The run lifecycle commands: ``resume`` an interrupted run from its checkpoint, list ``runs`` with their
status, ``clean --stale`` what interrupted runs and killed cache builds left behind. ``cli/app.py`` adds them
with :func:`register`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from autorecbench.console import out_console
from autorecbench.errors import UserError


def _default_results() -> list[str]:
    from autorecbench.config import compose

    return [str(compose([]).paths.results_dir)]


def _records(paths: list[str]) -> list:  # type: ignore[type-arg]
    from autorecbench.results.run_folder import discover, read_record

    return [read_record(p) for p in discover(paths)]


# ---------------------------------------------------------------------------------------------- resume

def resume(
    runs: Annotated[Optional[list[str]], typer.Argument(help="Run folders (`results/<run>.partial`); with --all, folders of runs.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Resume every interrupted run with a checkpoint under the given folders (default: results/).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log lines only, no progress bar.")] = False,
) -> None:
    """Continue interrupted runs from their last checkpoint, into their normal complete folders.

    The run goes on with the config, data and device it started with, and ends with the same numbers as a run
    that was never stopped (same seed, same device). A run that had written everything but was killed before
    its folder was published is just published. Exit codes as `run`: 0, 1 failed, 2 nothing to resume, 3
    diverged."""
    from autorecbench.launch import run_and_report, worst

    paths = list(runs or [])
    if all_:
        records = _records(paths or _default_results())
        folders = [r.path for r in records if r.status == "interrupted" and r.resumable]
        if not folders:
            raise UserError(f"no interrupted run with a checkpoint under {', '.join(paths or _default_results())}")
    elif not paths:
        raise UserError("name the run folder(s) to resume, or --all [FOLDER] for every interrupted one")
    else:
        folders = [Path(p) for p in paths]
    codes = []
    for folder in folders:
        codes.append(run_and_report(lambda on_folder, f=folder: _resume_one(f, quiet, on_folder)))
    code = worst(codes)
    if code:
        raise typer.Exit(code)


def _resume_one(folder: Path, quiet: bool, on_folder: Callable[[Path], None]) -> Path:
    from autorecbench.execute import execute, load_resume, publish
    from autorecbench.launch import check_writable, progress_for

    cfg, point = load_resume(folder)
    check_writable(folder, "run folder")
    if point is None:
        return publish(folder)
    return execute(cfg, list(point.info.get("overrides", [])), progress_for(cfg, quiet), on_folder=on_folder,
                   resume=point)


# ------------------------------------------------------------------------------------------------ runs

def _age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _progress(info: dict) -> str:  # type: ignore[type-arg]
    position = (info.get("checkpoint") or {}).get("position")
    if not position:
        return "–"
    if position.get("unit") == "batches":
        return f"batch {position['done']:,}/{position['total']:,} ({position['done'] / max(position['total'], 1):.0%})"
    return f"{position.get('stage')} epoch {position.get('epoch')}/{position.get('epochs')}, step {position.get('step'):,}"


def runs(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Run folders, folders of runs, or globs (default: results/).", show_default=False)] = None,
) -> None:
    """List runs with their status: complete, running, interrupted — resumable / — no checkpoint, failed,
    diverged, unreadable; the last checkpoint's position and the last sign of life."""
    from rich.table import Table

    from autorecbench.results.checkpoint import heartbeat_age

    paths = list(paths or _default_results())
    records = _records(paths)
    if not records:
        raise UserError(f"no runs found under {', '.join(paths)}")
    table = Table(title=f"{len(records)} run(s)")
    for column in ("run", "status", "checkpoint", "last heartbeat", "process", "error / reason"):
        table.add_column(column, overflow="fold")
    for record in records:
        info = record.info or {}
        process = f"{info['pid']} on {info.get('host')}" if info.get("pid") else "–"
        error = (record.error or "").split("\n")[0][:200] if record.status != "unreadable" else ""
        position = "–" if record.complete else _progress(info)
        table.add_row(record.path.name, record.label, position, _age(heartbeat_age(info)), process, error)
    out_console.print(table)


# ----------------------------------------------------------------------------------------------- clean

def clean(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Folders of runs (default: results/).", show_default=False)] = None,
    stale: Annotated[bool, typer.Option("--stale", help="Remove interrupted runs without a checkpoint, checkpoints left in complete runs, and temporary cache folders of killed builds.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
) -> None:
    """Remove what interrupted work left behind (`--stale`): interrupted run folders without a checkpoint
    (nothing to resume), checkpoints left in complete runs, and the temporary folders of cache builds whose
    process is gone (and caches replaced more than an hour ago). Asks first unless `--yes`."""
    import shutil

    from autorecbench.config import compose
    from autorecbench.data.atomic import orphans
    from autorecbench.results.checkpoint import CHECKPOINT_DIR, has_checkpoint

    if not stale:
        raise UserError("say what to clean: `autorecbench clean --stale` (see --help)")
    cfg = compose([])
    doomed: list[tuple[Path, str]] = []
    for record in _records(list(paths or [str(cfg.paths.results_dir)])):
        if record.status == "interrupted" and not record.resumable:
            doomed.append((record.path, "interrupted run, no checkpoint"))
        elif record.status == "missing-run-json" and time.time() - record.path.stat().st_mtime > 60:
            doomed.append((record.path, "run killed before it started"))
        elif record.complete and has_checkpoint(record.path):
            doomed.append((record.path / CHECKPOINT_DIR, "checkpoint of a complete run"))
    for parent in (Path(str(cfg.paths.processed_dir)), Path(str(cfg.paths.data_dir)) / "raw" / "synthetic"):
        doomed += [(p, "temporary folder of a killed build" if ".tmp-" in p.name else "replaced cache")
                   for p in orphans(parent)]
    if not doomed:
        out_console.print("nothing stale to remove", highlight=False)
        return
    for path, why in doomed:
        out_console.print(f"{path}  ({why})", highlight=False, soft_wrap=True)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"{len(doomed)} item(s) to remove: run again with --yes to remove them without asking")
        typer.confirm(f"Remove these {len(doomed)} item(s)?", abort=True)
    for path, _ in doomed:
        shutil.rmtree(path, ignore_errors=True)
    out_console.print(f"removed {len(doomed)} item(s)", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(resume)
    app.command("runs")(runs)
    app.command()(clean)
