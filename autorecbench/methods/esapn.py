"""ESAPN: embedding size adjustment policy network (Liu et al., SIGIR 2020, §2.3-2.4, Algorithm 1).

Hard selection: every user and item holds one embedding, at its current size only, in a
:class:`~autorecbench.models.embedding.MixedDimEmbedding` (per-size tables, slots allocated on demand).

Model (§2.2): the embedding e of size d_k is mapped up the chain of adjacent linear maps of Eq. 1
(``W_{k->k+1} e + b``, separate maps for users and items, :class:`ChainedMaps`) to d_n; with the default
``norm_scope: per_size`` it is batch-normalised with the statistics of its size and squashed by tanh (below),
then it enters the rating model (batch-norm + tanh, MLP 512, sigmoid/MSE Eq. 3 or softmax/CE Eq. 4).

Policy (§2.3, :class:`StateMLP`): one network for users, one for items. State s = (f, e) (§2.3.2): the
row's frequency (its occurrence number at that row, counting the row) mapped to an embedding + batch-norm,
⊕ the one-hot current size → Linear(·, 512) → batch-norm → tanh → Linear(512, 2) → softmax over
{unchange, enlarge} (§2.3.3). Enlarging moves size d_k to d_{k+1}; entities at d_n cannot enlarge (the
official code masks that action). An enlarged embedding is initialised from the old one through the learned
map, e_{k+1} = W_{k->k+1} e_k + b_{k->k+1} (§2.3.3), and the old one is freed.

Reward (Eq. 2, :class:`LossQueue`): per entity, a FIFO of its last T=5 training losses;
R = (mean of the FIFO) − L, with L the loss of the validation row under the sampled sizes.

One ``learn`` call is one iteration of Algorithm 1:
- lines 2-6, :meth:`Esapn.policy_step`: take the validation batch V from history, sample an action per row
  from π(·|s), adjust the sizes temporarily (nothing is written), compute L and R, and update both policies
  by REINFORCE (Eq. 6 with one sample per state, the loss −R log π(a|s); Eq. 7 via Adam, ``search_lr`` 1e-4);
- lines 7-9, :meth:`Esapn.select_sizes`: for the current batch take the argmax action and enlarge for good;
- line 10, :meth:`Esapn.train_model`: one Adam step (``lr`` 1e-3) of the rating model, the maps and the
  embeddings on the current batch; the batch's per-row losses enter the FIFOs.

Batch-norm scope (``norm_scope``), and why ``per_size`` is the default. Write u = chain_k(e) for the unified
embedding of an entity at size k (Eq. 1 from k up to n). Enlarging initialises e' = W_{k->k+1} e + b_{k->k+1}
(§2.3.3), and chain_{k+1}(e') = chain_k(e) = u: **the unified embedding is the same under both actions.**
- ``selected`` (one batch-norm + tanh over every row's unified embedding, whatever its size — the rating
  model's, and the only one): the rating model's input, hence L and R of Eq. 2, is then the same under
  "enlarge" and "unchange", R(a|s) = R(s), and Eq. 6's gradient Σ_a R(a|s) ∇π(a|s) = R(s) ∇ Σ_a π(a|s) = 0: its
  one-sample estimate has mean zero and the policy follows noise. The paper's text (§2.2: "batch
  normalization with Tanh ... on the transformed embeddings") allows this reading; the released code does not
  do it.
- ``per_size`` (the official code, ``RS_MLP.forward``: each size's block is batch-normalised on its own, then
  tanh, then the one-hot size picks the row's block): a row at size k becomes tanh(γ (u − μ_k)/σ_k + β) and,
  enlarged, tanh(γ (u − μ_{k+1})/σ_{k+1} + β). The same u lands elsewhere whenever sizes k and k+1 have
  different statistics (they hold entities with different training histories), so L and R depend on the
  action and Eq. 6's expected gradient is π(1|s) π(0|s) (R(1|s) − R(0|s)) ∇(z_1 − z_0) (z the two logits):
  nonzero exactly where the action changes the loss. μ_k, σ_k are taken over the batch's rows at size k
  (:class:`~autorecbench.models.norm.SizeNorm`); the official code, whose every entity has a row in every
  size's table, takes them over all the batch's rows of size k's table (mostly stale rows of entities at other
  sizes) — a mixed-dimension store holds no such rows. The rating model's own batch-norm + tanh follows, as
  for DARTS and AutoEmb (:mod:`autorecbench.methods.darts`).
Every run records ``policy_action_sensitivity`` in ``metrics.parquet`` (split ``search``): the mean over the
validation rows that can enlarge of |L(enlarge) − L(unchange)|, one field's rows enlarged at a time, measured
every ``sensitivity_every`` policy steps. With ``selected`` it is exactly 0 (the temporary adjustment does not
recompute the unified embedding, which Eq. 1 leaves unchanged). ``policy_enlarge_share`` is the share of
lines 8-9's decisions (rows below the top size) that said "enlarge".

``predict`` applies lines 8-9's argmax enlargement temporarily (it changes a row's size group, and so its
normalisation, under ``per_size``), as the official code enlarges first and then predicts. The streaming
runner's test-then-train step (``predict_and_learn``) with ``model.batch_norm=batch`` takes the predictions
from line 10's forward pass, like the official code: one pass of the rating model per batch for both.

Deviations from the paper and the official code, each with the switch that undoes it:
- ``norm_scope: per_size`` statistics come from the batch's rows at each size, not from all rows of each
  size's table (above; no switch: the store keeps no stale rows); ``selected`` is the other reading of §2.2.
- ``norm_affine: shared`` (one γ, β for all sizes, the official code's single ``BatchNorm1d``); ``per_size``:
  one per size.
- ``frequency_cap: 1000``: frequencies above share the last frequency-embedding row (the official code has no
  cap: set the cap above the stream's largest frequency to undo it).
- ``frequency_restart: false``: the state's frequency counts the whole stream. The official code computes
  frequencies separately on its training and test rows, so they restart at 1 at the first test row:
  ``true`` restarts them at the first row of the runner's evaluation window.
- ``reward_queue: rows``: every training row's loss enters its entity's FIFO (Eq. 2: "the latest T prediction
  losses"). The official code keeps one loss per entity per batch (its last row's; numpy's fancy assignment)
  and counts batches, not rows: ``batches``.
- ``top_size: skip``: rows whose entity is at the top size take no decision and are left out of the policy
  loss. The official code samples for them too, forces the action to "unchange" and keeps the term −R log
  π(unchange|s): ``unchange``.
- ``model.loss_reduction: mean`` (Eq. 3/4's 1/N, and Eq. 6's 1/N for the policy loss); the official code sums:
  ``sum``.
- ``model.head: paper`` (§2.2); ``official`` adds the official code's batch-norm in the hidden layer.
- ``embedding_optimizer: lazy`` updates the moments and values of the slots a batch touches (see
  :mod:`autorecbench.models.embedding`); ``dense`` is Adam over every stored slot at every step, as the
  official code's plain Adam (which also steps the rows of sizes an entity does not hold: it stores every size).
- Not reproduced: the official policy step leaves its sampled enlargements in the tables (``temp_emb_user``
  keeps a reference, so the "restore" restores nothing); its ``Reward_Base`` default crashes (``ave_loss``,
  Eq. 2, is the one that runs).

Choices the paper leaves open, as config values (``conf/method/esapn.yaml``), defaults from the official code:
- ``initial_size: 2``: every entity starts at the smallest size and grows at most one step per batch it
  appears in (if any of its rows in the batch selects "enlarge").
- ``frequency_encoding: exact``, ``frequency_dim: 32``: one embedding row per frequency (up to the cap);
  ``log2`` for power-of-two buckets.
- ``validation: last_batch`` (or ``history``), see :mod:`autorecbench.methods.sizesearch`.
- ``short_history: mean``: an entity with fewer than T past losses is rewarded against the mean of those it
  has (the official ``ave_loss`` baseline); ``skip`` gives such rows no policy gradient. Validation rows
  always have at least one past loss, since they were trained on.
- The policy networks run once per distinct state of a batch (:class:`PolicyStates`, exact: batch-norm weighs
  each state by its row count), not once per row as the official code does.
- ``init_std: 1.0``: initial embeddings N(0, 1), as PyTorch's and the official code's tables.
- The rating model, maps and policies step with :class:`~autorecbench.train.optim.FlatAdam`: gradients are zeroed,
  not set to None, between steps (the official code's PyTorch 1.x ``zero_grad()``), so a map that no entity
  of a batch passes through still takes a step on its momentum.
- Line 5's loss is computed on the rows that take a decision in some field; batch-norm statistics of the
  rating model still come from every row of the validation batch (the layers after them are per row).
- ``capacity_growth: 2.0``, ``min_capacity: 64``: how the per-size tables grow.
- ``sensitivity_every: 10``: how often ``policy_action_sensitivity`` is measured (0: never; it costs three
  forward passes of the rating model without gradients).
- Batch-norm layers follow ``model.batch_norm``: with ``batch`` they use the batch's statistics (the official
  code); with ``running`` the reward and argmax passes use running statistics and leave them unchanged.
- ``static_shapes: auto`` (CUDA: true, CPU: false; :func:`~autorecbench.methods.base.static_shapes`), below.
- ``capacity_headroom: 8``: with the static step, a size table short of room for this many batches of new slots
  grows (geometrically, ``capacity_growth``) between steps.

The static-shape step (``static_shapes: true``): the same algorithm with every per-batch tensor shaped by the
batch size and nothing read back to the host, so the step can be compiled with ``fullgraph=True`` (proven in
``tests/test_static_step.py``) or captured in a CUDA graph. :meth:`Esapn.predict_and_learn` is then
:meth:`Esapn.prepare_step` (host, between steps: the validation rows, line 3's uniforms from the same CPU
generator in the same order, whether this policy step measures the sensitivity, and table growth) followed by
:meth:`Esapn.static_step` (the device part). What changes:
- the store is a :class:`~autorecbench.models.embedding.StaticMixedDimEmbedding`: per-row reads (a gather per
  size, rows at other sizes read a zero sink slot), the unified embedding level by level
  (``where(size == k, e_k, W h)``, :meth:`~autorecbench.models.embedding.ChainedMaps.rows`), slots handed out from
  device free lists by a cumulative sum, Adam per row with duplicate rows summed per entity, and growth decided
  on the host from a worst-case bound (the device's counters are read only when that bound passes a capacity:
  at most once per ``capacity_headroom`` steps);
- the policy runs once per row (as the official code), not per distinct state; decisions are masks, line 5's
  loss is computed on every row, and the policy's Adam step is skipped on the device (parameters, moments and
  step count kept) where the default step takes none (no row with a term);
- the reward FIFOs write through one fixed-length scatter with a sink row.
The two steps compute the same function: one step from the same state gives the same gradients up to float
rounding (< 1e-7). Over a stream the metrics differ by ~1e-4 with ``norm_scope: per_size`` (~1e-5 with
``selected``): the maps' biases feed a per-size batch-norm, so their exact gradients are zero and what each step
computes for them is rounding noise, which Adam scales to steps of up to ~lr; the noise differs between the two
summation orders (per row vs per distinct entity), and the model's trajectory follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from autorecbench.data.stream import BatchGroups, StreamBatch, StreamHistory, batch_groups, within_batch_rank
from autorecbench.errors import UserError
from autorecbench.methods.base import MemoryReport, MethodContext, register_method, set_training, static_shapes
from autorecbench.methods.sizesearch import FIELDS, SizeSearchMethod, last_rows
from autorecbench.models.activations import tanh
from autorecbench.models.controller import FrequencyEncoder, StateMLP
from autorecbench.models.embedding import ChainedMaps, Lookup, MixedDimEmbedding, RowLookup, StaticMixedDimEmbedding
from autorecbench.models.norm import NORM_AFFINE, SizeNorm
from autorecbench.models.rating import output_probabilities, per_example_loss
from autorecbench.train.optim import flat_adam, tensor_bytes

SHORT_HISTORY = ("mean", "skip")
NORM_SCOPES = ("per_size", "selected")
REWARD_QUEUES = ("rows", "batches")
TOP_SIZE_ROWS = ("skip", "unchange")
UNCHANGE, ENLARGE = 0, 1


class LossQueue:
    """Per-entity FIFO of the last T losses (Eq. 2) as a ring buffer ``[n, T]`` and a push count ``[n]``.

    ``push`` takes rows in stream order (an entity may have several in a batch); only each entity's last T
    rows of the batch can survive, and each goes to slot ``(pushes before + rank in batch) mod T``. With
    ``per_batch`` (the official code) only each entity's last row of the batch is pushed. With ``sink`` (the
    static-shape step) the buffer has one more row, ``n``, where the rows that do not survive write, so a push
    is one scatter of fixed length (the same values land in the same places).
    """

    def __init__(self, n: int, window: int, device: torch.device, per_batch: bool = False, sink: bool = False) -> None:
        self.window = window
        self.per_batch = per_batch
        self.sink = n if sink else None
        self.losses = torch.zeros(n + int(sink), window, device=device)
        self.count = torch.zeros(n + int(sink), dtype=torch.int64, device=device)

    def push(self, ids: torch.Tensor, losses: torch.Tensor, groups: BatchGroups | None = None) -> None:
        """``groups``: :func:`~autorecbench.data.stream.batch_groups` of ``ids`` (the static push computes it
        otherwise)."""
        if self.sink is not None:
            self._push_static(ids, losses, groups or batch_groups(ids))
            return
        if self.per_batch:
            last = last_rows(ids)
            ids, losses = ids[last], losses[last]
        rank, in_batch = within_batch_rank(ids)
        keep = rank >= in_batch - self.window
        slot = (self.count[ids] + rank) % self.window
        self.losses[ids[keep], slot[keep]] = losses[keep].detach().to(self.losses.dtype)
        self.count.index_add_(0, ids, torch.ones_like(ids))

    def _push_static(self, ids: torch.Tensor, losses: torch.Tensor, groups: BatchGroups) -> None:
        if self.per_batch:  # each entity's last row only, as its only push of the batch
            keep = groups.last
            rank, pushes = torch.zeros_like(ids), keep.to(torch.int64)
        else:
            rank, pushes = groups.rank, torch.ones_like(ids)
            keep = rank >= groups.count - self.window
        slot = (self.count.index_select(0, ids) + rank) % self.window
        cell = torch.where(keep, ids, self.sink) * self.window + slot
        self.losses.view(-1).index_copy_(0, cell, torch.where(keep, losses.detach().to(self.losses.dtype), 0.0))
        self.count.index_add_(0, ids, pushes)

    def mean(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of each id's last min(count, T) losses, and that number (0: no loss yet, mean 0)."""
        have = self.count[ids].clamp(max=self.window)
        return self.losses.index_select(0, ids).sum(dim=1) / have.clamp_min(1), have

    def nbytes(self) -> int:
        return tensor_bytes(self.losses) + tensor_bytes(self.count)


