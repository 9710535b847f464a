"""Discrete patch tokenizers: the interface a method that reads image codes (GVP) takes, and the loader of one
from a genrep run folder (``model.tokenizer: runs/vq-digits``).

A tokenizer maps each f x f patch of an image to one of ``codebook_size`` codes, in raster order, and back. The
``vq`` method implements it; any method with the same members does, so a later tokenizer (a VQGAN read from its
own file) is one more method, not a change to its readers. The reader holds it as a frozen part
(``Method.freeze(name, module, weights_file)``), so its run records the weights' path and sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import GenrepError
from .base import DataSpec

TOKENIZER_API = ("codebook_size", "downsample", "encode", "decode", "code_vectors")


@runtime_checkable
class PatchTokenizer(Protocol):
    codebook_size: int  # K
    downsample: int  # f: pixels per code side

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> long codes [B, (H/f) * (W/f)] in raster (row-major) order."""

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Long codes [B, N] -> images [B, C, H, W] in [0, 1]."""

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Long codes [B, N] -> their codebook vectors [B, N, D]."""


def is_tokenizer(obj) -> bool:
    """Whether ``obj`` (a module, or a method's class) has every member of ``PatchTokenizer``."""
    return all(hasattr(obj, name) for name in TOKENIZER_API)


def tokenizer_methods() -> list[str]:
    from .registry import get_method, method_names

    return [name for name in method_names() if is_tokenizer(get_method(name))]


def load_tokenizer(run: str | Path, data: DataSpec, key: str = "model.tokenizer") -> tuple[nn.Module, Path]:
    """The tokenizer trained in the genrep run folder ``run`` (its EMA weights, eval mode) for images of
    ``data``, and the weights file it was read from (the caller's ``Method.freeze`` source). ``key`` names the
    config key in the errors."""
    # runs.py sits above methods/ (it imports the registry): imported here, when a reader is built
    from ..runs import load_frozen_run
    from .registry import get_method

    def accept(cfg) -> None:
        if not is_tokenizer(get_method(cfg.method)):
            raise GenrepError(f"{key} {run} is a run of {cfg.method}, which is not a patch tokenizer; give a run "
                              f"of {', '.join(tokenizer_methods())}")

    _, tokenizer, weights = load_frozen_run(run, data, key, "the run folder of a trained tokenizer (genrep pretrain "
                                            "--recipe vq-digits, with this run's --data.name and --data.image_size)",
                                            accept)
    return tokenizer, weights
