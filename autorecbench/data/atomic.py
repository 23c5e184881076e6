"""Folders written under a temporary name and swapped in whole: dataset caches and generated raw data.

A folder ``X`` is built as ``.X.tmp-<host>-<pid>`` beside it and renamed to ``X`` when complete
(:func:`swap_in`). An ``X`` that already exists (``--force``, a damaged cache) is first renamed to
``.X.old-<unix time>-<host>-<pid>`` and left for an hour — a run may be reading it — never deleted under a
reader. :func:`remove_orphans` (called whenever ``X`` is prepared again) and ``autorecbench clean --stale``
remove temporary folders whose process is gone (on this host; from another host after a day) and replaced
folders older than an hour.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

from autorecbench.envinfo import pid_alive

OLD_GRACE_SECONDS = 3600.0
OTHER_HOST_SECONDS = 86_400.0
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<time>\d+)-.+$")


def temp_folder(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def stale(path: Path) -> bool:
    """Whether ``path`` is a temporary folder nobody writes any more, or a replaced folder nobody reads."""
    tmp = _TMP.match(path.name)
    if tmp:
        host = tmp["host"]
        if host is None or host == socket.gethostname():
            return not pid_alive(int(tmp["pid"]))
        try:
            return time.time() - path.stat().st_mtime > OTHER_HOST_SECONDS
        except OSError:
            return False
    old = _OLD.match(path.name)
    return bool(old) and time.time() - int(old["time"]) > OLD_GRACE_SECONDS


def orphans(parent: Path, name: str | None = None) -> list[Path]:
    """Stale temporary and replaced folders in ``parent`` (of folder ``name`` only, when given)."""
    if not parent.is_dir():
        return []
    found = []
    for path in parent.iterdir():
        match = _TMP.match(path.name) or _OLD.match(path.name)
        if match and (name is None or match["name"] == name) and path.is_dir() and stale(path):
            found.append(path)
    return sorted(found)


def remove_orphans(final: Path) -> None:
    for path in orphans(final.parent, final.name):
        shutil.rmtree(path, ignore_errors=True)


def swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; an existing ``final`` is renamed aside first (see the module
    docstring). If another process put its own ``final`` in place meanwhile, theirs stays and ``tmp`` goes."""
    if final.exists():
        aside = final.with_name(f".{final.name}.old-{int(time.time())}-{socket.gethostname()}-{os.getpid()}")
        try:
            final.rename(aside)
        except FileNotFoundError:  # replaced concurrently
            pass
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():  # not a concurrent twin: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)
