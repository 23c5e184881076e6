"""Reproducing the ESAPN paper's Table 1: the grid, the raw-file check, and the side-by-side printout.

``autorecbench reproduce table1`` (``make reproduce-table1``) runs FIXED, DARTS, AutoEmb and ESAPN on
ml-20m and ml-latest, binary and multiclass — 16 runs per seed through Hydra multirun with
``experiment=table1`` — and prints Table 1's layout: for every dataset, method and task our accuracy (%) and
loss (MSE for binary, CE for multiclass) beside the paper's, with the differences, then each method's
difference to FIXED, ours beside the paper's. The paper's numbers live in
``autorecbench/reproduce/esapn_table1.yaml`` with their source. Datasets the paper does not report
(``--data ml-latest-small``, ``ml-100k``) are shown beside a stand-in dataset's values (named in the table):
there the differences to FIXED are the comparable part.

Before anything runs, every dataset of the grid must have its raw file; otherwise the command stops with one
line naming, for each missing dataset, the file, the folder and the download.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from autorecbench.console import out_console
from autorecbench.errors import UserError

METHODS = ("fixed", "darts", "autoemb", "esapn")
TASKS = ("binary", "multiclass")
PAPER_DATASETS = ("ml-20m", "ml-latest")
LOSS = {"binary": "mse", "multiclass": "ce"}
LABELS = {"fixed": "FIXED", "darts": "DARTS", "autoemb": "AutoEmb", "esapn": "ESAPN"}
REFERENCE = Path(__file__).with_suffix(".yaml")


def paper_values() -> dict[str, Any]:
    """The paper's Table 1 and Table 2 (``esapn_table1.yaml`` beside this module) as plain dicts."""
    values = OmegaConf.to_container(OmegaConf.load(REFERENCE), resolve=True)
    assert isinstance(values, dict)
    return values


def experiment_override(extra: Sequence[str]) -> str:
    """``experiment=table1``, joined by the presets ``extra`` selects (e.g. ``experiment=slurm`` for a cluster:
    ``experiment=[table1,slurm]``)."""
    presets = [o.split("=", 1)[1].strip("[]") for o in extra if o.split("=", 1)[0] == "experiment"]
    return f"experiment=[{','.join(['table1', *presets])}]" if presets else "experiment=table1"


def grid_overrides(datasets: Sequence[str], seeds: Sequence[int], extra: Sequence[str]) -> list[str]:
    """The Hydra multirun overrides of the Table 1 grid (``extra``: overrides for every run, launchers too)."""
    return [
        experiment_override(extra),
        f"data={','.join(datasets)}",
        f"method={','.join(METHODS)}",
        f"task={','.join(TASKS)}",
        f"seed={','.join(str(s) for s in seeds)}",
        *[o for o in extra if o.split("=", 1)[0] != "experiment"],
    ]


def check_raw_files(datasets: Sequence[str], extra: Sequence[str]) -> None:
    """Stop before anything runs when a dataset's raw file is missing, naming every one of them."""
    from autorecbench.config import compose
    from autorecbench.data.cache import DatasetConfig, locate_source

    missing = []
    data_overrides = [o for o in extra if o.startswith(("data.", "paths."))]
    for name in datasets:
        cfg = DatasetConfig.from_mapping(compose([f"data={name}", *data_overrides]).data)
        if cfg.generator is None and locate_source(cfg) is None:
            files = " or ".join(s.file for s in cfg.sources)
            how = cfg.download or (f"download {cfg.url}" if cfg.url else "")
            missing.append(f"{name}: put {files} in {cfg.path}/ ({how})")
    if missing:
        raise UserError("Table 1 needs raw files that are missing, nothing was run. " + "; ".join(missing)
                        + ". Then run the same command again (or point data.path=... at a folder).")


# ------------------------------------------------------------------------------------------- the table

@dataclass
class Cell:
    ours: float | None
    std: float | None
    n: int
    paper: float | None


