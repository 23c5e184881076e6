"""The figures every method family shares: accuracy by frequency (ESAPN Fig. 4), chosen size by frequency
(Fig. 5), memory against accuracy with its Pareto front, the metric along the stream or over training, and
search cost against the gain over FIXED."""

from __future__ import annotations

import math
from collections.abc import Iterator

import polars as pl
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from autorecbench.results.collect import ResultSet
from autorecbench.results.plot import (
    LOWER_IS_BETTER,
    Group,
    Plot,
    PlotContext,
    figure_kind,
    groups,
    headline_metric,
    legend,
    line,
    new_figure,
    per_run_metrics,
    series_summary,
    summarise,
)

ENTITIES = ("user", "item")


def _by_frequency(results: ResultSet, ctx: PlotContext, kind: str, table_name: str, value: str, what: str,
                  ylabel: str | None, log2: bool) -> list[Plot]:
    """One figure per dataset × task: two panels (users, items), one line per series over frequency buckets."""
    table = results.table(table_name)
    if table is None:
        return []
    plots = []
    for group in groups(table):
        frame = group.frame
        if value == "value":
            metric = ctx.metric or "accuracy"
            frame = frame.filter(pl.col("metric") == metric)
            ylabel = metric
        else:  # one value per run, entity and bucket, repeated on the table's per-size rows
            frame = frame.unique(["run_id", "entity", "bucket"], keep="first")
        if frame.height == 0:
            continue
        figure, axes = new_figure(rows=2, height_in=1.6, sharey=True)
        for ax, entity in zip(axes, ENTITIES):
            part = frame.filter(pl.col("entity") == entity)
            ticks = part.select("bucket", "label").unique("bucket").sort("bucket")
            for label in sorted(part["series"].unique().to_list()):
                stats = summarise(part.filter(pl.col("series") == label), ["bucket"], value)
                line(ax, stats["bucket"].to_list(), stats, label, ctx.colour(label))
            ax.set_xticks(ticks["bucket"].to_list(), ticks["label"].to_list(), rotation=45)
            ax.set_xlabel(f"{entity} frequency (occurrences)")
            ax.set_ylabel(ylabel or value)
            if log2:
                ax.set_yscale("log", base=2)
                sizes = sorted(group.frame["size"].unique().to_list()) if "size" in group.frame.columns else []
                if sizes:
                    ax.set_yticks(sizes, [str(s) for s in sizes])
        legend(axes[0], fontsize=5)
        plots.append(group.plot(kind, figure, f"{what} by user / item frequency", frame))
    return plots


@figure_kind("frequency", "accuracy (or --metric, e.g. auc) by user and item frequency bucket, one line per method "
             "(ESAPN Fig. 4; streaming runs' buckets.parquet)", order=10)
