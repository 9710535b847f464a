"""The discrete Gaussian diffusion process: forward noising, posterior, model parametrisation and loss.

Conventions (guided-/improved-diffusion): step indices t are 0-based in [0, T); ``x_t`` at index t has signal
level ``alphas_cumprod[t]``, so index 0 is already one noising step away from the data. Data lives in [-1, 1].

The process knows nothing about models: a model output is a tensor interpreted per ``prediction``.
The coefficients are held once, here: float64 CPU tables for sampling and the likelihood (per-sample
coefficients are gathered in float64 and cast to the data's dtype only where they multiply data), and float32
copies of q(x_t | x0)'s two coefficients as non-persistent buffers for the training step, which follow the
module to its device and compile into the step's graph. A method holds its ``GaussianDiffusion`` as a
submodule; the buffers stay out of its state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GenrepError
from .schedules import beta_schedule

PREDICTIONS = ("eps", "x0")
LOSSES = ("l1", "l2")
VARIANCES = ("small", "large")
# and the network's own: guided-diffusion's learned range, an interpolation between the two by a second output of
# C channels v in [-1, 1] (Nichol & Dhariwal 2021, eq. 15); only for weights trained with it (pretrained ADM)
LEARNED_RANGE = "learned_range"


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise GenrepError(f"unknown diffusion {what} {value!r}; choose one of {', '.join(choices)}")


class GaussianDiffusion(nn.Module):
    """A fixed-variance DDPM with ``T`` steps.

    ``variance`` picks the reverse-process variance: ``small`` is the posterior variance beta_tilde,
    ``large`` is beta (Ho et al. 2020, both bounds of the true reverse variance); at t = 0 both use
    beta_tilde[1] since beta_tilde[0] = 0 and its log is undefined.
    """

    def __init__(self, T: int = 1000, schedule: str = "cosine", prediction: str = "eps", loss: str = "l1",
                 variance: str = "small"):
        super().__init__()
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_choice("loss", loss, LOSSES)
        _check_choice("variance", variance, VARIANCES + (LEARNED_RANGE,))
        betas = beta_schedule(schedule, T)
        if T < 2:
            # the reverse variance at t = 0 is borrowed from t = 1
            raise GenrepError(f"a diffusion process needs T >= 2 steps, got T = {T}")
        self.T, self.schedule, self.prediction, self.loss_kind, self.variance = T, schedule, prediction, loss, variance

        self.betas = betas
        alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.one_minus_alphas_cumprod = 1 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.sqrt()
        self.log_one_minus_alphas_cumprod = torch.log1p(-self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()

        # q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / self.one_minus_alphas_cumprod
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / self.one_minus_alphas_cumprod
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * alphas.sqrt() / self.one_minus_alphas_cumprod
        # posterior_variance[0] = 0 (x0 is known exactly), so its log borrows the value of t = 1
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = clipped.log()

        # the fixed variance of p(x_{t-1} | x_t)
        self.model_variance = clipped if variance != "large" else torch.cat([clipped[:1], betas[1:]])
        self.model_log_variance = self.model_variance.log()
        self.log_betas = betas.log()  # the learned range's upper end

        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.register_buffer("train_sqrt_ab", self.sqrt_alphas_cumprod.float(), persistent=False)
        self.register_buffer("train_sqrt_1m_ab", self.sqrt_one_minus_alphas_cumprod.float(), persistent=False)

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(T={self.T}, schedule={self.schedule!r}, prediction={self.prediction!r}, "
                f"loss={self.loss_kind!r}, variance={self.variance!r})")

    # ---- coefficient gathering
    _TABLES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "one_minus_alphas_cumprod",
               "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
               "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
               "posterior_mean_coef2", "model_variance", "model_log_variance", "log_betas")

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        # one copy per device, made on first use, so no step pays a host-to-device copy of a table
        if device not in self._device_tables:
            self._device_tables[device] = {name: getattr(self, name).to(device) for name in self._TABLES}
        return self._device_tables[device]

    def _coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as [B, 1, ...] in ``like``'s dtype and device, ready to multiply ``like``."""
        values = self._tables(like.device)[name][t.to(like.device)]
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    # ---- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x0) with the given standard normal ``noise``."""
        return (self._coef("sqrt_alphas_cumprod", t, x0) * x0
                + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x0); the last two are [B, 1, ...] and broadcast."""
        mean = self._coef("sqrt_alphas_cumprod", t, x0) * x0
        var = self._coef("one_minus_alphas_cumprod", t, x0)
        return mean, var, self._coef("log_one_minus_alphas_cumprod", t, x0)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (variance is [B, 1, ...])."""
        mean = self._coef("posterior_mean_coef1", t, x_t) * x0 + self._coef("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._coef("posterior_variance", t, x_t), self._coef("posterior_log_variance_clipped", t, x_t)

    # ---- model parametrisation
    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return ((self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self._coef("sqrt_recipm1_alphas_cumprod", t, x_t))

    @property
    def learned_variance(self) -> bool:
        return self.variance == LEARNED_RANGE

    def prediction_part(self, out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The eps (or x0) prediction of a model output: all of it, or its first C channels when the network
        also outputs the variance (guided-diffusion's layout: prediction, then v)."""
        return out[:, :x_t.shape[1]] if self.learned_variance else out

    def split_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from a model output; with ``clip`` x0_hat is clamped to the data range [-1, 1]
        and eps_hat recomputed from it, so that the two stay consistent with x_t."""
        out = self.prediction_part(out, x_t)
        x0 = self.x0_from_eps(x_t, t, out) if self.prediction == "eps" else out
        if clip:
            x0 = x0.clamp(-1, 1)
        elif self.prediction == "eps":
            return x0, out
        return x0, self.eps_from_x0(x_t, t, x0)

    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance, log-variance of p(x_{t-1} | x_t) and the x0 estimate behind the mean."""
        x0, _ = self.split_output(out, x_t, t, clip)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        if self.learned_variance:
            if out.shape[1] != 2 * x_t.shape[1]:
                raise GenrepError(f"a learned variance needs 2 x {x_t.shape[1]} output channels (prediction, then "
                                  f"v), got {out.shape[1]}")
            frac = (out[:, x_t.shape[1]:] + 1) / 2  # v in [-1, 1]: from the posterior variance to beta
            log_var = frac * self._coef("log_betas", t, x_t) + (1 - frac) * self._coef(
                "posterior_log_variance_clipped", t, x_t)
            return mean, log_var.exp(), log_var, x0
        return mean, self._coef("model_variance", t, x_t), self._coef("model_log_variance", t, x_t), x0

    # ---- training
    def sample_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """long [n] step indices uniform in [0, T).

        Without a generator the draw comes from the global RNG of ``device`` itself (no host copy, and it works
        inside torch.compile); with one, it is drawn on the generator's device and moved.
        """
        if generator is None:
            return torch.randint(0, self.T, (n,), device=device)
        return torch.randint(0, self.T, (n,), generator=generator, device=generator.device).to(device)

    def q_sample_train(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x0) for the training step, from the float32 buffers on the module's device: no table
        copy, no float64, one graph under torch.compile."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return self.train_sqrt_ab[t].view(shape) * x0 + self.train_sqrt_1m_ab[t].view(shape) * noise

    def loss(self, out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample [B] L1 or L2 error against the prediction target, averaged over the non-batch dims."""
        if self.learned_variance:
            raise GenrepError("training a learned variance needs guided-diffusion's hybrid loss (L_simple + "
                              "lambda L_vlb), which genrep does not implement; train with a fixed variance")
        target = noise if self.prediction == "eps" else x0
        # low-precision outputs (autocast) are compared in float32; float64 stays float64
        dtype = torch.promote_types(out.dtype, torch.float32)
        diff = out.to(dtype) - target.to(dtype)
        err = diff.abs() if self.loss_kind == "l1" else diff.square()
        return err.flatten(1).mean(1)

    # ---- sampling schedule
    def timesteps(self, steps: int) -> torch.Tensor:
        """long [steps] indices evenly spaced from T - 1 down to 0 (every index when steps == T; [T - 1] for 1)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.T:
            raise GenrepError(f"DDIM asked for {steps} steps but the model was trained with T = {self.T}; "
                              f"choose 1..{self.T}")
        # floor(x + 0.5) rather than round-half-even: spacing >= 1 then guarantees distinct indices
        return torch.floor(torch.linspace(self.T - 1, 0, steps, dtype=torch.float64) + 0.5).long()
