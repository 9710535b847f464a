"""The classification heads of the diffusion-features paper (appendix A) as the probes and the sweep train them:
their settings (a nested ``head`` section), the schedule each head trains with, and the glue from the run's
features to ``metrics.heads``: cached features (:func:`fit_head`), or features read again every epoch with a new
noise draw and augmentation (:func:`train_head_at`, through ``head_online``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...errors import GenrepError
from ...fields import setting
from ...methods.base import MAP_POOL
from ..metrics.heads import MAP_HEADS, MAX_TOKENS_SIDE, OPTIMIZERS, HeadSpec, train_head
from .context import methods_where, reads_noised

HEAD_PRESETS = ("custom", "diffssl")
HEAD_NOISES = ("fixed", "fresh")
HEAD_AUGMENTS = ("none", "flip", "crop_flip")
CUSTOM = {"preset": "custom"}

# The authors' code (soumik-kanad/diffssl: finetune.py's train(), scripts/linear.sh, scripts/attention.sh):
# SGD(lr) with no momentum or weight decay, StepLR(7, 0.1) stepped per epoch, 28 epochs, batch 32 on each of 4
# processes (128 in all); lr 1e-2 for its linear head (also its MLP: the same Head class) and 5e-2 for the
# attention head. It has no CNN head, which takes the linear head's rate here.
DIFFSSL = {"optimizer": "sgd", "momentum": 0.0, "step_every": 7, "gamma": 0.1, "batch_size": 128,
           "weight_decay": 0.0}
DIFFSSL_LR = {"linear": 1e-2, "mlp": 1e-2, "cnn": 1e-2, "attention": 5e-2}


@dataclass
class HeadSettings:
    """How the heads train. The paper (section 4, appendix A): VISSL's linear protocol, Adam, 28 epochs, the rate
    x0.1 every 8, centre crop and flips, no batch norm; it names no learning rate or batch size."""
    epochs: int = setting(28, min=1, max=10000)
    # custom: the schedule keys below; diffssl: the authors' code's schedule (DIFFSSL above), which they then
    # must leave at their defaults
    preset: str = setting("custom", choices=HEAD_PRESETS)
    optimizer: str = setting("adam", choices=OPTIMIZERS, only_if=CUSTOM)
    lr: float = setting(1e-3, above=0, only_if=CUSTOM)  # genrep's: the paper gives no rate
    momentum: float = setting(0.0, min=0, below=1, only_if={**CUSTOM, "optimizer": "sgd"})
    step_every: int = setting(8, min=1, only_if=CUSTOM)
    gamma: float = setting(0.1, above=0, max=1, only_if=CUSTOM)
    batch_size: int = setting(256, min=1, only_if=CUSTOM)  # genrep's: the paper gives no batch size
    weight_decay: float = setting(0.0, min=0, only_if=CUSTOM)
    # inputs standardised with train statistics (per channel for the map heads, over the map each reads: the attention
    # head's pooled to at most 8x8): genrep's habit; the paper uses "no batch norm" (false)
    standardize: bool = True
    # the training read-out's noise: fixed reads the read-out's own (model.feature_noise) every epoch, from the
    # feature cache unless an augmentation is drawn; fresh draws new noise every epoch (the authors' code draws at
    # every forward), extracting the features again each epoch. A clean read-out (model.feature_t null) has none.
    noise: str = setting("fixed", choices=HEAD_NOISES)
    # the training images' augmentation, drawn anew each epoch (features extracted again each epoch): flip (a
    # horizontal flip with probability 1/2: the paper's), crop_flip (random resized crop and flip: table 6, figure 7)
    augment: str = setting("none", choices=HEAD_AUGMENTS)
    crop_scale: float = setting(0.08, above=0, max=1, only_if={"augment": "crop_flip"})  # the crop's least area
    mlp_hidden: list[int] = setting([2048], min=1, nonempty=True)    # MLP-4k-2k: one hidden layer of 2048
    cnn_channels: list[int] = setting([256, 256], min=1)            # CNN-1k-256-256: two convolutions' outputs
    cnn_relu: bool = True  # a ReLU after each convolution: genrep's choice, the paper names no activation
    attention_blocks: int = setting(1, min=1, max=64)              # Attention-1K-1

    def validate(self, section: str) -> None:
        if len(self.cnn_channels) != 2:
            raise GenrepError(f"{section}.cnn_channels needs the output channels of the two convolutions (e.g. "
                              f"256,256), got {len(self.cnn_channels)} values")
        if self.preset != "custom":
            set_ = [f.name for f in dataclasses.fields(self) if f.metadata.get("only_if", {}).get("preset") == ("custom",)
                    and getattr(self, f.name) != f.default]
            if set_:
                keys = ", ".join(f"{section}.{k}" for k in set_)
                raise GenrepError(f"{section}.preset {self.preset} fixes the schedule (SGD, lr 1e-2 and 5e-2 for the "
                                  f"attention head, x0.1 every 7 epochs, batch 128), so {keys} would be ignored; "
                                  f"set {section}.preset custom to choose them")

    def spec(self, kind: str) -> HeadSpec:
        return HeadSpec(kind=kind, hidden=tuple(self.mlp_hidden), channels=tuple(self.cnn_channels),
                        blocks=self.attention_blocks, relu=self.cnn_relu)

    def schedule(self, kind: str) -> dict:
        """What head ``kind`` trains with: the keys, or the preset's values."""
        if self.preset == "diffssl":
            return {"epochs": self.epochs, "lr": DIFFSSL_LR[kind], **DIFFSSL}
        return {k: getattr(self, k) for k in ("epochs", "optimizer", "lr", "momentum", "step_every", "gamma",
                                              "batch_size", "weight_decay")}


