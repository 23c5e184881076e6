"""Third-party plugins through entry points: the fixture package in ``tests/fixtures/autorecbench-toy-plugin``
(a method, a backbone and a raw-data format, each with its YAML) is installed into a scratch folder, picked
up by ``methods``, ``run`` and the method registry ``validate`` reads, and removed with the folder."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_line_error, read_run, run_cli, run_folders

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "autorecbench-toy-plugin"


def _install(tmp_path: Path) -> Path:
    """``pip install`` the fixture (from a copy: a build leaves files beside its sources) into a target folder
    that only the CLI subprocesses see; deleting the folder uninstalls it."""
    source = shutil.copytree(FIXTURE, tmp_path / "source")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True)
    return target


def _ratings(home: Path) -> None:
    """A small file in the plugin's own raw format (user;item;rating;timestamp)."""
    rng = random.Random(0)
    folder = home / "data" / "raw" / "toy-ratings"
    folder.mkdir(parents=True)
    lines = []
    for t in range(3000):
        user, item = rng.randrange(50), rng.randrange(70)
        rating = 1 + (user * 7 + item * 3) % 5 if rng.random() < 0.8 else rng.randint(1, 5)
        lines.append(f"{user};{item};{rating};{1000 + t}")
    (folder / "ratings.txt").write_text("\n".join(lines) + "\n")


def test_a_plugin_package_runs_end_to_end(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _install(tmp_path)
    assert (site / "autorecbench_toy" / "conf" / "method" / "toy_gmf.yaml").is_file()
    monkeypatch.setenv("PYTHONPATH", str(site))
    listing = run_cli("methods", home=home, check=True).stdout
    row = next(line for line in listing.splitlines() if "toy_gmf" in line)
    assert "streaming" in row and "autorecbench_toy" in row and "no conf/method YAML" not in row
    _ratings(home)
    run_cli("run", "method=toy_gmf", "model=toy_dot", "data=toy-ratings", "-q", home=home, check=True)
    (folder,) = run_folders(home)
    info = read_run(folder)
    assert info["status"] == "complete" and info["method"] == "toy_gmf" and info["model"] == "toy_dot"
    assert info["data"]["n_rows"] == 3000 and 0.0 < info["metrics"]["accuracy"] <= 1.0
    # In one process: the registry `validate` and `methods` read holds the plugin method, the data group its
    # dataset, and a bad row in the plugin's format is the usual data error naming file and line.
    bad = home / "data" / "raw" / "toy-ratings" / "ratings.txt"
    bad.write_text(bad.read_text() + "1;2;three;4\n")
    probe = ("from autorecbench.methods.base import method_class\n"
             "from autorecbench.config import compose, group_options\n"
             "from autorecbench.data.cache import DatasetConfig, prepare\n"
             "print(method_class('toy_gmf').__module__, 'toy-ratings' in group_options('data'))\n"
             "try:\n"
             "    prepare(DatasetConfig.from_mapping(compose(['data=toy-ratings']).data), force=True)\n"
             "except Exception as exc:\n"
             "    print(type(exc).__name__, exc)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=home,
                          env={**os.environ, "AUTORECBENCH_HOME": str(home),
                               "PYTHONPATH": os.pathsep.join([str(site), str(FIXTURE.parents[2])])})
    first, second = done.stdout.splitlines()[:2]
    assert first.split() == ["autorecbench_toy.method", "True"]
    assert second == f"DataFormatError {bad}:3001: non-numeric field"


def test_a_broken_plugin_is_named_in_one_line(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: an entry point whose module does not import stops with the distribution's name."""
    info = tmp_path / "site" / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[autorecbench.methods]\nbroken = broken_plugin_missing.method\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    line = one_line_error(run_cli("methods", home=home))
    assert "plugin 'broken-plugin'" in line and "broken_plugin_missing" in line
