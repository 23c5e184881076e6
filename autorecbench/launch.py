"""Launching runs: compose and check every combination of a sweep, prepare each dataset once, then hand the
overrides to Hydra, which calls :func:`execute` once per run (in process, or in a launcher's workers).

Used by ``autorecbench run``, ``tune`` and the reproductions that run a grid of runs. Launchers:
- ``basic`` (Hydra's default): the runs one after another in this process. The only one under ``torchrun``,
  where every process runs each run in step with the others (:mod:`autorecbench.train.distributed`).
- ``joblib``: worker processes on this machine.
- ``submitit_slurm`` / ``submitit_local`` (extra ``[slurm]``): one SLURM job per run, or local processes
  through the same submitit machinery; ``ray`` (extra ``[ray]``): tasks on a local or an existing Ray cluster.
  Runs in other processes or on other machines resolve paths there, so the sweep pins ``paths.root`` to this
  machine's absolute path (a shared filesystem on a cluster); each job writes its own run folder into the
  one ``results/``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from autorecbench.console import err_console, out_console, print_error, secondary_process, setup_logging
from autorecbench.errors import UserError
from autorecbench.train.distributed import Distributed, current, start, stop, world_size_from_env

log = logging.getLogger("autorecbench")


# Launchers whose runs may execute on other machines (this one need not have their GPUs).
ELSEWHERE_LAUNCHERS = ("submitit_slurm", "ray", "ray_aws")


def compose_runs(overrides: list[str], multirun: bool) -> list[DictConfig]:
    """Every run a list of overrides describes, composed and statically checked (nothing read or written)."""
    from autorecbench.config import compose, expand_sweep, validate

    combos = expand_sweep(overrides)
    if len(combos) > 1 and not multirun:
        raise UserError(f"these overrides describe a sweep of {len(combos)} runs: add -m (--multirun)")
    here = runs_here(overrides)
    configs = []
    for combo in combos:
        cfg = compose(combo)
        validate(cfg, here)
        configs.append(cfg)
    return configs


def chosen_launcher(overrides: list[str]) -> str:
    """The ``hydra/launcher`` that ``overrides`` select (given directly or by an ``experiment=`` preset)."""
    from autorecbench.config import compose, expand_sweep

    cfg = compose(expand_sweep(overrides)[0], with_hydra=True)
    return str(cfg.hydra.runtime.choices.get("hydra/launcher") or "basic")


def quote(value: Any) -> str:
    """``value`` as a quoted Hydra override value (paths with spaces, colons, quotes)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def runs_here(overrides: list[str]) -> bool:
    """Whether the runs ``overrides`` describe execute on this machine (not through a SLURM or Ray launcher)."""
    return chosen_launcher(overrides) not in ELSEWHERE_LAUNCHERS


def launcher_overrides(overrides: list[str], cfg: DictConfig) -> list[str]:
    """Check the launcher ``overrides`` select for this machine and return what the sweep must add for it:
    ``paths.root`` pinned to an absolute path when runs start in other processes or machines."""
    launcher = chosen_launcher(overrides)
    if launcher != "basic" and world_size_from_env() > 1:
        raise UserError(f"hydra/launcher={launcher} starts runs outside torchrun's process group: under torchrun "
                        "use the default launcher (every process runs each run of the sweep in step)")
    if launcher == "submitit_slurm" and shutil.which("sbatch") is None:
        raise UserError("hydra/launcher=submitit_slurm submits each run with sbatch, which is not on this "
                        "machine's PATH: launch from a SLURM login node (hydra/launcher=submitit_local runs the "
                        "same sweep on this machine)")
    if launcher == "basic" or any(o.split("=", 1)[0] == "paths.root" for o in overrides):
        return []
    return [f"paths.root={quote(Path(str(cfg.paths.root)).resolve())}"]


