"""``make reproduce-autoloss-table2``: the AutoLoss paper's Table 2 (and its Table 3 ablations), our numbers
printed beside the published ones.

Grid: Criteo (binary, AUC and logloss) and ML-20m (5 classes, one-vs-rest AUC and cross-entropy) × DeepFM and
IPNN × the nine columns of Table 2 — Focal, KL, Hinge, CE, MeLU, BOHB, DARTS, SLF, AutoLoss — plus Table 3's
AL-1 and AL-2 on Criteo. Every implemented column is a run of ``method=autoloss`` with its ``method.variant``
(one code path for AutoLoss and its baselines); MeLU, BOHB and SLF are other papers' methods this package
does not implement, and their cells say so instead of showing a number. The published numbers come from one
file, ``autorecbench/reproduce/autoloss_table2.yaml``, with its source.

``--small`` runs the same grid on small synthetic stand-ins (a Criteo-format file with planted interactions,
a synthetic MovieLens 5-class file), in seconds: a check that the whole pipeline works, not a reproduction —
the paper's column is printed beside it only for the layout. Without ``--small`` the raw files must be in
place; if one is missing, the command stops before running anything and says where to get it.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import polars as pl
import typer
import yaml

from autorecbench.console import out_console, run_app, setup_logging
from autorecbench.errors import UserError

log = logging.getLogger("autorecbench")
REFERENCE = Path(__file__).with_suffix(".yaml")
# Table 2's columns and the method.variant that runs each (None: another paper's method, not implemented).
TABLE2 = {"Focal": "focal", "KL": "kl", "Hinge": "hinge", "CE": "ce", "MeLU": None, "BOHB": None,
          "DARTS": "darts", "SLF": None, "AutoLoss": "autoloss"}
TABLE3 = {"AL-1": "al1", "AL-2": "al2", "AutoLoss": "autoloss"}
MODELS = ("deepfm", "ipnn")
# dataset -> (overrides, metric names of our runs for the paper's AUC and Logloss rows)
DATASETS: dict[str, tuple[list[str], tuple[str, str]]] = {
    "criteo": (["data=criteo", "task=binary"], ("auc", "logloss")),
    "ml-20m": (["data=ml-20m", "task=multiclass"], ("auc", "ce")),
}
# --small: synthetic stand-ins of the same shape (a Criteo-format click file; MovieLens ratings, 5 classes).
SMALL: dict[str, list[str]] = {
    "criteo": ["data=synthetic-criteo", "task=binary", "data.generator.rows=6000", "data.generator.n_fields=8",
               "data.generator.n_informative=4", "data.generator.n_pairs=2", "data.generator.cardinality_max=20",
               "runner.epochs=2", "runner.batch_size=500"],
    "ml-20m": ["data=synthetic", "task=multiclass", "data.generator.n_users=200", "data.generator.n_items=100",
               "data.generator.n_interactions=6000", "runner.epochs=2", "runner.batch_size=500"],
}
NOT_IMPLEMENTED = "not implemented"


@dataclass
class Cell:
    """One (dataset, model, column) of the grid: the runs behind it and their test metrics."""

    dataset: str
    model: str
    column: str
    variant: str | None
    values: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, metric: str) -> float | None:
        vals = self.values.get(metric, [])
        return statistics.fmean(vals) if vals else None

    def std(self, metric: str) -> float | None:
        vals = self.values.get(metric, [])
        return statistics.stdev(vals) if len(vals) > 1 else None


def load_reference(path: Path = REFERENCE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def check_raw_data(datasets: list[str]) -> None:
    """Stop (UserError, one line) before any run when a dataset's raw files are missing."""
    from autorecbench.config import compose
    from autorecbench.data.cache import DatasetConfig, locate_sources, missing_message

    missing = []
    for name in datasets:
        cfg = DatasetConfig.from_mapping(compose(DATASETS[name][0]).data)
        if locate_sources(cfg) is None:
            missing.append(missing_message(cfg))
    if missing:
        raise UserError("raw data missing, nothing run: " + " | ".join(missing)
                        + " (or run `make reproduce-autoloss-table2 ARGS=--small` for the synthetic stand-ins)")


