"""One benchmark run, end to end: config -> data -> method -> runner -> run folder.

Everything that can be checked before work starts (config, raw files, cache) is checked first and
raises :class:`UserError` with nothing written. Once the run folder exists, a failure is recorded in it
(``status: failed``) rather than deleted, so ``compare`` can list it apart.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from autorecbench import envinfo
from autorecbench.config import config_hash, configured_runner, resolve_device, runner_config, variant_label
from autorecbench.data.cache import DatasetConfig, PreparedData, prepare
from autorecbench.data.schema import TaskSpec
from autorecbench.methods.base import MethodContext, method_class
from autorecbench.results.run_folder import RunFolder, make_run_id
from autorecbench.results.tracking import log_finished_run
from autorecbench.runners.streaming import BatchHook, Progress
from autorecbench.train.distributed import current

log = logging.getLogger("autorecbench")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this to be deterministic; harmless on the CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def prepare_data(cfg: DictConfig) -> PreparedData:
    return prepare(DatasetConfig.from_mapping(cfg.data))


def _cost_rows(runner_cost: dict[str, float], memory: dict[str, Any], wall: float, peak_rss: int) -> list[dict[str, Any]]:
    values = {
        "wall_seconds": wall,
        **runner_cost,
        "embedding_bytes": memory["embedding_bytes"],
        "embedding_optimizer_bytes": memory["embedding_optimizer_bytes"],
        "parameters": memory["parameters"],
        "peak_rss_bytes": peak_rss,
    }
    return [{"split": "cost", "metric": k, "value": float(v)} for k, v in values.items()]


def _logger_options(cfg: DictConfig) -> dict[str, Any] | None:
    logger = cfg.get("logger")
    return OmegaConf.to_container(logger, resolve=True) if logger is not None else None  # type: ignore[return-value]


def execute(
    cfg: DictConfig,
    overrides: list[str],
    progress: Progress | None = None,
    hook: BatchHook | None = None,
    on_folder: Callable[[Path], None] | None = None,
) -> Path | None:
    """Run the configured pair and return the finished run folder (None on a torchrun process other than
    rank 0: it trains its shard, rank 0 evaluates and writes the one folder)."""
    started_wall = dt.datetime.now()
    t0 = time.perf_counter()
    task = TaskSpec.from_name(str(cfg.task))
    dist = current()
    device = dist.device(resolve_device(str(cfg.device)))
    seed = int(cfg.seed)
    runner_cls = configured_runner(cfg)
    runner_cfg = runner_config(cfg)
    method_cls = method_class(str(cfg.method.name), runner_cls.protocol)
    data_cfg = DatasetConfig.from_mapping(cfg.data)
    runner_cls.check_data(data_cfg, task)

    prepared = prepare(data_cfg)  # UserError here: nothing written yet
    schema = prepared.schema
    seed_everything(seed, bool(cfg.deterministic))
    dist.seed_streams(seed, device)
    runner = runner_cls(runner_cfg, progress if dist.is_main else None, hook)
    data = runner.load(prepared, task, device, data_cfg)
    method = method_cls(MethodContext(schema, task, cfg.method, cfg.model, device, seed))
    if not dist.is_main:
        runner.run(method, data)
        return None

    model = str(cfg.model.name)
    run_id = make_run_id(started_wall, schema.dataset, task.name, method_cls.name, seed,
                         model if runner_cls.names_model else None)
    folder = RunFolder(Path(str(cfg.paths.results_dir)), run_id)
    if on_folder:
        on_folder(folder.path)
    ids = {"dataset": schema.dataset, "task": task.name, "method": method_cls.name, "seed": seed, "model": model}
    info: dict[str, Any] = {
        "run_id": folder.run_id,
        "status": "running",
        "started_at": started_wall.astimezone().isoformat(timespec="seconds"),
        **ids,
        "runner": runner_cls.name,
        "headline_split": runner_cls.headline_split,
        "device": str(device),
        "overrides": list(overrides),
        "variant": variant_label(list(overrides), dist.world_size),
        "config_hash": config_hash(cfg, dist.world_size),
        "world_size": dist.world_size,  # processes of a data-parallel run (torchrun), 1 otherwise
        "data_parallel": dist.info() if dist.active else None,
        # `autorecbench tune`'s final runs: the budget and validation metric that chose their settings.
        "tuning": OmegaConf.to_container(cfg.tuning, resolve=True) if cfg.get("tuning") is not None else None,
        "command": sys.argv,
        "method_info": {
            "paper": method_cls.paper,
            "fidelity": method_cls.fidelity,
            "deviations": method_cls.deviations,
            "faithful": method_cls.fidelity != "not faithful",
        },
        "data": {"cache_dir": str(prepared.directory), **schema.run_info()},
        "git": envinfo.git_state(),
        "versions": envinfo.package_versions(),
        "hardware": envinfo.hardware(device),
    }
    try:
        folder.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        folder.write_json("run.json", info)
        log.info("run %s: %s on %s (%s task, %s runner, %d rows, device %s)", folder.run_id, method_cls.name,
                 schema.dataset, task.name, runner_cls.name, len(data), device)
        result = runner.run(method, data)
        memory = method.memory().to_dict()
        wall = time.perf_counter() - t0
        peak_rss = envinfo.peak_rss_bytes()
        folder.write_table("metrics", ids, result.metrics + _cost_rows(result.cost, memory, wall, peak_rss))
        for name, rows in result.tables.items():
            folder.write_table(name, ids, rows)
        folder.write_json("architecture.json", method.architecture())
        reports = method.reports()
        clash = set(reports) & {"metrics", "config", "run", "architecture", *result.tables}
        if clash:
            raise RuntimeError(f"method report names {sorted(clash)} clash with the run's own files")
        for name, rows in reports.items():
            folder.write_table(name, ids, rows)
        info.update(
            status="complete",
            finished_at=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            wall_seconds=wall,
            **result.info,
            memory=memory,
            peak_rss_bytes=peak_rss,
            cuda_peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            metrics=result.headline,
            reports=sorted(f"{name}.parquet" for name in reports),
        )
        folder.write_json("run.json", info)
        log_finished_run(_logger_options(cfg), Path(str(cfg.paths.root)), folder.path)
        final = folder.finalize()
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        info.update(status=status, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        try:
            folder.write_json("run.json", info)
        except OSError:
            pass
        raise
    log.info("run %s complete in %.1fs (%s)", final.name, info["wall_seconds"], result.rate)
    return final
