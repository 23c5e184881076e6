"""Checkpoints and `autorecbench resume`: a run stopped anywhere and resumed ends with exactly the numbers of a run
that was never stopped (CPU, same seed) — every table of its folder, bit for bit.

In process (fast): every registered method of both protocols is stopped by an exception at a chosen step (the
step may fall in a search stage), resumed from its last checkpoint and compared. Through the CLI: runs are
SIGKILLed at three points (whatever they were doing: a batch, a checkpoint write) and resumed with
`autorecbench resume`, for FIXED (both protocols; ESAPN, AutoFIS and AutoLoss in the slow set)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from autorecbench import execute as ex
from autorecbench.config import compose
from autorecbench.errors import UserError
from autorecbench.methods.base import METHODS, OFFLINE_METHODS, load_methods
from autorecbench.train.state import dump, load, restore

from conftest import REPO, one_error_line, read_run, run_cli, run_folders, run_main

load_methods()
# Small data: a stream of 2,000 rows (8 batches of 250); a Criteo-format file of 6,000 rows (8 fields).
STREAM = ["data=synthetic", "data.generator.n_interactions=2000", "data.generator.n_users=300",
          "data.generator.n_items=400", "runner.batch_size=250", "runner.checkpoint_every=2"]
CTR = ["data=synthetic-criteo", "data.generator.rows=6000", "data.generator.n_fields=8",
       "data.generator.n_informative=4", "data.generator.n_pairs=2", "data.generator.cardinality_min=4",
       "data.generator.cardinality_max=20", "runner.batch_size=500", "runner.epochs=2",
       "runner.checkpoint_every=2"]
# Per offline method: what keeps it small, and the total step at which to stop it (10 steps per epoch; for a
# method with a one-epoch search, a stop at 5 falls inside the search, at 15 inside the fit, whose resume then
# skips the search).
OFFLINE = {
    "fixed": (["model=deepfm"], 15),
    "autofis": (["model=fm", "method.search_epochs=1"], 5),
    "autoloss": (["model=deepfm"], 13),
    "autodim": (["model=fm", "method.search_epochs=1", "method.candidates=[2,8]"], 15),
    "autoias": (["method.budget=quick", "method.search_epochs=1", "method.students=2", "method.reward_samples=2",
                 "method.probe_architectures=2"], 5),
    # AMEIR-I (DeepFM with the searched interactions): Step 2's one cycle of one epoch, then the fit; 5 stops
    # inside Step 2 (AMEIR-C's Steps 1 and 3 run through the CLI in tests/test_ameir.py)
    "ameir": (["method.variant=I", "method.budget=quick", "method.cycles=1", "method.cycle_epochs=1",
               "method.keep=3", "method.interactions=2"], 5),
}
TIMING_KEYS = ("controller_seconds",)


class Stop(RuntimeError):
    """Stands in for a kill at a chosen step (in process)."""


def tables(folder: Path) -> dict[str, object]:
    """Everything a run folder says that does not measure time: every table (cost rows aside) and
    architecture.json."""
    out: dict[str, object] = {}
    for path in sorted(folder.glob("*.parquet")):
        frame = pl.read_parquet(path).drop("run_id")
        out[path.stem] = frame.filter(pl.col("split") != "cost") if path.stem == "metrics" else frame
    arch = json.loads((folder / "architecture.json").read_text())
    out["architecture"] = {k: v for k, v in arch.items() if k not in TIMING_KEYS}
    if isinstance(arch.get("cost"), dict):  # a measured inference speed (QPS) is a time too
        out["architecture"]["cost"] = {k: v for k, v in arch["cost"].items() if k != "qps"}
    return out


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        if isinstance(ta[name], pl.DataFrame):
            assert ta[name].equals(tb[name]), name  # type: ignore[union-attr]
        else:
            assert ta[name] == tb[name], name


def run_in_process(root: Path, overrides: list[str], stop_at: int | None = None,
                   monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    cfg = compose([f"paths.root={root}", "device=cpu", *overrides])
    if stop_at is not None:
        assert monkeypatch is not None
        tick = ex.FolderControl.tick

        def stopping(self: ex.FolderControl, count: int, epoch_end: bool = False) -> bool:
            if count == stop_at:
                raise Stop(f"stopped at {count}")
            return tick(self, count, epoch_end)

        monkeypatch.setattr(ex.FolderControl, "tick", stopping)
    try:
        return ex.execute(cfg, overrides)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


def stop_and_resume(root: Path, overrides: list[str], stop_at: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    with pytest.raises(Stop):
        run_in_process(root, overrides, stop_at, monkeypatch)
    (partial,) = [p for p in (root / "results").iterdir() if p.name.endswith(".partial")]
    assert read_run(partial)["status"] == "failed" and read_run(partial)["checkpoint"]["count"] >= 1
    cfg, point = ex.load_resume(partial)
    assert point is not None
    done = ex.execute(cfg, point.info["overrides"], resume=point)
    assert not partial.exists() and not (done / "checkpoint").exists()
    info = read_run(done)
    assert info["status"] == "complete" and len(info["resumed"]) == 1
    return done


# ------------------------------------------------------------------------------ in process, every method

@pytest.mark.parametrize("method", sorted(METHODS))
def test_streaming_method_resumes_identically(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [*STREAM, f"method={method}"]
    reference = run_in_process(tmp_path / "a", overrides)
    assert_same(reference, stop_and_resume(tmp_path / "b", overrides, 5, monkeypatch))


@pytest.mark.parametrize("method", sorted(OFFLINE_METHODS))
def test_offline_method_resumes_identically(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    extra, stop_at = OFFLINE.get(method, ([], 15))
    overrides = [*CTR, f"method={method}", *extra]
    try:
        reference = run_in_process(tmp_path / "a", overrides)
    except UserError as exc:  # a method added later that needs other data: its own tests cover it
        pytest.skip(f"{method} does not run on the small Criteo-format file: {exc}")
    assert_same(reference, stop_and_resume(tmp_path / "b", overrides, stop_at, monkeypatch))


def test_state_restores_in_place_and_takes_what_is_missing() -> None:
    """The generic restore: tensors copied into the live ones (views of one buffer stay views), a grown table
    replaced, optimisers and generators loaded, a missing attribute taken from the file, closures restored."""
    import io

    flat = torch.zeros(6)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(3, 2)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(1)
    torch.rand(3, generator=gen)
    table = torch.arange(4.0)

    def step() -> tuple:
        return net, opt, gen, flat, table

    saved_state = {"flat": flat, "view": flat[2:4], "table": table, "rows": [1, 2], "step": step, "extra": 7}
    buffer = io.BytesIO()
    dump(saved_state, buffer)
    expected = (net.weight.detach().clone(), opt.state_dict()["state"][0]["exp_avg"].clone(), gen.get_state())
    buffer.seek(0)
    saved = load(buffer)

    # A fresh "run": other values everywhere, a shorter table, no "extra".
    live_flat = torch.ones(6)
    live_view = live_flat[2:4]
    net2 = torch.nn.Linear(2, 1)
    opt2 = torch.optim.Adam(net2.parameters())
    gen2 = torch.Generator().manual_seed(99)
    live = {"flat": live_flat, "view": live_view, "table": torch.zeros(2), "rows": [5]}
    net, opt, gen, flat, table = net2, opt2, gen2, live_flat, live["table"]  # what the live closure sees
    kept = restore(live, saved)
    assert kept is live and live["flat"] is live_flat and live["view"] is live_view
    assert torch.equal(live_flat, torch.zeros(6)) and live_view.data_ptr() == live_flat[2:].data_ptr()
    assert torch.equal(live["table"], torch.arange(4.0)) and live["rows"] == [1, 2] and live["extra"] == 7
    assert "step" not in live  # a function is never rebuilt from a file: only a live one's cells are restored
    restore(step, saved["step"])
    assert torch.equal(net2.weight, expected[0])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], expected[1])
    assert torch.equal(gen2.get_state(), expected[2])


# ------------------------------------------------------------------------------ through the CLI, SIGKILL

def start_cli(*args: str, home: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["AUTORECBENCH_HOME"] = str(home)
    return subprocess.Popen([sys.executable, "-m", "autorecbench", *args], cwd=home, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def checkpoints(home: Path) -> int:
    """Checkpoints written so far by the (one) unfinished run under ``home``."""
    for run_json in (home / "results").glob("*.partial/run.json"):
        try:
            return int(json.loads(run_json.read_text()).get("checkpoint", {}).get("count", 0))
        except (OSError, ValueError):  # being replaced at this very moment
            return 0
    return 0


def kill_after(process: subprocess.Popen[str], home: Path, count: int, timeout: float = 240) -> None:
    """SIGKILL ``process`` once the run has written ``count`` checkpoints in all (wherever it is by then)."""
    deadline = time.monotonic() + timeout
    while checkpoints(home) < count:
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the run ended (exit {process.returncode}) before checkpoint {count}:\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"no checkpoint {count} within {timeout} s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def kill_three_times_and_resume(home: Path, args: list[str], kills: tuple[int, int, int]) -> Path:
    kill_after(start_cli("run", *args, "-q", home=home), home, kills[0])
    for count in kills[1:]:
        (partial,) = [p for p in (home / "results").iterdir() if p.name.endswith(".partial")]
        listed = run_cli("runs", home=home, check=True).stdout
        assert "interrupted — resumable" in listed and partial.name in listed
        kill_after(start_cli("resume", str(partial), "-q", home=home), home, count)
    (partial,) = [p for p in (home / "results").iterdir() if p.name.endswith(".partial")]
    run_cli("resume", "--all", "-q", home=home, check=True)
    (done,) = run_folders(home)
    info = read_run(done)
    assert info["status"] == "complete" and len(info["resumed"]) == 3 and done.name == partial.name[:-8]
    assert not (done / "checkpoint").exists() and not (done / ".lock").exists()
    return done


SIGKILL_CASES = {
    "streaming-fixed": ([*STREAM[:1], "data.generator.n_interactions=40000", "data.generator.n_users=300",
                         "data.generator.n_items=400", "runner.batch_size=200", "runner.checkpoint_every=10"],
                        (2, 6, 10)),
    "offline-fixed": ([*CTR[:-2], "data.generator.rows=40000", "runner.epochs=3", "runner.checkpoint_every=4"],
                      (2, 7, 12)),
    "streaming-esapn": ([*STREAM[:1], "data.generator.n_interactions=30000", "data.generator.n_users=300",
                         "data.generator.n_items=400", "runner.batch_size=200", "runner.checkpoint_every=10",
                         "method=esapn"], (2, 6, 10)),
    # the static-shape step: device free lists and counters, tables grown between steps, through a checkpoint
    "streaming-esapn-static": ([*STREAM[:1], "data.generator.n_interactions=30000", "data.generator.n_users=300",
                                "data.generator.n_items=400", "runner.batch_size=200", "runner.checkpoint_every=10",
                                "method=esapn", "method.static_shapes=true"], (2, 6, 10)),
    "offline-autofis": ([*CTR[:-2], "data.generator.rows=40000", "runner.epochs=3", "runner.checkpoint_every=4",
                         "method=autofis", "model=fm", "method.search_epochs=1"], (3, 9, 16)),
    "offline-autoloss": ([*CTR[:-2], "data.generator.rows=40000", "runner.epochs=3", "runner.checkpoint_every=4",
                          "method=autoloss"], (2, 7, 12)),
}


@pytest.mark.slow  # seven CLI processes each: ~25 s on two idle cores (the in-process tests above are the fast set)
@pytest.mark.parametrize("case", list(SIGKILL_CASES))
def test_sigkill_three_times_then_resume_gives_identical_results(tmp_path: Path, case: str) -> None:
    args, kills = SIGKILL_CASES[case]
    home = tmp_path / "home"
    home.mkdir()
    done = kill_three_times_and_resume(home, args, kills)
    reference = run_in_process(tmp_path / "reference", args)
    assert_same(reference, done)


# ------------------------------------------------------------------------------ refusals

def test_resume_refuses_what_it_cannot_continue(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"

    def cli(*args: str) -> tuple[int, str, str]:
        return run_main(*args, home=home, capsys=capsys, monkeypatch=monkeypatch)

    done = run_in_process(home, STREAM)
    assert "complete" in one_error_line(*cli("resume", str(done))[::2])
    assert "no such run folder" in one_error_line(*cli("resume", str(home / "results" / "x.partial"))[::2])
    assert "--all" in one_error_line(*cli("resume")[::2])
    assert "no interrupted run" in one_error_line(*cli("resume", "--all")[::2])
    # Killed before its first checkpoint: nothing to resume; `clean --stale` removes it (after asking).
    with pytest.raises(Stop):
        run_in_process(home, [*STREAM[:-1], "runner.checkpoint_every=100", "runner.checkpoint_seconds=null"], 1,
                       monkeypatch)
    (partial,) = [p for p in (home / "results").iterdir() if p.name.endswith(".partial")]
    info = read_run(partial)
    info["status"] = "running"  # as a SIGKILL leaves it, with a pid that no longer exists
    info["pid"], info["pid_start"] = 2**22 + 1, None
    (partial / "run.json").write_text(json.dumps(info))
    orphan = next((home / "data" / "processed").iterdir())
    orphan = orphan.with_name(f".{orphan.name}.tmp-{2**22 + 1}")  # a cache build killed outright
    orphan.mkdir()
    code, listed, _ = cli("runs")
    assert code == 0 and "interrupted — no checkpoint" in listed and "complete" in listed
    assert "before its first checkpoint" in one_error_line(*cli("resume", str(partial))[::2])
    assert "--yes" in one_error_line(*cli("clean", "--stale")[::2])
    assert partial.exists() and orphan.exists()
    code, cleaned, _ = cli("clean", "--stale", "--yes")
    assert code == 0 and "interrupted run, no checkpoint" in cleaned and "killed build" in cleaned
    assert not partial.exists() and not orphan.exists() and done.exists()
    assert "nothing stale" in cli("clean", "--stale")[1]


@pytest.mark.slow
def test_sigterm_records_an_interrupted_run_that_resumes(tmp_path: Path) -> None:
    """A scheduler's SIGTERM stops the run as Ctrl-C: status interrupted, checkpoint kept, exit 130."""
    args, _ = SIGKILL_CASES["streaming-fixed"]
    home = tmp_path / "home"
    home.mkdir()
    process = start_cli("run", *args, "-q", home=home)
    while checkpoints(home) < 2:
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate()
    assert process.returncode == 130 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: interrupted: {run_folders(home)[0]} keeps its last checkpoint; `autorecbench resume` continues it"]
    (partial,) = run_folders(home)
    assert read_run(partial)["status"] == "interrupted"
    assert "interrupted — resumable" in run_cli("runs", home=home, check=True).stdout
    run_cli("resume", "--all", "-q", home=home, check=True)
    assert_same(run_in_process(tmp_path / "reference", args), run_folders(home)[0])
