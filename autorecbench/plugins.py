"""How registries find their entries: the modules of a package import themselves in, and each class in them
registers itself with its registry's decorator (methods, backbones, validations)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Collection


def import_package_modules(package: str, skip: Collection[str] = ()) -> None:
    """Import every module of ``package`` (a dotted name) but those named in ``skip``."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
