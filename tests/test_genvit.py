"""GenViT / HybViT specifics: time conditioning, the two data streams, sampling and the bound, bad input."""

import pytest
import torch
from conftest import assert_one_line_error, cli_in_process, one_line, run_cli, tiny_config

from genrep.data.batches import BatchPlan, TrainBatches, make_views
from genrep.data.datasets import load_dataset
from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method
from genrep.nn.denoiser import DenoiserViT
from genrep.runs import build_for_data
from genrep.train.loop import Trainer

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)


def _build(name="hybvit", **overrides):
    torch.manual_seed(0)
    return build_method(name, tiny_config(name, **overrides).model, SPEC)


@pytest.mark.parametrize("per", ["token", "channel"])
def test_time_modulation_reaches_the_output(per):
    """Per-token scalars act on the residual stream, so they are not cancelled by the LayerNorm after them."""
    torch.manual_seed(0)
    net = DenoiserViT(8, 2, 1, 32, 2, 2, 2.0, modulation=per).eval()
    x = torch.randn(3, 1, 8, 8)
    t0, t1 = torch.zeros(3, dtype=torch.long), torch.full((3,), 500)
    torch.testing.assert_close(net(x, t=t0), net(x, t=t1))  # zero-initialised: no time effect yet
    for mod in net.modulations:
        torch.nn.init.normal_(mod.proj.weight, std=0.1)
    scale, _ = net.modulations[0](net.time_embed(t0))
    assert scale.shape == ((3, 17, 1) if per == "token" else (3, 1, 32))
    assert (net(x, t=t0) - net(x, t=t1)).abs().max() > 1e-3
    torch.nn.init.normal_(net.to_patches.weight, std=0.1)
    assert net.denoise(x, t0).shape == x.shape


def test_the_classification_pass_has_no_time_input():
    method = _build().eval()
    for mod in method.net.modulations:
        torch.nn.init.normal_(mod.proj.weight, std=0.1)
    x = torch.rand(2, 1, 8, 8)
    h = method.net(method.normalize(x))
    torch.testing.assert_close(method.logits(x), method.head(h[:, 0]))
    torch.testing.assert_close(method.features(x, pool="cls"), h[:, 0])


def test_streams_are_independent_mini_batches_split_like_one():
    single = BatchPlan(100, 20, seed=3)
    two = BatchPlan(100, 20, seed=3, streams=2)
    idx = two.indices(1)
    assert torch.equal(idx[:20], single.indices(1))  # stream 0 is the ordinary order
    assert not torch.equal(idx[20:], idx[:20])
    ranks = [BatchPlan(100, 20, seed=3, rank=r, world=2, streams=2) for r in range(2)]
    parts = [p.indices(1) for p in ranks]
    assert torch.equal(torch.cat([p[:10] for p in parts]), idx[:20])
    assert torch.equal(torch.cat([p[10:] for p in parts]), idx[20:])
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 2, 2).contiguous()
    (_, x, y), = TrainBatches(images, torch.arange(100), two, torch.device("cpu"), resident=True)(1, 2)
    assert torch.equal(y, idx)
    views = make_views(x, {"image": "none", "diffusion": "none"}, 0, 1, 0, 20, streams={"diffusion": 1})
    assert torch.equal((views["image"][:, 0, 0, 0] * 255).round().long(), idx[:20])
    assert torch.equal((views["diffusion"][:, 0, 0, 0] * 255).round().long(), idx[20:])


def test_hybvit_trains_both_streams(tmp_path):
    trainer = Trainer(tiny_config("hybvit", **{"train.steps": 3}), tmp_path)
    assert trainer.plan.streams == 2
    result = trainer.fit()
    trainer.close()
    assert {"ce", "diff", "acc"} <= set(result.last_log)
    assert result.last_log["loss"] == pytest.approx(result.last_log["ce"] + 100 * result.last_log["diff"], rel=1e-4)


