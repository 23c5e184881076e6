"""The offline protocol (``runner=offline``): train / validation / test with early stopping, as CTR
benchmarks (BARS/FuxiCTR, pytorch-fm) and the AutoLoss paper do it.

Stages, each timed on its own:
1. **search** (optional, the method's ``search(loop)``): the method explores on the training and validation
   splits and returns an architecture; its cost is part of every result (``search_seconds``; on a GPU also
   ``search_gpu_seconds``).
2. **fit** (``build(architecture)``, then :meth:`TrainLoop.fit`): epochs over the training split in a fresh
   seeded random order per epoch, ``batch_size`` rows per step (2000, AutoLoss §3.3); evaluation on the
   validation split every epoch (or every ``eval_every`` steps); early stopping when the monitored
   validation metric (AUC by default) has not improved for ``patience`` evaluations; the best weights are
   restored at the end.
3. **test**: AUC and logloss (binary) or one-vs-rest AUC and cross-entropy (5 classes) on the test split,
   plus gAUC (per-user AUC weighted by the user's rows) when the data has a user field.

Recorded: best epoch and step, epochs run, wall time per stage, training samples/s, parameter counts and
embedding bytes (the method's memory report), and ``epochs.parquet``: the training loss and validation
metrics at every evaluation of every stage. Choices not fixed by the papers, as config values
(``conf/runner/offline.yaml``): ``epochs: 100`` and ``patience: 2`` (BARS' settings), ``min_delta: 0``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from autorecbench.data.offline import OfflineBatch, OfflineData, SplitData, load_offline
from autorecbench.errors import RunFailed, UserError
from autorecbench.metrics import group_auc, task_metrics
from autorecbench.methods.base import FitResult
from autorecbench.runners.base import ProgressLike, RunOutput, Runner, register_runner
from autorecbench.train.distributed import Distributed, current

MONITORS = {"auc": "max", "logloss": "min", "ce": "min"}


@dataclass
class OfflineConfig:
    batch_size: int = 2000
    epochs: int = 100
    patience: int = 2
    eval_every: int | None = None  # evaluate on validation every this many steps (None: every epoch)
    eval_batch_size: int = 50_000
    monitor: str = "auc"
    min_delta: float = 0.0
    shuffle_seed: int = 0
    max_rows: int | None = None
    data_on_device: str = "auto"  # auto | device | pinned
    valid_batch_size: int | None = None  # rows per loop.valid_batch() (None: batch_size)

    def __post_init__(self) -> None:
        if self.batch_size < 2 or self.eval_batch_size < 2:
            raise UserError("runner.batch_size and runner.eval_batch_size must be >= 2 (batch-norm needs two rows)")
        if self.epochs < 1 or self.patience < 1:
            raise UserError("runner.epochs and runner.patience must be >= 1")
        if self.eval_every is not None and self.eval_every < 1:
            raise UserError("runner.eval_every must be >= 1 step (or null: every epoch)")
        if self.monitor not in MONITORS:
            raise UserError(f"runner.monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        if self.max_rows is not None and self.max_rows < 10:
            raise UserError("runner.max_rows must be >= 10")
        if self.valid_batch_size is not None and self.valid_batch_size < 2:
            raise UserError("runner.valid_batch_size must be >= 2")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


class TrainLoop:
    """The offline training machinery a runner and a method share (see ``OfflineMethod``)."""

    def __init__(self, cfg: OfflineConfig, data: OfflineData, progress: ProgressLike | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.task = data.task
        self.train, self.valid, self.test = data.train, data.valid, data.test
        self.device = data.train.device
        self.progress = progress
        self.generator = torch.Generator().manual_seed(int(cfg.shuffle_seed))
        self._valid_generator = torch.Generator().manual_seed(int(cfg.shuffle_seed) + 1)
        self._valid_iter: Any = iter(())
        self.stage = ""
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.fits: list[FitResult] = []
        # Under torchrun: this process's shard, its share of each batch, rank 0 evaluating (identity alone).
        self.dist: Distributed = current()

    # ------------------------------------------------------------ for methods

    def valid_batch(self) -> OfflineBatch:
        """The next validation batch (``valid_batch_size`` rows), cycling through seeded random orders of the
        validation split: for bi-level steps (architecture or controller weights on validation data)."""
        size = self.cfg.valid_batch_size or self.cfg.batch_size
        for _ in range(2):
            try:
                batch = next(self._valid_iter)
                return OfflineBatch(self.dist.share(batch.x), self.dist.share(batch.label))
            except StopIteration:
                self._valid_iter = self.valid.batches(min(size, len(self.valid)), self._valid_generator)
        raise RuntimeError("empty validation split")

    def predictions(self, predict: Callable[[OfflineBatch], torch.Tensor], split: SplitData) -> torch.Tensor:
        """``predict`` over a whole split in order (no gradients); raises RunFailed if any is non-finite."""
        shape = (len(split),) if self.task.is_binary else (len(split), self.task.n_classes)
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for start, end in split.bounds(self.cfg.eval_batch_size):
                out[start:end] = predict(split.rows(slice(start, end)))
        if not bool(torch.isfinite(out).all()):
            raise RunFailed(f"non-finite predictions on the {split.name} split: the model diverged")
        return out

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` for training forward passes: DistributedDataParallel under torchrun, else itself."""
        return self.dist.parallel(module)

    def average(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Average ``tensors`` across torchrun's processes in place (nothing in one process)."""
        self.dist.average(tensors)

    def evaluate(self, predict: Callable[[OfflineBatch], torch.Tensor], split: str) -> dict[str, float]:
        """The task's metrics on ``split`` (train, valid or test), plus gAUC when there is a user field
        (under torchrun: computed by rank 0, handed to every process)."""
        return self.dist.from_main(lambda: self._evaluate(predict, split))

    def _evaluate(self, predict: Callable[[OfflineBatch], torch.Tensor], split: str) -> dict[str, float]:
        data = self.data.split(split)
        pred = self.predictions(predict, data)
        label = data.label.to(pred.device)  # pinned on the CPU when the split is not device-resident
        metrics = task_metrics(self.task, pred, label)
        if self.task.is_binary and self.data.user_index is not None:
            users = data.x[:, self.data.user_index].to(pred.device)
            metrics["gauc"] = float(group_auc(pred, label, users).cpu())
        return metrics

    def fit(self, stage: str, step: Callable[[OfflineBatch, TrainLoop], torch.Tensor],
            predict: Callable[[OfflineBatch], torch.Tensor], module: nn.Module, *, epochs: int | None = None,
            patience: int | None = None, restore_best: bool = True) -> FitResult:
        """Train ``module`` with ``step`` over epochs of the training split, evaluate ``predict`` on validation,
        stop early, restore the best weights. ``epochs`` / ``patience`` default to the runner's.
        ``restore_best=False`` keeps the weights of the last step (a search whose state only means something at
        the end, e.g. AutoFIS' gates, sparsified by GRDA as the steps go on)."""
        cfg = self.cfg
        epochs = epochs or cfg.epochs
        patience = patience or cfg.patience
        mode = MONITORS[cfg.monitor]
        self.stage, self.step = stage, 0
        batch_size, world = self.dist.batch_size(cfg.batch_size), self.dist.world_size
        step = self.dist.own_stream(step)  # per-process dropout / Gumbel draws under torchrun
        steps_per_epoch = len(self.train.bounds(batch_size))
        best: float | None = None
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch: float | None = None
        best_step: int | None = None
        evaluations = stale = samples = 0
        train_seconds = eval_seconds = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_steps = 0
        stopped = False
        if self.progress:
            self.progress.start(epochs * len(self.train) * world)
        _sync(self.device)
        stage_start = interval_start = time.perf_counter()

        def checkpoint() -> bool:
            """Evaluate on validation; True when patience has run out."""
            nonlocal best, best_state, best_epoch, best_step, evaluations, stale, train_seconds, eval_seconds
            nonlocal loss_sum, loss_steps, interval_start
            _sync(self.device)
            now = time.perf_counter()
            train_seconds += now - interval_start
            mean_loss = float(self.dist.mean(loss_sum).cpu()) / max(loss_steps, 1)
            if not math.isfinite(mean_loss):
                raise RunFailed(f"{stage} stage: the training loss became non-finite by step {self.step}")
            metrics = self.evaluate(predict, "valid")
            epoch_done = self.step / steps_per_epoch
            row = {"stage": stage, "evaluation": evaluations, "epoch": epoch_done, "step": self.step,
                   "samples": samples}
            self.history.append({**row, "split": "train", "metric": "loss", "value": mean_loss})
            self.history += [{**row, "split": "valid", "metric": m, "value": v} for m, v in metrics.items()]
            evaluations += 1
            value = metrics.get(cfg.monitor, math.nan)
            if _better(value, best, mode, cfg.min_delta):
                best, best_epoch, best_step, stale = value, epoch_done, self.step, 0
                if restore_best:
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                stale += 1
            loss_sum.zero_()
            loss_steps = 0
            _sync(self.device)
            interval_start = time.perf_counter()
            eval_seconds += interval_start - now
            return stale >= patience

        try:
            for _ in range(epochs):
                for batch in self.train.batches(batch_size, self.generator):
                    loss = step(batch, self)
                    self.step += 1
                    samples += len(batch) * world  # every process's rows
                    loss_sum += loss.detach().to(torch.float64)
                    loss_steps += 1
                    if self.progress:
                        self.progress.update(samples)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and checkpoint():
                        stopped = True
                        break
                if stopped:
                    break
                if not cfg.eval_every and checkpoint():
                    stopped = True
                    break
            if loss_steps:  # steps after the last evaluation (eval_every not dividing the epochs)
                checkpoint()
        finally:
            if self.progress:
                self.progress.stop()
        if best_state is not None:  # only kept with restore_best
            module.load_state_dict(best_state)
        _sync(self.device)
        result = FitResult(
            stage=stage, monitor=cfg.monitor, best_value=best, best_epoch=best_epoch, best_step=best_step,
            epochs_run=self.step / steps_per_epoch, steps=self.step, samples=samples, evaluations=evaluations,
            stopped_early=stopped, train_seconds=train_seconds, eval_seconds=eval_seconds,
            wall_seconds=time.perf_counter() - stage_start,
        )
        self.fits.append(result)
        return result


def _metric_rows(split: str, metrics: dict[str, float], n: int) -> list[dict[str, Any]]:
    return [{"split": split, "metric": m, "value": v} for m, v in metrics.items()] + [
        {"split": split, "metric": "n", "value": float(n)}]


@register_runner
class OfflineProtocol(Runner):
    """``runner=offline``: search (optional) -> fit with early stopping -> test."""

    name = "offline"
    protocol = "offline"
    config_class = OfflineConfig
    headline_split = "test"
    names_model = True
    data_parallel_refusal = None  # torchrun: sharded training rows, DDP, rank 0 evaluates (train/distributed.py)

    @classmethod
    def check_data(cls, data_cfg: Any, task: Any) -> None:
        if data_cfg.kind == "ctr" and not task.is_binary:
            raise UserError(f"dataset {data_cfg.name!r} has 0/1 click labels: use task=binary")

    def load(self, prepared: Any, task: Any, device: torch.device, data_cfg: Any) -> OfflineData:
        dist = current()
        return load_offline(prepared, task, device, data_cfg, max_rows=self.cfg.max_rows,
                            placement=self.cfg.data_on_device, process=(dist.rank, dist.world_size))

    def run(self, method: Any, data: OfflineData) -> RunOutput:
        loop = TrainLoop(self.cfg, data, self.progress)
        device = loop.device
        _sync(device)
        started = time.perf_counter()
        architecture = method.search(loop)
        _sync(device)
        search_seconds = time.perf_counter() - started
        search_fits = list(loop.fits)

        method.build(architecture)
        fit = loop.fit("fit", method.train_step, method.predict, method.module())
        in_step = loop.dist.in_step(method.module())  # torchrun: every process ended with rank 0's weights

        started = time.perf_counter()
        test = loop.evaluate(method.predict, "test")
        test_seconds = time.perf_counter() - started
        valid = loop.evaluate(method.predict, "valid")

        on_gpu = device.type == "cuda"
        cost = {
            "search_seconds": search_seconds,
            "train_seconds": fit.wall_seconds,
            "test_seconds": test_seconds,
            "train_step_seconds": fit.train_seconds,
            "eval_seconds": fit.eval_seconds,
            "train_samples_per_second": fit.samples_per_second,
        }
        if on_gpu:  # one GPU per process: GPU-seconds are wall seconds times the processes
            gpus = loop.dist.world_size
            cost.update(search_gpu_seconds=search_seconds * gpus, train_gpu_seconds=fit.wall_seconds * gpus)
        training = {"best_epoch": fit.best_epoch, "best_step": fit.best_step, "epochs": fit.epochs_run,
                    "steps": fit.steps, "stopped_early": float(fit.stopped_early)}
        metrics = (_metric_rows("test", test, len(data.test)) + _metric_rows("valid", valid, len(data.valid))
                   + [{"split": "fit", "metric": k, "value": math.nan if v is None else float(v)}
                      for k, v in training.items()])
        return RunOutput(
            metrics=metrics,
            cost=cost,
            tables={"epochs": loop.history},
            info={
                "offline": {
                    **asdict(self.cfg),
                    "searched": architecture is not None,
                    "search": {"seconds": search_seconds, "fits": [asdict(f) for f in search_fits]},
                    "fit": {**asdict(fit), "samples_per_second": fit.samples_per_second},
                    "test_seconds": test_seconds,
                },
                "split": data.split_info,
                **({"data_parallel_weights_in_step": in_step} if loop.dist.active else {}),
                "searched_architecture": architecture,
            },
            headline=test,
            rate=f"{fit.samples_per_second:,.0f} training samples/s",
        )
