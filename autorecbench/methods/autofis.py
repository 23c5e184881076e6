"""AutoFIS (Liu et al., KDD 2020): automatic feature-interaction selection with GRDA-sparsified gates.

The survey (§5, Eq. 26–28) is the spec; the official code (github zhuchenxv/AutoFIS, TensorFlow 1; read,
not copied) fixes what the survey leaves open. Equation by equation:
- Eq. 26, search stage: ``I = <w, x> + Σ_{i<j} α_(i,j) <e_i, e_j>`` on FM or DeepFM (``model=fm|deepfm``).
  :class:`PairGate` is the backbone's pair gate (``set_pair_gate``): the ``F(F-1)/2`` inner products go
  through batch-norm without scale or shift (as the paper and its code: it removes the scale ambiguity between
  α and the embeddings) and are multiplied by α, then summed into the logit. For DeepFM the MLP's logit is
  added (AutoDeepFM; Eq. 27 writes ``sigmoid(MLP(I))``, the code adds the MLP over the embeddings to I).
- One-level optimisation (unlike DARTS): on each training batch, one backward pass; Adam (1e-3) updates all
  weights but α, GRDA (:class:`autorecbench.train.grda.GRDA`) updates α: :meth:`AutoFIS.search`.
- Derive: a pair is kept iff its α is not exactly 0 (GRDA's soft threshold makes unhelpful gates exactly 0).
- Eq. 28, re-train: a fresh model with ``α*_(i,j) γ_(i,j) <e_i, e_j>``, γ = 0 where α* = 0, else 1; the
  gates are fixed at α* as attention (``retrain_alpha: fixed``, as the survey states; ``train``: Adam also
  trains α from α*, as the official code does); Adam for every other weight: :meth:`AutoFIS.build`.

Defaults from the official code (``conf/method/autofis.yaml``): α used raw (no sigmoid), initialised uniformly
in 0.6 ± 0.001; GRDA lr 1 with c = 0.005, μ = 0.6 for FM and c = 5e-4, μ = 0.8 for DeepFM (``grda_c`` /
``grda_mu`` null: per backbone); DeepFM's MLP 5 × 700 ReLU without dropout, each layer ``BN(W h) + b`` — a
batch-norm without scale or shift, the layer's bias after it (``hidden``, ``dropout``, ``batch_norm_affine:
false``, replacing the backbone's); batch 2000 (the runner's
``batch_size``). The search is one pass over the training data (``search_epochs: 1``; the code splits it into 5
parts and evaluates after each). ``search_restore_best: false``: the gates are read at the end of the search, as
the code does (GRDA's sparsity grows with the step count; the best validation epoch's gates would be the least
sparse).

AutoFIS-DeepFM computes with a 5 × 700 MLP: the capacity-matched baseline is FIXED with that MLP
(``method=fixed model=deepfm model.hidden=[700,700,700,700,700] model.dropout=0 model.batch_norm_affine=false``),
not FIXED-DeepFM's 2 × 128; the planted-truth validation (``autorecbench/validate/autofis.py``) builds it so.

Deviations from the official code (and the survey), each with the switch that undoes it:
- the re-train keeps α* fixed (``retrain_alpha: fixed``, Eq. 28 as the survey states it); the code trains α
  with Adam from α* (``retrain_alpha: train``);
- embedding size 16, the suite's backbone setting (AutoLoss §3.3); the code uses 40 (``method.embedding_dim=40``);
- the code multiplies Adam's learning rate by 0.7 after every fifth of a pass (``lr_decay: 0.7``,
  ``lr_decay_parts: 5``); here it stays constant (``lr_decay: 1``, the suite's Adam 1e-3);
- the re-train runs the runner's epochs with early stopping on validation AUC; the code's is one pass
  (``runner.epochs=1``);
- embeddings start N(0, 1e-4²) (the backbone's); the code's Xavier initialisation of its one feature table
  (about 1M rows × 40 on Criteo: U(±0.0024), std ≈ 0.0014) has no switch of its own (``method.init_std=0.0014``
  matches its scale);
- the code selects and reports on the test split; here validation decides everything and the search model's
  test AUC is only recorded (``search.parquet``) — not undone, on purpose.
The re-train starts from fresh weights (embeddings, MLP) with the batch-norm of the search model's shape, as the
code's retrain stage (a new model with the mask).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

from autorecbench.errors import UserError
from autorecbench.train.grda import GRDA
from autorecbench.methods.base import MethodContext, OfflineLoop, register_method
from autorecbench.methods.offline_common import BackboneMethod, backbone_logits, check_positive, model_overrides
from autorecbench.models.backbones import FM, CTRBackbone, logloss
from autorecbench.models.layers import pair_index
from autorecbench.train.optim import SplitAdam

if TYPE_CHECKING:
    from autorecbench.data.offline import OfflineBatch

BACKBONES = ("fm", "deepfm")
# GRDA (c, μ) of the official code per backbone (tf_main_autofm.py, tf_main_autodeepfm.py).
GRDA_DEFAULTS = {"fm": (0.005, 0.6), "deepfm": (5e-4, 0.8)}
RETRAIN_ALPHA = ("fixed", "train")


class PairGate(nn.Module):
    """``[B, P]`` inner products -> ``BN(products) · α · γ`` (Eq. 26 with γ = 1; Eq. 28). BN has no scale or
    shift. ``trainable``: α is a parameter (search; ``retrain_alpha=train``), else a fixed buffer."""

    def __init__(self, alpha: torch.Tensor, trainable: bool, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        n_pairs = alpha.numel()
        self.bn = nn.BatchNorm1d(n_pairs, affine=False)
        if trainable:
            self.alpha = nn.Parameter(alpha.detach().clone())
        else:
            self.register_buffer("alpha", alpha.detach().clone())
        self.register_buffer("mask", torch.ones(n_pairs) if mask is None else mask.detach().to(torch.float32).clone())

    def forward(self, products: torch.Tensor) -> torch.Tensor:
        return self.bn(products) * (self.alpha * self.mask)


@register_method
class AutoFIS(BackboneMethod):
    name = "autofis"
    description = "Feature-interaction selection: gates on every pair, sparsified by GRDA, then re-train (Eq. 26-28)"
    paper = "Liu et al., KDD 2020 (AutoFIS); survey §5 Eq. 26-28"
    fidelity = "faithful, deviations documented"
    deviations = ("vs the official code: α fixed in the re-train (retrain_alpha=train), embedding 16 (40), no lr "
                  "decay (lr_decay=0.7), early-stopped re-train (runner.epochs=1), validation not test decides")
    handles_sequences = False  # its gates cover the categorical field pairs, not pooled histories in DeepFM's FM

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        self.backbone = str(ctx.model_cfg.name)
        c, mu = GRDA_DEFAULTS[self.backbone]
        self.grda_c = float(cfg.grda_c) if cfg.grda_c is not None else c
        self.grda_mu = float(cfg.grda_mu) if cfg.grda_mu is not None else mu
        self.model_cfg = model_overrides(ctx.model_cfg, hidden=cfg.hidden, dropout=cfg.dropout,
                                         batch_norm_affine=cfg.batch_norm_affine)
        self.steps_per_part = 1
        names = [f.name for f in ctx.schema.fields]
        rows, cols = pair_index(len(names))
        self.pairs = [(names[i], names[j]) for i, j in zip(rows.tolist(), cols.tolist())]
        self.searched: dict[str, Any] = {}
        self.search_rows: list[dict[str, Any]] = []

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        backbone = str(cfg.backbone)
        if backbone not in BACKBONES:
            raise UserError(f"AutoFIS searches on model=fm or model=deepfm, not model={backbone}")
        if str(cfg.task) != "binary":
            raise UserError("AutoFIS gates a single-logit FM: use task=binary")
        check_positive(cfg, "lr", "grda_lr", "embedding_dim", "search_epochs")
        if any(cfg.get(k) is not None and float(cfg[k]) < 0 for k in ("grda_c", "grda_mu", "alpha_init_range")):
            raise UserError("method.grda_c, method.grda_mu and method.alpha_init_range must be >= 0")
        if not 0 < float(cfg.lr_decay) <= 1 or int(cfg.lr_decay_parts) < 1:
            raise UserError(f"method.lr_decay must be in (0, 1] and method.lr_decay_parts >= 1, got "
                            f"{cfg.lr_decay} and {cfg.lr_decay_parts}")
        if str(cfg.retrain_alpha) not in RETRAIN_ALPHA:
            raise UserError(f"method.retrain_alpha must be one of {', '.join(RETRAIN_ALPHA)}, got {cfg.retrain_alpha!r}")

    def _backbone(self, gate: PairGate) -> CTRBackbone:
        model = self.new_backbone(self.field_embedding(int(self.ctx.cfg.embedding_dim), float(self.ctx.cfg.init_std)),
                                  self.model_cfg)
        assert isinstance(model, FM)
        model.set_pair_gate(gate.to(self.ctx.device))
        return model

    @staticmethod
    def _predictor(model: nn.Module) -> Any:
        def predict(batch: OfflineBatch) -> torch.Tensor:
            model.eval()
            return torch.sigmoid(backbone_logits(model, batch)[:, 0])
        return predict

    # ------------------------------------------------------------ search (Eq. 26, GRDA + Adam)

    def search(self, loop: OfflineLoop) -> dict[str, Any]:
        cfg = self.ctx.cfg
        center, spread = float(cfg.alpha_init), float(cfg.alpha_init_range)
        alpha0 = torch.empty(len(self.pairs)).uniform_(center - spread, center + spread)
        gate = PairGate(alpha0, trainable=True)
        model = self._backbone(gate)
        adam = self.adam(model, float(cfg.lr), exclude=[gate.alpha])
        grda = GRDA([gate.alpha], lr=float(cfg.grda_lr), c=self.grda_c, mu=self.grda_mu)
        train_model = loop.parallel(model)  # DDP under torchrun: α's gradient is averaged with the others

        def step(batch: OfflineBatch, loop: OfflineLoop) -> torch.Tensor:
            self._decay(adam, loop, len(batch))
            model.train()
            adam.zero_grad()
            grda.zero_grad(set_to_none=True)
            loss = logloss(self.ctx.task, backbone_logits(train_model, batch), batch.label)
            loss.backward()
            adam.step()  # everything but α
            grda.step()  # α, in the same step (one-level)
            return loss.detach()

        predict = self._predictor(model)
        fit = loop.fit("search", step, predict, model, epochs=int(cfg.search_epochs),
                       restore_best=bool(cfg.search_restore_best))
        alpha = gate.alpha.detach().cpu()
        kept = alpha != 0
        before = {split: loop.evaluate(predict, split) for split in ("valid", "test")}
        self.search_rows = [{"split": s, "metric": m, "value": v} for s, ms in before.items() for m, v in ms.items()]
        self.searched = {
            "model": self.backbone,
            "pairs": [list(p) for p in self.pairs],
            "alpha": alpha.tolist(),
            "kept_pairs": [list(p) for p, k in zip(self.pairs, kept.tolist()) if k],
            "n_pairs": len(self.pairs),
            "n_kept": int(kept.sum()),
            "sparsity": float(1 - kept.float().mean()) if self.pairs else 0.0,
            "grda": {"lr": float(cfg.grda_lr), "c": self.grda_c, "mu": self.grda_mu, "steps": fit.steps},
            "search_valid_auc": before["valid"].get("auc"),
            "search_test_auc": before["test"].get("auc"),
        }
        return self.searched

    # ------------------------------------------------------------ re-train (Eq. 28)

    def build(self, architecture: dict[str, Any] | None) -> None:
        if architecture is None:
            raise RuntimeError("AutoFIS builds from its search result")
        alpha = torch.tensor(architecture["alpha"], dtype=torch.float32)
        trainable = str(self.ctx.cfg.retrain_alpha) == "train"
        self.model = self._backbone(PairGate(alpha, trainable=trainable, mask=alpha != 0))
        self.optimizer = self.adam(self.model, float(self.ctx.cfg.lr))

    def train_step(self, batch: OfflineBatch, loop: OfflineLoop) -> torch.Tensor:
        assert self.optimizer is not None
        self._decay(self.optimizer, loop, len(batch))
        return super().train_step(batch, loop)

    def _decay(self, adam: SplitAdam, loop: OfflineLoop, batch_rows: int) -> None:
        """The official code's schedule: Adam's learning rate × ``lr_decay`` after every ``1/lr_decay_parts`` of
        a pass over the training data (GRDA's stays). ``lr_decay: 1`` (the default) keeps it constant."""
        decay = float(self.ctx.cfg.lr_decay)
        if decay == 1.0:
            return
        if loop.step == 0:  # a new stage: its part length from the first (full) batch
            self.steps_per_part = max(1, math.ceil(len(loop.train) / batch_rows / int(self.ctx.cfg.lr_decay_parts)))
        elif loop.step % self.steps_per_part == 0:
            adam.scale_lr(decay)

    def architecture(self) -> dict[str, Any]:
        return {**self.searched, "retrain_alpha": str(self.ctx.cfg.retrain_alpha)}

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """``pairs.parquet``: every field pair with its searched α and whether it was kept;
        ``search.parquet``: the search model's validation and test metrics (AUC before re-training)."""
        if not self.searched:
            return {}
        pairs = [{"field_a": a, "field_b": b, "alpha": alpha, "kept": alpha != 0}
                 for (a, b), alpha in zip(self.pairs, self.searched["alpha"])]
        return {"pairs": pairs, "search": self.search_rows}
