"""Checkpointable state: writing live objects to a file, and putting them back in place.

A checkpoint keeps object graphs as pickle does (``torch.save``: tensors by storage, so views keep sharing
memory — e.g. :class:`~autorecbench.train.optim.FlatAdam`'s parameters are views of one flat buffer), with two
changes (:func:`dump`):
- a ``torch.Generator`` is written as its device and state (older torch builds cannot pickle one);
- a function is written as the contents of its closure cells (:class:`FunctionState`): an offline method's search
  step is a local function closing over its search model and optimisers, which pickle cannot write by name.

:func:`restore` puts a loaded value back into the live object it was taken from, *in place* wherever it can, so
that every other reference to a live object (a local variable of a search, an optimiser's parameter list, a view
of a flat buffer) sees the restored values:
- tensors of the same shape, dtype and device are copied into (``copy_``); others (a table that grew) are
  replaced by the loaded tensor;
- optimisers load the saved optimiser's ``state_dict``; generators (torch, numpy, ``random``) its state;
- modules and any other object with a ``__dict__`` (or ``__slots__``) are restored attribute by attribute;
  dicts key by key, lists and tuples of the same length item by item;
- functions get their closure cells restored; plain data (numbers, strings, None, ...) is replaced;
- an OmegaConf config is kept as it is (a resumed run has the same config);
- anything the live side lacks (an attribute set by a stage that a resume skips) is taken from the file.
"""

from __future__ import annotations

import enum
import io
import pickle
import random
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MISSING: Any = object()


class FunctionState:
    """A function as a checkpoint keeps it: the contents of its closure cells (``None`` for an empty cell)."""

    def __init__(self, cells: tuple[Any, ...]) -> None:
        self.cells = cells

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # functools.partial insists on a callable
        raise RuntimeError("a function read back from a checkpoint cannot be called; restore() it into a live one")


def _cell_contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _rebuild_generator(device: str, state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.set_state(state.cpu())
    return generator


def _by_name(function: types.FunctionType) -> bool:
    """Whether pickle can write ``function`` by its name (a module-level function, not a local one)."""
    target: Any = sys.modules.get(function.__module__)
    for part in function.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is function


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Generator):
            return _rebuild_generator, (str(obj.device), obj.get_state())
        if isinstance(obj, types.FunctionType) and not _by_name(obj):
            return FunctionState, (tuple(_cell_contents(c) for c in obj.__closure__ or ()),)
        return NotImplemented


class _PickleModule:
    """What ``torch.save(pickle_module=...)`` needs: a ``Pickler`` class (torch subclasses it) and the protocol."""

    Pickler = _Pickler
    Unpickler = pickle.Unpickler
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL
    load = staticmethod(pickle.load)
    dump = staticmethod(pickle.dump)


def dump(root: Any, target: Path | io.BytesIO) -> None:
    """Write ``root`` (see the module docstring)."""
    torch.save(root, target, pickle_module=_PickleModule)


def load(source: Path | io.BytesIO) -> Any:
    """Read what :func:`dump` wrote; tensors come back on the devices they were saved from."""
    return torch.load(source, weights_only=False)


def unpicklable(root: Any, path: str = "") -> str | None:
    """The dotted path of the first attribute under ``root`` that cannot be written (for an error message)."""
    try:
        dump(root, io.BytesIO())
        return None
    except Exception:  # noqa: BLE001 - any pickling failure: look one level deeper
        pass
    children: list[tuple[str, Any]] = []
    if isinstance(root, dict):
        children = [(f"{path}[{k!r}]", v) for k, v in root.items()]
    elif isinstance(root, (list, tuple)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(root)]
    elif hasattr(root, "__dict__"):
        children = [(f"{path}.{k}", v) for k, v in vars(root).items()]
    for child_path, child in children:
        found = unpicklable(child, child_path)
        if found is not None:
            return found
    return f"{path} ({type(root).__name__})"


# ---------------------------------------------------------------------------------------------- restore

_PLAIN = (type(None), bool, int, float, complex, str, bytes, enum.Enum, torch.device, torch.dtype, slice, range,
          torch.Size)
_RANDOM_STATES: tuple[tuple[type, Callable[[Any], Any], Callable[[Any, Any], None]], ...] = (
    (np.random.Generator, lambda g: g.bit_generator.state, lambda g, s: setattr(g.bit_generator, "state", s)),
    (np.random.RandomState, lambda g: g.get_state(), lambda g, s: g.set_state(s)),
    (random.Random, lambda g: g.getstate(), lambda g, s: g.setstate(s)),
)


def _is_config(value: Any) -> bool:
    from omegaconf import Container

    return isinstance(value, Container)


