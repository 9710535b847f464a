"""Samplers for a denoiser ``denoise(x_t, t) -> output`` (t: long [B] step indices; output read per prediction).

All noise is drawn on the CPU from the caller's generator (None = torch's global CPU RNG), in float32, then
moved: the same seed gives the same samples on every device and in every dtype, up to arithmetic rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from ..errors import GenrepError
from .process import GaussianDiffusion

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim")
_Item = TypeVar("_Item")


def draw_noise(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str,
               dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (device-independent stream), then moved to ``device``."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def progress_bar(items: Iterable[_Item], total: int, progress: bool, desc: str) -> Iterable[_Item]:
    # disable=None hides the bar when stderr is not a terminal (logs, CI)
    return tqdm(items, total=total, desc=desc, disable=None if progress else True, leave=False)


@torch.no_grad()
def ddpm_sample(denoise: Denoiser, diffusion: GaussianDiffusion, shape: Sequence[int], *,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, clip: bool = True, progress: bool = False,
                desc: str = "sampling") -> torch.Tensor:
    """Ancestral sampling through all T steps with the process's variance (fixed, or the network's learned range);
    no noise is added at t = 0."""
    x = draw_noise(shape, generator, device, dtype)
    for i in progress_bar(range(diffusion.T - 1, -1, -1), diffusion.T, progress, desc):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=device)
        mean, _, log_var, _ = diffusion.p_mean_variance(denoise(x, t).to(dtype), x, t, clip)
        x = mean
        if i > 0:
            x = x + (0.5 * log_var).exp() * draw_noise(shape, generator, device, dtype)
    return x


@torch.no_grad()
def ddim_sample(denoise: Denoiser, diffusion: GaussianDiffusion, shape: Sequence[int], *, steps: int,
                eta: float = 0.0, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, clip: bool = True, progress: bool = False,
                desc: str = "sampling") -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on ``diffusion.timesteps(steps)``.

    eta = 0 is the deterministic sampler; eta = 1 with all T steps is DDPM ancestral sampling with the
    "small" variance (the same update, written differently).
    """
    if not eta >= 0:  # also rejects NaN
        raise GenrepError(f"DDIM eta must be >= 0 (0 = deterministic, 1 = DDPM-like noise), got {eta}")
    indices = diffusion.timesteps(steps).tolist()
    ab = diffusion.alphas_cumprod.tolist()  # float64 scalars: the whole batch shares each step
    x = draw_noise(shape, generator, device, dtype)
    for k in progress_bar(range(len(indices)), len(indices), progress, desc):
        i = indices[k]
        ab_t = ab[i]
        ab_prev = ab[indices[k + 1]] if k + 1 < len(indices) else 1.0  # the last step lands on clean data
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=device)
        x0, eps = diffusion.split_output(denoise(x, t).to(dtype), x, t, clip)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        # eta > 1 can ask for more fresh noise than the step has room for: the eps direction then drops out
        x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * draw_noise(shape, generator, device, dtype)
    return x


def sample(denoise: Denoiser, diffusion: GaussianDiffusion, shape: Sequence[int], *, sampler: str = "ddim",
           steps: int | None = None, eta: float = 0.0, **kw) -> torch.Tensor:
    """Dispatch on ``sampler`` (ddpm | ddim); ``steps`` None means all T; ``eta`` is used by ddim only."""
    if sampler == "ddpm":
        if steps is not None and steps != diffusion.T:
            raise GenrepError(f"DDPM runs all T = {diffusion.T} steps, got steps = {steps}; "
                              "use the ddim sampler for fewer steps")
        return ddpm_sample(denoise, diffusion, shape, **kw)
    if sampler == "ddim":
        return ddim_sample(denoise, diffusion, shape, steps=diffusion.T if steps is None else steps, eta=eta, **kw)
    raise GenrepError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
