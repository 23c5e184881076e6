"""Run folders: failures are recorded, not published; discovery of runs for compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autorecbench.config import compose
from autorecbench.execute import execute
from autorecbench.results.run_folder import discover, read_record


class Boom(RuntimeError):
    pass


def test_failed_run_keeps_a_partial_folder_marked_failed(tmp_path: Path, ml100k_dir: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}", f"data.path={ml100k_dir}", "runner.max_rows=3000", "device=cpu"])

    def hook(event, batch, value):
        if batch.index == 3:
            raise Boom("simulated crash in batch 3")

    with pytest.raises(Boom):
        execute(cfg, [], hook=hook)
    folders = list((tmp_path / "results").iterdir())
    assert len(folders) == 1 and folders[0].name.endswith(".partial")
    info = json.loads((folders[0] / "run.json").read_text())
    assert info["status"] == "failed" and "simulated crash" in info["error"]
    record = read_record(folders[0])
    assert not record.complete and record.status == "failed"
    # A later complete run is published next to it; discovery finds both, compare keeps them apart.
    done = execute(cfg, [])
    assert done.is_dir() and not done.name.endswith(".partial")
    assert sorted(p.name for p in discover([str(tmp_path / "results")])) == sorted(
        [folders[0].name, done.name])
    # (Within the same second the run takes the next free name, `<id>-1`, as the failed one holds `<id>`.)
    assert sorted(discover([str(tmp_path / "results" / "*_fixed_s0*")])) == sorted([folders[0], done])
    assert discover([str(done)]) == [done]


def test_interrupted_run_is_marked_interrupted(tmp_path: Path, ml100k_dir: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}", f"data.path={ml100k_dir}", "runner.max_rows=3000", "device=cpu"])

    def hook(event, batch, value):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(cfg, [], hook=hook)
    (folder,) = (tmp_path / "results").iterdir()
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
