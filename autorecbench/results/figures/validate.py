"""``autorecbench validate``'s verdicts: every statistic on the planted and control cases for the method, its oracle
and its null reference, against the threshold a working search clears (``validation.parquet``: method, case,
subject, seed, statistic, value, threshold, passed)."""

from __future__ import annotations

import polars as pl

from autorecbench.results.collect import ResultSet
from autorecbench.results.plot import Plot, PlotContext, figure_kind, new_figure, seeds_text

SUBJECTS = {"method": ("#1f77b4", -0.22), "oracle": ("#2ca02c", 0.0), "null": ("#7f7f7f", 0.22)}


@figure_kind("validate", "validate: planted vs control, method vs oracle vs null, per statistic with its threshold "
             "(filled: passed; validation.parquet from `autorecbench validate`)")
def validate(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    table = results.loose_table("validation")
    if table is None:
        return []
    plots = []
    for method in sorted(table["method"].unique().to_list()):
        frame = table.filter(pl.col("method") == method)
        statistics = list(dict.fromkeys(frame["statistic"].to_list()))
        cases = list(dict.fromkeys(frame["case"].to_list()))
        figure, axes = new_figure(rows=len(statistics), height_in=1.4)
        for ax, statistic in zip(axes, statistics):
            part = frame.filter(pl.col("statistic") == statistic)
            for subject, (colour, shift) in SUBJECTS.items():
                rows = part.filter(pl.col("subject") == subject)
                if rows.height == 0:
                    continue
                xs = [cases.index(c) + shift for c in rows["case"].to_list()]
                passed = rows["passed"].to_list()
                ax.scatter(xs, rows["value"].to_list(), s=12, label=subject, edgecolors=colour,
                           facecolors=[colour if p else "none" for p in passed], linewidths=0.8, zorder=3)
            for case, threshold in part.group_by("case").agg(pl.col("threshold").first()).iter_rows():
                i = cases.index(case)
                ax.hlines(threshold, i - 0.4, i + 0.4, colors="0.3", linestyles="--", linewidth=0.8)
            ax.set_xticks(range(len(cases)), cases)
            ax.set_xlim(-0.6, len(cases) - 0.4)
            ax.set_ylabel(statistic, fontsize=6)
        handles, labels = axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, fontsize=5, ncols=3, loc="outside lower center")
        title = f"{method}: planted-truth validation (dashed: threshold; filled: passed)\n{seeds_text(frame['seed'].to_list())}"
        figure.suptitle(title)
        plots.append(Plot("validate", f"validate_{method}", title, figure))
    return plots