# The map heads' read-outs: the CNN head convolves the whole map; the attention head pools it to at most 8x8 before
# anything else, so its cache holds the pooled map (a quarter of a 16x16 one: ImageNet's ADM maps), which the head's
# own pool then leaves as it is. Its inputs are standardised with the pooled map's statistics.
MAP_READS = {"cnn": MAP_POOL, "attention": f"{MAP_POOL}{MAX_TOKENS_SIDE}"}


def head_pool(kind: str, pool: str) -> str:
    """The read-out a head trains on: a map head's map (``MAP_READS``), the others the pooled vector."""
    return MAP_READS.get(kind, pool)


def check_head_features(method, kind: str, what: str) -> None:
    """A map head on a method whose features are vectors: one line before any work."""
    if kind in MAP_HEADS and not method.feature_maps:
        maps = ", ".join(methods_where(lambda cls: cls.feature_maps))
        raise GenrepError(f"{what}: the {kind} head needs feature maps, and {method.name}'s features are vectors; "
                          f"use the linear or mlp head, or a method with maps ({maps})")


def readout_noise(method) -> str:
    """The noise of the method's read-out: none (a clean image), fixed (a function of the image) or fresh."""
    if not reads_noised(method) or method.cfg.feature_t is None:
        return "none"
    return method.cfg.feature_noise


def draws_per_epoch(method, s: HeadSettings) -> bool:
    """Whether training reads new features every epoch: an augmentation, or fresh noise on a noised read-out."""
    return s.augment != "none" or (s.noise == "fresh" and readout_noise(method) != "none")


def fit_head(ctx, kind: str, s: HeadSettings, xtr: torch.Tensor, xte: torch.Tensor) -> dict:
    """Train head ``kind`` on cached train features, score it on the test features; JSON-ready."""
    if draws_per_epoch(ctx.method, s):
        raise GenrepError(f"head.noise {s.noise} and head.augment {s.augment} read new features every epoch, and "
                          f"this caller trains on cached ones; set head.noise fixed and head.augment none")
    r = train_head(s.spec(kind), xtr, ctx.train.labels, xte, ctx.test.labels, ctx.train.num_classes,
                   **s.schedule(kind), standardize=s.standardize, seed=ctx.ev.seed, device=ctx.device,
                   bf16=ctx.bf16)
    return r.to_dict()


def train_head_at(ctx, kind: str, s: HeadSettings, layer: int, pool: str) -> dict:
    """Train head ``kind`` at the read-out (``layer``, ``pool``; a map head reads the layer's map) and record how:
    from the cache when nothing is drawn per epoch, else on features extracted every epoch; JSON-ready."""
    from .head_online import fit_head_streamed

    hp = head_pool(kind, pool)
    noise = readout_noise(ctx.method)
    cached_noise = "one cached draw" if noise == "fresh" else noise
    if draws_per_epoch(ctx.method, s):
        fresh = s.noise == "fresh" and noise != "none"
        r = fit_head_streamed(ctx, kind, s, layer, hp, fresh=fresh)
        how = {"features": "extracted every epoch", "train_noise": "fresh" if fresh else noise, "test_noise": noise}
    else:
        r = fit_head(ctx, kind, s, ctx.features("train", layer, hp), ctx.features("test", layer, hp))
        how = {"features": "cached", "train_noise": cached_noise, "test_noise": cached_noise}
    return {"pool": hp, **r, "preset": s.preset, "augment": s.augment,
            **({"crop_scale": s.crop_scale} if s.augment == "crop_flip" else {}), **how,
            "precision": ctx.precision}
