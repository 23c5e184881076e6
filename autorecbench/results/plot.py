"""Figures from run folders (``autorecbench plot``, and the figures of ``autorecbench report``).

The machinery lives here: the registry of figure kinds, one colour per series shared by every figure of a
call, the paper-column style, grouping by dataset × task (× model for offline runs), titles and saving. The
kinds themselves live in ``autorecbench/results/figures/``, one module each: adding a figure is one module
with a function decorated ``@figure_kind("name", "help")`` that takes a :class:`ResultSet` (its tables via
``results.table("curve")``, loose tables such as ``validation.parquet`` via ``results.loose_table``) and the
:class:`PlotContext`, and returns :class:`Plot` objects — none where its tables are absent.

Only complete runs are drawn (``collect.load_results`` keeps failed, diverged and interrupted runs apart).
Values over seeds are means with ±1 standard deviation (error bars or bands) where there are two seeds or more.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from autorecbench.errors import UserError
from autorecbench.plugins import import_package_modules
from autorecbench.results.collect import ResultSet

FORMATS = ("png", "svg", "pdf")
# One column of a two-column paper is ~3.3 in; 7 pt text stays readable there.
COLUMN_WIDTH_IN = 3.4
STYLE: dict[str, Any] = {
    "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6, "ytick.labelsize": 6,
    "legend.fontsize": 6, "figure.titlesize": 7, "lines.linewidth": 1.2, "lines.markersize": 3.5,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5, "legend.frameon": False,
    "svg.fonttype": "path",  # text as outlines: the SVG needs no font on the reader's machine
    "pdf.fonttype": 42, "savefig.dpi": 200,
}
# FIXED is the reference every figure compares against: always the same dark grey.
FIXED_COLOUR = "#333333"
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#aec7e8", "#ff9896", "#98df8a", "#ffbb78", "#c5b0d5")
# Headline metric per protocol (what `compare` leads with): accuracy for the streaming ESAPN tables, AUC offline.
HEADLINE = {"streaming": "accuracy", "offline": "auc"}
LOWER_IS_BETTER = {"mse", "logloss", "ce", "loss", "valid_loss"}


@dataclass
class Plot:
    """One drawn figure; ``name`` is the file stem (``<kind>_<dataset>_<task>[_<model>][_<series>]``)."""

    kind: str
    name: str
    title: str
    figure: Figure

    def render(self, fmt: str) -> bytes:
        buffer = io.BytesIO()
        # Fixed metadata: the same figure gives the same bytes (no creation date in SVG/PDF).
        metadata = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
                    "pdf": {"CreationDate": None, "Creator": None, "Producer": None}}[fmt]
        import matplotlib

        with matplotlib.rc_context(STYLE):  # fonts as paths, dpi: read when saving
            self.figure.savefig(buffer, format=fmt, metadata=metadata)
        return buffer.getvalue()


@dataclass
class PlotContext:
    """What every kind draws with: the metric asked for (None: each kind's default), and the series colours
    of this call."""

    metric: str | None = None
    colours: dict[str, str] = field(default_factory=dict)

    def colour(self, label: str) -> str:
        return self.colours.get(label, FIXED_COLOUR)


@dataclass(frozen=True)
class FigureKind:
    name: str
    help: str
    draw: Callable[[ResultSet, PlotContext], list[Plot]]
    order: int  # where its figures come in a plot or report (the shared kinds first)


KINDS: dict[str, FigureKind] = {}


def figure_kind(name: str, help: str, order: int = 100) -> Callable[[Callable[[ResultSet, PlotContext], list[Plot]]],
                                                   Callable[[ResultSet, PlotContext], list[Plot]]]:
    """Register a figure kind (``autorecbench plot --kind NAME``)."""

    def wrap(draw: Callable[[ResultSet, PlotContext], list[Plot]]) -> Callable[[ResultSet, PlotContext], list[Plot]]:
        if name in KINDS and KINDS[name].draw is not draw:
            raise RuntimeError(f"two figure kinds named {name!r}")
        KINDS[name] = FigureKind(name, help, draw, order)
        return draw

    return wrap


def load_kinds() -> dict[str, FigureKind]:
    """Import every module of ``autorecbench.results.figures`` so each kind registers itself; in drawing order."""
    import_package_modules("autorecbench.results.figures")
    return dict(sorted(KINDS.items(), key=lambda kv: (kv[1].order, kv[0])))


def series_colours(labels: Sequence[str]) -> dict[str, str]:
    """One colour per series label for a whole call: FIXED (without variant) dark grey, the others the palette
    in sorted order (so a method keeps its colour in every figure of a plot or report)."""
    out: dict[str, str] = {}
    others = sorted(set(labels) - {"fixed"})
    for i, label in enumerate(others):
        out[label] = PALETTE[i % len(PALETTE)]
    out["fixed"] = FIXED_COLOUR
    return out


def new_figure(rows: int = 1, height_in: float = 2.3, width_in: float = COLUMN_WIDTH_IN,
               sharex: bool = False, sharey: bool = False) -> tuple[Figure, list[Axes]]:
    """A figure at paper-column width (no pyplot state: safe in any process); draw inside :func:`draw`'s style."""
    figure = Figure(figsize=(width_in, height_in * rows), layout="constrained")
    axes = figure.subplots(rows, 1, sharex=sharex, sharey=sharey, squeeze=False)[:, 0]
    return figure, list(axes)


def seeds_text(seeds: Sequence[int]) -> str:
    values = sorted(set(int(s) for s in seeds))
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"seeds {values[0]}–{values[-1]}"
    return ("seed " if len(values) == 1 else "seeds ") + ",".join(str(s) for s in values)


@dataclass(frozen=True)
class Group:
    """Runs drawn together: one dataset × task (× model for offline runs)."""

    dataset: str
    task: str
    model: str | None
    frame: pl.DataFrame

    @property
    def slug(self) -> str:
        return "_".join(p for p in (self.dataset, self.task, self.model) if p)

    def title(self, what: str, frame: pl.DataFrame | None = None) -> str:
        seeds = (frame if frame is not None else self.frame)["seed"].to_list()
        where = " · ".join(p for p in (self.dataset, self.task, self.model) if p)
        return f"{what}\n{where} · {seeds_text(seeds)}"

    def plot(self, kind: str, figure: Figure, what: str, frame: pl.DataFrame | None = None,
             series: str | None = None) -> Plot:
        """The finished figure: titled with ``what``, the dataset, task (model) and the seeds drawn."""
        title = self.title(f"{series}: {what}" if series else what, frame)
        figure.suptitle(title)
        return Plot(kind, "_".join([kind, self.slug, *([slug(series)] if series else [])]), title, figure)


def groups(frame: pl.DataFrame) -> Iterator[Group]:
    """``frame`` (any table with the run columns) split by dataset × task (× model, offline), sorted."""
    for runner in sorted(frame["runner"].unique().to_list()):
        part = frame.filter(pl.col("runner") == runner)
        keys = ["dataset", "task"] + (["model"] if runner == "offline" else [])
        for key, sub in sorted(part.group_by(keys), key=lambda kv: tuple(str(k) for k in kv[0])):
            values = [str(k) for k in key]
            yield Group(values[0], values[1], values[2] if len(values) > 2 else None, sub)


def series_frames(results: ResultSet, table: str) -> Iterator[tuple[Group, str, pl.DataFrame]]:
    """For the method-specific kinds: each (group, series, rows) of a table that some runs write."""
    frame = results.table(table)
    for group in groups(frame) if frame is not None else []:
        for series in sorted(group.frame["series"].unique().to_list()):
            yield group, series, group.frame.filter(pl.col("series") == series)


def series_summary(frame: pl.DataFrame, columns: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per series, per column: mean, std and seed count over its runs (one row per run in ``frame``)."""
    keyed = frame.with_columns(pl.lit(0).alias("_all"))
    return {label: {c: summarise(keyed.filter(pl.col("series") == label), ["_all"], c).row(0, named=True)
                    for c in columns}
            for label in sorted(frame["series"].unique().to_list())}


def slug(text: str) -> str:
    """A file-name-safe form of a series label."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "-", text).strip("-")[:80]


def headline_metric(ctx: PlotContext, runner: str, available: Sequence[str]) -> str | None:
    """The metric asked for, else the protocol's headline (accuracy streaming, AUC offline), if present."""
    wanted = ctx.metric or HEADLINE.get(runner, "auc")
    return wanted if wanted in available else None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def summarise(frame: pl.DataFrame, by: list[str], value: str = "value") -> pl.DataFrame:
    """Mean, standard deviation (ddof 1; 0 for one seed) and seed count of ``value`` per ``by``, sorted."""
    return (frame.group_by(by).agg(pl.col(value).mean().alias("mean"),
                                   pl.col(value).std(ddof=1).fill_null(0.0).alias("std"),
                                   pl.col("seed").n_unique().alias("seeds"))
            .sort(by))


LONG_LABEL = 28  # characters; longer series names (variants with their overrides) go under the figure


def legend(axes: Axes, **kwargs: Any) -> None:
    handles, labels = axes.get_legend_handles_labels()
    if not handles:
        return
    if max(len(label) for label in labels) > LONG_LABEL:
        wrapped = ["\n".join(textwrap.wrap(label, 70)) for label in labels]
        figure = axes.figure
        figure.set_figheight(figure.get_figheight() + 0.1 * sum(w.count("\n") + 1 for w in wrapped))  # room for it
        figure.legend(handles, wrapped, loc="outside lower center", fontsize=5, ncols=1)
    else:
        axes.legend(handles, labels, **{"loc": "best", **kwargs})


def draw(results: ResultSet, kinds: Sequence[str] | None = None, metric: str | None = None) -> list[Plot]:
    """Every figure of ``kinds`` (all registered kinds when None) that the results hold the tables for."""
    known = load_kinds()
    chosen = list(dict.fromkeys(kinds)) if kinds else list(known)
    unknown = [k for k in chosen if k not in known]
    if unknown:
        raise UserError(f"unknown figure kind(s) {', '.join(unknown)}; known: {', '.join(known)}")
    import matplotlib

    ctx = PlotContext(metric, series_colours(results.runs["series"].to_list()))
    plots: list[Plot] = []
    with matplotlib.rc_context(STYLE):  # text sizes and grid are read when the artists are made
        for name in chosen:
            plots += known[name].draw(results, ctx)
    return plots


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"--format: unknown format(s) {', '.join(bad) or text!r}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def save(plots: Sequence[Plot], out: Path, formats: Sequence[str]) -> list[Path]:
    """Write every plot in every format into ``out`` (created); rendered first, so a failure writes nothing."""
    rendered = [(f"{p.name}.{fmt}", p.render(fmt)) for p in plots for fmt in formats]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in rendered:
        (out / name).write_bytes(data)
        written.append(out / name)
    return written


def line(axes: Axes, x: Sequence[float], stats: pl.DataFrame, label: str, colour: str, *, band: bool = False,
         **kwargs: Any) -> None:
    """A series' mean with its spread over seeds: error bars (``band``: a shaded band) where there is one."""
    mean, std = stats["mean"].to_list(), stats["std"].to_list()
    spread = any(s > 0 for s in std)
    if band:
        axes.plot(x, mean, color=colour, label=label, **kwargs)
        if spread:
            axes.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=colour, alpha=0.15, linewidth=0)
    else:
        axes.errorbar(x, mean, yerr=std if spread else None, color=colour, label=label, capsize=1.5,
                      **{"marker": "o", **kwargs})


def per_run_metrics(results: ResultSet) -> pl.DataFrame | None:
    """One row per complete run: its run columns and every metric of its headline split and its cost rows
    (``embedding_bytes``, ``search_seconds``, ``stream_seconds``, ...) as columns."""
    metrics = results.table("metrics")
    if metrics is None:
        return None
    rows = metrics.filter((pl.col("split") == pl.col("headline_split")) | (pl.col("split") == "cost"))
    return rows.pivot(on="metric", index=["run_id", "dataset", "task", "model", "method", "variant", "seed", "runner",
                                          "series"],
                      values="value", aggregate_function="first")
