"""The run lifecycle around checkpoints: divergence (status `diverged`, exit 3), a failure inside a method
(status `failed`, exit 1), `compare` with damaged and diverged runs among good ones, bad overrides (one line,
exit 2, before any work), liveness, and cache folders that are never deleted under a reader."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from autorecbench.config import compose
from autorecbench.execute import execute

from conftest import REPO, one_error_line, read_run, run_cli, run_folders, run_main

ML100K = ["data.path=" + str(REPO / "data" / "raw" / "ml-100k")]
SMALL_CTR = ["data=synthetic-criteo", "data.generator.rows=10000", "data.generator.n_fields=8",
             "data.generator.cardinality_max=20", "runner.epochs=2"]


def _in_process_run(home: Path, *overrides: str) -> Path:
    return execute(compose([f"paths.root={home}", "device=cpu", *overrides]), list(overrides))


# ------------------------------------------------------------------------------------- divergence

def test_streaming_divergence_stops_at_the_window_and_compare_lists_it_apart(
        home: Path, ml100k_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """FIXED with lr=1e6 saturates its sigmoid (finite, AUC ~0.5): before, it completed and was averaged in."""
    good = [_in_process_run(home, *ML100K, "runner.max_rows=3000", f"seed={s}") for s in (0, 1)]
    done = run_cli("run", *ML100K, "runner.max_rows=12000", "method.lr=1e6", "-q", home=home)
    assert done.returncode == 3, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "run diverged in the stream stage at step 20: logloss" in errors[0]
    (diverged,) = [f for f in run_folders(home) if f.name.endswith(".partial")]
    info = read_run(diverged)
    assert info["status"] == "diverged" and info["divergence"]["step"] == 20
    assert "constant prediction" in info["divergence"]["reason"] and not (diverged / "checkpoint").exists()

    # Damaged runs among the good ones: each listed apart as unreadable, the rest compares (exit 0).
    for name, damage in (("empty", lambda f: (f / "metrics.parquet").write_bytes(b"")),
                         ("cut", lambda f: (f / "metrics.parquet").write_bytes((f / "metrics.parquet").read_bytes()[:300])),
                         ("json", lambda f: (f / "run.json").write_text(""))):
        copy = home / "results" / f"damaged-{name}"
        shutil.copytree(good[0], copy)
        damage(copy)
    def compare(*args: str) -> str:
        code, out, err = run_main("compare", "results", *args, home=home, capsys=capsys, monkeypatch=monkeypatch)
        assert code == 0 and "Traceback" not in out + err, err
        return out

    payload = json.loads(compare("-f", "json"))
    assert payload["runs"] == 2 and payload["groups"][0]["n"] == 2 and payload["groups"][0]["status"] == "complete"
    assert [d["status"] for d in payload["diverged"]] == ["diverged"]
    assert "step 20" in payload["diverged"][0]["error"]
    statuses = sorted(r["status"] for r in payload["incomplete"])
    assert len(statuses) == 3 and all(s.startswith("unreadable: ") for s in statuses)
    assert any("metrics.parquet unreadable" in s for s in statuses) and any("run.json" in s for s in statuses)
    csv = pl.read_csv(compare("-f", "csv").encode())
    assert csv.columns[:2] == ["status", "dataset"] and csv.height == 5
    assert csv["status"].to_list()[:2] == ["complete", "diverged"]
    table = compare()
    assert "Diverged runs (not in the means)" in table and "unreadable: metrics.parquet" in table
    markdown = compare("-f", "markdown")
    assert "Diverged runs (not in the means):" in markdown and markdown.count("| unreadable: ") == 3


def test_offline_divergence_exits_3(home: Path) -> None:
    done = run_cli("run", *SMALL_CTR, "method.lr=1e6", "-q", home=home)
    assert done.returncode == 3, done.stderr
    # 8,000 training rows, 4 steps per epoch: the first validation evaluation finds it (a logloss of several nats
    # against a constant prediction's ~0.58).
    assert "run diverged in the fit stage at step 4: logloss" in done.stderr and "Traceback" not in done.stderr
    (folder,) = run_folders(home)
    info = read_run(folder)
    assert info["status"] == "diverged" and info["divergence"]["stage"] == "fit" and info["divergence"]["step"] == 4


def test_a_non_finite_step_stops_at_that_step(home: Path, ml100k_dir: Path) -> None:
    from autorecbench.errors import RunDiverged

    with pytest.raises(RunDiverged) as caught:
        _in_process_run(home, *ML100K, "runner.max_rows=3000", "method=esapn", "method.lr=inf")
    assert (caught.value.stage, caught.value.step) == ("stream", 2) and "non-finite" in caught.value.reason
    with pytest.raises(RunDiverged) as caught:
        _in_process_run(home, *SMALL_CTR[:-1], "runner.epochs=1", "method.lr=inf")
    assert (caught.value.stage, caught.value.step) == ("fit", 2) and "non-finite training loss" in caught.value.reason


def test_guard_rules_against_brute_force() -> None:
    import torch

    from autorecbench.data.schema import TaskSpec
    from autorecbench.errors import RunDiverged
    from autorecbench.runners.base import LifecycleConfig
    from autorecbench.runners.guard import DivergenceGuard, chance_loss, constant_loss

    guard = DivergenceGuard("fit", LifecycleConfig(divergence_warmup=3), torch.device("cpu"))
    for step, loss in enumerate([0.7, 0.5, 60.0, 49.0], start=1):  # 60 > 100 x 0.5 but within the warm-up
        guard.observe(step, torch.tensor(loss))
    with pytest.raises(RunDiverged, match="more than 100 times"):
        guard.observe(5, torch.tensor(50.1))
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    p = 0.25
    expected = -(0.25 * torch.log(torch.tensor(p)) + 0.75 * torch.log(torch.tensor(1 - p)))
    assert constant_loss(TaskSpec.from_name("binary"), labels, labels) == pytest.approx(float(expected), rel=1e-6)
    guard.evaluation(1, "valid split", "logloss", 1.49 * 0.5, 0.5, 0.2)  # within the 50% margin
    with pytest.raises(RunDiverged, match="worse than a constant"):
        guard.evaluation(1, "valid split", "logloss", 1.51 * 0.5, 0.5, 0.2)
    # skewed labels: the constant's loss is small, an untrained model's (the uniform prediction's) is the bar
    chance = chance_loss(TaskSpec.from_name("binary"))
    assert chance == pytest.approx(math.log(2))
    guard.evaluation(1, "valid split", "logloss", 1.49 * chance, 0.13, chance)
    with pytest.raises(RunDiverged, match="uniform prediction"):
        guard.evaluation(1, "valid split", "logloss", 1.51 * chance, 0.13, chance)
    with pytest.raises(RunDiverged, match="non-finite prediction"):
        guard.observe(6, torch.tensor(0.5), torch.tensor([0.5, float("nan")]))


# ------------------------------------------------------------------------------------- a failure inside a method

def test_an_exception_in_a_learn_step_is_a_failed_run_exit_1(home: Path, ml100k_dir: Path) -> None:
    script = (
        "import sys\n"
        "from autorecbench.methods.fixed import Fixed\n"
        "def boom(self, batch, history):\n"
        "    if batch.index == 3:\n"
        "        raise ValueError('injected fault in batch 3')\n"
        "    return original(self, batch, history)\n"
        "original = Fixed.learn_with_logits\n"
        "Fixed.learn_with_logits = boom\n"
        "from autorecbench.cli.app import main\n"
        f"sys.argv = ['autorecbench', 'run', 'runner.max_rows=3000', {ML100K[0]!r}, '-q']\n"
        "main()\n")
    env = {**os.environ, "AUTORECBENCH_HOME": str(home), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=home)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "run failed" in errors[0] and "ValueError: injected fault in batch 3" in errors[0]
    (folder,) = run_folders(home)
    info = read_run(folder)
    assert info["status"] == "failed" and "injected fault" in info["error"]
    assert "learn_with_logits" in info["traceback"] and "boom" in info["traceback"]


# ------------------------------------------------------------------------------------- bad overrides

def _main(args: list[str], home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI in this process (no start-up cost): exit 2 with one line on stderr."""
    return one_error_line(*run_main(*args, home=home, capsys=capsys, monkeypatch=monkeypatch)[::2])


