"""Streaming test-then-train (ESAPN paper §2.1, §3.2).

For each mini-batch in stream order the method first predicts (the predictions are recorded for
evaluation), then learns from the same batch. There is no train/test split: metrics are reported over an
evaluation window at the end of the stream, during which the model keeps learning (the paper uses the
last 5 million transactions). Streams shorter than 4 x ``eval_last`` use the last ``eval_fraction`` of
rows instead; the rule used is recorded with the results.

A checkpoint (``runner.checkpoint_every`` batches, ``runner.checkpoint_seconds``) holds the position (batches
done), the history's frequency counters and last batch, the divergence guard, the seconds streamed so far, the
method's ``state_dict()`` and every global RNG; the predictions so far are appended to an append-only array
beside it (one copy of each row, however many checkpoints). A resumed run continues from the next batch and
ends with the same numbers as one that was never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from autorecbench.data.stream import Stream, StreamBatch, StreamHistory
from autorecbench.errors import UserError
from autorecbench.methods.base import StreamingMethod
from autorecbench.metrics import bucket_bounds, bucket_label, frequency_bucket, task_metrics
from autorecbench.runners.base import LifecycleConfig, NoControl, RunControl, RunOutput, Runner, register_runner
from autorecbench.runners.guard import DivergenceGuard, chance_loss, constant_loss, evaluation_loss, loss_metric
from autorecbench.train.state import rng_state, set_rng_state

STAGE = "stream"


@dataclass
class StreamingConfig(LifecycleConfig):
    batch_size: int = 500
    eval_last: int = 5_000_000
    eval_fraction: float = 0.2
    order: str = "time"
    order_seed: int = 0
    max_rows: int | None = None
    curve_window: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 2:
            raise UserError("runner.batch_size must be >= 2 (batch-norm needs two rows)")
        if self.order not in ("time", "random"):
            raise UserError(f"unknown runner.order {self.order!r}: choose time or random")
        if self.max_rows is not None and self.max_rows < 2:
            raise UserError("runner.max_rows must be >= 2")
        if self.eval_last < 1:
            raise UserError("runner.eval_last must be >= 1")
        if not 0 < self.eval_fraction <= 1:
            raise UserError("runner.eval_fraction must be in (0, 1]")
        if self.curve_window < 1:
            raise UserError("runner.curve_window must be >= 1 batch")


@dataclass
class EvalWindow:
    """Rows ``start:end`` of the stream over which the headline metrics are computed."""

    rule: str  # "last_n" or "last_fraction"
    start: int
    end: int
    eval_last: int
    eval_fraction: float

    @property
    def n(self) -> int:
        return self.end - self.start


def evaluation_window(n_rows: int, eval_last: int, eval_fraction: float) -> EvalWindow:
    if n_rows >= 4 * eval_last:
        return EvalWindow("last_n", n_rows - eval_last, n_rows, eval_last, eval_fraction)
    n = max(1, math.ceil(n_rows * eval_fraction))
    return EvalWindow("last_fraction", n_rows - n, n_rows, eval_last, eval_fraction)


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def update(self, done: int) -> None: ...
    def stop(self) -> None: ...


# (event, batch, tensor): "predicted" with the predictions, "learned" with the training loss.
BatchHook = Callable[[str, StreamBatch, Any], None]


@dataclass
class StreamingResult:
    metrics: list[dict[str, Any]]  # split, metric, value
    curve: list[dict[str, Any]]  # window, start, end, n, metric, value
    buckets: list[dict[str, Any]]  # entity, bucket, freq_min, freq_max, label, n, metric, value
    window: EvalWindow
    n_rows: int
    n_batches: int
    stream_seconds: float

    @property
    def interactions_per_second(self) -> float:
        return self.n_rows / self.stream_seconds if self.stream_seconds > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "n_rows": self.n_rows,
            "n_batches": self.n_batches,
            "stream_seconds": self.stream_seconds,
            "interactions_per_second": self.interactions_per_second,
            "eval_window": {**asdict(self.window), "n": self.window.n},
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StreamingRunner:
    def __init__(self, cfg: StreamingConfig, progress: Progress | None = None, hook: BatchHook | None = None):
        self.cfg = cfg
        self.progress = progress
        self.hook = hook

    def run(self, method: StreamingMethod, stream: Stream, control: RunControl | None = None) -> StreamingResult:
        control = control or NoControl()
        n = len(stream)
        bounds = stream.batch_bounds(self.cfg.batch_size)
        device = stream.user.device
        shape = (n,) if stream.task.is_binary else (n, stream.task.n_classes)
        predictions = torch.empty(shape, dtype=torch.float32, device=device)
        window = evaluation_window(n, self.cfg.eval_last, self.cfg.eval_fraction)
        history = StreamHistory(stream, eval_start=window.start)
        guard = DivergenceGuard(STAGE, self.cfg, device)
        first, written, seconds_before = 0, 0, 0.0
        if control.resume is not None:
            first, written, seconds_before = self._resume(control, method, history, guard, predictions)
        if self.progress:
            self.progress.start(n)
            self.progress.update(written)
        _sync(device)
        started = time.perf_counter()
        try:
            for index in range(first, len(bounds)):
                start, end = bounds[index]
                batch = stream.rows(slice(start, end), index)
                predicted, loss = method.predict_and_learn(batch, history)  # test, then train
                predictions[start:end] = predicted
                if self.hook:
                    self.hook("predicted", batch, predicted)
                    self.hook("learned", batch, loss)
                history.advance(batch)
                guard.observe(index + 1, loss, predicted)
                if (index + 1) % self.cfg.curve_window == 0 or index + 1 == len(bounds):
                    self._check_window(guard, stream, predictions, bounds, index)
                if self.progress:
                    self.progress.update(end)
                if control.tick(index + 1):
                    guard.flush()  # a checkpoint never holds a diverged state
                    state = {"runner": {"batches": index + 1, "history": history.state(), "guard": guard.state(),
                                        "seconds": seconds_before + time.perf_counter() - started},
                             "method": method.state_dict(), "rng": rng_state()}
                    control.save(state, {"stage": STAGE, "done": index + 1, "total": len(bounds), "unit": "batches"},
                                 {"predictions": predictions[written:end]})
                    written = end
            guard.flush()
            _sync(device)
        finally:
            if self.progress:
                self.progress.stop()
        elapsed = seconds_before + time.perf_counter() - started
        guard.predictions(len(bounds), predictions)
        return StreamingResult(
            metrics=self._metrics(stream, predictions, window),
            curve=self._curve(stream, predictions, bounds),
            buckets=self._buckets(stream, predictions, window),
            window=window,
            n_rows=n,
            n_batches=len(bounds),
            stream_seconds=elapsed,
        )

    @staticmethod
    def _resume(control: RunControl, method: StreamingMethod, history: StreamHistory, guard: DivergenceGuard,
                predictions: torch.Tensor) -> tuple[int, int, float]:
        """Put the checkpoint back; returns the next batch, the rows predicted so far and the seconds streamed."""
        assert control.resume is not None
        saved = control.resume.state
        runner = saved["runner"]
        method.load_state_dict(saved["method"])
        history.load(runner["history"])
        guard.load(runner["guard"])
        done = control.resume.appended("predictions")
        predictions[: len(done)] = torch.from_numpy(done).to(predictions.device)
        set_rng_state(saved["rng"])
        return int(runner["batches"]), len(done), float(runner["seconds"])

    def _check_window(self, guard: DivergenceGuard, stream: Stream, predictions: torch.Tensor,
                      bounds: list[tuple[int, int]], index: int) -> None:
        """The guard's evaluation rule over the curve window ending with batch ``index``: a logloss (CE) worse
        than the window's constant label rate by more than the margin."""
        if guard.margin is None:
            return
        guard.flush()  # non-finite predictions are reported at their own batch first
        first = index - (index % self.cfg.curve_window)
        start, end = bounds[first][0], bounds[index][1]
        label = stream.label[start:end]
        value = evaluation_loss(stream.task, predictions[start:end], label)
        guard.evaluation(index + 1, f"stream rows {start}-{end}", loss_metric(stream.task), value,
                         constant_loss(stream.task, label, label), chance_loss(stream.task))

    @staticmethod
    def _metrics(stream: Stream, predictions: torch.Tensor, window: EvalWindow) -> list[dict[str, Any]]:
        rows = []
        for split, sl in (("eval", slice(window.start, window.end)), ("all", slice(0, len(stream)))):
            for metric, value in task_metrics(stream.task, predictions[sl], stream.label[sl]).items():
                rows.append({"split": split, "metric": metric, "value": value})
            rows.append({"split": split, "metric": "n", "value": float(sl.stop - sl.start)})
        return rows

    def _curve(self, stream: Stream, predictions: torch.Tensor, bounds: list[tuple[int, int]]) -> list[dict[str, Any]]:
        rows = []
        k = self.cfg.curve_window
        for window, first in enumerate(range(0, len(bounds), k)):
            start, end = bounds[first][0], bounds[min(first + k, len(bounds)) - 1][1]
            values = task_metrics(stream.task, predictions[start:end], stream.label[start:end])
            for metric, value in values.items():
                rows.append({"window": window, "start": start, "end": end, "n": end - start,
                             "metric": metric, "value": value})
        return rows

    @staticmethod
    def _buckets(stream: Stream, predictions: torch.Tensor, window: EvalWindow) -> list[dict[str, Any]]:
        rows = []
        sl = slice(window.start, window.end)
        pred, label = predictions[sl], stream.label[sl]
        for entity, freq in (("user", stream.user_freq[sl]), ("item", stream.item_freq[sl])):
            buckets = frequency_bucket(freq)
            present, counts = torch.unique(buckets, return_counts=True)
            for bucket, count in zip(present.tolist(), counts.tolist()):
                mask = buckets == bucket
                lo, hi = bucket_bounds(bucket)
                for metric, value in task_metrics(stream.task, pred[mask], label[mask]).items():
                    rows.append({"entity": entity, "bucket": bucket, "freq_min": lo, "freq_max": hi,
                                 "label": bucket_label(bucket), "n": count, "metric": metric, "value": value})
        return rows


