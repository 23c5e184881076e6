"""The ``autorecbench`` command line (Typer). Runs are composed by Hydra from ``conf/``."""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from autorecbench import __version__
from autorecbench.cli import export, plot, report, runs, tune, validate
from autorecbench.cli.reproduce import reproduce_app
from autorecbench.console import err_console, out_console, run_app, setup_logging
from autorecbench.errors import UserError

log = logging.getLogger("autorecbench")

app = typer.Typer(
    help="Run and compare AutoML methods for deep recommender systems, fairly, fast and reproducibly.\n\n"
    "Typical use: `autorecbench run method=fixed data=ml-100k`, then `autorecbench compare results/`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
data_app = typer.Typer(help="Datasets: where their raw files go, preparing the cache, inspecting it.",
                       no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(data_app, name="data")
app.add_typer(reproduce_app, name="reproduce")


def _version(value: bool) -> None:
    if value:
        out_console.print(f"autorecbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    setup_logging()


# ------------------------------------------------------------------------------------------------ run

@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Examples:\n\n"
    "* `autorecbench run` (FIXED on ml-100k, streaming, binary)\n\n"
    "* `autorecbench run method=fixed data=ml-latest-small task=multiclass seed=3 method.embedding_dim=64`\n\n"
    "* `autorecbench run -m seed=0,1,2` (one run per seed; add `hydra/launcher=joblib` to run them in parallel)\n\n"
    "* `autorecbench run -m seed=0,1,2 experiment=slurm hydra.launcher.partition=gpu` (one SLURM job per run; "
    "also `hydra/launcher=submitit_local`, `hydra/launcher=ray`)\n\n"
    "* `torchrun --nproc_per_node=4 -m autorecbench run data=criteo model=deepfm` (one data-parallel run on 4 GPUs)",
)
def run(
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="Hydra overrides: `data=NAME`, `method=NAME`, `task=binary|multiclass`, `seed=N`, `device=cpu|cuda`, "
        "`key.sub=value` for any config value; with -m, comma lists sweep.", show_default=False)] = None,
    multirun: Annotated[bool, typer.Option("--multirun", "-m", help="Sweep over every combination of comma-separated values.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log lines only, no progress bar.")] = False,
    show_config: Annotated[bool, typer.Option("--show-config", help="Print the composed config and exit without running.")] = False,
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="CTR data: drop malformed raw rows (counted and reported) instead of stopping at the first.")] = False,
) -> None:
    """Run a method on a dataset and write its results folder (metrics and the runner's tables in Parquet).

    Exit code 0: complete; 1: a run failed (one line here, the traceback in its run.json); 2: bad input, nothing
    run; 3: a run diverged (status `diverged`). A sweep runs every job and exits with the worst of them."""
    from omegaconf import OmegaConf

    from autorecbench.launch import compose_runs, launch_runs

    overrides = list(overrides or [])
    for item in overrides:
        if item.startswith("-"):
            raise UserError(f"unknown option {item!r} (see `autorecbench run --help`)")
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
    if quiet:
        overrides.append("quiet=true")
    if skip_bad_rows:
        overrides.append("data.skip_bad_rows=true")
    configs = compose_runs(overrides, multirun)
    if show_config:
        out_console.out(OmegaConf.to_yaml(configs[0], resolve=True), highlight=False)
        return
    code = launch_runs(overrides, multirun, configs)
    if code:
        raise typer.Exit(code)


# -------------------------------------------------------------------------------------------- compare

@app.command()
def compare(
    paths: Annotated[list[str], typer.Argument(help="Run folders, folders of runs, or globs (e.g. `results/`).")],
    baseline: Annotated[Optional[str], typer.Option("--baseline", "-b", help="Method to compare against: adds Δ and a t-test across seeds.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | markdown | csv | latex | json")] = "table",
    metric: Annotated[Optional[list[str]], typer.Option("--metric", help="Metric(s) to show (default: the task's headline metrics).")] = None,
    split: Annotated[str, typer.Option("--split", help="auto (each run's headline split: eval for streaming runs, test for offline ones), eval (the evaluation window), all (the whole stream), test or valid (offline).")] = "auto",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the export to this file.")] = None,
) -> None:
    """Line runs up by dataset × task × method: mean ± std over seeds, n, optional deltas vs a baseline.

    Diverged runs are listed apart, and so are failed, interrupted, running and unreadable ones (a damaged
    run.json or metrics.parquet: "unreadable: reason"); none enters the means, the rest compares normally.
    """
    from autorecbench.results.compare import compare as do_compare
    from autorecbench.results.compare import render, write

    cmp = do_compare(paths, baseline=baseline, metrics=metric, split=split)
    if cmp.n_runs == 0:
        render(cmp, "table", err_console)
        raise UserError(f"no complete runs under {', '.join(paths)} ({len(cmp.incomplete)} incomplete)")
    text = render(cmp, fmt, out_console)
    if text is not None:
        write(text, output, out_console)
    elif output is not None:
        raise UserError("--output needs --format markdown, csv, latex or json")


# ------------------------------------------- plot, report, export, tune; resume, runs, clean (cli/runs.py)

