"""AMEIR (Zhao, Wei, Zhu, ...; IJCAI 2021): one-shot random search over behaviour blocks, high-order
interactions and the MLP, in three progressive steps, then a re-train of the derived child from its one-shot
weights.

There is no public code: the paper (``../shared/papers/003_…``) is the spec, read section by section in
``../shared/docs/ameir-autoias.md`` Part A. The network (Eq. 1-2, the SE shortcut, Fig. 1) is
``models/ameir_net.py``; the search is here:

- **Step 1, behaviour modelling** (§2.3): the one-shot model holds every Layer op, a LayerNorm and the readout
  per block, with a pre-defined MLP (``manual_hidden`` = [200, 80], ``manual_activation``) on ``[h^a, e^b]``
  (no interactions, no SE). Trained ``step_epochs`` epochs; per batch, strict fairness (FairNAS): each block's
  Layer options in a random permutation, one child per option (Norm and Act uniform), gradients accumulated,
  one Adam step (``fairness: uniform``: one uniform child per step, single-path). Then ``children`` uniform
  children are scored (validation AUC, inherited weights, on the seeded ``valid_rows`` subset), the ``top``
  best fine-tuned from inherited weights for ``finetune_steps`` steps and the best on the validation split kept.
- **Step 2, interactions** (§2.3): p^b starts as e^b; each of ``cycles`` cycles mutates it
  (``p ⊙ e_j`` for every kept p and field j, distinct fields, deduplicated as sets; ``mutation: union`` keeps
  the parents of order ≥ 2 beside the children, ``children_only`` drops them), trains the one-shot model
  (``models.ameir_net.InteractionSupernet``: ``Σ W_i e_i + W_s p_s + b``, one candidate p_s per batch —
  ``interaction_sampling: batch``, or one per row: ``row``) and keeps the ``keep`` (k) fittest; after the last
  cycle the ``interactions`` (M) best. Weights are inherited across cycles (a new W_s: nn.Linear's default).
- **Step 3, MLP** (§2.3): every layer is allocated K₀ × K₀ and a child uses the leading slice; widths
  ``width_ratios`` · K₀ (rounded, ≥ 1), non-increasing, activations ``mlp_activations``: with two layers
  55 × 16 = 880 children, all enumerated and scored ([D]: the paper samples 2000 of a space this small).
  The one-shot model starts from Step 1's weights (embeddings, chosen blocks, readout) with Step 2's
  interactions and the SE shortcut; strict fairness is over the activations (each layer's four in a random
  permutation per step, widths uniform over the 55 pairs). Top ``top`` fine-tuned as in Step 1.
- **Derive** (§2.3, §3.4): the best child is re-trained by the runner's fit stage (early stopping on validation
  AUC) *starting from its one-shot weights* (``retrain_from: one_shot``; ``scratch`` re-initialises).

**One-shot random search over the joint space** (``search: joint``; §3.3 Table 4's "One-shot Random Search
[Li and Talwalkar, 2019]", the same search *without* the three progressive steps; ``progressive``, the default, is
AMEIR): one supernet over the whole of AMEIR-C's space (:class:`JointSpace`: every block op, Eq. 1; M interaction
slots; the K₀ × K₀ MLP, Eq. 2; the SE shortcut), trained on uniformly drawn children; then ``children`` uniform
children scored on the validation subset with inherited weights, the ``top`` fine-tuned, the best derived and
re-trained as AMEIR derives (``retrain_from``). ``search.parquet`` rows have ``step = "joint"``. Choices the paper
leaves open ([D]):
- ``joint_fairness: uniform`` — one uniform child per batch, as the cited random search with weight sharing trains
  its one-shot model (the fairness of §2.3 is AMEIR's own); ``strict``: FairNAS over the blocks' Layer options per
  batch as in Step 1 (over the MLP activations on data without histories), 12 children per batch;
- an interaction slot holds one of the Σ_r C(N, r) field sets of orders 2..``joint_max_order`` (null: ``cycles`` + 1,
  the highest order Step 2 reaches), the M of a child distinct; the order is drawn uniformly, then the fields
  (uniform over sets would put 64% of the draws at order 5 with N = 16 and 4 cycles); each slot has one weight
  (its K columns of the first MLP layer and its SE entry), shared by whatever interaction fills it;
- ``joint_epochs`` (null: the sum of the progressive steps' one-shot epochs on the same data — ``step_epochs`` for
  Step 1 with histories, ``cycles`` × ``cycle_epochs`` for Step 2, ``step_epochs`` for Step 3 — so both searches
  train for the same number of epochs), one cosine decay over all of them;
- the counts (``children``, ``top``, ``valid_rows``, ``finetune_steps``, ``lr``) are the budget's, as AMEIR's steps;
- Table 4's "Random" row draws from the same space (:meth:`AMEIR.random_architecture`).
Only ``variant: C`` is a joint space (A, B and I fix parts of the network).

Variants (``variant``): A = Step 1 only; B = A's blocks + Step 2's interactions + SE with the pre-defined MLP;
C = everything; I = DeepFM with its FM term replaced by ``Σ_m 1^T p_m`` (Step 2 only, no blocks; on data with
histories the sum-pooled history joins the MLP as in the suite's DeepFM). Data without behaviour sequences
(Criteo, Avazu) skip Step 1. ``interaction_mode`` (Table 5) overrides where p^b goes (null: the variant's).

Choices the paper leaves open ([D] in the spec), with their defaults (``conf/method/ameir.yaml``):
- ``dilation: 2`` for the dilated convolutions; the BiGRU has D_a/2 units per direction; self-attention has
  no positional encoding; target attention and the readout's h_att use DIN's unit (``attention_hidden``
  [64, 16], ``attention_activation: dice``, the DSIN code's).
- ``step_epochs: 1`` per step and per cycle; a cosine learning-rate decay over each step's steps (all cycles
  of Step 2 together: ``cosine: true``); Adam moments restart each cycle (the candidate set changes).
- ``valid_rows``: the seeded validation subset that scores children; fitness is AUC.
- ``finetune_steps`` (null: one epoch) from inherited weights, then the validation split's AUC; no early
  stopping inside the fine-tune.
- ``se_ratio: 3`` (W₁ has ⌈(N+M)/3⌉ rows, FiBiNET's ratio); Dice keeps its own statistics per width in the
  Step-3 supernet.
- B starts from Step 1's weights (its p^b columns and the SE are new); I from Step 2's embeddings.
- An architecture handed to ``build`` without a search (the validation's references) is trained from scratch.
- ``budget: paper | quick``: ``paper`` has the paper's counts (2000 children, top 5, 4 cycles, k = 50, lr
  1e-5 as printed); ``quick`` (200 children, top 3, 2 cycles, k = 10, lr 1e-3, ``interaction_sampling: row``,
  2 epochs per cycle) finishes search and re-train of ~80k Alimama-format rows in minutes on 2 CPU cores.
  The paper's batch size 1024 is the runner's (``runner.batch_size=1024``).
The space itself is configurable: ``blocks`` (L_a = 3), ``layers`` (the Layer options; ``target_attention`` is
dropped on data without a target), ``readout``, ``mlp_layers`` (L_c = 2), ``width_ratios``, ``mlp_activations``;
``cycle_epochs`` one-shot epochs per Step-2 cycle; ``architecture``: a path to an ``architecture.json`` trained from
scratch without a search (the validation's references, Table 4's random architectures).
The ``model=`` group does not shape the network; only its ``embedding_dim`` (K, unless ``method.embedding_dim``),
``embedding_init_std`` and ``embedding_optimizer`` are read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from autorecbench.errors import UserError
from autorecbench.methods.base import MemoryReport, MethodContext, OfflineLoop, register_method
from autorecbench.methods.offline_common import BackboneMethod, CostedSearch, check_positive, embedding_tables
from autorecbench.models.ameir_net import (
    BLOCK_ACTIVATIONS,
    INTERACTION_MODES,
    LAYERS,
    MLP_ACTIVATIONS,
    NORMS,
    READOUTS,
    AMEIRNet,
    Choice,
    InteractionSupernet,
    NetSpec,
    child_spec,
)
from autorecbench.models.supernet import (
    ArchCost,
    Architecture,
    ArchSpace,
    Component,
    arch_cost,
    batched_auc,
    inherit_leading,
    sample_fair,
)
from autorecbench.train.optim import SplitAdam, tensor_bytes

if TYPE_CHECKING:
    from autorecbench.data.offline import OfflineBatch

VARIANTS = ("A", "B", "C", "I")
FAIRNESS = ("strict", "uniform")
MUTATIONS = ("union", "children_only")
SAMPLINGS = ("batch", "row")
RETRAIN_FROM = ("one_shot", "scratch")
SEARCHES = ("progressive", "joint")
VARIANT_MODE = {"A": "none", "B": "mlp+se", "C": "mlp+se", "I": "fm"}
SCORE_ROWS = 10_000  # validation rows per scoring pass
COST_ROWS = 2048
ARCHITECTURE_KEYS = ("variant", "blocks", "readout", "interactions", "interaction_mode", "first_order", "mlp_hidden",
                     "mlp_activations")


def mlp_widths(ratios: Sequence[float], k0: int) -> list[int]:
    """``round(r K₀)``, at least 1, per ratio."""
    return [max(1, round(float(r) * k0)) for r in ratios]


def width_pairs(ratios: Sequence[float], layers: int) -> list[list[float]]:
    """Every non-increasing sequence of ``layers`` ratios (55 for ten ratios and two layers)."""
    out: list[list[float]] = [[]]
    for _ in range(layers):
        out = [seq + [r] for seq in out for r in sorted(ratios) if not seq or r <= seq[-1]]
    return out


def mlp_space(ratios: Sequence[float], layers: int, activations: Sequence[str]) -> ArchSpace:
    """Step 3's space: one decision over the non-increasing width ratios, one activation per layer."""
    return ArchSpace([Component("widths", ("mlp",), tuple(width_pairs(ratios, layers))),
                      Component("activation", tuple(f"layer{l}" for l in range(layers)), tuple(activations))])


