"""The validation contract every search method plugs into.

A method's validation (:class:`MethodValidation`, one module per method in this package, registered with
``@register_validation``) measures *subjects* on *cases*:

- cases: at least a ``planted`` case (data with a known structure the search should find) and a ``control``
  case with the same marginals and no structure;
- subjects: ``method`` (the search method itself), ``oracle`` (decisions read from the truth, through the same
  code) and ``null`` (random or constant decisions with the same budget).

``measure(case, subject, seed, quick, workdir)`` returns :class:`Statistic` values, each with the threshold a
working search clears. The harness runs every case × subject × seed, writes one row per statistic
(``validation.parquet``: method, case, subject, seed, statistic, value, threshold, passed) and checks that the
references discriminate (:meth:`MethodValidation.expected`): if the oracle does not pass on the planted case or
the null passes there, the harness itself is broken (exit 1); the method's own verdict is a finding (exit 0).
"""

from __future__ import annotations

import json
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from autorecbench.plugins import import_package_modules

SUBJECTS = ("method", "oracle", "null")


@dataclass(frozen=True)
class Statistic:
    """One number a case measures, and the bar a search that found the planted structure clears."""

    name: str
    value: float
    threshold: float
    higher_is_better: bool = True

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold


class MethodValidation(ABC):
    """A method's planted-truth validation (see the module docstring)."""

    method: ClassVar[str]  # the registered method name (``method=NAME``)
    cases: ClassVar[tuple[str, ...]] = ("planted", "control")
    # Statistics the method cannot pass by design, with the reason printed under the verdict table.
    by_design: ClassVar[dict[str, str]] = {}
    # Whether ``measure`` applies the command line's ``method.KEY=VALUE`` / ``model.KEY=VALUE`` / ``device=``
    # overrides (``overrides``, set by the harness before measuring) to the method and its references.
    accepts_overrides: ClassVar[bool] = False
    overrides: tuple[str, ...] = ()

    @abstractmethod
    def measure(self, case: str, subject: str, seed: int, quick: bool, workdir: Path) -> list[Statistic]:
        """Run ``subject`` on ``case`` with ``seed`` (``quick``: the ≤ 3-minute budget on 2 cores) and return
        its statistics. ``workdir`` is a scratch folder for generated data and runs (deleted afterwards)."""

    def expected(self, case: str, subject: str, statistic: str) -> bool | None:
        """Whether a statistic must pass for the references to discriminate; None: no expectation (the method
        under test, whose verdict is the finding). Default: on the planted case the oracle passes and the null
        fails; on the control case nothing passes."""
        if subject == "method":
            return None
        if case == "planted":
            return subject == "oracle"
        return False


VALIDATIONS: dict[str, type[MethodValidation]] = {}


SharedT = TypeVar("SharedT")
ArchT = TypeVar("ArchT")


def shared_once(cache: dict[tuple[str, int, bool, str], Any], name: str, case: str, seed: int, quick: bool,
                workdir: Path, load: Callable[[dict[str, Any]], SharedT], compute: Callable[[], SharedT]) -> SharedT:
    """Work every subject of one case and seed shares (e.g. random architectures trained once): computed once,
    kept in ``cache`` and in ``workdir`` as JSON (a dataclass), so a later subject or rerun reads it back."""
    key = (case, seed, quick, str(workdir))
    if key not in cache:
        stored = workdir / f"{name}-shared-{case}-{seed}-{'quick' if quick else 'full'}.json"
        if stored.is_file():
            cache[key] = load(json.loads(stored.read_text()))
        else:
            value = compute()
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps(asdict(value)))  # type: ignore[call-overload]
            cache[key] = value
    return cache[key]


def fit_random_architectures(architectures: Iterable[ArchT], fit: Callable[[ArchT], float],
                              structure: Callable[[ArchT], dict[str, float]]) -> tuple[list[float], dict[str, float]]:
    """The null of a search validation: each random architecture trained (its test AUC, in draw order) and the
    mean of its structure statistics."""
    aucs, structures = [], []
    for arch in architectures:
        aucs.append(fit(arch))
        structures.append(structure(arch))
    return aucs, {k: statistics.fmean(s[k] for s in structures) for k in structures[0]}


def register_validation(cls: type[MethodValidation]) -> type[MethodValidation]:
    if cls.method in VALIDATIONS and VALIDATIONS[cls.method] is not cls:
        raise RuntimeError(f"two validations registered for {cls.method!r}")
    VALIDATIONS[cls.method] = cls
    return cls


def load_validations() -> dict[str, type[MethodValidation]]:
    """Import every module of ``autorecbench.validate`` so each method's validation registers itself."""
    import_package_modules("autorecbench.validate", skip=("base", "harness"))
    return VALIDATIONS
