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
    from ..runs import CONFIG_FILE, install_run_state, load_train_set, read_run_config
    from ..train.checkpoint import load_safetensors
    from .registry import build_method, get_method

    run = Path(run)
    if not run.is_dir():
        raise GenrepError(f"{key} {run} is not a folder; give the run folder of a trained tokenizer (genrep "
                          f"pretrain --recipe vq-digits)")
    if not (run / CONFIG_FILE).is_file():
        raise GenrepError(f"{key} {run} is not a genrep run (no {CONFIG_FILE}); give the run folder of a trained "
                          f"tokenizer (genrep pretrain --recipe vq-digits)")
    try:
        cfg = read_run_config(run)
    except GenrepError as e:
        raise GenrepError(f"{key} {run}: {e}") from None
    if not is_tokenizer(get_method(cfg.method)):
        raise GenrepError(f"{key} {run} is a run of {cfg.method}, which is not a patch tokenizer; give a run of "
                          f"{', '.join(tokenizer_methods())}")
    weights = run / "ema.safetensors"
    if not weights.is_file():
        raise GenrepError(f"{key} {run} has no trained weights ({weights.name}); let its training write a "
                          f"checkpoint, or give a finished run")
    try:
        state = load_safetensors(weights)
    except GenrepError as e:
        raise GenrepError(f"{key} {run}: {e}") from None
    size, channels = (int(state[k]) if k in state else None for k in ("trained_image_size", "trained_channels"))
    if size is None or channels is None:
        raise GenrepError(f"{key} {weights} does not record the data it was trained on (trained_image_size, "
                          f"trained_channels); give a run written by this genrep")
    if (size, channels) != (data.image_size, data.channels):
        raise GenrepError(f"{key} {run} was trained on {size}x{size} images with {_count(channels, 'channel')}; "
                          f"this run's data are {data.image_size}x{data.image_size} with "
                          f"{_count(data.channels, 'channel')}: train a tokenizer on this data (genrep pretrain "
                          f"--recipe vq-digits, with its --data.name and --data.image_size)")
    tokenizer = build_method(cfg.method, cfg.model, DataSpec(size, channels, data.num_classes))
    # fitted state is checked against the tokenizer's own training set, which only then is loaded
    install_run_state(run, tokenizer, load_train_set(cfg) if tokenizer.has_prepare else None)
    if any(p.is_meta for p in tokenizer.parameters()):
        return tokenizer.eval(), weights  # the memory check builds its reader on the meta device: nothing to fill
    try:
        tokenizer.load_state_dict(state)
    except RuntimeError as e:
        raise GenrepError(f"{key} {weights} does not fit the model in {run / CONFIG_FILE} "
                          f"({str(e).splitlines()[0][:160]})") from None
    return tokenizer.eval(), weights


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