plot.register(app)
report.register(app)
export.register(app)
tune.register(app)
validate.register(app)
runs.register(app)


# ------------------------------------------------------------------------------------------- methods

@app.command()
def methods() -> None:
    """List the registered methods: the protocol each runs under, how faithful it is to its paper and official
    code (faithful / faithful, deviations documented / not faithful), a one-line summary of the deviations, and
    whether it trains data-parallel under torchrun; then the CTR backbones (``model=``) the same way."""
    from rich.markup import escape
    from rich.table import Table

    from autorecbench.config import group_options
    from autorecbench.methods.base import all_methods
    from autorecbench.runners.base import RUNNERS, runner_class
    from autorecbench.models.registry import load_models

    runner_class("offline")  # imports every runner module
    protocol_refusals = {r.protocol: r.data_parallel_refusal for r in RUNNERS.values()}
    table = Table(title="Registered methods")
    for column in ("name", "protocol", "fidelity", "deviations (config switches in the docstring)", "description",
                   "paper", "data-parallel (torchrun)", "package"):
        table.add_column(column, overflow="fold")
    configured = group_options("method")
    for name, by_protocol in sorted(all_methods().items()):
        for protocol, cls in by_protocol.items():
            fidelity = cls.fidelity
            if name not in configured:
                fidelity += " (no conf/method YAML)"
            # Plugins (entry point autorecbench.methods) show the package they come from.
            refusal = protocol_refusals.get(protocol) or cls.data_parallel_refusal
            table.add_row(name, protocol, fidelity, cls.deviations or "–", cls.description, cls.paper,
                          f"no: {refusal}" if refusal else "yes", cls.__module__.split(".")[0])
    out_console.print(table)
    backbones = Table(title="Registered backbones (model=)")
    for column in ("name", "fidelity", "deviations (config switches in the docstring)", "behaviour sequences", "paper"):
        backbones.add_column(column, overflow="fold")
    for name, cls in sorted(load_models().items()):
        if not hasattr(cls, "fidelity"):
            continue
        sequences = ("required" if getattr(cls, "requires_sequences", False)
                     else "sum-pooled" if getattr(cls, "uses_sequences", False) else "ignored")
        backbones.add_row(name, cls.fidelity, escape(cls.deviations or "–"), sequences, cls.paper)
    out_console.print(backbones)


# ---------------------------------------------------------------------------------------------- data

def _dataset_names() -> list[str]:
    from autorecbench.config import group_options

    return group_options("data")


def _dataset_config(name: str, overrides: list[str] | None):  # type: ignore[no-untyped-def]
    from autorecbench.config import compose
    from autorecbench.data.cache import DatasetConfig

    if name not in _dataset_names():
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(_dataset_names())}")
    cfg = compose([f"data={name}", *(overrides or [])])
    return DatasetConfig.from_mapping(cfg.data)


def _span(schema) -> str:  # type: ignore[no-untyped-def]
    def day(ts: int) -> str:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")

    return f"{day(schema.time_min)} .. {day(schema.time_max)}"


def _summary(s) -> str:  # type: ignore[no-untyped-def]
    """One line of counts: users/items/time span for ratings, splits/fields/click rate for CTR data."""
    if s.label == "rating":
        return f"{s.n_rows:,} rows, {s.n_users:,} users, {s.n_items:,} items, {_span(s)}"
    splits = s.splits or {}
    positives = sum(s.extra.get("positives", {}).values())
    span = f", {_span(s)}" if s.time_max else ""
    histories = ""
    if s.sequence_fields:
        names = ", ".join(f"{f.name} (shares {f.shares_table_with})" for f in s.sequence_fields)
        histories = (f", histories {names}, T = {s.sequence_fields[0].length}, mean length "
                     f"{s.extra.get('mean_history_length', 0):.1f}")
    return (f"{s.n_rows:,} rows (train {splits.get('train', 0):,} / valid {splits.get('valid', 0):,} / test "
            f"{splits.get('test', 0):,}, split {s.extra.get('split', {}).get('rule', '?')}), {len(s.fields)} fields, "
            f"{sum(f.cardinality for f in s.fields):,} feature values, {positives / max(s.n_rows, 1):.1%} clicks{span}"
            f"{histories}")


@data_app.command("list")
def data_list() -> None:
    """Every configured dataset, whether its raw files are present, and where they are expected."""
    from rich.table import Table

    from autorecbench.data.cache import cached, locate_source, source_names

    table = Table(title="Datasets")
    for column in ("name", "raw files", "cache", "expected location", "description"):
        table.add_column(column, overflow="fold")
    for name in _dataset_names():
        cfg = _dataset_config(name, None)
        if cfg.generator is not None:
            raw = "generated on demand"
        else:
            found = locate_source(cfg)
            raw = f"[green]present[/] ({found[0].name})" if found else "[red]missing[/]"
        hit = cached(cfg)
        cache = f"{hit.schema.n_rows:,} rows" if hit else "–"
        files = " or ".join(", ".join(source_names(cfg, s)) for s in cfg.sources)
        table.add_row(name, raw, cache, f"{cfg.path}/{files}", cfg.description)
    out_console.print(table)


