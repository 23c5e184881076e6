"""``autorecbench tune``: equal-budget tuning of a method on validation, then final runs with the best
configuration (``autorecbench/tune.py``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from autorecbench.console import out_console
from autorecbench.errors import UserError

EPILOG = ("Examples:\n\n"
          "* `autorecbench tune method=fixed data=ml-100k --trials 20 --metric valid/auc --seeds 0,1,2`\n\n"
          "* `autorecbench tune method=autoloss data=criteo model=deepfm --trials 20 --metric valid/logloss`\n\n"
          "* `autorecbench tune method=fixed data=criteo --trials 40 --jobs 4 hydra/launcher=submitit_slurm "
          "hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1` (4 trials at a time on SLURM)\n\n"
          "Then `autorecbench compare results/` shows each tuned method as \"tuned (N trials)\".")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give integers, e.g. 0,1,2") from None
    if not seeds:
        raise UserError("--seeds: give at least one seed")
    return list(dict.fromkeys(seeds))


def tune(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Hydra overrides of the configuration to tune, "
                                                             "e.g. `method=fixed data=ml-100k runner.max_rows=20000`.",
                                                             show_default=False)] = None,
    trials: Annotated[int, typer.Option("--trials", "-n", help="The budget: trials sampled by Optuna's TPE. Give "
                                        "every method the same.")] = 20,
    metric: Annotated[str, typer.Option("--metric", help="valid/NAME: the validation metric trials are selected "
                                        "on (lower is better for logloss, mse, ce).")] = "valid/auc",
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds of the final runs with the best configuration.")] = "0",
    sampler_seed: Annotated[int, typer.Option("--sampler-seed", help="Seed of the Optuna sampler.")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Trials proposed and launched at a time (run together by "
                                      "a launcher: hydra/launcher=joblib|submitit_slurm|submitit_local|ray).")] = 1,
    no_final: Annotated[bool, typer.Option("--no-final", help="Only the trials: do not rerun the best.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log lines only, no progress bar.")] = False,
) -> None:
    """Tune a method's declared search space (its YAML's `tune:` block) on validation with N trials, then rerun
    the best configuration with --seeds; the results carry the budget."""
    from rich.table import Table

    from autorecbench.launch import launch_runs, single_process_only
    from autorecbench.tune import final_overrides, run_study

    single_process_only("tune")
    overrides = list(overrides or [])
    for item in overrides:
        if item.startswith("-") or "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value (see `autorecbench tune --help`)")
    if quiet:
        overrides.append("quiet=true")
    final_seeds = _seeds(seeds)
    study = run_study(overrides, trials, metric, sampler_seed, jobs)
    table = Table(title=f"{len(study.trials)} trial(s), {study.direction} {study.metric}")
    for column in ("trial", "status", study.metric, *study.space):
        table.add_column(column)
    for trial in study.trials:
        best = trial is study.best
        table.add_row(f"{trial.number}{' (best)' if best else ''}", trial.status,
                      "–" if trial.value is None else f"{trial.value:.4f}", *[trial.params.get(k, "") for k in study.space])
    out_console.print(table)
    out_console.print(f"study: {study.directory}", highlight=False, soft_wrap=True)
    if no_final:
        return
    code = launch_runs(final_overrides(study, overrides, final_seeds), multirun=True)
    if code:  # a final run failed (1) or diverged (3)
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(tune)
