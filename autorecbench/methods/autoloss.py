"""AutoLoss (Zhao et al., KDD 2021): automated loss-function search with a per-example controller.

The paper, equation by equation, and where each lives here:
- Eq. 1–6, the DRS network (DeepFM, IPNN, ... with §3.3's settings): the configured backbone (``model=``),
  built by :class:`~autorecbench.methods.offline_common.BackboneMethod`.
- Eq. 7, candidate losses ``L_C = [ℓ_1(y, ŷ), ..., ℓ_n(y, ŷ)]``: :func:`autorecbench.train.losses.candidate_losses`
  (focal, KL, hinge, CE in binary and 5-class forms; formulas in that module).
- §2.4, the controller: :class:`LossController`, an MLP on ``(y, ŷ)`` per example (§3.3: two layers of 128,
  batch-norm, dropout 0.2, ReLU) and a softmax output ``α^b`` over the n losses, for every example b.
- Eq. 9–10, Gumbel-softmax: :func:`autorecbench.train.gumbel.gumbel_softmax` on ``log α^b`` with the temperature
  ``τ = max(0.01, 1 - 0.00005 t)`` (§3.3), t the DRS training step.
- Eq. 11, the loss ``L = Σ_i p_i ℓ_i``, averaged over the batch: :meth:`AutoLoss._weighted_loss`.
- Eq. 12–13 and Algorithm 1: every ``update_every`` (f = 7, §3.7) DRS steps the controller V takes one Adam step
  on ``L_val(W*(V), V)`` over a validation batch (lines 2–4), then the DRS W takes one Adam step on Eq. 11 over
  the training batch with V fixed (lines 5–6): :meth:`AutoLoss.train_step`, :meth:`AutoLoss._controller_step`.
  ``xi`` is Eq. 13's ξ: with ξ > 0 (default 1e-3, "the predefined learning rate": the DRS's) W* is the one-step
  unrolled DRS ``W - ξ ∇_W L_train(W, V)`` on the current training batch, differentiated through exactly
  (second order, ``torch.func.functional_call``: :meth:`AutoLoss._unrolled_logits`); ``xi: 0`` is the paper's
  first-order option (W* = W, the DRS fixed). ``val_objective: weighted`` makes ``L_val`` Eq. 11 on the
  validation batch (Eq. 12's ``L_val(W*, V)`` depends on V directly); ``ce`` makes it the plain evaluation loss
  (logloss / cross-entropy), which depends on V only through W* — a choice of this package, not the paper's,
  and only meaningful with ξ > 0 (``xi: 0`` with ``ce`` is rejected). Adam 1e-3 for both, batch 2000 (the
  runner's).
The DRS trained this way is the result: AutoLoss has no separate search stage, so its controller's cost is
inside ``train_seconds`` (``controller_seconds`` in ``architecture.json``) and ``search_seconds`` is ~0.

The paper's baselines run through the same code (``method.variant``):
- ``focal``, ``kl``, ``hinge``, ``ce``: one fixed loss (Table 2's first group).
- ``darts``: one learned weight vector α over the losses for all examples (softmax, no Gumbel), updated
  exactly like the controller (first-order DARTS on validation batches every f steps): Table 2's "DARTS".
- ``al1``: equal weights 1/n, no controller (Table 3). ``al2``: the controller's α used directly, without
  Gumbel-softmax (Table 3).
MeLU, BOHB and SLF (Table 2) are other papers' methods and are not implemented.

What the paper's validation loss does to the controller (measured, ``README.md`` "AutoLoss"): with
``val_objective: weighted`` the gradient of Eq. 11 with respect to an example's α only moves its probability
towards whichever candidate loss is smallest on that example, whatever that loss does to the DRS. Focal ≤ CE
always, and on a CTR-like file focal is the smallest candidate on almost every example, so the controller
collapses onto focal: first order, after 2,000 DRS steps of batch 2000 (synthetic Criteo-format file, 12
fields, DeepFM), mean α_focal 0.998 on the validation batches, focal chosen for 99.7% of the examples, focal
the smallest loss on 99.3% of them. The second-order term (ξ > 0) adds ξ × a Hessian-vector product to the
gradient, 0.5% of the direct term's norm at ξ = 1e-3 (measured on the same file), and does not stop the
collapse (numbers in the README). On the label-noise validation (``autorecbench/validate/autoloss.py``) the
collapsed controller weights the noisy rows higher than the clean ones. ``val_objective: ce`` judges the controller only by what a training step with its choices does to the
validation logloss; it is this package's remedy, off by default.

Deviations from the paper (there is no official code), each with the switch that undoes it:
- the KL candidate is KL to a label-smoothed target, ε = 0.1 (``kl_smoothing``; 0: the one-hot target, with
  which KL equals CE exactly — see ``autorecbench.train.losses``);
- MeLU, BOHB and SLF are not implemented (their Table-2 cells say so).

Choices the paper leaves open, with their defaults (``conf/method/autoloss.yaml``):
- ``straight_through: true``: §2.3 names the straight-through Gumbel-softmax, so the forward pass uses the
  hard choice z of Eq. 9 and the backward pass Eq. 10's gradient (``false``: Eq. 10's soft p in both).
- ``controller_input``: binary ``[y, ŷ]`` (ŷ = P(click)); 5 classes ``[one_hot(y), ŷ_1..ŷ_5]``.
- ``detach_prediction: true``: ŷ enters the controller as a constant when the DRS is updated, so the DRS
  gradient is Σ_i p_i ∇ℓ_i and cannot lower its loss by steering the controller ("fix V", §2.1).
- Modes: when the DRS is updated the controller is in evaluation mode (running batch-norm statistics, no
  dropout: it is "fixed", §2.1); when the controller is updated it is in training mode and the DRS in
  evaluation mode for the validation batch (first order: without gradients, W is fixed). The virtual step of
  Eq. 13 runs the DRS in training mode (as a real step) on copies of its batch-norm statistics, so it changes
  nothing; it is plain gradient descent (Eq. 13), not Adam.
- ŷ enters the controller as data in the controller step too (its features are detached); the gradient reaches
  V through p and, with ξ > 0, through W*(V).
- Gumbel noise is drawn per example and per step from torch's seeded generator.
- ``focal_gamma: 2``, ``hinge_margin: 1``, ``kl_smoothing: 0.1`` (see ``autorecbench.train.losses``); the global
  α of ``darts`` starts uniform; Adam's other settings are PyTorch's defaults.
- ``xi: 1e-3``: the DRS's learning rate (DARTS sets ξ to the weights' learning rate); the paper gives no value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.func import functional_call

from autorecbench.data.schema import TaskSpec
from autorecbench.errors import UserError
from autorecbench.train.gumbel import TemperatureSchedule, gumbel_softmax
from autorecbench.train.losses import CANDIDATES, LossOptions, candidate_losses, check_names, class_probs
from autorecbench.methods.base import MethodContext, OfflineLoop, register_method
from autorecbench.methods.offline_common import BackboneMethod, backbone_logits, check_positive
from autorecbench.models.backbones import logloss
from autorecbench.models.layers import MLP

if TYPE_CHECKING:
    from autorecbench.data.offline import OfflineBatch

# variant -> (how the per-example weights p arise)
LEARNED = ("autoloss", "al2", "darts")
VARIANTS = ("autoloss", "al1", "al2", "darts", *CANDIDATES)
VAL_OBJECTIVES = ("weighted", "ce")


@dataclass(frozen=True)
class AutoLossConfig:
    variant: str = "autoloss"
    losses: tuple[str, ...] = CANDIDATES
    lr: float = 1e-3
    controller_lr: float = 1e-3
    controller_hidden: tuple[int, ...] = (128, 128)
    controller_batch_norm: bool = True
    controller_dropout: float = 0.2
    update_every: int = 7
    tau_start: float = 1.0
    tau_decay: float = 5e-5
    tau_min: float = 0.01
    straight_through: bool = True
    detach_prediction: bool = True
    focal_gamma: float = 2.0
    hinge_margin: float = 1.0
    kl_smoothing: float = 0.1
    xi: float = 1e-3
    val_objective: str = "weighted"

    @staticmethod
    def from_cfg(cfg: DictConfig) -> AutoLossConfig:
        variant = str(cfg.variant)
        if variant not in VARIANTS:
            raise UserError(f"method.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        check_positive(cfg, "lr", "controller_lr", "tau_start", "tau_min")
        if int(cfg.update_every) < 1:
            raise UserError(f"method.update_every must be >= 1, got {cfg.update_every}")
        if not 0 <= float(cfg.controller_dropout) < 1:
            raise UserError(f"method.controller_dropout must be in [0, 1), got {cfg.controller_dropout}")
        hidden = tuple(int(h) for h in cfg.controller_hidden)
        if any(h < 1 for h in hidden):
            raise UserError(f"method.controller_hidden sizes must be >= 1, got {list(hidden)}")
        if str(cfg.val_objective) not in VAL_OBJECTIVES:
            raise UserError(f"method.val_objective must be one of {', '.join(VAL_OBJECTIVES)}, got {cfg.val_objective!r}")
        if float(cfg.xi) < 0:
            raise UserError(f"method.xi must be >= 0 (0: first order), got {cfg.xi}")
        if variant in LEARNED and str(cfg.val_objective) == "ce" and float(cfg.xi) == 0:
            raise UserError("method.val_objective=ce needs method.xi > 0: with ξ = 0 the validation cross-entropy "
                            "does not depend on the controller, which would never move")
        losses = (variant,) if variant in CANDIDATES else check_names(cfg.losses)
        if variant not in CANDIDATES and len(losses) < 2:
            raise UserError(f"method.variant={variant} needs at least two candidate losses, got {list(losses)}")
        out = AutoLossConfig(
            variant=variant, losses=losses, lr=float(cfg.lr), controller_lr=float(cfg.controller_lr),
            controller_hidden=hidden, controller_batch_norm=bool(cfg.controller_batch_norm),
            controller_dropout=float(cfg.controller_dropout), update_every=int(cfg.update_every),
            tau_start=float(cfg.tau_start), tau_decay=float(cfg.tau_decay), tau_min=float(cfg.tau_min),
            straight_through=bool(cfg.straight_through), detach_prediction=bool(cfg.detach_prediction),
            focal_gamma=float(cfg.focal_gamma), hinge_margin=float(cfg.hinge_margin),
            kl_smoothing=float(cfg.kl_smoothing), xi=float(cfg.xi), val_objective=str(cfg.val_objective))
        out.schedule()
        out.loss_options()
        return out

    def schedule(self) -> TemperatureSchedule:
        return TemperatureSchedule(self.tau_start, self.tau_decay, self.tau_min)

    def loss_options(self) -> LossOptions:
        return LossOptions(self.focal_gamma, self.hinge_margin, self.kl_smoothing)


def controller_features(task: TaskSpec, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The controller's input per example: ``[y, ŷ]`` (binary) or ``[one_hot(y), ŷ]`` (5 classes)."""
    if task.is_binary:
        return torch.stack([label.to(logits.dtype), torch.sigmoid(logits[:, 0])], dim=1)
    one_hot = F.one_hot(label.to(torch.int64), task.n_classes).to(logits.dtype)
    return torch.cat([one_hot, class_probs(task, logits)], dim=1)