def test_sampling_is_seeded_and_in_range():
    method = _build("genvit", **{"model.sample_steps": 5}).eval()
    a = method.sample(3, generator=torch.Generator().manual_seed(1))
    b = method.sample(3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    assert method.capability_settings("sample") == {"sampler": "ddim", "steps": 5, "eta": 0.0, "precision": "fp32"}
    ddpm = _build("genvit", **{"model.sampler": "ddpm", "model.timesteps": 20}).eval()
    assert ddpm.sample(2, generator=torch.Generator().manual_seed(1)).shape == (2, 1, 8, 8)
    assert ddpm.capability_settings("sample") == {"sampler": "ddpm", "steps": 20, "precision": "fp32"}
    capped = _build("genvit", **{"model.sample_steps": 5000, "model.timesteps": 20}).eval()
    assert capped.capability_settings("sample")["steps"] == 20


def test_nll_is_finite_bits_per_dim():
    method = _build("genvit", **{"model.nll_terms": 4}).eval()
    x = torch.randint(0, 256, (2, 1, 8, 8)).float() / 255
    bpd = method.nll(x, generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (2,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    assert method.capability_settings("nll") == {"terms": 4, "of": 1000}
    every = _build("genvit", **{"model.nll_terms": 100, "model.timesteps": 20}).eval()
    assert every.capability_settings("nll") == {"terms": "all", "of": 20}


def test_features_at_a_chosen_step_are_repeatable_and_differ_from_clean():
    method = _build("genvit", **{"model.feature_t": 200}).eval()
    clean = _build("genvit").eval()
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(method.features(x), method.features(x))
    assert not torch.allclose(method.features(x), clean.features(x))


def test_energy_score_is_logsumexp_of_logits():
    method = _build().eval()
    torch.nn.init.normal_(method.head.weight)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(method.energy(x), torch.logsumexp(method.logits(x), -1))


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_score_function_is_the_gaussian_score_for_an_oracle_denoiser(prediction, monkeypatch):
    """For unit-Gaussian data in the model's [-1, 1] space, p_t stays N(0, I) and the optimal denoiser is known
    (E[eps | y_t] = sigma_t y_t, E[y_0 | y_t] = sqrt(alpha_bar_t) y_t): the score must come out as -y, times 2
    for the [0, 1] -> [-1, 1] map."""
    method = _build(**{"model.prediction": prediction, "model.score_t": 7}).eval()
    d = method.diffusion
    coef = d.train_sqrt_1m_ab if prediction == "eps" else d.train_sqrt_ab
    monkeypatch.setattr(method, "denoise", lambda y, t: coef[t].view(-1, 1, 1, 1) * y)
    x = torch.rand(5, 1, 8, 8)
    # x0 -> eps divides by sqrt(1 / alpha_bar - 1), small at t = 7: float32 keeps about 3 digits there
    torch.testing.assert_close(method.grad_log_density(x), -2 * (2 * x - 1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("override, fragment", [
    ({"model.score_t": 1000}, "model.score_t 1000"),
    ({"model.alpha": -1.0}, "model.alpha must be at least 0, got -1.0"),
    ({"model.patch_size": 3}, "patch_size 3 does not divide the image size 8"),
    ({"model.feature_t": 5000}, "choose 0..999"),
    ({"model.schedule": "sigmoid"}, "sigmoid"),
    ({"model.time_modulation": "pixel"}, "model.time_modulation 'pixel' is unknown; choose token, channel"),
    ({"model.sampler": "euler"}, "model.sampler 'euler' is unknown"),
    ({"model.sample_steps": 0}, "model.sample_steps must be at least 1"),
    ({"model.eta": -0.5}, "model.eta must be at least 0, got -0.5"),
    ({"model.nll_terms": -1}, "model.nll_terms must be at least 0, got -1"),
])
def test_bad_settings_are_clear_errors(override, fragment):
    with pytest.raises(GenrepError) as e:
        _build("hybvit", **override)
    assert fragment in one_line(e)


@pytest.mark.slow
def test_sample_command_writes_grids_and_refuses_bad_requests(tmp_path, one_torch_thread):
    run = tmp_path / "hyb"
    args = [f"--{k}={v}" for k, v in {"train.steps": 4, "train.ckpt_every": 4, "train.progress": False,
                                      "model.dim": 32, "model.depth": 1, "model.num_heads": 2,
                                      "model.timesteps": 50}.items()]
    assert run_cli("pretrain", "--recipe", "hybvit-digits", "--out", str(run), *args).returncode == 0
    ok = run_cli("sample", str(run), "-n", "12", "--steps", "10", "--rank-energy", "--per-class", "2")
    assert ok.returncode == 0, ok.stderr
    from PIL import Image
    grid = run / "samples" / "ddim-10steps-n12-seed0.png"
    assert Image.open(grid).size[0] > 16 * 4
    assert (run / "samples" / "ddim-10steps-n12-seed0-by-energy.png").is_file()
    assert (run / "samples" / "ddim-10steps-n12-seed0.json").is_file()
    # the first bad request as a user meets it, in a fresh interpreter; the others through the same main() in this
    # one (a fresh interpreter per command was most of the test's time)
    assert_one_line_error(run_cli("sample", str(run), "--steps", "51"), "51 steps", "T = 50")
    assert_one_line_error(cli_in_process("sample", str(run), "--sampler", "euler"), "euler")
    assert_one_line_error(cli_in_process("sample", str(run), "-n", "0"), "-n must be at least 1")
    sup = tmp_path / "sup"
    assert cli_in_process("pretrain", "--recipe", "supervised-digits", "--out", str(sup), *args[:3]).returncode == 0
    assert_one_line_error(cli_in_process("sample", str(sup)), "cannot sample")


def test_one_fused_forward_equals_the_two_passes():
    """HybViT's loss runs both mini-batches as one batch; that must be the paper's two separate passes."""
    method = _build().train()
    for mod in method.net.modulations:
        torch.nn.init.normal_(mod.proj.weight, std=0.1)
    torch.nn.init.normal_(method.net.to_patches.weight, std=0.1)
    torch.nn.init.normal_(method.head.weight, std=0.1)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(5, 1, 8, 8, generator=g), "diffusion": torch.rand(5, 1, 8, 8, generator=g),
             "label": torch.randint(0, 10, (5,), generator=g)}
    torch.manual_seed(3)
    fused = method(batch)
    torch.manual_seed(3)
    diff = method.diffusion_loss(batch["diffusion"])  # draws t and noise in the same order
    ce = torch.nn.functional.cross_entropy(method.logits(batch["image"]), batch["label"])
    torch.testing.assert_close(fused["diff"], diff.detach())
    torch.testing.assert_close(fused["ce"], ce.detach())
    torch.testing.assert_close(fused["loss"], ce + 100 * diff)


def test_probes_read_features_at_a_chosen_step_without_retraining(tmp_path):
    from genrep.eval.evaluate import run_probes
    from genrep.train.loop import pretrain

    run = tmp_path / "gen"
    pretrain(tiny_config("genvit", **{"train.steps": 4, "train.ckpt_every": 4}), run)
    clean = run_probes(run, progress=False)
    noisy = run_probes(run, progress=False, options={"feature_t": 300})
    assert clean["feature_t"] is None and noisy["feature_t"] == 300
    assert sorted(p.name for p in (run / "cache").iterdir() if "train" in p.name) == [
        "features-train-layer1-mean-feature_t300-feature_noisefixed-feature_noise_seed0-fp32-ema.safetensors",
        "features-train-layer1-mean-feature_tNone-feature_noisefixed-feature_noise_seed0-fp32-ema.safetensors"]
    with pytest.raises(GenrepError) as e:
        run_probes(run, progress=False, options={"dim": 64})
    assert "cannot change model.dim of a trained genvit run" in one_line(e) and "model.feature_t" in one_line(e)


def test_sample_precision_is_the_models_option_and_recorded():
    """bf16 sampling (autocast of the network only) is chosen by model.sample_precision and reported by
    capability_settings; the images come back float32 in [0, 1] either way."""
    train = load_dataset("digits", "train", image_size=8)
    fp32 = build_for_data(tiny_config("genvit", **{"model.sample_precision": "fp32"}), train).eval()
    bf16 = build_for_data(tiny_config("genvit", **{"model.sample_precision": "bf16"}), train).eval()
    assert bf16.capability_settings("sample")["precision"] == "bf16"
    for method, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        seen = set()
        linear = next(m for m in method.net.modules() if isinstance(m, torch.nn.Linear))
        hook = linear.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
        x = method.sample(4, generator=torch.Generator().manual_seed(3))
        hook.remove()
        assert seen == {dtype} and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
