"""DIEN, the Deep Interest Evolution Network (Zhou et al., AAAI 2019), registered as ``model=dien``: a GRU
extracts an interest state per behaviour, an auxiliary loss makes each state predict the next behaviour, and
an attention-gated GRU evolves the interests towards the target ad.

Per row, with K the embedding size and S the aligned sequence fields (Alimama: ``hist_cate``, ``hist_brand``),
D = S K, T the padded length and L ≤ T the row's valid length:

- behaviours e_b[t] = [E_cate[hist_cate_t], E_brand[hist_brand_t]] ∈ R^D (the tables of the fields the
  sequences share, as DIN), the target e_a = [E_cate[cate_id], E_brand[brand]] ∈ R^D;
- interest extractor (§4.2, Eq. 2–5): h_t = GRU(e_b[t], h_{t-1}), h_0 = 0, hidden size D (``nn.GRU``). The
  histories are post-padded, so h_t for t < L never sees a padded position; the states at t ≥ L are computed
  and never read (masked, no packing, so no host sync);
- auxiliary loss (Eq. 6): L_aux = −mean over the valid pairs (t, t+1 < L) of
  [log σ(<h_t, e_b[t+1]>) + log(1 − σ(<h_t, ê_b[t+1]>))], ê_b[t+1] a negative behaviour; the training loss is
  L_target + α L_aux (Eq. 7) with α = ``aux_weight``. It reaches the loss through ``auxiliary_loss()``
  (``CTRBackbone``): the term of the latest training forward, which the offline training steps add;
- interest evolving layer (§4.3, Eq. 8–12): attention a_t = softmax over valid t of h_t W e_a (Eq. 8, the
  paper's bilinear form), and AUGRU: ũ'_t = a_t u'_t, h'_t = (1 − ũ'_t) ∘ h'_{t−1} + ũ'_t ∘ h̃'_t (Eq. 11–12;
  a_t = 0 at padding, so the state stays, and h'_L is the row's last valid state); ``evolution=agru``
  (h'_t = (1 − a_t) h'_{t−1} + a_t h̃'_t, Eq. 10) or ``aigru`` (a GRU over a_t h_t, Eq. 9, the last valid
  state) are the paper's alternatives;
- logit = W_o MLP([e_1 .. e_F, h'_L, sum_{t<L} e_b[t]]) + b_o, the MLP of ``hidden`` (200-80) with
  ``activation`` PReLU or Dice (as DIN).

Choices ([D]: the paper is silent or differs from the code; each a config value in ``conf/model/dien.yaml``):
[D] ``aux_weight: 1.0`` (α; the official code adds the auxiliary loss with weight 1); [D] negatives drawn
uniformly from each sequence field's vocabulary (codes 1 .. cardinality − 1; ``negatives: uniform``), one per
position, from the model's own generator seeded from the run's seed (the paper samples from the item pool;
the official code's data iterator draws an item of a random review, i.e. in proportion to its interactions; a
draw may equal the positive); [D] σ of the
inner product <h_t, e_b> (Eq. 6; the code scores with an MLP of 100-50), hence hidden size = D; [D] L_aux is
the mean over valid pairs, independent of the padded length T (Eq. 6 sums over t and divides by the rows N; the
code averages over all B (T − 1) positions, padded ones counting 0); [D] the
bilinear attention of Eq. 8 (the code uses a DIN-like MLP attention with softmax); [D] the sum-pooled history
joins the MLP input (the code's ``item_his_eb_sum``; the paper's figure shows the final interest with the
profile, ad and context features); [D] GRU weights as torch's defaults (uniform ±1/sqrt(D)). The MLP,
batch-norm, dropout and embedding settings are the shared backbone options (on Alimama
``conf/data/alimama.yaml`` sets the DSIN code's: K = 4, 200-80, no batch-norm, no dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from autorecbench.errors import UserError
from autorecbench.models.backbones import BackboneConfig, TargetAttentionBackbone
from autorecbench.models.layers import masked_sum, sequence_mask
from autorecbench.models.registry import register_model

EVOLUTIONS = ("augru", "agru", "aigru")
NEGATIVE_SEED_OFFSET = 7_368_787  # the negatives' generator: the run's seed + this, apart from the shuffles


@dataclass(frozen=True)
class DIENConfig(BackboneConfig):
    aux_weight: float = 1.0
    evolution: str = "augru"
    negatives: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aux_weight < 0:
            raise UserError(f"model.aux_weight must be >= 0, got {self.aux_weight}")
        if self.evolution not in EVOLUTIONS:
            raise UserError(f"model.evolution must be one of {', '.join(EVOLUTIONS)}, got {self.evolution!r}")
        if self.negatives != "uniform":
            raise UserError(f"model.negatives must be uniform, got {self.negatives!r}")


class AttentionGRU(nn.Module):
    """The interest evolving GRU (DIEN §4.3, Eq. 9–12) with the weight layout of ``nn.GRUCell`` (gates r, z, n):
    r = σ(W_ir x + b_ir + W_hr h + b_hr), u = 1 − z = 1 − σ(W_iz x + ...),
    n = tanh(W_in x + b_in + r (W_hn h + b_hn)), and torch's h' = (1 − z) n + z h = u n + (1 − u) h.
    ``augru``: u scaled by a_t (Eq. 11–12); ``agru``: u replaced by a_t (Eq. 10); ``aigru``: a plain GRU over
    a_t x_t (Eq. 9), frozen past the valid length."""

    def __init__(self, input_size: int, hidden_size: int, mode: str) -> None:
        super().__init__()
        self.cell = nn.GRUCell(input_size, hidden_size)
        self.mode = mode

    def forward(self, inputs: torch.Tensor, attention: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``inputs [B, T, I]``, ``attention [B, T]`` (0 at padding), ``lengths [B]`` -> the last valid state
        ``[B, H]`` (0 for an empty history)."""
        cell = self.cell
        if self.mode == "aigru":
            inputs = inputs * attention[..., None]
        # the input part of every step in one matmul
        projected = F.linear(inputs, cell.weight_ih, cell.bias_ih).chunk(3, dim=-1)
        valid = sequence_mask(lengths, inputs.shape[1])
        h = inputs.new_zeros(inputs.shape[0], cell.hidden_size)
        for t in range(inputs.shape[1]):
            hr, hz, hn = F.linear(h, cell.weight_hh, cell.bias_hh).chunk(3, dim=-1)
            r = torch.sigmoid(projected[0][:, t] + hr)
            update = 1 - torch.sigmoid(projected[1][:, t] + hz)
            candidate = torch.tanh(projected[2][:, t] + r * hn)
            a = attention[:, t, None]
            if self.mode == "augru":
                update = a * update
            elif self.mode == "agru":
                update = a.expand_as(update)
            else:  # aigru: a plain step, which must not move past the valid length
                update = update * valid[:, t, None].to(update.dtype)
            h = update * candidate + (1 - update) * h
        return h


