"""SimCLR (Chen et al. 2020) as the GCRL paper's baseline, on the same colour-token transformer.

Two strongly augmented views (table 2: resized crop 0.2-1, colour jitter 0.8, grey 0.2, flip) are quantized to
colour tokens and encoded; the last block's output is average-pooled, layer-normalised and projected by the
two-layer head (LayerNorm in place of BatchNorm, hidden 1,024, output 64 on CIFAR / 128 on ImageNet), and the
symmetric NT-Xent (eq. 3) pulls the two views together against the global batch's negatives.

The paper's SimCLR runs "the same architecture for all objectives": table 1's axial block (unmasked row,
masked column, masked row attention), causal, behind iGPT's start token; its recipes say ``attention: axial``
and ``causal: true``. The method's defaults stay the fast generic encoder (dense, ``causal: false``: SimCLR's
own papers use unmasked encoders), which the paper recipes keep as the bidirectional ablation
(``--model.attention dense --model.causal false``); a run's config records both keys, so no old run changes.

The representation (pool "ln", the default) is the branch's LayerNorm of the mean, what the head reads (Fig. 1);
pool "mean" is the raw mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..data.augment import AUGMENTATIONS, DEFAULT_CROP_SCALE, Augmentation
from ..errors import GenrepError
from ..fields import setting
from ..nn.contrastive import ProjectionHead, nt_xent
from .colour_tokens import TINY_TOKENS, ColourTokenConfig, ColourTokenMethod
from .registry import register


@dataclass
class ContrastiveConfig:
    """The contrastive keys SimCLR and GCRL share."""
    # NT-Xent's tau: the paper gives none; 0.5 is SimCLR's CIFAR setting (its appendix B.9)
    tau: float = setting(0.5, above=0, max=100)
    proj_hidden: int = setting(1024, min=1)
    proj_dim: int = setting(64, min=1)  # 64 for CIFAR, 128 for ImageNet (section 4.1)
    # the contrastive views' augmentation: strong is table 2's; weak (iGPT's crop + flip) is table 9's easier
    # pretext task, and what 8x8 digits need (a 0.2-area crop of 8x8 pixels leaves nothing to match)
    contrastive_augment: str = setting("strong", choices=AUGMENTATIONS)
    # the strong (and crop) view's smallest crop, as a fraction of the image's area: RandomResizedCrop's scale
    # (crop_scale, 1); table 2's 0.2, and table 9's "weak augmentation" (an easy pretext task) 0.8
    crop_scale: float = setting(DEFAULT_CROP_SCALE, above=0, max=1,
                                only_if={"contrastive_augment": ("strong", "crop")})


@dataclass
class SimCLRConfig(ColourTokenConfig, ContrastiveConfig):
    causal: bool = False

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.attention == "axial" and not self.causal:
            raise GenrepError(f"{section}.attention axial is causal by construction; SimCLR with it needs "
                              f"--{section}.causal true (or use {section}.attention dense)")


class ContrastiveHead(nn.Module):
    """Pooled encoder output -> LayerNorm -> SimCLR's projection head."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = ProjectionHead(dim, hidden, out)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(pooled))


@register
class SimCLR(ColourTokenMethod):
    name = "simclr"
    config_class = SimCLRConfig
    batch_coupled = True
    tiny_config: ClassVar[dict] = {**TINY_TOKENS, "proj_hidden": 32, "proj_dim": 16}
    predicts_tokens = False

    def __init__(self, cfg: SimCLRConfig, data):
        super().__init__(cfg, data)
        self.causal_mask = cfg.causal
        self.contrastive = ContrastiveHead(cfg.dim, cfg.proj_hidden, cfg.proj_dim)

    @property
    def reads_shifted(self) -> bool:
        return self.cfg.causal  # a causal encoder reads behind the start token, like iGPT's

    def ln_readout(self, h):
        return self.contrastive.norm(h.mean(dim=1))  # Fig. 1: GAP, LN, then (not read) the projection head

    def views(self):
        view = Augmentation(self.cfg.contrastive_augment, crop_scale=self.cfg.crop_scale)
        return {"view1": view, "view2": view}

    def flops_per_image(self) -> int:
        # two views through the whole stack and the projection head (NT-Xent's similarities are left out: they
        # grow with the batch, not the image)
        return 2 * (self.cfg.depth * self.net.block_flops() + self.contrastive.proj.flops())

    def loss(self, batch):
        x = torch.cat([batch["view1"], batch["view2"]])
        h = self.net.run(self.net.embed(self.tokens(x), self.reads_shifted), causal=self.cfg.causal)
        z1, z2 = self.contrastive(h.mean(dim=1)).chunk(2)
        loss = nt_xent(z1, z2, self.cfg.tau)
        return {"loss": loss, "contrastive": loss.detach()}
