"""ADM: the guided-diffusion U-Net (Dhariwal & Nichol) as a DDPM, and the backbone of "Diffusion Models Beat GANs
on Image Classification" (Mukhopadhyay et al.), whose features are the activation after U-Net block b of the image
noised to step t.

Trained in genrep (``adm-digits``, ``adm-cifar10``) it is a DDPM like GenViT: L_simple on eps, the one
``GaussianDiffusion``, the same samplers and bound. With ``model.pretrained`` it reads a user's guided-diffusion
state dict (``256x256_diffusion_uncond.pt`` into ``adm-imagenet256``) as a frozen part: referenced by path and
sha256, never copied into the run, no trainable parameter.

Blocks are numbered 1..N in forward order as the paper numbers them (ADM-256: encoder 1-18, middle 19, decoder
20-37 in levels of R + 1 = 3 blocks, a decoder block's activation taken after the skip concatenation and the block;
the default read-out is the second block of the second decoder level, the paper's 24); a read-out is that map,
average-pooled to p x p and flattened (pool "p"), or the map itself (pool "map", for the CNN and attention heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..diffusion import LOSSES, SCHEDULES, VARIANCES, GaussianDiffusion
from ..diffusion.process import LEARNED_RANGE
from ..errors import GenrepError
from ..fields import Pool, setting, show
from ..nn.unet import UNet, default_channel_mult, load_unet_state
from .base import DataSpec, is_map_pool, pool_feature_map
from .diffusion_model import DiffusionConfig, DiffusionMethod
from .registry import register

GROUP_NORM_GROUPS = 32  # guided-diffusion's GroupNorm32: every channel count must split into 32 groups


@dataclass
class ADMConfig(DiffusionConfig):
    # the architecture keys of guided-diffusion's script_util (its defaults, its names)
    num_channels: int = setting(128, min=GROUP_NORM_GROUPS, max=8192)
    num_res_blocks: int = setting(2, min=1, max=64)
    channel_mult: list[float] = setting([], above=0, max=64)  # empty: guided-diffusion's choice for 64..512 px
    attention_resolutions: list[int] = setting([16, 8], min=1)  # resolutions (not downsampling factors)
    num_heads: int = setting(4, min=1, max=1024)
    num_head_channels: int = setting(-1, min=-1, max=65536)  # -1: num_heads heads; else heads of this width
    num_heads_upsample: int = setting(-1, min=-1, max=1024)  # -1: num_heads
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = setting(0.0, min=0, below=1)
    # a second output of C channels for the variance (guided-diffusion's checkpoints have it): sampling and the
    # bound then use the network's learned range, not ``variance``; training it needs the hybrid loss, which genrep
    # does not implement, so only a pretrained U-Net may have it
    learn_sigma: bool = False
    pretrained: str = ""  # a guided-diffusion state dict (.pt): the U-Net is read from it and frozen
    feature_pool: Pool = "1"  # the default read-out's pooling: p (p x p average pool) or map
    # guided-diffusion's diffusion defaults: linear schedule, L_simple (MSE on eps), the fixed large variance
    schedule: str = setting("linear", choices=SCHEDULES)
    loss: str = setting("l2", choices=LOSSES)
    variance: str = setting("large", choices=VARIANCES)

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.num_head_channels == 0:
            raise GenrepError(f"{section}.num_head_channels 0 makes no heads; choose -1 (num_heads heads) or a width")
        if not is_map_pool(self.feature_pool):
            raise GenrepError(f"{section}.feature_pool {show(self.feature_pool)} is not a pooling; choose a size p "
                              f"(p x p average pool), 'map' or 'maps' (the map pooled to at most s x s)")
        if self.learn_sigma and not self.pretrained:
            raise GenrepError(f"{section}.learn_sigma trains the variance with guided-diffusion's hybrid loss, which "
                              f"genrep does not implement; set it false to train, or use it with {section}.pretrained")


def unet_kwargs(cfg: ADMConfig, data: DataSpec) -> dict:
    """The U-Net's construction arguments for ``cfg`` on ``data``, checked against the image size."""
    size = data.image_size
    mult = tuple(cfg.channel_mult) or default_channel_mult(size)
    if size % 2 ** (len(mult) - 1):
        raise GenrepError(f"model.channel_mult has {len(mult)} levels, which halve the image {len(mult) - 1} times; "
                          f"{size} px does not halve that often; use at most "
                          f"{(size & -size).bit_length()} levels")
    resolutions = [size >> level for level in range(len(mult))]
    missing = [r for r in cfg.attention_resolutions if r not in resolutions]
    if missing:
        raise GenrepError(f"model.attention_resolutions {missing} never occur in this U-Net; its resolutions on "
                          f"{size} px are {', '.join(map(str, resolutions))}")
    for m in mult:
        ch = int(m * cfg.num_channels)
        if ch % GROUP_NORM_GROUPS:
            raise GenrepError(f"model.num_channels {cfg.num_channels} x channel_mult {m:g} = {ch} channels, which "
                              f"GroupNorm cannot split into {GROUP_NORM_GROUPS} groups; choose multiples of 32")
        heads_width = cfg.num_head_channels
        if heads_width > 0 and ch % heads_width:
            raise GenrepError(f"model.num_head_channels {heads_width} does not divide {ch} channels")
    return dict(image_size=size, in_channels=data.channels, model_channels=cfg.num_channels,
                out_channels=data.channels * (2 if cfg.learn_sigma else 1), num_res_blocks=cfg.num_res_blocks,
                attention_resolutions=tuple(cfg.attention_resolutions), channel_mult=mult, dropout=cfg.dropout,
                num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels,
                num_heads_upsample=cfg.num_heads_upsample, use_scale_shift_norm=cfg.use_scale_shift_norm,
                resblock_updown=cfg.resblock_updown, use_new_attention_order=cfg.use_new_attention_order)


