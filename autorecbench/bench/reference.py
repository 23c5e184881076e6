"""What ``make bench`` prints beside its measurements: the README's figures (``reference.yaml``) and the hardware.

Every bench table has a "vs README" column: the measured figure divided by the README's figure for the same
bench, figure, configuration (method, optimiser, model, ...) and device kind (``cpu`` / ``cuda``), followed by
the README machine's short name; "–" where the README has no such figure. Each bench also prints one hardware
line (:func:`hardware_line`): CPU model, cores, torch threads, torch version, device, load average at its
start and end — on a shared machine the load says how much a ratio means.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REFERENCE_FILE = Path(__file__).with_name("reference.yaml")


@dataclass(frozen=True)
class ReferenceFigure:
    """One README figure: ``value`` of ``figure`` measured by ``bench`` on ``device`` (kind) with ``config``."""

    bench: str
    figure: str
    device: str
    hardware: str  # key into the file's ``hardware`` descriptions
    value: float
    config: tuple[tuple[str, str], ...]  # the remaining keys, sorted, values as strings


@dataclass(frozen=True)
class References:
    figures: tuple[ReferenceFigure, ...]
    hardware: dict[str, str]

    def find(self, bench: str, figure: str, device: str, **config: Any) -> ReferenceFigure | None:
        """The figure measured by ``bench`` on this device kind (``cuda:0`` counts as ``cuda``) whose configuration
        is exactly ``config`` (values compared as strings)."""
        kind = device.split(":", 1)[0]
        wanted = tuple(sorted((k, str(v)) for k, v in config.items()))
        for ref in self.figures:
            if (ref.bench, ref.figure, ref.device, ref.config) == (bench, figure, kind, wanted):
                return ref
        return None

    def ratio(self, measured: float | None, bench: str, figure: str, device: str, **config: Any) -> str:
        """``"0.97× cpu-2core"``: ``measured`` / the README's figure and where that was measured; ``–`` if none."""
        ref = self.find(bench, figure, device, **config)
        if ref is None or measured is None or ref.value == 0:
            return "–"
        return f"{measured / ref.value:.2f}× {ref.hardware}"

    def legend(self) -> str:
        """One line per README machine that the ratio column names."""
        lines = [f"vs README: measured / the README's figure (autorecbench/bench/{REFERENCE_FILE.name}), measured on"]
        return "\n".join(lines + [f"  {key}: {text}" for key, text in self.hardware.items()])


def load_references(path: Path = REFERENCE_FILE) -> References:
    raw = yaml.safe_load(path.read_text())
    figures = []
    for entry in raw["figures"]:
        entry = dict(entry)
        head = {k: entry.pop(k) for k in ("bench", "figure", "device", "hardware", "value")}
        if head["hardware"] not in raw["hardware"]:
            raise ValueError(f"{path}: figure {head} names unknown hardware {head['hardware']!r}")
        figures.append(ReferenceFigure(str(head["bench"]), str(head["figure"]), str(head["device"]),
                                       str(head["hardware"]), float(head["value"]),
                                       tuple(sorted((k, str(v)) for k, v in entry.items()))))
    return References(tuple(figures), dict(raw["hardware"]))


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def hardware_line(device_name: str, load_at_start: float | None) -> str:
    """``hardware: <CPU model>, N cores, torch threads T, torch X, ..., device D; load average (1 min) A at start,
    B at end``."""
    import torch

    from autorecbench.config import resolve_device
    from autorecbench.envinfo import hardware

    device = resolve_device(device_name)
    info = hardware(device)
    where = info.get("gpu") or str(device)
    loads = [f"{load:.2f} at {when}" for load, when in ((load_at_start, "start"), (load_average(), "end"))
             if load is not None]
    return (f"hardware: {info['cpu']}, {info['cpu_count']} cores, torch threads {info['torch_threads']}, "
            f"torch {torch.__version__}, python {platform.python_version()}, device {where}; "
            f"load average (1 min) {', '.join(loads) or 'unknown'}")
