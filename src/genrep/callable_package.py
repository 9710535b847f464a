"""The Python API's ``genrep.methods()`` and ``genrep.recipes()`` share their names with genrep's packages of the
methods and the recipes, and importing a package binds its name on ``genrep``: so those packages are made callable
(a module may take a subclass of ModuleType as its class), and ``genrep.methods.Method`` stays where it is."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable


def make_callable(package: str, call: Callable) -> None:
    """Calling the module ``package`` calls ``call``."""
    module = sys.modules[package]
    module.__class__ = type("CallablePackage", (types.ModuleType,),
                            {"__call__": lambda self, *args, **kwargs: call(*args, **kwargs), "__doc__": call.__doc__})
