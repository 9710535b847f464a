"""Method adm: the ADM U-Net as a DDPM and a pretrained guided-diffusion state dict as a frozen part; its
block numbering, deterministic noised read-outs, the feature cache, sampling, the paper's heads in `genrep
probe`, and bad input as one line before any work. (The U-Net itself is tested in test_unet.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import one_line, tiny_config
from eval_helpers import no_extraction
from safetensors import safe_open

from genrep.cli import main
from genrep.config import EvalConfig, resolve_config
from genrep.errors import GenrepError
from genrep.eval.protocols.context import EvalContext
from genrep.methods import DataSpec, build_method, get_method
from genrep.methods.adm import ADM, ADMConfig, unet_kwargs
from genrep.nn.unet import ADM_256_UNCOND, UNet, Upsample
from genrep.run import Run, load_trained
from genrep.runs import FROZEN_FILE
from genrep.train.loop import pretrain

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)  # digits
# the cheapest `genrep probe` that still runs every part of it: one weight decay (no held-out choice), one k
PROBE_ARGS = ["--device", "cpu", "--probe.weight_decay", "1e-3", "--probe.knn_k", "5"]
PNG = b"\x89PNG\r\n\x1a\n"
# a shipped method whose features are vectors (the tests' own toy as a fallback)
VECTOR = next(n for n in ("simclr", "igpt", "gcrl", "toy") if not get_method(n).feature_maps)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adm_run(tmp_path_factory, one_thread) -> Path:
    """A tiny trained adm run (blocks 1..9: encoder 1-4, middle 5, decoder 6-9; default block 9)."""
    run = tmp_path_factory.mktemp("adm") / "run"
    pretrain(tiny_config("adm", **{"train.steps": 2}), run)
    return run


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory, one_thread) -> Path:
    run = tmp_path_factory.mktemp(VECTOR) / "run"
    pretrain(tiny_config(VECTOR, **{"train.steps": 2}), run)
    return run


def _cli_error(capsys, argv: list[str]) -> str:
    """``genrep ARGV`` in-process: exit status 2 and one ``genrep: error:`` line on stderr (returned)."""
    capsys.readouterr()
    rc = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("genrep: error: "), (rc, lines)
    assert "Traceback" not in lines[0]
    return lines[0]


def _random_unet(cfg: ADMConfig, spec: DataSpec = SPEC, seed: int = 0) -> UNet:
    """A U-Net of ``cfg`` with every parameter random (the zero-initialised layers would hide the blocks)."""
    torch.manual_seed(seed)
    unet = UNet(**unet_kwargs(cfg, spec)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet


# ------------------------------------------------------------------------------------------- block numbering

def test_adm256_blocks_through_the_method(tmp_path):
    """guided-diffusion's 256x256 uncond flags as an adm config: the paper's numbering (37 blocks, middle 19)
    and its best block 24 (16x16, 1024 channels) as the default read-out; built on the meta device, so the
    pretrained file (here not even a state dict) is neither hashed nor read."""
    fake = tmp_path / "256x256_diffusion_uncond.pt"
    fake.write_bytes(b"not read on the meta device")
    cfg = ADMConfig(num_channels=256, num_res_blocks=2, attention_resolutions=[32, 16, 8],
                    num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
                    pretrained=str(fake))
    spec = DataSpec(image_size=256, channels=3, num_classes=1000)
    kwargs = unet_kwargs(cfg, spec)
    assert kwargs == {k: v for k, v in ADM_256_UNCOND.items() if k in kwargs}
    with torch.device("meta"):
        m = ADM(cfg, spec)
    assert m.num_layers == 37 and m.middle_block == 19 and m.default_layer == 24
    assert m.feature_map_size(24) == 16 and m.feature_channels(24) == 1024
    assert m.feature_map_size(19) == 8 and m.feature_map_size(1) == m.feature_map_size(37) == 256
    assert m.param_counts()["trainable"] == 0 and set(m.frozen_parts) == {"unet"}
    assert m.frozen_parts["unet"].sha256 == ""
    assert m.check_feature_args(None, None) == (24, "1")
    with pytest.raises(GenrepError, match=r"choose 1\.\.37") as e:
        m.check_feature_args(38, None)
    one_line(e)


def test_tiny_adm_blocks():
    m = build_method("adm", tiny_config("adm").model, SPEC)
    assert m.num_layers == 9 and m.middle_block == 5 and m.default_layer == 9
    assert [m.feature_map_size(b) for b in range(1, 10)] == [8, 8, 4, 4, 4, 4, 8, 8, 8]


def _second_block_of_second_decoder_level(unet: UNet) -> int:
    """Counted on the modules, not by the method's rule: the first decoder level ends with the first output block
    that upsamples; the block after the next one is the second level's second. A U-Net that never upsamples (one
    level) has no second level: its last block."""
    def upsamples(block) -> bool:
        return any(isinstance(layer, Upsample) or getattr(layer, "direction", None) == "up" for layer in block)

    ups = [i for i, block in enumerate(unet.output_blocks) if upsamples(block)]
    if not ups:
        return unet.num_blocks
    return len(unet.input_blocks) + 1 + (ups[0] + 1) + 2  # encoder, middle, the first level, two blocks in


@pytest.mark.parametrize("recipe, image_size, channels, overrides, block", [
    ("adm-digits", 8, 1, {}, 11),             # R = 1: encoder 1-6, middle 7, decoder levels 8-9, 10-11, 12-13
    ("adm-cifar10", 32, 3, {}, 23),           # R = 3: middle 17, decoder levels 18-21, 22-25, ...
    ("adm-imagenet256", 256, 3, {}, 24),      # R = 2: middle 19, decoder levels 20-22, 23-25, ... (the paper's 24)
    ("adm-digits", 8, 1, {"model.channel_mult": [1], "model.attention_resolutions": [8]}, 5),  # one level: 1-2, 3, 4-5
])
def test_the_default_block_is_the_second_block_of_the_second_decoder_level(tmp_path, recipe, image_size, channels,
                                                                            overrides, block):
    fake = tmp_path / "256x256_diffusion_uncond.pt"  # adm-imagenet256 names a frozen file; the meta build reads none
    fake.write_bytes(b"not read on the meta device")
    cfg = resolve_config(recipe, {"model.pretrained": str(fake)} if recipe == "adm-imagenet256" else overrides)
    with torch.device("meta"):
        m = build_method("adm", cfg.model, DataSpec(image_size=image_size, channels=channels, num_classes=10))
    assert m.default_layer == _second_block_of_second_decoder_level(m.unet) == block
    assert m.check_feature_args(None, None)[0] == block


# ------------------------------------------------------------------------------------- a pretrained U-Net

def test_a_pretrained_state_dict_is_a_frozen_part(tmp_path, capsys):
    cfg = tiny_config("adm", **{"model.pretrained": str(tmp_path / "unet.pt")})
    src = _random_unet(cfg.model)
    torch.save(src.state_dict(), tmp_path / "unet.pt")
    run = tmp_path / "run"
    result = pretrain(cfg, run)
    assert result.steps == 0  # nothing to train

    frozen = json.loads((run / FROZEN_FILE).read_text())
    assert list(frozen) == ["unet"] and frozen["unet"]["path"] == str((tmp_path / "unet.pt").resolve())
    assert len(frozen["unet"]["sha256"]) == 64
    for weights in ("model", "ema"):
        with safe_open(str(run / f"{weights}.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if k.startswith("unet.")]  # noqa: SIM118
    assert sum(f.stat().st_size for f in run.rglob("*.safetensors")) < 100_000  # the U-Net is not copied

    _, method, _ = load_trained(run)
    assert method.param_counts()["trainable"] == 0 and method.param_counts()["total"] > 0
    assert not method.unet.training
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        acts = src.activations(2 * x - 1, torch.zeros(5, dtype=torch.long), {3, 8, 9})
        torch.testing.assert_close(method.features(x, layer=3, pool="map"), acts[3])
        torch.testing.assert_close(method.features(x), acts[9].mean((2, 3)))  # default: block 9, pool 1
        torch.testing.assert_close(method.features(x, layer=8, pool="2"),
                                   torch.nn.functional.adaptive_avg_pool2d(acts[8], 2).flatten(1))

    capsys.readouterr()
    assert main(["probe", str(run), *PROBE_ARGS]) == 0
    assert "linear probe" in capsys.readouterr().out
    probe = json.loads((run / "results" / "probe.json").read_text())
    assert probe["method"] == "adm" and probe["layer"] == 9 and probe["feature_dim"] == 32


def test_a_state_dict_of_another_configuration_is_refused_before_a_run_exists(tmp_path):
    other = tiny_config("adm", **{"model.num_channels": 64}).model
    torch.save(_random_unet(other).state_dict(), tmp_path / "unet64.pt")
    run = tmp_path / "run"
    with pytest.raises(GenrepError, match="not a state dict of this configuration") as e:
        pretrain(tiny_config("adm", **{"model.pretrained": str(tmp_path / "unet64.pt")}), run)
    assert "shape mismatches" in one_line(e)
    assert not run.exists()


def test_a_pretrained_file_changed_after_the_run_was_made_is_refused(tmp_path, capsys):
    path = tmp_path / "unet.pt"
    cfg = tiny_config("adm", **{"model.pretrained": str(path)})
    torch.save(_random_unet(cfg.model, seed=0).state_dict(), path)
    run = tmp_path / "run"
    pretrain(cfg, run)
    load_trained(run)  # unchanged: loads
    torch.save(_random_unet(cfg.model, seed=1).state_dict(), path)  # same configuration, other weights
    with pytest.raises(GenrepError, match="the file changed since training") as e:
        load_trained(run)
    assert "frozen part 'unet'" in one_line(e)
    assert "the file changed since training" in _cli_error(capsys, ["probe", str(run), *PROBE_ARGS])
    assert not (run / "results" / "probe.json").exists()


# ------------------------------------------------------------------------------------------- noised read-outs

def test_fixed_noise_makes_noised_features_a_function_of_the_image():
    x = torch.rand(7, 1, 8, 8)
    def build(**overrides):
        return build_method("adm", tiny_config("adm", **overrides).model, SPEC).eval()

    m = build(**{"model.feature_t": 50})
    clean = build()
    other_seed = build(**{"model.feature_t": 50, "model.feature_noise_seed": 1})
    fresh = build(**{"model.feature_t": 50, "model.feature_noise": "fresh"})
    for other in (clean, other_seed, fresh):  # the same weights, read otherwise
        other.load_state_dict(m.state_dict())
    with torch.no_grad():
        a = m.features(x, layer=8, pool="2")
        torch.testing.assert_close(m.features(x, layer=8, pool="2"), a, rtol=0, atol=0)  # identical twice
        # the batch it is in does not matter: the first 3 images alone, the last 4 alone
        torch.testing.assert_close(m.features(x[:3], layer=8, pool="2"), a[:3])
        torch.testing.assert_close(m.features(x[3:], layer=8, pool="2"), a[3:])
        assert not torch.allclose(clean.features(x, layer=8, pool="2"), a, atol=1e-4)  # t=50 is not clean
        assert not torch.allclose(other_seed.features(x, layer=8, pool="2"), a, atol=1e-4)
        f1, f2 = fresh.features(x, layer=8, pool="2"), fresh.features(x, layer=8, pool="2")
        assert not torch.allclose(f1, f2, atol=1e-4)
    # the read-out's tag (its cache key) tells the three apart
    assert len({m.feature_tag(), other_seed.feature_tag(), fresh.feature_tag(), clean.feature_tag()}) == 4


def test_feature_sets_is_one_pass_equal_to_separate_reads():
    m = build_method("adm", tiny_config("adm", **{"model.feature_t": 50}).model, SPEC).eval()
    x = torch.rand(4, 1, 8, 8)
    reads = [(2, "1"), (8, "2"), (5, "map"), (None, None)]
    calls = []
    real = m.unet.activations
    m.unet.activations = lambda *a, **k: calls.append(a[2]) or real(*a, **k)
    with torch.no_grad():
        sets = m.feature_sets(x, reads)
        assert len(calls) == 1 and set(calls[0]) == {2, 5, 8, 9}  # 9: the default block
        for (layer, pool), f in zip(reads, sets):
            torch.testing.assert_close(f, m.features(x, layer=layer, pool=pool))
    assert sets[2].shape == (4, 64, 4, 4) and sets[1].shape == (4, 32 * 4) and sets[3].shape == (4, 32)


# --------------------------------------------------------------------------- cached and uncached features

def test_cached_features_equal_a_direct_extraction(adm_run):
    ev = EvalConfig(device="cpu", batch_size=100)
    ctx = EvalContext.open(Run.open(adm_run), ev, options={"feature_t": 50}, progress=False)
    method, images = ctx.method, ctx.test.images
    with torch.no_grad():
        direct = method.feature_sets(images.float() / 255, [(3, "1"), (8, "2"), (6, "map")])
    first = ctx.feature_sets("test", [(3, "1"), (8, "2"), (6, "map")])
    keys = [ctx.feature_key("test", b, p) for b, p in ((3, "1"), (8, "2"), (6, "map"))]
    assert all((adm_run / "cache" / f"{k}.safetensors").is_file() for k in keys)
    assert all("feature_t50" in k for k in keys)
    # read back from the cache, alone and through the single-read path
    again = ctx.feature_sets("test", [(3, "1"), (8, "2"), (6, "map")])
    single = ctx.features("test", 8, "2")
    for d, f, g in zip(direct, first, again):
        torch.testing.assert_close(f, d)
        torch.testing.assert_close(g, d, rtol=0, atol=0)
    torch.testing.assert_close(single, direct[1], rtol=0, atol=0)
    # a single read the sets never made, computed in batches of 100, equals the direct one
    torch.testing.assert_close(ctx.features("test", 4, "1"),
                               method.features(images.float() / 255, layer=4, pool="1"))


# ------------------------------------------------------------------------------------ loading and sampling

def test_a_trained_run_loads_and_samples(adm_run, tmp_path, capsys):
    cfg, method, train = load_trained(adm_run)
    assert cfg.method == "adm" and isinstance(method, ADM) and not method.training
    assert method.param_counts()["trainable"] == method.param_counts()["total"] > 0
    assert not method.frozen_parts
    x = method.sample(4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
    out = tmp_path / "samples.png"
    capsys.readouterr()
    assert main(["sample", str(adm_run), "-n", "4", "--steps", "2", "--device", "cpu", "-o", str(out)]) == 0
    assert "4 samples from adm" in capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, fragment", [
    (["--probe.layer", "99"], "layer 99 does not exist in adm; choose 1..9"),
    (["--probe.layer", "0"], "probe.layer must be at least 1"),
    (["--model.feature_t", "1000"], "model.feature_t 1000 is not a diffusion step; choose 0..999"),
    (["--probe.pool", "99"], "pool 99 is larger than the 8x8 map of layer 9 in adm"),
    (["--probe.pool", "mean"], "pooling 'mean' is not offered by adm"),
    (["--model.num_channels", "64"], "cannot change model.num_channels of a trained adm run"),
])
def test_bad_probe_input_is_one_line_before_any_work(adm_run, capsys, monkeypatch, args, fragment):
    work = no_extraction(monkeypatch)
    path = adm_run / "results" / "probe.json"
    before = path.read_bytes() if path.exists() else None
    line = _cli_error(capsys, ["probe", str(adm_run), *PROBE_ARGS, *args])
    assert fragment in line, line
    assert work == []
    assert (path.read_bytes() if path.exists() else None) == before


@pytest.mark.parametrize("overrides, fragment", [
    ({"model.learn_sigma": True}, "model.learn_sigma trains the variance with guided-diffusion's hybrid"),
    ({"model.feature_t": 1000}, "model.feature_t 1000 is not a diffusion step"),
    ({"model.feature_pool": "mean"}, "model.feature_pool 'mean' is not a pooling"),
    ({"model.num_head_channels": 0}, "num_head_channels 0 makes no heads"),
])
def test_bad_adm_config_is_refused_when_the_config_is_built(overrides, fragment):
    with pytest.raises(GenrepError) as e:
        tiny_config("adm", **overrides)
    assert fragment in one_line(e)


@pytest.mark.parametrize("overrides, fragment", [
    ({"model.attention_resolutions": [16]}, "model.attention_resolutions [16] never occur in this U-Net; its "
                                            "resolutions on 8 px are 8, 4"),
    ({"model.num_channels": 48}, "model.num_channels 48 x channel_mult 1 = 48 channels, which GroupNorm "
                                 "cannot split into 32 groups"),
    ({"model.channel_mult": [1, 2, 2, 2, 2]}, "has 5 levels"),
    ({"model.num_head_channels": 24}, "model.num_head_channels 24 does not divide 32 channels"),
    ({"model.feature_layer": 10}, "model.feature_layer 10 does not exist; this U-Net has blocks 1..9"),
    ({"model.pretrained": "/nonexistent/256x256_diffusion_uncond.pt"}, "is not a file"),
])
def test_bad_adm_model_is_one_line_before_a_run_folder_exists(tmp_path, overrides, fragment):
    run = tmp_path / "run"
    with pytest.raises(GenrepError) as e:
        pretrain(tiny_config("adm", **overrides), run)
    assert fragment in one_line(e)
    assert not run.exists()


def test_learn_sigma_with_a_pretrained_file_samples_with_the_learned_variance(tmp_path):
    """guided-diffusion's checkpoints have the variance channels: allowed with model.pretrained, where eps is the
    first half and the reverse variance comes from v, the second (the learned range)."""
    cfg = tiny_config("adm", **{"model.learn_sigma": True, "model.pretrained": str(tmp_path / "u.pt"),
                                "model.sampler": "ddpm", "model.timesteps": 30})
    src = _random_unet(cfg.model)
    assert src.out_channels == 2
    torch.save(src.state_dict(), tmp_path / "u.pt")
    m = build_method("adm", cfg.model, SPEC).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 20])
    with torch.no_grad():
        torch.testing.assert_close(m.denoise(x, t), src(x, t))
        mean, var, log_var, _ = m.diffusion.p_mean_variance(src(x, t), x, t)
    d = m.diffusion
    frac = (src(x, t)[:, 1:].detach() + 1) / 2
    expected = frac * d.log_betas[t].float().view(-1, 1, 1, 1) + (1 - frac) * d.posterior_log_variance_clipped[
        t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(log_var, expected)
    assert m.capability_settings("sample")["variance"] == "learned range"
    assert m.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)
    assert torch.isfinite(m.nll(torch.rand(2, 1, 8, 8))).all()


def test_a_learned_variance_at_its_lower_end_is_the_posterior_variance():
    """v = -1 everywhere reads as the fixed small variance: DDPM sampling is then identical."""
    from genrep.diffusion import GaussianDiffusion, ddpm_sample

    learned, small = GaussianDiffusion(30, "linear", variance="learned_range"), GaussianDiffusion(30, "linear")
    eps = lambda x, t: 0.1 * x  # noqa: E731 - a stand-in denoiser
    out = ddpm_sample(lambda x, t: torch.cat([eps(x, t), -torch.ones_like(x)], 1), learned, (2, 1, 4, 4),
                      generator=torch.Generator().manual_seed(0))
    ref = ddpm_sample(eps, small, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref)
    with pytest.raises(GenrepError, match="hybrid loss"):
        learned.loss(torch.zeros(2, 2, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))


# ------------------------------------------------------------------------------- the paper's heads in probe

HEAD_ARGS = ["--probe.heads", "attention,cnn", "--probe.head.epochs", "2", "--probe.head.cnn_channels", "8,8",
             "--probe.head.batch_size", "512"]


def test_probe_heads_are_trained_at_the_read_out_and_recorded(adm_run, capsys):
    """`genrep probe --probe.heads`: each head on the map of the read-out's block, in probe.json and in the
    table."""
    capsys.readouterr()
    assert main(["probe", str(adm_run), *PROBE_ARGS, *HEAD_ARGS]) == 0
    out = capsys.readouterr().out
    probe = json.loads((adm_run / "results" / "probe.json").read_text())
    assert probe["layer"] == 9 and probe["pool"] == "1"
    assert list(probe["heads"]) == ["attention", "cnn"]
    for kind, r in probe["heads"].items():
        assert r["pool"] == {"cnn": "map", "attention": "map8"}[kind]   # the attention head's map pooled to <= 8x8
        assert 0 <= r["test_acc"] <= 1 and r["params"] > 0 and r["epochs"] == 2
        assert f"{kind} head ({r['pool']} pool, {r['params']:,} parameters)" in out


def test_a_map_head_on_vector_features_is_one_line_naming_the_head(vector_run, capsys, monkeypatch):
    work = no_extraction(monkeypatch)
    for head in ("cnn", "attention"):
        line = _cli_error(capsys, ["probe", str(vector_run), *PROBE_ARGS, "--probe.heads", f"mlp,{head}"])
        assert f"probes.heads: the {head} head needs feature maps" in line
        assert f"{VECTOR}'s features are vectors" in line and "adm" in line  # and a method that has maps
    assert work == [] and not (vector_run / "results" / "probe.json").exists()


def test_cka_across_noise_steps_compares_every_t_and_block(adm_run, capsys):
    """The similarity protocol's figure-6 matrix: every (t, block) read-out against every other."""
    from genrep.eval.evaluate import evaluate_run
    from genrep.eval.protocols.similarity import SimilaritySettings

    ev = EvalConfig(device="cpu", protocols=["similarity"],
                    similarity=SimilaritySettings(cka_n=32, tsne_n=32, cka_t=[0, 50, 500]))
    r = evaluate_run(adm_run, ev, progress=False, say=lambda m: None)["protocols"]["similarity"]
    across, n = r["across_t"], 9
    assert across["t"] == [0, 50, 500] and len(across["labels"]) == 3 * n == len(across["matrix"])
    m = torch.tensor(across["matrix"])
    assert torch.allclose(torch.diagonal(m), torch.ones(3 * n), atol=1e-5) and torch.allclose(m, m.T, atol=1e-6)
    assert set(across["same_layer_mean"]) == {"0-50", "0-500", "50-500"}
    assert (adm_run / r["figures"]["CKA between blocks across t"]).read_bytes()[:8] == PNG


def test_cka_across_noise_steps_needs_a_noised_read_out(vector_run, capsys):
    message = _cli_error(capsys, ["evaluate", str(vector_run), "--eval.protocols", "similarity",
                                  "--eval.similarity.cka_t", "0,50", "--eval.device", "cpu"])
    assert f"eval.similarity.cka_t: {VECTOR} reads no noised image" in message