def block_space(blocks: int, layers: Sequence[str]) -> ArchSpace:
    """Step 1's space: Norm, Layer and Act per block."""
    keys = tuple(f"block{b}" for b in range(blocks))
    return ArchSpace([Component("norm", keys, NORMS), Component("layer", keys, tuple(layers)),
                      Component("activation", keys, BLOCK_ACTIVATIONS)])


def interaction_key(fields: Sequence[int], names: Sequence[str]) -> str:
    return "*".join(names[f] for f in sorted(fields))


def mutate(kept: Sequence[tuple[int, ...]], n_fields: int, mode: str) -> list[tuple[int, ...]]:
    """Step 2 (a): ``p ⊙ e_j`` for every kept p and every field j not in p, as sorted index sets, deduplicated
    (``union``: with the kept parents of order ≥ 2), in a deterministic order."""
    out = {tuple(sorted(set(p) | {j})) for p in kept for j in range(n_fields) if j not in p}
    if mode == "union":
        out |= {tuple(sorted(p)) for p in kept if len(p) >= 2}
    return sorted(out, key=lambda p: (len(p), p))


@dataclass(frozen=True)
class JointDraw:
    """One architecture of the joint space: a Step-1 block architecture, the interactions per slot (sorted field
    indices, in slot order) and a Step-3 MLP architecture."""

    blocks: Architecture
    interactions: tuple[tuple[int, ...], ...]
    mlp: Architecture


