"""Putting raw files in place without network access to the publishers.

ml-100k: the RecBole project ships the MovieLens 100K ratings as an atomic file inside its wheel on PyPI
(``recbole/dataset_example/ml-100k/ml-100k.inter``). We download that wheel with ``pip download`` (no
install, recbole is never imported), check its sha256, and extract the ml-100k files.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from autorecbench.errors import UserError

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_MEMBERS = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
ML100K_PREFIX = "recbole/dataset_example/ml-100k/"


def extract_ml100k(wheel: Path, target: Path) -> list[Path]:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != RECBOLE_SHA256:
        raise UserError(f"{wheel}: sha256 {digest} does not match recbole {RECBOLE_VERSION}'s {RECBOLE_SHA256}")
    target.mkdir(parents=True, exist_ok=True)
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for member in ML100K_MEMBERS:
            dest = target / member
            tmp = dest.with_name(f".{member}.tmp")
            with zf.open(ML100K_PREFIX + member) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(dest)
            out.append(dest)
    return out


def fetch_ml100k(target: Path) -> list[Path]:
    """Download the recbole wheel with pip (no dependencies, nothing installed) and extract ml-100k."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"recbole=={RECBOLE_VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / RECBOLE_WHEEL
        if done.returncode != 0 or not wheel.is_file():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"pip download recbole=={RECBOLE_VERSION} failed: {last[0]}")
        return extract_ml100k(wheel, target)


def copy_from(source: Path, target: Path, names: list[str]) -> list[Path]:
    """Copy the files a dataset config names (plain or .gz) from a local folder."""
    if not source.is_dir():
        raise UserError(f"--from {source}: not a folder")
    found = [source / n for name in names for n in (name, f"{name}.gz") if (source / n).is_file()]
    if not found:
        raise UserError(f"--from {source}: none of {', '.join(names)} found there")
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for path in found:
        shutil.copy2(path, target / path.name)
        out.append(target / path.name)
    for extra in ("README.txt", "README"):  # keep the licence text with the data
        if (source / extra).is_file():
            shutil.copy2(source / extra, target / extra)
    return out
