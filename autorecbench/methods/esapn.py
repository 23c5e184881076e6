"""ESAPN: embedding size adjustment policy network (Liu et al., SIGIR 2020, §2.3-2.4, Algorithm 1).

Hard selection: every user and item holds one embedding, at its current size only, in a
:class:`~autorecbench.models.embedding.MixedDimEmbedding` (per-size tables, slots allocated on demand).

Model (§2.2): the embedding e of size d_k is mapped up the chain of adjacent linear maps of Eq. 1
(``W_{k->k+1} e + b``, separate maps for users and items, :class:`ChainedMaps`) to d_n, then the rating model
(batch-norm + tanh, MLP 512, sigmoid/MSE Eq. 3 or softmax/CE Eq. 4).

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
  from π(·|s), adjust the sizes temporarily (:func:`adjusted_unified`: a pure function, the store is never
  written), compute L and R, and update both policies by REINFORCE (Eq. 6 with one sample per state, the
  loss −R log π(a|s); Eq. 7 via Adam, ``search_lr`` 1e-4);
- lines 7-9, :meth:`Esapn.select_sizes`: for the current batch take the argmax action and enlarge for good;
- line 10, :meth:`Esapn.train_model`: one Adam step (``lr`` 1e-3) of the rating model, the maps and the
  embeddings on the current batch; the batch's per-row losses enter the FIFOs.

``predict`` uses the entities' current sizes. The official code first applies line 8's argmax enlargement
and then predicts; both give the same prediction, because chaining from e_k equals chaining from
W_{k->k+1} e_k + b (Eq. 1) — which is also why the reward of line 5 does not depend on the sampled action at
the moment it is computed (a property of the method as published, recorded here, not changed). The
streaming runner's test-then-train step (``predict_and_learn``) therefore takes, with
``model.batch_norm=batch``, the predictions from line 10's forward pass like the official code: one pass of
the rating model per batch for both.

Choices the paper leaves open, as config values (``conf/method/esapn.yaml``), defaults from the official code:
- ``initial_size: 2``: every entity starts at the smallest size and grows at most one step per batch it
  appears in (if any of its rows in the batch selects "enlarge").
- ``frequency_encoding: exact``, ``frequency_cap: 1000``, ``frequency_dim: 32``: one embedding row per
  frequency up to 1000 (the official code has no cap; beyond ~1000 appearances an entity has long had every
  chance to reach the top size, and the cap keeps the policy's Adam cheap); ``log2`` for power-of-two buckets.
- ``validation: last_batch`` (or ``history``), see :mod:`autorecbench.methods.sizesearch`.
- ``short_history: mean``: an entity with fewer than T past losses is rewarded against the mean of those it
  has (the official ``ave_loss`` baseline); ``skip`` gives such rows no policy gradient. Validation rows
  always have at least one past loss, since they were trained on.
- The policy networks run once per distinct state of a batch (:class:`PolicyStates`, exact: batch-norm weighs
  each state by its row count), not once per row as the official code does.
- Rows whose entity is at the top size take no decision and are left out of the policy loss (the official
  code counts them as "unchange").
- The policy loss is reduced like the model's (``model.loss_reduction``: mean as Eq. 6's 1/N, or the
  official code's sum).
- ``embedding_optimizer: lazy`` updates the moments and values of the slots a batch touches (see
  :mod:`autorecbench.models.embedding`); ``dense`` is Adam over every stored slot at every step.
- ``init_std: 1.0``: initial embeddings N(0, 1), as PyTorch's and the official code's tables.
- The rating model, maps and policies step with :class:`~autorecbench.train.optim.FlatAdam`: gradients are zeroed,
  not set to None, between steps (the official code's PyTorch 1.x ``zero_grad()``), so a map that no entity
  of a batch passes through still takes a step on its momentum.
- Line 5's loss is computed on the rows that take a decision in some field; batch-norm statistics of the
  rating model still come from every row of the validation batch (the layers after them are per row).
- ``capacity_growth: 2.0``, ``min_capacity: 64``: how the per-size tables grow.
- Batch-norm layers follow ``model.batch_norm``: with ``batch`` they use the batch's statistics (the official
  code); with ``running`` the reward and argmax passes use running statistics and leave them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from autorecbench.data.stream import StreamBatch, StreamHistory, within_batch_rank
from autorecbench.errors import UserError
from autorecbench.methods.base import MemoryReport, MethodContext, register_method, set_training
from autorecbench.methods.sizesearch import FIELDS, SizeSearchMethod
from autorecbench.models.controller import FrequencyEncoder, StateMLP
from autorecbench.models.embedding import ChainedMaps, Lookup, MixedDimEmbedding
from autorecbench.models.rating import output_probabilities, per_example_loss
from autorecbench.train.optim import flat_adam, tensor_bytes

SHORT_HISTORY = ("mean", "skip")
UNCHANGE, ENLARGE = 0, 1


class LossQueue:
    """Per-entity FIFO of the last T losses (Eq. 2) as a ring buffer ``[n, T]`` and a push count ``[n]``.

    ``push`` takes rows in stream order (an entity may have several in a batch); only each entity's last T
    rows of the batch can survive, and each goes to slot ``(pushes before + rank in batch) mod T``.
    """

    def __init__(self, n: int, window: int, device: torch.device) -> None:
        self.window = window
        self.losses = torch.zeros(n, window, device=device)
        self.count = torch.zeros(n, dtype=torch.int64, device=device)

    def push(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        rank, in_batch = within_batch_rank(ids)
        keep = rank >= in_batch - self.window
        slot = (self.count[ids] + rank) % self.window
        self.losses[ids[keep], slot[keep]] = losses[keep].detach().to(self.losses.dtype)
        self.count.index_add_(0, ids, torch.ones_like(ids))

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


def adjusted_unified(lookup: Lookup, enlarge: torch.Tensor, maps: ChainedMaps) -> torch.Tensor:
    """Algorithm 1 lines 4-5 as a pure function: each row's unified embedding ``[batch, d_n]`` with its size
    adjusted by its own action — rows with ``enlarge`` set (and below the top size) use their entity's
    embedding enlarged one size, ``W_{k->k+1} e + b`` (Eq. 1), mapped up from k+1; the others their current
    one. Both variants are computed once per distinct entity of ``lookup``; the store is not touched."""
    entry = lookup.entry_of_row
    current = maps.unified(lookup.values).index_select(0, entry)
    below = sum(lookup.counts[:-1])  # entries below the top size come first
    if below == 0:
        return current
    up = maps.enlarged(lookup.values).index_select(0, entry.clamp(max=below - 1))
    return torch.where((enlarge & (entry < below))[:, None], up, current)


@register_method
class Esapn(SizeSearchMethod):
    name = "esapn"
    description = "Hard embedding-size selection by REINFORCE policy networks, mixed-dimension storage"
    paper = "Liu et al., SIGIR 2020, §2, Algorithm 1"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        self.initial_index = self.sizes.index(int(cfg.initial_size))
        self.window = int(cfg.reward_window)
        self.short_history = str(cfg.short_history)
        self.stores: dict[str, MixedDimEmbedding] = {}
        self.maps = torch.nn.ModuleDict()
        self.policies = torch.nn.ModuleDict()
        self.queues: dict[str, LossQueue] = {}
        for stream, field in enumerate(FIELDS):
            self.stores[field] = MixedDimEmbedding(
                self.n_entities[field], self.sizes, init_std=float(cfg.init_std), seed=ctx.seed, stream=stream,
                device=ctx.device, mode=str(cfg.embedding_optimizer), lr=float(cfg.lr),
                initial_size=self.initial_index, growth=float(cfg.capacity_growth),
                min_capacity=int(cfg.min_capacity),
            )
            self.maps[field] = ChainedMaps(self.sizes)
            encoder = FrequencyEncoder(str(cfg.frequency_encoding), int(cfg.frequency_cap), int(cfg.frequency_dim),
                                       self.batch_norm)
            self.policies[field] = StateMLP(encoder, len(self.sizes), int(cfg.hidden), 2, self.batch_norm)
            self.queues[field] = LossQueue(self.n_entities[field], self.window, ctx.device)
        for module in (self.model, self.maps, self.policies):
            module.to(ctx.device)
        self.model_optimizer = flat_adam([*self.model.parameters(), *self.maps.parameters()], float(cfg.lr))
        self.policy_optimizer = flat_adam(self.policies.parameters(), float(cfg.search_lr))

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        if int(cfg.initial_size) not in [int(d) for d in cfg.sizes]:
            raise UserError(f"method.initial_size must be one of method.sizes, got {cfg.initial_size}")
        if int(cfg.reward_window) < 1:
            raise UserError(f"method.reward_window must be >= 1, got {cfg.reward_window}")
        if str(cfg.short_history) not in SHORT_HISTORY:
            raise UserError(f"method.short_history must be one of {', '.join(SHORT_HISTORY)}, got {cfg.short_history!r}")
        if float(cfg.capacity_growth) <= 1 or int(cfg.min_capacity) < 1:
            raise UserError("method.capacity_growth must be > 1 and method.min_capacity >= 1")

    # ------------------------------------------------------------------ pieces

    def _states(self, field: str, freq: torch.Tensor, size_index: torch.Tensor) -> PolicyStates:
        return PolicyStates.of(self.policies[field], freq, size_index, len(self.sizes))

    def _logits(self, lookups: dict[str, Lookup]) -> torch.Tensor:
        return self.model([self.maps[f](lookups[f]) for f in FIELDS])

    def predict(self, batch: StreamBatch) -> torch.Tensor:
        set_training(self.model, False)
        lookups = {f: self.stores[f].lookup(self._ids(batch, f)[0], distinct=True) for f in FIELDS}
        return output_probabilities(self.ctx.task, self._logits(lookups))

    def policy_step(self, valid: StreamBatch) -> None:
        """Algorithm 1 lines 3-6 on the validation batch: sample, adjust temporarily, reward, REINFORCE."""
        top = len(self.sizes) - 1
        adjusted, picked, below, eligible = {}, {}, {}, {}
        for field in FIELDS:
            ids, freq = self._ids(valid, field)
            lookup = self.stores[field].lookup(ids, distinct=True)
            states = self._states(field, freq, lookup.size_index)
            # Only rows below the top size take a decision (the rest get no action, no log-probability).
            below[field] = lookup.size_index < top
            rows = below[field].nonzero().squeeze(1)
            log_probs = torch.log_softmax(states.logits(set_training(self.policies[field], True)), dim=1)
            log_probs = log_probs.index_select(0, states.inverse[rows])
            with torch.no_grad():
                sampled = self.uniform(len(ids))[rows] < log_probs[:, ENLARGE].exp()  # line 3: a ~ π(·|s)
                action = torch.zeros_like(ids, dtype=torch.bool)
                action[rows] = sampled
                adjusted[field] = adjusted_unified(lookup, action, self.maps[field])  # line 4 (temporary)
            picked[field] = log_probs.gather(1, sampled.long()[:, None]).squeeze(1)
            eligible[field] = rows
        # Batch statistics in ``batch`` mode; running statistics used and left unchanged in ``running`` mode.
        set_training(self.model, False)
        with torch.no_grad():
            # line 5: L under the sampled sizes, on the rows that took a decision in some field (all rows still
            # enter the batch-norm statistics; the layers after them are per row)
            decided = torch.stack(list(below.values())).any(dim=0)
            needed = None if bool(decided.all()) else decided.nonzero().squeeze(1)
            logits = self.model([adjusted[f] for f in FIELDS], rows=needed)
            if needed is None:
                loss = self.example_losses(logits, valid)
            else:
                label = valid.label.index_select(0, needed)
                decided_loss = per_example_loss(self.ctx.task, logits, label)
                loss = logits.new_zeros(len(valid)).index_copy_(0, needed, decided_loss)
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

    @torch.no_grad()
    def select_sizes(self, batch: StreamBatch) -> None:
        """Algorithm 1 lines 8-9: argmax action per row; an entity enlarges (one step) if any of its rows
        says so, initialised through W (Eq. 1); its old slot is freed."""
        top = len(self.sizes) - 1
        for field in FIELDS:
            ids, freq = self._ids(batch, field)
            store = self.stores[field]
            store.ensure(ids)
            size_index = store.size_index(ids)
            states = self._states(field, freq, size_index)
            logits = states.logits(set_training(self.policies[field], False))
            says_enlarge = (logits[:, ENLARGE] > logits[:, UNCHANGE]) & (states.size_index < top)
            chosen = torch.unique(ids[says_enlarge.index_select(0, states.inverse)])
            if chosen.numel():
                self.enlarge(field, chosen)

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
        lookups = {}
        for field in FIELDS:
            lookup = self.stores[field].lookup(self._ids(batch, field)[0], distinct=True)
            for v in lookup.values:
                v.requires_grad_(True)
            lookups[field] = lookup
        logits = self._logits(lookups)
        losses = self.example_losses(logits, batch)
        loss = self.reduce(losses)
        self.model_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.model_optimizer.step()
        for field in FIELDS:
            ids, freq = self._ids(batch, field)
            lookup = lookups[field]
            self.stores[field].apply_gradients(lookup, [v.grad for v in lookup.values])
            self.queues[field].push(ids, losses)
            self.by_frequency[field].add(freq, F.one_hot(lookup.size_index, len(self.sizes)))
        return logits.detach(), loss.detach()

    def learn_with_logits(self, batch: StreamBatch, history: StreamHistory) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration of Algorithm 1; returns the logits of line 10's forward pass and the loss."""
        valid = self.validation_batch(batch, history)
        if valid is not None:
            self.policy_step(valid)
        self.select_sizes(batch)
        return self.train_model(batch)

    def learn(self, batch: StreamBatch, history: StreamHistory) -> torch.Tensor:
        return self.learn_with_logits(batch, history)[1]

    def shares_forward_pass(self) -> bool:
        """With ``model.batch_norm=batch`` line 10's forward pass gives ``predict``'s outputs (up to float
        rounding): the policy step changes only the policies, and line 8-9's enlargements leave every unified
        embedding unchanged (Eq. 1 chained) — the official code predicts from that pass too."""
        return self.batch_norm == "batch"

    # ------------------------------------------------------------------ reports

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
        dense = sum(p.numel() for m in (self.model, self.maps, self.policies) for p in m.parameters())
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
