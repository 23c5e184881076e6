"""Third-party plugins through entry points: the fixture package in ``tests/fixtures/autorecbench-toy-plugin``
(a method, a backbone and a raw-data format, each with its YAML) is installed into a scratch folder, picked
up by ``methods``, ``run`` and the method registry ``validate`` reads, and removed with the folder."""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import read_run, run_cli, run_folders

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
    _ratings(home)
    run_cli("run", "method=toy_gmf", "model=toy_dot", "data=toy-ratings", "-q", home=home, check=True)
    (folder,) = run_folders(home)
    info = read_run(folder)
    assert info["status"] == "complete" and info["method"] == "toy_gmf" and info["model"] == "toy_dot"
    assert info["data"]["n_rows"] == 3000 and 0.0 < info["metrics"]["accuracy"] <= 1.0
    # In this process too (then forgotten): `methods` lists the plugin with its package, the registry `validate`
    # reads holds it, the data group its dataset, and a bad row in its format is the usual error naming the line.
    bad = home / "data" / "raw" / "toy-ratings" / "ratings.txt"
    bad.write_text(bad.read_text() + "1;2;three;4\n")
    with _plugin_on_path(site, monkeypatch):
        from typer.testing import CliRunner

        from autorecbench.cli.app import app
        from autorecbench.config import compose, group_options
        from autorecbench.data.cache import DatasetConfig, prepare
        from autorecbench.errors import DataFormatError
        from autorecbench.methods.base import method_class

        assert method_class("toy_gmf").__module__ == "autorecbench_toy.method"
        assert "toy-ratings" in group_options("data")
        with pytest.raises(DataFormatError, match=f"{bad}:3001: non-numeric field"):
            prepare(DatasetConfig.from_mapping(compose([f"paths.root={home}", "data=toy-ratings"]).data), force=True)
        monkeypatch.setenv("COLUMNS", "250")
        row = next(line for line in CliRunner().invoke(app, ["methods"]).output.splitlines() if "toy_gmf" in line)
        assert "streaming" in row and "autorecbench_toy" in row and "no conf/method YAML" not in row


@contextlib.contextmanager
def _plugin_on_path(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The installed plugin importable in this process; afterwards its registrations and modules are removed."""
    from autorecbench.data.movielens import READERS
    from autorecbench.methods.base import METHODS
    from autorecbench.models.registry import MODELS
    from autorecbench.plugins import load_entry_points

    monkeypatch.syspath_prepend(str(site))
    load_entry_points.cache_clear()
    try:
        yield
    finally:
        METHODS.pop("toy_gmf", None)
        MODELS.pop("toy_dot", None)
        READERS.pop("toy_semicolon", None)
        for name in [m for m in sys.modules if m.startswith("autorecbench_toy")]:
            del sys.modules[name]
        monkeypatch.undo()
        load_entry_points.cache_clear()


def test_a_broken_plugin_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: an entry point whose module does not import stops with the distribution's name."""
    from autorecbench.errors import UserError
    from autorecbench.plugins import METHODS_GROUP, load_entry_points

    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[autorecbench.methods]\nbroken = broken_plugin_missing.method\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_entry_points.cache_clear()
    try:
        with pytest.raises(UserError, match=r"plugin 'broken-plugin' \(autorecbench.methods: broken = "
                                            r"broken_plugin_missing.method\) failed to load"):
            load_entry_points(METHODS_GROUP)
    finally:
        monkeypatch.undo()
        load_entry_points.cache_clear()