class LossController(nn.Module):
    """§2.4 / §3.3: MLP(y, ŷ) -> softmax over the n candidate losses; returns ``log α`` ``[B, n]``."""

    def __init__(self, in_dim: int, n_losses: int, hidden: tuple[int, ...], batch_norm: bool, dropout: float) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, batch_norm, dropout, "relu")
        self.out = nn.Linear(self.mlp.out_dim, n_losses)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.out(self.mlp(features)), dim=1)


class GlobalWeights(nn.Module):
    """The DARTS baseline: one α over the losses shared by every example, softmax of free logits (uniform at
    the start); returns ``log α`` broadcast to ``[B, n]``."""

    def __init__(self, n_losses: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_losses))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.logits, dim=0).expand(features.shape[0], -1)


@register_method
class AutoLoss(BackboneMethod):
    """See the module docstring. Data-parallel (torchrun): the DRS trains through DDP; the controller step
    averages V's gradients and batch-norm statistics across processes (each holds its share of the validation
    batch), so every process keeps the same V."""

    name = "autoloss"
    description = "Per-example loss-function search with a controller and Gumbel-softmax; fixed-loss, DARTS, AL-1, AL-2 baselines"
    paper = "Zhao et al., KDD 2021 (AutoLoss), §2.3-2.5, Algorithm 1"
    fidelity = "faithful, deviations documented"
    deviations = ("KL against a label-smoothed target (kl_smoothing=0: the one-hot label, = CE); MeLU, BOHB, SLF "
                  "not implemented")

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.cfg = AutoLossConfig.from_cfg(ctx.cfg)
        self.names = self.cfg.losses
        self.options = self.cfg.loss_options()
        self.schedule = self.cfg.schedule()
        self.weigher: nn.Module | None = None
        self.weigher_optimizer: torch.optim.Optimizer | None = None
        self.controller_steps = 0
        self.controller_seconds = 0.0
        self.history: list[dict[str, Any]] = []

    @classmethod
    def check_data_parallel(cls, cfg: DictConfig, backend: str) -> None:
        super().check_data_parallel(cfg, backend)
        if float(cfg.xi) > 0:  # measured: 2 processes 0.662 test AUC against 0.685 in one (tests/test_distributed.py)
            raise UserError(f"method.xi={cfg.xi}: Eq. 13's unrolled step would differentiate each process's share of "
                            "the training batch (not synchronised): use method.xi=0 (first order) under torchrun")

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        AutoLossConfig.from_cfg(cfg)
        check_positive(cfg, "embedding_dim")

    @property
    def learns_weights(self) -> bool:
        return self.weigher is not None

    def build(self, architecture: dict[str, Any] | None) -> None:
        ctx, cfg = self.ctx, self.cfg
        self.model = self.new_backbone(self.field_embedding(int(ctx.cfg.embedding_dim), float(ctx.cfg.init_std)))
        self.optimizer = self.adam(self.model, cfg.lr)
        n = len(self.names)
        in_dim = 2 if ctx.task.is_binary else 2 * ctx.task.n_classes
        if cfg.variant in ("autoloss", "al2"):
            self.weigher = LossController(in_dim, n, cfg.controller_hidden, cfg.controller_batch_norm,
                                          cfg.controller_dropout).to(ctx.device)
        elif cfg.variant == "darts":
            self.weigher = GlobalWeights(n).to(ctx.device)
        if self.weigher is not None:
            self.weigher_optimizer = torch.optim.Adam(self.weigher.parameters(), lr=cfg.controller_lr)

    # ------------------------------------------------------------ Eq. 9-11

    def log_alpha(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``log α`` per example ``[B, n]`` from the controller (or the global weights)."""
        assert self.weigher is not None
        return self.weigher(controller_features(self.ctx.task, logits, label))

    def loss_weights(self, logits: torch.Tensor, label: torch.Tensor, tau: float) -> torch.Tensor:
        """p ``[B, n]``: Eq. 10 (AutoLoss), α (AL-2, DARTS), 1/n (AL-1) or [1] (one fixed loss)."""
        variant = self.cfg.variant
        if variant not in LEARNED:
            n = len(self.names)
            return torch.full((logits.shape[0], n), 1.0 / n, device=logits.device, dtype=logits.dtype)
        return self._select(self.log_alpha(logits, label), tau)

    def expected_weights(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """E[p] ``[B, n]``: the weight each candidate loss gets on each example on average over the Gumbel draws —
        α (AutoLoss: Eq. 9's choice picks loss i with probability α_i; AL-2 and DARTS use α itself), 1/n (AL-1)
        or [1] (one fixed loss). Call in evaluation mode."""
        if self.cfg.variant in LEARNED:
            return self.log_alpha(logits, label).exp()
        return self.loss_weights(logits, label, tau=1.0)

    def _select(self, log_alpha: torch.Tensor, tau: float) -> torch.Tensor:
        """p from log α: Gumbel-softmax (Eq. 10) for AutoLoss, α itself for AL-2 and DARTS."""
        if self.cfg.variant == "autoloss":
            return gumbel_softmax(log_alpha, tau, hard=self.cfg.straight_through)
        return log_alpha.exp()

    def _weighted_loss(self, logits: torch.Tensor, label: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Eq. 11, averaged over the batch: mean_b Σ_i p_bi ℓ_i(y_b, ŷ_b)."""
        losses = candidate_losses(self.ctx.task, logits, label, self.names, self.options)
        return (p * losses).sum(dim=1).mean()

    # ------------------------------------------------------------ Algorithm 1

    def _controller_step(self, valid: OfflineBatch, train: OfflineBatch, step: int, loop: OfflineLoop) -> None:
        """Lines 2-4: one Adam step of V on ``L_val(W*(V), V)`` over a validation batch. ξ = 0: W* = W, the DRS
        fixed (first order); ξ > 0: W* is Eq. 13's one-step unrolled DRS (:meth:`_unrolled_logits`). Under
        torchrun each process holds its share of the batches: V's gradients and batch-norm statistics are
        averaged across processes before the step, so every process keeps the same V (first order only: ξ > 0
        is refused under torchrun, :meth:`check_data_parallel`; the history row describes rank 0's share)."""
        assert self.weigher is not None and self.weigher_optimizer is not None
        device = self.ctx.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        self.weigher.train()
        tau = self.schedule(step)
        if self.cfg.xi > 0:
            logits = self._unrolled_logits(train, valid, tau)
        else:
            model = self.module()
            model.eval()
            with torch.no_grad():
                logits = backbone_logits(model, valid)
        # ŷ enters the controller as data; the losses carry the gradient (through W*(V) when ξ > 0).
        log_alpha = self.log_alpha(logits.detach(), valid.label)
        alpha = log_alpha.exp()
        p = self._select(log_alpha, tau)
        if self.cfg.val_objective == "weighted":  # Eq. 11 on the validation batch
            loss = self._weighted_loss(logits, valid.label, p)
        else:  # the plain evaluation loss (logloss / cross-entropy): depends on V only through W*(V)
            loss = logloss(self.ctx.task, logits, valid.label)
        parameters = list(self.weigher.parameters())
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        for parameter, grad in zip(parameters, grads):
            parameter.grad = grad
        loop.average([*(p.grad for p in self.weigher.parameters()), *self.weigher.buffers()])
        self.weigher_optimizer.step()
        self.controller_steps += 1
        with torch.no_grad():
            chosen = torch.bincount(p.argmax(dim=1), minlength=len(self.names)).to(torch.float64) / p.shape[0]
            row: dict[str, Any] = {"step": step, "tau": tau, "valid_loss": float(loss.detach())}
            mean, std = alpha.mean(dim=0).tolist(), alpha.std(dim=0).tolist()
            for i, name in enumerate(self.names):
                row[f"alpha_mean_{name}"], row[f"alpha_std_{name}"] = mean[i], std[i]
                row[f"chosen_{name}"] = float(chosen[i])
        self.history.append(row)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.controller_seconds += time.perf_counter() - started

    def _unrolled_logits(self, train: OfflineBatch, valid: OfflineBatch, tau: float) -> torch.Tensor:
        """Eq. 13: the validation logits under ``W* = W - ξ ∇_W L_train(W, V)``, differentiable in V.

        The virtual step is the DRS's training step (training mode, Eq. 11 on the training batch with the
        controller's p) taken as plain gradient descent with step ξ, with ``create_graph`` so that
        ``∇_V L_val(W*(V))`` includes the second-order term. It runs on copies of the batch-norm statistics and
        updates nothing: W, its optimiser state and its running statistics stay as they were. The validation
        forward pass under W* is in evaluation mode, as the first-order step's."""
        model = self.module()
        params = dict(model.named_parameters())
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        model.train()
        logits = functional_call(model, (params, buffers), (train.x, train.seq, train.seq_len))
        p = self._select(self.log_alpha(logits.detach(), train.label), tau)
        train_loss = self._weighted_loss(logits, train.label, p)
        grads = torch.autograd.grad(train_loss, list(params.values()), create_graph=True)
        unrolled = {name: w - self.cfg.xi * g for (name, w), g in zip(params.items(), grads)}
        model.eval()
        return functional_call(model, (unrolled, dict(model.named_buffers())), (valid.x, valid.seq, valid.seq_len))

    def train_step(self, batch: OfflineBatch, loop: OfflineLoop) -> torch.Tensor:
        """One iteration of Algorithm 1: the controller on a validation batch when ``t % f == 0``, then the
        DRS on the training batch (lines 5-6)."""
        step = loop.step
        if self.learns_weights and step % self.cfg.update_every == 0:
            self._controller_step(loop.valid_batch(), batch, step, loop)
        model, optimizer = self.training_module(loop), self.optimizer
        assert optimizer is not None
        model.train()
        logits = backbone_logits(model, batch)
        tau = self.schedule(step)
        if self.weigher is not None:
            self.weigher.eval()  # "fix V": running statistics, no dropout, no update
        if self.cfg.detach_prediction:
            with torch.no_grad():
                p = self.loss_weights(logits.detach(), batch.label, tau)
        else:
            p = self.loss_weights(logits, batch.label, tau)
        loss = self._weighted_loss(logits, batch.label, p)
        auxiliary = self.module().auxiliary_loss()  # DIEN's L_aux (Eq. 7) beside the searched loss
        if auxiliary is not None:
            loss = loss + auxiliary
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    # ------------------------------------------------------------ results

    def architecture(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": str(self.ctx.model_cfg.name), "variant": self.cfg.variant,
                               "losses": list(self.names), "controller_steps": self.controller_steps,
                               "controller_seconds": self.controller_seconds}
        if isinstance(self.weigher, GlobalWeights):
            out["alpha"] = dict(zip(self.names, torch.softmax(self.weigher.logits.detach(), 0).tolist()))
        elif self.history:
            out["alpha_mean_last_valid_batch"] = {n: self.history[-1][f"alpha_mean_{n}"] for n in self.names}
        return out

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """``loss_weights.parquet``: at every controller step, τ, the validation loss and, per candidate loss,
        the mean and spread of α over the validation batch and the share of examples whose p picks it."""
        return {"loss_weights": self.history} if self.history else {}
