"""What the offline methods on a CTR backbone share (FIXED, AutoDim, AutoFIS, AutoLoss): building the backbone
around a given embedding layer, Adam split into embedding tables and dense weights (``lazy`` or ``dense``,
see ``autorecbench.train.optim``), the plain logloss training step, prediction and the memory report.

Registers no method itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from autorecbench.errors import UserError
from autorecbench.methods.base import MemoryReport, MethodContext, OfflineLoop, OfflineMethod
from autorecbench.models.registry import model_class
from autorecbench.models.backbones import CTRBackbone, build_backbone, logloss
from autorecbench.models.layers import FieldEmbedding
from autorecbench.models.rating import output_probabilities
from autorecbench.train.optim import SplitAdam, check_mode, tensor_bytes

if TYPE_CHECKING:
    from autorecbench.data.offline import OfflineBatch
    from autorecbench.data.schema import TaskSpec


def embedding_tables(module: nn.Module | None) -> list[nn.Parameter]:
    """The weights of every ``nn.Embedding`` inside ``module`` (tables: sparse gradients in lazy mode)."""
    if module is None:
        return []
    return [m.weight for m in module.modules() if isinstance(m, nn.Embedding)]


def backbone_logits(model: nn.Module, batch: OfflineBatch) -> torch.Tensor:
    """A backbone's logits for a batch: its categorical codes and, where the data has them, its behaviour
    sequences (a backbone that does not read sequences ignores them)."""
    return model(batch.x, batch.seq, batch.seq_len)


def training_loss(task: TaskSpec, model: nn.Module, backbone: nn.Module, batch: OfflineBatch) -> torch.Tensor:
    """The logloss of ``model`` (``backbone`` or its DistributedDataParallel wrapper) on ``batch`` plus the
    backbone's auxiliary term of that forward, if it is a CTR backbone with one (DIEN Eq. 7)."""
    loss = logloss(task, backbone_logits(model, batch), batch.label)
    auxiliary = backbone.auxiliary_loss() if isinstance(backbone, CTRBackbone) else None
    return loss if auxiliary is None else loss + auxiliary


def check_positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = cfg.get(key)
        if value is None or float(value) <= 0:
            raise UserError(f"method.{key} must be > 0, got {value}")


def model_overrides(model_cfg: DictConfig, **values: Any) -> DictConfig:
    """A copy of the ``model`` group with ``values`` replacing keys (``None`` values keep the model's)."""
    raw = OmegaConf.to_container(model_cfg, resolve=True)
    assert isinstance(raw, dict)
    raw.update({k: v for k, v in values.items() if v is not None})
    return OmegaConf.create(raw)


class CostedSearch:
    """What a searching method that measures its derived network reports: ``self.searched`` (the search's
    architecture, JSON-able) and ``self.cost`` (a ``models.supernet.ArchCost`` of the re-trained network, or
    None) become ``architecture()`` (with ``cost``) and the ``flops_per_example`` / ``inference_qps`` cost rows."""

    searched: dict[str, Any]
    cost: Any

    def costs(self) -> dict[str, float]:
        if self.cost is None:
            return {}
        return {"flops_per_example": self.cost.flops_per_example, "inference_qps": self.cost.qps}

    def architecture(self) -> dict[str, Any]:
        out = dict(self.searched)
        if self.cost is not None:
            out["cost"] = self.cost.to_dict()
        return out


