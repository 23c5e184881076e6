"""The method interfaces (one per protocol) and the registry.

A method owns its embeddings, model, optimisers and search state.
- Streaming (:class:`StreamingMethod`): the runner calls, for each mini-batch in stream order,
  ``predict(batch)`` (no state change) and then ``learn(batch, history)`` (one update, including any search
  step on a validation batch drawn from ``history``).
- Offline (:class:`OfflineMethod`): an optional ``search(loop)`` returning the chosen architecture, then
  ``build(architecture)`` and the fit stage, in which the runner's loop calls ``train_step`` and ``predict``.
Every method reports ``memory()`` (bytes its embedding tables really hold, dims per entity or field,
parameter counts) and ``architecture()`` (what its search chose). Runners never look at a method's name.
A name may be registered once per protocol (FIXED has a streaming and an offline class).

Checkpoints (``runner.checkpoint_every``, ``autorecbench resume``) keep a method through ``state_dict()`` /
``load_state_dict()``; the defaults keep every attribute but ``ctx`` (see :meth:`Method.state_dict`), so a
method needs no code for them unless it keeps state somewhere a checkpoint cannot see.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from omegaconf import DictConfig
from torch import nn

from autorecbench.data.schema import Schema, TaskSpec
from autorecbench.data.stream import StreamBatch, StreamHistory
from autorecbench.errors import UserError
from autorecbench.plugins import METHODS_GROUP, import_package_modules, load_entry_points
from autorecbench.models.rating import output_probabilities
from autorecbench.train.state import MISSING, restore

if TYPE_CHECKING:
    from autorecbench.data.offline import OfflineBatch, SplitData


FIDELITY_LEVELS = ("faithful", "faithful, deviations documented", "not faithful")


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


class Method(ABC):
    """What every method has, whatever its protocol."""

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str] = ""
    # How close the implementation is to its paper and official code: one of FIDELITY_LEVELS, and a one-line
    # summary of what differs (each difference is a config switch named in the class docstring).
    fidelity: ClassVar[str] = "faithful"
    deviations: ClassVar[str] = ""
    protocols: ClassVar[tuple[str, ...]] = ()
    # Attributes a checkpoint leaves out: what the method is built from, the same when a run resumes.
    checkpoint_exclude: ClassVar[tuple[str, ...]] = ("ctx",)
    # Why the method cannot train data-parallel under torchrun (None: it can; its training forward passes go
    # through ``OfflineLoop.parallel`` and any other update averages its gradients with ``OfflineLoop.average``).
    data_parallel_refusal: ClassVar[str | None] = "it does not declare how its updates synchronise across processes"

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this method: by default every attribute but ``checkpoint_exclude`` —
        modules, tensors, optimisers (also :class:`~autorecbench.train.optim.FlatAdam` and the mixed-dimension
        stores), torch/numpy/``random`` generators, plain data, and any object or container holding them. The
        values are the live objects; the checkpoint writes them at once (``autorecbench.train.state.dump``).

        Override it (and :meth:`load_state_dict`) only for state a checkpoint cannot see or write: a global,
        a file or process handle, a value that lives outside the method object.
        """
        return {name: value for name, value in vars(self).items() if name not in self.checkpoint_exclude}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put ``state`` (a :meth:`state_dict` read back from a checkpoint) into this freshly built method, in
        place: tensors are copied into the live ones, optimisers and generators load their state, objects and
        containers are restored member by member; what the method lacks (an attribute a resumed run's skipped
        stage would have set) is taken from the checkpoint (``autorecbench.train.state.restore``)."""
        for name, saved in state.items():
            current = vars(self).get(name, MISSING)
            kept = restore(current, saved)
            if kept is not current:
                vars(self)[name] = kept

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Reject bad ``method`` options with a UserError before any data is read (override as needed)."""

    @classmethod
    def check_data_parallel(cls, cfg: DictConfig, backend: str) -> None:
        """Refuse a data-parallel run (torchrun) of this ``method`` config with a UserError naming the reason;
        ``backend`` is the process group's (gloo on the CPU, nccl on GPUs)."""
        if cls.data_parallel_refusal:
            raise UserError(f"method {cls.name} cannot run data-parallel: {cls.data_parallel_refusal}")

    @abstractmethod
    def memory(self) -> MemoryReport: ...

    def architecture(self) -> dict[str, Any]:
        """What the method's search chose (empty for methods without search)."""
        return {}

    def costs(self) -> dict[str, float]:
        """Costs the method measures itself (e.g. the derived network's ``flops_per_example`` and
        ``inference_qps``), written as ``cost`` rows of ``metrics.parquet`` beside the runner's."""
        return {}

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """Extra tables for the run folder, written as ``<name>.parquet`` with the run's id columns first
        (e.g. a memory table per embedding size, or the chosen size by frequency). Rows are flat dicts. A
        table with ``entity`` and ``code`` columns (an entity's encoded id) also gets ``raw_id``, the id in the
        raw file."""
        return {}

    def metrics(self) -> list[dict[str, Any]]:
        """Rows (``split``, ``metric``, ``value``) the method adds to ``metrics.parquet``, e.g. ESAPN's
        ``policy_action_sensitivity`` under split ``search``."""
        return []


