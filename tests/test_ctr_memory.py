"""Preparing a 5M-row Criteo-format file keeps peak memory below 4 GB (the chunked reader); `make bench`
prints the same measurement with the preprocessing rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _bench(tmp_path: Path, *args: str, timeout: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run([sys.executable, "-m", "autorecbench.bench.ctr", "--json", f"--root={tmp_path}", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_ctr_bench_runs(tmp_path: Path) -> None:
    prep, train = _bench(tmp_path, "--rows=20000", "--train-rows=4000", "--cardinality=500", timeout=300)
    assert prep["rows"] == 20_000 and prep["rows_per_second"] > 0 and prep["peak_rss_bytes"] > 0
    assert train["train_rows"] == 4000 and train["samples_per_second"] > 0 and train["model"] == "deepfm"


@pytest.mark.slow
def test_preparing_5m_criteo_rows_stays_below_4gb(tmp_path: Path) -> None:
    (prep,) = _bench(tmp_path, "--rows=5000000", "--skip-train", timeout=3600)
    assert prep["rows"] == 5_000_000
    assert prep["peak_rss_bytes"] < 4 * 2**30, f"peak RSS {prep['peak_rss_bytes'] / 2**30:.2f} GiB"
