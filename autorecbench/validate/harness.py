"""The validation harness: every case × subject × seed of one method's validation, the check that its references
discriminate, the method's verdict, and the run folder (``autorecbench validate``).

- Rows: one per (case, subject, seed, statistic) — ``validation.parquet`` with the columns of :data:`COLUMNS`.
- References discriminate when every row with an expectation (:meth:`MethodValidation.expected`: on the planted
  case the oracle passes and the null fails; on the control nothing passes) meets it, on every seed. If one does
  not, the harness or the case is broken and the command exits 1; the method's own results never change the
  exit code.
- Verdict per statistic for the method under test: ``passes`` (planted case passed on every seed, every other
  case failed on every seed), ``fails`` (the planted case failed on every seed), otherwise ``mixed``. A statistic
  measured only on the control (e.g. AutoIAS's ``auc_distance_from_half``: without signal every model must be a
  coin) is judged there: ``passes`` when it passed on every control row, ``fails`` when on none. A statistic
  the validation lists in ``by_design`` is reported with its reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from autorecbench import envinfo
from autorecbench.results.run_folder import RunFolder
from autorecbench.validate.base import SUBJECTS, MethodValidation

log = logging.getLogger("autorecbench")

COLUMNS: dict[str, Any] = {
    "method": pl.String, "case": pl.String, "subject": pl.String, "seed": pl.Int64, "statistic": pl.String,
    "value": pl.Float64, "threshold": pl.Float64, "passed": pl.Boolean,
}


@dataclass(frozen=True)
class Row:
    """One statistic of one subject on one case and seed (a row of ``validation.parquet``)."""

    method: str
    case: str
    subject: str
    seed: int
    statistic: str
    value: float
    threshold: float
    passed: bool


@dataclass(frozen=True)
class Mismatch:
    """A reference row that does not do what a working harness makes it do."""

    row: Row
    expected: bool

    def describe(self) -> str:
        r = self.row
        should = "pass" if self.expected else "fail"
        return (f"{r.subject} should {should} {r.statistic} on the {r.case} case (seed {r.seed}) "
                f"but measured {r.value:.4g} against {r.threshold:g}")


@dataclass(frozen=True)
class Verdict:
    """The method's result on one statistic over the seeds."""

    statistic: str
    seeds: int
    planted_passed: int
    other_passed: int  # passes on the other cases (the control), summed over cases and seeds
    by_design: str | None
    planted_rows: int  # rows measured on the planted case (0: a control-only statistic)
    other_rows: int  # rows measured on the other cases

    @property
    def label(self) -> str:
        if self.planted_rows == 0:  # a control-only statistic: a working search passes it there
            if self.other_passed == self.other_rows:
                return "passes"
            return "fails" if self.other_passed == 0 else "mixed"
        if self.planted_passed == self.planted_rows and self.other_passed == 0:
            return "passes"
        if self.planted_passed == 0:
            return "fails"
        return "mixed"

    def counts(self) -> str:
        parts = []
        if self.planted_rows:
            parts.append(f"planted {self.planted_passed}/{self.planted_rows} seeds")
        if self.other_rows:
            parts.append(f"control {self.other_passed}/{self.other_rows}")
        return ", ".join(parts)


@dataclass
class ValidationResult:
    method: str
    seeds: list[int]
    quick: bool
    rows: list[Row]
    mismatches: list[Mismatch]
    verdicts: list[Verdict]
    seconds: float

    @property
    def discriminates(self) -> bool:
        return not self.mismatches

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame([asdict(r) for r in self.rows], schema=COLUMNS, orient="row")


def check_references(validation: MethodValidation, rows: Sequence[Row]) -> list[Mismatch]:
    """Every row whose subject has an expectation and does not meet it."""
    out = []
    for r in rows:
        expected = validation.expected(r.case, r.subject, r.statistic)
        if expected is not None and r.passed != expected:
            out.append(Mismatch(r, expected))
    return out


def verdicts(validation: MethodValidation, rows: Sequence[Row]) -> list[Verdict]:
    mine = [r for r in rows if r.subject == "method"]
    names = list(dict.fromkeys(r.statistic for r in mine))
    seeds = len({r.seed for r in mine})
    out = []
    for name in names:
        planted = [r.passed for r in mine if r.statistic == name and r.case == "planted"]
        other = [r.passed for r in mine if r.statistic == name and r.case != "planted"]
        out.append(Verdict(name, seeds, sum(planted), sum(other), validation.by_design.get(name),
                           len(planted), len(other)))
    return out


