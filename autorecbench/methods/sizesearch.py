"""What DARTS, AutoEmb and ESAPN share: candidate sizes, the rating model, validation batches, reports.

Common to the three (ESAPN paper §2.2, §3.2-3.3; config values in ``conf/method/{darts,autoemb,esapn}.yaml``):
- candidate sizes ``sizes`` (paper: {2, 4, 8, 16, 64, 128}), separate parameters for users and items;
- the unified ``d_n``-dim user and item embeddings go through the ESAPN rating model of the foundation
  (``models/rating.py``: batch-norm + tanh per field, MLP, sigmoid/MSE or softmax/CE, Adam ``lr`` 1e-3);
- one search step per batch on a validation batch from the stream's history (Algorithm 1 lines 2-6, and
  first-order DARTS for the soft methods), then one model step on the current batch (lines 7-10).
  ``validation=last_batch`` uses the batch just before the current one (the official code's default);
  ``validation=history`` draws ``validation_size`` rows (default: the current batch's size) uniformly with
  replacement from every earlier row, with the method's own seeded generator. Nothing is searched before the
  first batch has been trained on, as in the official code.

Reports written into the run folder (see README, "Results"):
- ``embedding_sizes``: the paper's Table 2 per size — entities holding that size, their dims, the bytes
  allocated for that size's storage (measured from the tensors) and the bytes in use;
- ``embedding_memory``: Table 2's right part per field — total dims, the FIXED equivalent (#entities x
  d_n), their ratio, and the allocated bytes (tables + per-entity state) against FIXED's;
- ``size_by_frequency``: Figure 5's data — for each power-of-two frequency bucket of the rows trained on
  (whole stream), the share of each size (ESAPN: fraction of rows that used it; DARTS/AutoEmb: mean soft
  weight) and the mean size (Σ share x size);
- ``entity_sizes``: one row per user and item at the end of the stream — ``entity``, ``code``, ``size`` (ESAPN:
  the size it holds, the initial size if it was never stored; DARTS/AutoEmb: the size of largest weight),
  ``soft_dim`` (DARTS/AutoEmb: Σ_k w_k d_k / Σ_k w_k, the weighted mean dimension) and ``frequency`` (rows of the
  stream it occurred in); the run folder adds ``raw_id``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from autorecbench.data.stream import StreamBatch, StreamHistory, batch_groups
from autorecbench.errors import UserError
from autorecbench.methods.base import MemoryReport, MethodContext, StreamingMethod, set_training, static_shapes
from autorecbench.metrics import bucket_bounds, bucket_label, frequency_bucket
from autorecbench.models.controller import FREQUENCY_ENCODINGS
from autorecbench.models.embedding import SoftSizeTables
from autorecbench.models.norm import NORM_AFFINE
from autorecbench.models.rating import RatingMLP, output_probabilities, per_example_loss, reduce_loss
from autorecbench.train.optim import RowAdam, SplitAdam, check_mode, tensor_bytes

FIELDS = ("user", "item")
VALIDATIONS = ("last_batch", "history")
MAX_BUCKETS = 64  # power-of-two buckets of an int64 frequency


def last_rows(ids: torch.Tensor) -> torch.Tensor:
    """Mask of each id's last row in the batch (so one write per entity wins, deterministically)."""
    return batch_groups(ids).last


