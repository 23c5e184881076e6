"""``autorecbench compare``: line runs up by dataset x task x model x method (x variant), mean ± std
over seeds, optional deltas against a baseline method with a significance test across seeds.

Streaming runs show the evaluation window's metrics with throughput, embedding MiB and wall time; offline
(CTR) runs the test split's AUC, logloss (and gAUC) with parameters, embedding MiB, search and train seconds.

Only complete runs enter the means; diverged runs are listed apart (with the stage, step and reason), and so
are failed, interrupted (resumable or not), running and unreadable ones (a run whose ``run.json`` or
``metrics.parquet`` is missing, empty or damaged: "unreadable: reason"); the rest compares normally. Runs that
`autorecbench tune` configured carry their budget (``tuning``: "tuned (N trials)", shown beside the method) and
never share a row with untuned ones.
Runs are grouped by their config hash (everything except seed, device, paths and verbosity), so two
runs only share a row when they ran the same configuration; the variant label shows the overrides that
tell rows of the same method apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from autorecbench.errors import UserError
from autorecbench.results.collect import tuning_label
from autorecbench.results.run_folder import RunRecord, discover, read_record

# ``tuning``: "tuned (N trials)" for runs `autorecbench tune` configured, shown beside the method.
KEYS = ["dataset", "task", "model", "method", "variant", "tuning"]
TASK_METRICS = {"binary": ["accuracy", "mse", "logloss", "auc"], "multiclass": ["accuracy", "ce", "auc"]}
COST_METRICS = ["interactions_per_second", "embedding_bytes", "wall_seconds"]
# Offline runs (CTR backbones, runner=offline) are judged on the test split: AUC and logloss (gAUC when the
# data has a user field), with the model's size and the search and training cost.
OFFLINE_TASK_METRICS = {"binary": ["auc", "logloss", "gauc"], "multiclass": ["auc", "ce"]}
OFFLINE_COST_METRICS = ["parameters", "embedding_bytes", "search_seconds", "train_seconds"]
ALL_COST_METRICS = {*COST_METRICS, *OFFLINE_COST_METRICS, "train_samples_per_second", "test_seconds"}
LOWER_IS_BETTER = {"mse", "logloss", "ce", "embedding_bytes", "wall_seconds", "parameters", "search_seconds",
                   "train_seconds", "test_seconds"}
FORMATS = ("table", "markdown", "csv", "latex", "json")
SPLITS = ("auto", "eval", "all", "test", "valid")


@dataclass
class Comparison:
    """Aggregated rows (one per group) and the runs left out of them."""

    rows: pl.DataFrame
    metrics: list[str]
    incomplete: list[RunRecord]
    baseline: str | None
    n_runs: int
    runners: list[str] = field(default_factory=list)


METRICS_COLUMNS = ("run_id", "dataset", "task", "method", "seed", "split", "metric", "value")


def _read_metrics(record: RunRecord) -> pl.DataFrame | str:
    """A run's ``metrics.parquet``, or why it cannot be read (missing, empty, cut short, wrong columns)."""
    try:
        frame = pl.read_parquet(record.path / "metrics.parquet")
    except Exception as exc:  # noqa: BLE001 - polars and pyarrow raise many kinds: any of them makes it unreadable
        return f"metrics.parquet unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    missing = [c for c in METRICS_COLUMNS if c not in frame.columns]
    if missing:
        return f"metrics.parquet lacks column(s) {', '.join(missing)}"
    return frame


def _load(records: list[RunRecord], split: str) -> tuple[pl.DataFrame | None, list[RunRecord]]:
    """Each readable run's metrics of ``split`` (``auto``: the run's headline split, ``eval`` for streaming
    runs and ``test`` for offline ones) and its cost rows, with the grouping columns from ``run.json``; and the
    runs whose tables could not be read, as ``unreadable`` records."""
    frames, unreadable = [], []
    for rec in records:
        info = rec.info or {}
        frame = _read_metrics(rec)
        if isinstance(frame, str):
            unreadable.append(RunRecord(rec.path, "unreadable", rec.info, frame))
            continue
        wanted = str(info.get("headline_split", "eval")) if split == "auto" else split
        frame = frame.select(*METRICS_COLUMNS).filter(pl.col("split").is_in([wanted, "cost"])).with_columns(
            pl.col("seed").cast(pl.Int64), pl.col("value").cast(pl.Float64),
            pl.lit(str(info.get("runner", "streaming"))).alias("runner"),
            pl.lit(str(info.get("model", ""))).alias("model"),
            pl.lit(str(info.get("variant", ""))).alias("variant"),
            pl.lit(tuning_label(info.get("tuning"))).alias("tuning"),
            pl.lit(str(info.get("config_hash", ""))).alias("config_hash"),
            pl.lit(str(rec.path)).alias("path"),
        )
        frames.append(frame)
    return (pl.concat(frames, how="vertical_relaxed") if frames else None), unreadable


