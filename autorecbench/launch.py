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
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from autorecbench.console import err_console, out_console, print_error, secondary_process, setup_logging
from autorecbench.errors import RunDiverged, UserError, quoted
from autorecbench.train.distributed import Distributed, current, start, stop, world_size_from_env

log = logging.getLogger("autorecbench")

EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_DIVERGED = 0, 1, 2, 3
OUTCOMES_ENV = "AUTORECBENCH_OUTCOMES"


# Launchers whose runs may execute on other machines (this one need not have their GPUs).
ELSEWHERE_LAUNCHERS = ("submitit_slurm", "ray", "ray_aws")


def compose_runs(overrides: list[str], multirun: bool) -> list[DictConfig]:
    """Every run a list of overrides describes, composed and statically checked (nothing read or written)."""
    from autorecbench.config import is_group_choice, check_override_types, compose, expand_sweep, validate

    combos = expand_sweep(overrides)
    if len(combos) > 1 and not multirun:
        raise UserError(f"these overrides describe a sweep of {len(combos)} runs: add -m (--multirun)")
    here = runs_here(overrides)
    configs = []
    references: dict[tuple[str, ...], DictConfig] = {}  # the config of each set of group choices, for types
    for combo in combos:
        cfg = compose(combo)
        choices = tuple(o for o in combo if is_group_choice(o))
        if choices not in references:
            references[choices] = compose(list(choices))
        check_override_types(combo, cfg, references[choices])
        validate(cfg, here)
        configs.append(cfg)
    return configs


def check_writable(path: Path, what: str) -> None:
    """Stop with one line unless files can be created in ``path`` (or, where it does not exist yet, in the
    nearest folder above it that does); nothing is left behind."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a folder")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UserError(f"{what} {quoted(path)} is not writable ({exc.strerror or exc})") from None


def check_folders(cfg: DictConfig) -> None:
    """The results folder, and the cache (and generated raw) folders a run would write, before data is read."""
    from autorecbench.data import synthetic
    from autorecbench.data.cache import DatasetConfig, cached

    check_writable(Path(str(cfg.paths.results_dir)), "results folder")
    data_cfg = DatasetConfig.from_mapping(cfg.data)
    if cached(data_cfg) is None:
        check_writable(Path(data_cfg.processed_dir), "cache folder")
        if data_cfg.generator is not None and not synthetic.generated_dir(Path(data_cfg.path), data_cfg.generator).is_dir():
            check_writable(Path(data_cfg.path), "raw data folder")


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


def launch_runs(overrides: list[str], multirun: bool, configs: list[DictConfig] | None = None) -> int:
    """Run what ``overrides`` describe (``configs``: their :func:`compose_runs`, when the caller has them); the
    exit code: 0, or 1 if a run failed, else 3 if a run diverged (a sweep runs every job either way)."""
    if configs is None:
        configs = compose_runs(overrides, multirun)
    pinned = launcher_overrides(overrides, configs[0])
    for cfg in configs:
        check_folders(cfg)
    dist = start_data_parallel(configs)
    try:
        with dist.main_first():  # torchrun: rank 0 prepares, the others then find the cache
            prepare_datasets(configs)
        if multirun:
            log.info("launching %d run(s)", len(configs))
        return launch_hydra([*overrides, *pinned], multirun)
    finally:
        stop()


def run_and_report(start: Callable[[Callable[[Path], None]], Path | None]) -> int:
    """Run one job, ``start(on_folder)``, and print how it ended in one line; returns the exit code: 0
    complete, 1 failed (the traceback is in its ``run.json``), 2 a user error, 3 diverged."""
    folders: list[Path] = []
    try:
        path = start(folders.append)
    except UserError as exc:
        if not secondary_process():  # under torchrun every process fails alike: rank 0 says it once
            print_error(str(exc))
        return EXIT_USER
    except RunDiverged as exc:
        where = f" ({folders[-1]})" if folders else ""
        print_error(f"run diverged in the {exc.stage} stage at step {exc.step}: {_one_line(exc.reason)}{where}")
        return EXIT_DIVERGED
    except Exception as exc:  # noqa: BLE001 - a failed run is one line; its traceback is in run.json
        where = f" ({folders[-1]}; traceback in its run.json)" if folders else ""
        print_error(f"run failed{where}: {type(exc).__name__}: {_one_line(exc)}")
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say how to go on, then stop as interrupted (exit 130)
        if folders:
            print_error(f"interrupted: {folders[-1]} keeps its last checkpoint; `autorecbench resume` continues it")
        raise
    if path is not None:  # None: a torchrun process other than rank 0
        out_console.print(f"results: {path}", highlight=False, soft_wrap=True)
    return EXIT_OK


def worst(codes: list[int]) -> int:
    """A sweep's exit code: failed (1) before diverged (3) before a user error (2) before success."""
    for code in (EXIT_FAILED, EXIT_DIVERGED, EXIT_USER):
        if code in codes:
            return code
    return EXIT_OK


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def progress_for(cfg: DictConfig, quiet: bool) -> Any:
    """A progress bar on a terminal, log lines at every 10% otherwise (or with ``--quiet``)."""
    from autorecbench.console import LogProgress, RichProgress

    label = f"{cfg.method.name} on {cfg.data.name}"
    return LogProgress(label) if quiet or not err_console.is_terminal else RichProgress(label)


def _hydra_task(cfg: DictConfig) -> None:
    """What Hydra calls for each run (also in a launcher's worker processes, hence module level). A single run
    exits with its code; in a sweep each job appends its code to ``$AUTORECBENCH_OUTCOMES`` and the sweep
    goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from autorecbench.execute import execute

    setup_logging()
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    progress = progress_for(cfg, bool(cfg.quiet))
    code = run_and_report(lambda on_folder: execute(cfg, overrides, progress, on_folder=on_folder))
    outcomes = os.environ.get(OUTCOMES_ENV)
    if hydra_cfg.mode == RunMode.MULTIRUN and outcomes:
        with open(outcomes, "a") as fh:
            fh.write(f"{code}\n")
    elif code != EXIT_OK:
        sys.exit(code)


def launch_hydra(overrides: list[str], multirun: bool, task: Callable[[DictConfig], Any] = _hydra_task) -> int:
    """Hand the overrides to Hydra's own entry point, which calls ``task`` once per run (or per trial of a
    sweeper); the plugins' config folders join the search path. Returns the worst exit code the runs appended
    to ``$AUTORECBENCH_OUTCOMES`` (:func:`_hydra_task` does; 0 when none did)."""
    import hydra

    from autorecbench.config import CONFIG_NAME, config_dir, searchpath_overrides

    entry = hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")(task)
    saved = sys.argv
    sys.argv = [saved[0], *overrides, *searchpath_overrides(), *(["--multirun"] if multirun else [])]
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = Path(tmp) / "outcomes"
        outcomes.touch()
        os.environ[OUTCOMES_ENV] = str(outcomes)  # joblib workers inherit it
        try:
            entry()
        finally:
            sys.argv = saved
            os.environ.pop(OUTCOMES_ENV, None)
        return worst([int(line) for line in outcomes.read_text().split()])
