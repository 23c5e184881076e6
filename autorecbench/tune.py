"""Equal-budget tuning (``autorecbench tune``): a method's declared search space, sampled by Hydra's Optuna
sweeper (``hydra-optuna-sweeper``, TPE), selected on validation only, the best configuration then rerun with
the final seeds and recorded with its budget.

- The search space is the method's ``tune:`` block in ``conf/method/NAME.yaml``: full config keys mapped to
  the sweeper's expressions, e.g. ``method.lr: tag(log, interval(1.0e-4, 1.0e-2))``,
  ``method.embedding_dim: choice(16, 32, 64)``, ``model.dropout: interval(0.0, 0.5)``.
- Trials select on validation, never on the data the final runs are judged on: offline, on the ``valid``
  split (the trials also test, but the test numbers are never read); streaming, where there is no validation
  split, the trials stream only the rows before the evaluation window and select on their own evaluation
  window, the last part of that prefix (``Runner.tuning_overrides``).
- A study lives in ``<paths.tune_dir>/<time>_<data>_<task>_<model>_<method>/`` (``tune/``, apart from ``results/``): ``trials/`` (one run folder per
  trial), ``hydra/`` (the sweeper's records), ``trials.parquet`` and ``tune.json`` (space, budget, metric,
  direction, sampler seed, every trial's value and parameters, the best). The final runs land in
  ``<results_dir>`` with ``tuning: {trials, metric, study}`` in their config and ``run.json``; ``compare``
  shows them as "tuned (N trials)" and never groups them with untuned runs.
- ``--trials N`` is the budget: give every method the same N for a fair comparison. The sampler is seeded
  (``--sampler-seed``), so the same command proposes the same trials (for a given ``--jobs``).
- ``--jobs K``: the sweeper proposes K trials at a time and the launcher runs them together (with
  ``hydra/launcher=joblib``, ``submitit_slurm``, ``submitit_local`` or ``ray``; the default launcher runs them
  one after another); the final runs go through the same launcher.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from omegaconf import DictConfig, OmegaConf

from autorecbench.errors import UserError

log = logging.getLogger("autorecbench")

LOWER_IS_BETTER = {"mse", "logloss", "ce", "loss"}


@dataclass
class Trial:
    number: int
    params: dict[str, str]
    value: float | None
    status: str
    path: str


@dataclass
class Study:
    directory: Path
    space: dict[str, str]
    metric: str
    direction: str
    budget: int  # trials asked for (failed trials count: they were spent)
    trials: list[Trial] = field(default_factory=list)
    best: Trial | None = None


def parse_metric(text: str) -> tuple[str, str]:
    """``valid/auc`` -> (``valid``, ``auc``); only validation may select."""
    split, _, name = text.partition("/")
    if not name:
        raise UserError(f"--metric {text!r}: give SPLIT/NAME, e.g. valid/auc")
    if split != "valid":
        raise UserError(f"--metric {text!r}: trials select on validation only (valid/NAME)")
    return split, name


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def search_space(cfg: DictConfig, user_overrides: list[str]) -> dict[str, str]:
    """The method's ``tune:`` block, checked: every key a config value, every value a sweeper expression."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    where = f"conf/method/{cfg.method.name}.yaml"
    block = cfg.method.get("tune")
    if not block:
        raise UserError(f"method {cfg.method.name!r} declares no search space: add a `tune:` block to {where}")
    space = {k: str(v) for k, v in _flat(OmegaConf.to_container(block, resolve=True)).items()}  # type: ignore[arg-type]
    parser = OverridesParser.create()
    set_by_user = {o.split("=", 1)[0].lstrip("+~") for o in user_overrides}
    for key, expression in list(space.items()):
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            if key.startswith("model."):  # a method runs on several backbones; not every one has every option
                log.info("%s is not an option of model=%s: not tuned", key, cfg.model.name)
                del space[key]
                continue
            raise UserError(f"{where}: tune.{key}: no such config value")
        if key in set_by_user:
            raise UserError(f"{key} is in {cfg.method.name}'s search space: leave it to the tuner or edit {where}")
        try:
            parser.parse_override(f"{key}={expression}")
        except HydraException as exc:
            raise UserError(f"{where}: tune.{key}: {expression!r} is not a sweeper expression "
                            f"({str(exc).splitlines()[0]})") from None
    return space


def _trial_value(path: Path, split: str, metric: str) -> float | None:
    metrics = pl.read_parquet(path / "metrics.parquet").filter((pl.col("split") == split) & (pl.col("metric") == metric))
    value = float(metrics["value"][0]) if metrics.height else math.nan
    return value if math.isfinite(value) else None


def _trial_task(cfg: DictConfig) -> float:
    """One trial (Hydra calls it; the Optuna sweeper reads the return value): the run's validation metric,
    NaN for a trial that failed (Optuna records it as failed)."""
    from hydra.core.hydra_config import HydraConfig

    from autorecbench.console import LogProgress, setup_logging
    from autorecbench.execute import execute

    setup_logging()
    overrides = list(HydraConfig.get().overrides.task)
    try:
        path = execute(cfg, overrides, LogProgress(f"trial {HydraConfig.get().job.num}"))
    except Exception as exc:  # noqa: BLE001 - a failed trial is a result of the study, not the end of it
        log.warning("trial %s failed: %s: %s", overrides, type(exc).__name__, exc)
        return math.nan
    value = _trial_value(path, str(cfg.tuning.split), str(cfg.tuning.metric).partition("/")[2])
    log.info("trial %s: %s = %s", " ".join(overrides), cfg.tuning.metric, value)
    return math.nan if value is None else value


