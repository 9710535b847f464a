"""The interface every method implements; the loop and the evaluation see nothing else.

A method is an ``nn.Module`` with
- ``loss(batch) -> dict``: ``"loss"`` is minimised, other entries are named terms for the logs.
  The batch holds one float [B, C, H, W] tensor in [0, 1] per view the method asked for
  (``views``) and ``"label"`` when ``needs_labels``. A view listed in ``view_streams`` is made from
  an independent mini-batch of its own (HybViT's diffusion stream); labels belong to stream 0.
- ``features(x, layer=None, pool=None) -> [B, D]``: the frozen representation the paper evaluates.
- optional capabilities, listed in ``capabilities`` so evaluation can tell what applies:
  ``logits`` (a classifier head), ``sample``, ``complete``, ``nll`` (bits/dim), ``score``
  (``grad_log_density(x)``: d log p(x) / dx, the score function, for the score-norm OOD test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import GenrepError

CAPABILITIES = ("logits", "sample", "complete", "nll", "score")
# the function each capability promises
CAPABILITY_API = {"logits": "logits", "sample": "sample", "complete": "complete", "nll": "nll",
                  "score": "grad_log_density"}


@dataclass(frozen=True)
class DataSpec:
    """What a method must know about its data to build itself."""
    image_size: int
    channels: int
    num_classes: int


@dataclass
class ViTConfig:
    """The backbone keys every ViT-based method shares (defaults: the HybViT paper's CIFAR ViT)."""
    dim: int = 384
    depth: int = 9
    num_heads: int = 12
    mlp_ratio: float = 2.0
    patch_size: int = 4              # 4 on 32x32, 8 on larger images (the HybViT paper)
    pos_embed: str = "learned"       # learned | sincos
    drop: float = 0.0


def check_vit_shape(cfg: ViTConfig, data: DataSpec) -> None:
    """What every ViT-based method's config must satisfy: patches tile the image, heads split the width."""
    if data.image_size % cfg.patch_size:
        raise GenrepError(f"model.patch_size {cfg.patch_size} does not divide the image size "
                          f"{data.image_size}; choose a divisor of {data.image_size}")
    if cfg.dim % cfg.num_heads:
        raise GenrepError(f"model.dim {cfg.dim} is not divisible by model.num_heads {cfg.num_heads}")


class Method(nn.Module):
    name: ClassVar[str]
    config_class: ClassVar[type]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    needs_labels: ClassVar[bool] = False
    feature_pools: ClassVar[tuple[str, ...]] = ("mean",)
    view_streams: ClassVar[dict[str, int]] = {}  # view -> independent mini-batch it comes from (default 0)
    # model config keys that change how features are read, not the weights: `genrep probe` may override them
    feature_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, data: DataSpec):
        super().__init__()
        self.cfg = cfg
        self.data = data

    # ---- what the data pipeline must deliver
    def views(self) -> dict[str, str]:
        """View name -> augmentation kind (none | weak | strong)."""
        raise NotImplementedError

    @property
    def num_streams(self) -> int:
        return max(self.view_streams.values(), default=0) + 1

    @property
    def passes_per_image(self) -> int:
        """Forward passes a training image of the batch costs (one per view); throughput counts these."""
        return len(self.views())

    def random_inputs(self) -> dict[str, tuple[str, object]]:
        """Per-sample randomness the loop draws with the batch (see ``data.batches.draw_random_inputs``):
        name -> ("normal", view) or ("steps", T). It then arrives in ``batch[name]``, so a run does not
        depend on how the global batch is split across processes or accumulation steps, and the
        compiled objective holds no random op."""
        return {}

    # ---- training
    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the loop calls the module itself so that DDP and torch.compile wrap the whole objective
        return self.loss(batch)

    # ---- representation
    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    default_layer: int | None = None
    default_pool: str = "mean"

    def features(self, x: torch.Tensor, layer: int | None = None, pool: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def check_feature_args(self, layer: int | None, pool: str | None) -> tuple[int, str]:
        layer = (self.default_layer or self.num_layers) if layer is None else layer
        pool = pool or self.default_pool
        if not 1 <= layer <= self.num_layers:
            raise GenrepError(f"layer {layer} does not exist in {self.name}; choose 1..{self.num_layers}")
        if pool not in self.feature_pools:
            raise GenrepError(f"pooling '{pool}' is not offered by {self.name}; "
                              f"choose one of {', '.join(self.feature_pools)}")
        return layer, pool

    def grad_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """d log p(x) / dx for images in [0, 1] (the ``score`` capability). Models with an explicit
        log-likelihood get it by autograd; diffusion models read it off their denoiser."""
        raise NotImplementedError

    # ---- optimisation hints
    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay besides norms and biases (embeddings, tokens)."""
        return set()

    def flops_per_image(self) -> int:
        """Analytic forward model-FLOPs for one training image (all the views one image contributes)."""
        raise NotImplementedError

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> [-1, 1], inside the model so wrapped models (PGD, OOD) take raw pixels."""
        return x * 2.0 - 1.0
