"""The runner plugin interface and registry (``runner.name`` in the config picks one).

A runner knows a protocol (``streaming``: test-then-train over a stream; ``offline``: train / validation /
test with early stopping), never a method: ``execute.py`` asks the registry for the configured runner, the
method registry for the method class of that runner's protocol, lets the runner load the prepared data and
drive the method, and writes whatever tables the runner returns into the run folder.

Runners own the loop position, the metric accumulators, the frequency counters, the loop's random generators
and early-stopping state: at the points :class:`RunControl` says, they write all of it (with the method's
``state_dict()`` and every global RNG) as a checkpoint, and a resumed run hands them that checkpoint back.
``execute.py`` implements :class:`RunControl` with the run folder; a runner never sees a path.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from autorecbench.errors import UserError
from autorecbench.typed import check_dataclass


class ProgressLike(Protocol):
    def start(self, total: int) -> None: ...
    def update(self, done: int) -> None: ...
    def stop(self) -> None: ...


@dataclass
class LifecycleConfig:
    """The ``runner`` keys every protocol shares: checkpoints and the divergence guard.

    ``checkpoint_every``: write a checkpoint every N batches (streaming) or optimisation steps (offline; then
    also at each epoch end); ``checkpoint_seconds``: also whenever this many seconds have passed since the last
    one, and at least 20 times the last checkpoint's own cost (so checkpoints take at most 5% of the run time
    whatever the model's size). ``null`` turns either rule off.
    ``divergence_factor``: the run diverged when a training loss exceeds this many times its running minimum
    after ``divergence_warmup`` batches/steps; ``divergence_margin``: ... or when an evaluation's logloss (CE for
    5 classes) is worse than both a constant prediction's and the uniform prediction's by more than this fraction (``runners/guard.py``). ``null``
    turns a rule off; a non-finite loss or prediction always stops the run.
    """

    checkpoint_every: int | None = None
    checkpoint_seconds: float | None = 300.0
    divergence_factor: float | None = 100.0
    divergence_warmup: int = 20
    divergence_margin: float | None = 0.5

    def __post_init__(self) -> None:
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise UserError(f"runner.checkpoint_every must be >= 1 (or null), got {self.checkpoint_every}")
        if self.checkpoint_seconds is not None and self.checkpoint_seconds <= 0:
            raise UserError(f"runner.checkpoint_seconds must be > 0 (or null), got {self.checkpoint_seconds}")
        if self.divergence_factor is not None and self.divergence_factor <= 1:
            raise UserError(f"runner.divergence_factor must be > 1 (or null), got {self.divergence_factor}")
        if self.divergence_warmup < 0:
            raise UserError(f"runner.divergence_warmup must be >= 0, got {self.divergence_warmup}")
        if self.divergence_margin is not None and self.divergence_margin <= 0:
            raise UserError(f"runner.divergence_margin must be > 0 (or null), got {self.divergence_margin}")


class ResumePoint(Protocol):
    """A checkpoint read back: ``state`` is the root the runner saved; ``appended(name)`` the rows it appended
    under ``name`` up to that checkpoint."""

    state: dict[str, Any]

    def appended(self, name: str) -> np.ndarray: ...


class RunControl(Protocol):
    """What a runner asks of the run around it. ``tick`` after every batch / step (cheap: a counter and a clock;
    it also beats the run's heartbeat) says whether to write a checkpoint now; ``save`` writes one atomically:
    ``state`` (live objects, pickled at once), ``position`` (for ``autorecbench runs``) and ``append`` (rows
    added since the last checkpoint to append-only arrays, e.g. a stream's predictions). ``resume`` is the
    checkpoint a resumed run continues from (None for a fresh run)."""

    resume: ResumePoint | None

    def tick(self, count: int, epoch_end: bool = False) -> bool: ...

    def save(self, state: dict[str, Any], position: dict[str, Any],
             append: dict[str, torch.Tensor] | None = None) -> None: ...


class NoControl:
    """No checkpoints, nothing to resume (benchmarks, tests that drive a runner directly)."""

    resume: ResumePoint | None = None

    def tick(self, count: int, epoch_end: bool = False) -> bool:
        return False

    def save(self, state: dict[str, Any], position: dict[str, Any],
             append: dict[str, torch.Tensor] | None = None) -> None:
        raise RuntimeError("NoControl never asks for a checkpoint")


@dataclass
class RunOutput:
    """What a runner hands back to ``execute``.

    ``metrics``: rows (split, metric, value) for ``metrics.parquet``, without the cost rows; ``cost``: the
    runner's own cost metrics (``execute`` adds wall time, peak memory and the method's memory report);
    ``tables``: further run tables by name (e.g. ``curve``, ``buckets`` or ``epochs``); ``info``: sections
    merged into ``run.json``; ``headline``: ``run.json``'s ``metrics`` (the split the results are judged on);
    ``rate``: a short throughput text for the log.
    """

    metrics: list[dict[str, Any]]
    cost: dict[str, float]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    headline: dict[str, float] = field(default_factory=dict)
    rate: str = ""


class Runner(ABC):
    """One protocol. Subclasses set ``name``, ``protocol`` (the method registry they draw from), their typed
    config class and ``headline_split`` (the metrics split a comparison reads by default)."""

    name: ClassVar[str]
    protocol: ClassVar[str]
    config_class: ClassVar[type]
    headline_split: ClassVar[str]
    # Whether run folder names carry the model (several backbones per dataset are the norm offline).
    names_model: ClassVar[bool] = False
    # Why the protocol cannot train data-parallel under torchrun (None: it can; see train/distributed.py).
    data_parallel_refusal: ClassVar[str | None] = "it does not shard its data across processes"
    # The split of a tuning trial's metrics that `autorecbench tune` selects on: validation, never test data.
    tuning_split: ClassVar[str] = "valid"

    @classmethod
    def tuning_overrides(cls, cfg: Any, n_rows: int) -> list[str]:
        """Overrides that keep a tuning trial off the data the final runs are judged on, for a dataset of
        ``n_rows`` (none by default: the protocol has its own validation split)."""
        return []

    def __init__(self, cfg: Any, progress: ProgressLike | None = None,
                 hook: Callable[[str, Any, Any], None] | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.hook = hook

    @classmethod
    def check_data(cls, data_cfg: Any, task: Any) -> None:
        """Reject a dataset this protocol cannot run on (UserError), before anything is prepared."""

    @abstractmethod
    def load(self, prepared: Any, task: Any, device: torch.device, data_cfg: Any) -> Any:
        """The prepared dataset as this protocol's device-resident data."""

    @abstractmethod
    def run(self, method: Any, data: Any, control: RunControl | None = None) -> RunOutput:
        """Drive ``method`` over ``data``; with ``control``, write checkpoints when it says and, when it holds a
        checkpoint (``control.resume``), continue from there."""


RUNNERS: dict[str, type[Runner]] = {}
_RUNNER_MODULES = ("autorecbench.runners.streaming", "autorecbench.runners.offline")


def register_runner(cls: type[Runner]) -> type[Runner]:
    if cls.name in RUNNERS and RUNNERS[cls.name] is not cls:
        raise RuntimeError(f"two runners registered as {cls.name!r}")
    RUNNERS[cls.name] = cls
    return cls


def runner_class(name: str) -> type[Runner]:
    for module in _RUNNER_MODULES:
        importlib.import_module(module)
    if name not in RUNNERS:
        raise UserError(f"unknown runner {name!r}; available: {', '.join(sorted(RUNNERS))}")
    return RUNNERS[name]


def build_config(cls: type[Runner], options: dict[str, Any]) -> Any:
    """The runner's typed config from the ``runner`` group (without ``name``); bad keys or values of the wrong
    type are a UserError."""
    check_dataclass(cls.config_class, options, "runner")
    try:
        return cls.config_class(**options)
    except TypeError as exc:
        raise UserError(f"bad runner config: {exc}") from None
