"""The backbone registry behind the ``model=`` config group: a backbone class registers itself by name with
``@register_model("name")`` in its own module, and ``model_class`` imports the package's modules to find it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from autorecbench.errors import UserError
from autorecbench.plugins import import_package_modules

T = TypeVar("T", bound=type[nn.Module])
MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        if name in MODELS and MODELS[name] is not cls:
            raise RuntimeError(f"two models registered as {name!r}")
        MODELS[name] = cls
        return cls

    return wrap


def load_models() -> dict[str, type[nn.Module]]:
    """Import every module of ``autorecbench.models`` so each backbone registers itself."""
    import_package_modules("autorecbench.models", skip=("registry",))
    return MODELS


def model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        load_models()
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]
