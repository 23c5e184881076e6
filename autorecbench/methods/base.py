"""The method interface and registry.

A streaming method owns its embeddings, model, optimisers and search state. The runner calls, for each
mini-batch in stream order, ``predict(batch)`` (no state change) and then ``learn(batch, history)`` (one
update, including any search step on a validation batch drawn from ``history``). Every method reports
``memory()`` (bytes its embedding tables really hold, dims per entity, parameter counts) and
``architecture()`` (what its search chose). Runners never look at a method's name.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from autorecbench.data.schema import Schema, TaskSpec
from autorecbench.data.stream import StreamBatch, StreamHistory
from autorecbench.errors import UserError


@dataclass
class MethodContext:
    """Everything a method is built from: never a dataset name, always the schema."""

    schema: Schema
    task: TaskSpec
    cfg: DictConfig  # the ``method`` config group
    model_cfg: DictConfig  # the ``model`` config group
    device: torch.device
    seed: int


@dataclass
class MemoryReport:
    """Measured memory of a method's embeddings.

    ``embedding_bytes``: bytes allocated by the embedding tables' storages (measured from the tensors).
    ``embedding_optimizer_bytes``: optimiser state held for those tables (e.g. Adam moments).
    ``dims``: per field, how many entities hold each embedding size, e.g. ``{"user": {"128": 943}}``.
    """

    embedding_bytes: int
    embedding_optimizer_bytes: int
    parameters: int
    embedding_parameters: int
    dims: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StreamingMethod(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str] = ""
    # False while the implementation is not yet faithful to its paper; ``fidelity`` then says how.
    faithful: ClassVar[bool] = True
    fidelity: ClassVar[str] = ""
    protocols: ClassVar[tuple[str, ...]] = ("streaming",)

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Reject bad ``method`` options with a UserError before any data is read (override as needed)."""

    @abstractmethod
    def predict(self, batch: StreamBatch) -> torch.Tensor:
        """P(y=1) ``[batch]`` (binary) or class probabilities ``[batch, classes]``. Must not change state."""

    @abstractmethod
    def learn(self, batch: StreamBatch, history: StreamHistory) -> torch.Tensor | None:
        """One update on ``batch``; may draw validation rows from ``history``. Returns the training loss."""

    @abstractmethod
    def memory(self) -> MemoryReport: ...

    def architecture(self) -> dict[str, Any]:
        """What the method's search chose (empty for methods without search)."""
        return {}

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """Extra tables for the run folder, written as ``<name>.parquet`` with the run's id columns first
        (e.g. a memory table per embedding size, or the chosen size by frequency). Rows are flat dicts."""
        return {}


METHODS: dict[str, type[StreamingMethod]] = {}


def register_method(cls: type[StreamingMethod]) -> type[StreamingMethod]:
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise RuntimeError(f"two methods registered as {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def load_methods() -> dict[str, type[StreamingMethod]]:
    """Import every module of ``autorecbench.methods`` so each registers itself."""
    import autorecbench.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "base":
            importlib.import_module(f"{package.__name__}.{module.name}")
    return METHODS


def method_class(name: str) -> type[StreamingMethod]:
    methods = load_methods()
    if name not in methods:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(methods))}")
    return methods[name]
