"""Hydra config composition for the CLI: locating ``conf/``, composing, expanding sweeps, validating.

Runs go through Hydra's own entry point (so multirun, launchers such as ``hydra/launcher=joblib`` and
sweepers work as documented); before that, every combination of a sweep is composed and checked here,
so a bad override stops the command with one line before anything runs or is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from autorecbench.errors import UserError, quoted

CONFIG_NAME = "config"
# Keys that say where or how verbosely a run happens, not what is run: left out of the config hash.
NON_SEMANTIC_KEYS = ("seed", "quiet", "device", "paths", "hydra", "logger")
# Where the data lives is not what is computed (the dataset name, options and fingerprint are); a method's
# ``tune:`` block is the search space `autorecbench tune` samples from, not a setting of the run; which tuning
# study chose a tuned run's values is where it came from (its budget, ``tuning.trials``, stays in the hash).
LOCATION_KEYS = ("data.path", "data.processed_dir", "method.tune", "tuning.study")
# How a run is kept alive and watched, not what it computes: a complete run has the same numbers whatever these
# are, so they neither enter the config hash nor make a variant.
OPERATIONAL_KEYS = ("runner.checkpoint_every", "runner.checkpoint_seconds", "runner.divergence_factor",
                    "runner.divergence_warmup", "runner.divergence_margin", "data.chunk_bytes")
# Overrides that already appear as their own columns in comparisons.
IDENTITY_OVERRIDES = ("seed", "data", "method", "task", "device", "quiet", "model")
# Overrides (by key prefix) that are not part of a run's variant label: where things go, the tracker, and the
# tuning budget (`compare` shows it beside the method as "tuned (N trials)").
UNLABELLED_PREFIXES = ("paths.", "hydra", "experiment", "logger", "tuning")
# Hydra launchers that come with an extra of this package (pyproject.toml): launcher -> (plugin, extra).
LAUNCHER_EXTRAS = {"submitit_slurm": ("hydra-submitit-launcher", "slurm"),
                   "submitit_local": ("hydra-submitit-launcher", "slurm"),
                   "ray": ("hydra-ray-launcher", "ray"), "ray_aws": ("hydra-ray-launcher", "ray")}


def config_dir() -> Path:
    """``$AUTORECBENCH_CONFIG_DIR``, else the ``conf/`` folder beside the package."""
    env = os.environ.get("AUTORECBENCH_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / f"{CONFIG_NAME}.yaml").is_file():
        raise UserError(f"config folder not found: {path} (set AUTORECBENCH_CONFIG_DIR)")
    return path


def config_dirs() -> list[Path]:
    """``conf/`` and every installed plugin's ``conf/`` folder (:mod:`autorecbench.plugins`), in search order."""
    from autorecbench.plugins import plugin_config_dirs

    return [config_dir(), *plugin_config_dirs()]


def searchpath_overrides() -> list[str]:
    """The Hydra override that adds the plugins' config folders to the search path (none without plugins)."""
    from autorecbench.plugins import plugin_config_dirs

    extra = plugin_config_dirs()
    if not extra:
        return []
    return ["hydra.searchpath=[" + ",".join(repr(f"file://{d}") for d in extra) + "]"]


def group_options(group: str) -> list[str]:
    """The options of a config group (``data``, ``method``, ``model``, ...) in ``conf/`` and in plugins."""
    return sorted({p.stem for d in config_dirs() for p in (d / group).glob("*.yaml")})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _missing_launcher(message: str) -> str | None:
    """What to install when Hydra could not find a launcher of :data:`LAUNCHER_EXTRAS`."""
    for name, (plugin, extra) in LAUNCHER_EXTRAS.items():
        if f"hydra/launcher/{name}'" in message:
            return (f"hydra/launcher={name} needs {plugin}: pip install 'autorecbench[{extra}]' "
                    "(`make setup` installs it)")
    return None


