"""Sweeps through Hydra's cluster launchers (``autorecbench/launch.py``): submitit (``submitit_local`` here,
``submitit_slurm`` up to submission) and Ray on a local cluster, each job writing its own run folder into the
one ``results/``; ``tune`` and ``reproduce`` take the same launcher overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, read_run, run_cli, run_folders

from autorecbench.config import compose
from autorecbench.errors import UserError

ML100K = ["data.path=" + str(REPO / "data" / "raw" / "ml-100k")]
SMALL_SWEEP = ["-m", "seed=0,1", "runner.max_rows=2000", *ML100K, "-q"]


def _two_complete_runs(home: Path) -> None:
    folders = run_folders(home)
    assert len(folders) == 2, folders
    infos = [read_run(f) for f in folders]
    assert sorted(i["seed"] for i in infos) == [0, 1] and all(i["status"] == "complete" for i in infos)
    for folder, info in zip(folders, infos):
        assert {"metrics.parquet", "run.json", "config.yaml"} <= {p.name for p in folder.iterdir()}
        # The jobs ran in other processes: the sweep pinned the results to this machine's absolute path.
        assert f"paths.root='{home.resolve()}'" in info["overrides"]


def test_submitit_local_sweep_writes_one_folder_per_job(home: Path, ml100k_dir: Path) -> None:
    run_cli("run", *SMALL_SWEEP, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", home=home,
            check=True)
    _two_complete_runs(home)
    assert list((home / "logs" / "multirun").glob("*/.submitit/*/*_log.out"))  # submitit's own job logs


@pytest.mark.slow
def test_ray_local_cluster_sweep_writes_one_folder_per_job(home: Path, ml100k_dir: Path) -> None:
    run_cli("run", *SMALL_SWEEP, "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
            "+hydra.launcher.ray.init.include_dashboard=false", home=home, check=True)
    _two_complete_runs(home)


def test_slurm_preset_and_submission_checks(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autorecbench.launch import chosen_launcher, launcher_overrides, runs_here

    # The preset: one GPU per run, 4 at a time; every value a command-line override away.
    cfg = compose(["experiment=[table1,slurm]", "hydra.launcher.partition=gpu"], with_hydra=True)
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    launcher = cfg.hydra.launcher
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 4)
    assert cfg.device == "cuda" and cfg.runner.batch_size == 500  # Table 1's settings kept
    assert chosen_launcher(["experiment=slurm"]) == "submitit_slurm" and not runs_here(["experiment=slurm"])
    assert runs_here(["hydra/launcher=submitit_local"]) and launcher_overrides([], cfg) == []
    # Without sbatch (this machine): one line, before anything is prepared or submitted. The runs ask for
    # CUDA, which a login node need not have: that is checked on the node that runs them.
    monkeypatch.setenv("PATH", str(Path(__file__).parent))
    with pytest.raises(UserError, match="sbatch, which is not on this machine's PATH"):
        launcher_overrides(["experiment=slurm"], cfg)


def test_missing_launcher_plugin_names_the_extra() -> None:
    from autorecbench.config import _missing_launcher

    message = "In 'hydra/config': Could not find 'hydra/launcher/submitit_slurm'"
    assert _missing_launcher(message) == ("hydra/launcher=submitit_slurm needs hydra-submitit-launcher: "
                                          "pip install 'autorecbench[slurm]' (`make setup` installs it)")
    assert "autorecbench[ray]" in str(_missing_launcher("Could not find 'hydra/launcher/ray'"))
    assert _missing_launcher("Could not find 'hydra/launcher/nope'") is None


@pytest.mark.slow
def test_tune_through_submitit_local(home: Path, ml100k_dir: Path) -> None:
    """Two trials at a time through the launcher, then the final run through it too."""
    done = run_cli("tune", "method=fixed", "runner.max_rows=3000", *ML100K, "--trials", "2", "--jobs", "2",
                   "hydra/launcher=submitit_local", "-q", home=home, check=True)
    assert "(best)" in done.stdout
    (final,) = run_folders(home)
    assert read_run(final)["tuning"]["trials"] == 2
    (study,) = (home / "tune").iterdir()
    assert len(list((study / "trials").iterdir())) == 2 and list(study.glob("hydra/.submitit/*/*_log.out"))


@pytest.mark.slow
def test_reproduce_through_submitit_local(home: Path) -> None:
    done = run_cli("reproduce", "autoloss-table2", "--small", "--data", "criteo", "--models", "deepfm",
                   "--no-ablations", "hydra/launcher=submitit_local", home=home, check=True)
    assert "AutoLoss" in done.stdout
    assert len(run_folders(home)) == 6  # focal, kl, hinge, ce, darts, autoloss; one seed
    assert list((home / "logs" / "multirun").glob("*/.submitit/*/*_log.out"))


def test_reproduce_jobs_and_a_launcher_conflict(ml100k_dir: Path) -> None:
    from autorecbench.reproduce.esapn_table1 import command, experiment_override

    assert experiment_override(["experiment=slurm", "seed=1"]) == "experiment=[table1,slurm]"
    assert experiment_override(["seed=1"]) == "experiment=table1"
    with pytest.raises(UserError, match="--jobs runs the grid with the joblib launcher, not with "
                                        "hydra/launcher=submitit_slurm"):
        command(["experiment=slurm", *ML100K], data="ml-100k", seeds="0", jobs=2, show=None, fmt="table",
                quiet=True)
