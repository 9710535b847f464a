"""The diffusion core against closed forms: schedules, forward process and posterior, samplers on Gaussian data
(where the exact denoiser is known), the variational bound, Beta noise levels and the one-line errors."""

import math

import pytest
import torch
from conftest import one_line
from torch import nn
from torch.distributions import Normal, kl_divergence

from genrep.diffusion import (
    LOSSES,
    PREDICTIONS,
    SCHEDULES,
    VARIANCES,
    GaussianDiffusion,
    beta_schedule,
    bits_per_dim,
    ddim_sample,
    ddpm_sample,
    discretized_gaussian_log_likelihood,
    draw_noise,
    noise_at_gamma,
    normal_kl,
    sample,
    sample_gamma,
)
from genrep.errors import GenrepError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def steps_of(t: int, n: int) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.long)


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("T", [50, 1000])
def test_schedules_are_float64_valid_and_decreasing(kind, T):
    betas = beta_schedule(kind, T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert (betas > 0).all() and (betas < 1).all()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    assert GaussianDiffusion(T, kind).alphas_cumprod.dtype == torch.float64


def test_cosine_schedule_matches_its_closed_form():
    T, s = 1000, 0.008
    betas = beta_schedule("cosine", T)
    unclipped = int((betas < 0.999).sum())  # the clip only touches the very last steps
    assert unclipped >= T - 5
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(t + 1) / f(0) for t in range(unclipped)], dtype=torch.float64)
    torch.testing.assert_close(torch.cumprod(1 - betas, 0)[:unclipped], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1000, 250])
def test_linear_schedule_endpoints_scale_with_T(T):
    betas = beta_schedule("linear", T)
    assert betas[0].item() == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02 * 1000 / T, rel=1e-12)


# ---------------------------------------------------------------- forward process and posterior

@pytest.fixture(params=SCHEDULES)
def diffusion(request) -> GaussianDiffusion:
    return GaussianDiffusion(100, request.param)


def test_alphas_cumprod_is_the_variance_of_repeated_single_steps(diffusion):
    # x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps step by step: Var[x_t | x0] obeys this recursion
    var, signal = 0.0, 1.0
    for t, beta in enumerate(diffusion.betas.tolist()):
        var, signal = (1 - beta) * var + beta, signal * math.sqrt(1 - beta)
        assert 1 - diffusion.alphas_cumprod[t].item() == pytest.approx(var, rel=1e-9, abs=1e-15)
        assert diffusion.sqrt_alphas_cumprod[t].item() == pytest.approx(signal, rel=1e-9)


def test_q_sample_and_q_mean_variance_closed_forms(diffusion):
    x0 = torch.rand(4, 3, 2, 2, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 17, 50, 99])
    ab = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, ab.sqrt() * x0)
    torch.testing.assert_close(var, 1 - ab)
    torch.testing.assert_close(log_var, torch.log(1 - ab))
    # coefficients are cast at the point of use: float32 data stays float32
    assert diffusion.q_sample(x0.float(), t, noise.float()).dtype == torch.float32