def compose(overrides: list[str] | None = None, with_hydra: bool = False) -> DictConfig:
    """The composed config for one combination of overrides (no sweep syntax); ``with_hydra`` keeps the
    ``hydra`` node (launcher, sweeper, chosen options)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=[*(overrides or []), *searchpath_overrides()],
                                return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(_missing_launcher(str(exc)) or f"bad config override: {_first_line(exc)}") from None
    return cfg


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination of a multirun's overrides (``seed=0,1,2 method=a,b`` gives six lists)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides=list(overrides))
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except (HydraException, ValueError) as exc:  # ValueError: e.g. an integer of more than 4,300 digits
        for override in overrides:  # name the culprit
            try:
                parser.parse_overrides(overrides=[override])
            except (HydraException, ValueError) as bad:
                raise UserError(f"bad override {quoted(override)}: {_first_line(bad)}") from None
        raise UserError(f"bad override: {_first_line(exc)}") from None
    return [combo for batch in batches for combo in batch]


def is_group_choice(override: str) -> bool:
    """``method=esapn``, ``hydra/launcher=joblib``: picks a config file (a folder of ``conf/`` or of a plugin's)
    rather than setting a value."""
    key = override.split("=", 1)[0].lstrip("+~")
    return "/" in key or ("." not in key and any((d / key).is_dir() for d in config_dirs()))


def check_override_types(combo: list[str], cfg: DictConfig, reference: DictConfig) -> None:
    """Every ``key=value`` of ``combo`` must have the kind of the value it replaces in ``reference`` (the config
    composed from the same group choices alone): an integer where an integer was (``seed=1.5``, ``seed=abc``,
    ``runner.batch_size=abc`` are errors), a number where a number was, true/false where a flag was."""
    from autorecbench.typed import check_like

    for override in combo:
        if is_group_choice(override) or override.startswith("~") or "=" not in override:
            continue
        key = override.split("=", 1)[0].lstrip("+")
        if key.startswith("hydra"):
            continue
        default = OmegaConf.select(reference, key, default=None, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        check_like(key, value, default)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # interpolation errors name the key
        raise UserError(f"bad config: {_first_line(exc)}") from None
    assert isinstance(container, dict)
    return container


def runner_config(cfg: DictConfig) -> Any:
    """The configured runner's typed config (``runner.name`` picks the runner)."""
    from autorecbench.runners.base import build_config

    options = resolved(cfg)["runner"]
    options.pop("name", None)
    return build_config(configured_runner(cfg), options)


def configured_runner(cfg: DictConfig) -> Any:
    """The runner class ``runner.name`` picks."""
    from autorecbench.runners.base import runner_class

    return runner_class(str(cfg.runner.get("name", "streaming")))


def validate(cfg: DictConfig, here: bool = True) -> None:
    """Static checks of a composed config, before any data is read or folder created. ``here=False``: the run
    will execute on another machine (a SLURM or Ray launcher), so whether this one has CUDA is not checked."""
    from autorecbench.data.cache import DatasetConfig
    from autorecbench.data.schema import TaskSpec
    from autorecbench.methods.base import method_class
    from autorecbench.models.registry import model_class

    from autorecbench.typed import check_value

    resolved(cfg)
    check_value("seed", cfg.seed, int)
    task = TaskSpec.from_name(str(cfg.task))
    runner = configured_runner(cfg)
    model = model_class(str(cfg.model.name))
    model_protocols = getattr(model, "protocols", ("streaming",))
    if runner.protocol not in model_protocols:
        raise UserError(f"model {cfg.model.name!r} runs with runner={', runner='.join(model_protocols)}, "
                        f"not runner={runner.name}")
    try:
        method_class(str(cfg.method.name), runner.protocol).check_config(cfg.method)
        check_model = getattr(model, "check_config", None)
        if check_model is not None:
            check_model(cfg.model)
    except (ValueError, TypeError) as exc:  # e.g. a word where a number belongs
        raise UserError(f"bad method/model option: {exc}") from None
    runner.check_data(DatasetConfig.from_mapping(cfg.data), task)
    resolve_device(str(cfg.device), check_available=here)
    runner_config(cfg)
    from autorecbench.results.tracking import check_logger
    from autorecbench.train.distributed import world_size_from_env

    check_logger(cfg.get("logger"))
    if world_size_from_env() > 1:
        check_data_parallel(cfg, world_size_from_env())


def check_data_parallel(cfg: DictConfig, world_size: int) -> None:
    """Refuse, before anything is read or started, a run that cannot train data-parallel over ``world_size``
    torchrun processes: one line naming the reason."""
    from autorecbench.methods.base import method_class
    from autorecbench.train.distributed import backend_for

    runner = configured_runner(cfg)
    if runner.data_parallel_refusal:
        raise UserError(f"runner={runner.name} cannot run data-parallel (torchrun): {runner.data_parallel_refusal}")
    backend = backend_for(resolve_device(str(cfg.device)).type)
    method_class(str(cfg.method.name), runner.protocol).check_data_parallel(cfg.method, backend)
    for key in ("batch_size", "valid_batch_size"):
        value = cfg.runner.get(key)
        if value is not None and (int(value) % world_size or int(value) // world_size < 2):
            raise UserError(f"runner.{key}={value} must split into {world_size} equal parts of at least 2 rows "
                            f"(one per torchrun process)")


def resolve_device(name: str, check_available: bool = True) -> Any:
    """``device=`` as a torch device (``auto``: CUDA when available); ``check_available``: refuse CUDA on a
    machine without it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and check_available and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available on this machine (use device=cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def config_hash(cfg: DictConfig, world_size: int = 1) -> str:
    """Identity of what a run computes: the unresolved config without seed, device, paths, verbosity or the
    operational keys (checkpoints, divergence guard, chunk size), and the processes of a data-parallel run
    (``world_size`` > 1: sharded training, per-process batch-norm).

    Unresolved, so that interpolations of the seed (``runner.order_seed: ${seed}``) do not split seeds of
    one experiment into different groups.
    """
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    if world_size > 1:
        container["world_size"] = world_size
    for key in NON_SEMANTIC_KEYS:
        container.pop(key, None)
    for dotted in (*LOCATION_KEYS, *OPERATIONAL_KEYS):
        group, _, leaf = dotted.partition(".")
        if isinstance(container.get(group), dict):
            container[group].pop(leaf, None)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:12]


def variant_label(overrides: list[str], world_size: int = 1) -> str:
    """The overrides that distinguish a run beyond dataset, task, method and seed, e.g. ``method.embedding_dim=64``
    (and ``world_size=N`` for a data-parallel run of N processes)."""
    kept = [f"world_size={world_size}"] if world_size > 1 else []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if (key in IDENTITY_OVERRIDES or key in LOCATION_KEYS or key in OPERATIONAL_KEYS
                or key.startswith(UNLABELLED_PREFIXES)):
            continue
        kept.append(item)
    return " ".join(sorted(kept))
