"""What the readers of other projects' weight files (guided-diffusion's U-Net, taming-transformers' VQGAN) share: why
torch's weights-only unpickler refused a file, and a state dict checked entry by entry against the model before it is
loaded, so that a file of another configuration is one line naming what differs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..errors import GenrepError


def shape_text(shape: Iterable[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def listing(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def refusal_reason(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words: the class it would not unpickle, or (past
    torch's paragraph on the weights_only default) what its unpickler met; a long traceback helps nobody."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    met = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
    first = met.group(1).strip() if met else str(e).strip().splitlines()[0][:80] if str(e).strip() else ""
    return f"it pickles {refused.group(1)}" if refused else f"{type(e).__name__}: {first}".rstrip(": ")


def check_state(state: Mapping, expected: Mapping[str, torch.Tensor], path: str | Path, *, entry_hint: str,
                mismatch: str, hint: str = "") -> None:
    """Every entry of ``state`` a tensor named by a string (else one line ending in ``entry_hint``: what the file
    should hold), and its names and shapes those of ``expected`` (else one line: ``mismatch``, then up to three of
    each kind of difference, then ``hint``)."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise GenrepError(f"{path}: entry {key!r} is not a tensor ({type(value).__name__}); expected "
                              f"{entry_hint}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {shape_text(v.shape)} vs model {shape_text(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        parts = [f"{label} {listing(keys)}" for label, keys in found if keys]
        raise GenrepError(f"{path}: {mismatch}: {'; '.join(parts)}{'; ' + hint if hint else ''}")
