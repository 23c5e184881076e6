"""AutoDim (Zhao et al., WWW 2021): field-aware embedding-dimension search.

The survey (§4.2) is the spec here (the AutoDim paper is not in the project's papers and has no public code;
Hetu's unofficial ``AutoDimEmbedding`` was read, not copied). How each part maps to code:
- Search space: every field f has candidate dimensions ``d_1 < ... < d_A`` (``candidates``, default
  {2, 4, 8, 16, 32, 64}); search space ``A^F`` (survey Table 2: w^F).
- "Each feature field is defined in the w embedding spaces and then unified and normalized into the same
  space", as AutoEmb (survey Eq. 19 and the text after it: a linear map, then "Batch-Norm with the Tanh
  activation"): candidate a of field f gives ``ê = tanh(BN(W_fa e_fa + b_fa))``, a per-field, per-candidate
  linear map to the unified size U (``unified_dim``, default the largest candidate), batch-norm and tanh
  (``unified_activation: tanh``; ``none`` drops the tanh, as Hetu's unofficial code): :class:`SearchEmbedding`.
  Two variants (``variant``): ``separate`` — one table per candidate; ``shared`` (weight-sharing) — one table
  of the largest size, candidate a reads its first ``d_a`` columns.
- Selection: architecture weights α_f (softmax of free logits, uniform at the start) per field; Gumbel-softmax
  (survey Eq. 11–12) with hard straight-through selection gives p_f, and the field's embedding is
  ``Σ_a p_fa ê_fa`` — one candidate in the forward pass, gradients to every α_fa.
- Optimisation: first-order DARTS (survey Eq. 13–16 with ξ = 0): each search step first updates α with Adam
  on a validation batch (``loop.valid_batch()``), then every other weight with Adam on the training batch:
  :meth:`AutoDim.search`.
- Derive: ``argmax_a α_fa`` per field. Retrain: a fresh backbone whose field f has a table of size d_f, mapped to
  U by its own linear map, batch-norm and tanh (:class:`MixedDimEmbedding`), so FM / inner-product layers still
  see one size; only the tables count as embedding bytes. The re-trained model computes at size U: the
  capacity-matched baseline is FIXED with every field at U (``method.embedding_dim=64`` for the defaults), not
  FIXED at the backbone's 16 — the planted-truth validation (``autorecbench/validate/autodim.py``) compares
  with it.

Recorded: the chosen dimension and α per field (``dims.parquet``, ``architecture.json``), the retrained
embedding bytes against FIXED's (every field at the unified size U — the AutoDim paper's full-dimension
baseline — and at the backbone's ``model.embedding_dim``), and ``search_seconds`` (the runner).

Deviations from the survey's description and from Hetu's unofficial code (no official code exists), each with
the switch that undoes it:
- the unifying batch-norm has a learned scale starting at 1e-4 (``batch_norm_affine: true``,
  ``batch_norm_scale_init: null``); Hetu's has no scale or shift (``batch_norm_affine: false``; see below why
  the default differs);
- every example draws its own Gumbel selection (``gumbel_noise: example``); Hetu's draws once per field and
  step (``batch``);
- the re-trained model keeps the unifying batch-norm and tanh (``retrain_batch_norm: true``,
  ``unified_activation: tanh``; ``false`` / ``none`` drop them);
- tanh after the batch-norm (the survey's reading of AutoEmb's unifying step); Hetu has none
  (``unified_activation: none``).
The optimisation is first-order DARTS (ξ = 0); the survey does not say which order the AutoDim paper uses, and
there is no switch for a second-order step.

Choices the survey leaves open, with their defaults (``conf/method/autodim.yaml``):
- ``tau_start: 1``, ``tau_decay: 5e-5``, ``tau_min: 0.01``: τ = max(0.01, 1 - 0.00005 t), the annealing of the
  same authors' AutoLoss (§3.3), t the search step.
- ``gumbel_noise: example``: every example draws its own selection per field (``batch``: one draw per field
  and step, shared by the batch, as Hetu's). On the planted-truth files the per-batch draw left useless
  fields' α near uniform (their argmax at random), the per-example draw — a lower-variance estimate of the
  α gradient — pushed them to the small sizes (see the tests). Data-parallel (torchrun) runs need
  ``example``: with ``batch`` each process would draw its own architecture per step, so the step would no
  longer use one draw; such a run is refused.
- ``batch_norm_affine: true`` with ``batch_norm_scale_init: null`` (= ``init_std``): the normalising
  batch-norm has a learned scale γ that starts at the backbone's embedding scale (1e-4). With γ = 1 (or no
  γ, Hetu's) every unified embedding has unit variance in each of U channels from the first step, so FM and
  inner-product terms start with logits of std ≈ √(pairs · U) (≈ 27 for 10 fields, U = 64) and training
  diverged on every file we tried (AUC 0.5); ``retrain_batch_norm: true`` keeps the batch-norm in the
  re-trained model.
- ``arch_lr: 1e-3`` and ``lr: 1e-3``: Adam for α and for the weights (the authors' AutoLoss setting).
- ``search_epochs`` / ``search_patience: null`` (the runner's epochs and early stopping, evaluated with the
  argmax architecture) and ``search_restore_best: true`` (α at the best validation evaluation). A useless
  field's α only moves once its large candidates over-fit the training rows and lose on validation, so on
  small files a longer search without early stopping separates the fields far better (the tests search 20
  epochs with ``arch_lr: 0.01``).
- Linear maps start as ``nn.Linear``'s default (U(±1/√d)), biases at 0; tables N(0, ``init_std``²), the
  backbone's embedding initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from autorecbench.errors import UserError
from autorecbench.train.gumbel import TemperatureSchedule, gumbel_softmax
from autorecbench.methods.base import MethodContext, OfflineLoop, register_method
from autorecbench.methods.offline_common import BackboneMethod, backbone_logits, check_positive
from autorecbench.models.activations import tanh
from autorecbench.models.backbones import logloss
from autorecbench.models.layers import field_offsets
from autorecbench.models.rating import output_probabilities

if TYPE_CHECKING:
    from autorecbench.data.offline import OfflineBatch

VARIANTS = ("separate", "shared")
NOISE = ("batch", "example")
ACTIVATIONS = ("tanh", "none")
FLOAT_BYTES = 4


def _linear_weight(n_fields: int, d_in: int, d_out: int) -> nn.Parameter:
    """Per-field ``[F, d_in, d_out]`` maps initialised as ``nn.Linear`` (U(±1/√d_in))."""
    bound = 1.0 / math.sqrt(d_in)
    return nn.Parameter(torch.empty(n_fields, d_in, d_out).uniform_(-bound, bound))


def _init_scale(norm: nn.BatchNorm1d, scale: float) -> None:
    """Start an affine batch-norm's scale γ at ``scale`` (no-op without affine parameters)."""
    if norm.weight is not None:
        nn.init.constant_(norm.weight, scale)