def run_study(overrides: list[str], trials: int, metric: str, sampler_seed: int = 0, jobs: int = 1) -> Study:
    """Sample ``trials`` configurations of the search space, ``jobs`` at a time, and select on validation (no
    final runs)."""
    from autorecbench.config import compose, configured_runner, expand_sweep, runner_config, validate
    from autorecbench.execute import prepare_data
    from autorecbench.launch import launch_hydra, launcher_overrides, quote as _quote, runs_here
    from autorecbench.results.run_folder import discover, read_record

    if trials < 1 or jobs < 1:
        raise UserError("--trials and --jobs must be >= 1")
    _, name = parse_metric(metric)
    if len(expand_sweep(overrides)) > 1:
        raise UserError("tune takes one configuration to tune (no comma sweeps); the seeds go in --seeds")
    cfg = compose(overrides)
    validate(cfg, runs_here(overrides))
    pinned = launcher_overrides(overrides, cfg)
    space = search_space(cfg, overrides)
    runner = configured_runner(cfg)
    prepared = prepare_data(cfg)
    holdout = runner.tuning_overrides(runner_config(cfg), prepared.schema.n_rows)
    direction = "minimize" if name in LOWER_IS_BETTER else "maximize"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    directory = Path(str(cfg.paths.tune_dir)) / f"{stamp}_{cfg.data.name}_{cfg.task}_{cfg.model.name}_{cfg.method.name}"
    directory.mkdir(parents=True, exist_ok=False)
    marks = [f"+tuning.trials={trials}", f"+tuning.metric={metric}", f"+tuning.split={runner.tuning_split}",
             f"+tuning.study={_quote(directory.resolve())}", "+tuning.trial=true"]
    sweep = [*overrides, *pinned, *holdout, *marks, f"paths.results_dir={_quote((directory / 'trials').resolve())}",
             "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.n_jobs={jobs}",
             f"hydra.sweeper.direction={direction}", f"hydra.sweeper.sampler.seed={sampler_seed}",
             f"hydra.sweep.dir={_quote((directory / 'hydra').resolve())}",
             *[f"{key}={expression}" for key, expression in space.items()]]
    log.info("tuning %s on %s: %d trial(s), selecting %s (%s) on %s", cfg.method.name, cfg.data.name, trials, metric,
             direction, " ".join(holdout) or "the validation split")
    launch_hydra(sweep, multirun=True, task=_trial_task)

    study = Study(directory, space, metric, direction, trials)
    for number, folder in enumerate(discover([str(directory / "trials")])):
        record = read_record(folder)
        info = record.info or {}
        params = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in info.get("overrides", [])
                  if o.split("=", 1)[0] in space}
        value = _trial_value(folder, runner.tuning_split, name) if record.complete else None
        study.trials.append(Trial(number, params, value, record.status, str(folder)))
    finished = [t for t in study.trials if t.value is not None]
    if not finished:
        raise UserError(f"all {len(study.trials)} trial(s) failed; see {directory / 'trials'}")
    pick = min if direction == "minimize" else max
    study.best = pick(finished, key=lambda t: t.value)  # type: ignore[arg-type,return-value]
    _record(study, cfg, overrides, trials, sampler_seed, holdout, jobs)
    return study


def _record(study: Study, cfg: DictConfig, overrides: list[str], trials: int, sampler_seed: int,
            holdout: list[str], jobs: int) -> None:
    rows = [{"trial": t.number, "status": t.status, "value": t.value, "path": t.path,
             **{f"param.{k}": v for k, v in t.params.items()}} for t in study.trials]
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(study.directory / "trials.parquet")
    summary = {"method": str(cfg.method.name), "data": str(cfg.data.name), "task": str(cfg.task),
               "overrides": overrides, "space": study.space, "trials": trials, "metric": study.metric,
               "direction": study.direction, "sampler": "optuna TPE (hydra-optuna-sweeper)",
               "sampler_seed": sampler_seed, "jobs": jobs, "holdout": holdout,
               "best": asdict(study.best) if study.best else None, "all": [asdict(t) for t in study.trials]}
    (study.directory / "tune.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def final_overrides(study: Study, overrides: list[str], seeds: list[int]) -> list[str]:
    """The best trial's configuration over ``seeds``, marked with the study's budget."""
    from autorecbench.launch import quote as _quote

    assert study.best is not None
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "seed"]
    return [*kept, *[f"{k}={v}" for k, v in study.best.params.items()],
            f"seed={','.join(str(s) for s in seeds)}", f"+tuning.trials={study.budget}",
            f"+tuning.metric={study.metric}", f"+tuning.study={_quote(study.directory.resolve())}"]
