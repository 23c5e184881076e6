"""Backbones (prediction networks on top of embeddings), registered by name for the ``model=`` config group."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from autorecbench.errors import UserError

T = TypeVar("T", bound=type[nn.Module])
MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        MODELS[name] = cls
        return cls

    return wrap


def model_class(name: str) -> type[nn.Module]:
    from autorecbench.models import backbones, rating  # noqa: F401  (register the built-in backbones)

    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]
