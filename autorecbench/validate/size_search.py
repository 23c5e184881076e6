"""Planted truth for the streaming embedding-size searches (ESAPN, DARTS, AutoEmb): the streams, the two
statistics, and the oracle and null references, shared by ``esapn.py``, ``darts.py`` and ``autoemb.py``.

Streams (:mod:`autorecbench.data.synthetic`, written as ``ratings.csv`` and read through the real loader), per
seed s, all with the same Zipf user and item draws (``seed`` s), latent dimension :data:`LATENT_DIM`:
- ``rich``: every rating through the d-dimensional interaction <p_u, q_i> (plus biases and noise);
- ``flat``: the same rows with the same biases and noise (``rating_seed`` s) but no interaction;
- ``flat_redrawn``: the same rows, no interaction, biases and noise redrawn (``rating_seed`` s + 1000);
- ``pairs_rich``: items in pairs of equal Zipf weight; the first of each pair rich, the second flat;
- ``pairs_flat``: the same pairs, both flat.

Statistics (sizes in log2 units: one step is a doubling; soft methods use their weighted mean dimension,
``soft_dim``; read from each run's ``entity_sizes`` table, entities that occurred at least once):
- ``between_rich_minus_flat``: mean log2 size on one stream minus on another, matched by (field, power-of-two
  frequency bucket) and weighted by the entities per bucket — planted: ``rich`` − ``flat``; control:
  ``flat_redrawn`` − ``flat``. A search that learns from its reward gives larger sizes where capacity helps; a
  blind one gives the same sizes on both, since the frequencies are the same.
- ``within_rich_minus_flat``: mean over item pairs of log2 size(first) − log2 size(second) — planted on
  ``pairs_rich`` (the first is rich), control on ``pairs_flat``.
Both must reach :data:`THRESHOLD` (half a doubling).

Subjects, all through the method's own class, stream, runner and ``entity_sizes`` report; only the decisions
differ. Oracle: sizes from the truth (a rich entity's target is the smallest candidate >= :data:`LATENT_DIM`, a
flat one's the smallest size). Null: the method's search frozen — ESAPN always enlarges (sizes then follow the
frequency alone), DARTS keeps uniform weights, AutoEmb keeps its randomly initialised controller.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from autorecbench.config import compose, resolve_device, validate
from autorecbench.data.cache import DatasetConfig, PreparedData, SourceSpec, prepare
from autorecbench.data.schema import TaskSpec
from autorecbench.data.stream import StreamBatch, load_stream
from autorecbench.execute import seed_everything
from autorecbench.methods.base import MethodContext, method_class
from autorecbench.methods.sizesearch import FIELDS, SizeSearchMethod
from autorecbench.runners.streaming import StreamingConfig, StreamingRunner
from autorecbench.validate.base import MethodValidation, Statistic

LATENT_DIM = 16
THRESHOLD = 0.5
BETWEEN, WITHIN = "between_rich_minus_flat", "within_rich_minus_flat"


@dataclass(frozen=True)
class Budget:
    n_users: int
    n_items: int
    n_interactions: int


QUICK = Budget(n_users=200, n_items=300, n_interactions=30_000)
FULL = Budget(n_users=1000, n_items=1000, n_interactions=300_000)

STREAMS: dict[str, dict[str, Any]] = {
    "rich": {"rich": "all"},
    "flat": {"rich": "none"},
    "flat_redrawn": {"rich": "none", "rating_offset": 1000},
    "pairs_rich": {"rich": "pair_first", "item_pairs": True},
    "pairs_flat": {"rich": "none", "item_pairs": True},
}
CASES = {"planted": (("rich", "flat"), "pairs_rich"), "control": (("flat_redrawn", "flat"), "pairs_flat")}


@dataclass
class Sizes:
    """One run's ``entity_sizes``: per field, log2 of each entity's (soft) size and its frequency, by code."""

    log2_size: dict[str, np.ndarray]
    frequency: dict[str, np.ndarray]


def between(a: Sizes, b: Sizes) -> float:
    """Mean log2 size on ``a`` minus on ``b``, matched by field and power-of-two frequency bucket of ``a``."""
    total, weight = 0.0, 0
    for field in FIELDS:
        freq = a.frequency[field]
        seen = freq > 0
        bucket = np.floor(np.log2(np.maximum(freq, 1))).astype(np.int64)
        for k in np.unique(bucket[seen]):
            members = seen & (bucket == k) & (b.frequency[field] > 0)
            n = int(members.sum())
            if n:
                diff = a.log2_size[field][members].mean() - b.log2_size[field][members].mean()
                total, weight = total + n * diff, weight + n
    return total / weight if weight else math.nan


def within(sizes: Sizes, pair: np.ndarray, member: np.ndarray) -> float:
    """Mean over item pairs (both items seen) of log2 size(first) − log2 size(second); arrays by item code."""
    seen = sizes.frequency["item"] > 0
    first, second = {}, {}
    for code in np.nonzero(seen)[0]:
        (first if member[code] == 0 else second)[int(pair[code])] = sizes.log2_size["item"][code]
    diffs = [first[p] - second[p] for p in first if p in second]
    return float(np.mean(diffs)) if diffs else math.nan


class TruthTargets:
    """Per field, each entity's target size index read from the truth (set by the validation)."""

    targets: dict[str, torch.Tensor]


class FrozenSearch:
    """Mixin: the search step does nothing (the null of the soft methods: their weights stay as initialised)."""

    def search_step(self, valid: StreamBatch) -> None:
        pass