def _normalise(norm: nn.BatchNorm1d | None, h: torch.Tensor, squash: bool) -> torch.Tensor:
    """Batch-norm over every (field, unit) channel of ``h [B, F, U]``, then tanh when ``squash``."""
    if norm is not None:
        b, f, u = h.shape
        h = norm(h.reshape(b, f * u)).reshape(b, f, u)
    return tanh(h) if squash else h


class SearchEmbedding(nn.Module):
    """The search-stage embedding layer: ``x [B, F] -> [B, F, U]``, the Gumbel-selected candidate of each
    field, unified to U. In evaluation mode it uses the derived architecture (argmax α per field)."""

    def __init__(self, cardinalities: Sequence[int], candidates: Sequence[int], unified_dim: int, init_std: float,
                 shared: bool, sparse: bool, affine: bool, scale_init: float, noise: str, squash: bool = True) -> None:
        super().__init__()
        self.candidates = sorted(int(c) for c in candidates)
        self.dim = unified_dim
        self.shared = shared
        self.noise = noise
        self.squash = squash
        self.tau = 1.0
        self.hard = True
        n_fields, rows = len(cardinalities), sum(cardinalities)
        self.register_buffer("offsets", field_offsets(cardinalities), persistent=False)
        widths = [self.candidates[-1]] if shared else self.candidates
        self.tables = nn.ModuleList(nn.Embedding(rows, d, sparse=sparse) for d in widths)
        for table in self.tables:
            nn.init.normal_(table.weight, 0.0, init_std)
        self.weights = nn.ParameterList(_linear_weight(n_fields, d, unified_dim) for d in self.candidates)
        self.biases = nn.Parameter(torch.zeros(len(self.candidates), n_fields, unified_dim))
        self.norms = nn.ModuleList(nn.BatchNorm1d(n_fields * unified_dim, affine=affine) for _ in self.candidates)
        for norm in self.norms:
            _init_scale(norm, scale_init)
        self.arch = nn.Parameter(torch.zeros(n_fields, len(self.candidates)))  # α = softmax(arch), uniform

    def candidate_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every candidate of every field, mapped to U and normalised: A tensors ``[B, F, U]``."""
        index = x + self.offsets
        full = self.tables[0](index) if self.shared else None
        outs = []
        for a, d in enumerate(self.candidates):
            e = full[..., :d] if full is not None else self.tables[a](index)  # weight-sharing: first d columns
            h = torch.einsum("bfd,fdu->bfu", e, self.weights[a]) + self.biases[a]
            outs.append(_normalise(self.norms[a], h, self.squash))
        return outs

    def probabilities(self) -> torch.Tensor:
        """α ``[F, A]``."""
        return F.softmax(self.arch, dim=1)

    def selection(self, batch_size: int) -> torch.Tensor:
        """p: ``[F, A]`` (one draw per field) or ``[B, F, A]`` (per example); one-hot argmax when evaluating."""
        if not self.training:
            return F.one_hot(self.arch.argmax(dim=1), len(self.candidates)).to(self.arch.dtype)
        log_alpha = F.log_softmax(self.arch, dim=1)
        if self.noise == "example":
            log_alpha = log_alpha.expand(batch_size, -1, -1)
        return gumbel_softmax(log_alpha, self.tau, hard=self.hard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.selection(x.shape[0])  # [F, A] or [B, F, A]
        out: torch.Tensor | None = None
        for a, h in enumerate(self.candidate_outputs(x)):
            term = h * p[..., a, None]  # Σ_a p_fa ê_fa (hard p: one candidate, every α gets a gradient)
            out = term if out is None else out + term
        assert out is not None
        return out

    def derive(self) -> list[int]:
        return [self.candidates[a] for a in self.arch.argmax(dim=1).tolist()]


class MixedDimEmbedding(nn.Module):
    """The re-trained embedding layer: field f has a ``d_f`` table, mapped to U by its own linear map (and
    batch-norm). Fields of one size share one stacked table and one batched map."""

    def __init__(self, cardinalities: Sequence[int], dims: Sequence[int], unified_dim: int, init_std: float,
                 sparse: bool, batch_norm: bool, affine: bool, scale_init: float, squash: bool = True) -> None:
        super().__init__()
        self.field_dims = [int(d) for d in dims]
        self.dim = unified_dim
        self.squash = squash
        sizes = sorted(set(self.field_dims))
        self.groups = nn.ModuleList()
        order: list[int] = []
        for d in sizes:
            fields = [f for f, fd in enumerate(self.field_dims) if fd == d]
            group = nn.Module()
            group.register_buffer("fields", torch.tensor(fields, dtype=torch.int64), persistent=False)
            group.register_buffer("offsets", field_offsets([cardinalities[f] for f in fields]), persistent=False)
            group.table = nn.Embedding(sum(cardinalities[f] for f in fields), d, sparse=sparse)
            nn.init.normal_(group.table.weight, 0.0, init_std)
            group.weight = _linear_weight(len(fields), d, unified_dim)
            group.bias = nn.Parameter(torch.zeros(len(fields), unified_dim))
            self.groups.append(group)
            order += fields
        self.register_buffer("inverse", torch.argsort(torch.tensor(order)), persistent=False)
        n_fields = len(self.field_dims)
        self.norm = nn.BatchNorm1d(n_fields * unified_dim, affine=affine) if batch_norm else None
        if self.norm is not None:
            _init_scale(self.norm, scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for group in self.groups:
            e = group.table(x[:, group.fields] + group.offsets)
            parts.append(torch.einsum("bfd,fdu->bfu", e, group.weight) + group.bias)
        return _normalise(self.norm, torch.cat(parts, dim=1)[:, self.inverse], self.squash)


@register_method
class AutoDim(BackboneMethod):
    name = "autodim"
    description = "Field-wise embedding-dimension search: Gumbel-softmax over candidate sizes, first-order DARTS"
    paper = "Zhao et al., WWW 2021 (AutoDim); survey §4.2"
    fidelity = "faithful, deviations documented"
    deviations = ("spec is the survey (no official code); vs Hetu's code: affine BN starting at 1e-4, per-example "
                  "Gumbel draws, tanh after BN (all switches); first-order DARTS only")
    handles_sequences = False  # its search embedding cannot look up the tables behaviour sequences share

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if not self.uses_embedding():
            raise UserError(f"AutoDim searches embedding sizes: model={ctx.model_cfg.name} has no embeddings")
        cfg = ctx.cfg
        self.candidates = sorted(int(c) for c in cfg.candidates)
        self.unified = int(cfg.unified_dim) if cfg.unified_dim is not None else self.candidates[-1]
        self.schedule = TemperatureSchedule(float(cfg.tau_start), float(cfg.tau_decay), float(cfg.tau_min))
        self.scale_init = float(cfg.batch_norm_scale_init if cfg.batch_norm_scale_init is not None else cfg.init_std)
        self.squash = str(cfg.unified_activation) == "tanh"
        self.searched: dict[str, Any] = {}
        self.alpha_rows: list[dict[str, Any]] = []

    @classmethod
    def check_data_parallel(cls, cfg: DictConfig, backend: str) -> None:
        super().check_data_parallel(cfg, backend)
        if str(cfg.gumbel_noise) == "batch":
            raise UserError("method.gumbel_noise=batch draws one architecture per step for the whole batch; "
                            "data-parallel, each process would draw its own (per-process sampling): use "
                            "gumbel_noise=example")

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        candidates = [int(c) for c in cfg.candidates]
        if len(candidates) < 2 or min(candidates) < 1 or len(set(candidates)) != len(candidates):
            raise UserError(f"method.candidates must be at least two distinct sizes >= 1, got {candidates}")
        if str(cfg.variant) not in VARIANTS:
            raise UserError(f"method.variant must be one of {', '.join(VARIANTS)}, got {cfg.variant!r}")
        if str(cfg.unified_activation) not in ACTIVATIONS:
            raise UserError(f"method.unified_activation must be one of {', '.join(ACTIVATIONS)}, got {cfg.unified_activation!r}")
        if str(cfg.gumbel_noise) not in NOISE:
            raise UserError(f"method.gumbel_noise must be one of {', '.join(NOISE)}, got {cfg.gumbel_noise!r}")
        check_positive(cfg, "lr", "arch_lr", "tau_start", "tau_min")
        if cfg.unified_dim is not None and int(cfg.unified_dim) < 1:
            raise UserError(f"method.unified_dim must be >= 1 (or null), got {cfg.unified_dim}")
        for key in ("search_epochs", "search_patience"):
            if cfg[key] is not None and int(cfg[key]) < 1:
                raise UserError(f"method.{key} must be >= 1 (or null), got {cfg[key]}")

    @property
    def cardinalities(self) -> list[int]:
        return [f.cardinality for f in self.ctx.schema.fields]

    # ------------------------------------------------------------ search

    def search(self, loop: OfflineLoop) -> dict[str, Any]:
        cfg, task = self.ctx.cfg, self.ctx.task
        embedding = SearchEmbedding(self.cardinalities, self.candidates, self.unified, float(cfg.init_std),
                                    shared=str(cfg.variant) == "shared", sparse=self.sparse,
                                    affine=bool(cfg.batch_norm_affine), scale_init=self.scale_init,
                                    noise=str(cfg.gumbel_noise), squash=self.squash)
        embedding.hard = bool(cfg.straight_through)
        model = self.new_backbone(embedding)
        arch_optimizer = torch.optim.Adam([embedding.arch], lr=float(cfg.arch_lr))
        weight_optimizer = self.adam(model, float(cfg.lr), exclude=[embedding.arch])
        train_model = loop.parallel(model)  # DDP under torchrun

        def step(batch: OfflineBatch, loop: OfflineLoop) -> torch.Tensor:
            embedding.tau = self.schedule(loop.step)
            model.train()
            # First-order DARTS: α on a validation batch, the weights held fixed ...
            valid = loop.valid_batch()
            (grad,) = torch.autograd.grad(logloss(task, backbone_logits(model, valid), valid.label), [embedding.arch])
            loop.average([grad])  # torchrun: each process had its share of the validation batch
            embedding.arch.grad = grad
            arch_optimizer.step()
            # ... then the weights on the training batch, α held fixed.
            weight_optimizer.zero_grad()
            loss = logloss(task, backbone_logits(train_model, batch), batch.label)
            loss.backward()
            embedding.arch.grad = None
            weight_optimizer.step()
            return loss.detach()

        def predict(batch: OfflineBatch) -> torch.Tensor:
            model.eval()
            return output_probabilities(self.ctx.task, backbone_logits(model, batch))

        fit = loop.fit("search", step, predict, model,
                       epochs=int(cfg.search_epochs) if cfg.search_epochs is not None else None,
                       patience=int(cfg.search_patience) if cfg.search_patience is not None else None,
                       restore_best=bool(cfg.search_restore_best))
        names = [f.name for f in self.ctx.schema.fields]
        alpha = embedding.probabilities().detach().cpu()
        chosen = embedding.derive()
        self.alpha_rows = [{"field": name, "candidate": d, "alpha": float(alpha[f, a]), "chosen": d == chosen[f]}
                           for f, name in enumerate(names) for a, d in enumerate(self.candidates)]
        self.searched = {
            "model": str(self.ctx.model_cfg.name), "variant": str(cfg.variant), "candidates": self.candidates,
            "unified_dim": self.unified, "chosen_dim": dict(zip(names, chosen)),
            "alpha": {name: alpha[f].tolist() for f, name in enumerate(names)},
            "search_steps": fit.steps, "search_valid_auc": loop.evaluate(predict, "valid").get("auc"),
        }
        return self.searched

    # ------------------------------------------------------------ re-train

    def build(self, architecture: dict[str, Any] | None) -> None:
        if architecture is None:
            raise RuntimeError("AutoDim builds from its search result")
        cfg = self.ctx.cfg
        dims = [int(architecture["chosen_dim"][f.name]) for f in self.ctx.schema.fields]
        embedding = MixedDimEmbedding(self.cardinalities, dims, self.unified, float(cfg.init_std), self.sparse,
                                      batch_norm=bool(cfg.retrain_batch_norm), affine=bool(cfg.batch_norm_affine),
                                      scale_init=self.scale_init, squash=self.squash)
        self.model = self.new_backbone(embedding)
        self.optimizer = self.adam(self.model, float(cfg.lr))

    def architecture(self) -> dict[str, Any]:
        rows = sum(self.cardinalities)
        chosen = sum(c * d for c, d in zip(self.cardinalities, self.field_dims())) * FLOAT_BYTES
        return {
            **self.searched,
            "embedding_bytes": chosen,
            "fixed_bytes_unified_dim": rows * self.unified * FLOAT_BYTES,
            "fixed_bytes_model_dim": rows * int(self.ctx.model_cfg.embedding_dim) * FLOAT_BYTES,
        }

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """``dims.parquet``: per field and candidate size, the searched α and whether it was chosen."""
        return {"dims": self.alpha_rows} if self.alpha_rows else {}