class BackboneMethod(OfflineMethod):
    """An offline method whose fit-stage model is a CTR backbone trained with (split) Adam.

    Subclasses build ``self.model`` / ``self.optimizer`` in ``build`` with :meth:`new_backbone` and
    :meth:`adam`; the default ``train_step`` minimises the logloss (cross-entropy for 5 classes).
    ``method.embedding_optimizer`` (``lazy`` | ``dense``) and ``method.lr`` are read from the method config.
    Data-parallel under torchrun: the training forward pass goes through :meth:`training_module`.
    A method whose search replaces the embedding layer or gates the field pairs sets ``handles_sequences``
    False: it then refuses a backbone that reads behaviour sequences on data that has them.
    """

    data_parallel_refusal = None
    handles_sequences: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.mode = check_mode(str(ctx.cfg.embedding_optimizer))
        self.model: CTRBackbone | None = None
        self.optimizer: SplitAdam | None = None
        self._parallel: tuple[nn.Module, nn.Module] | None = None  # (model, what the loop trains it through)
        self._check_sequences(ctx)

    @classmethod
    def check_data_parallel(cls, cfg: DictConfig, backend: str) -> None:
        super().check_data_parallel(cfg, backend)
        if backend == "nccl" and str(cfg.embedding_optimizer) == "lazy":
            raise UserError("method.embedding_optimizer=lazy gives sparse embedding gradients, which NCCL cannot "
                            "all-reduce: use dense (the backbones' default) for data-parallel runs on GPUs")

    def _check_sequences(self, ctx: MethodContext) -> None:
        """The backbone and the data agree on behaviour sequences, and the method can handle them."""
        name = str(ctx.model_cfg.name)
        backbone = model_class(name)
        has_sequences = bool(ctx.schema.sequence_fields)
        if getattr(backbone, "requires_sequences", False) and not has_sequences:
            raise UserError(f"model={name} needs behaviour sequences (data=alimama or synthetic-alimama); "
                            f"dataset {ctx.schema.dataset!r} has none")
        if has_sequences and getattr(backbone, "uses_sequences", False) and not self.handles_sequences:
            raise UserError(f"method {self.name} does not handle behaviour sequences: on {ctx.schema.dataset!r} run it "
                            "with a backbone that ignores them (model=lr, fm or ipnn)")

    @property
    def sparse(self) -> bool:
        return self.mode == "lazy"

    def uses_embedding(self) -> bool:
        return bool(getattr(model_class(str(self.ctx.model_cfg.name)), "uses_embedding", True))

    def field_embedding(self, dim: int, init_std: float) -> FieldEmbedding | None:
        """One ``dim`` table per field (None for a backbone without embeddings, e.g. LR)."""
        if not self.uses_embedding():
            return None
        return FieldEmbedding([f.cardinality for f in self.ctx.schema.fields], dim, init_std, self.sparse)

    def new_backbone(self, embedding: nn.Module | None, model_cfg: DictConfig | None = None) -> CTRBackbone:
        ctx = self.ctx
        cfg = model_cfg if model_cfg is not None else ctx.model_cfg
        return build_backbone(str(cfg.name), ctx.schema.fields, ctx.task, cfg, embedding=embedding,
                              sparse=self.sparse, sequences=ctx.schema.sequence_fields).to(ctx.device)

    def adam(self, model: nn.Module, lr: float, exclude: Iterable[nn.Parameter] = ()) -> SplitAdam:
        """Adam over ``model``'s parameters except ``exclude`` (e.g. architecture weights with their own
        optimiser); tables lazy or dense per ``method.embedding_optimizer``."""
        skip = {id(p) for p in exclude}
        tables = [t for t in embedding_tables(model) if id(t) not in skip]
        table_ids = {id(t) for t in tables}
        dense = [p for p in model.parameters() if id(p) not in table_ids and id(p) not in skip and p.requires_grad]
        return SplitAdam(tables, dense, lr, self.mode)

    def module(self) -> CTRBackbone:
        assert self.model is not None, "build() first"
        return self.model

    def training_module(self, loop: OfflineLoop) -> nn.Module:
        """The fit-stage model as training steps run it: ``loop.parallel`` of it (DistributedDataParallel under
        torchrun), made once per model."""
        model = self.module()
        if self._parallel is None or self._parallel[0] is not model:
            self._parallel = (model, loop.parallel(model))
        return self._parallel[1]

    def train_step(self, batch: OfflineBatch, loop: OfflineLoop) -> torch.Tensor:
        model, optimizer = self.training_module(loop), self.optimizer
        assert optimizer is not None
        model.train()
        optimizer.zero_grad()
        loss = training_loss(self.ctx.task, model, self.module(), batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def predict(self, batch: OfflineBatch) -> torch.Tensor:
        model = self.module()
        model.eval()
        return output_probabilities(self.ctx.task, backbone_logits(model, batch))

    def field_dims(self) -> list[int]:
        """The embedding size of each field in the fit-stage model (empty without embeddings)."""
        embedding = self.module().embedding
        if embedding is None:
            return []
        dims = getattr(embedding, "field_dims", None)
        return [int(d) for d in dims] if dims is not None else [int(embedding.dim)] * len(self.ctx.schema.fields)  # type: ignore[union-attr]

    def memory(self) -> MemoryReport:
        model = self.module()
        tables = embedding_tables(model.embedding)
        return MemoryReport(
            embedding_bytes=sum(tensor_bytes(t) for t in tables),
            embedding_optimizer_bytes=self.optimizer.state_bytes(tables) if self.optimizer else 0,
            parameters=sum(p.numel() for p in model.parameters()),
            embedding_parameters=sum(t.numel() for t in tables),
            dims={f.name: {str(d): f.cardinality} for f, d in zip(self.ctx.schema.fields, self.field_dims())},
        )
