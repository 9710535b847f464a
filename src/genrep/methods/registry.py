"""Methods by name. A new method is one file in ``methods/`` whose class is decorated with ``register``:
every module of this package is imported on first lookup, so no list names it. Methods that live outside
the package (a researcher's own, or a test's) register by being imported, or through the environment
variable ``GENREP_METHODS`` (comma-separated module names, imported on first lookup). A plug-in that cannot be
imported, or that registers what is not a method, is one line naming it, and leaves the registry as it was."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import pkgutil
import sys

from ..errors import GenrepError
from ..fields import one_line, show
from .base import DataSpec, Method

_METHODS: dict[str, type[Method]] = {}
# modules of methods/ that define no method
HELPER_MODULES = {"base", "registry", "classification", "colour_tokens", "diffusion_model", "positions", "tokenizers"}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', show(cls))}"
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise GenrepError(f"register takes a subclass of genrep.methods.Method; {where} is not one")
    lacks = []
    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and name.strip() == name and name):
        lacks.append("a 'name' (the method's name, a class attribute such as name = 'mymethod')")
    config = getattr(cls, "config_class", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        lacks.append("a 'config_class' (the dataclass of its model config keys)")
    if lacks:
        raise GenrepError(f"method class {where} lacks {' and '.join(lacks)}; a method declares both")
    other = _METHODS.get(name)
    reloaded = other is not None and (other.__module__, other.__qualname__) == (cls.__module__, cls.__qualname__)
    if other is not None and other is not cls and not reloaded:
        raise GenrepError(f"method name {name!r} is registered twice: by {other.__module__}.{other.__qualname__} and "
                          f"by {where}; give one of them another name")
    _METHODS[name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a module that looks a method up while it is imported does not start a second load
    try:
        package = importlib.import_module(__package__)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in HELPER_MODULES and not info.name.startswith("_"):
                importlib.import_module(f"{__package__}.{info.name}")
        for module in filter(None, (m.strip() for m in os.environ.get("GENREP_METHODS", "").split(","))):
            _import_plugin(module)
    except BaseException:
        _loaded = False  # a failed plug-in is refused again at the next lookup, not forgotten
        raise


def _import_plugin(module: str) -> None:
    """Import the GENREP_METHODS module ``module``; whatever it raises (or a sys.exit) is one line naming it, and
    the methods it registered before failing are taken back."""
    if not all(part.isidentifier() for part in module.split(".")):
        raise GenrepError(f"GENREP_METHODS names {show(module)}, which is not a module name (dotted Python names, "
                          f"e.g. my_methods or lab.methods); fix the name or unset GENREP_METHODS")
    methods, modules = dict(_METHODS), set(sys.modules)
    try:
        importlib.import_module(module)
    except BaseException as e:  # noqa: BLE001 - a plug-in's failure, whatever it is, is the user's to fix
        # as if it was never imported: a later import (the module fixed) registers its methods again
        _METHODS.clear()
        _METHODS.update(methods)
        for name in set(sys.modules) - modules:
            if name == module or name.startswith(module + "."):
                del sys.modules[name]
        if not isinstance(e, (Exception, SystemExit)):
            raise  # Ctrl-C is the user's, not the plug-in's
        if isinstance(e, ModuleNotFoundError) and e.name is not None and (module + ".").startswith(e.name + "."):
            raise GenrepError(f"GENREP_METHODS names module '{module}', which cannot be imported ({e}); "
                              f"fix the name or unset GENREP_METHODS") from None
        if isinstance(e, GenrepError):
            raise GenrepError(f"GENREP_METHODS module '{module}': {e}") from None
        raise GenrepError(f"GENREP_METHODS module '{module}' failed while being imported: {_first_line(e)}; "
                          f"fix the module, or unset GENREP_METHODS") from None


def _first_line(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"it called sys.exit({show(e.code)})"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {one_line(lines[0], 200)}" if lines else type(e).__name__


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
