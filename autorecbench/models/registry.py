"""The backbone registry behind the ``model=`` config group: a backbone class registers itself by name with
``@register_model("name")`` in its own module, and ``model_class`` imports the package's modules to find it, then
the installed plugins' (entry point group ``autorecbench.models``, see :mod:`autorecbench.plugins`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from autorecbench.errors import UserError
from autorecbench.plugins import MODELS_GROUP, import_package_modules, load_entry_points

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
    """Import every module of ``autorecbench.models`` (and every plugin's) so each backbone registers itself."""
    import_package_modules("autorecbench.models", skip=("registry",))
    for plugin in load_entry_points(MODELS_GROUP):
        # A module registers its own classes; an entry point naming a class is registered under its name.
        if isinstance(plugin.obj, type) and issubclass(plugin.obj, nn.Module) and plugin.obj not in MODELS.values():
            try:
                register_model(plugin.name)(plugin.obj)
            except RuntimeError as exc:
                raise UserError(f"{plugin.describe()}: {exc}") from None
    return MODELS


def model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        load_models()
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]
