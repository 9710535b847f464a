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
from ..diffusion import LOSSES, PREDICTIONS, SAMPLERS, SCHEDULES, VARIANCES, GaussianDiffusion, bits_per_dim, sample
from ..errors import GenrepError
from ..fields import setting
from ..nn.denoiser import MODULATIONS, DenoiserViT
from ..nn.flops import linear_flops, transformer_block_flops
from .base import TINY_VIT, DataSpec, Method, ViTConfig, check_vit_shape
from .classification import (ClassifierTrainingConfig, classification_inputs, classification_loss, image_view,
                             mixing_inputs)
from .registry import register


@dataclass
class GenViTConfig(ViTConfig):
    # token: one scalar scale/shift per token (the paper's code) | channel
    time_modulation: str = setting("token", choices=MODULATIONS)
    timesteps: int = setting(1000, min=2, max=100000)  # T
    schedule: str = setting("cosine", choices=SCHEDULES)
    prediction: str = setting("eps", choices=PREDICTIONS)
    loss: str = setting("l1", choices=LOSSES)          # l1: the paper's code
    variance: str = setting("small", choices=VARIANCES)  # the fixed reverse variance: small (posterior) | large
    feature_t: int | None = setting(None, min=0)      # features of x noised to this step; None: the clean image
    feature_layer: int | None = setting(None, min=1)  # default probe layer; None: the method's default
    score_t: int = setting(10, min=0)  # the step whose denoiser gives the score d log p / dx (OOD score-norm)
    # how a trained model is read (may be changed on trained weights: genrep evaluate RUN --model.sample_steps 50)
    sampler: str = setting("ddim", choices=SAMPLERS)  # ddpm runs all T steps
    sample_steps: int = setting(100, min=1)           # DDIM steps (capped at T)
    eta: float = setting(0.0, min=0)                  # DDIM's eta: 0 deterministic, 1 DDPM-like
    # the network's precision while sampling: auto is bf16 autocast on CUDA, float32 elsewhere (the sampler's
    # own arithmetic is float32 either way); docs/benchmarks.md has what bf16 does to FID
    sample_precision: str = setting("auto", choices=("auto", "bf16", "fp32"))
    nll_terms: int = setting(0, min=0)  # terms of the bits/dim bound: 0 all T, k a stratified subset (capped at T)

    def validate(self, section: str) -> None:
        super().validate(section)
        for key in ("feature_t", "score_t"):
            step = getattr(self, key)
            if step is not None and step >= self.timesteps:
                raise GenrepError(f"{section}.{key} {step} is not a diffusion step; choose 0..{self.timesteps - 1} "
                                  f"({section}.timesteps {self.timesteps})")
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
class GenViT(Method):
    name = "genvit"
    config_class = GenViTConfig
    capabilities = frozenset({"sample", "nll", "score"})
    feature_pools = ("cls", "mean")
    default_pool = "mean"
    feature_options = ("feature_t",)
    capability_options: ClassVar[dict[str, tuple[str, ...]]] = {"sample": ("sampler", "sample_steps", "eta",
                                                                            "sample_precision"),
                                                                 "nll": ("nll_terms",)}
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

    def views(self) -> dict[str, str]:
        return {"diffusion": "none"}

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network on [-1, 1] inputs: what the samplers and the bound call."""
        return self.net.denoise(x_t, t)

    def random_inputs(self) -> dict[str, tuple[str, object]]:
        return {"t": ("steps", self.diffusion.T), "noise": ("normal", "diffusion")}

    def noised(self, images: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, t, noise, x_t) for a training step: t uniform in [0, T), x_t ~ q(x_t | x0). The loop passes
        t and noise in (``random_inputs``); called without them, they come from the global RNG."""
        x0 = self.normalize(images)
        t = self.diffusion.sample_t(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        return x0, t, noise, self.diffusion.q_sample_train(x0, t, noise)

    def diffusion_loss(self, images: torch.Tensor, t: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
        x0, t, noise, x_t = self.noised(images, t, noise)
        return self.diffusion.loss(self.denoise(x_t, t).float(), x0, noise).mean()

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        diff = self.diffusion_loss(batch["diffusion"], batch.get("t"), batch.get("noise"))
        return {"loss": diff, "diff": diff.detach()}

    # ---- representation
    def _feature_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x0 = self.normalize(x)
        t = self.cfg.feature_t
        if t is None:
            return x0, self._clean_t(x0)
        # fixed noise per call so that probes are repeatable (the diffusion-features protocol redraws it)
        g = torch.Generator().manual_seed(t)
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        steps = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        return self.diffusion.q_sample(x0, steps, noise), steps

    def _clean_t(self, x0: torch.Tensor) -> torch.Tensor | None:
        return torch.zeros(x0.shape[0], device=x0.device, dtype=torch.long)

    def features(self, x: torch.Tensor, layer: int | None = None, pool: str | None = None) -> torch.Tensor:
        layer, pool = self.check_feature_args(layer, pool)
        x_in, t = self._feature_input(x)
        return self.net.pool(self.net(x_in, layer=layer, t=t), pool)

    # ---- generation and likelihood
    @property
    def _nll_terms(self) -> int:
        """0 (all terms) when asked for all of them or more."""
        return 0 if self.cfg.nll_terms >= self.diffusion.T else self.cfg.nll_terms

    @property
    def _sample_steps(self) -> int:
        return self.diffusion.T if self.cfg.sampler == "ddpm" else min(self.cfg.sample_steps, self.diffusion.T)

    def capability_settings(self, capability: str) -> dict:
        if capability == "sample":
            out = {"sampler": self.cfg.sampler, "steps": self._sample_steps}
            if self.cfg.sampler == "ddim":
                out["eta"] = self.cfg.eta
            return {**out, "precision": "bf16" if self._sample_bf16 else "fp32"}
        if capability == "nll":
            return {"terms": self._nll_terms or "all", "of": self.diffusion.T}
        return super().capability_settings(capability)

    @property
    def _sample_bf16(self) -> bool:
        p = self.cfg.sample_precision
        return p == "bf16" or (p == "auto" and next(self.parameters()).device.type == "cuda")

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """``n`` images in [0, 1], [n, C, H, W], on the model's device, with ``model.sampler``,
        ``model.sample_steps``, ``model.eta`` and ``model.sample_precision`` (bf16 autocast of the network; the
        sampler's own arithmetic stays float32, the network output cast back before each update)."""
        d, c = self.data, self.cfg
        device = next(self.parameters()).device
        bf16 = self._sample_bf16
        steps = None if c.sampler == "ddpm" else self._sample_steps
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = sample(self.denoise, self.diffusion, (n, d.channels, d.image_size, d.image_size), sampler=c.sampler,
                       steps=steps, eta=c.eta, generator=generator, device=device, progress=progress)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def grad_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """The diffusion model's score at the small step ``score_t``: d log p_t(y) / dy = -eps(y, t) / sigma_t
        (denoising score matching), evaluated at the clean image y = 2x - 1 and times 2 for d/dx. A small t
        keeps p_t close to the data density while the denoiser still sees inputs like its training ones."""
        y = self.normalize(x)
        t = torch.full((y.shape[0],), self.cfg.score_t, device=y.device, dtype=torch.long)
        out = self.denoise(y, t).float()
        eps = out if self.diffusion.prediction == "eps" else self.diffusion.eps_from_x0(y, t, out)
        return -2.0 * eps / self.diffusion.train_sqrt_1m_ab[t].view(-1, *([1] * (y.ndim - 1)))

    @torch.no_grad()
    def nll(self, x: torch.Tensor, *, generator: torch.Generator | None = None, progress: bool = False
            ) -> torch.Tensor:
        """Variational bound on -log p(x) in bits/dim, [B] (x: 8-bit images in [0, 1]), from all T terms or
        ``model.nll_terms`` of them."""
        x0 = self.normalize((x * 255).round() / 255)
        out = bits_per_dim(self.denoise, self.diffusion, x0, num_terms=self._nll_terms or None,
                           generator=generator, progress=progress)
        return out["bpd"]

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

    def _clean_t(self, x0: torch.Tensor) -> torch.Tensor | None:
        return None  # the classification pass: no time input

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
