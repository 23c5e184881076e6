"""CTR backbones, registered by name for ``model=``: LR, FM, DNN, Wide&Deep, DeepFM, IPNN.

The AutoLoss paper's deep recommender network (§2.2) with its settings (§3.3) as defaults
(``conf/model/*.yaml``): field embeddings of size 16 (Eq. 1–2); an interaction layer, FM (Eq. 3–4) for
DeepFM, inner products for IPNN; an MLP of two layers of 128 with batch-norm, dropout 0.2 and ReLU (Eq. 5);
an output layer (Eq. 6) with one logit (sigmoid, logloss) for binary tasks or one per class (softmax,
cross-entropy) for the 5-class task.

| model | logits |
| --- | --- |
| ``lr`` | <w, x> + b |
| ``fm`` | <w, x> + b + sum_{i<j} <e_i, e_j> |
| ``dnn`` | W_o MLP([e_1 .. e_m]) + b_o |
| ``wide_deep`` | <w, x> + b + W_o MLP([e_1 .. e_m]) + b_o |
| ``deepfm`` | <w, x> + b + sum_{i<j} <e_i, e_j> + W_o MLP([e_1 .. e_m]) + b_o  (h_out = l_fm + MLP(E)) |
| ``ipnn`` | W_o MLP([e_1 .. e_m, <e_1,e_2>, .., <e_m-1,e_m>]) + b_o  (h_out = MLP(l_fm, E)) |

Choices the paper leaves open (config values): embeddings start N(0, 1e-4^2) (FuxiCTR's default), first-order
weights at 0; the MLP layer order is Linear -> BatchNorm -> ReLU -> Dropout (pytorch-fm, the library AutoLoss
was built on); for the 5-class task the first-order term has one weight per class and the FM vector
sum_{i<j} e_i ⊙ e_j is mapped to the classes by a learned ``d x 5`` matrix (a binary FM sums it).

Behaviour sequences (Alimama): ``forward(x, seq, seq_len)`` also takes the histories (``seq``: name ->
``[B, T]`` int32 codes of the field whose table the sequence shares, ``seq_len``: ``[B]`` valid lengths). DNN,
Wide&Deep and DeepFM (``uses_sequences``) append each history's masked sum of embeddings (DIN Eq. 1) to the
field embeddings E, so the MLP and DeepFM's FM see it (as the DIN and DSIN papers ran these baselines, DeepCTR's
pooling of a sequence feature); the first-order term stays on the categorical fields. LR, FM and IPNN use the
categorical fields only. DIN (``din.py``) attends over the histories instead.

Hooks for the search methods of the next issue: the embedding layer is a constructor argument (any module
mapping ``x [B, F]`` to ``[B, F, d]`` with a ``dim`` attribute, e.g. mixed dimensions unified to d), and FM /
DeepFM take a pair gate (``set_pair_gate``: a module mapping the ``[B, F(F-1)/2]`` inner products to gated
ones, AutoFIS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from autorecbench.data.schema import FieldSpec, TaskSpec
from autorecbench.errors import UserError
from autorecbench.models.registry import register_model
from autorecbench.models.layers import (
    ACTIVATIONS,
    MLP,
    FieldEmbedding,
    FirstOrder,
    fm_vector,
    inner_products,
    masked_sum,
)

# Keys of a ``model`` config that are not architecture (read by the methods, e.g. FIXED's optimiser).
NON_ARCHITECTURE_KEYS = ("name", "embedding_optimizer")


@dataclass(frozen=True)
class BackboneConfig:
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128, 128)
    batch_norm: bool = True
    batch_norm_affine: bool = True  # the MLP's batch-norm learns a scale and shift (false: BN(W h) + b, the AutoFIS code's)
    dropout: float = 0.2
    activation: str = "relu"
    embedding_init_std: float = 1e-4

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise UserError(f"model.embedding_dim must be >= 1, got {self.embedding_dim}")
        if any(h < 1 for h in self.hidden):
            raise UserError(f"model.hidden sizes must be >= 1, got {list(self.hidden)}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.embedding_init_std < 0:
            raise UserError("model.embedding_init_std must be >= 0")

    @classmethod
    def from_cfg(cls, cfg: DictConfig | dict[str, Any]) -> BackboneConfig:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        assert isinstance(raw, dict)
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in raw if k not in known and k not in NON_ARCHITECTURE_KEYS)
        if unknown:
            raise UserError(f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = {k: tuple(int(h) for h in v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        return cls(**values)


class CTRBackbone(nn.Module):
    """Base of the backbones: ``forward(x [B, F] int32, seq, seq_len) -> logits [B, n_outputs]``.

    ``embedding`` is the embedding layer (default: one ``embedding_dim`` table per field); ``sparse`` asks the
    default tables and the first-order weights for sparse gradients (a lazy optimiser). ``sequences``: the
    data's behaviour sequences (``FieldSpec.kind == "sequence"``); a backbone that ``uses_sequences`` looks
    them up in the table of the field each ``shares_table_with`` (the embedding must offer ``embed_with``).
    """

    protocols: ClassVar[tuple[str, ...]] = ("offline",)
    uses_embedding: ClassVar[bool] = True
    uses_sequences: ClassVar[bool] = False  # reads the behaviour sequences when the data has them
    requires_sequences: ClassVar[bool] = False  # cannot run without them
    config_class: ClassVar[type[BackboneConfig]] = BackboneConfig
    paper: ClassVar[str] = "Zhao et al., KDD 2021 (AutoLoss) §2.2, §3.3 settings"
    fidelity: ClassVar[str] = "faithful"
    deviations: ClassVar[str] = ""

    def __init__(self, fields: Sequence[FieldSpec], n_outputs: int, cfg: BackboneConfig,
                 embedding: nn.Module | None = None, sparse: bool = False,
                 sequences: Sequence[FieldSpec] = ()) -> None:
        super().__init__()
        self.field_specs = list(fields)
        self.n_fields = len(self.field_specs)
        self.n_outputs = n_outputs
        self.cfg = cfg
        self.sparse = sparse
        self.embedding: nn.Module | None = None
        if self.uses_embedding:
            self.embedding = embedding if embedding is not None else FieldEmbedding(
                self.cardinalities, cfg.embedding_dim, cfg.embedding_init_std, sparse)
        self.sequence_specs = list(sequences) if self.uses_sequences else []
        if self.requires_sequences and not self.sequence_specs:
            raise UserError(f"model {type(self).__name__} needs behaviour sequences; the data has none")
        names = [f.name for f in self.field_specs]
        unknown = [s.shares_table_with for s in self.sequence_specs if s.shares_table_with not in names]
        if unknown:
            raise UserError(f"sequence fields share the tables of {unknown}, which are not fields of the data")
        # column in x of the field whose table each sequence shares
        self.shared_fields = [names.index(str(s.shares_table_with)) for s in self.sequence_specs]
        if self.sequence_specs and not hasattr(self.embedding, "embed_with"):
            raise UserError("behaviour sequences need an embedding layer that looks up one field's rows "
                            "(embed_with); this method's cannot")
        self.build_layers()

    def build_layers(self) -> None:
        """The backbone's own layers, built after the embedding (in this order, so a seed gives the same
        initial weights); a subclass extends its parent's."""

    def embed(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The field embeddings ``[B, F, d]`` and each sequence's item embeddings ``[B, T, d]`` (from the table of
        the field it shares), looked up together."""
        if not self.sequence_specs:
            return self.embedding(x), []  # type: ignore[misc]
        if seq is None:
            raise RuntimeError(f"{type(self).__name__} was built for behaviour sequences: pass seq and seq_len")
        lookups = [(j, seq[s.name]) for s, j in zip(self.sequence_specs, self.shared_fields)]
        return self.embedding.embed_with(x, lookups)  # type: ignore[union-attr]

    def field_stack(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                    seq_len: torch.Tensor | None = None) -> torch.Tensor:
        """E: ``[B, F + S, d]``, the field embeddings followed by each sequence's masked sum (none without
        sequences)."""
        e, items = self.embed(x, seq)
        if not items:
            return e
        if seq_len is None:
            raise RuntimeError(f"{type(self).__name__} was built for behaviour sequences: pass seq and seq_len")
        return torch.cat([e, torch.stack([masked_sum(i, seq_len) for i in items], dim=1)], dim=1)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """An extra training-loss term from the latest training forward (DIEN's L_aux), returned once, or None.
        The offline training steps add it to the target loss (``methods.offline_common.training_loss``)."""
        return None

    @property
    def n_stacked(self) -> int:
        """Rows of :meth:`field_stack`: the fields and the pooled sequences."""
        return self.n_fields + len(self.sequence_specs)

    @property
    def cardinalities(self) -> list[int]:
        return [f.cardinality for f in self.field_specs]

    @property
    def dim(self) -> int:
        return int(self.embedding.dim) if self.embedding is not None else 0  # type: ignore[union-attr]

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        cls.config_class.from_cfg(cfg)

    def first_order(self) -> FirstOrder:
        return FirstOrder(self.cardinalities, self.n_outputs, self.sparse)

    def deep(self, in_dim: int) -> tuple[MLP, nn.Linear]:
        mlp = MLP(in_dim, self.cfg.hidden, self.cfg.batch_norm, self.cfg.dropout, self.cfg.activation,
                  affine=self.cfg.batch_norm_affine)
        return mlp, nn.Linear(mlp.out_dim, self.n_outputs)


class TargetAttentionBackbone(CTRBackbone):
    """Base of the backbones that read the history against the target ad (DIN, DIEN): they cannot run without
    behaviour sequences, and see a behaviour as the concatenation of its sequence fields' embeddings."""

    uses_sequences = True
    requires_sequences = True

    @property
    def behaviour_dim(self) -> int:
        """Width of a behaviour h_t and of the target t: one embedding per sequence field."""
        return len(self.sequence_specs) * self.dim

    def behaviours(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None,
                   seq_len: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The field embeddings ``[B, F, d]``, the behaviours ``[B, T, S d]``, the target ``[B, S d]`` (the fields
        the sequences share, in the same order) and the valid lengths ``[B]``."""
        if seq is None or seq_len is None:
            raise RuntimeError(f"{type(self).__name__} needs the behaviour sequences: pass seq and seq_len")
        e, items = self.embed(x, seq)
        return e, torch.cat(items, dim=-1), e[:, self.shared_fields].flatten(1), seq_len


class FMTerm(nn.Module):
    """sum_{i<j} <e_i, e_j> (one logit) or, for several outputs, a learned map of sum_{i<j} e_i ⊙ e_j.

    ``gate``: optional module applied to the per-pair inner products before they are summed (AutoFIS); with it
    the pairs are computed explicitly (O(F^2 d)) instead of with the O(F d) identity.
    """

    def __init__(self, dim: int, n_outputs: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, n_outputs, bias=False) if n_outputs > 1 else None
        self.gate: nn.Module | None = None

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            if self.proj is not None:
                raise RuntimeError("a pair gate needs a single-logit (binary) FM")
            return self.gate(inner_products(e)).sum(dim=1, keepdim=True)
        vector = fm_vector(e)
        return vector.sum(dim=1, keepdim=True) if self.proj is None else self.proj(vector)


@register_model("lr")
class LR(CTRBackbone):
    uses_embedding = False

    def __init__(self, fields: Sequence[FieldSpec], n_outputs: int, cfg: BackboneConfig,
                 embedding: nn.Module | None = None, sparse: bool = False,
                 sequences: Sequence[FieldSpec] = ()) -> None:
        super().__init__(fields, n_outputs, cfg, None, sparse)
        self.linear = self.first_order()

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x)


@register_model("fm")
class FM(CTRBackbone):
    def build_layers(self) -> None:
        self.linear = self.first_order()
        self.fm = FMTerm(self.dim, self.n_outputs)

    def set_pair_gate(self, gate: nn.Module | None) -> None:
        """Gate the pairwise inner products (AutoFIS): ``gate`` maps ``[B, F(F-1)/2] -> [B, F(F-1)/2]``."""
        self.fm.gate = gate

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x) + self.fm(self.embedding(x))  # type: ignore[misc]


@register_model("dnn")
class DNN(CTRBackbone):
    uses_sequences = True

    def build_layers(self) -> None:
        self.mlp, self.head = self.deep(self.n_stacked * self.dim)

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.mlp(self.field_stack(x, seq, seq_len).flatten(1)))


@register_model("wide_deep")
class WideDeep(CTRBackbone):
    uses_sequences = True

    def build_layers(self) -> None:
        self.linear = self.first_order()
        self.mlp, self.head = self.deep(self.n_stacked * self.dim)

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x) + self.head(self.mlp(self.field_stack(x, seq, seq_len).flatten(1)))


@register_model("deepfm")
class DeepFM(FM):
    uses_sequences = True

    def build_layers(self) -> None:
        super().build_layers()
        self.mlp, self.head = self.deep(self.n_stacked * self.dim)

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        e = self.field_stack(x, seq, seq_len)
        return self.linear(x) + self.fm(e) + self.head(self.mlp(e.flatten(1)))


@register_model("ipnn")
class IPNN(CTRBackbone):
    def __init__(self, fields: Sequence[FieldSpec], n_outputs: int, cfg: BackboneConfig,
                 embedding: nn.Module | None = None, sparse: bool = False,
                 sequences: Sequence[FieldSpec] = ()) -> None:
        super().__init__(fields, n_outputs, cfg, embedding, sparse)
        n_pairs = self.n_fields * (self.n_fields - 1) // 2
        self.mlp, self.head = self.deep(self.n_fields * self.dim + n_pairs)

    def forward(self, x: torch.Tensor, seq: dict[str, torch.Tensor] | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embedding(x)  # type: ignore[misc]
        return self.head(self.mlp(torch.cat([e.flatten(1), inner_products(e)], dim=1)))


def build_backbone(name: str, fields: Sequence[FieldSpec], task: TaskSpec, model_cfg: DictConfig, *,
                   embedding: nn.Module | None = None, sparse: bool = False,
                   sequences: Sequence[FieldSpec] = ()) -> CTRBackbone:
    """The registered backbone ``name`` for ``fields`` (and behaviour ``sequences``) and ``task`` with the
    ``model`` group's settings."""
    from autorecbench.models.registry import model_class

    cls = model_class(name)
    if not issubclass(cls, CTRBackbone):
        raise UserError(f"model {name!r} is not a CTR backbone (choose one of lr, fm, dnn, wide_deep, deepfm, ipnn, din, dien)")
    return cls(fields, task.n_outputs, cls.config_class.from_cfg(model_cfg), embedding, sparse, sequences)


def logloss(task: TaskSpec, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood: logloss of the sigmoid (binary) or cross-entropy of the softmax."""
    if task.is_binary:
        return F.binary_cross_entropy_with_logits(logits[:, 0], label)
    return F.cross_entropy(logits, label)
