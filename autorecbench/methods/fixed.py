"""FIXED (ESAPN paper §3.3): the deep recommendation model of §2.2 with one embedding size for every
user and every item (128 in the paper; the official code uses 222, the sum of the candidate sizes:
``method.embedding_dim=222``). Under the offline protocol (CTR backbones, ``runner=offline``) FIXED is the
backbone with one embedding size for every field (:class:`FixedOffline`).

Deviations from the paper and the official code (``baselines/Fixed/train_fixed.py``) under the streaming
protocol, each with the switch that undoes it:
- ``embedding_dim: 128`` (the paper's FIXED); the official code's is 222: ``method.embedding_dim=222``.
- ``embedding_optimizer: lazy`` updates only the embedding rows a batch touches (see ``autorecbench.train.optim``);
  the paper's and the official code's plain Adam over all rows: ``dense``. Both use Adam's learning rate 1e-3.
- ``model.loss_reduction: mean`` (Eq. 3/4); the official code sums over the batch: ``sum``.
- ``model.head: paper`` (§2.2: batch-norm + tanh per field, tanh MLP); the official FIXED feeds the raw
  embeddings to batch-norm without tanh and has batch-norm in its hidden layer: ``official``.
- The protocol's own differences (the official code shuffles the stream, keeps only movies with a genome score,
  restarts frequencies at its test rows) are the runner's and data's (``runner.order=random``; see README).

Choices the paper leaves open, as config values (``conf/method/fixed.yaml``):
- ``init_std: 1.0``: tables start N(0, 1), PyTorch's embedding default, which the official code keeps.
- ``static_shapes: auto`` (CUDA: true, CPU: false): with ``true`` and lazy Adam the tables are read by plain
  gathers and stepped by :class:`~autorecbench.train.optim.RowAdam` (SparseAdam's arithmetic, static shapes, the
  step count on the device) instead of sparse gradients and ``torch.optim.SparseAdam`` (whose ``coalesce`` has a
  data-dependent shape), so the step compiles with ``fullgraph=True`` and replays from a CUDA graph. The same
  update up to the order of float additions of duplicate rows' gradients.
- The rating model's parameters step with :class:`~autorecbench.train.optim.FlatAdam` (one fused Adam kernel over a
  flat buffer; gradients zeroed between steps, as the official code's PyTorch 1.x ``zero_grad()``).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from autorecbench.data.stream import StreamBatch, StreamHistory, batch_groups
from autorecbench.errors import UserError
from autorecbench.methods.base import (MemoryReport, MethodContext, StreamingMethod, register_method, set_training,
                                       static_shapes)
from autorecbench.methods.offline_common import BackboneMethod
from autorecbench.models.registry import model_class
from autorecbench.models.rating import output_probabilities, per_example_loss, reduce_loss
from autorecbench.train.optim import RowAdam, SplitAdam, check_mode, embedding_table, tensor_bytes


@register_method
class Fixed(StreamingMethod):
    name = "fixed"
    description = "One embedding size for every user and item (ESAPN paper's FIXED baseline)"
    paper = "Liu et al., SIGIR 2020, §3.3"
    fidelity = "faithful, deviations documented"
    deviations = "lazy Adam (official: dense); 128 dims (official: 222); mean reduction (official: sum); the paper's head"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg, model_cfg = ctx.cfg, ctx.model_cfg
        self.dim = int(cfg.embedding_dim)
        mode = str(cfg.embedding_optimizer)
        # Static-shape step (lazy Adam only; dense Adam is static already): gathered rows, RowAdam.
        self.static = static_shapes(cfg, ctx.device) and mode == "lazy"
        table_mode = "dense" if self.static else mode  # no sparse gradients: the rows are gathered copies
        self.user_table = embedding_table(ctx.schema.n_users, self.dim, table_mode, float(cfg.init_std))
        self.item_table = embedding_table(ctx.schema.n_items, self.dim, table_mode, float(cfg.init_std))
        self.model = model_class(str(model_cfg.name))(
            n_fields=2,
            dim=self.dim,
            n_outputs=ctx.task.n_outputs,
            hidden=list(model_cfg.hidden),
            batch_norm=str(model_cfg.batch_norm),
            head=str(model_cfg.head),
        )
        self.reduction = str(model_cfg.loss_reduction)
        for module in (self.user_table, self.item_table, self.model):
            module.to(ctx.device)
        tables = [self.user_table.weight, self.item_table.weight]
        self.optimizer = SplitAdam([] if self.static else tables, self.model.parameters(), float(cfg.lr), mode,
                                   flat=True)
        self.row_adam = RowAdam([t.detach() for t in tables], float(cfg.lr)) if self.static else None

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        check_mode(str(cfg.embedding_optimizer))
        static_shapes(cfg, torch.device("cpu"))
        if int(cfg.embedding_dim) < 1:
            raise UserError(f"method.embedding_dim must be >= 1, got {cfg.embedding_dim}")
        if float(cfg.lr) <= 0:
            raise UserError(f"method.lr must be > 0, got {cfg.lr}")

    def _logits(self, batch: StreamBatch) -> torch.Tensor:
        return self.model([self.user_table(batch.user), self.item_table(batch.item)])

    def predict(self, batch: StreamBatch) -> torch.Tensor:
        set_training(self.model, False)
        return output_probabilities(self.ctx.task, self._logits(batch))

    def learn_with_logits(self, batch: StreamBatch, history: StreamHistory) -> tuple[torch.Tensor, torch.Tensor]:
        """One Adam step on ``batch``; returns the logits of the forward pass (before the step) and the loss."""
        set_training(self.model, True)
        self.optimizer.zero_grad()
        if self.row_adam is None:
            logits = self._logits(batch)
        else:
            ids = (batch.user, batch.item)
            rows = [t.weight.detach().index_select(0, i).requires_grad_() for t, i in zip(self.tables(), ids)]
            logits = self.model(rows)
        loss = reduce_loss(per_example_loss(self.ctx.task, logits, batch.label), self.reduction)
        loss.backward()
        self.optimizer.step()
        if self.row_adam is not None:
            step = self.row_adam.advance()
            for k, (i, r) in enumerate(zip(ids, rows)):
                self.row_adam.update(k, i, r.grad, batch_groups(i), step)
        return logits.detach(), loss.detach()

    def tables(self) -> tuple[torch.nn.Embedding, torch.nn.Embedding]:
        return self.user_table, self.item_table

    def learn(self, batch: StreamBatch, history: StreamHistory) -> torch.Tensor:
        return self.learn_with_logits(batch, history)[1]

    def shares_forward_pass(self) -> bool:
        return self.ctx.model_cfg.get("batch_norm") == "batch"

    def memory(self) -> MemoryReport:
        tables = (self.user_table.weight, self.item_table.weight)
        dense = sum(p.numel() for p in self.model.parameters())
        embedding = sum(t.numel() for t in tables)
        return MemoryReport(
            embedding_bytes=sum(tensor_bytes(t) for t in tables),
            embedding_optimizer_bytes=(self.optimizer.embedding_state_bytes() if self.row_adam is None
                                       else self.row_adam.state_bytes()),
            parameters=embedding + dense,
            embedding_parameters=embedding,
            dims={
                "user": {str(self.dim): self.ctx.schema.n_users},
                "item": {str(self.dim): self.ctx.schema.n_items},
            },
        )

    def architecture(self) -> dict[str, Any]:
        return {"embedding_dim": {"user": self.dim, "item": self.dim}}


@register_method
class FixedOffline(BackboneMethod):
    """FIXED under the offline protocol: the configured CTR backbone (``model=``) with one embedding size for
    every field, trained with Adam on logloss (cross-entropy for 5 classes). No search stage.

    ``method.embedding_dim`` and ``method.init_std`` default to the backbone's ``model.embedding_dim`` (16,
    AutoLoss §3.3) and ``model.embedding_init_std``; ``method.embedding_optimizer`` to the backbone's
    ``model.embedding_optimizer`` (``dense``: plain Adam over every table row, as pytorch-fm and FuxiCTR).

    As the baseline of a search method it must match the capacity the searched model computes with: AutoDim's
    re-trained model maps every field to its unified size (``method.embedding_dim=64`` for AutoDim's defaults),
    AutoFIS-DeepFM has a 5 × 700 MLP (``model.hidden=[700,700,700,700,700] model.dropout=0
    model.batch_norm_affine=false``). Nothing else differs from the paper's settings: the choices it leaves open
    (initialisation, optimiser over the tables) are the config values above.
    """

    name = "fixed"
    description = "The backbone with one embedding size for every field (FIXED baseline)"
    paper = "Zhao et al., KDD 2021 (AutoLoss) §3.3 backbone settings"
    fidelity = "faithful"
    deviations = ("none: the backbone with §3.3's settings; match a search method's capacity with "
                  "method.embedding_dim / model.hidden (README)")

    check_config = Fixed.check_config

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.dim = int(ctx.cfg.embedding_dim)

    def build(self, architecture: dict[str, Any] | None) -> None:
        self.model = self.new_backbone(self.field_embedding(self.dim, float(self.ctx.cfg.init_std)))
        self.optimizer = self.adam(self.model, float(self.ctx.cfg.lr))

    def architecture(self) -> dict[str, Any]:
        model = self.module()
        return {"model": str(self.ctx.model_cfg.name),
                "embedding_dim": {f.name: model.dim for f in self.ctx.schema.fields} if model.embedding else {}}