def run_validation(validation: MethodValidation, seeds: Sequence[int], quick: bool,
                   on_row: Callable[[Row, float], None] | None = None) -> ValidationResult:
    """Measure every case × subject × seed (in that nesting) in a scratch folder that is deleted afterwards."""
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="autorecbench-validate-") as scratch:
        for case in validation.cases:
            for subject in SUBJECTS:
                for seed in seeds:
                    t0 = time.perf_counter()
                    for stat in validation.measure(case, subject, seed, quick, Path(scratch)):
                        row = Row(validation.method, case, subject, int(seed), stat.name, float(stat.value),
                                  float(stat.threshold), stat.passed)
                        rows.append(row)
                        if on_row:
                            on_row(row, time.perf_counter() - t0)
    return ValidationResult(validation.method, list(seeds), quick, rows, check_references(validation, rows),
                            verdicts(validation, rows), time.perf_counter() - started)


def _mean_sd(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "nan"
    if len(finite) == 1:
        return f"{finite[0]:.3f}"
    return f"{statistics.fmean(finite):.3f} ± {statistics.stdev(finite):.3f}"


def summary_rows(validation: MethodValidation, result: ValidationResult) -> list[dict[str, str]]:
    """The verdict table: per statistic × case × subject, the value over seeds, how many seeds passed, and
    what a working harness expects of the references."""
    out = []
    keys = list(dict.fromkeys((r.statistic, r.case, r.subject) for r in result.rows))
    for statistic, case, subject in sorted(keys, key=lambda k: (k[0], validation.cases.index(k[1]),
                                                               SUBJECTS.index(k[2]))):
        rows = [r for r in result.rows if (r.statistic, r.case, r.subject) == (statistic, case, subject)]
        expected = validation.expected(case, subject, statistic)
        passed = sum(r.passed for r in rows)
        ok = expected is None or all(r.passed == expected for r in rows)
        out.append({
            "statistic": statistic, "case": case, "subject": subject,
            "value (mean ± sd)": _mean_sd([r.value for r in rows]),
            "per seed": ", ".join(f"{r.value:.3f}" for r in rows),
            "threshold": f"{rows[0].threshold:g}",
            "passed": f"{passed}/{len(rows)}",
            "expected": "–" if expected is None else ("pass" if expected else "fail") + ("" if ok else "  ✗"),
        })
    return out


def verdict_lines(result: ValidationResult) -> list[str]:
    lines = []
    for v in result.verdicts:
        counts = v.counts()
        if v.by_design:
            lines.append(f"{result.method} {v.statistic}: {v.label} ({counts}); cannot pass by design: {v.by_design}")
        else:
            lines.append(f"{result.method} {v.statistic}: {v.label} ({counts})")
    if result.discriminates:
        lines.append("references discriminate: the oracle passes and the null fails on the planted case, nothing "
                     "passes on the control, on every seed")
    else:
        lines.append(f"references do NOT discriminate ({len(result.mismatches)} rows): the harness or a case is broken")
        lines += [f"  {m.describe()}" for m in result.mismatches]
    return lines


def run_to_folder(validation: MethodValidation, seeds: Sequence[int], quick: bool, root: Path,
                  info: dict[str, Any], on_row: Callable[[Row, float], None] | None = None) -> tuple[ValidationResult, Path]:
    """:func:`run_validation` into ``<root>/<time>_<method>/`` (``validation.parquet``, ``run.json``), written as a
    run's folder is: as ``.partial`` until complete, then renamed; a failure or interruption keeps the
    ``.partial`` folder with its status and the error in ``run.json``."""
    started = dt.datetime.now()
    folder = RunFolder(root, f"{started:%Y%m%d-%H%M%S}_{validation.method}")
    payload: dict[str, Any] = {
        "kind": "validation",
        "run_id": folder.run_id,
        "status": "running",
        "started_at": started.astimezone().isoformat(timespec="seconds"),
        "method": validation.method,
        **info,
        "seeds": list(seeds),
        "quick": quick,
        "cases": list(validation.cases),
        "subjects": list(SUBJECTS),
        "by_design": dict(validation.by_design),
        "command": sys.argv,
        "git": envinfo.git_state(),
        "versions": envinfo.package_versions(),
    }
    try:
        folder.write_json("run.json", payload)
        result = run_validation(validation, seeds, quick, on_row)
        result.frame().write_parquet(folder.path / "validation.parquet")
        payload.update(
            status="complete",
            finished_at=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            wall_seconds=result.seconds,
            references_discriminate=result.discriminates,
            mismatches=[asdict(m) for m in result.mismatches],
            verdicts={v.statistic: {"verdict": v.label, "planted_passed": v.planted_passed,
                                    "control_passed": v.other_passed, "seeds": v.seeds,
                                    "planted_rows": v.planted_rows, "control_rows": v.other_rows}
                      for v in result.verdicts},
        )
        folder.write_json("run.json", payload)
        return result, folder.finalize()
    except BaseException as exc:
        folder.record_failure(payload, exc)
        raise
