"""Supervised ViT classifier: the baseline of the HybViT paper (CE on augmented images; its code trains it like
HybViT's classification stream: ``augment: classifier``, Mixup/CutMix, label smoothing, see classification.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.augment import AUGMENTATIONS, Augmentation
from ..fields import setting
from ..nn.flops import linear_flops, transformer_block_flops
from ..nn.vit import ViT
from .base import TINY_VIT, DataSpec, Method, check_vit_shape
from .classification import (ClassifierTrainingConfig, classification_inputs, classification_loss, image_view,
                             mixing_inputs)
from .positions import PositionsConfig, position_parameters, size_options, vit_positions
from .registry import register


@dataclass
class SupervisedConfig(PositionsConfig, ClassifierTrainingConfig):  # positions: the DARL paper's table 1
    label_smoothing: float = setting(0.0, min=0, max=1)
    augment: str = setting("weak", choices=AUGMENTATIONS)
    head_pool: str = setting("cls", choices=("cls", "mean"))  # the token the classifier reads


@register
class SupervisedViT(Method):
    name = "supervised"
    config_class = SupervisedConfig
    capabilities = frozenset({"logits"})
    needs_labels = True
    feature_pools = ("cls", "mean")
    feature_maps = True  # the patch tokens on their grid
    default_pool = "cls"
    tiny_config = TINY_VIT
    feature_options = ("rope_grid",)  # another resolution's read-out, on trained weights

    @classmethod
    def size_options(cls, cfg: SupervisedConfig, trained: int, size: int) -> dict:
        return size_options(cfg, trained, size)

    def __init__(self, cfg: SupervisedConfig, data: DataSpec):
        super().__init__(cfg, data)
        check_vit_shape(cfg, data)
        self.encoder = ViT(data.image_size, cfg.patch_size, data.channels, cfg.dim, cfg.depth, cfg.num_heads,
                           cfg.mlp_ratio, cls_token=True, drop=cfg.drop, drop_path=cfg.drop_path,
                           **vit_positions(cfg))
        self.head = nn.Linear(cfg.dim, data.num_classes)
        nn.init.zeros_(self.head.weight)  # a zero head starts at the uniform prediction (timm/DeiT)
        nn.init.zeros_(self.head.bias)

    def views(self) -> dict[str, str | Augmentation]:
        return {"image": image_view(self.cfg.augment, self.cfg)}

    def random_inputs(self) -> dict[str, tuple[str, object]]:
        return mixing_inputs(self.cfg)

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.normalize(x))
        return self.head(self.encoder.pool(h, self.cfg.head_pool))

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, target = classification_inputs(batch, self.cfg, self.data.num_classes)
        logits = self.logits(images)
        ce = classification_loss(logits, target, self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"loss": ce, "ce": ce.detach(), "acc": acc.detach()}

    def features(self, x: torch.Tensor, layer: int | None = None, pool: str | None = None) -> torch.Tensor:
        layer, pool = self.check_feature_args(layer, pool)
        return self.encoder.pool(self.encoder(self.normalize(x), layer=layer), pool)

    def feature_map_size(self, layer: int) -> int:
        return self.encoder.patch_embed.grid

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token"} | position_parameters(self.cfg)

    def flops_per_image(self) -> int:
        c, d = self.cfg, self.data
        patches = (d.image_size // c.patch_size) ** 2
        tokens = patches + 1
        return (linear_flops(patches, c.patch_size ** 2 * d.channels, c.dim)
                + c.depth * transformer_block_flops(tokens, c.dim, c.mlp_ratio)
                + linear_flops(1, c.dim, d.num_classes))
