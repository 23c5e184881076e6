"""One-shot (supernet) machinery shared by the architecture-search methods (AutoIAS, AMEIR).

Nothing here knows a particular search space:
- :class:`ArchSpace`: named *components*, each a list of categorical decisions over one candidate set (e.g.
  "embedding size" with one decision per field); an architecture is one int64 index tensor per component
  (``[decisions]``, or ``[count, decisions]`` for a batch of architectures). Uniform sampling, exhaustive
  enumeration of small spaces, JSON in and out, and the size of the space.
- Ordinal parameter sharing (AutoIAS Eq. 9): :class:`OrdinalEmbedding` and :class:`OrdinalLinear` store each
  sized decision at its maximum; a child of size d uses the leading slice, either *sliced* (one child, smaller
  tensors) or *masked* (the full tensors times a 0/1 mask built by :func:`ordinal_mask`), so that several
  children with different sizes run as one batched computation. ``child`` copies a slice into a standalone
  ``nn.Linear`` / table.
- :class:`PolicyGenerator`: an architecture generator over a space (AutoIAS Eq. 17): a learned state embedding
  per candidate, one MLP head per component reading the states of the components chosen before it, one softmax
  per decision; sampling with log-probabilities for REINFORCE, greedy (argmax) derivation, and the marginal
  choice probabilities. :class:`MovingBaseline` is the exponential moving-average reward baseline (Eq. 22–23).
- Batched child scoring: :func:`batched_auc` (exact AUC of many children's scores on the same rows, ties
  counted 1/2) and :func:`score_children` (chunks of children on a validation subset with inherited weights).
- FairNAS strict fairness (:func:`sample_fair`): children whose decisions of one component are permutations of
  its choices, so that every choice is trained exactly once per step; weight inheritance by name with leading
  slices (:func:`inherit_leading`: a child built from a supernet, or a bigger layer from a smaller one).
- :func:`arch_cost`: parameters (counted from the module's tensors), FLOPs per example (measured with
  ``torch.utils.flop_counter``: matrix products only) and inference QPS (timed) of a standalone child.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autorecbench.models.layers import field_offsets

Architecture = dict[str, torch.Tensor]  # component name -> int64 choice indices [..., decisions]


# ---------------------------------------------------------------- the architecture space

@dataclass(frozen=True)
class Component:
    """A group of decisions sharing one candidate set: ``keys`` names each decision (e.g. a field), ``choices``
    are the candidates (JSON-able values, e.g. sizes or operation names)."""

    name: str
    keys: tuple[str, ...]
    choices: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.keys or not self.choices:
            raise ValueError(f"component {self.name!r} needs at least one decision and one choice")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"component {self.name!r} has repeated decision keys")

    @property
    def n_decisions(self) -> int:
        return len(self.keys)

    @property
    def n_choices(self) -> int:
        return len(self.choices)


class ArchSpace:
    """Named components of categorical decisions (see the module docstring); the order of the components is the
    order a generator decides them in."""

    def __init__(self, components: Sequence[Component]) -> None:
        names = [c.name for c in components]
        if not components or len(set(names)) != len(names):
            raise ValueError(f"an architecture space needs distinct component names, got {names}")
        self.components = list(components)
        self.by_name = {c.name: c for c in self.components}

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    def size(self) -> int:
        """The number of architectures (exact)."""
        return math.prod(c.n_choices ** c.n_decisions for c in self.components)

    def log10_size(self) -> float:
        return sum(c.n_decisions * math.log10(c.n_choices) for c in self.components)

    def sample_uniform(self, count: int, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> Architecture:
        """``count`` architectures, every decision uniform over its choices: ``[count, decisions]`` each."""
        out = {}
        for c in self.components:
            draw = torch.randint(c.n_choices, (count, c.n_decisions), generator=generator)
            out[c.name] = draw.to(device)
        return out

    def constant(self, choice: Mapping[str, Any], device: torch.device | str = "cpu") -> Architecture:
        """One architecture taking, in every decision of a component, the given choice *value*."""
        out = {}
        for c in self.components:
            index = c.choices.index(choice[c.name])
            out[c.name] = torch.full((c.n_decisions,), index, dtype=torch.int64, device=device)
        return out

    def enumerate(self, limit: int = 1_000_000) -> Iterator[Architecture]:
        """Every architecture (each ``[decisions]`` per component), in lexicographic order of the decisions."""
        if self.size() > limit:
            raise ValueError(f"the space holds {self.size():.3g} architectures, more than the limit {limit:,}")
        ranges = [range(c.n_choices) for c in self.components for _ in range(c.n_decisions)]
        for flat in product(*ranges):
            out, start = {}, 0
            for c in self.components:
                out[c.name] = torch.tensor(flat[start:start + c.n_decisions], dtype=torch.int64)
                start += c.n_decisions
            yield out

    def values(self, arch: Architecture, name: str) -> torch.Tensor:
        """The chosen values of a numeric component (e.g. sizes), same shape as its indices."""
        table = torch.tensor(self.by_name[name].choices, device=arch[name].device)
        return table[arch[name]]

    def check(self, arch: Architecture) -> None:
        for c in self.components:
            index = arch.get(c.name)
            if index is None or index.shape[-1] != c.n_decisions:
                raise ValueError(f"architecture lacks component {c.name!r} with {c.n_decisions} decisions")
            if bool((index < 0).any()) or bool((index >= c.n_choices).any()):
                raise ValueError(f"component {c.name!r}: choice index out of range")

    def to_json(self, arch: Architecture) -> dict[str, dict[str, Any]]:
        """One architecture (``[decisions]`` per component) as ``{component: {key: choice value}}``."""
        self.check(arch)
        return {c.name: {k: c.choices[i] for k, i in zip(c.keys, arch[c.name].tolist())} for c in self.components}

    def from_json(self, data: Mapping[str, Mapping[str, Any]], device: torch.device | str = "cpu") -> Architecture:
        out = {}
        for c in self.components:
            chosen = data[c.name]
            out[c.name] = torch.tensor([c.choices.index(chosen[k]) for k in c.keys], dtype=torch.int64, device=device)
        return out

    @staticmethod
    def stack(archs: Sequence[Architecture]) -> Architecture:
        return {name: torch.stack([a[name] for a in archs]) for name in archs[0]}

    @staticmethod
    def select(archs: Architecture, index: int | slice | torch.Tensor) -> Architecture:
        """One architecture (an int) or a sub-batch of a batch."""
        return {name: t[index] for name, t in archs.items()}

    @staticmethod
    def count(archs: Architecture) -> int:
        """The number of architectures in a batch."""
        return int(next(iter(archs.values())).shape[0])


def sample_fair(space: ArchSpace, component: str, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> Architecture:
    """FairNAS strict fairness (Chu et al., 2021, §3.2): ``n_choices`` architectures of ``component`` in which
    every decision of that component is an independent random permutation of its choices (each choice taken
    exactly once per decision); the other components uniform. Training all of them in one step gives every
    choice the same number of updates."""
    chosen = space.by_name[component]
    count = chosen.n_choices
    out = space.sample_uniform(count, generator, device)
    perms = torch.stack([torch.randperm(count, generator=generator) for _ in range(chosen.n_decisions)], dim=1)
    out[component] = perms.to(device)
    return out


@torch.no_grad()
def inherit_leading(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy into ``module``'s parameters and buffers the tensors of ``state`` with the same names, each over the
    leading block both share (``dst[:a, :b] = src[:a, :b]``): a child takes the leading slices of a supernet's
    pre-allocated weights (ordinal sharing), a wider layer the weights of a narrower one in its first
    rows/columns (the rest keeps its initialisation). Returns the names copied."""
    copied = []
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    for name, dst in own.items():
        src = state.get(name)
        if src is None or src.dim() != dst.dim():
            continue
        block = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))
        dst[block] = src[block].to(dst.device, dst.dtype)
        copied.append(name)
    return copied