@data_app.command("prepare", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def data_prepare(
    name: Annotated[str, typer.Argument(help="Dataset name (see `autorecbench data list`).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Overrides of the data config, e.g. `data.path=/x`.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild the cache even if it is up to date.")] = False,
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="CTR data: drop malformed raw rows (counted and reported) instead of stopping at the first.")] = False,
) -> None:
    """Validate the raw files and build the Parquet cache (reused when nothing changed)."""
    from autorecbench.data.cache import prepare

    cfg = _dataset_config(name, [*(overrides or []), *(["data.skip_bad_rows=true"] if skip_bad_rows else [])])
    started = time.perf_counter()
    prepared = prepare(cfg, force=force)
    s = prepared.schema
    state = "cache reused" if prepared.reused else f"cache built in {time.perf_counter() - started:.1f}s"
    out_console.print(f"{s.dataset}: {_summary(s)} ({state})\ncache: {prepared.directory}",
                      highlight=False, soft_wrap=True)
    if s.extra.get("skipped_rows"):
        out_console.print(f"skipped {s.extra['skipped_rows']:,} malformed row(s); first: {s.extra['first_skipped']}",
                          highlight=False, soft_wrap=True)
    if s.expected:
        got = s.counts()
        diff = {k: (v, got[k]) for k, v in s.expected.items() if k in got and got[k] != v}
        if diff:
            log.warning("counts differ from the published ones: %s",
                        ", ".join(f"{k} expected {a:,}, got {b:,}" for k, (a, b) in diff.items()))


@data_app.command("info", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def data_info(
    name: Annotated[str, typer.Argument(help="Dataset name (see `autorecbench data list`).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Overrides of the data config.", show_default=False)] = None,
) -> None:
    """Show a dataset's config, raw-file status and, once prepared, its cached statistics."""
    import polars as pl

    from autorecbench.data.cache import cached, locate_source

    cfg = _dataset_config(name, overrides)
    lines = [f"[bold]{cfg.name}[/]: {cfg.description}", f"raw folder: {cfg.path}",
             f"files: {' or '.join(f'{s.file} ({s.format})' for s in cfg.sources)}"]
    if cfg.url:
        lines.append(f"download: {cfg.url}")
    if cfg.license:
        lines.append(f"licence: {cfg.license}")
    lines.append(f"options: {cfg.options()}")
    hit = cached(cfg)
    if hit is None:
        present = cfg.generator is not None or locate_source(cfg) is not None
        lines.append("cache: none yet; run `autorecbench data prepare " + name + "`" if present
                     else f"raw files: missing ({cfg.download or cfg.url})")
    elif hit.schema.label == "rating":
        s = hit.schema
        ratings = pl.read_parquet(hit.interactions_path, columns=["rating"])["rating"].value_counts().sort("rating")
        hist = ", ".join(f"{r:g}: {c:,}" for r, c in ratings.iter_rows())
        lines += [
            f"rows: {s.n_rows:,} (file: {s.rows_in_file:,})   users: {s.n_users:,}   items: {s.n_items:,}",
            f"time span: {_span(s)}",
            f"ratings: {hist}",
            f"source: {s.source['path']} ({s.source['bytes']:,} bytes, sha256 {s.source['sha256'][:16]}…)",
            f"cache: {hit.directory} (fingerprint {s.fingerprint[:16]}, built {s.created_at})",
        ]
    else:
        s = hit.schema
        lines += [
            f"rows: {_summary(s)} (file: {s.rows_in_file:,}; skipped {s.extra.get('skipped_rows', 0):,})",
            f"split: {s.extra.get('split')}",
            "fields (cardinality incl. OOV and missing): "
            + ", ".join(f"{f.name} {f.cardinality:,}" for f in s.fields),
            *[f"source: {f['path']} ({f['bytes']:,} bytes, sha256 {f['sha256'][:16]}…)" for f in s.source.get("files", [])],
            f"cache: {hit.directory} (fingerprint {s.fingerprint[:16]}, built {s.created_at})",
        ]
    out_console.print("\n".join(lines), highlight=False, soft_wrap=True)


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Dataset to fetch: ml-100k (from the recbole wheel on PyPI), or any dataset with --from.")],
    source: Annotated[Optional[Path], typer.Option("--from", help="Copy the raw files from this local folder instead.")] = None,
) -> None:
    """Put a dataset's raw files in place: ml-100k from PyPI's recbole wheel, or any dataset from a local copy."""
    from autorecbench.data.fetch import copy_from, fetch_ml100k

    cfg = _dataset_config(name, None)
    target = Path(cfg.path)
    if source is not None:
        copied = copy_from(source, target, [s.file for s in cfg.sources])
    elif name == "ml-100k":
        copied = fetch_ml100k(target)
    else:
        raise UserError(f"no automatic download for {name!r}: {cfg.download or cfg.url} (or use --from DIR)")
    out_console.print(f"{name}: {', '.join(p.name for p in copied)} -> {target}", highlight=False, soft_wrap=True)


def main() -> None:
    run_app(app)

