"""``autorecbench validate``: the harness (rows, the references-discriminate check, verdicts, the run folder and
exit codes, with toy validations whose numbers are known), the statistics against brute force, the planted
streams, and — slow — the real validations of ESAPN, DARTS and AutoEmb at the quick budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from autorecbench.errors import UserError
from autorecbench.validate.base import MethodValidation, Statistic
from autorecbench.validate.harness import COLUMNS, Row, check_references, run_validation, verdicts
from autorecbench.validate.size_search import Sizes, between, within
from conftest import REPO

TOYS = '''
from autorecbench.validate.base import MethodValidation, Statistic, register_validation

VALUES = {"oracle": 1.0, "null": 0.0, "method": 0.7}
GAPS = {"oracle": 1.0, "null": 0.0, "method": -0.5}


@register_validation
class Toy(MethodValidation):
    """The oracle passes and the null fails on the planted case; on the control everything is 0."""

    method = "toy"
    by_design = {"gap": "a toy reason"}

    def measure(self, case, subject, seed, quick, workdir):
        planted = case == "planted"
        return [Statistic("signal", (VALUES[subject] if planted else 0.0) + 0.01 * seed, 0.5),
                Statistic("gap", GAPS[subject] if planted else 0.0, 0.5)]


@register_validation
class BrokenToy(Toy):
    """A broken reference: the oracle reads no truth (it measures what the null measures)."""

    method = "toy-broken"

    def measure(self, case, subject, seed, quick, workdir):
        return super().measure(case, "null" if subject == "oracle" else subject, seed, quick, workdir)
'''


@pytest.fixture(scope="module")
def toys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("toys")
    (folder / "toy_validations.py").write_text(TOYS)
    return folder


def _toy_classes(toys: Path) -> dict[str, type[MethodValidation]]:
    sys.path.insert(0, str(toys))
    try:
        import toy_validations  # noqa: F401  (registers both)
    finally:
        sys.path.remove(str(toys))
    from autorecbench.validate.base import VALIDATIONS

    return {name: VALIDATIONS[name] for name in ("toy", "toy-broken")}


def test_harness_measures_every_case_subject_seed_and_checks_the_references(toys: Path) -> None:
    classes = _toy_classes(toys)
    good = run_validation(classes["toy"](), [0, 1, 2], quick=True)
    assert len(good.rows) == 2 * 3 * 3 * 2  # cases x subjects x seeds x statistics
    assert {(r.case, r.subject, r.seed) for r in good.rows} == {
        (c, s, seed) for c in ("planted", "control") for s in ("method", "oracle", "null") for seed in (0, 1, 2)}
    assert good.discriminates and good.mismatches == []
    by_name = {v.statistic: v for v in good.verdicts}
    assert (by_name["signal"].label, by_name["signal"].planted_passed) == ("passes", 3)
    assert (by_name["gap"].label, by_name["gap"].by_design) == ("fails", "a toy reason")
    frame = good.frame()
    assert frame.schema == pl.Schema(COLUMNS)
    broken = run_validation(classes["toy-broken"](), [0, 1], quick=True)
    assert not broken.discriminates
    assert {(m.row.case, m.row.subject, m.row.statistic, m.row.seed) for m in broken.mismatches} == {
        ("planted", "oracle", stat, seed) for stat in ("signal", "gap") for seed in (0, 1)}


def test_verdicts_and_mismatches_on_hand_made_rows() -> None:
    """Mixed seeds are 'mixed'; a pass on the control also makes the verdict 'mixed'; a statistic measured only on
    the control is judged there; a null that passes on
    the planted case and an oracle that passes on the control are both mismatches."""

    class Plain(MethodValidation):
        method = "plain"

        def measure(self, case, subject, seed, quick, workdir):  # type: ignore[no-untyped-def]
            raise AssertionError

    def row(case: str, subject: str, seed: int, passed: bool) -> Row:
        return Row("plain", case, subject, seed, "s", 1.0 if passed else 0.0, 0.5, passed)

    rows = [row("planted", "method", 0, True), row("planted", "method", 1, False),
            row("control", "method", 0, False), row("control", "method", 1, False)]
    assert [v.label for v in verdicts(Plain(), rows)] == ["mixed"]
    rows = [row("planted", "method", s, True) for s in (0, 1)] + [row("control", "method", 0, True)]
    assert [v.label for v in verdicts(Plain(), rows)] == ["mixed"]
    # A control-only statistic (no planted rows) is judged on the control: all pass, none, or some.
    for passes, label in (((True, True), "passes"), ((False, False), "fails"), ((True, False), "mixed")):
        only_control = [row("control", "method", s, p) for s, p in enumerate(passes)]
        (v,) = verdicts(Plain(), only_control)
        assert (v.label, v.counts()) == (label, f"control {sum(passes)}/2")
    bad = [row("planted", "null", 0, True), row("control", "oracle", 0, True), row("planted", "oracle", 0, True)]
    assert [(m.row.case, m.row.subject) for m in check_references(Plain(), bad)] == [("planted", "null"), ("control", "oracle")]


def _cli_with_toys(toys: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, with the toy validations imported first (as a plug-in module would be)."""
    code = (f"import sys; sys.path.insert(0, {str(toys)!r}); import toy_validations; "
            f"from autorecbench.cli.app import main; sys.argv = ['autorecbench', *{list(args)!r}]; main()")
    env = {**os.environ, "AUTORECBENCH_HOME": str(home), "COLUMNS": "250",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=home, timeout=300)