@dataclass
class PolicyStates:
    """The distinct states s = (frequency, current size) of a batch's rows (§2.3.2): the policy runs once per
    distinct state, with its row count weighing the batch-norm statistics, so every row gets exactly the
    output it would get on its own row (:func:`autorecbench.models.norm.batch_norm`). A batch of 500 rows
    holds ~160 distinct states."""

    freq_index: torch.Tensor  # [states] frequency-embedding rows
    size_index: torch.Tensor  # [states]
    counts: torch.Tensor  # [states] rows per state
    inverse: torch.Tensor  # [rows] each row's state
    one_hot: torch.Tensor  # [states, sizes] float

    @classmethod
    def of(cls, policy: StateMLP, freq: torch.Tensor, size_index: torch.Tensor, n_sizes: int) -> PolicyStates:
        key = policy.encoder.index(freq) * n_sizes + size_index
        distinct, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
        state_size = distinct % n_sizes
        one_hot = torch.zeros(len(distinct), n_sizes, device=key.device)
        one_hot.scatter_(1, state_size[:, None], 1.0)
        return cls(torch.div(distinct, n_sizes, rounding_mode="floor"), state_size, counts, inverse, one_hot)

    def logits(self, policy: StateMLP) -> torch.Tensor:
        """``[states, 2]``: the policy's logits over {unchange, enlarge} per distinct state."""
        return policy.from_index(self.freq_index, self.one_hot, counts=self.counts)


