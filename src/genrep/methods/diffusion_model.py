"""What every DDPM-trained method shares: the diffusion keys of its config, the training loss, sampling, the bound,
the score, and reading features from a noised image (GenViT, HybViT and the ADM U-Net).

A subclass builds ``self.diffusion`` (the one ``GaussianDiffusion``) and implements ``denoise(x_t, t)`` on [-1, 1]
inputs; everything here drives that call, so the ViT and the U-Net are sampled, bounded and read the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..diffusion import LOSSES, PREDICTIONS, SAMPLERS, SCHEDULES, VARIANCES, bits_per_dim, sample
from ..diffusion.fixed_noise import fixed_noise
from ..errors import GenrepError
from ..fields import setting
from .base import Method

FEATURE_NOISES = ("fixed", "fresh")
# the seeds of fresh_noise's draws start here, above every model.feature_noise_seed, so a training draw never
# repeats a read-out's own noise
DRAW_SEEDS = 2**31


@dataclass
class DiffusionConfig:
    timesteps: int = setting(1000, min=2, max=100000)  # T
    schedule: str = setting("cosine", choices=SCHEDULES)
    prediction: str = setting("eps", choices=PREDICTIONS)
    loss: str = setting("l1", choices=LOSSES)          # l1: the GenViT paper's code; l2: DDPM's and ADM's L_simple
    variance: str = setting("small", choices=VARIANCES)  # the fixed reverse variance: small (posterior) | large
    feature_t: int | None = setting(None, min=0)      # features of x noised to this step; None: the clean image
    # the noise of a noised read-out: fixed is a function of (image, seed, t), so features are deterministic and a
    # cache entry equals a fresh extraction; fresh is a new draw every pass (the diffusion-features paper's code;
    # a cached entry then holds one draw)
    feature_noise: str = setting("fixed", choices=FEATURE_NOISES)
    feature_noise_seed: int = setting(0, min=0, max=2**31 - 1)
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
        for key in ("feature_t", "score_t"):
            step = getattr(self, key)
            if step is not None and step >= self.timesteps:
                raise GenrepError(f"{section}.{key} {step} is not a diffusion step; choose 0..{self.timesteps - 1} "
                                  f"({section}.timesteps {self.timesteps})")


class DiffusionMethod(Method):
    """A method whose network is a DDPM denoiser: ``self.diffusion`` and ``denoise`` come from the subclass."""
    capabilities = frozenset({"sample", "nll", "score"})
    feature_options = ("feature_t", "feature_noise", "feature_noise_seed")
    capability_options: ClassVar[dict[str, tuple[str, ...]]] = {"sample": ("sampler", "sample_steps", "eta",
                                                                            "sample_precision"),
                                                                 "nll": ("nll_terms",)}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network on [-1, 1] inputs: what the samplers and the bound call."""
        raise NotImplementedError

    def views(self) -> dict[str, str]:
        return {"diffusion": "none"}

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
    _noise_draw: int | None = None  # set inside fresh_noise()

    @contextmanager
    def fresh_noise(self, draw: int) -> Iterator[None]:
        """Read-outs in the block noise every image with draw ``draw`` (a head's training epoch) of a sequence
        apart from the read-out's own noise: a function of (image, feature_noise_seed, draw, t), so a rerun
        repeats it, drawn on the device in any batch; ``feature_noise`` applies again after the block."""
        if isinstance(draw, bool) or not isinstance(draw, int) or draw < 0:
            raise GenrepError(f"a noise draw is a number >= 0, got {draw!r}")
        self._noise_draw = draw
        try:
            yield
        finally:
            self._noise_draw = None

    def feature_input(self, x: torch.Tensor, clean_t: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(network input in [-1, 1], its steps) of a read-out: x noised to ``feature_t`` with ``feature_noise``
        (or the draw of :meth:`fresh_noise`), or the clean image at step 0 (None when ``clean_t`` is False:
        HybViT's untimed classification pass)."""
        x0 = self.normalize(x)
        t = self.cfg.feature_t
        if t is None:
            return x0, (torch.zeros(x0.shape[0], device=x0.device, dtype=torch.long) if clean_t else None)
        if self._noise_draw is not None:
            seed = DRAW_SEEDS + (self.cfg.feature_noise_seed * 1_000_003 + self._noise_draw) % DRAW_SEEDS
            noise = fixed_noise(x, seed, t).to(x0.dtype)
        elif self.cfg.feature_noise == "fixed":
            noise = fixed_noise(x, self.cfg.feature_noise_seed, t).to(x0.dtype)
        else:
            noise = torch.randn_like(x0)
        steps = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        return self.diffusion.q_sample(x0, steps, noise), steps

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
    def _device(self) -> torch.device:
        return next(iter(self.parameters()), self.diffusion.train_sqrt_ab).device

    @property
    def _sample_bf16(self) -> bool:
        p = self.cfg.sample_precision
        return p == "bf16" or (p == "auto" and self._device.type == "cuda")

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """``n`` images in [0, 1], [n, C, H, W], on the model's device, with ``model.sampler``,
        ``model.sample_steps``, ``model.eta`` and ``model.sample_precision`` (bf16 autocast of the network; the
        sampler's own arithmetic stays float32, the network output cast back before each update)."""
        d, c = self.data, self.cfg
        device = self._device
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
        out = self.diffusion.prediction_part(self.denoise(y, t).float(), y)
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
