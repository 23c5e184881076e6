"""AutoFIS: the searched gate α of every field pair (survey Eq. 26–27), kept pairs only (α = 0: removed)."""

from __future__ import annotations

import matplotlib
import numpy as np
import polars as pl

from autorecbench.results.collect import ResultSet
from autorecbench.results.plot import Plot, PlotContext, figure_kind, new_figure, series_frames


@figure_kind("autofis-alpha", "AutoFIS: heatmap of the searched α of the kept field pairs (mean over seeds, "
             "coloured over their own range; blank: removed in every seed; pairs.parquet)")
def autofis_alpha(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    plots = []
    for group, series, frame in series_frames(results, "pairs"):
        stats = frame.group_by("field_a", "field_b").agg(pl.col("alpha").mean(), pl.col("kept").any())
        fields = list(dict.fromkeys([*frame["field_a"].to_list(), *frame["field_b"].to_list()]))
        index = {f: i for i, f in enumerate(fields)}
        matrix = np.full((len(fields), len(fields)), np.nan)
        for a, b, alpha, kept in stats.iter_rows():
            if kept:
                matrix[index[a], index[b]] = matrix[index[b], index[a]] = alpha
        size = 3.4 if len(fields) > 12 else 2.6
        figure, (ax,) = new_figure(height_in=size, width_in=size + 0.5)
        # Colours span the kept pairs' own α range (the search's preferences); removed pairs stay blank.
        low, high = (float(np.nanmin(matrix)), float(np.nanmax(matrix))) if np.isfinite(matrix).any() else (0.0, 1.0)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
        image = ax.imshow(matrix, cmap=cmap, vmin=low, vmax=max(high, low + 1e-12), interpolation="nearest")
        ticks = 4 if len(fields) > 20 else 6
        ax.set_xticks(range(len(fields)), fields, rotation=90, fontsize=ticks)
        ax.set_yticks(range(len(fields)), fields, fontsize=ticks)
        ax.grid(False)
        figure.colorbar(image, ax=ax, shrink=0.8, label="α (kept pairs)")
        kept = int(stats["kept"].sum())
        plots.append(group.plot("autofis-alpha", figure, f"α of kept pairs ({kept}/{stats.height})", frame, series))
    return plots
