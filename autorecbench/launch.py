"""Launching runs: compose and check every combination of a sweep, prepare each dataset once, then hand the
overrides to Hydra, which calls :func:`execute` once per run (in process, or in a launcher's workers).

Used by ``autorecbench run`` and by the reproductions that run a grid of runs.
"""

from __future__ import annotations

import logging
import sys

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


def launch_runs(overrides: list[str], multirun: bool, configs: list[DictConfig] | None = None) -> None:
    """Run what ``overrides`` describe (``configs``: their :func:`compose_runs`, when the caller has them)."""
    from autorecbench.execute import prepare_data

    if configs is None:
        configs = compose_runs(overrides, multirun)
    # Prepare every dataset once, before anything runs: a bad raw file stops the whole sweep, and
    # parallel workers then all find the cache ready.
    seen: set[str] = set()
    for cfg in configs:
        key = OmegaConf.to_yaml(cfg.data, resolve=True)
        if key not in seen:
            seen.add(key)
            prepare_data(cfg)
    if multirun:
        log.info("launching %d run(s)", len(configs))
    _launch_hydra(overrides, multirun)


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


def _launch_hydra(overrides: list[str], multirun: bool) -> None:
    import hydra

    from autorecbench.config import CONFIG_NAME, config_dir

    entry = hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")(_hydra_task)
    saved = sys.argv
    sys.argv = [saved[0], *overrides, *(["--multirun"] if multirun else [])]
    try:
        entry()
    finally:
        sys.argv = saved