@register_model("dien")
class DIEN(TargetAttentionBackbone):
    config_class: ClassVar[type[BackboneConfig]] = DIENConfig
    paper = "Zhou et al., AAAI 2019 (DIEN) §4, Eq. 2-12"
    fidelity = "faithful, deviations documented"
    deviations = ("[D] aux_weight=1.0 (α); negatives uniform over the field vocabularies (paper: item pool; code: "
                  "by interaction count); aux score σ(<h_t, e_b>) of Eq. 6 (code: an MLP); L_aux mean over valid "
                  "pairs (code: over all B(T-1) positions); bilinear attention of Eq. 8 (code: MLP attention); "
                  "sum-pooled history in the MLP input (code's); evolution=augru|agru|aigru")

    def build_layers(self) -> None:
        cfg = self.cfg
        assert isinstance(cfg, DIENConfig)
        self.aux_weight = cfg.aux_weight
        width = self.behaviour_dim
        self.extractor = nn.GRU(width, width, batch_first=True)
        self.attention = nn.Linear(width, width, bias=False)  # W of Eq. 8
        self.evolution = AttentionGRU(width, width, cfg.evolution)
        self.mlp, self.head = self.deep(self.n_fields * self.dim + 2 * width)
        # codes of a negative draw: [1, cardinality) of each sequence's shared field (0 is padding)
        self.vocabularies = [self.field_specs[j].cardinality for j in self.shared_fields]
        self.negative_seed = torch.initial_seed() + NEGATIVE_SEED_OFFSET
        self.negative_generator: torch.Generator | None = None
        self._auxiliary: torch.Tensor | None = None

    def auxiliary_loss(self) -> torch.Tensor | None:
        """α L_aux of the latest training forward (Eq. 7), once; None in evaluation or with α = 0."""
        term, self._auxiliary = self._auxiliary, None
        return term

    def draw_negatives(self, shape: torch.Size, device: torch.device) -> list[torch.Tensor]:
        """One uniform code per position of each sequence field, from the model's seeded generator."""
        if self.negative_generator is None or self.negative_generator.device != device:
            self.negative_generator = torch.Generator(device=device).manual_seed(self.negative_seed)
        return [torch.randint(1, max(v, 2), shape, device=device, generator=self.negative_generator,
                              dtype=torch.int32) for v in self.vocabularies]

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        e, items, target, seq_len = self.behaviours(x, seq, seq_len)  # [B, F, K], [B, T, D], [B, D]
        states, _ = self.extractor(items)  # [B, T, D]; states past the valid length are never read
        if self.training and self.aux_weight > 0:
            self._auxiliary = self.aux_weight * self.interest_loss(x, states, items, seq_len)
        attention = self.attention_scores(states, target, seq_len)
        interest = self.evolution(states, attention, seq_len)
        pooled = masked_sum(items, seq_len)
        return self.head(self.mlp(torch.cat([e.flatten(1), interest, pooled], dim=1)))

    def attention_scores(self, states: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """a_t = exp(h_t W e_a) / sum_{j < L} exp(h_j W e_a) (Eq. 8), 0 at padding and for an empty history."""
        valid = sequence_mask(lengths, states.shape[1])
        scores = torch.einsum("btd,bd->bt", states, self.attention(target))
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=1) * valid.to(scores.dtype)

    def interest_loss(self, x: torch.Tensor, states: torch.Tensor, items: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
        """L_aux of Eq. 6: h_t against the next behaviour e_b[t+1] (click) and a drawn one (non-click), averaged
        over the valid pairs t + 1 < L; 0 when no row has two behaviours."""
        batch, length, _ = items.shape
        codes = self.draw_negatives(torch.Size((batch, length - 1)), items.device)
        lookups = [(j, c) for j, c in zip(self.shared_fields, codes)]
        _, negatives = self.embedding.embed_with(x[:0], lookups)  # type: ignore[union-attr]
        negative = torch.cat(negatives, dim=-1)  # [B, T-1, D]
        h = states[:, :-1]
        positive_logit = (h * items[:, 1:]).sum(-1)
        negative_logit = (h * negative).sum(-1)
        pairs = sequence_mask(lengths - 1, length - 1).to(h.dtype)
        per_pair = F.softplus(-positive_logit) + F.softplus(negative_logit)  # −log σ(p) − log(1 − σ(n))
        return (per_pair * pairs).sum() / pairs.sum().clamp_min(1.0)
