"""Discrete patch tokenizers: the interface a method that reads image codes (GVP) takes, and its two readers: a
genrep run folder (``load_tokenizer``, ``model.tokenizer: runs/vq-digits``) and a taming-transformers VQGAN
checkpoint (``load_vqgan``, ``model.vqgan: PATH/last.ckpt``).

A tokenizer maps each f x f patch of an image to one of ``codebook_size`` codes, in raster order, and back. The
``vq`` method implements it, and so does ``nn.vqgan.VQGAN`` (a module, not a method: genrep reads it, never trains
it); any module with the same members does, so its readers need no change. The reader holds it as a frozen part
(``Method.freeze(name, module, weights_file)``), so its run records the weights' path and sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import GenrepError
from ..nn.vqgan import VQGAN, VQGANArch, load_vqgan_state
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


def load_vqgan(path: str | Path, arch: VQGANArch, data: DataSpec, key: str = "model.vqgan",
               arch_keys: str = "model.vqgan_*") -> tuple[VQGAN, Path]:
    """The VQGAN of architecture ``arch`` read from the taming-transformers checkpoint ``path`` (``last.ckpt``, or
    a plain state dict of its VQModel) for images of ``data``, in eval mode, and the file (the caller's
    ``Method.freeze`` source). Refused in one line: a path that is not a file, an image side the downsampling does
    not divide, a file that is not weights-only readable or of another architecture (``arch_keys`` say where to
    describe it). While the holder is sized on the meta device the file is not read."""
    path = Path(path)
    if not path.is_file():
        raise GenrepError(f"{key} {path} is not a file; give a taming-transformers VQGAN checkpoint, e.g. "
                          f"vqgan_imagenet_f16_1024's ckpts/last.ckpt")
    f = arch.downsample
    if data.image_size % f:
        n = len(arch.ch_mult)
        raise GenrepError(f"{key} gives one code per {f}x{f} pixels ({arch_keys.replace('*', 'ch_mult')} has {n} "
                          f"entries: {n - 1} halvings), which does not divide the {data.image_size}-pixel images; "
                          f"choose --data.image_size a multiple of {f}")
    model = VQGAN(arch)
    if not model.quant_conv.weight.is_meta:  # the memory check builds on the meta device: read nothing
        try:
            load_vqgan_state(model, path, hint=f"set {arch_keys} to the checkpoint's model.yaml (its ddconfig, "
                                               f"n_embed, embed_dim) and the data's channels to its in_channels")
        except GenrepError as e:
            raise GenrepError(f"{key} {e}") from None
    return model.eval(), path
