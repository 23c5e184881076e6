"""AutoLoss: how the controller's loss probabilities move over training (Eq. 9–11; loss_weights.parquet)."""

from __future__ import annotations

from autorecbench.results.collect import ResultSet
from autorecbench.results.plot import PALETTE, Plot, PlotContext, figure_kind, line, new_figure, series_frames, summarise

PREFIX = "alpha_mean_"

@figure_kind("autoloss-weights", "AutoLoss: the controller's mean probability α of each candidate loss over "
             "training steps, mean over seeds (loss_weights.parquet)")
def autoloss_weights(results: ResultSet, ctx: PlotContext) -> list[Plot]:
    plots = []
    for group, series, frame in series_frames(results, "loss_weights"):
        losses = [c.removeprefix(PREFIX) for c in frame.columns if c.startswith(PREFIX)]
        figure, (ax,) = new_figure(height_in=2.2)
        for i, loss in enumerate(losses):
            if frame[f"{PREFIX}{loss}"].null_count() == frame.height:
                continue
            stats = summarise(frame, ["step"], f"{PREFIX}{loss}")
            line(ax, stats["step"].to_list(), stats, loss, PALETTE[i % len(PALETTE)], band=True)
        ax.set_xlabel("training step (controller updates)")
        ax.set_ylabel("mean loss probability α")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=5, ncols=2)
        plots.append(group.plot("autoloss-weights", figure, "loss probabilities", frame, series))
    return plots
