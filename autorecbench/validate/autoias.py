"""Planted-truth validation of AutoIAS (``autorecbench validate method=autoias``; spec: ``ameir-autoias.md`` B5).

Cases (synthetic Criteo-format files through the real loader, the active fields only):
- ``planted``: 10 fields, 5 informative (first-order weights), 5 pure noise, 3 planted pairs among the
  informative fields (centred rank-2 interactions: learnable only as a pair), cardinalities 5–50;
- ``control``: the same generator seed (the same fields and the same "planted" pairs drawn) with every effect at
  zero (``linear_std = pair_strength = 0``): no signal at all.

Subjects, each re-trained from scratch with the same runner budget:
- ``method``: AutoIAS' search (generator, KD, β = 0.5) and its derived a*;
- ``oracle``: the architecture read from the truth (informative fields at the largest size and selected, noise
  fields at the smallest and not selected, exactly the planted pairs selected with the product function at the
  largest projection size, everything at layer 0, the widest MLP);
- ``null``: 20 uniformly random architectures (its structure statistics are their means).

Statistics (the threshold is the bar of the issue / the spec):
- ``p_select_planted_min`` ≥ 0.7: the generator's final P(select) of the least likely planted pair (oracle: 1,
  its point mass; null: 0.5, the uniform distribution); ``p_select_noise_mean`` ≤ 0.4 over pairs with a noise field;
- ``planted_pairs_kept`` ≥ 2 (of 3) and ``noise_pairs_kept_share`` ≤ 0.2 in the derived architecture;
- ``informative_minus_noise_size`` > 0: mean searched embedding size of the informative fields minus that of
  the noise fields (issue: noise smaller in ≥ 3 of 4 seeds); ``..._used_size`` the same with size 0 for a field
  the derived network does not use (no table);
- ``auc_lift_over_random`` ≥ 0.01: re-trained test AUC minus the mean of the 20 random architectures';
  ``auc_minus_best_random`` ≥ −0.002;
- ``auc_minus_random_search`` ≥ 0: against the a* of random search (``method.search=random``) with the same
  steps, re-trained (issue: the generator wins in ≥ 3 of 4 seeds);
- ``kd_probe_logloss_gain`` ≥ 0 (method only): the probe architectures' validation logloss after a search with
  β = 0 minus after one with β = 0.5 (issue: β = 0.5 not worse in ≥ 3 of 4 seeds);
- control: ``auc_distance_from_half`` ≤ 0.01 (every subject; at the quick budget, whose test split has 4,000
  rows, the bar is the larger of 0.01 and two standard errors of a chance AUC on that split, Hanley–McNeil:
  ≈ 0.021 — a model without signal lands outside 0.5 ± 0.01 a third of the time there), and the lifts above.
  Without signal only the null's lift is known in advance (0, by construction); the others are coin flips.
Seeds aggregate in the harness (the "≥ 3 of 4 seeds" verdicts are counts over the per-seed rows).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from autorecbench.validate.base import (
    MethodValidation,
    Statistic,
    fit_random_architectures,
    register_validation,
    shared_once,
)

FIELDS, INFORMATIVE, PAIRS = 10, 5, 3
RANDOM_ARCHITECTURES = 20
# quick: the ≤ 3-minute budget per measurement on 2 cores (shared work cached per case and seed); full: the spec's.
BUDGETS: dict[bool, dict[str, Any]] = {
    True: {"rows": 40_000, "search_epochs": 8, "fit_epochs": 10},
    False: {"rows": 200_000, "search_epochs": 10, "fit_epochs": 20},
}
STRUCTURE = ("p_select_planted_min", "p_select_noise_mean", "planted_pairs_kept", "noise_pairs_kept_share",
             "informative_minus_noise_size", "informative_minus_noise_used_size")
OUTCOME = ("auc_lift_over_random", "auc_minus_best_random", "auc_minus_random_search")


@dataclass
class Shared:
    """Work every subject of one (case, seed) compares against: computed once, kept in memory and in the
    workdir."""

    truth: dict[str, Any]
    random_aucs: list[float] = field(default_factory=list)
    random_structure: dict[str, float] = field(default_factory=dict)
    random_search_auc: float = math.nan


@register_validation
class AutoIASValidation(MethodValidation):
    method = "autoias"
    cases = ("planted", "control")
    _shared: ClassVar[dict[tuple[str, int, bool, str], Shared]] = {}

    # ------------------------------------------------------------ what a run needs

    @staticmethod
    def data_overrides(case: str, seed: int, quick: bool) -> list[str]:
        budget = BUDGETS[quick]
        signal = [] if case == "planted" else ["data.generator.linear_std=0", "data.generator.pair_strength=0"]
        return ["data=synthetic-criteo", f"data.generator.rows={budget['rows']}", f"data.generator.n_fields={FIELDS}",
                f"data.generator.n_informative={INFORMATIVE}", f"data.generator.n_pairs={PAIRS}",
                "data.generator.cardinality_min=5", "data.generator.cardinality_max=50",
                f"data.generator.seed={seed}", *signal]

    @staticmethod
    def method_overrides(quick: bool) -> list[str]:
        budget = BUDGETS[quick]
        return ["method=autoias", f"method.budget={'quick' if quick else 'paper'}",
                f"method.search_epochs={budget['search_epochs']}", f"method.search_patience={budget['search_epochs']}",
                "runner.batch_size=500", f"runner.epochs={budget['fit_epochs']}"]

    def expected(self, case: str, subject: str, statistic: str) -> bool | None:
        if subject == "method" or statistic == "kd_probe_logloss_gain":
            return None
        if case == "planted":
            if subject == "null" and statistic.startswith("informative_minus_noise"):
                return False  # the mean of 20 random orders of the sizes: about 0
            return subject == "oracle"
        if statistic == "auc_distance_from_half":
            return True  # no signal: every model is a coin
        if subject == "null" and statistic == "auc_lift_over_random":
            return False  # the mean of the random architectures against itself: 0
        return None  # the oracle copies the truth on any file; without signal every comparison is a coin flip

    # ------------------------------------------------------------ measuring

    def measure(self, case: str, subject: str, seed: int, quick: bool, workdir: Path) -> list[Statistic]:
        runs = Runs(workdir, self.data_overrides(case, seed, quick), self.method_overrides(quick), seed)
        shared = self._shared_work(runs, case, seed, quick, workdir)
        truth = shared.truth
        if subject == "method":
            searched, auc = runs.search_and_fit()
            structure = structure_statistics(searched, truth, runs.space_fields())
            extra = [Statistic("kd_probe_logloss_gain", runs.probe_logloss(beta=0.0) - searched["probe_valid_logloss"],
                               0.0)] if case == "planted" else []
        elif subject == "oracle":
            arch = oracle_architecture(truth, runs)
            auc = runs.fit(arch)
            structure = structure_statistics({**arch, "p_select_pairs": _point_mass(arch)}, truth, runs.space_fields())
            extra = []
        else:
            auc = statistics.fmean(shared.random_aucs)
            structure = shared.random_structure
            extra = []
        out = self._outcomes(case, auc, shared, chance_band(runs.test_labels()) if quick else 0.01) + extra
        if case == "planted":
            out = self._structure(structure) + out
        return out

    def _shared_work(self, runs: Any, case: str, seed: int, quick: bool, workdir: Path) -> Shared:
        def compute() -> Shared:
            shared = Shared(truth=runs.truth())
            generator = torch.Generator().manual_seed(10_000 + seed)
            shared.random_aucs, shared.random_structure = fit_random_architectures(
                runs.random_architectures(RANDOM_ARCHITECTURES, generator), runs.fit,
                lambda arch: structure_statistics({**arch, "p_select_pairs": None}, shared.truth, runs.space_fields()))
            shared.random_structure["p_select_planted_min"] = 0.5  # the uniform distribution
            shared.random_structure["p_select_noise_mean"] = 0.5
            shared.random_search_auc = runs.search_and_fit(["method.search=random"])[1]
            return shared

        return shared_once(self._shared, "autoias", case, seed, quick, workdir, lambda d: Shared(**d), compute)

    @staticmethod
    def _structure(values: dict[str, float]) -> list[Statistic]:
        return [
            Statistic("p_select_planted_min", values["p_select_planted_min"], 0.7),
            Statistic("p_select_noise_mean", values["p_select_noise_mean"], 0.4, higher_is_better=False),
            Statistic("planted_pairs_kept", values["planted_pairs_kept"], 2.0),
            Statistic("noise_pairs_kept_share", values["noise_pairs_kept_share"], 0.2, higher_is_better=False),
            Statistic("informative_minus_noise_size", values["informative_minus_noise_size"], 1e-9),
            Statistic("informative_minus_noise_used_size", values["informative_minus_noise_used_size"], 1e-9),
        ]

    @staticmethod
    def _outcomes(case: str, auc: float, shared: Shared, band: float) -> list[Statistic]:
        out = [
            Statistic("auc_lift_over_random", auc - statistics.fmean(shared.random_aucs), 0.01),
            Statistic("auc_minus_best_random", auc - max(shared.random_aucs), -0.002),
            Statistic("auc_minus_random_search", auc - shared.random_search_auc, 0.0),
        ]
        if case == "control":
            out.append(Statistic("auc_distance_from_half", abs(auc - 0.5), band, higher_is_better=False))
        return out


def chance_band(labels: torch.Tensor) -> float:
    """max(0.01, 2 SE) with SE the standard error of the AUC of a scorer without signal on these labels
    (Hanley & McNeil 1982 under H0: ``sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg))``)."""
    n_pos = float(labels.sum())
    n_neg = float(labels.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.01
    return max(0.01, 2 * math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg)))


# ---------------------------------------------------------------- runs, in process

class Runs:
    """Searches and re-trains of AutoIAS on one case's file, in this process, through the offline runner (the
    data prepared once, under ``workdir``)."""

    def __init__(self, workdir: Path, data: list[str], method: list[str], seed: int) -> None:
        self.workdir, self.seed = workdir, seed
        self.base = [f"paths.root={workdir}", f"seed={seed}", "task=binary", "quiet=true", *data, *method]
        self._loaded: Any = None

    def _load(self) -> Any:
        """(config, prepared data, offline data, runner) with the generator's active fields only."""
        if self._loaded is None:
            from autorecbench.config import compose, resolve_device
            from autorecbench.data.cache import DatasetConfig, prepare
            from autorecbench.data.schema import TaskSpec
            from autorecbench.runners.offline import OfflineConfig, OfflineProtocol

            prepared = prepare(DatasetConfig.from_mapping(compose(self.base).data))
            truth = json.loads((Path(prepared.schema.source["path"]).parent / "truth.json").read_text())
            cfg = compose([*self.base, "data.fields=[" + ",".join(truth["active_fields"]) + "]"])
            data_cfg = DatasetConfig.from_mapping(cfg.data)
            prepared = prepare(data_cfg)
            options = {k: v for k, v in cfg.runner.items() if k != "name"}
            runner = OfflineProtocol(OfflineConfig(**options))
            data = runner.load(prepared, TaskSpec.from_name("binary"), resolve_device(str(cfg.device)), data_cfg)
            self._loaded = (cfg, prepared, data, runner, truth)
        return self._loaded

    def truth(self) -> dict[str, Any]:
        return self._load()[4]

    def test_labels(self) -> torch.Tensor:
        return self._load()[2].test.label

    def space_fields(self) -> list[str]:
        return list(self._load()[1].schema.field_names)

    def _method(self, extra: list[str]) -> Any:
        from autorecbench.config import compose
        from autorecbench.data.schema import TaskSpec
        from autorecbench.execute import seed_everything
        from autorecbench.methods.autoias import AutoIAS
        from autorecbench.methods.base import MethodContext

        cfg, prepared, data, _, truth = self._load()
        if extra:
            cfg = compose([*self.base, "data.fields=[" + ",".join(truth["active_fields"]) + "]", *extra])
        seed_everything(self.seed, True)
        return AutoIAS(MethodContext(prepared.schema, TaskSpec.from_name("binary"), cfg.method, cfg.model,
                                     data.train.device, self.seed))

    def space(self) -> Any:
        return self._method([]).space

    def search_and_fit(self, extra: list[str] | None = None) -> tuple[dict[str, Any], float]:
        """Search, derive, re-train: a*'s description (with the last probe logloss) and its test AUC."""
        method = self._method(list(extra or []))
        out = self._load()[3].run(method, self._load()[2])
        return {**method.searched, "probe_valid_logloss": method.search_rows[-1]["probe_valid_logloss"]}, \
            out.headline["auc"]

    def probe_logloss(self, beta: float) -> float:
        """The probe architectures' validation logloss at the end of a search with ``beta`` (no re-train)."""
        from autorecbench.runners.offline import TrainLoop

        method = self._method([f"method.beta={beta}"])
        _, _, data, runner, _ = self._load()
        method.search(TrainLoop(runner.cfg, data))
        return float(method.search_rows[-1]["probe_valid_logloss"])

    def fit(self, architecture: dict[str, Any]) -> float:
        """Re-train ``architecture`` from scratch (no search) with the runner's budget: its test AUC."""
        method = self._method([])
        method.search = lambda loop: architecture  # type: ignore[method-assign]
        return float(self._load()[3].run(method, self._load()[2]).headline["auc"])

    def random_architectures(self, count: int, generator: torch.Generator) -> list[dict[str, Any]]:
        space = self.space()
        archs = space.space.sample_uniform(count, generator)
        return [space.describe({k: v[i] for k, v in archs.items()}) for i in range(count)]


