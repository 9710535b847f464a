"""Supervised ViT classifier: the baseline of the HybViT paper (CE on augmented images; its code trains it like
HybViT's classification stream: ``augment: classifier``, Mixup/CutMix, label smoothing, see classification.py), and
the DARL paper's supervised baselines (table 1: the positions of ``pos_embed``; ``causal`` for its "Supervised +
Causal" column).

Causal mode is DARL's sequence without its objective: the CLS token first (DARL's start-of-sequence token), then the
patches in raster order, each token attending to itself and the tokens before it (the fused ``is_causal`` kernels,
as darl.py). Its CLS token then sees nothing of the image, so the classifier reads the mean of the patch tokens, as
appendix A.2 (item 4) says of both supervised columns, or the last patch (``head_pool last``: DARL's own read-out for
fine-tuning, section 4); CLS is refused. The features are read with the mask as trained (the probes'
``eval.probes.causal`` and fine-tuning's ``eval.finetune.causal`` may switch it), from the mean or the last patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.augment import AUGMENTATIONS, Augmentation
from ..errors import GenrepError
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
    # the token the classifier reads: cls, the patch tokens' mean (the DARL paper's supervised baselines, appendix
    # A.2), or the last patch (DARL's read-out)
    head_pool: str = setting("cls", choices=("cls", "mean", "last"))
    causal: bool = False  # causal attention over the CLS token and the patches in raster order (DARL's table 1)

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.causal and self.head_pool == "cls":
            raise GenrepError(f"{section}.head_pool cls reads the CLS token, which under {section}.causal sees only "
                              f"itself: set {section}.head_pool mean (the DARL paper's supervised baselines, appendix "
                              f"A.2) or last (the last patch, DARL's read-out)")


@register
class SupervisedViT(Method):
    name = "supervised"
    config_class = SupervisedConfig
    capabilities = frozenset({"logits"})
    needs_labels = True
    feature_maps = True  # the patch tokens on their grid
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
        # an instance's causal mode: the evaluation reads these as it reads a causal method's class attributes
        self.causal_readout = self.causal_mask = cfg.causal

    @property
    def feature_pools(self) -> tuple[str, ...]:
        # under the mask the CLS token sees only itself: its feature would be one vector for every image
        return ("mean", "last") if self.cfg.causal else ("cls", "mean")

    @property
    def default_pool(self) -> str:
        return self.cfg.head_pool if self.cfg.causal else "cls"

    def views(self) -> dict[str, str | Augmentation]:
        return {"image": image_view(self.cfg.augment, self.cfg)}

    def random_inputs(self) -> dict[str, tuple[str, object]]:
        return mixing_inputs(self.cfg)

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.normalize(x), is_causal=self.causal_mask)
        return self.head(self.encoder.pool(h, self.cfg.head_pool))

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, target = classification_inputs(batch, self.cfg, self.data.num_classes)
        logits = self.logits(images)
        ce = classification_loss(logits, target, self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"loss": ce, "ce": ce.detach(), "acc": acc.detach()}

    def features(self, x: torch.Tensor, layer: int | None = None, pool: str | None = None) -> torch.Tensor:
        layer, pool = self.check_feature_args(layer, pool)
        return self.encoder.pool(self.encoder(self.normalize(x), layer=layer, is_causal=self.causal_mask), pool)

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
