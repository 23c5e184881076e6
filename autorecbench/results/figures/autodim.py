"""AutoDim: the embedding size the search chose for every field (argmax α, survey §4.2)."""

from __future__ import annotations

import polars as pl

from autorecbench.results.collect import ResultSet
from autorecbench.results.plot import Plot, PlotContext, figure_kind, new_figure, series_frames


@figure_kind("autodim-dims", "AutoDim: the chosen embedding size per field, median over seeds (bars) and each "
             "seed (dots; dims.parquet)")
def autodim_dims(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    plots = []
    for group, series, frame in series_frames(results, "dims"):
        chosen = frame.filter(pl.col("chosen")).select("field", "seed", "candidate")
        fields = list(dict.fromkeys(frame["field"].to_list()))
        median = dict(chosen.group_by("field").agg(pl.col("candidate").median()).iter_rows())
        candidates = sorted(frame["candidate"].unique().to_list())
        figure, (ax,) = new_figure(height_in=2.2, width_in=max(3.4, 0.12 * len(fields) + 1.0))
        colour = ctx.colour(series)
        ax.bar(range(len(fields)), [median.get(f, 0) for f in fields], color=colour, alpha=0.45, label="median")
        xs = [fields.index(f) for f in chosen["field"].to_list()]
        ax.scatter(xs, chosen["candidate"].to_list(), s=6, color=colour, label="per seed", zorder=3)
        ax.set_yscale("log", base=2)
        ax.set_yticks(candidates, [str(c) for c in candidates])
        ax.set_xticks(range(len(fields)), fields, rotation=90, fontsize=4 if len(fields) > 20 else 6)
        ax.set_ylabel("chosen embedding size")
        ax.legend(fontsize=5)
        plots.append(group.plot("autodim-dims", figure, "chosen size per field", frame, series))
    return plots