def test_posterior_matches_bayes_rule(diffusion):
    # q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): a product of two Gaussians in x_{t-1}
    n = 6
    x0 = torch.rand(n, 5, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(n, 5, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 50, 98, 99])
    alpha = (1 - diffusion.betas[t])[:, None]
    ab_prev = diffusion.alphas_cumprod[t - 1][:, None]
    precision = alpha / diffusion.betas[t][:, None] + 1 / (1 - ab_prev)
    var = 1 / precision
    mean = var * (alpha.sqrt() * x_t / diffusion.betas[t][:, None] + ab_prev.sqrt() * x0 / (1 - ab_prev))
    got_mean, got_var, got_log_var = diffusion.q_posterior(x0, x_t, t)
    torch.testing.assert_close(got_mean, mean, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got_var, var, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(got_log_var, var.log(), rtol=1e-9, atol=1e-9)


def test_posterior_at_the_first_step_is_the_data(diffusion):
    x0, x_t = torch.rand(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior(x0, x_t, steps_of(0, 3))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()
    # log(0) is clipped to the next step's posterior variance
    torch.testing.assert_close(log_var, diffusion.posterior_variance[1].log().expand(3, 1))


def test_x0_eps_conversions_are_inverses(diffusion):
    x_t = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 30, 70, 99])
    eps = torch.randn_like(x_t)
    x0 = diffusion.x0_from_eps(x_t, t, eps)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t, t, x0), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), x_t)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_split_output_clips_x0_and_keeps_eps_consistent(prediction):
    d = GaussianDiffusion(100, prediction=prediction)
    x_t = 3 * torch.randn(8, 16, dtype=torch.float64)
    t = torch.arange(8) * 12
    out = 3 * torch.randn_like(x_t)
    x0, eps = d.split_output(out, x_t, t, clip=True)
    assert x0.abs().max() <= 1
    torch.testing.assert_close(d.q_sample(x0, t, eps), x_t)
    x0_raw, eps_raw = d.split_output(out, x_t, t, clip=False)
    torch.testing.assert_close(x0_raw, out if prediction == "x0" else d.x0_from_eps(x_t, t, out))
    torch.testing.assert_close(d.q_sample(x0_raw, t, eps_raw), x_t)


