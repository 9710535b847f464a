from ..callable_package import make_callable
from .base import CAPABILITIES, DataSpec, Method
from .registry import build_method, get_method, method_names, register

__all__ = ["CAPABILITIES", "DataSpec", "Method", "build_method", "get_method", "method_names", "register"]


def registered() -> dict[str, tuple[str, ...]]:
    """Every registered method and its capabilities (``genrep.methods()``)."""
    return {name: tuple(get_method(name).capabilities) for name in method_names()}


make_callable(__name__, registered)