@register
class ADM(DiffusionMethod):
    name = "adm"
    config_class = ADMConfig
    feature_pools = ()  # every read-out is a pooled map: p or map
    feature_maps = True
    tiny_config: ClassVar[dict] = {"num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
                                   "attention_resolutions": [4], "num_head_channels": 32, "sample_steps": 5,
                                   "nll_terms": 4}

    def __init__(self, cfg: ADMConfig, data: DataSpec):
        super().__init__(cfg, data)
        variance = LEARNED_RANGE if cfg.learn_sigma else cfg.variance
        self.diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule, cfg.prediction, cfg.loss, variance)
        unet = UNet(**unet_kwargs(cfg, data))
        self._shapes = unet.block_shapes()
        if cfg.feature_layer is not None and cfg.feature_layer > unet.num_blocks:
            raise GenrepError(f"model.feature_layer {cfg.feature_layer} does not exist; this U-Net has blocks "
                              f"1..{unet.num_blocks}")
        if cfg.pretrained:
            path = Path(cfg.pretrained)
            if not path.is_file():
                raise GenrepError(f"model.pretrained {path} is not a file; give the path of a guided-diffusion "
                                  f"state dict such as 256x256_diffusion_uncond.pt")
            if not unet.time_embed[0].weight.is_meta:  # the memory check builds on the meta device: read nothing
                load_unet_state(unet, path)
            self.freeze("unet", unet, path)
        else:
            self.unet = unet

    # ---- the network
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t)  # with learn_sigma: eps, then v (the diffusion process splits them)

    def capability_settings(self, capability: str) -> dict:
        out = super().capability_settings(capability)
        if capability in ("sample", "nll"):
            out["variance"] = "learned range" if self.cfg.learn_sigma else f"fixed {self.cfg.variance}"
        return out

    # ---- representation
    @property
    def num_layers(self) -> int:
        return len(self._shapes)

    @property
    def middle_block(self) -> int:
        return 1 + len(self.unet.input_blocks)

    @property
    def default_layer(self) -> int:
        # the paper's best ImageNet block (24 of ADM-256) is the second block of the second decoder level; a decoder
        # level has R + 1 blocks, so it is R + 3 after the middle for any R (with R = 1 that block is the level's
        # upsampling one). A one-level U-Net has no second decoder level: its last block
        return self.cfg.feature_layer or min(self.middle_block + self.cfg.num_res_blocks + 3, self.num_layers)

    @property
    def default_pool(self) -> str:
        return self.cfg.feature_pool

    def feature_map_size(self, layer: int) -> int:
        return self._shapes[layer - 1][1]

    def feature_channels(self, layer: int) -> int:
        return self._shapes[layer - 1][0]

    def features(self, x: torch.Tensor, layer: int | None = None, pool: str | None = None) -> torch.Tensor:
        return self.feature_sets(x, [(layer, pool)])[0]

    def feature_sets(self, x: torch.Tensor, reads: list[tuple[int | None, str | None]]) -> list[torch.Tensor]:
        """One U-Net pass, stopped after the deepest block asked for, every read-out taken on the way."""
        reads = [self.check_feature_args(layer, pool) for layer, pool in reads]
        x_in, t = self.feature_input(x)
        acts = self.unet.activations(x_in, t, {layer for layer, _ in reads})
        return [pool_feature_map(acts[layer], pool) for layer, pool in reads]