def _disambiguate(per_run: pl.DataFrame) -> pl.DataFrame:
    """Same label but different config hash (e.g. defaults changed between versions): tag with the hash."""
    clash = per_run.group_by(KEYS).agg(pl.col("config_hash").n_unique().alias("k")).filter(pl.col("k") > 1)
    if clash.height == 0:
        return per_run
    flagged = per_run.join(clash.select(KEYS).with_columns(pl.lit(True).alias("clash")), on=KEYS, how="left")
    return flagged.with_columns(
        pl.when(pl.col("clash"))
        .then(pl.concat_str(pl.col("variant"), pl.lit(" #"), pl.col("config_hash").str.slice(0, 6)).str.strip_chars())
        .otherwise(pl.col("variant"))
        .alias("variant")
    ).drop("clash")


def _significance(values: list[float], seeds: list[int], base_values: list[float], base_seeds: list[int]) -> tuple[float, str]:
    """Paired t-test on the seeds both groups share (>= 2), else Welch's t-test (>= 2 runs each)."""
    from scipy import stats

    ours = dict(zip(seeds, values))
    theirs = dict(zip(base_seeds, base_values))
    common = sorted(set(ours) & set(theirs))
    if len(common) >= 2:
        a = [ours[s] for s in common]
        b = [theirs[s] for s in common]
        if all(x == y for x, y in zip(a, b)):
            return 1.0, "paired"
        return float(stats.ttest_rel(a, b).pvalue), "paired"
    if len(values) >= 2 and len(base_values) >= 2:
        return float(stats.ttest_ind(values, base_values, equal_var=False).pvalue), "welch"
    return math.nan, "none"


def _default_columns(long: pl.DataFrame) -> tuple[list[str], list[str]]:
    """Headline metrics and cost columns for the (runner, task) combinations present."""
    combos = long.select("runner", "task").unique().sort(["runner", "task"]).rows()
    wanted: list[str] = []
    costs: list[str] = []
    for runner, task in combos:
        offline = runner == "offline"
        wanted += (OFFLINE_TASK_METRICS if offline else TASK_METRICS).get(task, [])
        costs += OFFLINE_COST_METRICS if offline else COST_METRICS
    return list(dict.fromkeys(wanted)), list(dict.fromkeys(costs))


def compare(paths: Sequence[str], baseline: str | None = None, metrics: Sequence[str] | None = None,
            split: str = "auto") -> Comparison:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    folders = discover(paths)
    if not folders:
        raise UserError(f"no runs found under {', '.join(paths)}")
    records = [read_record(p) for p in folders]
    complete = [r for r in records if r.complete]
    incomplete = [r for r in records if not r.complete]
    long, unreadable = _load(complete, split) if complete else (None, [])
    incomplete += unreadable
    complete = [r for r in complete if r.path not in {u.path for u in unreadable}]
    if long is None:
        return Comparison(pl.DataFrame(), [], incomplete, baseline, 0)
    default_metrics, costs = _default_columns(long)
    wanted = list(dict.fromkeys(metrics)) if metrics else default_metrics
    available = set(long["metric"].unique().to_list())
    unknown = [m for m in wanted if m not in available]
    if metrics and unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(sorted(available))}")
    wanted = [m for m in wanted if m in available]
    columns = wanted + [m for m in costs if m in available and m not in wanted]
    per_run = (
        long.filter(pl.col("metric").is_in(columns))
        .pivot(on="metric", index=["run_id", "path", "seed", "config_hash", *KEYS], values="value",
               aggregate_function="first")
    )
    for m in columns:
        if m not in per_run.columns:
            per_run = per_run.with_columns(pl.lit(None, dtype=pl.Float64).alias(m))
    per_run = _disambiguate(per_run)
    grouped = (
        per_run.group_by(KEYS, maintain_order=True)
        .agg(
            pl.len().alias("n"),
            pl.col("seed").sort().alias("seeds"),
            *[pl.col(m).mean().alias(f"{m}_mean") for m in columns],
            *[pl.col(m).std(ddof=1).alias(f"{m}_std") for m in columns],
            *[pl.col(m).sort_by("seed").alias(f"{m}_values") for m in columns],
        )
        .sort(KEYS)
    )
    if baseline is not None:
        grouped = _add_baseline(grouped, baseline, wanted)
    drop = [f"{m}_values" for m in columns]
    runners = sorted(long["runner"].unique().to_list())
    return Comparison(grouped.drop(drop), columns, incomplete, baseline, len(complete), runners)