@dataclass(frozen=True)
class JointSpace:
    """AMEIR's three subspaces at once (Table 4's "same search space"): the behaviour blocks (Eq. 1; drawn but not
    counted without histories), ``slots`` (M) distinct interactions over the ``n_fields`` non-sequential fields
    with orders 2..``max_order``, and the MLP (Eq. 2). An interaction is drawn order first (uniform over the
    orders), then its fields (uniform without replacement); a repeat of a set already drawn is drawn again."""

    blocks: ArchSpace
    behaviour: bool
    n_fields: int
    slots: int
    max_order: int
    mlp: ArchSpace

    def orders(self) -> list[int]:
        return list(range(2, min(self.max_order, self.n_fields) + 1))

    def interaction_count(self) -> int:
        """How many distinct interactions a slot can hold: Σ_r C(N, r) over the orders."""
        return sum(math.comb(self.n_fields, r) for r in self.orders())

    def slots_filled(self) -> int:
        return min(self.slots, self.interaction_count())

    def size(self) -> int:
        """The number of architectures (exact): blocks × C(S, M) interaction sets × MLPs (slot order aside)."""
        blocks = self.blocks.size() if self.behaviour else 1
        return blocks * math.comb(self.interaction_count(), self.slots_filled()) * self.mlp.size()

    def sample_interactions(self, generator: torch.Generator) -> tuple[tuple[int, ...], ...]:
        orders = self.orders()
        drawn: list[tuple[int, ...]] = []
        while len(drawn) < self.slots_filled():
            order = orders[int(torch.randint(len(orders), (1,), generator=generator))]
            fields = tuple(sorted(torch.randperm(self.n_fields, generator=generator)[:order].tolist()))
            if fields not in drawn:
                drawn.append(fields)
        return tuple(drawn)

    def sample(self, generator: torch.Generator, count: int = 1, fair: str | None = None) -> list[JointDraw]:
        """``count`` uniform architectures; ``fair`` = ``layer`` (the blocks' Layer) or ``activation`` (the MLP's):
        strict fairness over that component (:func:`sample_fair`), ``count`` its number of choices."""
        fair_space = self.blocks if fair == "layer" else self.mlp if fair == "activation" else None
        if fair_space is not None:
            count = fair_space.by_name[str(fair)].n_choices
        blocks = sample_fair(self.blocks, "layer", generator) if fair == "layer" else \
            self.blocks.sample_uniform(count, generator)
        interactions = [self.sample_interactions(generator) for _ in range(count)]
        mlp = sample_fair(self.mlp, "activation", generator) if fair == "activation" else \
            self.mlp.sample_uniform(count, generator)
        return [JointDraw(ArchSpace.select(blocks, i), interactions[i], ArchSpace.select(mlp, i)) for i in range(count)]


class CosineLR:
    """A cosine decay of a :class:`SplitAdam`'s learning rate from ``lr`` over ``total`` steps (to lr/total)."""

    def __init__(self, lr: float, total: int, enabled: bool) -> None:
        self.lr, self.total, self.enabled, self.done = lr, max(int(total), 1), enabled, 0

    def step(self, optimizer: SplitAdam) -> None:
        if not self.enabled:
            return
        current = self.value(self.done)
        self.done += 1
        optimizer.scale_lr(self.value(self.done) / current)

    def value(self, done: int) -> float:
        t = min(done, self.total - 1) / self.total
        return self.lr * 0.5 * (1 + math.cos(math.pi * t))


