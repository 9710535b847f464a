"""Methods by name. A new method is one file in ``methods/`` that calls ``register``."""

from __future__ import annotations

import difflib
import importlib

from ..errors import GenrepError
from .base import DataSpec, Method

_METHODS: dict[str, type[Method]] = {}
_MODULES = ("supervised", "genvit")  # imported on first lookup so each file registers itself


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"{__package__}.{module}")


def method_names() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    _load_all()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise GenrepError(f"unknown method '{name}'{hint}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def build_method(name: str, cfg, data: DataSpec) -> Method:
    return get_method(name)(cfg, data)