class SoftOracle(TruthTargets, FrozenSearch):
    """Mixin for the soft methods' oracle: one-hot weights on the target size."""

    sizes: tuple[int, ...]

    def weights(self, field: str, batch: StreamBatch, train: bool = False) -> torch.Tensor:
        ids = batch.user if field == "user" else batch.item
        return F.one_hot(self.targets[field].index_select(0, ids), len(self.sizes)).float()

    def entity_weights(self, field: str) -> torch.Tensor:
        return F.one_hot(self.targets[field], len(self.sizes)).float()


class SizeSearchValidation(MethodValidation):
    """The cases and statistics above; a method's module names its oracle and null classes."""

    accepts_overrides = True
    oracle_class: ClassVar[type[SizeSearchMethod]]
    null_class: ClassVar[type[SizeSearchMethod]]
    task: ClassVar[str] = "binary"

    def __init__(self) -> None:
        self.prepared: dict[tuple[int, str, bool], PreparedData] = {}
        self.runs: dict[tuple[str, int, str, bool], Sizes] = {}
        self._cfg: DictConfig | None = None

    def config(self) -> DictConfig:
        """The method's config with the command line's overrides (composed and checked once)."""
        if self._cfg is None:
            self._cfg = compose([f"method={self.method}", *self.overrides])
            validate(self._cfg)
        return self._cfg

    # ------------------------------------------------------------------ data

    def stream(self, seed: int, name: str, quick: bool, workdir: Path) -> PreparedData:
        key = (seed, name, quick)
        if key not in self.prepared:
            budget = QUICK if quick else FULL
            options = dict(STREAMS[name])
            offset = options.pop("rating_offset", 0)
            generator = {"kind": "movielens", "seed": seed, "rating_seed": seed + offset, "latent_dim": LATENT_DIM,
                         "factor_scale": 2.5, "noise": 0.3, "n_users": budget.n_users, "n_items": budget.n_items,
                         "n_interactions": budget.n_interactions, **options}
            self.prepared[key] = prepare(DatasetConfig(
                name="synthetic", path=str(workdir / "raw"), sources=[SourceSpec("ratings.csv", "ratings_csv")],
                processed_dir=str(workdir / "processed"), generator=generator))
        return self.prepared[key]

    @staticmethod
    def truth(prepared: PreparedData) -> dict[str, np.ndarray]:
        """The generator's truth arrays, re-indexed by code (the cache's dense ids)."""
        raw = np.load(Path(prepared.schema.source["path"]).parent / "truth.npz")
        out = {}
        for entity in FIELDS:
            index = np.asarray(prepared.raw_ids(entity), dtype=np.int64) - 1  # MovieLens ids start at 1
            for key in raw.files:
                if key.startswith(f"{entity}_"):
                    out[key] = raw[key][index]
        return out

    def targets(self, prepared: PreparedData, sizes: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        """The oracle's target size index per entity: the smallest candidate >= the latent dimension for a rich
        entity, the smallest size for a flat one."""
        truth = self.truth(prepared)
        rich_index = next(k for k, d in enumerate(sizes) if d >= LATENT_DIM)
        return {f: torch.as_tensor(np.where(truth[f"{f}_rich"], rich_index, 0), dtype=torch.int64, device=device)
                for f in FIELDS}

    # ------------------------------------------------------------------ runs

    def sizes_of(self, subject: str, seed: int, name: str, quick: bool, workdir: Path) -> Sizes:
        """``subject``'s ``entity_sizes`` after one pass over stream ``name`` (cached per subject, seed, stream)."""
        key = (subject, seed, name, quick)
        if key in self.runs:
            return self.runs[key]
        cfg = self.config()
        prepared = self.stream(seed, name, quick, workdir)
        task = TaskSpec.from_name(self.task)
        device = resolve_device(str(cfg.device))
        cls = {"method": method_class(self.method), "oracle": self.oracle_class, "null": self.null_class}[subject]
        seed_everything(seed, bool(cfg.deterministic))
        method = cls(MethodContext(prepared.schema, task, cfg.method, cfg.model, device, seed))
        if isinstance(method, TruthTargets):
            method.targets = self.targets(prepared, method.sizes, device)
        stream = load_stream(prepared, task, device)
        StreamingRunner(StreamingConfig(batch_size=500)).run(method, stream)
        table = method.entity_rows()
        log2, freq = defaultdict(list), defaultdict(list)
        for row in table:
            log2[row["entity"]].append(math.log2(row.get("soft_dim", row["size"])))
            freq[row["entity"]].append(row["frequency"])
        self.runs[key] = Sizes({f: np.array(log2[f]) for f in FIELDS}, {f: np.array(freq[f]) for f in FIELDS})
        return self.runs[key]

    def measure(self, case: str, subject: str, seed: int, quick: bool, workdir: Path) -> list[Statistic]:
        (first, second), pairs = CASES[case]
        gap = between(self.sizes_of(subject, seed, first, quick, workdir),
                      self.sizes_of(subject, seed, second, quick, workdir))
        prepared = self.stream(seed, pairs, quick, workdir)
        truth = self.truth(prepared)
        pair_gap = within(self.sizes_of(subject, seed, pairs, quick, workdir), truth["item_pair"], truth["item_member"])
        return [Statistic(BETWEEN, gap, THRESHOLD), Statistic(WITHIN, pair_gap, THRESHOLD)]
