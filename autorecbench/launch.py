"""Launching runs: compose and check every combination of a sweep, prepare each dataset once, then hand the
overrides to Hydra, which calls :func:`execute` once per run (in process, or in a launcher's workers).

Used by ``autorecbench run`` and by the reproductions that run a grid of runs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from autorecbench.console import err_console, out_console, print_error, setup_logging
from autorecbench.errors import UserError

log = logging.getLogger("autorecbench")


def compose_runs(overrides: list[str], multirun: bool) -> list[DictConfig]:
    """Every run a list of overrides describes, composed and statically checked (nothing read or written)."""
    from autorecbench.config import compose, expand_sweep, validate

    combos = expand_sweep(overrides)
    if len(combos) > 1 and not multirun:
        raise UserError(f"these overrides describe a sweep of {len(combos)} runs: add -m (--multirun)")
    configs = []
    for combo in combos:
        cfg = compose(combo)
        validate(cfg)
        configs.append(cfg)
    return configs


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
    prepare_datasets(configs)
    if multirun:
        log.info("launching %d run(s)", len(configs))
    launch_hydra(overrides, multirun)


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
        print_error(str(exc))
        sys.exit(2)
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