@pytest.mark.parametrize(("args", "fragment"), [
    (["seed=1.5"], "seed must be an integer, got '1.5'"),
    (["-m", "seed=0,abc"], "seed must be an integer, got 'abc'"),
    (["runner.batch_size=abc"], "runner.batch_size must be an integer, got 'abc'"),
    (["runner.max_rows=1e3"], "runner.max_rows must be an integer (or null), got '1000.0'"),
    (["method.lr=fast"], "method.lr must be a number, got 'fast'"),
    (["deterministic=maybe"], "deterministic must be true or false"),
    (["data=synthetic-criteo", "data.chunk_bytes=abc"], "data.chunk_bytes must be an integer"),
    (["runner.checkpoint_every=0"], "runner.checkpoint_every must be >= 1"),
    (["method.embedding_dim=" + "9" * 5000], "method.embedding_dim"),
])
def test_bad_override_is_one_line_before_any_work(args: list[str], fragment: str, home: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    line = _main(["run", *args, *ML100K], home, capsys, monkeypatch)
    assert fragment in line and len(line) < 400
    assert not (home / "results").exists() and not (home / "data").exists()


def test_unwritable_results_or_cache_folder_stops_before_the_data_is_read(
        home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = home / "a-file"
    blocker.write_text("")
    line = _main(["run", *ML100K, f"paths.results_dir={blocker}/results"], home, capsys, monkeypatch)
    assert "results folder" in line and "is not writable" in line
    line = _main(["run", *ML100K, f"data.processed_dir={blocker}/cache"], home, capsys, monkeypatch)
    assert "cache folder" in line and "is not writable" in line
    assert sorted(p.name for p in home.iterdir()) == ["a-file"]


def test_a_data_option_documented_in_the_readme_overrides_without_plus(home: Path) -> None:
    cfg = compose(["data=criteo", "data.chunk_bytes=1000000"])
    assert cfg.data.chunk_bytes == 1_000_000


# ------------------------------------------------------------------------------------- liveness and caches

def test_liveness_from_pid_and_heartbeat() -> None:
    from autorecbench.results.checkpoint import alive, owner

    me = owner()
    assert alive(me)
    assert not alive({**me, "pid": 2**22 + 1})  # beyond any pid on Linux
    assert not alive({**me, "pid_start": (me["pid_start"] or 0) + 1})  # a reused pid
    assert not alive({})  # written before runs recorded their process
    elsewhere = {**me, "host": socket.gethostname() + "-other"}
    assert alive(elsewhere)  # fresh heartbeat
    assert not alive({**elsewhere, "heartbeat": "2020-01-01T00:00:00+00:00"})


def test_cache_orphans_go_and_a_replaced_cache_is_renamed_aside(tmp_path: Path) -> None:
    import time

    from autorecbench.data.atomic import orphans
    from autorecbench.data.cache import DatasetConfig, prepare

    cfg = DatasetConfig.from_mapping(compose([f"paths.root={tmp_path}", "data=synthetic",
                                              "data.generator.n_interactions=2000"]).data)
    first = prepare(cfg)
    processed = first.directory.parent
    host = socket.gethostname()
    dead = processed / f".{first.directory.name}.tmp-{host}-{2**22 + 1}"  # a killed build of this cache
    legacy = processed / f".{first.directory.name}.tmp-{2**22 + 2}"  # the old naming
    live = processed / f".{first.directory.name}.tmp-{host}-{os.getpid()}x"  # not a temp name: left alone
    recent = processed / f".{first.directory.name}.old-{int(time.time())}-{host}-1"  # may still be read
    stale = processed / f".{first.directory.name}.old-{int(time.time()) - 7200}-{host}-1"
    for folder in (dead, legacy, live, recent, stale):
        folder.mkdir()
    assert orphans(processed) == sorted([dead, legacy, stale])
    with (first.directory / "interactions.parquet").open("rb") as reader:  # a run reading the cache
        again = prepare(cfg, force=True)  # rebuilt: the old folder is renamed aside, not deleted
        assert reader.read(4) == b"PAR1"
    assert again.directory == first.directory and not again.reused
    assert not dead.exists() and not legacy.exists() and not stale.exists() and live.exists() and recent.exists()
    aside = [p for p in processed.iterdir() if ".old-" in p.name and p != recent]
    assert len(aside) == 1 and (aside[0] / "schema.json").is_file()
