"""Noise schedules: discrete beta schedules for DDPM-style models, continuous Beta-distributed levels for DARL.

Discrete schedules are float64 on the CPU; the diffusion process derives its coefficient tables from them
in float64 and casts only at the point of use, because 1 - alphas_cumprod loses most of its digits in float32
near t = 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import GenrepError

SCHEDULES = ("linear", "cosine")

# Nichol & Dhariwal (2021): the offset keeps beta_0 from being vanishingly small, the clip keeps the last
# steps from reaching beta = 1 (where alphas_cumprod hits exactly zero).
_COSINE_OFFSET = 0.008
_COSINE_MAX_BETA = 0.999


def beta_schedule(kind: str, T: int) -> torch.Tensor:
    """float64 [T] betas; ``linear`` is DDPM's, rescaled by 1000 / T so that any T noises as much as T = 1000."""
    if kind not in SCHEDULES:
        raise GenrepError(f"unknown noise schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise GenrepError(f"a noise schedule needs a whole number of steps T >= 1, got T = {T!r}")
    if kind == "linear":
        scale = 1000 / T
        if 0.02 * scale >= 1:
            # beta_T = 20 / T: with T <= 20 the last steps would destroy all signal at once (alphas_cumprod = 0)
            raise GenrepError(f"the linear schedule needs T >= 21 (its last beta is 20 / T), got T = {T}; "
                              "choose a larger T or the cosine schedule")
        return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)
    return _cosine_betas(T)


def _cosine_betas(T: int) -> torch.Tensor:
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=_COSINE_MAX_BETA)


def sample_gamma(n: int, a: float, b: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [n] signal levels gamma ~ Beta(a, b), for ``x = sqrt(gamma) x0 + sqrt(1 - gamma) eps``.

    Reproducible from ``generator`` (a CPU torch.Generator; None = torch's global CPU RNG), and the same on
    every device because the draw happens on the CPU.
    """
    if not (a > 0 and b > 0):  # also rejects NaN
        raise GenrepError(f"noise levels ~ Beta(a, b) need a > 0 and b > 0, got a = {a}, b = {b}; "
                          "choose positive values (a = b = 1 is uniform)")
    # torch's Gamma/Beta samplers take no generator, so one 63-bit draw from the generator seeds NumPy's
    # exact Beta sampler: the stream stays owned by the caller's generator.
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    draws = np.random.default_rng(seed).beta(a, b, size=n)
    return torch.from_numpy(draws).float().to(device)


def noise_at_gamma(x0: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``sqrt(gamma) x0 + sqrt(1 - gamma) noise`` with one gamma per sample (broadcast over non-batch dims)."""
    g = gamma.to(device=x0.device, dtype=torch.float64).view(-1, *([1] * (x0.dim() - 1)))
    return g.sqrt().to(x0.dtype) * x0 + (1 - g).sqrt().to(x0.dtype) * noise
