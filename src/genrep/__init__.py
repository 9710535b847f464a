"""genrep: hybrid generative-discriminative visual representation learning.

The Python API: ``load`` a trained run and read it (``Run.features``, ``logits``, ``sample``, ``complete``, ``nll``),
``pretrain`` a recipe, ``probe`` and ``evaluate`` a run, list ``recipes`` and ``methods`` (``genrep.api``).
"""

__version__ = "0.1.0"

# imported on first use, so `genrep --help` and the CLI's own imports do not pay for torch up front
_API = {"evaluate": "api", "methods": "methods", "pretrain": "api", "probe": "api", "recipes": "recipes",
        "Run": "run", "load": "run", "GenrepError": "errors"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'genrep' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f".{_API[name]}", __name__)
    value = module if name in ("methods", "recipes") else getattr(module, name)   # callable packages
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
