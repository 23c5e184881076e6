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

import inspect
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from autorecbench.data.offline import OfflineBatch, OfflineData, SplitData, load_offline
from autorecbench.errors import RunDiverged, UserError
from autorecbench.metrics import group_auc, task_metrics
from autorecbench.methods.base import FitResult
from autorecbench.runners.base import (LifecycleConfig, NoControl, ProgressLike, RunControl, RunOutput, Runner,
                                       register_runner)
from autorecbench.runners.guard import DivergenceGuard, chance_loss, constant_loss, loss_metric
from autorecbench.train.distributed import Distributed, current
from autorecbench.train.state import restore, rng_state, set_rng_state

MONITORS = {"auc": "max", "logloss": "min", "ce": "min"}
AMP_MODES = ("off", "bf16")


@dataclass
class OfflineConfig(LifecycleConfig):
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
    amp: str = "off"  # off | bf16: training steps and predictions under bf16 autocast (linear layers: the MLP)

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.amp not in AMP_MODES:
            raise UserError(f"runner.amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


@dataclass
class FitState:
    """Where a ``fit`` call stands: the loop position, early-stopping state and the stage's accumulators (what
    a checkpoint keeps of a stage in progress). ``epoch_rng``: the shuffle generator's state when the current
    epoch drew its order, so a resumed epoch draws the same one and skips the ``batch`` batches done."""

    epoch: int = 0
    batch: int = 0
    epoch_rng: torch.Tensor | None = None
    best: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: float | None = None
    best_step: int | None = None
    evaluations: int = 0
    stale: int = 0
    samples: int = 0
    stopped: bool = False
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    loss_sum: float = 0.0
    loss_steps: int = 0


def _closure(function: Callable[..., Any]) -> Callable[..., Any] | None:
    """A step or predict function as a checkpoint keeps it: a local function (its closure holds e.g. a search
    model and its optimisers); None for a bound method, whose object is the method (kept on its own)."""
    return function if inspect.isfunction(function) else None


class TrainLoop:
    """The offline training machinery a runner and a method share (see ``OfflineMethod``).

    With a :class:`~autorecbench.runners.base.RunControl`, every ``fit`` call writes checkpoints (at the steps
    and epoch ends it says) holding the loop (step counters, curve, finished fits, both shuffle generators and
    the validation-batch cycle), the stage's :class:`FitState`, the divergence guard, the method's
    ``state_dict()``, the fit's module, the closures of its step and predict functions (a search stage's local
    model and optimisers), what the runner keeps in ``extra`` and every global RNG. On resume, the ``fit`` call
    that wrote the checkpoint (same stage, same call number) puts all of it back in place and goes on from the
    next step; calls before it run again from the start (deterministically, so they end where they did).
    """

    def __init__(self, cfg: OfflineConfig, data: OfflineData, progress: ProgressLike | None = None,
                 control: RunControl | None = None, method: Any = None) -> None:
        self.cfg = cfg
        self.data = data
        self.task = data.task
        self.train, self.valid, self.test = data.train, data.valid, data.test
        self.device = data.train.device
        self.progress = progress
        self.control = control or NoControl()
        self.method = method
        self.generator = torch.Generator().manual_seed(int(cfg.shuffle_seed))
        self._valid_generator = torch.Generator().manual_seed(int(cfg.shuffle_seed) + 1)
        self._valid_iter: Any = iter(())
        self._valid_cycle: tuple[torch.Tensor, int] | None = None  # generator state at the cycle's start, batches drawn
        self.stage = ""
        self.step = 0
        self.total_steps = 0  # across stages: what runner.checkpoint_every counts
        self.history: list[dict[str, Any]] = []
        self.fits: list[FitResult] = []
        self.extra: dict[str, Any] = {}  # the runner's own results so far (the search's), kept in checkpoints
        self._constant: float | None = None
        # Under torchrun: this process's shard, its share of each batch, rank 0 evaluating (identity alone).
        self.dist: Distributed = current()

    # ------------------------------------------------------------ for methods

    def valid_batch(self) -> OfflineBatch:
        """The next validation batch (``valid_batch_size`` rows), cycling through seeded random orders of the
        validation split: for bi-level steps (architecture or controller weights on validation data)."""
        for _ in range(2):
            try:
                batch = next(self._valid_iter)
            except StopIteration:
                self._valid_cycle = (self._valid_generator.get_state(), 0)
                self._valid_iter = self.valid.batches(self._valid_size(), self._valid_generator)
                continue
            assert self._valid_cycle is not None
            self._valid_cycle = (self._valid_cycle[0], self._valid_cycle[1] + 1)
            if not self.dist.active:
                return batch
            share = self.dist.share
            return OfflineBatch(share(batch.x), share(batch.label), {k: share(v) for k, v in batch.seq.items()},
                                None if batch.seq_len is None else share(batch.seq_len))
        raise RuntimeError("empty validation split")

    def _valid_size(self) -> int:
        return min(self.cfg.valid_batch_size or self.cfg.batch_size, len(self.valid))

    def predictions(self, predict: Callable[[OfflineBatch], torch.Tensor], split: SplitData) -> torch.Tensor:
        """``predict`` over a whole split in order (no gradients); a non-finite one is a divergence."""
        shape = (len(split),) if self.task.is_binary else (len(split), self.task.n_classes)
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        with torch.no_grad(), self.autocast():
            for start, end in split.bounds(self.cfg.eval_batch_size):
                out[start:end] = predict(split.rows(slice(start, end)))
        finite = torch.isfinite(out.reshape(len(split), -1)).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            raise RunDiverged(self.stage or "test", self.step, f"non-finite prediction on the {split.name} split (row {row})")
        return out

    def autocast(self) -> Any:
        """``runner.amp=bf16``: bf16 autocast on the loop's device — matrix products (the backbones' linear
        layers, i.e. the MLP) run in bf16, while embedding gathers, FM/PNN interactions, batch-norm and the loss
        stay float32 (autocast's op lists); parameters, gradients and Adam stay float32. ``off``: nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16")

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

    def constant_loss(self) -> float:
        """Validation logloss (CE) of a constant prediction at the training split's label rate (class shares)."""
        if self._constant is None:
            self._constant = constant_loss(self.task, self.train.label, self.valid.label)
        return self._constant

    # ------------------------------------------------------------ checkpoints

    def _loop_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "total_steps": self.total_steps, "history": self.history,
                "fits": [asdict(f) for f in self.fits], "generator": self.generator.get_state(),
                "valid_generator": self._valid_generator.get_state(), "valid_cycle": self._valid_cycle,
                "extra": self.extra}

    def _load_loop_state(self, state: dict[str, Any]) -> None:
        self.stage, self.step, self.total_steps = state["stage"], int(state["step"]), int(state["total_steps"])
        self.history = list(state["history"])
        self.fits = [FitResult(**f) for f in state["fits"]]
        self.generator.set_state(state["generator"])
        self._valid_generator.set_state(state["valid_generator"])
        self._valid_cycle = state["valid_cycle"]
        self._valid_iter = iter(())
        if self._valid_cycle is not None:  # the same order again, from the next batch
            cycle_start, drawn = self._valid_cycle
            self._valid_generator.set_state(cycle_start)
            self._valid_iter = self.valid.batches(self._valid_size(), self._valid_generator, skip=drawn)
            self._valid_cycle = (cycle_start, drawn)
        self.extra = dict(state["extra"])

    def resume_point(self, stage: str) -> dict[str, Any] | None:
        """The checkpoint's state if it was written by the ``fit`` call about to start (``stage``, and as many
        finished fits before it), else None."""
        resume = self.control.resume
        if resume is None or resume.state.get("restored"):
            return None
        runner = resume.state["runner"]
        if runner["fit_stage"] == stage and runner["fit_index"] == len(self.fits):
            return resume.state
        if len(self.fits) > runner["fit_index"]:
            raise RuntimeError(f"the checkpoint was written in fit call {runner['fit_index']} "
                               f"({runner['fit_stage']!r}), which this run never reached again")
        return None

    def _save(self, stage: str, fit: FitState, guard: DivergenceGuard, module: nn.Module,
              step: Callable[..., Any], predict: Callable[..., Any], epochs: int) -> None:
        state = {"runner": {"fit_stage": stage, "fit_index": len(self.fits), "loop": self._loop_state(),
                            "fit": dict(vars(fit)), "guard": guard.state()},
                 "method": self.method.state_dict() if self.method is not None else None,
                 "module": module, "step": _closure(step), "predict": _closure(predict), "rng": rng_state()}
        self.control.save(state, {"stage": stage, "epoch": fit.epoch, "epochs": epochs, "step": self.step,
                                  "unit": "steps"})

    def _restore(self, saved: dict[str, Any], module: nn.Module, step: Callable[..., Any],
                 predict: Callable[..., Any]) -> FitState:
        saved["restored"] = True
        if self.method is not None and saved["method"] is not None:
            self.method.load_state_dict(saved["method"])
        # The module and the step / predict closures (a search's local model and optimisers) in one pass; the
        # method itself, which a closure may hold, is restored already.
        memo = {id(self.method): self.method} if self.method is not None else {}
        restore((module, step, predict), (saved["module"], saved["step"] or step, saved["predict"] or predict), memo)
        self._load_loop_state(saved["runner"]["loop"])
        set_rng_state(saved["rng"])
        return FitState(**saved["runner"]["fit"])

    # ------------------------------------------------------------ training

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
        guard = DivergenceGuard(stage, cfg, self.device)
        saved = self.resume_point(stage)
        if saved is not None:
            fit = self._restore(saved, module, step, predict)
            guard.load(saved["runner"]["guard"])
        else:
            fit = FitState()
            self.stage, self.step = stage, 0
        batch_size, world = self.dist.batch_size(cfg.batch_size), self.dist.world_size
        step = self.dist.own_stream(step)  # per-process dropout / Gumbel draws under torchrun
        steps_per_epoch = len(self.train.bounds(batch_size))
        loss_sum = torch.full((), fit.loss_sum, dtype=torch.float64, device=self.device)
        if self.progress:
            self.progress.start(epochs * len(self.train) * world)
            self.progress.update(fit.samples)
        _sync(self.device)
        session_start = interval_start = time.perf_counter()
        wall_before = fit.wall_seconds

        def evaluate_now() -> bool:
            """Evaluate on validation; True when patience has run out."""
            nonlocal interval_start
            _sync(self.device)
            now = time.perf_counter()
            fit.train_seconds += now - interval_start
            mean_loss = float(self.dist.mean(loss_sum).cpu()) / max(fit.loss_steps, 1)
            guard.flush()
            metrics = self.evaluate(predict, "valid")
            epoch_done = self.step / steps_per_epoch
            row = {"stage": stage, "evaluation": fit.evaluations, "epoch": epoch_done, "step": self.step,
                   "samples": fit.samples}
            self.history.append({**row, "split": "train", "metric": "loss", "value": mean_loss})
            self.history += [{**row, "split": "valid", "metric": m, "value": v} for m, v in metrics.items()]
            fit.evaluations += 1
            metric = loss_metric(self.task)
            guard.evaluation(self.step, "valid split", metric, metrics[metric], self.constant_loss(),
                             chance_loss(self.task))
            value = metrics.get(cfg.monitor, math.nan)
            if _better(value, fit.best, mode, cfg.min_delta):
                fit.best, fit.best_epoch, fit.best_step, fit.stale = value, epoch_done, self.step, 0
                if restore_best:
                    fit.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                fit.stale += 1
            loss_sum.zero_()
            fit.loss_steps = 0
            _sync(self.device)
            interval_start = time.perf_counter()
            fit.eval_seconds += interval_start - now
            return fit.stale >= patience

        def save() -> None:
            nonlocal interval_start
            fit.loss_sum = float(loss_sum.cpu())
            fit.wall_seconds = wall_before + time.perf_counter() - session_start
            _sync(self.device)
            now = time.perf_counter()
            fit.train_seconds += now - interval_start
            self._save(stage, fit, guard, module, step, predict, epochs)
            interval_start = time.perf_counter()  # the checkpoint's own time counts as neither

        try:
            while not fit.stopped and fit.epoch < epochs:
                if fit.batch == 0:
                    fit.epoch_rng = self.generator.get_state()
                else:  # a resumed epoch: draw the same order, skip what was done
                    assert fit.epoch_rng is not None
                    self.generator.set_state(fit.epoch_rng)
                for batch in self.train.batches(batch_size, self.generator, skip=fit.batch):
                    with self.autocast():
                        loss = step(batch, self)
                    fit.batch += 1
                    self.step += 1
                    self.total_steps += 1
                    fit.samples += len(batch) * world  # every process's rows
                    loss_sum += loss.detach().to(torch.float64)
                    fit.loss_steps += 1
                    guard.observe(self.step, loss)
                    if self.progress:
                        self.progress.update(fit.samples)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and evaluate_now():
                        fit.stopped = True
                        break
                    if self.control.tick(self.total_steps):
                        save()
                if fit.stopped:
                    break
                fit.epoch, fit.batch = fit.epoch + 1, 0
                if not cfg.eval_every and evaluate_now():
                    fit.stopped = True
                    break
                if self.control.tick(self.total_steps, epoch_end=True):
                    save()
            if fit.loss_steps:  # steps after the last evaluation (eval_every not dividing the epochs)
                evaluate_now()
            guard.flush()
        finally:
            if self.progress:
                self.progress.stop()
        if fit.best_state is not None:  # only kept with restore_best
            module.load_state_dict(fit.best_state)
        _sync(self.device)
        result = FitResult(
            stage=stage, monitor=cfg.monitor, best_value=fit.best, best_epoch=fit.best_epoch,
            best_step=fit.best_step, epochs_run=self.step / steps_per_epoch, steps=self.step, samples=fit.samples,
            evaluations=fit.evaluations, stopped_early=fit.stopped, train_seconds=fit.train_seconds,
            eval_seconds=fit.eval_seconds, wall_seconds=wall_before + time.perf_counter() - session_start,
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

    def run(self, method: Any, data: OfflineData, control: RunControl | None = None) -> RunOutput:
        loop = TrainLoop(self.cfg, data, self.progress, control, method)
        device = loop.device
        resume = loop.control.resume
        searched = resume.state["runner"]["loop"]["extra"].get("search") if resume is not None else None
        if searched is not None:
            # The checkpoint is past the search: take its result, and what it left on the method before build().
            method.load_state_dict(resume.state["method"])  # type: ignore[union-attr]
            loop.fits = [FitResult(**f) for f in searched["fits"]]
        else:
            _sync(device)
            started = time.perf_counter()
            architecture = method.search(loop)
            _sync(device)
            searched = {"architecture": architecture, "seconds": time.perf_counter() - started,
                        "fits": [asdict(f) for f in loop.fits]}
            loop.extra["search"] = searched
        architecture, search_seconds = searched["architecture"], float(searched["seconds"])

        method.build(architecture)
        fit = loop.fit("fit", method.train_step, method.predict, method.module())
        in_step = loop.dist.in_step(method.module())  # torchrun: every process ended with rank 0's weights
        if resume is not None and not resume.state.get("restored"):
            raise RuntimeError("the checkpoint matched none of this run's fit stages")

        loop.stage = "test"
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
                    "search": {"seconds": search_seconds, "fits": searched["fits"]},
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