@pytest.mark.parametrize("variance", VARIANCES)
def test_p_mean_variance_uses_the_posterior_mean_and_fixed_variance(variance):
    d = GaussianDiffusion(100, variance=variance, prediction="x0")
    x0 = torch.rand(4, 6, dtype=torch.float64) * 2 - 1
    x_t = torch.randn_like(x0)
    t = torch.tensor([0, 1, 50, 99])
    mean, var, log_var, x0_hat = d.p_mean_variance(x0, x_t, t)
    torch.testing.assert_close(mean, d.q_posterior(x0, x_t, t)[0])
    torch.testing.assert_close(x0_hat, x0)
    table = d.posterior_variance if variance == "small" else d.betas
    expected = torch.cat([d.posterior_variance[1:2], table[1:]])[t][:, None]
    torch.testing.assert_close(var, expected)
    torch.testing.assert_close(log_var, expected.log())


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_is_per_sample_against_the_prediction_target(prediction, loss):
    d = GaussianDiffusion(10, prediction=prediction, loss=loss)
    x0, noise, out = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    diff = out - (noise if prediction == "eps" else x0)
    expected = (diff.abs() if loss == "l1" else diff**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(d.loss(out, x0, noise), expected)
    assert d.loss(out.bfloat16(), x0, noise).dtype == torch.float32


def test_sample_t_is_uniform_over_all_steps_and_seeded():
    d = GaussianDiffusion(10)
    t = d.sample_t(20000, "cpu", gen(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 9
    assert torch.bincount(t, minlength=10).float().div(2000).sub(1).abs().max() < 0.1
    assert torch.equal(t, d.sample_t(20000, "cpu", gen(0)))
    with torch.random.fork_rng():  # no generator: the global RNG, as a training step reseeded by the loop
        torch.manual_seed(3)
        a = d.sample_t(50, "cpu")
        torch.manual_seed(3)
        assert torch.equal(a, d.sample_t(50, "cpu"))


def test_timesteps_are_evenly_spaced_and_descending():
    d = GaussianDiffusion(1000)
    assert torch.equal(d.timesteps(1000), torch.arange(999, -1, -1))
    assert d.timesteps(1).tolist() == [999]
    assert d.timesteps(4).tolist() == [999, 666, 333, 0]
    for steps in (2, 7, 50, 999):
        ts = d.timesteps(steps)
        assert ts.dtype == torch.long and len(ts) == steps and ts[0] == 999 and ts[-1] == 0
        assert (ts[1:] < ts[:-1]).all()


# ---------------------------------------------------------------- samplers on Gaussian data

MU = torch.tensor([0.3, -0.2], dtype=torch.float64)
STD = torch.tensor([1.0, 0.5], dtype=torch.float64)


def gaussian_denoiser(d: GaussianDiffusion):
    """The exact E[eps | x_t] for data x0 ~ N(MU, STD^2) per dimension."""
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == x.shape[:1]
        ab = d.alphas_cumprod[t][:, None].to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * STD**2 + 1 - ab)
    return denoise


def assert_matches_data(x: torch.Tensor, bias: float = 0.01):
    n = x.shape[0]
    assert ((x.mean(0) - MU).abs() < 4 * STD / math.sqrt(n)).all(), x.mean(0)
    assert ((x.std(0) / STD - 1).abs() < 4 / math.sqrt(2 * n) + bias).all(), x.std(0)


def test_ddpm_and_ddim_with_eta_one_are_the_same_sampler():
    d = GaussianDiffusion(1000, "cosine", variance="small")
    denoise, shape = gaussian_denoiser(d), (10000, 2)
    kw = dict(clip=False, dtype=torch.float64)
    ddpm = ddpm_sample(denoise, d, shape, generator=gen(0), **kw)
    ddim = ddim_sample(denoise, d, shape, steps=1000, eta=1.0, generator=gen(0), **kw)
    assert_matches_data(ddpm)
    assert_matches_data(ddim)
    # not only in distribution: the two updates are the same Gaussian written differently, drawing the same noise
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-9)
    other = ddim_sample(denoise, d, shape, steps=1000, eta=1.0, generator=gen(1), **kw)
    assert_matches_data(other)
    assert ((other.mean(0) - ddpm.mean(0)).abs() < 6 * STD / math.sqrt(shape[0])).all()


def test_deterministic_ddim_with_few_steps_is_the_euler_map_of_the_ode():
    d = GaussianDiffusion(1000, "cosine")
    steps, shape = 50, (10000, 2)
    x = ddim_sample(gaussian_denoiser(d), d, shape, steps=steps, eta=0.0, generator=gen(0), clip=False,
                    dtype=torch.float64)
    assert_matches_data(x, bias=0.04)  # Euler's discretisation error at 50 steps is ~3% of the std
    # Independently: with sigma = sqrt((1 - ab) / ab) and y = x / sqrt(ab) - MU, an eta = 0 step with the exact
    # eps is y <- y (1 + (sigma' - sigma) sigma / (STD^2 + sigma^2)), a linear map of the initial noise.
    ab = d.alphas_cumprod[d.timesteps(steps)].tolist() + [1.0]
    sigma = [math.sqrt((1 - a) / a) for a in ab]
    y = draw_noise(shape, gen(0), "cpu", torch.float64) / math.sqrt(ab[0]) - MU
    for s, s_next in zip(sigma[:-1], sigma[1:]):
        y = y * (1 + (s_next - s) * s / (STD**2 + s**2))
    torch.testing.assert_close(x, y + MU, rtol=1e-7, atol=1e-9)


def test_samplers_are_reproducible_from_the_generator():
    d = GaussianDiffusion(20, variance="large")
    net = nn.Linear(12, 12).double()
    denoise = lambda x, t: net(x.flatten(1)).view_as(x) * (t[:, None, None] / 20)
    shape = (3, 3, 4)
    for kw in (dict(sampler="ddpm"), dict(sampler="ddim", steps=7, eta=0.5), dict(sampler="ddim", steps=5)):
        a = sample(denoise, d, shape, generator=gen(0), dtype=torch.float64, **kw)
        b = sample(denoise, d, shape, generator=gen(0), dtype=torch.float64, **kw)
        c = sample(denoise, d, shape, generator=gen(1), dtype=torch.float64, **kw)
        assert a.shape == shape and a.dtype == torch.float64
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.abs().max() <= 1  # the last step returns the clipped x0 estimate


def test_sample_dispatch_runs_the_requested_number_of_steps():
    d = GaussianDiffusion(30)
    calls = []
    denoise = lambda x, t: calls.append(t[0].item()) or torch.zeros_like(x)
    with torch.enable_grad():
        x = sample(denoise, d, (2, 5), sampler="ddim", generator=gen(0))
    assert calls == list(range(29, -1, -1)) and not x.requires_grad
    calls.clear()
    sample(denoise, d, (2, 5), sampler="ddim", steps=4, generator=gen(0))
    assert calls == [29, 19, 10, 0]
    calls.clear()
    sample(denoise, d, (2, 5), sampler="ddpm", steps=30, generator=gen(0))
    assert len(calls) == 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_samplers_and_bound_give_the_same_numbers_on_the_gpu():
    d = GaussianDiffusion(50, "cosine", variance="large")
    net = nn.Linear(6, 6).double()
    gpu_net = nn.Linear(6, 6).double().cuda()
    gpu_net.load_state_dict(net.state_dict())
    for kw in (dict(sampler="ddpm"), dict(sampler="ddim", steps=10, eta=0.7)):
        cpu = sample(lambda x, t: net(x) * 0.1, d, (8, 6), generator=gen(0), dtype=torch.float64, **kw)
        gpu = sample(lambda x, t: gpu_net(x) * 0.1, d, (8, 6), generator=gen(0), device="cuda",
                     dtype=torch.float64, **kw)
        torch.testing.assert_close(gpu.cpu(), cpu)
    x0 = eight_bit(8, 6, 0).double()
    cpu = bits_per_dim(lambda x, t: net(x) * 0.1, d, x0, num_terms=7, generator=gen(1))
    gpu = bits_per_dim(lambda x, t: gpu_net(x) * 0.1, d, x0.cuda(), num_terms=7, generator=gen(1))
    torch.testing.assert_close({k: v.cpu() for k, v in gpu.items()}, cpu)
    assert sample_gamma(5, 2.0, 2.0, gen(2), device="cuda").device.type == "cuda"
    assert torch.equal(sample_gamma(5, 2.0, 2.0, gen(2), device="cuda").cpu(), sample_gamma(5, 2.0, 2.0, gen(2)))


# ---------------------------------------------------------------- likelihood

def test_normal_kl_agrees_with_torch_distributions():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), kl_divergence(Normal(m1, (0.5 * lv1).exp()),
                                                                          Normal(0.0, 1.0)))


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.01), (0.3, 0.002), (-0.95, 0.2), (0.999, 1e-4), (3.0, 0.05),
                                             (-5.0, 0.01), (0.5, 5.0)])
