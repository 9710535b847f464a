from .base import CAPABILITIES, DataSpec, Method
from .registry import build_method, get_method, method_names, register

__all__ = ["CAPABILITIES", "DataSpec", "Method", "build_method", "get_method", "method_names", "register"]