def grid(datasets: list[str], models: list[str], ablations: bool) -> list[Cell]:
    cells = []
    for dataset in datasets:
        for model in models:
            columns = dict(TABLE2)
            if ablations and dataset == "criteo":
                columns.update({k: v for k, v in TABLE3.items() if k not in columns})
            cells += [Cell(dataset, model, column, variant) for column, variant in columns.items()]
    return cells


def run_grid(cells: list[Cell], seeds: list[int], small: bool, extra: list[str]) -> None:
    """Run every implemented cell once per seed and read back its test metrics: one Hydra sweep
    (``method.variant`` × ``seed``) per dataset × model, so a launcher in ``extra`` (``hydra/launcher=joblib``,
    ``submitit_slurm``, ``ray``, ...) runs a sweep's runs together."""
    from autorecbench.config import compose
    from autorecbench.launch import launch_runs, new_run_folders, run_folders_in

    groups: dict[tuple[str, str], dict[str, Cell]] = {}
    for cell in cells:
        if cell.variant is not None:
            groups.setdefault((cell.dataset, cell.model), {})[cell.variant] = cell
    for (dataset, model), by_variant in groups.items():
        data = SMALL[dataset] if small else DATASETS[dataset][0]
        base = [*data, f"model={model}", "method=autoloss", "quiet=true", *extra]
        results = Path(str(compose(base).paths.results_dir))
        before = run_folders_in(results)
        log.info("%s / %s: %s, seeds %s", dataset, model, ", ".join(by_variant), seeds)
        launch_runs([*base, f"method.variant={','.join(by_variant)}", f"seed={','.join(map(str, seeds))}"],
                    multirun=True)
        for folder in new_run_folders(results, before):
            if not (folder / "architecture.json").is_file():  # a failed or diverged run's .partial folder: the cell shows the other seeds
                continue
            cell = by_variant[str(json.loads((folder / "architecture.json").read_text())["variant"])]
            metrics = pl.read_parquet(folder / "metrics.parquet").filter(pl.col("split") == "test")
            for metric, value in zip(metrics["metric"], metrics["value"]):
                cell.values.setdefault(str(metric), []).append(float(value))