class StreamingMethod(Method):
    protocols: ClassVar[tuple[str, ...]] = ("streaming",)

    @abstractmethod
    def predict(self, batch: StreamBatch) -> torch.Tensor:
        """P(y=1) ``[batch]`` (binary) or class probabilities ``[batch, classes]``. Must not change state."""

    @abstractmethod
    def learn(self, batch: StreamBatch, history: StreamHistory) -> torch.Tensor | None:
        """One update on ``batch``; may draw validation rows from ``history``. Returns the training loss."""

    def shares_forward_pass(self) -> bool:
        """Whether :meth:`learn_with_logits`' forward pass computes exactly the outputs :meth:`predict` would —
        same parameters, and batch-norm with the batch's own statistics (``model.batch_norm=batch``), the same
        in both modes. False by default."""
        return False

    def learn_with_logits(self, batch: StreamBatch, history: StreamHistory) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`learn`, also returning the logits of its training forward pass, taken before any update of
        the parameters they use (methods whose :meth:`shares_forward_pass` can be true implement it)."""
        raise NotImplementedError

    def predict_and_learn(self, batch: StreamBatch, history: StreamHistory) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Test then train on one batch (what the streaming runner calls): the predictions for ``batch`` made
        before learning from it, and the training loss.

        Where :meth:`shares_forward_pass`, the predictions come from the training forward pass (one pass per
        batch instead of two; the official ESAPN code does the same); else :meth:`predict` (without
        gradients), then :meth:`learn`.
        """
        if self.shares_forward_pass():
            logits, loss = self.learn_with_logits(batch, history)
            return output_probabilities(self.ctx.task, logits), loss
        with torch.no_grad():
            predicted = self.predict(batch)
        return predicted, self.learn(batch, history)


@dataclass
class FitResult:
    """One stage's training: where the best validation score was and what it cost."""

    stage: str
    monitor: str
    best_value: float | None
    best_epoch: float | None  # epochs completed at the best evaluation (fractional with eval_every)
    best_step: int | None
    epochs_run: float
    steps: int
    samples: int
    evaluations: int
    stopped_early: bool
    train_seconds: float  # optimisation steps only
    eval_seconds: float  # validation evaluations
    wall_seconds: float  # the whole stage

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else math.nan


