"""DIN, the Deep Interest Network (Zhou et al., KDD 2018), registered as ``model=din``: attention over the
user's behaviour history with the target ad as the query.

Per row, with K the embedding size and S the aligned sequence fields (Alimama: ``hist_cate``, ``hist_brand``):

- a behaviour h_t = [E_cate[hist_cate_t], E_brand[hist_brand_t]] ∈ R^{S K} (the tables of the fields each
  sequence shares, so a behaviour and the target live in one space), the target t = [E_cate[cate_id],
  E_brand[brand]];
- the local activation unit (§4.3, Eq. 3; ``layers.LocalActivationUnit``) gives w_t = a(h_t, t) from an MLP of
  ``attention_hidden`` = (64, 16) over [h_t, t, h_t − t, h_t ⊙ t] and a linear output, with no softmax and
  padding weighted 0; the user interest v = sum_t w_t h_t;
- logit = W_o MLP([e_1 .. e_F, v]) + b_o, the MLP of ``hidden`` units with ``activation`` PReLU or Dice
  (§5.2, ``layers.Dice``; ``model.activation=dice``).

Choices, as config values (``conf/model/din.yaml``; the DIN paper and the DSIN code's DIN where the paper is
silent): ``attention_hidden: [64, 16]`` (the DSIN code); ``attention_activation: null`` = the MLP's activation
(the DSIN code: Dice in the unit, ReLU in the MLP: ``model.attention_activation=dice model.activation=relu``);
``activation: prelu`` (the paper's base activation; PReLU has one slope per unit, starting at 0.25); the
unit's input [h, t, h − t, h ⊙ t] is the code's (the paper's figure shows the outer product); Dice's ε = 1e-8
(§5.2). Mini-batch aware regularisation (§5.1) is not implemented: the project's optimisers have no
regulariser, for every backbone alike. The MLP, batch-norm, dropout and embedding settings are the shared
backbone options (on Alimama ``conf/data/alimama.yaml`` sets the DSIN code's: K = 4, 200-80, no batch-norm,
no dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from autorecbench.errors import UserError
from autorecbench.models.backbones import BackboneConfig, TargetAttentionBackbone
from autorecbench.models.layers import ACTIVATIONS, LocalActivationUnit
from autorecbench.models.registry import register_model


@dataclass(frozen=True)
class DINConfig(BackboneConfig):
    attention_hidden: tuple[int, ...] = (64, 16)
    attention_activation: str | None = None  # None: the MLP's activation

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.attention_hidden or any(h < 1 for h in self.attention_hidden):
            raise UserError(f"model.attention_hidden must be sizes >= 1, got {list(self.attention_hidden)}")
        if self.attention_activation is not None and self.attention_activation not in ACTIVATIONS:
            raise UserError(f"model.attention_activation must be one of {', '.join(ACTIVATIONS)} or null, "
                            f"got {self.attention_activation!r}")


@register_model("din")
class DIN(TargetAttentionBackbone):
    config_class: ClassVar[type[BackboneConfig]] = DINConfig
    paper = "Zhou et al., KDD 2018 (DIN) §4.3, §5.2; DSIN code's settings"
    fidelity = "faithful, deviations documented"
    deviations = ("unit input [h, t, h-t, h*t] (the code's; the paper draws an outer product); no mini-batch "
                  "aware regularisation")

    def build_layers(self) -> None:
        cfg = self.cfg
        assert isinstance(cfg, DINConfig)
        self.attention = LocalActivationUnit(self.behaviour_dim, cfg.attention_hidden,
                                             cfg.attention_activation or cfg.activation)
        self.mlp, self.head = self.deep(self.n_fields * self.dim + self.behaviour_dim)

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        e, items, target, lengths = self.behaviours(x, seq, seq_len)  # [B, F, K], [B, T, S K], [B, S K]
        interest = self.attention.pool(items, target, lengths)
        return self.head(self.mlp(torch.cat([e.flatten(1), interest], dim=1)))