def notes(extra: list[str]) -> list[str]:
    """What the printout's columns are, read from the AutoLoss config the runs used: which KL the KL column is,
    how the controller was trained, and the capacity-matched baseline."""
    from autorecbench.config import compose

    cfg = compose(["data=synthetic-criteo", "method=autoloss", *extra]).method
    eps, xi = float(cfg.kl_smoothing), float(cfg.xi)
    if eps > 0:
        kl = (f"KL: KL(y_ε ‖ ŷ) against a label-smoothed target y_ε = (1 - ε) one_hot(y) + ε / C, ε = {eps:g} "
              "(method.kl_smoothing); against the one-hot label KL equals CE exactly and its column would repeat CE's.")
    else:
        kl = ("KL: against the one-hot label (method.kl_smoothing=0), which makes it CE exactly: the KL column "
              "differs from CE's only through randomness.")
    order = "first order (W* = W)" if xi == 0 else f"Eq. 13 with ξ = {xi:g} (one-step unrolled DRS)"
    return [kl,
            f"AutoLoss, DARTS, AL-2: the controller (or α) steps on the {cfg.val_objective} validation loss "
            f"(method.val_objective), {order} (method.xi); each run's loss choices are in loss_weights.parquet.",
            "Capacity: every column trains the same backbone (embedding sizes and MLP): CE is FIXED on it, the "
            "capacity-matched baseline of every other column."]


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def table_rows(cells: list[Cell], reference: dict[str, Any], small: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per dataset × model × metric, the paper's row and ours."""
    columns = list(dict.fromkeys(c.column for c in cells))
    header = ["dataset", "model", "metric", "source", *columns]
    rows = []
    keys = list(dict.fromkeys((c.dataset, c.model) for c in cells))
    for dataset, model in keys:
        ours = {c.column: c for c in cells if (c.dataset, c.model) == (dataset, model)}
        label = f"{dataset} (synthetic stand-in)" if small else dataset
        for paper_metric, metric in zip(("AUC ↑", "Logloss ↓"), DATASETS[dataset][1]):
            key = "auc" if metric == "auc" else "logloss"
            paper = []
            for column in columns:
                value = None
                for table in ("table2", "table3"):
                    published = reference[table].get(dataset, {}).get(model, {}).get(key)
                    if published is not None and column in reference[table]["columns"]:
                        value = published[reference[table]["columns"].index(column)]
                        break
                paper.append("–" if value is None else f"{value:.4f}")
            mine = ["–" if c not in ours else NOT_IMPLEMENTED if ours[c].variant is None
                    else _fmt(ours[c].mean(metric), ours[c].std(metric)) for c in columns]
            rows.append([label, model, paper_metric, "paper", *paper])
            rows.append([label, model, paper_metric, "ours", *mine])
    return header, rows


def render(header: list[str], rows: list[list[str]], fmt: str) -> str | None:
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    from rich.table import Table

    table = Table(title="AutoLoss (KDD 2021) Table 2 (+ Table 3's AL-1, AL-2 on Criteo): test metrics")
    for name in header:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    out_console.print(table)
    return None


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


EPILOG = ("Examples:\n\n"
          "* `autorecbench reproduce autoloss-table2 --small` (pipeline check on synthetic stand-ins)\n\n"
          "* `autorecbench reproduce autoloss-table2 --seeds 0,1,2 device=cuda`")


@app.command()
def command(
    small: Annotated[bool, typer.Option("--small", help="Synthetic stand-ins of Criteo and ML-20m (seconds; checks the pipeline, not a reproduction).")] = False,
    data: Annotated[str, typer.Option("--data", help="Comma-separated datasets: criteo, ml-20m.")] = "criteo,ml-20m",
    models: Annotated[str, typer.Option("--models", help="Comma-separated backbones: deepfm, ipnn.")] = "deepfm,ipnn",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds; cells show mean ± std over them.")] = "0",
    ablations: Annotated[bool, typer.Option("--ablations/--no-ablations", help="Also Table 3's AL-1 and AL-2 (Criteo).")] = True,
    fmt: Annotated[str, typer.Option("--format", help="table | markdown")] = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the markdown table here.")] = None,
    extra: Annotated[Optional[list[str]], typer.Argument(help="Further overrides for every run, e.g. device=cuda runner.max_rows=2000000.")] = None,
) -> None:
    """AutoLoss paper (KDD 2021) Table 2 (+ Table 3's AL-1, AL-2): Criteo, ML-20m × DeepFM, IPNN × the losses,
    beside the paper's numbers. Stops with download instructions if a raw file is missing; `--small` runs
    synthetic stand-ins in seconds."""
    setup_logging()
    datasets = [d.strip() for d in data.split(",") if d.strip()]
    chosen_models = [m.strip() for m in models.split(",") if m.strip()]
    bad = [d for d in datasets if d not in DATASETS] + [m for m in chosen_models if m not in MODELS]
    if bad or not datasets or not chosen_models:
        raise UserError(f"unknown or no datasets/models {bad}; choose from {', '.join(DATASETS)} and {', '.join(MODELS)}")
    if fmt not in ("table", "markdown"):
        raise UserError(f"--format must be table or markdown, got {fmt!r}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if not small:
        check_raw_data(datasets)
    cells = grid(datasets, chosen_models, ablations)
    run_grid(cells, seed_list or [0], small, list(extra or []))
    header, rows = table_rows(cells, load_reference(), small)
    text = render(header, rows, fmt)
    if text is not None:
        out_console.print(text, highlight=False, soft_wrap=True)
    lines = notes(list(extra or []))
    for line in lines:
        out_console.print(line, highlight=False, soft_wrap=True)
    if output is not None:
        output.write_text(render(header, rows, "markdown") + "\n\n" + "\n".join(f"- {n}" for n in lines) + "\n")  # type: ignore[operator]
        out_console.print(f"written: {output}", highlight=False)
    if small:
        out_console.print("synthetic stand-ins: the paper's rows show the layout, they are not comparable",
                          highlight=False)


if __name__ == "__main__":
    run_app(app)