class OfflineLoop(Protocol):
    """What an offline method may use of the runner's training loop (``runners.offline.TrainLoop`` is the one
    implementation). Methods see this protocol, never the runner module."""

    train: SplitData
    valid: SplitData
    test: SplitData
    step: int  # optimisation steps taken in the current stage

    def valid_batch(self) -> OfflineBatch: ...

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` for training forward passes: under torchrun wrapped in DistributedDataParallel (backward
        averages its gradients across processes), else ``module`` itself."""
        ...

    def average(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Average ``tensors`` across torchrun's processes in place (gradients of weights a step updates outside
        a :meth:`parallel` module's backward); nothing in one process."""
        ...

    def evaluate(self, predict: Callable[[OfflineBatch], torch.Tensor], split: str) -> dict[str, float]: ...

    def fit(self, stage: str, step: Callable[[OfflineBatch, OfflineLoop], torch.Tensor],
            predict: Callable[[OfflineBatch], torch.Tensor], module: nn.Module, *, epochs: int | None = None,
            patience: int | None = None, restore_best: bool = True) -> FitResult: ...


class OfflineMethod(Method):
    """A method under the offline protocol (``runner=offline``). The runner calls, in order:

    1. ``search(loop)``: optional (the default searches nothing and returns None). The method explores on
       ``loop.train`` / ``loop.valid`` and returns the chosen architecture (a JSON-able dict). It may train a
       search model with the runner's own loop, ``loop.fit(stage="search", step=..., predict=..., module=...)``
       (epochs, evaluation and early stopping on validation, the curve recorded under stage ``search``), draw
       validation batches for bi-level steps with ``loop.valid_batch()``, and read ``loop.step`` (the step
       within the stage, e.g. for a temperature schedule). The runner times the call as ``search_seconds``.
       Data-parallel (torchrun): training forward passes go through ``loop.parallel(model)``, gradients of
       weights stepped outside that backward are averaged with ``loop.average``, and ``loop.valid_batch()``
       is this process's share of the batch; a method that does so sets ``data_parallel_refusal = None``.
    2. ``build(architecture)``: a fresh model for the architecture (FIXED: the backbone with one embedding
       size for every field), with its optimisers.
    3. The fit stage: ``loop.fit(stage="fit", step=self.train_step, predict=self.predict, module=self.module())``
       - epochs of shuffled training batches, evaluation on validation every epoch (or K steps), early
       stopping on validation AUC, the best weights of ``module()`` restored.
    4. ``predict`` on the test split.
    """

    protocols: ClassVar[tuple[str, ...]] = ("offline",)

    def search(self, loop: OfflineLoop) -> dict[str, Any] | None:
        """Explore and return the chosen architecture; None when the method has no search stage."""
        return None

    @abstractmethod
    def build(self, architecture: dict[str, Any] | None) -> None:
        """Create the model (and its optimisers) the fit stage trains, for ``architecture``."""

    @abstractmethod
    def train_step(self, batch: OfflineBatch, loop: OfflineLoop) -> torch.Tensor:
        """One update on a training batch (may draw ``loop.valid_batch()``); returns the detached loss."""

    @abstractmethod
    def predict(self, batch: OfflineBatch) -> torch.Tensor:
        """P(y=1) ``[batch]`` (binary) or class probabilities ``[batch, classes]``, in evaluation mode. Must
        not change state."""

    @abstractmethod
    def module(self) -> nn.Module:
        """The fit-stage model: what early stopping snapshots and restores."""


METHODS: dict[str, type[StreamingMethod]] = {}
OFFLINE_METHODS: dict[str, type[OfflineMethod]] = {}
REGISTRIES: dict[str, dict[str, Any]] = {"streaming": METHODS, "offline": OFFLINE_METHODS}


_MODE_DEPENDENT = "_autorecbench_mode_dependent"


def set_training(module: nn.Module, training: bool) -> nn.Module:
    """``module.train(training)`` where it changes what the module computes, else nothing.

    For the streaming models (linear layers, embeddings, activations, batch-norm) the mode matters only for
    batch-norm layers that keep running statistics and for dropout; with ``model.batch_norm=batch`` every
    batch-norm normalises with the batch's own statistics in both modes. ``train`` walks every submodule and
    the streaming methods switch modes several times per batch, so a module without such layers is left as
    it is (found once per module), and one with them is switched only when its mode differs.
    """
    dependent = module.__dict__.get(_MODE_DEPENDENT)
    if dependent is None:
        dependent = any(
            getattr(m, "track_running_stats", False) is True  # batch-norm layers, SizeNorm
            or isinstance(m, nn.modules.dropout._DropoutNd)
            for m in module.modules()
        )
        module.__dict__[_MODE_DEPENDENT] = dependent
    if dependent and module.training != training:
        module.train(training)
    return module


STATIC_SHAPES = ("auto", "true", "false")


def static_shapes(cfg: DictConfig, device: torch.device) -> bool:
    """Whether a streaming method takes its static-shape step (``method.static_shapes``): every tensor of the
    per-batch step has a shape fixed by the batch size, and nothing is read back to the host, so the step can be
    compiled with ``fullgraph=True`` or replayed from a CUDA graph (``runner.cuda_graphs``). ``auto``: on CUDA
    devices; on the CPU the data-dependent step (distinct entities and states only) is faster. The two steps
    compute the same function and differ by float rounding (each method's docstring says where)."""
    value = str(cfg.get("static_shapes", "auto")).lower()
    if value not in STATIC_SHAPES:
        raise UserError(f"method.static_shapes must be one of {', '.join(STATIC_SHAPES)}, got {value!r}")
    return device.type == "cuda" if value == "auto" else value == "true"


def register_method(cls: type[Method]) -> type[Method]:
    """Register ``cls`` under its name for each protocol it declares."""
    if cls.fidelity not in FIDELITY_LEVELS:
        raise RuntimeError(f"{cls.__name__}.fidelity must be one of {FIDELITY_LEVELS}, got {cls.fidelity!r}")
    if cls.fidelity != "faithful" and not cls.deviations:
        raise RuntimeError(f"{cls.__name__} says {cls.fidelity!r}: summarise its deviations in `deviations`")
    for protocol in cls.protocols:
        registry = REGISTRIES[protocol]
        if cls.name in registry and registry[cls.name] is not cls:
            raise RuntimeError(f"two {protocol} methods registered as {cls.name!r}")
        registry[cls.name] = cls
    return cls


def load_methods() -> dict[str, type[StreamingMethod]]:
    """Import every module of ``autorecbench.methods`` so each registers itself, then the installed plugins'
    (entry point group ``autorecbench.methods``: a module using ``@register_method``, or a method class)."""
    import_package_modules("autorecbench.methods", skip=("base",))
    for plugin in load_entry_points(METHODS_GROUP):
        if isinstance(plugin.obj, type) and issubclass(plugin.obj, Method):
            try:
                register_method(plugin.obj)
            except RuntimeError as exc:  # e.g. a name clash with a built-in method
                raise UserError(f"{plugin.describe()}: {exc}") from None
    return METHODS


def all_methods() -> dict[str, dict[str, type[Method]]]:
    """Every registered method name with its class per protocol."""
    load_methods()
    out: dict[str, dict[str, type[Method]]] = {}
    for protocol, registry in REGISTRIES.items():
        for name, cls in registry.items():
            out.setdefault(name, {})[protocol] = cls
    return out


def method_class(name: str, protocol: str = "streaming") -> Any:
    """The class of method ``name`` under ``protocol`` (the runner's)."""
    methods = all_methods()
    if name not in methods:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(methods))}")
    if protocol not in methods[name]:
        runs = ", ".join(f"runner={p}" for p in methods[name])
        raise UserError(f"method {name!r} has no {protocol} version (it runs with {runs})")
    return methods[name][protocol]
