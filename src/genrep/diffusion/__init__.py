"""Model-independent Gaussian diffusion: schedules, the forward/reverse process, samplers and the likelihood bound.

A model is any callable ``denoise(x_t, t) -> output`` with x_t [B, ...] and t a long [B] tensor of 0-based step
indices; the output is read as eps or x0 per ``GaussianDiffusion.prediction``. Data lives in [-1, 1].
"""

from .likelihood import bits_per_dim, discretized_gaussian_log_likelihood, normal_kl
from .process import LOSSES, PREDICTIONS, VARIANCES, GaussianDiffusion
from .sampling import SAMPLERS, Denoiser, ddim_sample, ddpm_sample, draw_noise, sample
from .schedules import SCHEDULES, beta_schedule, noise_at_gamma, sample_gamma

__all__ = ["LOSSES", "PREDICTIONS", "SAMPLERS", "SCHEDULES", "VARIANCES", "Denoiser", "GaussianDiffusion",
           "beta_schedule", "bits_per_dim", "ddim_sample", "ddpm_sample", "discretized_gaussian_log_likelihood",
           "draw_noise", "noise_at_gamma", "normal_kl", "sample", "sample_gamma"]