@dataclass
class FieldRows:
    """One field's rows of a batch as the rating model sees them: the unified embeddings ``[rows, d_n]`` and
    the size group each row is normalised in."""

    unified: torch.Tensor
    size_index: torch.Tensor


@dataclass
class StepInputs:
    """What the host prepares for one static step (:meth:`Esapn.prepare_step`): the validation batch (None
    before anything was trained), line 3's uniforms ``[fields, rows]`` and whether this policy step measures
    ``policy_action_sensitivity``."""

    valid: StreamBatch | None
    uniforms: torch.Tensor | None
    measure: bool


def one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    """``[rows, n]`` float one-hot of ``index`` (a scatter: ``F.one_hot`` checks its range on the host)."""
    return torch.zeros(index.shape[0], n, device=index.device).scatter_(1, index[:, None], 1.0)


@register_method
class Esapn(SizeSearchMethod):
    name = "esapn"
    description = "Hard embedding-size selection by REINFORCE policy networks, mixed-dimension storage"
    paper = "Liu et al., SIGIR 2020, §2, Algorithm 1"
    fidelity = "faithful, deviations documented"
    deviations = ("per-size batch-norm from the batch's rows at each size (official: all rows of each table); lazy "
                  "Adam; frequency cap 1000, no restart at the evaluation window; every row's loss in the reward "
                  "FIFO; top-size rows out of the policy loss; mean reduction; the paper's head")

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        self.initial_index = self.sizes.index(int(cfg.initial_size))
        self.window = int(cfg.reward_window)
        self.short_history = str(cfg.short_history)
        self.top_size = str(cfg.top_size)
        self.frequency_restart = bool(cfg.frequency_restart)
        self.sensitivity_every = int(cfg.sensitivity_every)
        self.stores: dict[str, MixedDimEmbedding] = {}
        self.maps = torch.nn.ModuleDict()
        self.policies = torch.nn.ModuleDict()
        self.size_norms = torch.nn.ModuleDict()  # empty with norm_scope=selected
        self.queues: dict[str, LossQueue] = {}
        # The static-shape step (method.static_shapes): per-row reads and writes, nothing read back to the host.
        self.static = static_shapes(cfg, ctx.device)
        store_class, extra = ((StaticMixedDimEmbedding, {"headroom": int(cfg.get("capacity_headroom", 8))})
                              if self.static else (MixedDimEmbedding, {}))
        for stream, field in enumerate(FIELDS):
            self.stores[field] = store_class(
                self.n_entities[field], self.sizes, init_std=float(cfg.init_std), seed=ctx.seed, stream=stream,
                device=ctx.device, mode=str(cfg.embedding_optimizer), lr=float(cfg.lr),
                initial_size=self.initial_index, growth=float(cfg.capacity_growth),
                min_capacity=int(cfg.min_capacity), **extra,
            )
            self.maps[field] = ChainedMaps(self.sizes)
            if str(cfg.norm_scope) == "per_size":
                self.size_norms[field] = SizeNorm(len(self.sizes), self.sizes[-1], self.batch_norm,
                                                  str(cfg.norm_affine))
            encoder = FrequencyEncoder(str(cfg.frequency_encoding), int(cfg.frequency_cap), int(cfg.frequency_dim),
                                       self.batch_norm)
            self.policies[field] = StateMLP(encoder, len(self.sizes), int(cfg.hidden), 2, self.batch_norm)
            self.queues[field] = LossQueue(self.n_entities[field], self.window, ctx.device,
                                           per_batch=str(cfg.reward_queue) == "batches", sink=self.static)
        for module in (self.model, self.maps, self.size_norms, self.policies):
            module.to(ctx.device)
        self.model_optimizer = flat_adam(
            [*self.model.parameters(), *self.maps.parameters(), *self.size_norms.parameters()], float(cfg.lr))
        self.policy_optimizer = flat_adam(self.policies.parameters(), float(cfg.search_lr))
        # Per field: occurrences before the evaluation window (frequency_restart), set at the first learn call.
        self.before_window: dict[str, torch.Tensor] | None = None
        self.window_start = 0
        self.policy_steps = 0
        self.sensitivity_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.sensitivity_rows = torch.zeros((), dtype=torch.int64, device=ctx.device)
        # Lines 8-9: rows below the top size, and how many of them the argmax told to enlarge.
        self.decisions = torch.zeros(2, dtype=torch.int64, device=ctx.device)

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        if int(cfg.initial_size) not in [int(d) for d in cfg.sizes]:
            raise UserError(f"method.initial_size must be one of method.sizes, got {cfg.initial_size}")
        if int(cfg.reward_window) < 1:
            raise UserError(f"method.reward_window must be >= 1, got {cfg.reward_window}")
        if float(cfg.capacity_growth) <= 1 or int(cfg.min_capacity) < 1:
            raise UserError("method.capacity_growth must be > 1 and method.min_capacity >= 1")
        if int(cfg.get("capacity_headroom", 8)) < 1:
            raise UserError(f"method.capacity_headroom must be >= 1, got {cfg.capacity_headroom}")
        for key, allowed in (("short_history", SHORT_HISTORY), ("norm_scope", NORM_SCOPES),
                             ("norm_affine", NORM_AFFINE), ("reward_queue", REWARD_QUEUES),
                             ("top_size", TOP_SIZE_ROWS)):
            if str(cfg[key]) not in allowed:
                raise UserError(f"method.{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
        if not isinstance(cfg.frequency_restart, bool):
            raise UserError(f"method.frequency_restart must be true or false, got {cfg.frequency_restart!r}")
        if int(cfg.sensitivity_every) < 0:
            raise UserError(f"method.sensitivity_every must be >= 0, got {cfg.sensitivity_every}")

    # ------------------------------------------------------------------ pieces

    def _states(self, field: str, freq: torch.Tensor, size_index: torch.Tensor) -> PolicyStates:
        return PolicyStates.of(self.policies[field], freq, size_index, len(self.sizes))

    def _policy_frequency(self, batch: StreamBatch, field: str) -> torch.Tensor:
        """The frequency in the policy's state: the stream's, or (``frequency_restart``) counted from the first
        row of the evaluation window on, for rows in it."""
        ids, freq = self._ids(batch, field)
        if self.before_window is None:
            return freq
        in_window = batch.positions() >= self.window_start
        return torch.where(in_window, freq - self.before_window[field].index_select(0, ids), freq)

    def _start_restart(self, history: StreamHistory) -> None:
        if self.before_window is not None or not self.frequency_restart or history.eval_start is None:
            return
        self.window_start = int(history.eval_start)
        stream = history.stream
        self.before_window = {
            f: torch.bincount(ids[: self.window_start], minlength=self.n_entities[f])
            for f, ids in (("user", stream.user), ("item", stream.item))
        }

    def _embedded(self, field: str, rows: FieldRows) -> torch.Tensor:
        """A field's input to the rating model: with ``per_size`` each row's unified embedding normalised among
        the rows of its size group, then tanh; with ``selected`` the unified embedding itself (the rating
        model's batch-norm + tanh is then the only one)."""
        if field not in self.size_norms:
            return rows.unified
        return tanh(self.size_norms[field](rows.unified, rows.size_index))

    def _logits(self, fields: dict[str, FieldRows], rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.model([self._embedded(f, fields[f]) for f in FIELDS], rows=rows)

    def _lookup(self, field: str, ids: torch.Tensor, maybe_unstored: bool = False) -> Lookup | RowLookup:
        """The rows of ``ids``: one entry per distinct entity (default step), or per row (static step;
        ``maybe_unstored``: entities never stored read their initial values, as the default lookup's do)."""
        store = self.stores[field]
        if isinstance(store, StaticMixedDimEmbedding):
            return store.rows(ids, maybe_unstored)
        return store.lookup(ids, distinct=True)

    def _rows(self, field: str, lookup: Lookup | RowLookup, size_index: torch.Tensor | None = None) -> FieldRows:
        """``lookup``'s rows, normalised in their own size group or in ``size_index``'s (a temporary size: by
        Eq. 1 an enlargement through W leaves the unified embedding as it is, only its group changes)."""
        maps = self.maps[field]
        unified = maps.rows(lookup) if isinstance(lookup, RowLookup) else maps(lookup)
        return FieldRows(unified, lookup.size_index if size_index is None else size_index)

    def enlarges(self, field: str, batch: StreamBatch, size_index: torch.Tensor) -> torch.Tensor:
        """Lines 8-9's decision per row: whether the row's policy state says "enlarge" (argmax) and its entity
        is below the top size. The static step runs the policy on every row, the default on distinct states."""
        if self.static:
            logits = self._row_logits(field, batch, size_index, training=False)
        else:
            states = self._states(field, self._policy_frequency(batch, field), size_index)
            logits = states.logits(set_training(self.policies[field], False)).index_select(0, states.inverse)
        return (logits[:, ENLARGE] > logits[:, UNCHANGE]) & (size_index < len(self.sizes) - 1)

    def _row_logits(self, field: str, batch: StreamBatch, size_index: torch.Tensor, training: bool) -> torch.Tensor:
        """The policy's logits ``[rows, 2]``, one evaluation per row (the static step; the official code's way)."""
        policy = set_training(self.policies[field], training)
        return policy(self._policy_frequency(batch, field), one_hot(size_index, len(self.sizes)))

    def _entity_enlarges(self, lookup: Lookup | RowLookup, ids: torch.Tensor, says: torch.Tensor) -> torch.Tensor:
        """Per row, whether any row of its entity ``says`` enlarge (int64 0/1)."""
        if isinstance(lookup, RowLookup):
            return (batch_groups(ids).per_group_sum(says.to(torch.int64)) > 0).to(torch.int64)
        entry_enlarges = torch.zeros(sum(lookup.counts), dtype=torch.int64, device=says.device)
        entry_enlarges.index_add_(0, lookup.entry_of_row, says.to(torch.int64))
        return (entry_enlarges > 0).to(torch.int64).index_select(0, lookup.entry_of_row)

    def predict(self, batch: StreamBatch) -> torch.Tensor:
        set_training(self.model, False)
        set_training(self.size_norms, False)
        fields = {}
        for field in FIELDS:
            ids = self._ids(batch, field)[0]
            lookup = self._lookup(field, ids, maybe_unstored=True)
            size_index = None
            if field in self.size_norms:  # lines 8-9 applied temporarily: an entity enlarges if any row says so
                says = self.enlarges(field, batch, lookup.size_index)
                size_index = lookup.size_index + self._entity_enlarges(lookup, ids, says)
            fields[field] = self._rows(field, lookup, size_index)
        return output_probabilities(self.ctx.task, self._logits(fields))

    def _row_losses(self, valid: StreamBatch, fields: dict[str, FieldRows],
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row losses of the validation batch (zero outside ``rows`` when given)."""
        logits = self._logits(fields, rows)
        if rows is None:
            return self.example_losses(logits, valid)
        loss = per_example_loss(self.ctx.task, logits, valid.label.index_select(0, rows))
        return logits.new_zeros(len(valid)).index_copy_(0, rows, loss)

    def policy_step(self, valid: StreamBatch) -> None:
        """Algorithm 1 lines 3-6 on the validation batch: sample, adjust temporarily, reward, REINFORCE."""
        top = len(self.sizes) - 1
        current, adjusted, picked, eligible = {}, {}, {}, {}
        for field in FIELDS:
            ids, _ = self._ids(valid, field)
            lookup = self.stores[field].lookup(ids, distinct=True)
            states = self._states(field, self._policy_frequency(valid, field), lookup.size_index)
            below = lookup.size_index < top
            # skip: only rows below the top size take a decision; unchange: every row, "unchange" at the top.
            rows = below.nonzero().squeeze(1) if self.top_size == "skip" else torch.arange(len(ids), device=ids.device)
            log_probs = torch.log_softmax(states.logits(set_training(self.policies[field], True)), dim=1)
            log_probs = log_probs.index_select(0, states.inverse[rows])
            with torch.no_grad():
                sampled = self.uniform(len(ids))[rows] < log_probs[:, ENLARGE].exp()  # line 3: a ~ π(·|s)
                sampled &= below[rows]
                action = torch.zeros_like(ids, dtype=torch.bool)
                action[rows] = sampled
                current[field] = self._rows(field, lookup)
                adjusted[field] = FieldRows(current[field].unified, lookup.size_index + action)  # line 4
            picked[field] = log_probs.gather(1, sampled.long()[:, None]).squeeze(1)
            eligible[field] = rows
        # Batch statistics in ``batch`` mode; running statistics used and left unchanged in ``running`` mode.
        set_training(self.model, False)
        set_training(self.size_norms, False)
        with torch.no_grad():
            # line 5: L under the sampled sizes, on the rows that took a decision in some field (all rows still
            # enter the batch-norm statistics; the layers after them are per row)
            decided = torch.zeros(len(valid), dtype=torch.bool, device=self.ctx.device)
            for rows in eligible.values():
                decided[rows] = True
            needed = None if bool(decided.all()) else decided.nonzero().squeeze(1)
            loss = self._row_losses(valid, adjusted, needed)
            if self._count_policy_step():
                self._measure_sensitivity(valid, current)
        objective = torch.zeros((), device=self.ctx.device)
        for field in FIELDS:
            ids, _ = self._ids(valid, field)
            rows = eligible[field]
            past, have = self.queues[field].mean(ids[rows])
            reward = past - loss[rows]  # Eq. 2
            keep = have > 0
            if self.short_history == "skip":
                keep &= have >= self.window
            # REINFORCE (Eq. 6, one sample per state): ascend R ∇ log π(a|s), i.e. descend −R log π(a|s).
            terms = -(reward * picked[field])[keep]
            if terms.numel():
                objective = objective + self.reduce(terms)
        self.policy_optimizer.zero_grad(set_to_none=True)
        if objective.requires_grad:
            objective.backward()
            self.policy_optimizer.step()  # Eq. 7 (Adam)

    def _count_policy_step(self) -> bool:
        """Count a policy step (on the host); whether it measures ``policy_action_sensitivity``."""
        self.policy_steps += 1
        return bool(self.sensitivity_every) and (self.policy_steps - 1) % self.sensitivity_every == 0

    def _policy_step_static(self, valid: StreamBatch, uniforms: torch.Tensor, measure: bool) -> None:
        """:meth:`policy_step` with static shapes: the policy on every row, the decisions as masks (rows that
        take none weigh zero), and the policy's Adam step taken on the device only where some row had a term."""
        top = len(self.sizes) - 1
        current, adjusted, picked, eligible = {}, {}, {}, {}
        for i, field in enumerate(FIELDS):
            lookup = self.stores[field].rows(self._ids(valid, field)[0])
            below = lookup.size_index < top
            log_probs = torch.log_softmax(self._row_logits(field, valid, lookup.size_index, training=True), dim=1)
            with torch.no_grad():
                sampled = (uniforms[i] < log_probs[:, ENLARGE].exp()) & below  # line 3: a ~ π(·|s)
                current[field] = self._rows(field, lookup)
                adjusted[field] = FieldRows(current[field].unified, lookup.size_index + sampled)  # line 4
            picked[field] = log_probs.gather(1, sampled.long()[:, None]).squeeze(1)
            eligible[field] = below if self.top_size == "skip" else torch.ones_like(below)
        set_training(self.model, False)
        set_training(self.size_norms, False)
        with torch.no_grad():
            loss = self._row_losses(valid, adjusted)  # line 5, every row
            if measure:
                self._measure_sensitivity(valid, current)
        objective = torch.zeros((), device=self.ctx.device)
        any_terms = torch.zeros((), dtype=torch.bool, device=self.ctx.device)
        least = self.window if self.short_history == "skip" else 1
        for field in FIELDS:
            past, have = self.queues[field].mean(self._ids(valid, field)[0])
            keep = eligible[field] & (have >= least)
            terms = torch.where(keep, -((past - loss) * picked[field]), 0.0)  # Eq. 2, Eq. 6
            kept = keep.sum()
            objective = objective + (terms.sum() / kept.clamp_min(1) if self.reduction == "mean" else terms.sum())
            any_terms |= kept > 0
        self.policy_optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.policy_optimizer.step(enabled=any_terms)  # Eq. 7 (Adam), skipped without terms as the default

    def _measure_sensitivity(self, valid: StreamBatch, current: dict[str, FieldRows]) -> None:
        """Accumulate |L(enlarge) − L(unchange)| over the validation rows below the top size, one field's rows
        enlarged at a time (no gradients; the tensors stay on the device)."""
        top = len(self.sizes) - 1
        unchanged = self._row_losses(valid, current)
        for field in FIELDS:
            below = current[field].size_index < top
            enlarged = {**current, field: FieldRows(current[field].unified, current[field].size_index + below)}
            diff = (self._row_losses(valid, enlarged) - unchanged).abs()
            below_sum = torch.where(below, diff, 0.0).sum() if self.static else diff[below].sum()
            self.sensitivity_sum += below_sum.to(torch.float64)
            self.sensitivity_rows += below.sum()

    @torch.no_grad()
    def select_sizes(self, batch: StreamBatch) -> None:
        """Algorithm 1 lines 8-9: argmax action per row; an entity enlarges (one step) if any of its rows
        says so, initialised through W (Eq. 1); its old slot is freed."""
        if self.static:
            self._select_sizes_static(batch)
            return
        for field in FIELDS:
            ids = self._ids(batch, field)[0]
            store = self.stores[field]
            store.ensure(ids)
            size_index = store.size_index(ids)
            says = self.enlarges(field, batch, size_index)
            self.decisions += torch.stack([(size_index < len(self.sizes) - 1).sum(), says.sum()])
            chosen = torch.unique(ids[says])
            if chosen.numel():
                self.enlarge(field, chosen)

    def _select_sizes_static(self, batch: StreamBatch) -> None:
        """:meth:`select_sizes` per row: new entities stored, every row's decision, each moving entity's new
        value W e + b computed on every row and written from its first row."""
        top = len(self.sizes) - 1
        for field in FIELDS:
            ids = self._ids(batch, field)[0]
            store, groups, maps = self.stores[field], batch_groups(ids), self.maps[field]
            assert isinstance(store, StaticMixedDimEmbedding)
            store.ensure_rows(ids, groups)
            lookup = store.rows(ids)
            says = self.enlarges(field, batch, lookup.size_index)
            self.decisions += torch.stack([(lookup.size_index < top).sum(), says.sum()])
            moves = groups.per_group_sum(says.to(torch.int64)) > 0
            store.move_rows_up(ids, groups, lookup, moves, [maps.step(k, lookup.values[k]) for k in range(top)])

    @torch.no_grad()
    def enlarge(self, field: str, ids: torch.Tensor) -> None:
        """Permanently move unique, stored ``ids`` one size up: e_{k+1} = W_{k->k+1} e_k + b (§2.3.3)."""
        store, maps = self.stores[field], self.maps[field]
        lookup = store.lookup(ids, distinct=True)
        new_values: list[torch.Tensor | None] = [None] * len(self.sizes)
        for k in range(len(self.sizes) - 1):
            if lookup.counts[k]:
                new_values[k + 1] = maps.step(k, lookup.values[k])
        store.move_up(lookup, new_values)

    def train_model(self, batch: StreamBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1 line 10: one step on the current batch (Eq. 3 or 4), then the losses enter the FIFOs.
        Returns the logits of its forward pass (before the step) and the loss."""
        set_training(self.model, True)
        set_training(self.size_norms, True)
        lookups, fields = {}, {}
        for field in FIELDS:
            lookup = self._lookup(field, self._ids(batch, field)[0])
            for v in lookup.values:
                v.requires_grad_(True)
            lookups[field] = lookup
            fields[field] = self._rows(field, lookup)
        logits = self._logits(fields)
        losses = self.example_losses(logits, batch)
        loss = self.reduce(losses)
        self.model_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.model_optimizer.step()
        for field in FIELDS:
            ids, freq = self._ids(batch, field)
            lookup, store = lookups[field], self.stores[field]
            grads = [v.grad for v in lookup.values]
            if isinstance(store, StaticMixedDimEmbedding):
                groups = batch_groups(ids)
                store.step_rows(groups, lookup, grads)
                self.queues[field].push(ids, losses, groups)
            else:
                store.apply_gradients(lookup, grads)
                self.queues[field].push(ids, losses)
            self.by_frequency[field].add(freq, one_hot(lookup.size_index, len(self.sizes)))
        self.count_rows(batch)
        return logits.detach(), loss.detach()

    def learn(self, batch: StreamBatch, history: StreamHistory) -> torch.Tensor:
        """One iteration of Algorithm 1."""
        if self.static:
            self._search_static(self.prepare_step(batch, history))
        else:
            self.search(batch, history)
        self.select_sizes(batch)
        return self.train_model(batch)[1]

    def search(self, batch: StreamBatch, history: StreamHistory) -> None:
        """Lines 2-6 (nothing before the first batch has been trained on)."""
        self._start_restart(history)
        valid = self.validation_batch(batch, history)
        if valid is not None:
            self.policy_step(valid)

    def predict_and_learn(self, batch: StreamBatch, history: StreamHistory) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Test then train in the official code's order: the policy step (from the history only), then the
        predictions for ``batch`` with lines 8-9's sizes, then lines 8-10. With ``model.batch_norm=batch`` the
        predictions come from line 10's forward pass (one pass of the rating model per batch, as the official
        code); otherwise from :meth:`predict` just before lines 8-10 (the same numbers, up to float rounding)."""
        if self.static:
            return self.static_step(batch, self.prepare_step(batch, history))
        self.search(batch, history)
        return self._test_then_train(batch)

    def prepare_step(self, batch: StreamBatch, history: StreamHistory) -> StepInputs:
        """The static step's host part, run between steps: the validation batch, line 3's uniforms (from the
        method's CPU generator, in the default step's order: the same draws), whether this policy step measures
        the sensitivity, and room in the stores for the step's worst case
        (:meth:`~autorecbench.models.embedding.StaticMixedDimEmbedding.make_room`, the only place a table grows)."""
        self._start_restart(history)
        valid = self.validation_batch(batch, history)
        uniforms, measure = None, False
        if valid is not None:
            uniforms = torch.stack([self.uniform(len(valid)) for _ in FIELDS])
            measure = self._count_policy_step()
        for store in self.stores.values():
            assert isinstance(store, StaticMixedDimEmbedding)
            store.make_room(len(batch))
        return StepInputs(valid, uniforms, measure)

    def static_step(self, batch: StreamBatch, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_and_learn`'s device part with ``static_shapes``: static shapes, nothing read back to
        the host (compiled with ``fullgraph=True`` in ``tests/test_static_step.py``)."""
        self._search_static(inputs)
        return self._test_then_train(batch)

    def _search_static(self, inputs: StepInputs) -> None:
        if inputs.valid is not None and inputs.uniforms is not None:
            self._policy_step_static(inputs.valid, inputs.uniforms, inputs.measure)

    def _test_then_train(self, batch: StreamBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shares_forward_pass():
            self.select_sizes(batch)
            logits, loss = self.train_model(batch)
            return output_probabilities(self.ctx.task, logits), loss
        with torch.no_grad():
            predicted = self.predict(batch)
        self.select_sizes(batch)
        return predicted, self.train_model(batch)[1]

    def shares_forward_pass(self) -> bool:
        """With ``model.batch_norm=batch`` line 10's forward pass gives ``predict``'s outputs (up to float
        rounding): ``predict`` applies lines 8-9's enlargements temporarily (they leave every unified embedding
        unchanged, Eq. 1 chained, and set the size groups line 10 sees)."""
        return self.batch_norm == "batch"

    # ------------------------------------------------------------------ reports

    def metrics(self) -> list[dict[str, Any]]:
        """Split ``search``: ``policy_action_sensitivity`` (see the module docstring) and
        ``policy_enlarge_share``, the share of lines 8-9's decisions (rows below the top size) that enlarged."""
        below, enlarged = self.decisions.tolist()
        out = [{"split": "search", "metric": "policy_enlarge_share", "value": enlarged / below if below else float("nan")}]
        if self.sensitivity_every:
            rows = int(self.sensitivity_rows)
            value = float(self.sensitivity_sum) / rows if rows else float("nan")
            out.insert(0, {"split": "search", "metric": "policy_action_sensitivity", "value": value})
        return out

    def entity_size_index(self, field: str) -> torch.Tensor:
        return self.stores[field].size_index(torch.arange(self.n_entities[field], device=self.ctx.device))

    def size_rows(self) -> list[dict[str, Any]]:
        rows = []
        for field in FIELDS:
            store = self.stores[field]
            for d, count, allocated in zip(self.sizes, store.counts(), store.table_bytes()):
                rows.append({"entity": field, "size": d, "entities": count, "dims": count * d,
                             "allocated_bytes": allocated, "used_bytes": count * d * 4})
        return rows

    def stored(self, field: str) -> int:
        return self.stores[field].n_stored()

    def state_bytes(self, field: str) -> int:
        return self.stores[field].index_bytes()

    def memory(self) -> MemoryReport:
        stores = self.stores.values()
        dense = sum(p.numel() for m in (self.model, self.maps, self.size_norms, self.policies) for p in m.parameters())
        embedding = sum(int(t.shape[0]) * int(t.shape[1]) for s in stores for t in s.tables)
        return MemoryReport(
            embedding_bytes=sum(s.nbytes() for s in stores),
            embedding_optimizer_bytes=sum(s.optimizer_bytes() for s in stores),
            parameters=embedding + dense,
            embedding_parameters=embedding,
            dims={f: {str(d): c for d, c in zip(self.sizes, self.stores[f].counts())} for f in FIELDS},
        )

    def architecture(self) -> dict[str, Any]:
        out = super().architecture()
        out["reward_queue_bytes"] = sum(q.nbytes() for q in self.queues.values())
        return out