def frequency(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    return _by_frequency(results, ctx, "frequency", "buckets", "value", ctx.metric or "accuracy", None, log2=False)


@figure_kind("sizes", "mean chosen embedding size by user and item frequency for the size-search methods "
             "(ESAPN Fig. 5; size_by_frequency.parquet)", order=20)
def sizes(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    return _by_frequency(results, ctx, "sizes", "size_by_frequency", "mean_size", "mean embedding size",
                         "mean embedding size", log2=True)


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (less memory and a better metric), by memory."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1] if lower_is_better else -p[1])):
        if not front or (y < front[-1][1] if lower_is_better else y > front[-1][1]):
            front.append((x, y))
    return front


@figure_kind("pareto", "embedding MiB (log x) against the headline metric (or --metric), one point per method with "
             "error bars over seeds, and the Pareto front", order=30)
def pareto(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    plots = []
    for group, metric in _metric_groups(results, ctx, "embedding_bytes"):
        figure, (ax,) = new_figure(height_in=2.4)
        points = []
        for label, stats in series_summary(group.frame, [metric, "embedding_bytes"]).items():
            x, y = stats["embedding_bytes"], stats[metric]
            if not (math.isfinite(x["mean"]) and math.isfinite(y["mean"])):
                continue
            ax.errorbar([x["mean"] / 2**20], [y["mean"]], xerr=[x["std"] / 2**20] if x["std"] else None,
                        yerr=[y["std"]] if y["std"] else None, fmt="o", color=ctx.colour(label), label=label,
                        capsize=1.5)
            points.append((x["mean"] / 2**20, y["mean"]))
        if not points:
            continue
        front = pareto_front(points, metric in LOWER_IS_BETTER)
        # The front as a staircase, its last step carried to the largest point (one point is a line too).
        right = max(p[0] for p in points)
        ax.step([p[0] for p in front] + [right], [p[1] for p in front] + [front[-1][1]], where="post",
                linestyle="--", color="0.55", linewidth=0.8, label="Pareto front", zorder=0)
        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        if right < 4 * min(p[0] for p in points):  # within a narrow range the minor ticks carry the numbers
            ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel("embedding MiB (measured, log scale)")
        split = "test" if group.model else "evaluation window"
        ax.set_ylabel(f"{metric} ({split})")
        legend(ax, fontsize=5)
        plots.append(group.plot("pareto", figure, f"memory vs {metric}"))
    return plots


def _metric_groups(results: ResultSet, ctx: PlotContext, cost: str) -> list[tuple[Group, str]]:
    """Per-run metrics by dataset × task (× model), with the metric to draw, where ``cost`` was measured."""
    runs = per_run_metrics(results)
    if runs is None or cost not in runs.columns:
        return []
    found = []
    for group in groups(runs):
        metric = headline_metric(ctx, group.frame["runner"][0], group.frame.columns)
        if metric is not None:
            found.append((group, metric))
    return found


def _metric_rows(results: ResultSet, ctx: PlotContext, table: str, default: str,
                 where: pl.Expr | None = None) -> Iterator[tuple[Group, str, pl.DataFrame]]:
    """A long table's rows of the metric asked for (else ``default``) by dataset × task (× model)."""
    frame = results.table(table)
    for group in groups(frame) if frame is not None else []:
        metric = ctx.metric or default
        rows = group.frame.filter((pl.col("metric") == metric) & (where if where is not None else pl.lit(True)))
        if rows.height:
            yield group, metric, rows


@figure_kind("curve", "the metric along the stream (streaming: curve.parquet) or on validation over training "
             "(offline: epochs.parquet, search stage dashed and shaded)", order=40)
def curve(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    plots = []
    for group, metric, frame in _metric_rows(results, ctx, "curve", "accuracy"):
        figure, (ax,) = new_figure(height_in=2.2)
        for label in sorted(frame["series"].unique().to_list()):
            stats = summarise(frame.filter(pl.col("series") == label), ["end"])
            line(ax, stats["end"].to_list(), stats, label, ctx.colour(label), band=True)
        ax.set_xlabel("interactions seen (window end)")
        ax.set_ylabel(f"{metric} (per window)")
        legend(ax, fontsize=5)
        plots.append(group.plot("curve", figure, f"{metric} along the stream", frame))
    for group, metric, frame in _metric_rows(results, ctx, "epochs", "auc", pl.col("split") == "valid"):
        # The fit stage follows the search: its samples count on from the end of the run's search.
        offset = (frame.filter(pl.col("stage") == "search").group_by("run_id")
                  .agg(pl.col("samples").max().alias("offset")))
        frame = (frame.join(offset, on="run_id", how="left").with_columns(pl.col("offset").fill_null(0))
                 .with_columns(pl.when(pl.col("stage") == "search").then(pl.col("samples"))
                               .otherwise(pl.col("samples") + pl.col("offset")).alias("x")))
        figure, (ax,) = new_figure(height_in=2.2)
        shaded = False
        for label in sorted(frame["series"].unique().to_list()):
            part = frame.filter(pl.col("series") == label)
            colour = ctx.colour(label)
            for stage, style in (("search", "--"), ("fit", "-")):
                rows = part.filter(pl.col("stage") == stage)
                if rows.height == 0:
                    continue
                stats = summarise(rows, ["evaluation"]).join(
                    summarise(rows, ["evaluation"], "x").select("evaluation", pl.col("mean").alias("x")), on="evaluation")
                line(ax, stats["x"].to_list(), stats, label if stage == "fit" or part["stage"].n_unique() == 1
                     else "_nolegend_", colour, band=True, linestyle=style, marker="o", markersize=2)
                if stage == "search":
                    ax.axvspan(0, float(stats["x"].max()), color=colour, alpha=0.08, linewidth=0)
                    shaded = True
        ax.set_xlabel("training samples (search, then fit)")
        ax.set_ylabel(f"validation {metric}")
        handles, labels = ax.get_legend_handles_labels()
        if shaded:
            handles.append(Patch(facecolor="0.85", label="search stage"))
            labels.append("search stage")
        ax.legend(handles, labels, fontsize=5)
        plots.append(group.plot("curve", figure, f"validation {metric} over training", frame))
    return plots


@figure_kind("search-cost", "search seconds against the gain in the headline metric over the capacity-matched "
             "FIXED (of the FIXED runs under the same settings, the one whose embedding bytes are closest)", order=50)
def search_cost(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    plots = []
    for group, metric in _metric_groups(results, ctx, "embedding_bytes"):
        runner = group.frame["runner"][0]
        seconds = "search_seconds" if runner == "offline" else "stream_seconds"
        if seconds not in group.frame.columns:
            continue
        stats = series_summary(group.frame, [metric, seconds, "embedding_bytes"])
        methods = dict(group.frame.select("series", "method").unique().iter_rows())
        settings = {label: set(v.split()) for label, v in group.frame.select("series", "variant").unique().iter_rows()}
        fixed = [label for label in stats if methods[label] == "fixed"]
        # A method is compared with the FIXED runs under the same settings (their overrides a subset of its own,
        # as `compare --baseline`), the one with the closest embedding bytes.
        matches = {label: [f for f in fixed if settings[f] <= settings[label]] for label in stats if label not in fixed}
        matches = {label: found for label, found in matches.items() if found}
        if not matches:
            continue
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        figure, (ax,) = new_figure(height_in=2.3)
        for label, candidates in matches.items():
            mine = stats[label]
            match = min(candidates, key=lambda f: abs(math.log(max(mine["embedding_bytes"]["mean"], 1.0)
                                                               / max(stats[f]["embedding_bytes"]["mean"], 1.0))))
            gain = sign * (mine[metric]["mean"] - stats[match][metric]["mean"])
            # Streaming methods search inside the stream: their search cost is the time they add to FIXED's.
            cost = mine[seconds]["mean"] - (stats[match][seconds]["mean"] if runner == "streaming" else 0.0)
            ax.errorbar([cost], [gain], yerr=[mine[metric]["std"]] if mine[metric]["std"] else None, fmt="o",
                        color=ctx.colour(label), label=label, capsize=1.5)
        ax.axhline(0.0, color="0.4", linewidth=0.7)
        ax.set_xlabel("search seconds" if runner == "offline" else "stream seconds over FIXED's (search cost)")
        ax.set_ylabel(f"gain in {metric} over FIXED" + (" (lower is better, sign flipped)" if sign < 0 else ""))
        legend(ax, fontsize=5)
        plots.append(group.plot("search-cost", figure, "search cost vs gain over capacity-matched FIXED"))
    return plots