def test_discretized_gaussian_bins_sum_to_one(mean, scale):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    ll = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    assert ll.dtype == torch.float64 and torch.isfinite(ll).all()
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_gaussian_inner_bin_is_the_cdf_difference():
    x = torch.tensor([-0.5, 0.0, 0.2, 0.6], dtype=torch.float64)
    mean, log_scale = torch.tensor([0.1, 0.0, 0.25, -0.3]), torch.tensor([-2.0, -3.0, -1.0, 0.0])
    dist = Normal(mean.double(), log_scale.double().exp())
    expected = (dist.cdf(x + 1 / 255) - dist.cdf(x - 1 / 255)).log()
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, mean, log_scale), expected)


def eight_bit(n: int, dims: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, dims), generator=gen(seed)).float() / 127.5 - 1


def test_prior_term_is_the_kl_to_a_standard_normal():
    d = GaussianDiffusion(50, "linear")
    x0 = eight_bit(4, 6, 0)
    bpd = bits_per_dim(lambda x, t: torch.zeros_like(x), d, x0, generator=gen(0))
    q = Normal(d.sqrt_alphas_cumprod[-1] * x0.double(), d.sqrt_one_minus_alphas_cumprod[-1])
    expected = kl_divergence(q, Normal(0.0, 1.0)).sum(1) / (6 * math.log(2))
    torch.testing.assert_close(bpd["prior_bpd"], expected)
    assert torch.isfinite(bpd["bpd"]).all() and bpd["bpd"].dtype == torch.float64
    torch.testing.assert_close(bpd["bpd"], bpd["prior_bpd"] + bpd["kl_bpd"] + bpd["decoder_bpd"])