def _ours(rows: list[dict[str, Any]], dataset: str, task: str, method: str, metric: str) -> tuple[float | None, float | None, int]:
    for row in rows:
        if (row["dataset"], row["task"], row["method"]) == (dataset, task, method):
            mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
            scale = 100.0 if metric == "accuracy" else 1.0
            if mean is None:
                return None, None, int(row["n"])
            return mean * scale, (None if std is None or math.isnan(std) else std * scale), int(row["n"])
    return None, None, 0


def table1_cells(rows: list[dict[str, Any]], paper: dict[str, Any]) -> dict[str, dict[tuple[str, str, str], Cell]]:
    """Per dataset (in the results): (task, method, metric) -> our mean over seeds and the paper's value."""
    out: dict[str, dict[tuple[str, str, str], Cell]] = {}
    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: (d not in PAPER_DATASETS, d))
    for dataset in datasets:
        reference = paper["table1"].get(dataset) or paper["table1"].get(paper.get("stand_in", {}).get(dataset, ""), {})
        cells = {}
        for task in TASKS:
            for method in METHODS:
                for metric in ("accuracy", LOSS[task]):
                    ours, std, n = _ours(rows, dataset, task, method, metric)
                    value = reference.get(task, {}).get(method, {}).get(metric) if reference else None
                    cells[task, method, metric] = Cell(ours, std, n, value)
        out[dataset] = cells
    return out