class SizeByFrequency:
    """Figure 5 accumulator: per frequency bucket, rows seen and the summed weight each size got."""

    def __init__(self, n_sizes: int, device: torch.device) -> None:
        self.weight = torch.zeros(MAX_BUCKETS, n_sizes, dtype=torch.float64, device=device)
        self.rows = torch.zeros(MAX_BUCKETS, dtype=torch.int64, device=device)

    def add(self, freq: torch.Tensor, weights: torch.Tensor) -> None:
        bucket = frequency_bucket(freq)
        self.weight.index_add_(0, bucket, weights.detach().to(torch.float64))
        self.rows.index_add_(0, bucket, torch.ones_like(bucket))

    def table(self, entity: str, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
        out = []
        rows, weight = self.rows.cpu(), self.weight.cpu()
        size_vec = torch.tensor(sizes, dtype=torch.float64)
        for bucket in rows.nonzero().squeeze(1).tolist():
            n = int(rows[bucket])
            share = weight[bucket] / n
            lo, hi = bucket_bounds(bucket)
            mean_size = float((share * size_vec).sum())
            for d, s in zip(sizes, share.tolist()):
                out.append({"entity": entity, "bucket": bucket, "freq_min": lo, "freq_max": hi,
                            "label": bucket_label(bucket), "n": n, "size": d, "share": s, "mean_size": mean_size})
        return out


class SizeSearchMethod(StreamingMethod):
    """Base of the three embedding-size search methods (not registered itself)."""

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg, model_cfg = ctx.cfg, ctx.model_cfg
        self.sizes: tuple[int, ...] = tuple(int(d) for d in cfg.sizes)
        self.n_entities = {"user": ctx.schema.n_users, "item": ctx.schema.n_items}
        self.reduction = str(model_cfg.loss_reduction)
        self.batch_norm = str(model_cfg.batch_norm)
        self.model = RatingMLP(
            n_fields=2, dim=self.sizes[-1], n_outputs=ctx.task.n_outputs,
            hidden=list(model_cfg.hidden), batch_norm=self.batch_norm, head=str(model_cfg.head),
        )
        self.validation = str(cfg.validation)
        self.validation_size = None if cfg.validation_size is None else int(cfg.validation_size)
        # Validation sampling and sampled actions draw from their own CPU generator: same seed, same stream.
        self.generator = torch.Generator().manual_seed(int(ctx.seed) + 7919)
        self.by_frequency = {f: SizeByFrequency(len(self.sizes), ctx.device) for f in FIELDS}
        self.frequency = {f: torch.zeros(self.n_entities[f], dtype=torch.int64, device=ctx.device) for f in FIELDS}

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        sizes = [int(d) for d in cfg.sizes]
        if len(sizes) < 2 or sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise UserError(f"method.sizes must be >= 2 distinct increasing positive sizes, got {sizes}")
        check_mode(str(cfg.embedding_optimizer))
        static_shapes(cfg, torch.device("cpu"))
        for key in ("lr", "search_lr"):
            if float(cfg[key]) <= 0:
                raise UserError(f"method.{key} must be > 0, got {cfg[key]}")
        if str(cfg.validation) not in VALIDATIONS:
            raise UserError(f"method.validation must be one of {', '.join(VALIDATIONS)}, got {cfg.validation!r}")
        if cfg.validation_size is not None and int(cfg.validation_size) < 2:
            raise UserError("method.validation_size must be >= 2 (batch-norm needs two rows) or null")
        if "norm_affine" in cfg and str(cfg.norm_affine) not in NORM_AFFINE:
            raise UserError(f"method.norm_affine must be one of {', '.join(NORM_AFFINE)}, got {cfg.norm_affine!r}")
        if "frequency_encoding" in cfg:
            if str(cfg.frequency_encoding) not in FREQUENCY_ENCODINGS:
                raise UserError(f"method.frequency_encoding must be one of {', '.join(FREQUENCY_ENCODINGS)}, "
                                f"got {cfg.frequency_encoding!r}")
            for key in ("frequency_cap", "frequency_dim", "hidden"):
                if int(cfg[key]) < 1:
                    raise UserError(f"method.{key} must be >= 1, got {cfg[key]}")

    # ------------------------------------------------------------------ helpers

    def validation_batch(self, batch: StreamBatch, history: StreamHistory) -> StreamBatch | None:
        """Algorithm 1 line 2: the validation batch from the history (None before anything was trained)."""
        if self.validation == "last_batch":
            return history.last_batch()
        return history.sample(self.validation_size or len(batch), self.generator)

    @staticmethod
    def _ids(batch: StreamBatch, field: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The field's ids and their frequencies (occurrence numbers at each row)."""
        return (batch.user, batch.user_freq) if field == "user" else (batch.item, batch.item_freq)

    def example_losses(self, logits: torch.Tensor, batch: StreamBatch) -> torch.Tensor:
        return per_example_loss(self.ctx.task, logits, batch.label)

    def reduce(self, losses: torch.Tensor) -> torch.Tensor:
        return reduce_loss(losses, self.reduction)

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` uniforms from the method's generator, on the device."""
        return torch.rand(n, generator=self.generator).to(self.ctx.device)

    def count_rows(self, batch: StreamBatch) -> None:
        """Count the batch's rows per entity (``entity_sizes``' frequency)."""
        for f in FIELDS:
            ids = self._ids(batch, f)[0]
            self.frequency[f].index_add_(0, ids, torch.ones_like(ids))

    # ------------------------------------------------------------------ reports

    @abstractmethod
    def size_rows(self) -> list[dict[str, Any]]:
        """Per field and size: entities holding it, their dims, allocated and used bytes."""

    def memory_rows(self, sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per field: Table 2's totals against FIXED at the largest size, from ``size_rows()``."""
        rows = []
        top = self.sizes[-1]
        for field in FIELDS:
            mine = [r for r in sizes if r["entity"] == field]
            n = self.n_entities[field]
            total_dims = sum(r["dims"] for r in mine)
            table_bytes = sum(r["allocated_bytes"] for r in mine)
            state_bytes = self.state_bytes(field)
            rows.append({
                "entity": field,
                "entities": n,
                "stored": self.stored(field),
                "total_dims": total_dims,
                "fixed_dims": n * top,
                "ratio": total_dims / (n * top) if n else float("nan"),
                "table_bytes": table_bytes,
                "state_bytes": state_bytes,
                "allocated_bytes": table_bytes + state_bytes,
                "fixed_bytes": n * top * 4,
            })
        return rows

    def stored(self, field: str) -> int:
        return self.n_entities[field]

    def state_bytes(self, field: str) -> int:
        """Per-entity bookkeeping stored beside the embedding values (ESAPN: the size/slot index and free
        lists; DARTS: α; AutoEmb: the previous weights)."""
        return 0

    def entity_weights(self, field: str) -> torch.Tensor | None:
        """Soft methods: every entity's weights over the sizes ``[n, K]`` at the end of the stream; None for
        hard selection (:meth:`entity_size_index` then says the size)."""
        return None

    def entity_size_index(self, field: str) -> torch.Tensor:
        """Every entity's size index ``[n]`` (soft methods: the size of largest weight)."""
        weights = self.entity_weights(field)
        assert weights is not None, "a hard-selection method overrides entity_size_index"
        return weights.argmax(dim=1)

    def entity_rows(self) -> list[dict[str, Any]]:
        """``entity_sizes``: per user and item, its size (soft methods: also the weighted mean dimension) and
        how many rows of the stream it occurred in."""
        rows: list[dict[str, Any]] = []
        dims = torch.tensor(self.sizes, dtype=torch.float64)
        for f in FIELDS:
            sizes = dims[self.entity_size_index(f).cpu()].to(torch.int64).tolist()
            frequency = self.frequency[f].cpu().tolist()
            weights = self.entity_weights(f)
            if weights is None:
                rows += [{"entity": f, "code": c, "size": d, "frequency": n}
                         for c, (d, n) in enumerate(zip(sizes, frequency))]
                continue
            w = weights.detach().cpu().to(torch.float64)
            soft = ((w @ dims) / w.sum(dim=1)).tolist()
            rows += [{"entity": f, "code": c, "size": d, "soft_dim": x, "frequency": n}
                     for c, (d, x, n) in enumerate(zip(sizes, soft, frequency))]
        return rows

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        freq_rows = [r for f in FIELDS for r in self.by_frequency[f].table(f, self.sizes)]
        sizes = self.size_rows()
        return {"embedding_sizes": sizes, "embedding_memory": self.memory_rows(sizes), "size_by_frequency": freq_rows,
                "entity_sizes": self.entity_rows()}

    def architecture(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sizes": list(self.sizes)}
        sizes = self.size_rows()
        for row in self.memory_rows(sizes):
            out[row["entity"]] = {
                "entities_per_size": {str(r["size"]): r["entities"] for r in sizes if r["entity"] == row["entity"]},
                "total_dims": row["total_dims"],
                "ratio_to_fixed": row["ratio"],
            }
        return out


class SoftSelectionMethod(SizeSearchMethod):
    """DARTS and AutoEmb: every entity holds every candidate size (:class:`SoftSizeTables`, Σ d = 222 dims
    for the paper's sizes); the unified embedding is the soft-weighted sum (survey Eq. 20). Subclasses say
    where the weights come from (:meth:`weights`) and which parameters the search step trains.

    One ``learn`` call: first-order DARTS — the search parameters take one Adam step (``search_lr``) on the
    validation batch's loss with the model weights fixed, then the model weights (embeddings, maps, norms,
    rating model) take one Adam step (``lr``) on the current batch with the search weights fixed.
    """

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        mode = str(cfg.embedding_optimizer)
        # Static-shape step (lazy Adam only; dense Adam is static already): the tables' rows are gathered
        # copies stepped by RowAdam instead of sparse gradients and SparseAdam.
        self.static = static_shapes(cfg, ctx.device) and mode == "lazy"
        self.tables = nn.ModuleDict({
            f: SoftSizeTables(self.n_entities[f], self.sizes, "dense" if self.static else mode, float(cfg.init_std),
                              self.batch_norm, str(cfg.norm_affine))
            for f in FIELDS
        })
        self.model.to(ctx.device)
        self.tables.to(ctx.device)
        embeddings = [self.tables[f].table.weight for f in FIELDS]
        self.dense_parameters = [*self.model.parameters(),
                                 *(p for n, p in self.tables.named_parameters() if not n.endswith("table.weight"))]
        self.model_optimizer = SplitAdam([] if self.static else embeddings, self.dense_parameters, float(cfg.lr),
                                         mode, flat=True)
        self.row_adam = RowAdam([e.detach() for e in embeddings], float(cfg.lr)) if self.static else None
        self.search_optimizer: Any = None  # set by the subclass: Adam over ``search_parameters()``

    @abstractmethod
    def weights(self, field: str, batch: StreamBatch, train: bool = False) -> torch.Tensor:
        """Soft weights ``[batch, K]`` (rows sum to 1) for the field's entities in ``batch``; ``train``: the
        search step's forward (gradients flow to the search parameters)."""

    @abstractmethod
    def search_parameters(self) -> list[torch.nn.Parameter]: ...

    def search_backward(self, loss: torch.Tensor) -> None:
        """The validation loss's gradient w.r.t. the search parameters only (the model weights stay fixed)."""
        loss.backward(inputs=self.search_parameters())

    def search_update(self, valid: StreamBatch) -> None:
        """The search step's update, after :meth:`search_backward`."""
        self.search_optimizer.step()

    def after_training(self, batch: StreamBatch, weights: dict[str, torch.Tensor]) -> None:
        """Hook after the model step (AutoEmb keeps each entity's last weights)."""

    def _logits(self, batch: StreamBatch, weights: dict[str, torch.Tensor],
                rows: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``rows``: the fields' table rows, gathered by the caller (static step); else read from the tables."""
        if rows is None:
            return self.model([self.tables[f](self._ids(batch, f)[0], weights[f]) for f in FIELDS])
        return self.model([self.tables[f].mix(rows[f], weights[f]) for f in FIELDS])

    def _eval(self) -> None:
        """Batch statistics in ``batch`` mode; running statistics used and left unchanged in ``running`` mode."""
        set_training(self.model, False)
        set_training(self.tables, False)

    def predict(self, batch: StreamBatch) -> torch.Tensor:
        self._eval()
        weights = {f: self.weights(f, batch) for f in FIELDS}
        return output_probabilities(self.ctx.task, self._logits(batch, weights))

    def search_step(self, valid: StreamBatch) -> None:
        """First-order DARTS: the validation loss's gradient w.r.t. the search parameters only."""
        self._eval()
        weights = {f: self.weights(f, valid, train=True) for f in FIELDS}
        loss = self.reduce(self.example_losses(self._logits(valid, weights), valid))
        self.search_optimizer.zero_grad()
        self.search_backward(loss)
        self.search_update(valid)

    def train_model(self, batch: StreamBatch) -> torch.Tensor:
        with torch.no_grad():
            weights = {f: self.weights(f, batch) for f in FIELDS}
        set_training(self.model, True)
        set_training(self.tables, True)
        rows = None
        if self.row_adam is not None:
            rows = {f: self.tables[f].table.weight.detach().index_select(0, self._ids(batch, f)[0]).requires_grad_()
                    for f in FIELDS}
        loss = self.reduce(self.example_losses(self._logits(batch, weights, rows), batch))
        self.model_optimizer.zero_grad()
        loss.backward()
        self.model_optimizer.step()
        if self.row_adam is not None and rows is not None:
            step = self.row_adam.advance()
            for k, f in enumerate(FIELDS):
                ids = self._ids(batch, f)[0]
                self.row_adam.update(k, ids, rows[f].grad, batch_groups(ids), step)
        for f in FIELDS:
            self.by_frequency[f].add(self._ids(batch, f)[1], weights[f])
        self.count_rows(batch)
        self.after_training(batch, weights)
        return loss.detach()

    def learn(self, batch: StreamBatch, history: StreamHistory) -> torch.Tensor:
        valid = self.validation_batch(batch, history)
        if valid is not None:
            self.search_step(valid)
        return self.train_model(batch)

    def size_rows(self) -> list[dict[str, Any]]:
        rows = []
        for f in FIELDS:
            n = self.n_entities[f]
            for d, allocated in zip(self.sizes, self.tables[f].size_bytes()):
                rows.append({"entity": f, "size": d, "entities": n, "dims": n * d,
                             "allocated_bytes": allocated, "used_bytes": allocated})
        return rows

    def memory(self) -> MemoryReport:
        tables = [self.tables[f].table.weight for f in FIELDS]
        dense = sum(p.numel() for p in self.dense_parameters)
        search = sum(p.numel() for p in self.search_parameters())
        embedding = sum(t.numel() for t in tables)
        return MemoryReport(
            embedding_bytes=sum(tensor_bytes(t) for t in tables) + sum(self.state_bytes(f) for f in FIELDS),
            embedding_optimizer_bytes=(self.model_optimizer.embedding_state_bytes() if self.row_adam is None
                                       else self.row_adam.state_bytes()),
            parameters=embedding + dense + search,
            embedding_parameters=embedding,
            dims={f: {str(d): self.n_entities[f] for d in self.sizes} for f in FIELDS},
        )