# ---------------------------------------------------------------- ordinal parameter sharing (Eq. 9)

def ordinal_mask(sizes: torch.Tensor, max_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., max_size]`` 0/1 mask whose first ``sizes[...]`` entries are 1: Eq. 9's ``[I^{d*}; 0]`` as a mask."""
    positions = torch.arange(max_size, device=sizes.device)
    return (positions < sizes[..., None]).to(dtype)


class OrdinalEmbedding(nn.Module):
    """Every field's table at the largest size, stacked into one ``nn.Embedding`` (per-field row offsets); a
    child whose field f has size d_f reads the first d_f columns."""

    def __init__(self, cardinalities: Sequence[int], max_dim: int, init_std: float, sparse: bool = False) -> None:
        super().__init__()
        self.cardinalities = [int(c) for c in cardinalities]
        self.max_dim = int(max_dim)
        self.register_buffer("offsets", field_offsets(self.cardinalities), persistent=False)
        self.table = nn.Embedding(sum(self.cardinalities), self.max_dim, sparse=sparse)
        nn.init.normal_(self.table.weight, 0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, F]`` -> ``[B, F, max_dim]`` (the largest child)."""
        return self.table(x + self.offsets)

    def masked(self, x: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
        """``dims [S, F]`` sizes of S children -> ``[S, B, F, max_dim]``, zero beyond each field's size."""
        return self(x)[None] * ordinal_mask(dims, self.max_dim)[:, None]

    def sliced(self, x: torch.Tensor, field: int, dim: int) -> torch.Tensor:
        """One field's ``[B, dim]`` embedding of a child with size ``dim``."""
        return self.table(x[:, field] + self.offsets[field])[:, :dim]

    def child_table(self, field: int, dim: int) -> torch.Tensor:
        """A copy of field ``field``'s rows, first ``dim`` columns: the weight of a standalone ``dim`` table."""
        start = int(self.offsets[field])
        return self.table.weight.detach()[start:start + self.cardinalities[field], :dim].clone()