def _num(value: float | None, metric: str, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    digits = 2 if metric == "accuracy" else 4
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table1_text_rows(dataset: str, cells: dict[tuple[str, str, str], Cell]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Header, Table 1 rows (ours, paper, Δ per metric), and the Δ-vs-FIXED rows (ours, paper)."""
    header = ["method"]
    for task in TASKS:
        for metric in ("accuracy", LOSS[task]):
            name = f"{task} {'acc %' if metric == 'accuracy' else metric.upper()}"
            header += [f"{name} ours", "paper", "Δ"]
    main, relative = [], []
    for method in METHODS:
        line, rel = [LABELS[method]], [LABELS[method]]
        for task in TASKS:
            for metric in ("accuracy", LOSS[task]):
                c = cells[task, method, metric]
                text = _num(c.ours, metric)
                if c.std is not None and text != "–":
                    text += f" ± {_num(c.std, metric)}"
                line += [text, _num(c.paper, metric), _num(_diff(c.ours, c.paper), metric, sign=True)]
                base = cells[task, "fixed", metric]
                rel += [_num(_diff(c.ours, base.ours), metric, sign=True), _num(_diff(c.paper, base.paper), metric, sign=True)]
        main.append(line)
        relative.append(rel)
    return header, main, relative


def render_table1(rows: list[dict[str, Any]], console: Console, fmt: str = "table") -> str | None:
    """Table 1's layout for every dataset among ``rows`` (compare's aggregated groups)."""
    paper = paper_values()
    text_out = []
    for dataset, cells in table1_cells(rows, paper).items():
        reference = dataset if dataset in paper["table1"] else paper.get("stand_in", {}).get(dataset)
        runs = sorted({c.n for c in cells.values() if c.n})
        title = (f"Table 1, {dataset}: ours (mean over {'/'.join(map(str, runs)) or 0} seed(s)) vs paper "
                 f"({reference or 'not reported'}{'' if reference in (dataset, None) else ', stand-in'})")
        header, main, relative = table1_text_rows(dataset, cells)
        rel_header = ["method"] + [f"{t} {'acc %' if m == 'accuracy' else m.upper()} {who}"
                                   for t in TASKS for m in ("accuracy", LOSS[t]) for who in ("ours", "paper")]
        if fmt == "markdown":
            from tabulate import tabulate

            text_out.append(f"**{title}**\n\n" + tabulate(main, headers=header, tablefmt="github", disable_numparse=True))
            text_out.append("Difference to FIXED\n\n" + tabulate(relative, headers=rel_header, tablefmt="github",
                                                                disable_numparse=True))
            continue
        for lines, head, name in ((main, header, title), (relative, rel_header, f"{dataset}: difference to FIXED, ours vs paper")):
            table = Table(title=name)
            for h in head:
                table.add_column(h, justify="left" if h == "method" else "right", no_wrap=True)
            for line in lines:
                table.add_row(*line)
            console.print(table)
    if fmt == "markdown":
        return "\n\n".join(text_out) + f"\n\nPaper values: {paper['source']}\n"
    console.print(f"[dim]paper values: {paper['source']} (autorecbench/reproduce/esapn_table1.yaml)[/]")
    return None


def table2_rows(paths: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Table 2 (memory) from ESAPN's binary runs: entities per size, total dims, FIXED, ratio — ours (from
    each run's ``embedding_sizes`` / ``embedding_memory`` reports) beside the paper's where it has one."""
    import polars as pl

    from autorecbench.results.run_folder import discover, read_record

    paper = paper_values()
    sizes = paper["table2"]["sizes"]
    header = ["run", "entity", *[str(d) for d in sizes], "total dims", "FIXED", "ratio %", "allocated MiB", "FIXED MiB"]
    lines = []
    for record in map(read_record, discover(paths)):
        info = record.info or {}
        if not record.complete or info.get("method") != "esapn" or info.get("task") != "binary":
            continue
        if not (record.path / "embedding_memory.parquet").is_file():
            continue
        by_size = pl.read_parquet(record.path / "embedding_sizes.parquet")
        memory = pl.read_parquet(record.path / "embedding_memory.parquet")
        dataset = str(info["dataset"])
        for entity in ("user", "item"):
            mine = {int(r["size"]): int(r["entities"]) for r in by_size.filter(pl.col("entity") == entity).iter_rows(named=True)}
            row = memory.filter(pl.col("entity") == entity).row(0, named=True)
            lines.append([f"{dataset} s{info['seed']}", entity, *[f"{mine.get(d, 0):,}" for d in sizes],
                          f"{row['total_dims']:,}", f"{row['fixed_dims']:,}", f"{100 * row['ratio']:.2f}",
                          f"{row['allocated_bytes'] / 2**20:.2f}", f"{row['fixed_bytes'] / 2**20:.2f}"])
            theirs = paper["table2"].get(dataset, {}).get(entity)
            if theirs and [int(d) for d in sizes] == sorted(mine):
                lines.append(["  paper", entity, *[f"{c:,}" for c in theirs["counts"]], f"{theirs['total_dims']:,}",
                              f"{theirs['fixed']:,}", f"{theirs['ratio']:.2f}", "–", "–"])
    return header, lines


def table1_from_results(paths: Sequence[str], console: Console, fmt: str = "table") -> str | None:
    """Aggregate runs with ``compare`` and print them in Table 1's layout."""
    from autorecbench.results.compare import compare

    cmp = compare(paths)  # the task's metrics: accuracy, and mse / ce where those tasks ran
    if cmp.n_runs == 0:
        raise UserError(f"no complete runs under {', '.join(paths)}")
    rows = [r for r in cmp.rows.to_dicts() if r["method"] in METHODS]
    if not rows:
        raise UserError(f"no runs of {', '.join(METHODS)} under {', '.join(paths)}")
    variants: dict[tuple[str, str, str], set[str]] = {}
    for r in rows:
        variants.setdefault((r["dataset"], r["task"], r["method"]), set()).add(r["variant"])
    mixed = {k: v for k, v in variants.items() if len(v) > 1}
    if mixed:
        (dataset, task, method), labels = next(iter(mixed.items()))
        raise UserError(f"runs of {method} on {dataset} ({task}) differ in settings ({' | '.join(sorted(labels))}): "
                        "pass the run folders of one configuration")
    text = render_table1(rows, console, fmt)
    header, lines = table2_rows(paths)
    if lines and fmt == "markdown":
        from tabulate import tabulate

        text = (text or "") + "\n**Table 2, ESAPN (binary): entities per embedding size at the end of the stream**\n\n" + \
            tabulate(lines, headers=header, tablefmt="github", disable_numparse=True) + "\n"
    elif lines:
        table = Table(title="Table 2, ESAPN (binary): entities per embedding size at the end of the stream")
        for h in header:
            table.add_column(h, justify="left" if h in ("run", "entity") else "right", no_wrap=True)
        for line in lines:
            table.add_row(*line)
        console.print(table)
    return text


# ------------------------------------------------------------------ the command (`autorecbench reproduce table1`)

CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}
EPILOG = ("Examples:\n\n"
          "* `autorecbench reproduce table1` (16 runs: ml-20m and ml-latest must be in data/raw/)\n\n"
          "* `autorecbench reproduce table1 --data ml-latest-small` (the same grid on a small real dataset)\n\n"
          "* `autorecbench reproduce table1 --data ml-100k runner.max_rows=5000` (a smoke version)\n\n"
          "* `autorecbench reproduce table1 experiment=slurm hydra.launcher.partition=gpu` (one SLURM job per run, "
          "4 GPUs at a time; `hydra/launcher=ray` for a Ray cluster)\n\n"
          "* `autorecbench reproduce table1 --show results/table1` (print runs made before)")


