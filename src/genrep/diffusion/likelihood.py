"""The variational bound of a diffusion model in bits per dimension (Ho et al. 2020, Nichol & Dhariwal 2021).

-log p(x0) <= L_prior + sum_{t=1}^{T-1} L_t + L_0 with (0-based step indices)
- L_prior = KL(q(x_{T-1} | x0) || N(0, I)), which the model does not influence;
- L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) at x_t ~ q(x_t | x0);
- L_0 = -log p(x0 | x at index 0) under a Gaussian discretised to the 256 levels of 8-bit data.
Every term is evaluated in float64: the KL of two nearly equal Gaussians is a small difference of large numbers.
"""

from __future__ import annotations

import math

import torch
from torch.special import log_ndtr

from ..errors import GenrepError
from .process import GaussianDiffusion
from .sampling import Denoiser, draw_noise, progress_bar

# half the width of one 8-bit level once data is mapped to [-1, 1]
_BIN_HALF_WIDTH = 1 / 255
# data at or beyond these lies in the first or last level, whose bins extend to -inf / +inf
_EDGE = 0.999


def normal_kl(mean1: torch.Tensor | float, logvar1: torch.Tensor | float, mean2: torch.Tensor | float,
              logvar2: torch.Tensor | float) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats; arguments broadcast."""
    ref = next(v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor))
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v, dtype=ref.dtype, device=ref.device)
                                      for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def _log_normal_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, without cancellation in either tail."""
    # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): mirror intervals centred above 0 so the difference is always taken
    # on the side where both CDF values are small and log_ndtr keeps full relative precision
    mirror = lower + upper > 0
    lo = torch.where(mirror, -upper, lower)
    hi = torch.where(mirror, -lower, upper)
    log_hi = log_ndtr(hi)
    # log(Phi(hi) - Phi(lo)) = log Phi(hi) + log(1 - Phi(lo) / Phi(hi))
    return log_hi + torch.log(-torch.expm1(log_ndtr(lo) - log_hi))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
                                        ) -> torch.Tensor:
    """Elementwise log-likelihood in nats (float64) of 8-bit data ``x`` in [-1, 1] under N(mean, exp(log_scale)^2)
    discretised to the 256 levels (bins of half-width 1/255), the edge bins extended to -inf and +inf."""
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + _BIN_HALF_WIDTH)
    lower = inv_std * (x - mean - _BIN_HALF_WIDTH)
    first_bin = log_ndtr(upper)  # all the mass below the bin's top
    last_bin = log_ndtr(-lower)  # all the mass above the bin's bottom
    inner_bin = _log_normal_mass(lower, upper)
    return torch.where(x < -_EDGE, first_bin, torch.where(x > _EDGE, last_bin, inner_bin))


def _strata(T: int, num_terms: int) -> list[tuple[int, int]]:
    """(first index, size) of ``num_terms`` contiguous strata covering the KL indices 1..T-1."""
    edges = torch.floor(torch.linspace(0, T - 1, num_terms + 1, dtype=torch.float64) + 0.5).long().tolist()
    return [(1 + lo, hi - lo) for lo, hi in zip(edges[:-1], edges[1:])]


@torch.no_grad()
def bits_per_dim(denoise: Denoiser, diffusion: GaussianDiffusion, x0: torch.Tensor, *, num_terms: int | None = None,
                 generator: torch.Generator | None = None, clip: bool = True, progress: bool = False
                 ) -> dict[str, torch.Tensor]:
    """Per-sample [B] float64 bound in bits/dim: ``bpd`` = ``prior_bpd`` + ``kl_bpd`` + ``decoder_bpd``.

    ``x0``: 8-bit data in [-1, 1]. ``num_terms`` None (or T - 1) evaluates every KL term; fewer gives an
    unbiased stratified estimate: 1..T-1 split into ``num_terms`` contiguous strata, one index drawn uniformly
    per stratum and sample, weighted by the stratum size. Noise and indices come from ``generator`` (CPU;
    None = torch's global RNG), drawn on the CPU so the estimate does not depend on the device.
    """
    T = diffusion.T
    num_terms = T - 1 if num_terms is None else num_terms
    if not 1 <= num_terms <= T - 1:
        raise GenrepError(f"bits/dim num_terms must be in 1..{T - 1} (there are T - 1 KL terms), got {num_terms}")
    if x0.numel() and (x0.min() < -1 - 1e-5 or x0.max() > 1 + 1e-5):
        raise GenrepError(f"bits/dim needs data in [-1, 1], got values in [{x0.min():.3g}, {x0.max():.3g}]; "
                          "map 8-bit images x in [0, 1] to 2 x - 1")
    n, device = x0.shape[0], x0.device
    x0_64 = x0.double()
    nats_to_bits = 1 / (x0[0].numel() * math.log(2))

    def per_sample_bits(nats: torch.Tensor) -> torch.Tensor:
        return nats.flatten(1).sum(1) * nats_to_bits

    def reverse_step(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t ~ q(x_t | x0) and the model's p(x_{t-1} | x_t) (mean, log-variance) in float64."""
        x_t = diffusion.q_sample(x0, t, draw_noise(x0.shape, generator, device, x0.dtype))
        out = denoise(x_t, t)
        mean, _, log_var, _ = diffusion.p_mean_variance(out.double(), x_t.double(), t, clip)
        return x_t.double(), mean, log_var

    prior_mean, _, prior_log_var = diffusion.q_mean_variance(x0_64, torch.full((n,), T - 1, device=device))
    prior = per_sample_bits(normal_kl(prior_mean, prior_log_var, 0.0, 0.0))

    kl = torch.zeros(n, dtype=torch.float64, device=device)
    strata = _strata(T, num_terms)
    for first, size in progress_bar(strata, len(strata), progress, "bits/dim"):
        offset = torch.randint(0, size, (n,), generator=generator) if size > 1 else torch.zeros(n, dtype=torch.long)
        t = (first + offset).to(device)
        x_t, p_mean, p_log_var = reverse_step(t)
        q_mean, _, q_log_var = diffusion.q_posterior(x0_64, x_t, t)
        kl += size * per_sample_bits(normal_kl(q_mean, q_log_var, p_mean, p_log_var))

    _, p_mean, p_log_var = reverse_step(torch.zeros(n, dtype=torch.long, device=device))
    decoder = -per_sample_bits(discretized_gaussian_log_likelihood(x0_64, p_mean, 0.5 * p_log_var))
    return {"bpd": prior + kl + decoder, "prior_bpd": prior, "decoder_bpd": decoder, "kl_bpd": kl}