class OrdinalLinear(nn.Module):
    """``groups`` independent linear maps stored at ``max_out x max_in`` (``weight [G, max_out, max_in]``, bias
    ``[G, max_out]``), each initialised as ``nn.Linear(fan_in, max_out)`` would be (``fan_in`` defaults to
    ``max_in``). A child with input size d_in and output size d_out uses ``weight[g, :d_out, :d_in]`` and
    ``bias[g, :d_out]``."""

    def __init__(self, max_in: int, max_out: int, groups: int = 1, bias: bool = True,
                 fan_in: int | None = None) -> None:
        super().__init__()
        self.max_in, self.max_out, self.groups = int(max_in), int(max_out), int(groups)
        bound = 1 / math.sqrt(fan_in or max_in)
        self.weight = nn.Parameter(torch.empty(self.groups, self.max_out, self.max_in).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(self.groups, self.max_out).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor, in_dim: int | None = None, out_dim: int | None = None) -> torch.Tensor:
        """Sliced: ``x [..., G, in_dim]`` -> ``[..., G, out_dim]`` (one child's sizes, shared by the groups)."""
        d_in = self.max_in if in_dim is None else in_dim
        d_out = self.max_out if out_dim is None else out_dim
        y = torch.einsum("...gi,goi->...go", x[..., :d_in], self.weight[:, :d_out, :d_in])
        return y if self.bias is None else y + self.bias[:, :d_out]

    def masked(self, x: torch.Tensor, out_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked: ``x [..., G, max_in]``, already zero beyond each input size, -> ``[..., G, max_out]`` times
        ``out_mask`` (broadcast against the output): each entry equals its child's sliced output, zero-padded."""
        y = torch.einsum("...gi,goi->...go", x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y if out_mask is None else y * out_mask

    def child(self, group: int, in_dim: int, out_dim: int) -> nn.Linear:
        """A standalone ``nn.Linear(in_dim, out_dim)`` holding a copy of the slice."""
        layer = nn.Linear(in_dim, out_dim, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.weight[group, :out_dim, :in_dim])
            if self.bias is not None:
                layer.bias.copy_(self.bias[group, :out_dim])
        return layer.to(self.weight.device)


# ---------------------------------------------------------------- the architecture generator (Eq. 17)

@dataclass
class Sampled:
    """Architectures drawn from a :class:`PolicyGenerator`, with their log-probabilities (differentiable)."""

    arch: Architecture
    log_prob: torch.Tensor  # [count]
    entropy: torch.Tensor  # [count], summed over decisions


class PolicyGenerator(nn.Module):
    """Eq. 17: ``P_i = π_i(θ_i, a_{i-1}, …, a_1)``, ``a_i ~ P_i``, for the components of ``space`` in order.

    Every candidate of a component has a learned state embedding (``state_dim``); a component's state is the
    mean of the embeddings of the candidates its decisions took. Component i's head is an MLP (``hidden``,
    ``activation`` between layers) over the concatenation of a learned start state and the states of the
    components before it; it emits one logit per decision and candidate, and one softmax per decision gives π_i.
    """

    def __init__(self, space: ArchSpace, state_dim: int = 16, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh") -> None:
        super().__init__()
        acts: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {', '.join(acts)}")
        self.space = space
        self.state_dim = int(state_dim)
        self.start = nn.Parameter(torch.zeros(self.state_dim))
        self.states = nn.ModuleList(nn.Embedding(c.n_choices, self.state_dim) for c in space.components)
        self.heads = nn.ModuleList()
        for i, c in enumerate(space.components):
            layers: list[nn.Module] = []
            width = (i + 1) * self.state_dim
            for h in hidden:
                layers += [nn.Linear(width, h), acts[activation]()]
                width = h
            layers.append(nn.Linear(width, c.n_decisions * c.n_choices))
            self.heads.append(nn.Sequential(*layers))

    def _walk(self, count: int, pick: Callable[[int, torch.Tensor], torch.Tensor]) -> tuple[Architecture, torch.Tensor, torch.Tensor]:
        """Decide the components in order; ``pick(i, log_probs [count, K, C]) -> indices [count, K]``."""
        context = [self.start.expand(count, -1)]
        arch: Architecture = {}
        log_prob = torch.zeros(count, device=self.start.device)
        entropy = torch.zeros(count, device=self.start.device)
        for i, (c, head, states) in enumerate(zip(self.space.components, self.heads, self.states)):
            logits = head(torch.cat(context, dim=1)).view(count, c.n_decisions, c.n_choices)
            log_p = F.log_softmax(logits, dim=2)
            index = pick(i, log_p)
            arch[c.name] = index
            log_prob = log_prob + log_p.gather(2, index[..., None]).squeeze(2).sum(1)
            entropy = entropy - (log_p.exp() * log_p).sum((1, 2))
            context.append(states(index).mean(dim=1))
        return arch, log_prob, entropy

    def sample(self, count: int, generator: torch.Generator | None = None) -> Sampled:
        """``count`` architectures drawn from π (decisions of later components conditioned on earlier ones)."""

        arch, log_prob, entropy = self._walk(count, lambda i, log_p: _draw(log_p, generator))
        return Sampled(arch, log_prob, entropy)

    def log_prob(self, arch: Architecture) -> torch.Tensor:
        """log P(a; θ) of given architectures (``[count, decisions]`` per component)."""
        count = self.space.count(arch)
        return self._walk(count, lambda i, log_p: arch[self.space.components[i].name])[1]

    @torch.no_grad()
    def argmax(self) -> Architecture:
        """The greedy architecture: each component's most likely choices given the greedy earlier ones."""
        arch, _, _ = self._walk(1, lambda i, log_p: log_p.argmax(dim=2))
        return ArchSpace.select(arch, 0)

    @torch.no_grad()
    def marginals(self, count: int = 256, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """P(choice) per decision ``[decisions, choices]`` per component, averaged over ``count`` sampled
        contexts (the earlier components drawn from π): a Monte-Carlo estimate of the marginal."""
        out: dict[str, torch.Tensor] = {}

        def record(i: int, log_p: torch.Tensor) -> torch.Tensor:
            out[self.space.components[i].name] = log_p.exp().mean(dim=0)
            return _draw(log_p, generator)

        self._walk(count, record)
        return out


def _draw(log_p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per decision from ``log_p [count, K, C]``: ``[count, K]`` indices (a CPU generator draws on
    the CPU: the stream is the same on every device)."""
    probs = log_p.detach().exp().flatten(0, 1)
    if generator is not None and generator.device != probs.device:
        drawn = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    else:
        drawn = torch.multinomial(probs, 1, generator=generator)
    return drawn.view(log_p.shape[:2])


class MovingBaseline:
    """Eq. 22–23: the reward is ``R = τ − τ̄`` with ``τ̄ ← α τ̄ + (1 − α) τ``. ``rewards`` returns every τ's
    reward against the baseline before this call, then moves the baseline through the τs in order. The baseline
    starts at the first call's mean τ (``None`` until then)."""

    def __init__(self, alpha: float) -> None:
        if not 0 <= alpha < 1:
            raise ValueError("the baseline's α must be in [0, 1)")
        self.alpha = float(alpha)
        self.value: torch.Tensor | None = None

    def rewards(self, tau: torch.Tensor) -> torch.Tensor:
        tau = tau.detach().to(torch.float32)
        if self.value is None:
            self.value = tau.mean()
        reward = tau - self.value
        # τ̄ after the sequential updates, in closed form (no loop over the samples).
        n = tau.numel()
        weights = (1 - self.alpha) * self.alpha ** torch.arange(n - 1, -1, -1, device=tau.device, dtype=tau.dtype)
        self.value = self.alpha**n * self.value + (weights * tau).sum()
        return reward


def reinforce_loss(log_prob: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """Eq. 20 as a loss to minimise: ``−(1/M) Σ_i log P(a_i; θ) R_i`` (its gradient is −∇J)."""
    return -(log_prob * reward.detach()).mean()


# ---------------------------------------------------------------- batched child scoring

def batched_auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact ROC AUC of each row of ``scores [K, N]`` against the shared ``labels [N]`` (tied scores count 1/2):
    ``[K]`` float64, NaN where the labels hold one class. One sort for all K rows."""
    k, n = scores.shape
    labels = labels.to(torch.bool)
    n_pos = labels.sum().to(torch.float64)
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.full((k,), math.nan, dtype=torch.float64, device=scores.device)
    sorted_scores, order = torch.sort(scores, dim=1)
    new_run = torch.ones_like(sorted_scores, dtype=torch.bool)
    new_run[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    run = torch.cumsum(new_run.flatten(), 0) - 1  # run ids, distinct across rows
    rank = torch.arange(1, n + 1, device=scores.device, dtype=torch.float64).repeat(k)
    n_runs = int(run[-1]) + 1
    rank_sum = torch.zeros(n_runs, dtype=torch.float64, device=scores.device).index_add_(0, run, rank)
    mid_rank = (rank_sum / torch.bincount(run, minlength=n_runs).to(torch.float64))[run].view(k, n)
    positive = labels[order].to(torch.float64)
    return ((mid_rank * positive).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@torch.no_grad()
def child_scores(scores: Callable[[torch.Tensor, Architecture], torch.Tensor], archs: Architecture, x: torch.Tensor,
                 chunk: int = 8, rows: int = 50_000) -> torch.Tensor:
    """Scores of every architecture of the batch ``archs`` on the rows ``x`` with inherited (shared) weights:
    ``[count, N]``. ``scores(x_part, archs_chunk) -> [k, rows]`` scores up to ``rows`` rows for a chunk of k
    architectures (one batched forward pass); chunks of ``chunk`` architectures bound the memory."""
    count = ArchSpace.count(archs)
    out = []
    for start in range(0, count, chunk):
        part = ArchSpace.select(archs, slice(start, start + chunk))
        out.append(torch.cat([scores(x[i:i + rows], part).float() for i in range(0, x.shape[0], rows)], dim=1))
    return torch.cat(out)


def score_children(scores: Callable[[torch.Tensor, Architecture], torch.Tensor], archs: Architecture,
                   x: torch.Tensor, labels: torch.Tensor, chunk: int = 8, rows: int = 50_000) -> torch.Tensor:
    """Validation AUC of every architecture of ``archs`` (:func:`child_scores`, then :func:`batched_auc`):
    ``[count]`` float64."""
    return batched_auc(child_scores(scores, archs, x, chunk, rows), labels)


# ---------------------------------------------------------------- cost of a standalone child

@dataclass
class ArchCost:
    """What a standalone child costs: ``parameters`` (counted from its tensors), ``parameter_bytes`` (their
    storages), ``flops_per_example`` (floating-point operations of the matrix products in one forward pass,
    measured by ``torch.utils.flop_counter`` on a batch and divided by its rows: elementwise operations are not
    counted) and ``qps`` (examples predicted per second, timed over ``repeats`` forward passes without
    gradients)."""

    parameters: int
    parameter_bytes: int
    flops_per_example: float
    qps: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def arch_cost(module: nn.Module, x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
              repeats: int = 5) -> ArchCost:
    """Measure ``module`` on the rows ``x`` (``forward`` defaults to ``module(x)``), in evaluation mode."""
    from torch.utils.flop_counter import FlopCounterMode

    run = forward or module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                run(x)
            flops = counter.get_total_flops() / max(int(x.shape[0]), 1)
            run(x)  # warm-up
            _sync(x.device)
            start = time.perf_counter()
            for _ in range(repeats):
                run(x)
            _sync(x.device)
            seconds = time.perf_counter() - start
    finally:
        module.train(was_training)
    params = list(module.parameters())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
    return ArchCost(
        parameters=sum(p.numel() for p in params),
        parameter_bytes=int(sum(storages.values())),
        flops_per_example=float(flops),
        qps=repeats * int(x.shape[0]) / seconds if seconds > 0 else math.nan,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
