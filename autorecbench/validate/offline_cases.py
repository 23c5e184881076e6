"""What the offline search methods' validations (AutoDim, AutoFIS, AutoLoss) share: planted click data drawn
in memory from the synthetic Criteo generator's click model, runs of a method through the offline runner on it,
the capacity-matched FIXED baseline, and the rank statistic the planted checks are judged by.

The data come from :func:`autorecbench.data.synthetic_ctr.draw_clicks` — the same fields, click model and
rows ``autorecbench data prepare synthetic-criteo`` writes — kept as category codes (no file, no cache), split
8:1:1 at random. A run composes the method's and the backbone's configs exactly as ``autorecbench run`` does
(``conf/``, plus the case's overrides), builds the method from them and runs it with the offline runner
(search, fit with early stopping on validation, test), on the device ``auto`` picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from autorecbench.data.offline import OfflineData, SplitData
from autorecbench.data.schema import FieldSpec, Schema, TaskSpec
from autorecbench.data.splits import TEST, TRAIN, VALID, random_split
from autorecbench.data.synthetic_ctr import CTRGenerator, PlantedClicks, draw_clicks
from autorecbench.methods.base import MethodContext, OfflineMethod, method_class
from autorecbench.runners.base import RunOutput
from autorecbench.validate.base import MethodValidation

BINARY = TaskSpec("binary", 2)
SPLIT_RATIO = (0.8, 0.1, 0.1)
# Every fit stage (the searched architecture's, the references', FIXED's) trains to the runner's early stopping
# (patience 2 on validation AUC), at most this many epochs: the same rule for all, not a budget that favours one.
FIT_EPOCHS = 30


def ordered_share(high: list[float], low: list[float]) -> float:
    """The share of (h, l) pairs with h > l, ties counting one half (the Mann-Whitney U statistic over
    ``len(high) * len(low)``; the AUC of telling the two groups apart). 0.5 for any constant or random order;
    NaN when a group is empty."""
    if not high or not low:
        return float("nan")
    h = np.asarray(high, dtype=np.float64)[:, None]
    l = np.asarray(low, dtype=np.float64)[None, :]
    return float(((h > l) + 0.5 * (h == l)).mean())


def rank_share(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """:func:`ordered_share` of ``scores`` on the ``positive`` rows against the others, for many rows at once
    (by average ranks, ties counting one half)."""
    positive = positive.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values = scores.detach().to(torch.float64).cpu()
    order = torch.argsort(values)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    # ties: every member of a run of equal values gets the run's mean rank
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks[order] = mean_rank[inverse]
    u = float(ranks[positive.cpu()].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@dataclass
class CaseData:
    """One case's rows as the offline runner's splits, with the click model that drew them."""

    data: OfflineData
    clicks: PlantedClicks
    split: np.ndarray  # TRAIN / VALID / TEST per drawn row
    schema: Schema


def split_data(clicks: PlantedClicks, split_seed: int, labels: np.ndarray | None = None) -> CaseData:
    """The drawn rows (``labels`` replacing the drawn clicks when given) as train / valid / test splits on the
    device ``auto`` picks."""
    from autorecbench.config import resolve_device

    device = resolve_device("auto")
    n = len(clicks.clicks)
    split = random_split(n, SPLIT_RATIO, split_seed)
    x_all = torch.from_numpy(clicks.categories.astype(np.int32))
    y_all = torch.from_numpy((clicks.clicks if labels is None else labels).astype(np.float32))
    parts = {name: SplitData(name, x_all[torch.from_numpy(split == code)].to(device),
                             y_all[torch.from_numpy(split == code)].to(device), device)
             for name, code in (("train", TRAIN), ("valid", VALID), ("test", TEST))}
    fields = [FieldSpec(name, codes) for name, codes in zip(clicks.names, clicks.codes)]
    sizes = {name: len(part) for name, part in parts.items()}
    data = OfflineData(parts["train"], parts["valid"], parts["test"], fields, BINARY, None,
                       {"rule": "random", "ratio": list(SPLIT_RATIO), "seed": split_seed, "rows": sizes})
    schema = Schema(dataset="validate-planted-clicks", family="criteo", fingerprint="in-memory", fields=fields,
                    n_rows=n, time_min=0, time_max=0, rating_values=[], source={}, options={}, rows_in_file=n,
                    created_at="", cache_version=0, label="click", splits=sizes)
    return CaseData(data, clicks, split, schema)


@dataclass
class OfflineRun:
    """A finished run of a method on a case: the method (its search result, memory, model) and the runner's
    output (test metrics, costs)."""

    method: OfflineMethod
    output: RunOutput

    @property
    def test_auc(self) -> float:
        return float(self.output.headline["auc"])

    @property
    def embedding_bytes(self) -> int:
        return int(self.method.memory().embedding_bytes)


def compose_method(method: str, model: str, overrides: list[str]) -> Any:
    """The composed run config of ``method`` on ``model`` with ``overrides`` (as ``autorecbench run`` composes
    it; the dataset entry is only there to select the CTR defaults), checked like a run's."""
    from autorecbench.config import compose, validate

    cfg = compose(["data=synthetic-criteo", f"method={method}", f"model={model}", *overrides])
    validate(cfg)
    return cfg


