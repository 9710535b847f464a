"""Methods by name. A new method is one file in ``methods/`` whose class is decorated with ``register``:
every module of this package is imported on first lookup, so no list names it. Methods that live outside
the package (a researcher's own, or a test's) register by being imported, or through the environment
variable ``GENREP_METHODS`` (comma-separated module names, imported on first lookup)."""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil

from ..errors import GenrepError
from .base import DataSpec, Method

_METHODS: dict[str, type[Method]] = {}
# modules of methods/ that define no method
HELPER_MODULES = {"base", "registry", "classification", "colour_tokens", "diffusion_model", "positions", "tokenizers"}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in HELPER_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")
    for module in filter(None, (m.strip() for m in os.environ.get("GENREP_METHODS", "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            _loaded = False
            raise GenrepError(f"GENREP_METHODS names module '{module}', which cannot be imported ({e}); "
                              f"fix the name or unset GENREP_METHODS") from None


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
