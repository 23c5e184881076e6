"""One benchmark run, end to end: config -> data -> method -> runner -> run folder.

Everything that can be checked before work starts (config, raw files, cache) is checked first and
raises :class:`UserError` with nothing written. Once the run folder exists, a failure is recorded in it
(``status: failed``, or ``diverged`` with the stage, step and reason) rather than deleted, so ``compare`` can
list it apart. ``execute`` owns the run folder: ``run.json`` (with the writing process's pid, host and a
heartbeat) and the checkpoints the runner asks for (:class:`FolderControl`); ``execute(..., resume=...)``
continues an interrupted run from its last checkpoint into the same folder.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from autorecbench import envinfo
from autorecbench.config import config_hash, configured_runner, resolve_device, runner_config, variant_label
from autorecbench.data.cache import DatasetConfig, PreparedData, prepare
from autorecbench.data.schema import TaskSpec
from autorecbench.errors import RunDiverged, UserError
from autorecbench.methods.base import MethodContext, method_class
from autorecbench.results.checkpoint import (HEARTBEAT_SECONDS, Checkpoint, CheckpointWriter, now_iso, owner,
                                             remove_checkpoint)
from autorecbench.results.run_folder import RunFolder, make_run_id
from autorecbench.results.tracking import log_finished_run
from autorecbench.runners.streaming import BatchHook, Progress
from autorecbench.train.distributed import current
from autorecbench.train.state import unpicklable

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


def with_raw_ids(rows: list[dict[str, Any]], prepared: PreparedData) -> list[dict[str, Any]]:
    """Rows keyed by ``entity`` (user/item) and ``code`` get ``raw_id`` (the id in the raw file) after
    ``entity``; other rows are returned as they are."""
    if not rows or not {"entity", "code"} <= rows[0].keys():
        return rows
    raw = {entity: prepared.raw_ids(entity) for entity in {r["entity"] for r in rows}}
    return [{"entity": r["entity"], "raw_id": raw[r["entity"]][r["code"]],
             **{k: v for k, v in r.items() if k != "entity"}} for r in rows]


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


class FolderControl:
    """:class:`~autorecbench.runners.base.RunControl` over a run folder: the heartbeat in ``run.json``, the
    checkpoint rules of ``runner.checkpoint_every`` / ``runner.checkpoint_seconds``, and the checkpoint
    files (``results/checkpoint.py``). A checkpoint that cannot be written is logged and recorded in
    ``run.json`` (``checkpoint.error``), and the run goes on without further ones."""

    # A checkpoint waits at least this many times the last one's cost: they take at most 1/20 of the run time.
    COST_FACTOR = 20.0

    def __init__(self, folder: RunFolder, info: dict[str, Any], cfg: Any, resume: Checkpoint | None,
                 wall: Callable[[], float]) -> None:
        self.folder, self.info, self.resume = folder, info, resume
        self.every: int | None = cfg.checkpoint_every
        self.seconds: float | None = cfg.checkpoint_seconds
        self.wall = wall
        self.writer = CheckpointWriter(folder.path, resume)
        self.enabled = self.every is not None or self.seconds is not None
        now = time.monotonic()
        self.last_checkpoint = self.next_beat = now
        self.last_cost = 0.0
        self.next_beat += HEARTBEAT_SECONDS

    def beat(self) -> None:
        self.info["heartbeat"] = now_iso()
        self.folder.write_json("run.json", self.info)
        self.next_beat = time.monotonic() + HEARTBEAT_SECONDS

    def tick(self, count: int, epoch_end: bool = False) -> bool:
        now = time.monotonic()
        if now >= self.next_beat:
            self.beat()
        if not self.enabled:
            return False
        if self.every is not None and (epoch_end or count % self.every == 0):
            return True
        return self.seconds is not None and now - self.last_checkpoint >= max(self.seconds, self.COST_FACTOR * self.last_cost)

    def save(self, state: dict[str, Any], position: dict[str, Any],
             append: dict[str, torch.Tensor] | None = None) -> None:
        started = time.monotonic()
        meta = {"position": position, "wall_seconds": self.wall(), "at": now_iso()}
        try:
            written = self.writer.write({**state, "meta": meta}, append or {})
        except Exception as exc:  # noqa: BLE001 - a run that cannot checkpoint still runs
            where = unpicklable(state)
            reason = f"{type(exc).__name__}: {exc}" + (f" (cannot write {where})" if where else "")
            log.warning("checkpoints disabled for this run: %s", reason)
            self.enabled = False
            self.info["checkpoint"] = {**self.info.get("checkpoint", {}), "error": reason}
            self.beat()
            return
        cost = time.monotonic() - started
        previous = self.info.get("checkpoint", {})
        self.info["checkpoint"] = {
            "count": int(previous.get("count", 0)) + 1, "position": position, "at": meta["at"], "bytes": written,
            "seconds": cost, "total_seconds": float(previous.get("total_seconds", 0.0)) + cost,
        }
        self.last_checkpoint, self.last_cost = time.monotonic(), cost
        self.beat()


@dataclass
class Resume:
    """A run to continue: its ``.partial`` folder, its ``run.json`` and the checkpoint."""

    folder: Path
    info: dict[str, Any]
    checkpoint: Checkpoint


def execute(
    cfg: DictConfig,
    overrides: list[str],
    progress: Progress | None = None,
    hook: BatchHook | None = None,
    on_folder: Callable[[Path], None] | None = None,
    resume: Resume | None = None,
) -> Path | None:
    """Run the configured pair and return the finished run folder; with ``resume``, continue that run from its
    checkpoint (same config, same data, same device) into the same folder. None on a torchrun process other
    than rank 0: it trains its shard, rank 0 evaluates and writes the one folder."""
    t0 = time.perf_counter() - (float(resume.checkpoint.meta["wall_seconds"]) if resume else 0.0)
    task = TaskSpec.from_name(str(cfg.task))
    dist = current()
    device = dist.device(resolve_device(str(cfg.device)))
    if resume is not None and dist.active:
        raise UserError(f"{resume.folder}: resume a run in one process (not under torchrun): a data-parallel run "
                        "does not checkpoint")
    seed = int(cfg.seed)
    runner_cls = configured_runner(cfg)
    runner_cfg = runner_config(cfg)
    method_cls = method_class(str(cfg.method.name), runner_cls.protocol)
    data_cfg = DatasetConfig.from_mapping(cfg.data)
    runner_cls.check_data(data_cfg, task)

    prepared = prepare(data_cfg)  # UserError here: nothing written yet
    schema = prepared.schema
    if resume is not None:
        _check_resumable(resume, schema.fingerprint, device)
    seed_everything(seed, bool(cfg.deterministic))
    dist.seed_streams(seed, device)
    runner = runner_cls(runner_cfg, progress if dist.is_main else None, hook)
    data = runner.load(prepared, task, device, data_cfg)
    method = method_cls(MethodContext(schema, task, cfg.method, cfg.model, device, seed))
    if not dist.is_main:
        runner.run(method, data)
        return None

    model = str(cfg.model.name)
    if resume is None:
        started_wall = dt.datetime.now()
        run_id = make_run_id(started_wall, schema.dataset, task.name, method_cls.name, seed,
                             model if runner_cls.names_model else None)
        folder = RunFolder(Path(str(cfg.paths.results_dir)), run_id)
        info = _run_info(cfg, overrides, folder, started_wall, method_cls, runner_cls, device, prepared)
    else:
        folder = RunFolder.attach(resume.folder)
        info = resume.info
        info.pop("error", None)
        info.pop("traceback", None)
        info["resumed"] = [*info.get("resumed", []), {"at": now_iso(), "from": resume.checkpoint.meta["position"],
                                                       "command": sys.argv}]
    if on_folder:
        on_folder(folder.path)
    ids = {"dataset": schema.dataset, "task": task.name, "method": method_cls.name, "seed": seed, "model": model}
    info.update(status="running", **owner())
    with RunLock(folder), sigterm_interrupts():
        try:
            if resume is None:
                folder.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            folder.write_json("run.json", info)
            log.info("run %s: %s on %s (%s task, %s runner, %d rows, device %s)%s", folder.run_id, method_cls.name,
                     schema.dataset, task.name, runner_cls.name, len(data), device,
                     f", resumed at {resume.checkpoint.meta['position']}" if resume else "")
            control = FolderControl(folder, info, runner_cfg, resume.checkpoint if resume else None,
                                    lambda: time.perf_counter() - t0)
            if dist.active:  # rank 0's state alone could not resume the other processes
                control.enabled = False
            result = runner.run(method, data, control)
            memory = method.memory().to_dict()
            wall = time.perf_counter() - t0
            peak_rss = envinfo.peak_rss_bytes()
            costs = {**method.costs(), **result.cost}
            folder.write_table("metrics", ids,
                               result.metrics + method.metrics() + _cost_rows(costs, memory, wall, peak_rss))
            for name, rows in result.tables.items():
                folder.write_table(name, ids, rows)
            folder.write_json("architecture.json", method.architecture())
            reports = method.reports()
            clash = set(reports) & {"metrics", "config", "run", "architecture", *result.tables}
            if clash:
                raise RuntimeError(f"method report names {sorted(clash)} clash with the run's own files")
            for name, rows in reports.items():
                folder.write_table(name, ids, with_raw_ids(rows, prepared))
            info.update(
                status="complete",
                finished_at=now_iso(),
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
            _record_failure(folder, info, exc)
            raise
    remove_checkpoint(final)  # a kill before this line leaves a complete run with a spare checkpoint folder
    log.info("run %s complete in %.1fs (%s)", final.name, info["wall_seconds"], result.rate)
    return final


def _run_info(cfg: DictConfig, overrides: list[str], folder: RunFolder, started: dt.datetime, method_cls: Any,
              runner_cls: Any, device: torch.device, prepared: PreparedData) -> dict[str, Any]:
    schema = prepared.schema
    dist = current()
    return {
        "run_id": folder.run_id,
        "status": "running",
        "started_at": started.astimezone().isoformat(timespec="seconds"),
        "dataset": schema.dataset,
        "task": str(cfg.task),
        "method": method_cls.name,
        "seed": int(cfg.seed),
        "model": str(cfg.model.name),
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


def _record_failure(folder: RunFolder, info: dict[str, Any], exc: BaseException) -> None:
    """``run.json`` of a run that stopped: diverged (the checkpoint goes: resuming would diverge again), failed
    or interrupted (the checkpoint stays: ``autorecbench resume``)."""
    info["finished_at"] = now_iso()
    if not isinstance(exc, RunDiverged):
        folder.record_failure(info, exc)
        return
    info.update(status="diverged", divergence=exc.record(), error=f"RunDiverged: {exc}")
    remove_checkpoint(folder.path)
    try:
        folder.write_json("run.json", info)
    except OSError:
        pass


def _check_resumable(resume: Resume, fingerprint: str, device: torch.device) -> None:
    """The data and device must be those the run started with, or the numbers would not be the same."""
    if resume.info.get("data", {}).get("fingerprint") not in (None, fingerprint):
        raise UserError(f"{resume.folder}: the dataset changed since the run started (cache fingerprint "
                        f"{fingerprint[:16]} vs {str(resume.info['data']['fingerprint'])[:16]}); start a new run")
    started_on = resume.info.get("device")
    if started_on is not None and started_on != str(device):
        raise UserError(f"{resume.folder}: the run started on {started_on}, this machine resolves its device to "
                        f"{device}; resume it where it ran (same device, same numbers)")


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler preempting the job) stops the run as Ctrl-C does: recorded as interrupted, its
    checkpoint kept for ``autorecbench resume`` (checkpoint files are replaced atomically, so any moment will do)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RunLock:
    """An exclusive lock on ``<run>/.lock`` for as long as a process writes the run: a second ``resume`` of the
    same run (or a resume of a run still going) fails at once instead of writing over it."""

    NAME = ".lock"

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder  # followed through ``finalize``'s rename
        self.handle: Any = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: rely on the pid check of ``resume``
            return self
        self.handle = (self.folder.path / self.NAME).open("a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            self.handle = None
            raise UserError(f"{self.folder.path}: another process is writing this run") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            (self.folder.path / self.NAME).unlink(missing_ok=True)
            self.handle.close()


def load_resume(folder: Path) -> tuple[DictConfig, Resume | None]:
    """The config and checkpoint of an interrupted run folder, checked: a ``.partial`` folder whose process is
    gone, with a checkpoint. ``Resume`` is None for a run that finished writing but was never published
    (killed at the very end): ``publish`` it."""
    from autorecbench.results.checkpoint import read_checkpoint
    from autorecbench.results.run_folder import PARTIAL_SUFFIX, read_record

    if not folder.is_dir():
        raise UserError(f"{folder}: no such run folder")
    if not folder.name.endswith(PARTIAL_SUFFIX):
        raise UserError(f"{folder}: a published run folder is complete; only <run>{PARTIAL_SUFFIX} folders resume")
    record = read_record(folder)
    info = record.info
    if info is None:
        raise UserError(f"{folder}: {record.error}; nothing to resume (`autorecbench clean --stale` removes it)")
    if record.status == "diverged":
        raise UserError(f"{folder}: the run diverged ({record.error}); resuming would diverge again")
    if record.status == "running":
        raise UserError(f"{folder}: the run is still running (pid {info.get('pid')} on {info.get('host')})")
    try:
        cfg = OmegaConf.load(folder / "config.yaml")
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / 'config.yaml'}: unreadable ({exc})") from None
    assert isinstance(cfg, DictConfig)
    if info.get("status") == "complete":
        return cfg, None
    try:
        checkpoint = read_checkpoint(folder)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is the user's to delete
        raise UserError(f"{folder}: the checkpoint cannot be read ({type(exc).__name__}: {exc})") from None
    if checkpoint is None:
        raise UserError(f"{folder}: interrupted before its first checkpoint; nothing to resume "
                        "(`autorecbench clean --stale` removes it)")
    return cfg, Resume(folder, info, checkpoint)


def publish(folder: Path) -> Path:
    """A run that wrote every file but was killed before its folder was renamed: publish it."""
    final = RunFolder.attach(folder).finalize()
    remove_checkpoint(final)
    return final
