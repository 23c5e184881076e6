"""The runner plugin interface and registry (``runner.name`` in the config picks one).

A runner knows a protocol (``streaming``: test-then-train over a stream; ``offline``: train / validation /
test with early stopping), never a method: ``execute.py`` asks the registry for the configured runner, the
method registry for the method class of that runner's protocol, lets the runner load the prepared data and
drive the method, and writes whatever tables the runner returns into the run folder.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from autorecbench.errors import UserError


class ProgressLike(Protocol):
    def start(self, total: int) -> None: ...
    def update(self, done: int) -> None: ...
    def stop(self) -> None: ...


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
    def run(self, method: Any, data: Any) -> RunOutput: ...


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
    """The runner's typed config from the ``runner`` group (without ``name``); bad keys are a UserError."""
    try:
        return cls.config_class(**options)
    except TypeError as exc:
        raise UserError(f"bad runner config: {exc}") from None