def test_validate_command_writes_the_run_folder_and_prints_the_verdicts(toys: Path, home: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from autorecbench.cli.validate import validate

    _toy_classes(toys)
    monkeypatch.setenv("AUTORECBENCH_HOME", str(home))
    validate(["method=toy"], quick=True, seeds="0,1")
    out = capsys.readouterr().out
    assert "toy signal: passes (planted 2/2 seeds, control 0/2)" in out
    assert "toy gap: fails" in out and "cannot pass by design: a toy reason" in out
    assert "references discriminate" in out
    (folder,) = (home / "validation").iterdir()
    frame = pl.read_parquet(folder / "validation.parquet")
    assert frame.columns == list(COLUMNS) and frame.height == 2 * 3 * 2 * 2
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "complete" and info["kind"] == "validation" and info["seeds"] == [0, 1]
    assert info["quick"] is True and info["references_discriminate"] is True
    assert info["verdicts"]["signal"]["verdict"] == "passes" and info["by_design"] == {"gap": "a toy reason"}
    assert {"git", "versions", "hardware"} <= info.keys() and info["hardware"]["torch_threads"] >= 1
    with pytest.raises(UserError, match="--seeds"):  # bad input: nothing more written
        validate(["method=toy"], quick=True, seeds="0,x")
    assert len(list((home / "validation").iterdir())) == 1


def test_a_broken_reference_makes_the_command_exit_1(toys: Path, home: Path) -> None:
    """Control of the harness, through the real CLI: the oracle of ``toy-broken`` measures what the null
    measures, so the references do not discriminate; the folder is still written and says so."""
    broken = _cli_with_toys(toys, home, "validate", "method=toy-broken", "--seeds", "0")
    assert broken.returncode == 1, broken.stderr
    assert "oracle should pass signal on the planted case (seed 0)" in broken.stdout
    assert broken.stderr.strip().splitlines()[-1].startswith("error: the references do not discriminate")
    (folder,) = (home / "validation").iterdir()
    assert json.loads((folder / "run.json").read_text())["references_discriminate"] is False


@pytest.mark.parametrize("arguments, fragment", [
    (["method=nosuch"], "unknown method 'nosuch'"),
    (["method=fixed"], "method 'fixed' has no planted-truth validation"),
    ([], "say which method"),
    (["method=esapn", "data=ml-20m"], "validate takes method.KEY=VALUE"),
    (["method=esapn", "method.norm_scope=everywhere"], "method.norm_scope"),
    (["method=esapn", "--fast"], "unknown option '--fast'"),
])
def test_bad_validate_arguments_are_user_errors(arguments: list[str], fragment: str, home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from autorecbench.cli.validate import validate

    monkeypatch.setenv("AUTORECBENCH_HOME", str(home))
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        validate(arguments, quick=True, seeds="0")
    assert not (home / "validation").exists()


def _brute_between(a: Sizes, b: Sizes) -> float:
    """Per (field, bucket) the difference of means, weighted by entities: loops, no numpy grouping."""
    num, den = 0.0, 0
    for field in ("user", "item"):
        buckets: dict[int, list[int]] = {}
        for code, f in enumerate(a.frequency[field]):
            if f > 0 and b.frequency[field][code] > 0:
                buckets.setdefault(int(np.floor(np.log2(f))), []).append(code)
        for members in buckets.values():
            diff = (sum(a.log2_size[field][c] for c in members) - sum(b.log2_size[field][c] for c in members))
            num += diff
            den += len(members)
    return num / den


def test_statistics_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    n = {"user": 40, "item": 60}

    def sizes(scale: float) -> Sizes:
        freq = {f: rng.integers(0, 50, n[f]) for f in n}
        return Sizes({f: rng.normal(3, 1, n[f]) * scale for f in n}, freq)

    a, b = sizes(1.0), sizes(1.0)
    b.frequency = a.frequency  # the same stream positions, as the between-streams case has
    assert between(a, b) == pytest.approx(_brute_between(a, b))
    assert between(a, a) == 0.0
    pair = np.repeat(np.arange(30), 2)
    member = np.tile([0, 1], 30)
    order = rng.permutation(60)
    s = sizes(1.0)
    expected = np.mean([s.log2_size["item"][(pair == p) & (member == 0)][0] - s.log2_size["item"][(pair == p) & (member == 1)][0]
                        for p in range(30) if (s.frequency["item"][pair == p] > 0).all()])
    shuffled = Sizes({f: v.copy() for f, v in s.log2_size.items()}, {f: v.copy() for f, v in s.frequency.items()})
    shuffled.log2_size["item"], shuffled.frequency["item"] = s.log2_size["item"][order], s.frequency["item"][order]
    assert within(s, pair, member) == pytest.approx(expected)
    assert within(shuffled, pair[order], member[order]) == pytest.approx(expected)


def test_planted_streams_share_rows_and_differ_only_where_planted(tmp_path: Path) -> None:
    """rich / flat / flat_redrawn: the same users and items in the same order; flat = rich without the
    interaction (same biases and noise); the redrawn stream has other ratings. Pairs: equal Zipf weights, the
    first item of each pair rich."""
    from autorecbench.data.synthetic import MovieLensGenerator, generate_movielens

    common = {"seed": 3, "n_users": 60, "n_items": 80, "n_interactions": 20_000, "latent_dim": 8, "noise": 0.0}
    frames, truths = {}, {}
    for name, extra in {"rich": {"rich": "all", "rating_seed": 3}, "flat": {"rich": "none", "rating_seed": 3},
                        "redrawn": {"rich": "none", "rating_seed": 1003},
                        "pairs": {"rich": "pair_first", "item_pairs": True, "rating_seed": 3}}.items():
        generate_movielens(MovieLensGenerator(**common, **extra), tmp_path / name)
        frames[name] = pl.read_csv(tmp_path / name / "ratings.csv").sort("timestamp")
        truths[name] = np.load(tmp_path / name / "truth.npz")
    for name in ("flat", "redrawn"):
        assert frames[name]["userId"].equals(frames["rich"]["userId"])
        assert frames[name]["movieId"].equals(frames["rich"]["movieId"])
    flat, t = frames["flat"], truths["flat"]
    expected = np.clip(np.round(2 * (3.5 + t["user_bias"][flat["userId"] - 1] + t["item_bias"][flat["movieId"] - 1])) / 2, 0.5, 5)
    assert np.array_equal(flat["rating"].to_numpy(), expected)  # biases only (noise 0 here)
    assert not frames["rich"]["rating"].equals(flat["rating"]) and not frames["redrawn"]["rating"].equals(flat["rating"])
    assert not t["user_rich"].any() and truths["rich"]["item_rich"].all()
    pairs = truths["pairs"]
    assert np.array_equal(pairs["item_rich"], pairs["item_member"] == 0)
    assert not np.abs(pairs["item_factors"][~pairs["item_rich"]]).any()
    counts = np.bincount(frames["pairs"]["movieId"].to_numpy() - 1, minlength=80)
    per_pair = np.zeros((40, 2))
    per_pair[pairs["item_pair"], pairs["item_member"]] = counts
    ratio = per_pair[:5].sum(0)  # the five most popular pairs: the two members about equally frequent
    assert abs(ratio[0] - ratio[1]) / ratio.sum() < 0.05


def test_bad_generator_structure_options_are_user_errors() -> None:
    from autorecbench.data.synthetic import MovieLensGenerator

    with pytest.raises(UserError, match="pair_first needs"):
        MovieLensGenerator(rich="pair_first")
    with pytest.raises(UserError, match="even n_items"):
        MovieLensGenerator(item_pairs=True, n_items=7)
    with pytest.raises(UserError, match="data.generator.rich"):
        MovieLensGenerator(rich="some")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["esapn", "darts", "autoemb"])
def test_references_discriminate_at_the_quick_budget_on_two_seeds(method: str, home: Path) -> None:
    """The real validation through the CLI: exit 0 means the oracle passed and the null failed on the planted
    case, and nothing passed on the control, for both seeds. Control of the check itself: the same rows with
    the oracle and the null swapped are caught."""
    from conftest import run_cli
    from autorecbench.validate.base import load_validations

    done = run_cli("validate", f"method={method}", "--quick", "--seeds", "0,1", home=home, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    (folder,) = (home / "validation").iterdir()
    frame = pl.read_parquet(folder / "validation.parquet")
    planted = frame.filter(pl.col("case") == "planted")
    assert planted.filter(pl.col("subject") == "oracle")["passed"].all()
    assert not planted.filter(pl.col("subject") == "null")["passed"].any()
    assert not frame.filter((pl.col("case") == "control") & (pl.col("subject") != "method"))["passed"].any()
    swapped = [Row(**{**r, "subject": {"oracle": "null", "null": "oracle"}.get(r["subject"], r["subject"])})
               for r in frame.to_dicts()]
    validation = load_validations()[method]()
    assert len(check_references(validation, swapped)) == 2 * 2 * 2  # 2 statistics x 2 seeds x (oracle, null)


def test_shared_work_is_computed_once_and_read_back_from_the_workdir(tmp_path: Path) -> None:
    from dataclasses import dataclass, field

    from autorecbench.validate.base import shared_once

    @dataclass
    class Work:
        aucs: list[float] = field(default_factory=list)

    calls: list[int] = []

    def compute() -> Work:
        calls.append(1)
        return Work([0.5, 0.75])

    def load(d: dict) -> Work:
        return Work(**d)

    cache: dict = {}
    first = shared_once(cache, "toy", "planted", 0, True, tmp_path, load, compute)
    assert shared_once(cache, "toy", "planted", 0, True, tmp_path, load, compute) is first and calls == [1]
    assert (tmp_path / "toy-shared-planted-0-quick.json").is_file()
    # a new process (empty cache) reads the file instead of computing again; another seed computes
    assert shared_once({}, "toy", "planted", 0, True, tmp_path, load, compute) == Work([0.5, 0.75]) and calls == [1]
    shared_once({}, "toy", "planted", 1, True, tmp_path, load, compute)
    assert calls == [1, 1]