def build_method(case: CaseData, cfg: Any, seed: int) -> OfflineMethod:
    from autorecbench.execute import seed_everything

    seed_everything(seed, bool(cfg.deterministic))
    cls = method_class(str(cfg.method.name), "offline")
    return cls(MethodContext(case.schema, BINARY, cfg.method, cfg.model, case.data.train.device, seed))


def run_method(case: CaseData, method: str, model: str, overrides: list[str], seed: int,
               architecture: dict[str, Any] | None = None) -> OfflineRun:
    """Run ``method`` on the case through the offline runner. ``architecture``: skip the method's search and
    fit this architecture (the oracle's and the null's decisions, through the method's own build and fit)."""
    from autorecbench.runners.offline import OfflineConfig, OfflineProtocol

    cfg = compose_method(method, model, [f"seed={seed}", *overrides])
    options = OmegaConf.to_container(cfg.runner, resolve=True)
    assert isinstance(options, dict)
    options.pop("name")
    built = build_method(case, cfg, seed)
    if architecture is not None:
        decided = dict(architecture)
        built.search = lambda loop: decided  # type: ignore[method-assign]
    output = OfflineProtocol(OfflineConfig(**options)).run(built, case.data)
    return OfflineRun(built, output)


class OfflineValidation(MethodValidation):
    """A validation whose cases are planted click data (see the module docstring). Subclasses say how a case's
    generator differs from the planted one (:meth:`generator`) and what each subject does; drawn data and the
    capacity-matched FIXED run are kept per (case, seed, quick) for the other subjects of the same seed."""

    model: str = "fm"

    def __init__(self, method_overrides: list[str] | None = None) -> None:
        # Extra overrides for the method under test (e.g. another variant); the references never take them.
        self.method_overrides = list(method_overrides or [])
        self._cases: dict[tuple[str, int, bool], CaseData] = {}
        self._fixed: dict[tuple[str, int, bool], OfflineRun] = {}

    def generator(self, case: str, seed: int, quick: bool) -> CTRGenerator:
        raise NotImplementedError

    def runner_overrides(self, quick: bool) -> list[str]:
        return []

    def case_data(self, case: str, seed: int, quick: bool) -> CaseData:
        key = (case, seed, quick)
        if key not in self._cases:
            self._cases[key] = self.make_case(case, seed, quick)
        return self._cases[key]

    def make_case(self, case: str, seed: int, quick: bool) -> CaseData:
        return split_data(draw_clicks("criteo", self.generator(case, seed, quick)), split_seed=seed)

    def fixed_run(self, case: str, seed: int, quick: bool, overrides: list[str]) -> OfflineRun:
        """The capacity-matched FIXED on the case (once per case, seed and budget)."""
        key = (case, seed, quick)
        if key not in self._fixed:
            self._fixed[key] = run_method(self.case_data(case, seed, quick), "fixed", self.model,
                                          [*self.runner_overrides(quick), *overrides], seed)
        return self._fixed[key]

