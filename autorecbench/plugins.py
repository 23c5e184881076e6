"""How registries find their entries: the modules of a package import themselves in, and each class in them
registers itself with its registry's decorator (methods, backbones, validations).

Third-party packages add entries through entry points, without touching this repository:

    [project.entry-points."autorecbench.methods"]
    my_method = "my_package.method"          # a module whose classes use @register_method
    [project.entry-points."autorecbench.models"]
    my_backbone = "my_package.backbone:MyBackbone"   # or a module using @register_model("my_backbone")
    [project.entry-points."autorecbench.datasets"]
    my_data = "my_package.data"              # a module that adds its raw-format reader (may be YAML only)

An entry point names a module (importing it registers what it defines) or an object in one (a class the
registry then registers under the entry point's name). The plugin's YAML lives in a ``conf/`` folder beside
that module (``my_package/conf/method/my_method.yaml``, ``conf/model/...``, ``conf/data/...``): it joins
Hydra's config search path, so ``method=my_method`` composes like a built-in option.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Collection
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from autorecbench.errors import UserError

METHODS_GROUP = "autorecbench.methods"
MODELS_GROUP = "autorecbench.models"
DATASETS_GROUP = "autorecbench.datasets"
ENTRY_POINT_GROUPS = (METHODS_GROUP, MODELS_GROUP, DATASETS_GROUP)


def import_package_modules(package: str, skip: Collection[str] = ()) -> None:
    """Import every module of ``package`` (a dotted name) but those named in ``skip``."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")


@dataclass(frozen=True)
class Plugin:
    """One loaded entry point: ``obj`` is what it names (a module, or an object in one)."""

    group: str
    name: str
    value: str
    distribution: str
    obj: Any
    config_dir: Path | None  # the ``conf/`` folder beside its module, when there is one

    def describe(self) -> str:
        return f"plugin {self.distribution!r} ({self.group}: {self.name} = {self.value})"


@functools.lru_cache(maxsize=None)
def load_entry_points(group: str) -> tuple[Plugin, ...]:
    """Import every installed entry point of ``group`` (once per process), sorted by name."""
    found = []
    for entry in sorted(metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
        distribution = entry.dist.name if entry.dist is not None else "?"
        try:
            obj = entry.load()
        except Exception as exc:  # an import error in someone else's package: say whose
            raise UserError(f"plugin {distribution!r} ({group}: {entry.name} = {entry.value}) failed to "
                              f"load: {type(exc).__name__}: {exc}") from exc
        module = importlib.import_module(entry.module)
        conf = Path(module.__file__).parent / "conf" if getattr(module, "__file__", None) else None
        found.append(Plugin(group, entry.name, entry.value, distribution, obj,
                            conf if conf is not None and conf.is_dir() else None))
    return tuple(found)


def plugin_config_dirs() -> list[Path]:
    """The ``conf/`` folders of every installed plugin (all groups), without repeats, in a stable order."""
    dirs: list[Path] = []
    for group in ENTRY_POINT_GROUPS:
        for plugin in load_entry_points(group):
            if plugin.config_dir is not None and plugin.config_dir not in dirs:
                dirs.append(plugin.config_dir)
    return dirs