def single_process_only(command: str) -> None:
    """Refuse ``command`` under torchrun (it reads results the runs write: one process's job)."""
    if world_size_from_env() > 1:
        raise UserError(f"autorecbench {command} does not run under torchrun: use torchrun for `autorecbench run` "
                        "(one data-parallel run, or a -m sweep of them), and hydra/launcher=... to spread "
                        f"{command}'s runs over a cluster")


def start_data_parallel(configs: list[DictConfig]) -> Distributed:
    """Under torchrun, join the process group for the sweep's device (gloo: cpu, NCCL: cuda)."""
    from autorecbench.config import resolve_device

    if world_size_from_env() == 1:
        return current()
    kinds = sorted({resolve_device(str(cfg.device)).type for cfg in configs})
    if len(kinds) > 1:
        raise UserError(f"a torchrun sweep runs on one kind of device, not {' and '.join(kinds)}: set device=")
    return start(kinds[0])


def run_folders_in(results: Path) -> set[Path]:
    """The folders in ``results`` now (complete runs and ``.partial`` ones)."""
    return {p for p in results.iterdir() if p.is_dir()} if results.is_dir() else set()


def new_run_folders(results: Path, before: set[Path]) -> list[Path]:
    """Folders in ``results`` that are not in ``before`` (:func:`run_folders_in` of it, taken earlier)."""
    return sorted(run_folders_in(results) - before)


def prepare_datasets(configs: list[DictConfig]) -> None:
    """Prepare every dataset of a sweep once, before anything runs: a bad raw file stops the whole sweep, and
    parallel workers then all find the cache ready."""
    from autorecbench.execute import prepare_data

    seen: set[str] = set()
    for cfg in configs:
        key = OmegaConf.to_yaml(cfg.data, resolve=True)
        if key not in seen:
            seen.add(key)
            prepare_data(cfg)


def launch_runs(overrides: list[str], multirun: bool, configs: list[DictConfig] | None = None) -> None:
    """Run what ``overrides`` describe (``configs``: their :func:`compose_runs`, when the caller has them)."""
    if configs is None:
        configs = compose_runs(overrides, multirun)
    pinned = launcher_overrides(overrides, configs[0])
    dist = start_data_parallel(configs)
    try:
        with dist.main_first():  # torchrun: rank 0 prepares, the others then find the cache
            prepare_datasets(configs)
        if multirun:
            log.info("launching %d run(s)", len(configs))
        launch_hydra([*overrides, *pinned], multirun)
    finally:
        stop()


def _hydra_task(cfg: DictConfig) -> None:
    """What Hydra calls for each run (also in a launcher's worker processes, hence module level)."""
    from hydra.core.hydra_config import HydraConfig

    from autorecbench.console import LogProgress, RichProgress
    from autorecbench.execute import execute

    setup_logging()
    overrides = list(HydraConfig.get().overrides.task)
    label = f"{cfg.method.name} on {cfg.data.name}"
    progress = LogProgress(label) if cfg.quiet or not err_console.is_terminal else RichProgress(label)
    try:
        path = execute(cfg, overrides, progress)
    except UserError as exc:
        if not secondary_process():
            print_error(str(exc))
        sys.exit(2)
    if path is not None:  # None: a torchrun process other than rank 0
        out_console.print(f"results: {path}", highlight=False, soft_wrap=True)


def launch_hydra(overrides: list[str], multirun: bool, task: Callable[[DictConfig], Any] = _hydra_task) -> None:
    """Hand the overrides to Hydra's own entry point, which calls ``task`` once per run (or per trial of a
    sweeper); the plugins' config folders join the search path."""
    import hydra

    from autorecbench.config import CONFIG_NAME, config_dir, searchpath_overrides

    entry = hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")(task)
    saved = sys.argv
    sys.argv = [saved[0], *overrides, *searchpath_overrides(), *(["--multirun"] if multirun else [])]
    try:
        entry()
    finally:
        sys.argv = saved
