"""Config values checked against the types they must have, before anything runs: ``seed=1.5`` or
``runner.batch_size=abc`` is a one-line error quoting the value (:class:`~autorecbench.errors.UserError`), not a
run with a silently truncated seed or a comparison error deep inside a runner."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from autorecbench.errors import UserError, quoted

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "a mapping"}


def kind_of(value: Any) -> type | None:
    """The scalar or container kind a config value has (bool before int: ``True`` is not a number here)."""
    for kind in (bool, int, float, str, list, dict):
        if isinstance(value, kind):
            return kind
    if isinstance(value, tuple):
        return list
    return None


def accepts(kind: type, value: Any) -> bool:
    """Whether ``value`` may stand where a value of ``kind`` belongs (an integer where a number does)."""
    got = kind_of(value)
    return got is kind or (kind is float and got is int)


def _alternatives(annotation: Any) -> tuple[list[type], bool, Any]:
    """The kinds an annotation allows, whether None is allowed, and a list's item annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds: list[type] = []
        optional, item = False, None
        for arg in typing.get_args(annotation):
            if arg is type(None):
                optional = True
                continue
            sub, _, sub_item = _alternatives(arg)
            kinds += sub
            item = item or sub_item
        return kinds, optional, item
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return [list], False, args[0] if args else None
    if origin is dict:
        return [dict], False, None
    if annotation in _NAMES:
        return [annotation], False, None
    return [], False, None  # Any, a class: not checked here


def check_value(key: str, value: Any, annotation: Any) -> None:
    kinds, optional, item = _alternatives(annotation)
    if not kinds or (value is None and optional):
        return
    if not any(accepts(kind, value) for kind in kinds):
        wanted = " or ".join(_NAMES[k] for k in kinds) + (" (or null)" if optional else "")
        raise UserError(f"{key} must be {wanted}, got {quoted(value)}")
    if item is not None and kind_of(value) is list:
        for i, element in enumerate(value):
            check_value(f"{key}[{i}]", element, item)


def check_dataclass(cls: type, values: dict[str, Any], prefix: str) -> None:
    """Each of ``values`` that names a field of dataclass ``cls`` against that field's annotation."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in values:
            check_value(f"{prefix}.{field.name}", values[field.name], hints[field.name])


def check_like(key: str, value: Any, default: Any) -> None:
    """An override of ``key`` against the kind of the value it replaces (null defaults and strings take any)."""
    kind = kind_of(default)
    if kind in (bool, int, float) and not accepts(kind, value):
        raise UserError(f"{key} must be {_NAMES[kind]}, got {quoted(value)}")
