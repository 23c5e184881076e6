"""AMEIR: what each progressive step scored (search.parquet) — Step 1's children by the Layer op they use, Step 2's
interaction candidates per cycle, Step 3's 880 MLPs — with the chosen ones marked; a joint search's (``method.search=
joint``, step "joint") children ranked."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from autorecbench.results.collect import ResultSet
from autorecbench.results.plot import Plot, PlotContext, figure_kind, new_figure, series_frames


def _layer_means(step1: pl.DataFrame) -> tuple[list[str], list[float], set[str]]:
    """Mean inherited-weight validation AUC of the children using each Layer op (in any block), and the ops of
    the kept child."""
    sums: dict[str, list[float]] = {}
    chosen: set[str] = set()
    for candidate, auc, kept in step1.select("candidate", "valid_auc", "kept").iter_rows():
        layers = {block[1] for block in json.loads(candidate)}
        for layer in layers:
            sums.setdefault(layer, []).append(auc)
        if kept:
            chosen |= layers
    names = sorted(sums, key=lambda k: -float(np.nanmean(sums[k])))
    return names, [float(np.nanmean(sums[k])) for k in names], chosen


@figure_kind("ameir-search", "AMEIR: the validation AUC (inherited weights) of every scored child per step — "
             "Step 1 by Layer op, Step 2 per cycle, Step 3 and a joint search ranked; chosen ones marked "
             "(search.parquet)")
def ameir_search(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    plots = []
    for group, series, frame in series_frames(results, "search"):
        frame = frame.filter(pl.col("method") == "ameir")
        if not frame.height or "step" not in frame.columns:  # other methods' search tables
            continue
        # progressive runs write steps 1-3, joint runs "joint": read as text wherever the runs are mixed
        frame = frame.with_columns(pl.col("step").cast(pl.String))
        steps = sorted(frame["step"].unique().to_list())
        figure, axes = new_figure(rows=len(steps), height_in=2.0)
        for ax, step in zip(axes, steps):
            part = frame.filter(pl.col("step") == step)
            if step == "1":
                names, means, chosen = _layer_means(part)
                ax.bar(range(len(names)), means, color=["C3" if n in chosen else "C0" for n in names])
                ax.set_xticks(range(len(names)), names, rotation=45, fontsize=6)
                low = min(means) if means else 0.5
                ax.set_ylim(low - 0.005, max(means + [low]) + 0.005)
                ax.set_title("Step 1: mean AUC of children using each op (red: chosen)", fontsize=7)
            elif step == "2":
                for cycle in sorted(part["cycle"].unique().to_list()):
                    rows = part.filter(pl.col("cycle") == cycle)
                    jitter = cycle + np.linspace(-0.3, 0.3, rows.height)
                    kept = rows["kept"].to_numpy()
                    ax.scatter(jitter[~kept], rows["valid_auc"].to_numpy()[~kept], s=3, color="C0")
                    ax.scatter(jitter[kept], rows["valid_auc"].to_numpy()[kept], s=6, color="C3")
                ax.set_xlabel("cycle")
                ax.set_title("Step 2: interaction candidates (red: kept)", fontsize=7)
            else:
                ranked = part.sort("valid_auc", descending=True, nulls_last=True)
                ax.plot(range(ranked.height), ranked["valid_auc"].to_numpy(), color="C0")
                where = np.flatnonzero(ranked["kept"].to_numpy())
                ax.scatter(where, ranked["valid_auc"].to_numpy()[where], color="C3", zorder=3)
                joint = step == "joint"
                ax.set_xlabel("joint-space children, ranked" if joint else "MLP children, ranked")
                ax.set_title("One-shot random search over the joint space (red: chosen)" if joint else
                             "Step 3: MLP children (red: chosen)", fontsize=7)
            ax.set_ylabel("valid AUC", fontsize=7)
        plots.append(group.plot("ameir-search", figure, "children scored per step", frame, series))
    return plots