@register_method
class AMEIR(CostedSearch, BackboneMethod):
    name = "ameir"
    description = ("One-shot random search, progressive: behaviour blocks (Eq. 1), high-order interactions "
                   "(evolution), MLP widths/activations (Eq. 2, 880 enumerated); SE shortcut; re-train from "
                   "one-shot weights")
    paper = "Zhao et al., IJCAI 2021 (AMEIR) §2-3"
    fidelity = "faithful, deviations documented"
    deviations = ("no public code: every choice the paper leaves open is a method.* key; Step 3 enumerates its "
                  "880 children; budget=quick shrinks counts and raises lr for CPUs; fine-tunes without early "
                  "stopping; search=joint (Table 4's one-shot random search over the joint space): interaction "
                  "orders 2..joint_max_order (null: cycles+1), order drawn first, one weight per slot; "
                  "joint_epochs (null: the progressive steps' sum); joint_fairness=uniform (one child per batch)")
    # The one-shot steps update supernets outside the loop's DDP module without averaging their gradients.
    data_parallel_refusal = "its one-shot search steps do not average gradients across processes"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        schema = ctx.schema
        self.field_names = [f.name for f in schema.fields]
        self.cardinalities = [f.cardinality for f in schema.fields]
        self.sequences = list(schema.sequence_fields)
        self.shared_fields = [self.field_names.index(str(s.shares_table_with)) for s in self.sequences]
        self.dim = int(cfg.embedding_dim if cfg.embedding_dim is not None else ctx.model_cfg.embedding_dim)
        self.variant = str(cfg.variant)
        self.interaction_mode = (str(cfg.interaction_mode) if cfg.interaction_mode is not None
                                 else VARIANT_MODE[self.variant])
        has_sequences = bool(self.sequences)
        if self.variant == "A" and not has_sequences:
            raise UserError(f"method.variant=A searches behaviour blocks only; dataset {schema.dataset!r} has no "
                            "behaviour sequences (use B, C or I)")
        self.layers = [l for l in cfg.layers if l != "target_attention" or self.shared_fields]
        self.blocks_space = block_space(int(cfg.blocks), self.layers)
        self.searched: dict[str, Any] = {}
        self.search_rows: list[dict[str, Any]] = []
        self.one_shot: dict[str, torch.Tensor] | None = None  # the derived child's one-shot weights
        self.cost: ArchCost | None = None
        self.model: AMEIRNet | None = None  # type: ignore[assignment]

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        if str(cfg.budget) not in cfg.budgets:
            raise UserError(f"method.budget must be one of {', '.join(cfg.budgets)}, got {cfg.budget!r}")
        for key, options in (("variant", VARIANTS), ("search", SEARCHES), ("fairness", FAIRNESS),
                             ("joint_fairness", FAIRNESS), ("mutation", MUTATIONS),
                             ("interaction_sampling", SAMPLINGS), ("retrain_from", RETRAIN_FROM),
                             ("manual_activation", MLP_ACTIVATIONS), ("attention_activation", ("relu", "prelu", "dice"))):
            if str(cfg[key]) not in options:
                raise UserError(f"method.{key} must be one of {', '.join(options)}, got {cfg[key]!r}")
        if cfg.interaction_mode is not None and str(cfg.interaction_mode) not in INTERACTION_MODES:
            raise UserError(f"method.interaction_mode must be one of {', '.join(INTERACTION_MODES)} or null, "
                            f"got {cfg.interaction_mode!r}")
        for key, allowed in (("layers", LAYERS), ("readout", READOUTS), ("mlp_activations", MLP_ACTIVATIONS)):
            values = [str(v) for v in cfg[key]]
            if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
                raise UserError(f"method.{key} must be distinct values of {', '.join(allowed)}, got {values}")
        ratios = [float(r) for r in cfg.width_ratios]
        if not ratios or any(not 0 < r <= 1 for r in ratios) or len(set(ratios)) != len(ratios):
            raise UserError(f"method.width_ratios must be distinct ratios in (0, 1], got {ratios}")
        check_positive(cfg, "blocks", "children", "top", "cycles", "keep", "interactions", "valid_rows", "lr",
                       "step_epochs", "mlp_layers", "dilation", "se_ratio")
        if int(cfg.keep) < int(cfg.interactions):
            raise UserError(f"method.keep (k = {cfg.keep}) must be >= method.interactions (M = {cfg.interactions})")
        if not cfg.manual_hidden or any(int(h) < 1 for h in cfg.manual_hidden):
            raise UserError(f"method.manual_hidden must be widths >= 1, got {list(cfg.manual_hidden)}")
        if cfg.finetune_steps is not None and int(cfg.finetune_steps) < 0:
            raise UserError(f"method.finetune_steps must be >= 0 (or null: one epoch), got {cfg.finetune_steps}")
        if str(cfg.search) == "joint" and str(cfg.variant) != "C":
            raise UserError(f"method.search=joint searches the whole joint space (blocks, interactions, MLP: "
                            f"AMEIR-C's); use method.variant=C, got {cfg.variant!r}")
        for key, low in (("joint_max_order", 2), ("joint_epochs", 1)):
            if cfg[key] is not None and int(cfg[key]) < low:
                raise UserError(f"method.{key} must be >= {low} (or null), got {cfg[key]}")
        if cfg.embedding_dim is not None and int(cfg.embedding_dim) < 1:
            raise UserError(f"method.embedding_dim must be >= 1 (or null), got {cfg.embedding_dim}")
        if str(cfg.task) != "binary":
            raise UserError("AMEIR predicts clicks (logloss): use task=binary")
        if cfg.architecture is not None:
            from pathlib import Path

            try:
                arch = json.loads(Path(str(cfg.architecture)).read_text())
                missing = [k for k in ARCHITECTURE_KEYS if k not in arch]
            except (OSError, ValueError) as exc:
                raise UserError(f"method.architecture={cfg.architecture}: cannot read it ({exc})") from None
            if missing:
                raise UserError(f"method.architecture={cfg.architecture}: not an AMEIR architecture.json "
                                f"(no {', '.join(missing)})")

    # ------------------------------------------------------------ networks

    def net_spec(self, *, blocks: Sequence[tuple[str, str, str]] | None, interactions: Sequence[tuple[int, ...]],
                 mode: str, hidden: Sequence[int], activations: Sequence[str], first_order: bool = False,
                 supernet_blocks: bool = False, dice_widths: list[list[int]] | None = None,
                 readout: Sequence[str] | None = None) -> NetSpec:
        """A network of this data: ``blocks`` None = no behaviour part; ``supernet_blocks``: every op held."""
        cfg = self.ctx.cfg
        choice = Choice(tuple(blocks or ()), tuple(int(h) for h in hidden), tuple(activations))
        has_behaviour = blocks is not None and bool(self.sequences)
        spec = NetSpec(readout=list(readout if readout is not None else cfg.readout) if has_behaviour else [],
                       interactions=list(interactions), interaction_mode=mode if interactions else "none",
                       first_order=first_order, hidden=[int(h) for h in hidden],
                       dice_widths=dice_widths if dice_widths is not None else
                       [[int(h)] if a == "dice" else [] for h, a in zip(hidden, activations)],
                       dilation=int(cfg.dilation), attention_hidden=tuple(int(h) for h in cfg.attention_hidden),
                       attention_activation=str(cfg.attention_activation), se_ratio=float(cfg.se_ratio),
                       default=choice)
        if has_behaviour:
            spec.block_layers = [list(self.layers) if supernet_blocks else [layer] for _, layer, _ in choice.blocks]
            spec.block_norm = [supernet_blocks or norm == "layernorm" for norm, _, _ in choice.blocks]
        else:
            spec.default = Choice((), choice.hidden, choice.activations)
        return spec

    def new_net(self, spec: NetSpec) -> AMEIRNet:
        return AMEIRNet(self.cardinalities, self.shared_fields, [s.name for s in self.sequences], self.dim,
                        float(self.ctx.cfg.init_std), self.sparse, spec).to(self.ctx.device)

    def _blocks(self, arch: Architecture) -> tuple[tuple[str, str, str], ...]:
        """Step-1 architecture (``[decisions]`` per component) -> (norm, layer, act) per block."""
        norm, layer, act = (arch[c].tolist() for c in ("norm", "layer", "activation"))
        return tuple((NORMS[n], self.layers[l], BLOCK_ACTIVATIONS[a]) for n, l, a in zip(norm, layer, act))

    def _mlp_choice(self, arch: Architecture, k0: int, space: ArchSpace) -> tuple[tuple[int, ...], tuple[str, ...]]:
        ratios = space.by_name["widths"].choices[int(arch["widths"][0])]
        acts = tuple(space.by_name["activation"].choices[i] for i in arch["activation"].tolist())
        return tuple(mlp_widths(ratios, k0)), acts

    # ------------------------------------------------------------ the search (§2.3)

    def search(self, loop: OfflineLoop) -> dict[str, Any]:
        cfg = self.ctx.cfg
        if cfg.architecture is not None:  # a given architecture: no search, trained from scratch
            self.searched = self.read_architecture(str(cfg.architecture))
            return self.searched
        valid = self._valid_subset(loop)
        manual = [int(h) for h in cfg.manual_hidden]
        manual_acts = [str(cfg.manual_activation)] * len(manual)
        blocks: tuple[tuple[str, str, str], ...] | None = None
        step1_state: dict[str, torch.Tensor] = {}
        if str(cfg.search) == "joint":
            spec, self.one_shot = self._joint(loop, valid)
            return self._searched(spec, joint_space_log10=math.log10(self.joint_space(self.joint_slots()).size()))
        if self.sequences and self.variant != "I":
            blocks, step1_state = self._step1(loop, valid, manual, manual_acts)
        interactions: list[tuple[int, ...]] = []
        step2_state: dict[str, torch.Tensor] = {}
        if self.variant != "A" and self.interaction_mode != "none":
            interactions, step2_state = self._step2(loop, valid)
        if self.variant == "I":  # DeepFM: sum-pooled histories, first-order term, FM replaced by Σ p_m
            spec = self.net_spec(blocks=(), interactions=interactions, mode=self.interaction_mode, hidden=manual,
                                 activations=manual_acts, first_order=True, readout=["sum"])
            self.one_shot = step2_state
        elif self.variant == "C":
            spec, self.one_shot = self._step3(loop, valid, blocks, interactions, step1_state)
        else:
            spec = self.net_spec(blocks=blocks, interactions=interactions if self.variant == "B" else [],
                                 mode=self.interaction_mode, hidden=manual, activations=manual_acts)
            self.one_shot = step1_state
        return self._searched(spec)

    def _searched(self, spec: NetSpec, **extra: Any) -> dict[str, Any]:
        cfg = self.ctx.cfg
        self.searched = self.describe(spec)
        fairness = cfg.joint_fairness if str(cfg.search) == "joint" else cfg.fairness
        self.searched.update(search=str(cfg.search), budget=str(cfg.budget), fairness=str(fairness),
                             blocks_space_size=self.blocks_space.size() if self.sequences else 0, **extra)
        return self.searched

    def describe(self, spec: NetSpec) -> dict[str, Any]:
        """``architecture.json``: the variant, block ops per layer, readout, interactions by field name, the MLP."""
        c = spec.default
        return {
            "variant": self.variant,
            "blocks": [{"norm": n, "layer": l, "activation": a} for n, l, a in c.blocks],
            "readout": list(spec.readout),
            "interactions": [[self.field_names[f] for f in i] for i in spec.interactions],
            "interaction_mode": spec.interaction_mode,
            "first_order": spec.first_order,
            "mlp_hidden": list(c.hidden),
            "mlp_activations": list(c.activations),
        }

    def spec_from(self, arch: dict[str, Any]) -> NetSpec:
        """The network of an ``architecture.json`` (the inverse of :meth:`describe`)."""
        index = {name: i for i, name in enumerate(self.field_names)}
        blocks = [(b["norm"], b["layer"], b["activation"]) for b in arch["blocks"]]
        has_behaviour = bool(arch["readout"])
        return self.net_spec(blocks=blocks if has_behaviour else None,
                             interactions=[tuple(index[f] for f in i) for i in arch["interactions"]],
                             mode=str(arch["interaction_mode"]), hidden=arch["mlp_hidden"],
                             activations=arch["mlp_activations"], first_order=bool(arch["first_order"]),
                             readout=arch["readout"] if has_behaviour else None)

    def read_architecture(self, path: str) -> dict[str, Any]:
        """An ``architecture.json`` (of a run, or written by hand) checked against this data's fields."""
        from pathlib import Path

        file = Path(path)
        try:
            arch = json.loads(file.read_text())
            fields = {f for i in arch["interactions"] for f in i}
            unknown = sorted(fields - set(self.field_names))
            if unknown:
                raise UserError(f"{file}: interactions name fields this data does not have: {', '.join(unknown)}")
            self.spec_from(arch)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"method.architecture={path}: not an AMEIR architecture.json ({exc})") from None
        return {k: arch[k] for k in ARCHITECTURE_KEYS}

    def _valid_subset(self, loop: OfflineLoop) -> OfflineBatch:
        rows = min(int(self.ctx.cfg.valid_rows), len(loop.valid))
        order = torch.randperm(len(loop.valid), generator=torch.Generator().manual_seed(self.ctx.seed))[:rows]
        return loop.valid.rows(order.sort().values.to(loop.valid.x.device))

    def _rng(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.ctx.seed * 1000 + offset)

    def _train_children(self, loop: OfflineLoop, net: nn.Module, children: Callable[[], list[Choice]],
                        predict_choice: Choice, epochs: int, schedule: CosineLR) -> None:
        """One-shot training (a ``search`` fit stage of the runner): per batch, the gradients of every child
        ``children()`` draws, averaged, and one Adam step."""
        optimizer = self.adam(net, schedule.lr)

        def step(batch: OfflineBatch, loop: OfflineLoop) -> torch.Tensor:
            net.train()
            optimizer.zero_grad()
            drawn = children()
            total = torch.zeros((), device=batch.x.device)
            for choice in drawn:
                loss = F.binary_cross_entropy_with_logits(net(batch.x, batch.seq, batch.seq_len, choice)[:, 0],
                                                          batch.label)
                (loss / len(drawn)).backward()
                total = total + loss.detach()
            optimizer.step()
            schedule.step(optimizer)
            return total / len(drawn)

        def predict(batch: OfflineBatch) -> torch.Tensor:
            net.eval()
            return torch.sigmoid(net(batch.x, batch.seq, batch.seq_len, predict_choice)[:, 0])

        loop.fit("search", step, predict, net, epochs=epochs, patience=epochs, restore_best=False)

    @torch.no_grad()
    def _score(self, net: AMEIRNet, valid: OfflineBatch, choices: Sequence[Choice]) -> torch.Tensor:
        """Validation AUC of each child (inherited weights) on the subset; the features computed once per
        run of children with the same blocks and interactions."""
        net.eval()
        scores = torch.empty(len(choices), len(valid), device=valid.x.device)
        for start in range(0, len(valid), SCORE_ROWS):
            end = min(start + SCORE_ROWS, len(valid))
            x = valid.x[start:end]
            seq = {k: v[start:end] for k, v in valid.seq.items()}
            seq_len = valid.seq_len[start:end] if valid.seq_len is not None else None
            cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
            for i, c in enumerate(choices):
                path = (c.blocks, c.interactions)
                if path not in cache:
                    cache = {path: net.features(x, seq, seq_len, c.blocks, c.interactions)}
                h, extra = cache[path]
                scores[i, start:end] = (net.head(h, c.hidden, c.activations) + extra)[:, 0]
        return batched_auc(scores, valid.label)

    def _finetune(self, loop: OfflineLoop, net: AMEIRNet, offset: int) -> float:
        """Fine-tune a child ``finetune_steps`` steps (null: one epoch) from its inherited weights; its AUC on
        the validation split."""
        cfg = self.ctx.cfg
        optimizer = self.adam(net, float(cfg.lr))
        steps = int(cfg.finetune_steps) if cfg.finetune_steps is not None else self._steps_per_epoch(loop)
        done = 0
        net.train()
        while done < steps:
            for batch in loop.train.batches(self._batch_size(loop), self._rng(offset + done)):
                if done >= steps:
                    break
                optimizer.zero_grad()
                F.binary_cross_entropy_with_logits(net(batch.x, batch.seq, batch.seq_len)[:, 0],
                                                   batch.label).backward()
                optimizer.step()
                done += 1

        def predict(batch: OfflineBatch) -> torch.Tensor:
            net.eval()
            return torch.sigmoid(net(batch.x, batch.seq, batch.seq_len)[:, 0])

        return float(loop.evaluate(predict, "valid")["auc"])

    def _best_of(self, loop: OfflineLoop, step: int | str, supernet: AMEIRNet, choices: list[Choice],
                 aucs: torch.Tensor, describe: Callable[[Choice], str], rng_offset: int) -> Choice:
        """Record every scored child (``step``: 1, 3 or "joint"); fine-tune the ``top`` best from inherited weights
        (random streams from ``rng_offset`` on); the best of those."""
        order = torch.argsort(torch.nan_to_num(aucs, nan=0.0), descending=True).tolist()
        top = order[:int(self.ctx.cfg.top)]
        state = supernet.state_dict()
        tuned: dict[int, float] = {}
        for rank, i in enumerate(top):
            child = self.new_net(child_spec(supernet.spec, choices[i]))
            inherit_leading(child, state)
            tuned[i] = self._finetune(loop, child, rng_offset + rank)
        best = max(top, key=lambda i: (tuned[i], -top.index(i)))
        for i, (c, auc) in enumerate(zip(choices, aucs.tolist())):
            self.search_rows.append({"step": step, "cycle": 0, "candidate": describe(c), "valid_auc": auc,
                                     "finetune_valid_auc": tuned.get(i, math.nan), "kept": i == best})
        return choices[best]

    def _step1(self, loop: OfflineLoop, valid: OfflineBatch, manual: list[int], manual_acts: list[str]
               ) -> tuple[tuple[tuple[str, str, str], ...], dict[str, torch.Tensor]]:
        """Step 1: behaviour blocks with the pre-defined MLP (no interactions, no SE)."""
        cfg = self.ctx.cfg
        space = self.blocks_space
        start = self._blocks(space.constant({"norm": "none", "layer": "zero", "activation": "identity"}))
        supernet = self.new_net(self.net_spec(blocks=start, interactions=[], mode="none", hidden=manual,
                                              activations=manual_acts, supernet_blocks=True))
        rng = self._rng(1)
        strict = str(cfg.fairness) == "strict"

        def children() -> list[Choice]:
            drawn = sample_fair(space, "layer", rng) if strict else space.sample_uniform(1, rng)
            return [Choice(self._blocks(ArchSpace.select(drawn, i)), tuple(manual), tuple(manual_acts))
                    for i in range(ArchSpace.count(drawn))]

        epochs = int(cfg.step_epochs)
        self._train_children(loop, supernet, children, supernet.spec.default, epochs,
                             CosineLR(float(cfg.lr), epochs * self._steps_per_epoch(loop), bool(cfg.cosine)))
        drawn = space.sample_uniform(int(cfg.children), self._rng(2))
        choices = [Choice(self._blocks(ArchSpace.select(drawn, i)), tuple(manual), tuple(manual_acts))
                   for i in range(int(cfg.children))]
        aucs = self._score(supernet, valid, choices)
        best = self._best_of(loop, 1, supernet, choices, aucs,
                             lambda c: json.dumps([list(b) for b in c.blocks]), 10)
        return best.blocks, {k: v.detach().clone() for k, v in supernet.state_dict().items()}

    @staticmethod
    def _batch_size(loop: OfflineLoop) -> int:
        """The runner's batch size (what its fit stages use; 1024, the paper's, for a loop without one)."""
        return int(getattr(getattr(loop, "cfg", None), "batch_size", 1024))

    def _steps_per_epoch(self, loop: OfflineLoop) -> int:
        return len(loop.train.bounds(self._batch_size(loop)))

    def _step2(self, loop: OfflineLoop, valid: OfflineBatch) -> tuple[list[tuple[int, ...]], dict[str, torch.Tensor]]:
        """Step 2: interaction evolution over ``cycles`` cycles; the ``interactions`` best."""
        cfg = self.ctx.cfg
        device = self.ctx.device
        n = len(self.field_names)
        supernet = InteractionSupernet(self.cardinalities, self.dim, float(cfg.init_std), self.sparse,
                                       [int(h) for h in cfg.manual_hidden]).to(device)
        rng = self._rng(3)
        per_row = str(cfg.interaction_sampling) == "row"
        cycles, epochs = int(cfg.cycles), int(cfg.cycle_epochs)
        schedule = CosineLR(float(cfg.lr), cycles * epochs * self._steps_per_epoch(loop), bool(cfg.cosine))
        kept: list[tuple[int, ...]] = [(f,) for f in range(n)]
        scored: list[tuple[tuple[int, ...], float]] = []
        for cycle in range(1, cycles + 1):
            pool = mutate(kept, n, str(cfg.mutation))
            keys = [interaction_key(p, self.field_names) for p in pool]
            for key in keys:
                supernet.add(key)
            order = max(len(p) for p in pool)
            index = torch.tensor([list(p) + [n] * (order - len(p)) for p in pool], dtype=torch.int64, device=device)
            optimizer = self.adam(supernet, schedule.value(schedule.done))

            # keys, index and optimizer are this cycle's (the closure runs inside this cycle's fit only); as closure
            # cells, not default arguments, a checkpoint restores them in place.
            def step(batch: OfflineBatch, loop: OfflineLoop) -> torch.Tensor:
                supernet.train()
                rows = len(batch)
                pick = (torch.randint(len(keys), (rows,), generator=rng) if per_row
                        else torch.randint(len(keys), (1,), generator=rng).expand(rows)).to(device)
                weights = torch.stack([supernet.weights[k] for k in keys])
                optimizer.zero_grad()
                loss = F.binary_cross_entropy_with_logits(supernet(batch.x, index[pick], weights[pick]), batch.label)
                loss.backward()
                optimizer.step()
                schedule.step(optimizer)
                return loss.detach()

            def predict(batch: OfflineBatch) -> torch.Tensor:
                supernet.eval()
                return torch.sigmoid(supernet.score(batch.x, index[:1], keys[:1])[0])

            loop.fit("search", step, predict, supernet, epochs=epochs, patience=epochs, restore_best=False)
            with torch.no_grad():
                supernet.eval()
                aucs = batched_auc(torch.cat([supernet.score(valid.x[s:s + SCORE_ROWS], index, keys)
                                              for s in range(0, len(valid), SCORE_ROWS)], dim=1), valid.label)
            fitness = torch.nan_to_num(aucs, nan=0.0).tolist()
            ranked = sorted(range(len(pool)), key=lambda i: (-fitness[i], i))
            kept = [pool[i] for i in ranked[:int(cfg.keep)]]
            scored = [(pool[i], fitness[i]) for i in ranked]
            chosen = set(ranked[:int(cfg.interactions)]) if cycle == cycles else set(ranked[:int(cfg.keep)])
            for i, key in enumerate(keys):
                self.search_rows.append({"step": 2, "cycle": cycle, "candidate": key, "valid_auc": aucs[i].item(),
                                         "finetune_valid_auc": math.nan, "kept": i in chosen})
        final = [p for p, _ in scored[:int(cfg.interactions)]]
        return final, {k: v.detach().clone() for k, v in supernet.state_dict().items()}

    def _step3(self, loop: OfflineLoop, valid: OfflineBatch, blocks: tuple[tuple[str, str, str], ...] | None,
               interactions: list[tuple[int, ...]], step1_state: dict[str, torch.Tensor]
               ) -> tuple[NetSpec, dict[str, torch.Tensor]]:
        """Step 3: the MLP over sliced K₀ × K₀ layers with the chosen blocks and interactions and the SE."""
        cfg = self.ctx.cfg
        layers = int(cfg.mlp_layers)
        space = mlp_space([float(r) for r in cfg.width_ratios], layers, [str(a) for a in cfg.mlp_activations])
        spec, k0 = self.sliced_mlp_spec(blocks, interactions)
        supernet = self.new_net(spec)
        inherit_leading(supernet, {k: v for k, v in step1_state.items() if not k.startswith(("mlp.", "out."))})
        rng = self._rng(4)
        strict = str(cfg.fairness) == "strict"

        def to_choice(arch: Architecture) -> Choice:
            hidden, acts = self._mlp_choice(arch, k0, space)
            return Choice(spec.default.blocks, hidden, acts)

        def children() -> list[Choice]:
            drawn = sample_fair(space, "activation", rng) if strict else space.sample_uniform(1, rng)
            return [to_choice(ArchSpace.select(drawn, i)) for i in range(ArchSpace.count(drawn))]

        epochs = int(cfg.step_epochs)
        self._train_children(loop, supernet, children, Choice(spec.default.blocks, tuple([k0] * layers),
                                                              tuple(["relu"] * layers)),
                             epochs, CosineLR(float(cfg.lr), epochs * self._steps_per_epoch(loop), bool(cfg.cosine)))
        choices = [to_choice(a) for a in space.enumerate()]
        aucs = self._score(supernet, valid, choices)
        best = self._best_of(loop, 3, supernet, choices, aucs,
                             lambda c: json.dumps({"hidden": list(c.hidden), "activations": list(c.activations)}), 30)
        return child_spec(spec, best), {k: v.detach().clone() for k, v in supernet.state_dict().items()}

    def joint_space(self, slots: int | None = None) -> JointSpace:
        """The joint space (:class:`JointSpace`) of this data: ``interactions`` slots (``slots``: that many) of
        orders 2..``joint_max_order`` (null: ``cycles`` + 1, the highest order Step 2's evolution reaches)."""
        cfg = self.ctx.cfg
        max_order = int(cfg.joint_max_order) if cfg.joint_max_order is not None else int(cfg.cycles) + 1
        return JointSpace(self.blocks_space, bool(self.sequences), len(self.field_names),
                          int(cfg.interactions) if slots is None else slots, max_order,
                          mlp_space([float(r) for r in cfg.width_ratios], int(cfg.mlp_layers),
                                    [str(a) for a in cfg.mlp_activations]))

    def _joint_choice(self, draw: JointDraw, space: JointSpace, k0: int) -> Choice:
        hidden, acts = self._mlp_choice(draw.mlp, k0, space.mlp)
        return Choice(self._blocks(draw.blocks) if self.sequences else (), hidden, acts, draw.interactions)

    def random_architecture(self, generator: torch.Generator) -> dict[str, Any]:
        """A uniformly random architecture of the joint space (``architecture.json``'s form, AMEIR-C's structure;
        Table 4's "Random" and the validation's null): :meth:`JointSpace.sample`, the interactions sorted."""
        space = self.joint_space()
        draw = space.sample(generator)[0]
        spec = self.net_spec(blocks=self._blocks(draw.blocks) if self.sequences else None,
                             interactions=sorted(draw.interactions), mode="mlp+se", hidden=[1], activations=["relu"])
        choice = self._joint_choice(draw, space, self.new_net(spec).in_dim)
        spec.default = Choice(spec.default.blocks, choice.hidden, choice.activations)
        return {**self.describe(spec), "variant": "C"}

    def joint_slots(self) -> int:
        """M, or 0 where ``interaction_mode`` is ``none`` (p^b goes nowhere: no interactions to search)."""
        return int(self.ctx.cfg.interactions) if self.interaction_mode != "none" else 0

    def joint_epochs(self) -> int:
        """One-shot epochs of the joint search: ``joint_epochs``, or (null) the sum of the progressive search's
        on this data (Step 1 with histories, Step 2's cycles with interactions, Step 3)."""
        cfg = self.ctx.cfg
        if cfg.joint_epochs is not None:
            return int(cfg.joint_epochs)
        step2 = int(cfg.cycles) * int(cfg.cycle_epochs) if self.interaction_mode != "none" else 0
        return (int(cfg.step_epochs) if self.sequences else 0) + step2 + int(cfg.step_epochs)

    def sliced_mlp_spec(self, blocks: Sequence[tuple[str, str, str]] | None, interactions: Sequence[tuple[int, ...]],
                        supernet_blocks: bool = False) -> tuple[NetSpec, int]:
        """A one-shot model whose MLP layers are allocated K₀ × K₀ with a Dice per width (Step 3's; the joint
        search's with ``supernet_blocks``: every block op held, ``interactions`` filling the slots on the default
        path), and K₀."""
        cfg = self.ctx.cfg
        layers = int(cfg.mlp_layers)
        probe = self.net_spec(blocks=blocks, interactions=interactions, mode=self.interaction_mode,
                              hidden=[1] * layers, activations=["identity"] * layers)
        k0 = self.new_net(probe).in_dim
        widths = sorted(set(mlp_widths([float(r) for r in cfg.width_ratios], k0)))
        dice = [widths if "dice" in cfg.mlp_activations else [] for _ in range(layers)]
        return self.net_spec(blocks=blocks, interactions=interactions, mode=self.interaction_mode,
                             hidden=[k0] * layers, activations=["relu"] * layers, dice_widths=dice,
                             supernet_blocks=supernet_blocks), k0

    def _joint(self, loop: OfflineLoop, valid: OfflineBatch) -> tuple[NetSpec, dict[str, torch.Tensor]]:
        """One-shot random search over the joint space (Table 4's baseline; Li & Talwalkar, 2019): one supernet
        holding every block op, M interaction slots (one weight per slot, whatever interaction fills it) and
        K₀ × K₀ MLP layers; trained :meth:`joint_epochs` epochs on uniformly drawn children (``joint_fairness``:
        one per batch, or strict fairness over the blocks' Layer — the MLP's activations without histories); then
        ``children`` uniform children scored with inherited weights, the ``top`` fine-tuned, the best derived."""
        cfg = self.ctx.cfg
        space = self.joint_space(self.joint_slots())
        first = space.sample(self._rng(5))[0]  # the default path (the one the fit stage's monitor predicts with)
        spec, k0 = self.sliced_mlp_spec(self._blocks(first.blocks) if self.sequences else None, first.interactions,
                                        supernet_blocks=True)
        supernet = self.new_net(spec)
        rng = self._rng(6)
        fair = None if str(cfg.joint_fairness) != "strict" else "layer" if self.sequences else "activation"

        def children() -> list[Choice]:
            return [self._joint_choice(d, space, k0) for d in space.sample(rng, fair=fair)]

        epochs = self.joint_epochs()
        self._train_children(loop, supernet, children, self._joint_choice(first, space, k0), epochs,
                             CosineLR(float(cfg.lr), epochs * self._steps_per_epoch(loop), bool(cfg.cosine)))
        choices = [self._joint_choice(d, space, k0) for d in space.sample(self._rng(7), int(cfg.children))]
        aucs = self._score(supernet, valid, choices)
        names = self.field_names
        best = self._best_of(loop, "joint", supernet, choices, aucs, lambda c: json.dumps(
            {"blocks": [list(b) for b in c.blocks], "interactions": [[names[f] for f in i] for i in c.interactions or ()],
             "hidden": list(c.hidden), "activations": list(c.activations)}), 50)
        return child_spec(spec, best), {k: v.detach().clone() for k, v in supernet.state_dict().items()}

    # ------------------------------------------------------------ re-train (derive)

    def build(self, architecture: dict[str, Any] | None) -> None:
        if architecture is None:
            raise RuntimeError("AMEIR builds from its search result")
        self.model = self.new_net(self.spec_from(architecture))
        if self.one_shot is not None and str(self.ctx.cfg.retrain_from) == "one_shot":
            inherit_leading(self.model, self.one_shot)
        self.optimizer = self.adam(self.model, float(self.ctx.cfg.lr))
        device = self.ctx.device
        x = torch.zeros((COST_ROWS, len(self.field_names)), dtype=torch.int32, device=device)
        seq = {s.name: torch.zeros((COST_ROWS, int(s.length or 1)), dtype=torch.int32, device=device)
               for s in self.sequences}
        seq_len = torch.full((COST_ROWS,), max([int(s.length or 1) for s in self.sequences] or [1]),
                             dtype=torch.int32, device=device)
        model = self.model
        self.cost = arch_cost(model, x, lambda rows: model(rows, seq, seq_len))

    def module(self) -> AMEIRNet:  # type: ignore[override]
        assert self.model is not None, "build() first"
        return self.model

    def memory(self) -> MemoryReport:
        model = self.module()
        tables = embedding_tables(model)
        return MemoryReport(
            embedding_bytes=sum(tensor_bytes(t) for t in tables),
            embedding_optimizer_bytes=self.optimizer.state_bytes(tables) if self.optimizer else 0,
            parameters=sum(p.numel() for p in model.parameters()),
            embedding_parameters=sum(t.numel() for t in tables),
            dims={f: {str(self.dim): c} for f, c in zip(self.field_names, self.cardinalities)},
        )

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """``search.parquet``: every scored child of every step (Step 2: every candidate of every cycle) with its
        validation-subset AUC (inherited weights), the fine-tuned AUC of the top ones, and whether it was kept."""
        return {"search": self.search_rows} if self.search_rows else {}