def oracle_terms(d: GaussianDiffusion) -> torch.Tensor:
    """Per-dimension KL (nats) of each t = 1..T-1 for a model that knows x0: only the variances differ."""
    lv_q, lv_p = d.posterior_variance[1:].log(), d.model_log_variance[1:]
    return 0.5 * (lv_p - lv_q + (lv_q - lv_p).exp() - 1)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_bound_of_an_oracle_model_matches_the_exact_sum(prediction):
    d = GaussianDiffusion(50, "cosine", prediction=prediction, variance="large")
    x0 = eight_bit(64, 8, 1).double()

    def oracle(x_t, t):  # x_t comes in the batch order of x0
        return x0 if prediction == "x0" else d.eps_from_x0(x_t, t, x0)

    exact = oracle_terms(d).sum().item() / math.log(2)
    full = bits_per_dim(oracle, d, x0, generator=gen(0))
    torch.testing.assert_close(full["kl_bpd"], torch.full((64,), exact, dtype=torch.float64), rtol=1e-6, atol=0)
    same = bits_per_dim(oracle, d, x0, num_terms=49, generator=gen(0))
    torch.testing.assert_close(same["bpd"], full["bpd"], rtol=1e-6, atol=0)
    # fewer terms: unbiased, so the average over samples and seeds approaches the exact sum
    estimates = torch.cat([bits_per_dim(oracle, d, x0, num_terms=4, generator=gen(seed))["kl_bpd"]
                           for seed in range(20)])
    assert estimates.std() > 0
    assert estimates.mean().item() == pytest.approx(exact, rel=0.02)
    assert (estimates.mean() - exact).abs() < 4 * estimates.std() / math.sqrt(len(estimates))


def test_stratified_bound_with_every_term_is_the_full_bound_for_any_model():
    d = GaussianDiffusion(20, "cosine")
    net = nn.Linear(8, 8)
    denoise = lambda x, t: net(x) * 0.1
    x0 = eight_bit(16, 8, 2)
    full = bits_per_dim(denoise, d, x0, generator=gen(5))
    torch.testing.assert_close(bits_per_dim(denoise, d, x0, num_terms=19, generator=gen(5)), full,
                               rtol=0, atol=0)
    assert all(torch.isfinite(v).all() and v.shape == (16,) for v in full.values())


class ToyDenoiser(nn.Module):
    def __init__(self, dims: int, T: int):
        super().__init__()
        self.T = T
        self.net = nn.Sequential(nn.Linear(dims + 8, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, dims))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phase = torch.arange(1, 5) * math.pi * t[:, None] / self.T
        return self.net(torch.cat([x, phase.sin(), phase.cos()], 1))