def command(
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="Extra Hydra overrides for every run, e.g. `device=cuda` or `runner.max_rows=5000`.", show_default=False)] = None,
    data: Annotated[str, typer.Option("--data", help="Comma-separated datasets (the paper: ml-20m,ml-latest).")] = "ml-20m,ml-latest",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds; results are means over them.")] = "0",
    jobs: Annotated[int, typer.Option("--jobs", help="Runs in parallel (Hydra's joblib launcher); 1 runs them in turn. "
                                      "For a cluster give a launcher instead: `experiment=slurm` or `hydra/launcher=...`.")] = 1,
    show: Annotated[Optional[list[str]], typer.Option("--show", help="Run nothing: print Table 1 from these run folders or folders of runs.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | markdown")] = "table",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log lines only, no progress bars.")] = False,
) -> None:
    """ESAPN paper (SIGIR 2020) Table 1: FIXED, DARTS, AutoEmb, ESAPN × datasets × binary, multiclass.

    Checks every raw file first and stops, naming what to download and where, if one is missing. Then runs
    the grid with `experiment=table1` (runs land in `results/table1/`) and prints our accuracy and loss beside
    the paper's, with the differences, and each method's difference to FIXED (ours and the paper's).
    """
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

    from autorecbench.config import compose
    from autorecbench.launch import chosen_launcher, launch_runs, new_run_folders, run_folders_in

    if jobs > 1:
        launcher = chosen_launcher(grid_overrides(datasets, seed_list, extra))
        if launcher != "basic":
            raise UserError(f"--jobs runs the grid with the joblib launcher, not with hydra/launcher={launcher}: "
                            "set that launcher's own parallelism (e.g. hydra.launcher.array_parallelism)")
        extra += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    results = Path(str(compose([experiment_override(extra),
                                *[o for o in extra if o.startswith("paths.")]]).paths.results_dir))
    before = run_folders_in(results)
    code = launch_runs([*grid_overrides(datasets, seed_list, extra), *(["quiet=true"] if quiet else [])], multirun=True)
    new = new_run_folders(results, before)
    if not new:
        raise UserError(f"no runs were written to {results}")
    text = table1_from_results([str(p) for p in new], out_console, fmt)
    if text is not None:
        out_console.out(text, end="", highlight=False)
    if code:  # a failed or diverged run: the table shows the others, the exit code says so
        raise SystemExit(code)