def _pick_baseline(row: dict[str, Any], candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The baseline group run under the same settings as ``row``: its overrides are a subset of the row's
    (so only the method and its own options differ); the closest such group wins."""
    ours = set(row["variant"].split())
    fitting = [c for c in candidates if c is not row and set(c["variant"].split()) <= ours]
    if not fitting:
        return None
    return max(fitting, key=lambda c: (len(set(c["variant"].split()) & ours), -len(c["variant"])))


def _add_baseline(grouped: pl.DataFrame, baseline: str, metrics: list[str]) -> pl.DataFrame:
    if baseline not in grouped["method"].unique().to_list():
        raise UserError(f"baseline method {baseline!r} has no complete runs among these results")
    rows = grouped.to_dicts()
    by_context: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["method"] == baseline:
            by_context.setdefault((row["dataset"], row["task"], row["model"]), []).append(row)
    out = []
    for row in rows:
        base = _pick_baseline(row, by_context.get((row["dataset"], row["task"], row["model"]), []))
        for m in metrics:
            delta, p, test = None, None, None
            if base is not None and base is not row and row[f"{m}_mean"] is not None and base[f"{m}_mean"] is not None:
                delta = row[f"{m}_mean"] - base[f"{m}_mean"]
                p, test = _significance(row[f"{m}_values"], row["seeds"], base[f"{m}_values"], base["seeds"])
                p = None if math.isnan(p) else p
            row[f"{m}_delta"], row[f"{m}_p"], row[f"{m}_test"] = delta, p, test
        out.append(row)
    return pl.DataFrame(out, infer_schema_length=None)


# ---------------------------------------------------------------- rendering

def _fmt(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric == "embedding_bytes":
        return f"{value / 2**20:,.2f}"
    if metric in ("interactions_per_second", "train_samples_per_second", "parameters"):
        return f"{value:,.0f}"
    if metric.endswith("_seconds"):
        return f"{value:,.1f}"
    return f"{value:.4f}"


HEADERS = {"embedding_bytes": "emb MiB", "interactions_per_second": "int/s", "wall_seconds": "wall s",
           "parameters": "params", "search_seconds": "search s", "train_seconds": "train s",
           "test_seconds": "test s", "train_samples_per_second": "samples/s"}


def _header(metric: str) -> str:
    return HEADERS.get(metric, metric)


def shared_settings(cmp: Comparison) -> list[str]:
    """Overrides in every row's variant label (e.g. a generator size used for all runs): printed once, not per row."""
    labels = [set(v.split()) for v in cmp.rows["variant"].to_list()] if cmp.rows.height else []
    common = set.intersection(*labels) if labels else set()
    return sorted(item for item in common if not item.startswith("#"))


def display_rows(cmp: Comparison, shared: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and string cells, shared by every text format; the variant column leaves out ``shared``
    (:func:`shared_settings`)."""
    drop = set(shared)
    rows = cmp.rows.with_columns(
        pl.col("variant").map_elements(lambda v: " ".join(i for i in v.split() if i not in drop), return_dtype=pl.String))
    show_model = rows["model"].n_unique() > 1 or "offline" in cmp.runners
    show_variant = (rows["variant"] != "").any()
    header = ["dataset", "task", *(["model"] if show_model else []), "method", *(["variant"] if show_variant else []), "n"]
    for m in cmp.metrics:
        header.append(_header(m))
        if cmp.baseline and f"{m}_delta" in rows.columns:
            header += [f"Δ {_header(m)}", "p"]
    cells = []
    for row in rows.to_dicts():
        method = ", ".join(p for p in (row["method"], row["tuning"]) if p)  # e.g. "fixed, tuned (20 trials)"
        line = [row["dataset"], row["task"], *([row["model"]] if show_model else []), method,
                *([row["variant"]] if show_variant else []), str(row["n"])]
        for m in cmp.metrics:
            mean, std = row[f"{m}_mean"], row[f"{m}_std"]
            text = _fmt(mean, m)
            if std is not None and not math.isnan(std) and text != "–":
                text += f" ± {_fmt(std, m)}"
            line.append(text)
            if cmp.baseline and f"{m}_delta" in rows.columns:
                delta, p = row.get(f"{m}_delta"), row.get(f"{m}_p")
                line.append("–" if delta is None else f"{delta:+.4f}" if m not in ALL_COST_METRICS else f"{delta:+,.1f}")
                line.append("–" if p is None else f"{p:.3g}")
        cells.append(line)
    return header, cells


APART_COLUMNS = ["status", "dataset", "task", "model", "method", "variant", "seed", "path", "error"]


def runs_apart(cmp: Comparison) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs left out of the means, as rows: the diverged ones (with the stage, step and reason), and all
    others (failed, interrupted — resumable or not —, running, unreadable: reason)."""
    rows = []
    for r in cmp.incomplete:
        info = r.info or {}
        rows.append({"status": r.label, "dataset": str(info.get("dataset", "")), "task": str(info.get("task", "")),
                     "model": str(info.get("model", "")), "method": str(info.get("method", "")),
                     "variant": str(info.get("variant", "")), "seed": info.get("seed"), "path": str(r.path),
                     "error": (r.error or "").split("\n")[0][:300] if r.status != "unreadable" else ""})
    return [r for r in rows if r["status"] == "diverged"], [r for r in rows if r["status"] != "diverged"]


def _csv(cmp: Comparison, apart: list[dict[str, Any]]) -> str:
    """One CSV table: a ``status`` column, each group's row (``complete``), then one row per run left out."""
    frames = []
    if cmp.rows.height:
        frames.append(cmp.rows.with_columns(
            pl.lit("complete").alias("status"),
            pl.col("seeds").list.eval(pl.element().cast(pl.String)).list.join(" ")))
    if apart:
        frames.append(pl.DataFrame(apart, schema={c: pl.String for c in APART_COLUMNS}, orient="row")
                      .rename({"seed": "seeds"}).with_columns(pl.lit(1, dtype=pl.UInt32).alias("n")))
    if not frames:
        return ""
    table = pl.concat(frames, how="diagonal_relaxed")
    first = ["status", *KEYS, "n", "seeds"]
    return table.select(*first, pl.exclude(*first)).write_csv()


def render(cmp: Comparison, fmt: str, console: Console) -> str | None:
    """Rich table printed to ``console`` for ``table``; the text of the export otherwise. Every format lists the
    diverged runs apart from the other incomplete ones; none of them enters a mean."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    diverged, incomplete = runs_apart(cmp)
    if fmt == "json":
        groups = [{"status": "complete", **g} for g in cmp.rows.to_dicts()] if cmp.rows.height else []
        payload = {"runs": cmp.n_runs, "baseline": cmp.baseline, "metrics": cmp.metrics, "groups": groups,
                   "diverged": diverged, "incomplete": incomplete}
        return json.dumps(payload, indent=2, default=str) + "\n"
    if fmt == "csv":
        return _csv(cmp, diverged + incomplete)
    settings = shared_settings(cmp)
    header, cells = display_rows(cmp, settings) if cmp.rows.height else ([], [])
    shared = " ".join(settings)
    sections = [("Diverged runs (not in the means)", ["path", "status", "stage, step: reason"], diverged),
                ("Incomplete, failed or unreadable runs (not in the means)", ["path", "status", "error"], incomplete)]
    if fmt in ("markdown", "latex"):
        from tabulate import tabulate

        style = "github" if fmt == "markdown" else "latex_booktabs"
        text = tabulate(cells, headers=header, tablefmt=style, disable_numparse=True) + "\n" if cells else ""
        if shared and cells:
            text += f"\nEvery row: {shared}\n"
        for title, columns, rows in sections:
            if rows:
                text += f"\n{title}:\n\n" + tabulate([[r["path"], r["status"], r["error"]] for r in rows],
                                                       headers=columns, tablefmt=style, disable_numparse=True) + "\n"
        return text
    if cells:
        table = Table(title=f"{cmp.n_runs} complete run(s)" + (f", baseline {cmp.baseline}" if cmp.baseline else ""),
                      caption=f"every row: {shared}" if shared else None)
        for h in header:
            # Variant labels wrap; numbers and names stay on one line.
            table.add_column(h, justify="left" if h in KEYS or h == "task" else "right", no_wrap=h != "variant",
                             overflow="fold")
        for line in cells:
            table.add_row(*line)
        console.print(table)
    for title, columns, rows in sections:
        if rows:
            table = Table(title=title, title_style="bold yellow")
            for h in columns:
                table.add_column(h, overflow="fold")
            for r in rows:
                table.add_row(r["path"], r["status"], r["error"])
            console.print(table)
    return None


def write(text: str, output: Path | None, console: Console) -> None:
    if output is None:
        console.out(text, end="", highlight=False)
    else:
        output.write_text(text)
