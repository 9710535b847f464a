"""GenViT and HybViT (Yang et al.): a ViT as the DDPM denoiser, alone and with a classifier head.

GenViT trains ``DenoiserViT`` with the simple diffusion loss (L1 on eps by default, the paper's code).
HybViT adds a CLS classification head: loss = CE(head(CLS)) on the augmented (and, with ``mix_prob``, mixed)
image, without time input, + alpha * L_diff on a separate, unaugmented mini-batch (``view_streams``). The two
mini-batches go through the network as one batch, the classification half untimed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..data.augment import AUGMENTATIONS, Augmentation
from ..diffusion import GaussianDiffusion
from ..errors import GenrepError
from ..fields import setting
from ..nn.denoiser import MODULATIONS, DenoiserViT
from ..nn.flops import linear_flops, transformer_block_flops
from .base import TINY_VIT, DataSpec, ViTConfig, check_vit_shape
from .classification import (ClassifierTrainingConfig, classification_inputs, classification_loss, image_view,
                             mixing_inputs)
from .diffusion_model import DiffusionConfig, DiffusionMethod
from .registry import register


@dataclass
class GenViTConfig(ViTConfig, DiffusionConfig):
    # token: one scalar scale/shift per token (the paper's code) | channel
    time_modulation: str = setting("token", choices=MODULATIONS)

    def validate(self, section: str) -> None:
        ViTConfig.validate(self, section)
        DiffusionConfig.validate(self, section)
        if self.feature_layer is not None and self.feature_layer > self.depth:
            raise GenrepError(f"{section}.feature_layer {self.feature_layer} does not exist; choose 1..{self.depth} "
                              f"({section}.depth {self.depth})")


@dataclass
class HybViTConfig(GenViTConfig, ClassifierTrainingConfig):
    alpha: float = setting(100.0, min=0)  # weight of the diffusion loss (1, 10, 100 in the paper's ablation)
    # the classification stream's augmentation; the diffusion stream has none
    augment: str = setting("strong", choices=AUGMENTATIONS)
    label_smoothing: float = setting(0.0, min=0, max=1)


@register
class GenViT(DiffusionMethod):
    name = "genvit"
    config_class = GenViTConfig
    feature_pools = ("cls", "mean")
    default_pool = "mean"
    feature_maps = True  # the patch tokens on their grid
    tiny_config: ClassVar[dict] = {**TINY_VIT, "sample_steps": 5, "nll_terms": 4}

    def __init__(self, cfg: GenViTConfig, data: DataSpec):
        super().__init__(cfg, data)
        check_vit_shape(cfg, data)
        self.diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule, cfg.prediction, cfg.loss, cfg.variance)
        self.net = DenoiserViT(data.image_size, cfg.patch_size, data.channels, cfg.dim, cfg.depth, cfg.num_heads,
                               cfg.mlp_ratio, cls_token=True, pos_embed=cfg.pos_embed, drop=cfg.drop,
                               modulation=cfg.time_modulation, drop_path=cfg.drop_path)

    # the middle, where iGPT and the diffusion-features paper find a generative model's best features (the last
    # layers turn them back into pixels); on digits the layers are within a few points (docs/benchmarks.md)
    @property
    def default_layer(self) -> int:
        return self.cfg.feature_layer or math.ceil(self.cfg.depth / 2)

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    def feature_map_size(self, layer: int) -> int:
        return self.net.patch_embed.grid

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net.denoise(x_t, t)

    # ---- representation
    _clean_t = True  # the clean read-out is timed at step 0 (HybViT's classification pass is untimed)

    def features(self, x: torch.Tensor, layer: int | None = None, pool: str | None = None) -> torch.Tensor:
        return self.feature_sets(x, [(layer, pool)])[0]

    def feature_sets(self, x: torch.Tensor, reads: list[tuple[int, str]]) -> list[torch.Tensor]:
        """One pass up to the deepest layer asked for, every read-out taken on the way."""
        reads = [self.check_feature_args(layer, pool) for layer, pool in reads]
        x_in, t = self.feature_input(x, self._clean_t)
        hidden = self.net.hidden_states(x_in, max(layer for layer, _ in reads), t=t)
        return [self.net.pool(hidden[layer - 1], pool) for layer, pool in reads]

    # ---- optimisation hints
    def no_weight_decay(self) -> set[str]:
        return {"net.cls_token", "net.pos_embed.pos"}

    def _pass_flops(self, time: bool) -> int:
        c, d = self.cfg, self.data
        patches = (d.image_size // c.patch_size) ** 2
        patch_dim = c.patch_size ** 2 * d.channels
        flops = linear_flops(patches, patch_dim, c.dim) + c.depth * transformer_block_flops(patches + 1, c.dim,
                                                                                             c.mlp_ratio)
        if time:
            flops += self.net.conditioning_flops() + linear_flops(patches, c.dim, patch_dim)
        return flops

    def flops_per_image(self) -> int:
        return self._pass_flops(time=True)


@register
class HybViT(GenViT):
    name = "hybvit"
    config_class = HybViTConfig
    capabilities = frozenset({"logits", "sample", "nll", "score"})
    needs_labels = True
    default_pool = "cls"
    view_streams: ClassVar[dict[str, int]] = {"diffusion": 1}

    def __init__(self, cfg: HybViTConfig, data: DataSpec):
        super().__init__(cfg, data)
        self.head = nn.Linear(cfg.dim, data.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def default_layer(self) -> int:
        return self.cfg.feature_layer or self.cfg.depth  # the CLS token the head reads

    def views(self) -> dict[str, str | Augmentation]:
        return {"image": image_view(self.cfg.augment, self.cfg), "diffusion": "none"}

    def random_inputs(self) -> dict[str, tuple[str, object]]:
        # appended after the diffusion stream's entries, whose draws (by place) stay what they were
        return {**super().random_inputs(), **mixing_inputs(self.cfg)}

    _clean_t = False  # the classification pass: no time input

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(self.normalize(x))[:, 0])

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """logsumexp(logits), the paper's "log p(x)" up to a constant (JEM): higher = more typical. OOD uses it as
        the ``energy`` score; ``grad_log_density`` stays the diffusion model's, as for GenViT, so they compare."""
        return torch.logsumexp(self.logits(x).float(), dim=-1)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # one forward for both mini-batches: the classification images first, untimed (see DenoiserViT)
        images, target = classification_inputs(batch, self.cfg, self.data.num_classes)
        x_cls = self.normalize(images)
        x0, t, noise, x_t = self.noised(batch["diffusion"], batch.get("t"), batch.get("noise"))
        h = self.net(torch.cat([x_cls, x_t]), t=t)
        n = x_cls.shape[0]
        logits = self.head(h[:n, 0])
        ce = classification_loss(logits, target, self.cfg.label_smoothing)
        diff = self.diffusion.loss(self.net.to_image(h[n:]).float(), x0, noise).mean()
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"loss": ce + self.cfg.alpha * diff, "ce": ce.detach(), "diff": diff.detach(), "acc": acc.detach()}

    def flops_per_image(self) -> int:
        classify = self._pass_flops(time=False) + linear_flops(1, self.cfg.dim, self.data.num_classes)
        return classify + self._pass_flops(time=True)