def restore(live: Any, saved: Any, memo: dict[int, Any] | None = None) -> Any:
    """Put ``saved`` into ``live`` in place where possible; return the object to keep (``live`` itself, or the
    loaded object where ``live`` cannot take it). ``MISSING`` for ``live`` means there is none."""
    memo = {} if memo is None else memo
    if live is not MISSING and not isinstance(live, _PLAIN):
        key = id(live)
        if key in memo:
            return memo[key]
        memo[key] = live  # cycles and shared objects: each live object is restored once
        memo[key] = kept = _restore(live, saved, memo)
        return kept
    return _restore(live, saved, memo)


def _restore(live: Any, saved: Any, memo: dict[int, Any]) -> Any:
    if _is_config(live):
        return live
    if isinstance(saved, FunctionState):
        if isinstance(live, types.FunctionType) and len(live.__closure__ or ()) == len(saved.cells):
            for cell, value in zip(live.__closure__ or (), saved.cells):
                current = _cell_contents(cell)
                kept = restore(current, value, memo)
                if kept is not current:
                    cell.cell_contents = kept
        return live  # a function cannot be rebuilt from its cells: keep the live one (or MISSING)
    if isinstance(live, types.MethodType):
        if isinstance(saved, types.MethodType):
            restore(live.__self__, saved.__self__, memo)
        return live
    if isinstance(saved, torch.Tensor):
        return _restore_tensor(live, saved)
    if isinstance(saved, torch.Generator):
        if isinstance(live, torch.Generator) and live.device == saved.device:
            live.set_state(saved.get_state())
            return live
        return saved
    if isinstance(saved, torch.optim.Optimizer):
        if type(live) is type(saved):
            live.load_state_dict(saved.state_dict())
            return live
        return saved
    for kind, get, put in _RANDOM_STATES:
        if isinstance(saved, kind):
            if type(live) is type(saved):
                put(live, get(saved))
                return live
            return saved
    if isinstance(saved, np.ndarray):
        if isinstance(live, np.ndarray) and live.shape == saved.shape and live.dtype == saved.dtype:
            np.copyto(live, saved)
            return live
        return saved
    if isinstance(saved, _PLAIN) or isinstance(saved, (set, frozenset)):
        return saved
    if isinstance(saved, dict):
        return _restore_dict(live, saved, memo)
    if isinstance(saved, list):
        if type(live) is not type(saved) or len(live) != len(saved):
            return saved
        for i, value in enumerate(saved):
            live[i] = restore(live[i], value, memo)
        return live
    if isinstance(saved, tuple):
        if type(live) is not type(saved) or len(live) != len(saved):
            return saved
        items = [restore(a, b, memo) for a, b in zip(live, saved)]
        if all(a is b for a, b in zip(items, live)):
            return live
        return type(live)(*items) if hasattr(live, "_fields") else type(live)(items)
    if type(live) is not type(saved):
        return saved
    return _restore_attributes(live, saved, memo)


def _restore_tensor(live: Any, saved: torch.Tensor) -> Any:
    if (isinstance(live, torch.Tensor) and live.layout == torch.strided and saved.layout == torch.strided
            and live.shape == saved.shape and live.dtype == saved.dtype and live.device == saved.device):
        with torch.no_grad():
            live.copy_(saved)
        return live
    return saved


def _restore_dict(live: Any, saved: dict[Any, Any], memo: dict[int, Any]) -> Any:
    if not isinstance(live, dict) or type(live) is not type(saved):
        return saved
    for key in [k for k in live if k not in saved]:
        del live[key]
    for key, value in saved.items():
        current = live.get(key, MISSING)
        kept = restore(current, value, memo)
        if kept is not MISSING and kept is not current:
            live[key] = kept
    return live


def _restore_attributes(live: Any, saved: Any, memo: dict[int, Any]) -> Any:
    """Objects of the same class (modules, optimisers' helpers, stores, queues, ...): attribute by attribute,
    written straight into ``__dict__`` (no ``nn.Module.__setattr__`` bookkeeping, no frozen-dataclass guard)."""
    if hasattr(saved, "__dict__"):
        target = vars(live)
        for name, value in vars(saved).items():
            current = target.get(name, MISSING)
            kept = restore(current, value, memo)
            if kept is not MISSING and kept is not current:
                target[name] = kept
    for name in _slot_names(type(saved)):
        if hasattr(saved, name):
            current = getattr(live, name, MISSING)
            kept = restore(current, getattr(saved, name), memo)
            if kept is not MISSING and kept is not current:
                object.__setattr__(live, name, kept)
    return live


def _slot_names(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else [s for s in slots if s not in ("__dict__", "__weakref__")]
    return names


# ---------------------------------------------------------------------------------------------- RNGs

def rng_state() -> dict[str, Any]:
    """Every global random number generator a run draws from: Python's, numpy's, torch's CPU and CUDA ones."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
