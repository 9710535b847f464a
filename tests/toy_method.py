"""A throwaway method that exists only in the tests: the proof that the method contract fits the next systems.

``toy`` is a tiny random-order autoregressive denoiser over image patches. It touches every part of the
contract that GCRL, diffusion features, GVP and DARL need, and no more:
- ``prepare``: per-channel pixel statistics fitted on the training set (as GCRL's palette will be);
- a frozen part: a fixed patch "tokenizer" read from a safetensors file (as a pretrained U-Net or VQ model);
- per-sample randomness of the new kinds: a Beta noise level (DARL) and a random order (GVP, DARL);
- RoPE on the sequence index, causal attention, a key/value cache for sampling and completion;
- the ``complete`` capability, a capability option (``temperature``) and a switchable causal read-out;
- no analytic FLOPs: the benchmark's count comes from the FLOP counter.
It is registered by ``conftest`` (and reaches CLI subprocesses through ``GENREP_METHODS``), not shipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from genrep.errors import GenrepError
from genrep.methods import DataSpec, Method, register
from genrep.nn.patch import patchify, unpatchify
from genrep.nn.rope import RoPE1D
from genrep.nn.transformer import Block


@dataclass
class ToyConfig:
    dim: int = 32
    depth: int = 2
    num_heads: int = 2
    patch_size: int = 2
    drop: float = 0.0
    tokenizer: str = ""            # the frozen tokenizer's safetensors file; "" = default_tokenizer's fixed one
    beta_a: float = 1.0            # the noise level gamma ~ Beta(a, b) of each training image (DARL's schedule)
    beta_b: float = 1.0
    temperature: float = 0.1       # sample / complete: std of the Gaussian around each predicted patch


TOKENIZER_FOLDER = "GENREP_TOY_TOKENIZERS"  # the folder of the fixed tokenizers; conftest makes it per session


def default_tokenizer(patch_dim: int, create: bool = True) -> Path:
    """A fixed orthogonal patch transform, the same bytes in every process (so its sha256 is stable), in the
    folder ``$GENREP_TOY_TOKENIZERS``: conftest makes one per test session, so no test reads a file an earlier
    session left behind, and CLI subprocesses inherit the variable."""
    folder = os.environ.get(TOKENIZER_FOLDER, "")
    if not folder:
        raise GenrepError(f"the toy method's default tokenizer lives in ${TOKENIZER_FOLDER}, which is not set; "
                          f"run it under the tests' conftest or give --model.tokenizer FILE")
    path = Path(folder) / f"genrep-toy-tokenizer-{patch_dim}.safetensors"
    if create and not path.exists():
        q, _ = torch.linalg.qr(torch.randn(patch_dim, patch_dim, generator=torch.Generator().manual_seed(0),
                                           dtype=torch.float64))
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"weight": q.float().contiguous()}, str(tmp))
        tmp.replace(path)
    return path


@register
class ToyAR(Method):
    name = "toy"
    config_class = ToyConfig
    capabilities = frozenset({"sample", "complete"})
    feature_pools = ("mean", "last")
    default_pool = "mean"
    capability_options: ClassVar[dict[str, tuple[str, ...]]] = {"sample": ("temperature",),
                                                                 "complete": ("temperature",)}
    causal_readout = True

    def __init__(self, cfg: ToyConfig, data: DataSpec):
        super().__init__(cfg, data)
        if data.image_size % cfg.patch_size or cfg.dim % (2 * cfg.num_heads):
            raise GenrepError(f"model.patch_size {cfg.patch_size} must divide {data.image_size} and model.dim "
                              f"{cfg.dim} must split into {cfg.num_heads} heads of even width")
        self.grid = data.image_size // cfg.patch_size
        self.n = self.grid * self.grid
        self.patch_dim = cfg.patch_size ** 2 * data.channels
        tokenizer = nn.Linear(self.patch_dim, self.patch_dim, bias=False)
        real = not tokenizer.weight.is_meta  # the memory check sizes the model on the meta device: no file touched
        source = Path(cfg.tokenizer) if cfg.tokenizer else default_tokenizer(self.patch_dim, create=real)
        if real:
            tokenizer.weight.data.copy_(load_file(str(source))["weight"])
        self.freeze("tokenizer", tokenizer, source)
        self.embed = nn.Linear(self.patch_dim, cfg.dim)
        self.start = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.query_pos = nn.Parameter(torch.randn(1, self.n, cfg.dim) * 0.02)  # where the next patch goes
        self.rope = RoPE1D(cfg.dim // cfg.num_heads)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.num_heads, 2.0, drop=cfg.drop) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, self.patch_dim)
        self.register_buffer("pixel_mean", torch.zeros(data.channels), persistent=False)
        self.register_buffer("pixel_std", torch.ones(data.channels), persistent=False)

    # ---- data-fitted state
    def prepare(self, images, *, device, generator):
        x = images.double() / 255
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return {"pixel_mean": mean.float(), "pixel_std": std.float()}

    def load_prepared(self, state):
        if set(state) != {"pixel_mean", "pixel_std"} or state["pixel_mean"].shape != (self.data.channels,):
            raise GenrepError(f"toy's fitted state must be pixel_mean and pixel_std of {self.data.channels} "
                              f"channels, got {sorted(state)}")
        super().load_prepared(state)

    # ---- the network
    def views(self):
        return {"image": "none"}

    def random_inputs(self):
        return {"noise": ("normal", "image"), "level": ("beta", (self.cfg.beta_a, self.cfg.beta_b, ())),
                "order": ("permutation", self.n)}

    def _standardise(self, x):
        return (x - self.pixel_mean.view(1, -1, 1, 1)) / self.pixel_std.view(1, -1, 1, 1)

    def _patches(self, x):
        return patchify(self._standardise(x), self.cfg.patch_size)

    def _embed(self, patches):
        return self.embed(self.tokenizer(patches))

    def _inputs(self, patches, order):
        """Sequence k holds the patch before it in ``order`` (a start token first) plus where patch k goes."""
        seq = patches.gather(1, order[..., None].expand(-1, -1, patches.shape[-1]))
        prev = torch.cat([self.start.expand(len(seq), -1, -1), self._embed(seq[:, :-1])], dim=1)
        where = self.query_pos.expand(len(seq), -1, -1).gather(1, order[..., None].expand(-1, -1, prev.shape[-1]))
        return prev + where, seq

    def _run(self, h, layer=None, cache=None, causal=True):
        for block, c in zip(self.blocks[:layer], cache or [None] * len(self.blocks)):
            h = block(h, is_causal=causal, rope=self.rope, cache=c)
        return h

    def loss(self, batch):
        x = batch["image"]
        B = len(x)
        noise = batch["noise"] if "noise" in batch else torch.randn_like(x)
        level = batch["level"] if "level" in batch else torch.rand(B, device=x.device)
        order = batch["order"] if "order" in batch else torch.rand(B, self.n, device=x.device).argsort(1)
        g = level.view(-1, 1, 1, 1)
        noisy = g.sqrt() * x + (1 - g).sqrt() * noise  # DARL's corruption of the input, per image
        h, _ = self._inputs(self._patches(noisy), order)
        clean = self._patches(x).gather(1, order[..., None].expand(-1, -1, self.patch_dim))
        pred = self.head(self.norm(self._run(h)))
        mse = F.mse_loss(pred.float(), clean.float())
        return {"loss": mse, "mse": mse.detach()}

    # ---- representation
    @property
    def num_layers(self):
        return self.cfg.depth

    def features(self, x, layer=None, pool=None):
        layer, pool = self.check_feature_args(layer, pool)
        raster = torch.arange(self.n, device=x.device).expand(len(x), -1)
        h, _ = self._inputs(self._patches(x), raster)
        h = self._run(h, layer, causal=self.causal_mask)
        return h.mean(1) if pool == "mean" else h[:, -1]

    # ---- generation
    @torch.no_grad()
    def complete(self, x, keep, *, generator=None, progress=False):
        """Raster-order decoding with a key/value cache: each patch is predicted from the ones before it (kept
        pixels as given), and the given pixels are kept."""
        B, C, S, _ = x.shape
        keep_patches = patchify(keep.expand(-1, C, -1, -1).float(), self.cfg.patch_size) > 0.5
        given = self._patches(x)
        cache = [self._new_cache() for _ in self.blocks]
        token, out = self.start.expand(B, -1, -1), []
        for k in range(self.n):
            h = self._run(token + self.query_pos[:, k:k + 1], cache=cache)
            pred = self.head(self.norm(h))[:, 0].float()
            noise = torch.randn(pred.shape, generator=generator).to(pred.device)
            patch = torch.where(keep_patches[:, k], given[:, k], pred + self.cfg.temperature * noise)
            out.append(patch)
            token = self._embed(patch[:, None])
        image = unpatchify(torch.stack(out, 1), self.cfg.patch_size, C)
        image = image * self.pixel_std.view(1, -1, 1, 1) + self.pixel_mean.view(1, -1, 1, 1)
        return torch.where(keep.expand(-1, C, -1, -1), x, image.clamp(0, 1))

    def sample(self, n, *, generator=None, progress=False):
        d = self.data
        device = self.start.device
        blank = torch.zeros(n, d.channels, d.image_size, d.image_size, device=device)
        return self.complete(blank, torch.zeros_like(blank[:, :1], dtype=torch.bool), generator=generator)

    def _new_cache(self):
        from genrep.nn.kv_cache import KVCache
        return KVCache(self.n)

    def no_weight_decay(self):
        return {"start", "query_pos"}
