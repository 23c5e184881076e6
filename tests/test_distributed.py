"""Data-parallel offline training under torchrun (``autorecbench/train/distributed.py``): two CPU processes (gloo)
against one through the CLI, the refusals, and the per-process pieces against brute force."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, one_line_error, read_run, run_cli, run_folders

from autorecbench.config import compose, validate
from autorecbench.data.offline import OfflineData, Sequences, SplitData, _shard
from autorecbench.data.schema import TaskSpec
from autorecbench.errors import UserError
from autorecbench.execute import execute
from autorecbench.methods.base import method_class
from autorecbench.runners.offline import OfflineConfig, TrainLoop
from autorecbench.train.distributed import Distributed

# Planted pairwise interactions in the real Criteo format: a signal both runs must find (AUC well above 0.5).
PLANTED = ["data=synthetic-criteo", "data.generator.rows=20000", "data.generator.n_fields=12",
           "data.generator.n_informative=6", "data.generator.n_pairs=3", "data.generator.cardinality_max=20",
           "runner.epochs=3", "device=cpu", "-q"]
TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}


def torchrun(*args: str, home: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node=N -m autorecbench ARGS`` as a user would start it (one thread per process)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
               AUTORECBENCH_HOME=str(home), OMP_NUM_THREADS="1", COLUMNS="250")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "autorecbench", *args], capture_output=True, text=True, env=env, cwd=home,
                          timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def _single_process_run(home: Path, args: list[str]) -> Path:
    """The same run in this process (what ``autorecbench run ARGS`` does without torchrun), into ``home``."""
    overrides = [a for a in args if a != "-q"] + [f"paths.root={home}", "quiet=true"]
    cfg = compose(overrides)
    validate(cfg)
    folder = execute(cfg, overrides)
    assert folder is not None and run_folders(home) == [folder]
    return folder


def _auc(folder: Path) -> float:
    return float(read_run(folder)["metrics"]["auc"])


def test_two_processes_match_one_process_and_write_one_folder(home: Path) -> None:
    single = _single_process_run(home, PLANTED)
    done = torchrun("run", *PLANTED, home=home)
    parallel = [f for f in run_folders(home) if f != single]
    assert len(parallel) == 1 and not parallel[0].name.endswith(".partial")  # exactly one folder, complete
    assert done.stdout.count("results: ") == 1  # rank 0 alone reports
    info = read_run(parallel[0])
    assert info["status"] == "complete" and info["world_size"] == 2
    assert info["data_parallel"] == {"world_size": 2, "backend": "gloo"}
    assert info["data_parallel_weights_in_step"] is True  # both processes ended with the same weights
    assert info["split"]["data_parallel"] == {"processes": 2, "train_rows_per_process": 8000, "train_rows_left_out": 0}
    assert info["split"]["rows"] == read_run(single)["split"]["rows"] == {"train": 16000, "valid": 2000, "test": 2000}
    # The same rows per step and per epoch as the single process, counted over both processes.
    assert info["offline"]["fit"]["samples"] == read_run(single)["offline"]["fit"]["samples"] == 48000
    assert read_run(single)["world_size"] == 1 and "world_size=2" in info["variant"]
    assert info["config_hash"] != read_run(single)["config_hash"]  # never averaged with single-process runs
    assert _auc(single) > 0.65 and _auc(parallel[0]) > 0.65  # both learned the planted signal
    assert abs(_auc(parallel[0]) - _auc(single)) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("method", [["method=autodim", "method.search_epochs=3"],
                                    ["method=autofis", "model=fm", "runner.epochs=2"],
                                    ["method=autoloss", "runner.epochs=2", "method.xi=0"]])
def test_search_methods_run_data_parallel(home: Path, method: list[str]) -> None:
    """AutoDim (bi-level α step), AutoFIS (GRDA gates inside the DDP model) and AutoLoss (controller steps on
    shares of a validation batch) keep both processes in step, learn the planted signal and do no worse than
    one process. (AutoDim's re-trained model is still climbing steeply after 3 epochs, and two processes,
    with batch-norm over 1,000 rows each, climbed faster: test AUC 0.637 against 0.616 for seed 0.)"""
    args = [*PLANTED, *method]
    single = _single_process_run(home, args)
    torchrun("run", *args, home=home)
    (parallel,) = [f for f in run_folders(home) if f != single]
    info = read_run(parallel)
    assert info["status"] == "complete" and info["world_size"] == 2 and info["data_parallel_weights_in_step"] is True
    assert _auc(single) > 0.6 and _auc(parallel) > _auc(single) - 0.02


def test_streaming_refuses_in_one_line(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    line = one_line_error(run_cli("run", "method=esapn", home=home))
    assert "runner=streaming cannot run data-parallel" in line and "sequential pass over the stream" in line
    assert not (home / "results").exists()


def test_refusals_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from autorecbench.launch import launcher_overrides, single_process_only

    monkeypatch.setenv("WORLD_SIZE", "2")
    ctr = ["data=synthetic-criteo", "device=cpu"]
    validate(compose([*ctr, "method=fixed"]))  # FIXED, AutoFIS, AutoDim, AutoLoss run
    validate(compose([*ctr, "method=autofis", "model=fm"]))
    validate(compose([*ctr, "method=autodim"]))
    validate(compose([*ctr, "method=autoloss", "method.xi=0"]))
    cases = [([*ctr, "method=autodim", "method.gumbel_noise=batch"], "per-process sampling"),
             ([*ctr, "runner.batch_size=2001"], "runner.batch_size=2001 must split into 2 equal parts"),
             ([*ctr, "runner.valid_batch_size=3"], "runner.valid_batch_size=3 must split"),
             (["method=darts"], "runner=streaming cannot run data-parallel"),
             ([*ctr, "method=autoias"], "method autoias cannot run data-parallel: its supernet search"),
             ([*ctr, "method=autoloss"], "Eq. 13's unrolled step")]
    for overrides, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            validate(compose(overrides))
    # Sparse embedding gradients: gloo all-reduces them, NCCL cannot.
    fixed = method_class("fixed", "offline")
    lazy = compose([*ctr, "method.embedding_optimizer=lazy"]).method
    fixed.check_data_parallel(lazy, "gloo")
    with pytest.raises(UserError, match="NCCL cannot all-reduce"):
        fixed.check_data_parallel(lazy, "nccl")
    with pytest.raises(UserError, match="does not run under torchrun"):
        single_process_only("tune")
    with pytest.raises(UserError, match="starts runs outside torchrun's process group"):
        launcher_overrides(["hydra/launcher=joblib"], compose(ctr))


def test_a_method_without_data_parallel_support_is_refused() -> None:
    """A method (e.g. a plugin's) that does not declare how it synchronises is refused, naming why."""
    from autorecbench.methods.base import OfflineMethod

    class Plain(OfflineMethod):
        name = "plain"

    with pytest.raises(UserError, match="method plain cannot run data-parallel: it does not declare"):
        Plain.check_data_parallel(compose([]).method, "gloo")


def test_shards_partition_the_training_rows() -> None:
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            seen: list[int] = []
            sizes = set()
            for rank in range(world):
                xs = {s: np.arange(n).reshape(-1, 1) for s in ("train", "valid", "test")}
                labels = {s: np.arange(n) for s in ("train", "valid", "test")}
                sequences = {s: Sequences({"hist": np.arange(n * 3).reshape(n, 3)}, np.arange(n) % 3)
                             for s in ("train", "valid", "test")}
                info = _shard(xs, labels, sequences, rank, world)
                seen += xs["train"][:, 0].tolist()
                sizes.add(len(xs["train"]))
                assert (xs["train"][:, 0] == labels["train"]).all()
                for s in ("train", "valid", "test"):  # the behaviour sequences follow their rows
                    rows = xs[s][:, 0]
                    assert (sequences[s].items["hist"][:, 0] == rows * 3).all()
                    assert (sequences[s].lengths == rows % 3).all()
                assert len(xs["valid"]) == n and len(xs["test"]) == (n if rank == 0 else 0)  # rank 0 alone tests
            per = n // world
            assert sizes == {per}  # the same number of steps on every process
            assert sorted(seen) == list(range(per * world))  # disjoint, and only the last n % world left out
            assert info["train_rows_left_out"] == n - per * world


def _loop(dist: Distributed, valid_rows: int = 10) -> TrainLoop:
    x = torch.arange(valid_rows * 2, dtype=torch.int32).reshape(valid_rows, 2)
    split = SplitData("valid", x, x[:, 0].float(), torch.device("cpu"))
    data = OfflineData(split, split, split, [], TaskSpec.from_name("binary"), None, {"rows": {}})
    loop = TrainLoop(OfflineConfig(batch_size=4, shuffle_seed=3), data)
    loop.dist = dist
    return loop


def test_each_process_takes_its_share_of_the_same_validation_batch() -> None:
    whole = _loop(Distributed())
    shares = [_loop(Distributed(rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):  # across the end of a pass: the same seeded orders everywhere
        batch = whole.valid_batch()
        parts = [loop.valid_batch() for loop in shares]
        assert torch.equal(parts[0].x, batch.x[0::2]) and torch.equal(parts[1].x, batch.x[1::2])
        assert torch.equal(parts[1].label, batch.label[1::2])


def test_steps_draw_per_process_streams_and_the_shared_stream_stays_in_step() -> None:
    def draws(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        dist = Distributed(rank=rank, world_size=world)
        torch.manual_seed(7)
        dist.seed_streams(7, torch.device("cpu"))
        step = dist.own_stream(lambda: torch.rand(4))
        inside = torch.stack([step(), step()])
        return inside, torch.rand(4)  # what building a model next would draw

    single_inside, single_after = draws(0, 1)
    torch.manual_seed(7)
    assert torch.equal(single_inside, torch.rand(2, 4))  # one process: steps draw from the one stream
    inside0, after0 = draws(0, 2)
    inside1, after1 = draws(1, 2)
    assert not torch.equal(inside0, inside1)  # dropout / Gumbel noise differ between the processes' rows
    assert torch.equal(inside0, draws(0, 2)[0])  # and are reproducible
    torch.manual_seed(7)
    untouched = torch.rand(4)
    assert torch.equal(after0, untouched) and torch.equal(after1, untouched)  # construction draws stay shared
    assert Distributed().own_stream(len) is len  # the identity in one process