# ---------------------------------------------------------------- architectures against the truth

def _point_mass(arch: dict[str, Any]) -> dict[str, float]:
    chosen = {"|".join(p) for p in arch["selected_pairs"]}
    keys = arch["decisions"]["function"].keys()
    return {k: 1.0 if k in chosen else 0.0 for k in keys}


def structure_statistics(arch: dict[str, Any], truth: dict[str, Any], fields: list[str]) -> dict[str, float]:
    """The structure statistics of a derived architecture (``architecture.json``'s view) against the truth;
    ``p_select_pairs`` None: no distribution (random architectures, filled in by the caller)."""
    informative = set(truth["informative_fields"])
    noise = [f for f in fields if f not in informative]
    planted = {tuple(p) for p in truth["planted_pairs"]}
    pairs = [tuple(k.split("|")) for k in arch["decisions"]["function"]]
    noise_pairs = [p for p in pairs if p[0] not in informative or p[1] not in informative]
    kept = {tuple(p) for p in arch["selected_pairs"]}
    sizes = arch["embedding_dim"]
    used = set(arch["used_fields"])
    out = {
        "planted_pairs_kept": float(len(planted & kept)),
        "noise_pairs_kept_share": len(kept & set(noise_pairs)) / max(len(noise_pairs), 1),
        "informative_minus_noise_size": statistics.fmean(sizes[f] for f in informative)
                                        - statistics.fmean(sizes[f] for f in noise),
        "informative_minus_noise_used_size": statistics.fmean(sizes[f] if f in used else 0 for f in informative)
                                             - statistics.fmean(sizes[f] if f in used else 0 for f in noise),
    }
    p = arch.get("p_select_pairs")
    if p is not None:
        out["p_select_planted_min"] = min(p["|".join(pair)] for pair in planted)
        out["p_select_noise_mean"] = statistics.fmean(p["|".join(pair)] for pair in noise_pairs)
    return out


def oracle_architecture(truth: dict[str, Any], runs: Any) -> dict[str, Any]:
    """The architecture read from the truth (see the module docstring), as ``architecture.json`` describes it."""
    space = runs.space()
    informative = set(truth["informative_fields"])
    planted = {"|".join(p) for p in truth["planted_pairs"]}
    big, small = space.dims[-1], space.dims[0]
    decisions = {
        "embedding_dim": {f: big if f in informative else small for f in space.fields},
        "projection_dim": {f"{a}|{b}": big for a, b in space.pair_names},
        "function": {f"{a}|{b}": "product" for a, b in space.pair_names},
        "selected": {**{f: f in informative for f in space.fields},
                     **{f"{a}|{b}": f"{a}|{b}" in planted for a, b in space.pair_names}},
        "layer": {k: 0 for k in [*space.fields, *(f"{a}|{b}" for a, b in space.pair_names)]},
        "hidden": {f"layer{l}": space.hidden[-1] for l in range(space.layers)},
    }
    return space.describe(space.space.from_json(decisions))