# ---------------------------------------------------------------- the plugin ``execute`` drives (runner=streaming)


@register_runner
class StreamingProtocol(Runner):
    """``runner=streaming``: a user-item rating stream, test-then-train, metrics over the evaluation window."""

    name = "streaming"
    protocol = "streaming"
    config_class = StreamingConfig
    headline_split = "eval"
    data_parallel_refusal = "test-then-train is one sequential pass over the stream"
    tuning_split = "eval"

    @classmethod
    def tuning_overrides(cls, cfg: StreamingConfig, n_rows: int) -> list[str]:
        """A stream has no validation split: tuning trials stream only the rows before the evaluation window
        (``runner.max_rows`` = its start), and their own evaluation window — the last part of that prefix, by
        the same rule — is the validation the trials are selected on."""
        rows = min(n_rows, cfg.max_rows) if cfg.max_rows else n_rows
        return [f"runner.max_rows={evaluation_window(rows, cfg.eval_last, cfg.eval_fraction).start}"]

    @classmethod
    def check_data(cls, data_cfg: Any, task: Any) -> None:
        if data_cfg.kind != "ratings":
            raise UserError(f"dataset {data_cfg.name!r} ({data_cfg.family}) is not a user-item rating stream: "
                            "use runner=offline (or a CTR backbone, e.g. model=deepfm)")

    def load(self, prepared: Any, task: Any, device: torch.device, data_cfg: Any) -> Stream:
        from autorecbench.data.stream import load_stream

        return load_stream(prepared, task, device, order=self.cfg.order, order_seed=self.cfg.order_seed,
                           max_rows=self.cfg.max_rows)

    def run(self, method: Any, data: Stream, control: RunControl | None = None) -> RunOutput:
        result = StreamingRunner(self.cfg, self.progress, self.hook).run(method, data, control)
        summary = result.summary()
        return RunOutput(
            metrics=result.metrics,
            cost={"stream_seconds": summary["stream_seconds"],
                  "interactions_per_second": summary["interactions_per_second"]},
            tables={"curve": result.curve, "buckets": result.buckets},
            info={"stream": {"order": self.cfg.order, "order_seed": self.cfg.order_seed,
                             "max_rows": self.cfg.max_rows, "batch_size": self.cfg.batch_size, **summary}},
            headline={r["metric"]: r["value"] for r in result.metrics if r["split"] == "eval"},
            rate=f"{summary['interactions_per_second']:.0f} interactions/s",
        )