@torch.random.fork_rng()
def test_bound_decreases_while_a_toy_model_trains():
    torch.manual_seed(0)
    d, dims = GaussianDiffusion(50, "cosine", prediction="eps", loss="l2"), 16
    prototypes = torch.randint(0, 256, (4, dims), generator=gen(0)).float()

    def images(n: int, g: torch.Generator) -> torch.Tensor:  # 4x4 8-bit images: a few prototypes plus noise
        x = prototypes[torch.randint(0, 4, (n,), generator=g)] + 6 * torch.randn(n, dims, generator=g)
        return x.round().clamp(0, 255) / 127.5 - 1

    model, held_out = ToyDenoiser(dims, d.T), images(256, gen(1))
    before = bits_per_dim(model, d, held_out, generator=gen(2))["bpd"].mean()
    opt, g = torch.optim.Adam(model.parameters(), 2e-3), gen(3)
    for _ in range(300):
        x0, t = images(128, g), d.sample_t(128, "cpu", g)
        noise = torch.randn(x0.shape, generator=g)
        loss = d.loss(model(d.q_sample(x0, t, noise), t), x0, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bits_per_dim(model, d, held_out, generator=gen(2))["bpd"].mean()
    assert torch.isfinite(before) and torch.isfinite(after)
    assert after < before - 2, (before, after)


# ---------------------------------------------------------------- continuous noise levels

@pytest.mark.parametrize(("a", "b"), [(1.0, 1.0), (2.0, 5.0), (0.5, 0.5), (0.3, 3.0)])
def test_beta_noise_levels_have_the_beta_moments(a, b):
    n = 200_000
    gamma = sample_gamma(n, a, b, gen(0))
    assert gamma.dtype == torch.float32 and gamma.shape == (n,)
    assert (gamma >= 0).all() and (gamma <= 1).all()
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    g64 = gamma.double()
    assert g64.mean().item() == pytest.approx(mean, abs=5 * math.sqrt(var / n))
    assert g64.var().item() == pytest.approx(var, rel=0.03)
    assert torch.equal(gamma, sample_gamma(n, a, b, gen(0)))
    assert not torch.equal(gamma, sample_gamma(n, a, b, gen(1)))


def test_beta_noise_levels_pass_a_kolmogorov_smirnov_test():
    stats = pytest.importorskip("scipy.stats")
    gamma = sample_gamma(20_000, 2.0, 3.0, gen(4)).double().numpy()
    assert stats.kstest(gamma, stats.beta(2.0, 3.0).cdf).pvalue > 1e-3


def test_noise_at_gamma_mixes_signal_and_noise_per_sample():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    gamma = torch.tensor([0.0, 0.25, 1.0])
    x = noise_at_gamma(x0, gamma, noise)
    torch.testing.assert_close(x[0], noise[0])
    torch.testing.assert_close(x[1], 0.5 * x0[1] + math.sqrt(0.75) * noise[1])
    torch.testing.assert_close(x[2], x0[2])


# ---------------------------------------------------------------- bad input

def denoise_zero(x, t):
    return torch.zeros_like(x)


@pytest.mark.parametrize(("make", "fragments"), [
    (lambda: GaussianDiffusion(100, schedule="sigmoid"), ["'sigmoid'", "linear, cosine"]),
    (lambda: GaussianDiffusion(100, prediction="v"), ["'v'", "eps, x0"]),
    (lambda: GaussianDiffusion(100, loss="huber"), ["'huber'", "l1, l2"]),
    (lambda: GaussianDiffusion(100, variance="learned"), ["'learned'", "small, large"]),
    (lambda: GaussianDiffusion(1), ["T >= 2"]),
    (lambda: beta_schedule("cosine", 0), ["T >= 1"]),
    (lambda: beta_schedule("linear", 20), ["T >= 21"]),
    (lambda: GaussianDiffusion(1000).timesteps(2000), ["2000 steps", "T = 1000", "1..1000"]),
    (lambda: GaussianDiffusion(10).timesteps(0), ["0 steps", "1..10"]),
    (lambda: sample(denoise_zero, GaussianDiffusion(10), (1, 2), steps=11), ["11 steps", "1..10"]),
    (lambda: sample(denoise_zero, GaussianDiffusion(10), (1, 2), eta=-0.5), ["eta", ">= 0", "-0.5"]),
    (lambda: sample(denoise_zero, GaussianDiffusion(10), (1, 2), sampler="ddpm", steps=5), ["all T = 10", "ddim"]),
    (lambda: sample(denoise_zero, GaussianDiffusion(10), (1, 2), sampler="euler"), ["'euler'", "ddpm, ddim"]),
    (lambda: sample_gamma(4, 0.0, 1.0), ["a > 0", "a = 0.0"]),
    (lambda: sample_gamma(4, 1.0, -2.0), ["b > 0", "b = -2.0"]),
    (lambda: bits_per_dim(denoise_zero, GaussianDiffusion(10), torch.zeros(1, 2), num_terms=0), ["1..9", "0"]),
    (lambda: bits_per_dim(denoise_zero, GaussianDiffusion(10), torch.zeros(1, 2), num_terms=10), ["1..9", "10"]),
    (lambda: bits_per_dim(denoise_zero, GaussianDiffusion(10), torch.full((1, 2), 255.0)), ["[-1, 1]"]),
])
def test_bad_input_is_a_one_line_error(make, fragments):
    with pytest.raises(GenrepError) as e:
        make()
    msg = one_line(e)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
