"""A run's checkpoint (``<run>.partial/checkpoint/``) and whether the process that writes a run is alive.

Files of the checkpoint folder:
- ``state.pt``: what the runner saved (its loop position and accumulators, the method's ``state_dict()``, every
  RNG) and ``meta`` (position, wall seconds so far, time). Written as ``.state.pt.tmp``, flushed to disk and
  renamed over the old one: a kill at any moment leaves the previous checkpoint or the new one, never a mix.
- ``<name>.bin``: append-only arrays (a stream's predictions): each checkpoint appends the rows since the last
  one and records in ``state.pt`` how many rows it covers; rows beyond that (an append cut short by a kill)
  are cut off when a run resumes.

Liveness: ``run.json`` records the writing process's ``pid``, its start time (``pid_start``, Linux clock ticks
since boot, so a reused pid is not mistaken for the run) and ``host``, and a ``heartbeat`` time renewed every
:data:`HEARTBEAT_SECONDS`. A run on this host is alive while its process is; a run on another host while its
heartbeat is younger than :data:`STALE_SECONDS`.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autorecbench.envinfo import pid_alive, process_start
from autorecbench.train.state import dump, load

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0


def checkpoint_dir(run: Path) -> Path:
    return run / CHECKPOINT_DIR


def has_checkpoint(run: Path) -> bool:
    return (checkpoint_dir(run) / STATE_FILE).is_file()


def remove_checkpoint(run: Path) -> None:
    shutil.rmtree(checkpoint_dir(run), ignore_errors=True)


@dataclass
class Checkpoint:
    """A checkpoint read back (what a runner's ``control.resume`` is)."""

    folder: Path
    state: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.state["meta"]

    def appended(self, name: str) -> np.ndarray:
        """The rows appended under ``name`` up to this checkpoint."""
        spec = self.state["appended"][name]
        dtype = np.dtype(spec["dtype"])
        shape = (int(spec["rows"]), *spec["row_shape"])
        count = int(np.prod(shape))
        with (self.folder / f"{name}.bin").open("rb") as fh:
            data = np.fromfile(fh, dtype=dtype, count=count)
        if data.size != count:
            raise OSError(f"{self.folder / f'{name}.bin'}: {data.size} values, the checkpoint needs {count}")
        return data.reshape(shape)


def read_checkpoint(run: Path) -> Checkpoint | None:
    folder = checkpoint_dir(run)
    if not (folder / STATE_FILE).is_file():
        return None
    return Checkpoint(folder, load(folder / STATE_FILE))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Writes a run's checkpoints (see the module docstring)."""

    def __init__(self, run: Path, resume: Checkpoint | None = None) -> None:
        self.folder = checkpoint_dir(run)
        self.appended: dict[str, dict[str, Any]] = {}
        if resume is not None:
            self.appended = {k: dict(v) for k, v in resume.state.get("appended", {}).items()}
            for name, spec in self.appended.items():  # cut what a kill left beyond the checkpoint
                size = int(spec["rows"]) * int(np.prod(spec["row_shape"])) * np.dtype(spec["dtype"]).itemsize
                with (self.folder / f"{name}.bin").open("r+b") as fh:
                    fh.truncate(size)

    def write(self, state: dict[str, Any], append: dict[str, torch.Tensor]) -> int:
        """Append ``append``'s rows, then replace ``state.pt`` atomically; returns the bytes written."""
        self.folder.mkdir(exist_ok=True)
        written = 0
        for name, rows in append.items():
            array = rows.detach().cpu().numpy()
            spec = self.appended.setdefault(name, {"rows": 0, "row_shape": list(array.shape[1:]),
                                                   "dtype": array.dtype.str})
            path = self.folder / f"{name}.bin"
            with path.open("ab") as fh:
                fh.write(array.tobytes())
                fh.flush()
                os.fsync(fh.fileno())
            spec["rows"] += int(array.shape[0])
            written += array.nbytes
        tmp = self.folder / f".{STATE_FILE}.tmp"
        dump({**state, "appended": self.appended}, tmp)
        _fsync(tmp)
        tmp.replace(self.folder / STATE_FILE)
        return written + tmp.parent.joinpath(STATE_FILE).stat().st_size


# ------------------------------------------------------------------------------------------------ liveness

def owner() -> dict[str, Any]:
    """What ``run.json`` records about the process writing a run."""
    pid = os.getpid()
    return {"pid": pid, "pid_start": process_start(pid), "host": socket.gethostname(), "heartbeat": now_iso()}


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def heartbeat_age(info: dict[str, Any]) -> float | None:
    """Seconds since the run's last heartbeat (None without one)."""
    beat = info.get("heartbeat")
    if not beat:
        return None
    try:
        return time.time() - dt.datetime.fromisoformat(str(beat)).timestamp()
    except ValueError:
        return None


def alive(info: dict[str, Any]) -> bool:
    """Whether the process that writes the run described by ``run.json``'s ``info`` is still at it."""
    pid = info.get("pid")
    if pid is None:  # written before runs recorded their process: nothing says it is alive
        return False
    if info.get("host") == socket.gethostname():
        return pid_alive(int(pid), info.get("pid_start"))
    age = heartbeat_age(info)
    return age is not None and age < STALE_SECONDS
