"""DARL: the causal property for every ordering and decoder, the orderings, the Beta noise levels, read-outs with and
without the mask, the positional-encoding options, table 2's decoders and gamma conditioning, MAE's initialisation,
appendix F's sampling grid, runs from before issue 27 and bad input."""

import math

import pytest
import torch
from conftest import assert_one_line_error, cli_in_process, one_line, run_cli, tiny_config

from genrep.data.batches import draw_random_inputs
from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method
from genrep.methods.base import example_batch
from genrep.nn.orderings import patch_order
from genrep.nn.patch import patchify

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)
T = 16  # 8x8 images, 2x2 patches: a 4x4 grid
ORDERS = ["raster", "nested", "round_robin", "random"]
# (order, two_stream): every fixed order through one stream, raster through two (figure 6), random (always two)
STREAMS = [(o, False) for o in ORDERS[:3]] + [("raster", True), ("random", False)]
# the denoising decoders of table 2 and the ways they are told gamma
DECODERS = [{}, {"gamma_conditioning": "channel"}, {"gamma_conditioning": "embedding"}, {"decoder_depth": 2},
            {"decoder_net": "mlp", "decoder_depth": 2, "gamma_conditioning": "channel"}]


def _darl(seed=0, **model):
    torch.manual_seed(seed)
    cfg = tiny_config("darl", **{f"model.{k}": v for k, v in model.items()})
    return build_method("darl", cfg.model, SPEC).eval()


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def test_orderings_are_the_papers():
    assert patch_order("raster", 4).tolist() == list(range(16))
    # blocks of 2x2 patches on a 4x4 grid: blocks (0,0) (0,1) (1,0) (1,1), each in raster order
    assert patch_order("nested", 4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    # one patch of each block in turn
    assert patch_order("round_robin", 4, 2).tolist() == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    assert patch_order("nested", 4, 4).tolist() == list(range(16))  # one block: raster
    for kind in ("nested", "round_robin"):
        assert sorted(patch_order(kind, 8, 4).tolist()) == list(range(64))


@pytest.mark.parametrize("order,two_stream", STREAMS)
@pytest.mark.parametrize("decoder", ["mse", "diffusion"])
def test_the_prediction_of_a_patch_reads_only_earlier_patches(order, two_stream, decoder):
    """The backbone row that predicts step k has a zero gradient by the patches at steps k and later, and a non-zero
    one by every earlier patch; the diffusion decoder adds only the patch's own corrupted copy."""
    model = _darl(seed=1, order=order, decoder=decoder, two_stream=two_stream)
    assert model.two_stream == (two_stream or order == "random") == hasattr(model, "query_token")
    batch = example_batch(model, n=1, seed=4)
    steps = batch["order"][0] if order == "random" else model.order
    x = batch["image"].clone().requires_grad_(True)
    z = model.backbone(x, batch.get("order"))
    probe = torch.randn(z.shape[-1])
    for k in range(T):
        (grad,) = torch.autograd.grad((z[0, k] * probe).sum(), x, retain_graph=True)
        reads = patchify(grad, 2)[0].abs().sum(-1) > 0  # [T] in raster order
        assert reads[steps[:k]].all() and not reads[steps[k:]].any(), (order, k)
    if decoder == "diffusion":
        noisy = torch.randn(1, T, 4, requires_grad=True)
        out = model.decode(z.detach(), noisy, torch.rand(1, T))
        (grad,) = torch.autograd.grad((out[0, 5] * torch.randn(4)).sum(), noisy)
        assert (grad[0].abs().sum(-1) > 0).tolist() == [k == 5 for k in range(T)]


def test_noise_levels_are_beta_per_patch_with_the_papers_defaults():
    model = _darl()
    assert model.random_inputs()["gamma"] == ("beta", (0.03, 1.0, (T,)))
    draws = draw_random_inputs(model.random_inputs(), {"image": torch.zeros(20000, 1, 8, 8)}, seed=0, step=0,
                               start=0, total=20000)["gamma"].double()
    a, b = 0.03, 1.0
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert draws.shape == (20000, T)
    assert draws.mean().item() == pytest.approx(mean, rel=0.02)
    assert draws.var().item() == pytest.approx(var, rel=0.03)
    assert not torch.equal(draws[:, 0], draws[:, 1])  # every patch its own level


def test_read_outs_keep_or_drop_the_causal_mask():
    model = _darl()
    x = torch.rand(2, 1, 8, 8)
    x2 = x.clone()
    x2[:, :, 6:, 6:] = torch.rand(2, 1, 2, 2)  # the last patch of the raster order
    assert model.causal_mask
    for layer in (1, 2):
        h, h2 = model._read(x, layer), model._read(x2, layer)
        assert torch.equal(h[:, :-1], h2[:, :-1]) and not torch.equal(h[:, -1], h2[:, -1])
    model.causal_mask = False
    assert not torch.equal(model.features(x, pool="mean"), model.features(x2, pool="mean"))
    assert not torch.equal(model._read(x, 2)[:, 1], model._read(x2, 2)[:, 1])
    reads = [(1, "mean"), (2, "last")]
    for got, (layer, pool) in zip(model.feature_sets(x, reads), reads):
        torch.testing.assert_close(got, model.features(x, layer=layer, pool=pool))


@pytest.mark.parametrize("pos_embed", ["rope2d", "rope1d", "learned", "sincos", "none"])
def test_every_positional_encoding_trains(pos_embed):
    model = _darl(pos_embed=pos_embed).train()
    out = model(example_batch(model, n=3))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert (model.encoder.rope is not None) == pos_embed.startswith("rope")


def test_two_dimensional_rope_sees_the_grid():
    """2D RoPE positions are each patch's (row + 1, col + 1), the start token at (0, 0); 1D, the place in the
    sequence."""
    model = _darl(order="nested")
    pos = model._positions(model.order, True)
    assert pos[0].tolist() == [0, 0] and pos[1:].tolist() == [[int(i) // 4 + 1, int(i) % 4 + 1] for i in model.order]
    assert _darl(pos_embed="rope1d")._positions(model.order, True).tolist() == list(range(T + 1))


@pytest.mark.parametrize("decoder,extra", [("mse", {}), ("mse", {"norm_pix": True}),
                                          ("diffusion", {"prediction": "eps"})] + [("diffusion", d) for d in DECODERS])
def test_flops_are_the_counted_ones(decoder, extra):
    from genrep.methods.base import count_flops_per_image

    model = _darl(decoder=decoder, **extra)
    assert model.flops_per_image() == pytest.approx(count_flops_per_image(model), rel=0.01)


@pytest.mark.parametrize("override,fragment", [
    ({"model.beta_a": 0.0}, "model.beta_a"),
    ({"model.beta_b": -1.0}, "model.beta_b"),
    ({"model.order": "spiral"}, "model.order"),
    ({"model.pos_embed": "alibi"}, "model.pos_embed"),
    ({"model.order": "nested", "model.block": 3}, "does not tile the 4x4 patch grid"),
    ({"model.dim": 36, "model.num_heads": 6}, "must be divisible by 4"),
    ({"model.norm_pix": True}, "norm_pix"),
    ({"model.order": "random", "model.pos_embed": "rope1d"},
     "model.order random: the query stream learns which patch it predicts from its position, and model.pos_embed "
     "rope1d gives it only its place in the sequence, the same whatever the order; choose model.pos_embed rope2d"),
    ({"model.order": "random", "model.pos_embed": "none"}, "model.pos_embed none gives it no position"),
    ({"model.decoder_depth": 9}, "model.decoder_depth must be at least 1 and at most 8, got 9"),
    ({"model.decoder_depth": 0}, "model.decoder_depth must be at least 1"),
    ({"model.decoder_net": "resnet"}, "model.decoder_net 'resnet' is unknown; choose transformer, mlp"),
    ({"model.gamma_conditioning": "film"}, "choose none, channel, embedding"),
    ({"model.init": "kaiming"}, "model.init 'kaiming' is unknown; choose xavier, trunc_normal"),
    ({"model.sample_grid": "log"}, "model.sample_grid 'log' is unknown; choose cosine, linear"),
    ({"model.rope_base": 1.0}, "model.rope_base must be above 1"),
    ({"model.pos_embed": "learned", "model.rope_base": 100.0}, "model.rope_base sets RoPE's frequencies"),
    ({"model.gamma_embedding": True}, "gamma_embedding"),
])
def test_bad_settings_are_one_line_errors(override, fragment):
    with pytest.raises(GenrepError) as e:
        cfg = tiny_config("darl", **override)
        build_method("darl", cfg.model, SPEC)
    assert fragment in one_line(e)


def test_the_random_order_query_stream_costs_a_second_pass():
    """Random order (counted by the FLOP counter: the streams' shapes differ) runs every block twice."""
    fixed, random = _darl(decoder="mse"), _darl(decoder="mse", order="random")
    assert 1.8 * fixed.flops_per_image() < random.flops_per_image() < 2.5 * fixed.flops_per_image()


@pytest.mark.parametrize("order", ["raster", "nested", "round_robin"])
@pytest.mark.parametrize("decoder,sampler", [("mse", "ddim"), ("diffusion", "ddim"), ("diffusion", "ddpm")])
def test_cached_generation_equals_the_uncached_forward_pass(order, decoder, sampler):
    model = _darl(order=order, decoder=decoder, sampler=sampler, sample_steps=4)
    x = torch.rand(2, 1, 8, 8)
    keep = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    keep[:, :, :4] = True  # figure 7: the top half given
    cached = model.generate(x, keep, generator=torch.Generator().manual_seed(0))  # unclamped patches
    completed = model.complete(x, keep, generator=torch.Generator().manual_seed(0))
    model.cfg.cache = False
    uncached = model.generate(x, keep, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-5)
    assert torch.equal(completed[keep.expand_as(x)], x[keep.expand_as(x)])
    assert (completed[~keep.expand_as(x)] != x[~keep.expand_as(x)]).any()
    assert 0 <= completed.min() and completed.max() <= 1


def test_the_patch_embedding_of_a_vector_is_the_images():
    model = _darl(pos_embed="learned")
    x = torch.rand(2, 1, 8, 8)
    vectors = patchify(model.normalize(x), 2)
    torch.testing.assert_close(model._embed_patches(vectors, torch.arange(T)), model._tokens(x, torch.arange(T)))


@pytest.mark.parametrize("decoder", ["mse", "diffusion"])
def test_sampling_and_random_order_models_generate(decoder):
    model = _darl(decoder=decoder, sample_steps=3)
    g = torch.Generator().manual_seed(1)
    images = model.sample(3, generator=g)
    assert images.shape == (3, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    if decoder == "diffusion":  # draws differ image to image
        assert not torch.equal(images[0], images[1])
    random = _darl(decoder=decoder, order="random", sample_steps=3)
    assert random.sample(2, generator=g).shape == (2, 1, 8, 8)
    assert "raster" in random.capability_settings("sample")["order"]


@pytest.mark.parametrize("grid", ["cosine", "linear"])
def test_the_reverse_process_runs_from_noise_to_clean(grid):
    levels = _darl(sample_steps=10, sample_grid=grid).reverse_levels()
    assert levels[0] == 0 and levels[-1] == pytest.approx(1) and (levels.diff() > 0).all()
    if grid == "linear":  # appendix F: step size 1 / sample_steps
        torch.testing.assert_close(levels.diff(), torch.full((10,), 0.1, dtype=torch.float64))
    else:
        assert levels[1] < 0.1 and levels[-2] > 0.9


@pytest.mark.parametrize("extra", DECODERS[1:])
def test_every_denoising_decoder_trains_and_reads_only_its_own_patch(extra):
    model = _darl(**extra).train()
    out = model(example_batch(model, n=2))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert len(model.decoder_blocks) == extra.get("decoder_depth", 1)
    model.eval()
    z, noisy, gamma = torch.randn(1, T, 32), torch.randn(1, T, 4, requires_grad=True), torch.rand(1, T)
    (grad,) = torch.autograd.grad((model.decode(z, noisy, gamma)[0, 5] * torch.randn(4)).sum(), noisy)
    assert (grad[0].abs().sum(-1) > 0).tolist() == [k == 5 for k in range(T)]


@pytest.mark.parametrize("how", ["none", "channel", "embedding"])
def test_gamma_conditioning(how):
    """none: the decoder never sees gamma; channel (section 4.1): gamma is one more channel of the corrupted patch,
    at every pixel in patchify's (p, p, C + 1) layout, through the patch's linear projection; embedding: a
    sinusoidal embedding and an MLP."""
    model = _darl(gamma_conditioning=how)
    z, noisy = torch.randn(2, T, 32), torch.randn(2, T, 4)
    low, high = model.decode(z, noisy, torch.full((2, T), 0.1)), model.decode(z, noisy, torch.full((2, T), 0.9))
    assert torch.equal(low, high) == (how == "none")
    assert (model.gamma_embed is not None) == (how == "embedding")
    assert model.noisy_embed.in_features == (4 + 4 if how == "channel" else 4)  # 2x2 patches of one channel
    if how == "channel":
        gamma = torch.rand(2, T)
        w = model.noisy_embed.weight.view(32, 4, 2)  # [D, pixel, (grey, gamma)]
        direct = noisy @ w[:, :, 0].T + gamma[..., None] * w[:, :, 1].sum(1) + model.noisy_embed.bias
        seen = []
        model.noisy_embed.register_forward_hook(lambda m, i, o: seen.append(o))
        model.decode(z, noisy, gamma)
        torch.testing.assert_close(seen[0], direct)


def _xavier_bound(w):
    return math.sqrt(6 / (w.shape[0] + w[0].numel()))


@pytest.mark.parametrize("decoder", ["mse", "diffusion"])
def test_initialisation_is_maes_or_the_old_trunc_normal(decoder):
    """xavier (table 8, MAE's code): every Linear Xavier-uniform with a zero bias, the patch embedding Xavier on its
    flattened weight, LayerNorms 1 and 0; trunc_normal: the draws of the code before issue 27, bit for bit."""
    extra = {"gamma_conditioning": "embedding"} if decoder == "diffusion" else {}
    model = _darl(decoder=decoder, order="random", pos_embed="learned", **extra)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 4
    for m in linears:
        bound = _xavier_bound(m.weight)
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound and not m.bias.any()
    conv = model.encoder.patch_embed.proj.weight
    bound = _xavier_bound(conv.flatten(1))
    assert 0.8 * bound < conv.abs().max() <= bound
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
        assert (norm.weight == 1).all() and not norm.bias.any()
    for token in (model.encoder.cls_token, model.query_token, model.encoder.pos_embed.pos):
        assert 0 < token.std() < 0.04
    # state-dict sums of the pre-issue-27 code (seed 0, tiny config; gamma embedded), recorded before the change
    old = _darl(decoder=decoder, init="trunc_normal", **extra)
    total = sum(v.double().sum().item() for v in old.state_dict().values())
    assert total == pytest.approx(242.8668648144286 if decoder == "diffusion" else 146.38132370945823, abs=1e-9)
    qkv = old.encoder.blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx(0.02, rel=0.1)


def test_a_run_from_before_issue_27_loads_and_reads_as_it_trained(tmp_path):
    """Its config (version 2: gamma_embedding, no init) migrates to what it meant; its one decoder block's weights
    (decoder_block.*) load into decoder_blocks.0."""
    import yaml

    from genrep.config import load_config_file

    cfg = tiny_config("darl").to_dict()
    for told, meant in ((True, "embedding"), (False, "none")):
        model = {k: v for k, v in cfg["model"].items() if k not in ("gamma_conditioning", "init")}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({**cfg, "config_version": 2,
                                                              "model": {**model, "gamma_embedding": told}}))
        loaded = load_config_file(tmp_path / "config.yaml").model
        assert (loaded.gamma_conditioning, loaded.init) == (meant, "trunc_normal")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))  # today's: unchanged
    assert load_config_file(tmp_path / "config.yaml").model.init == "xavier"
    new = _darl(gamma_conditioning="embedding", init="trunc_normal")
    old_names = {k.replace("decoder_blocks.0.", "decoder_block."): v for k, v in new.state_dict().items()}
    assert any(k.startswith("decoder_block.") for k in old_names)
    fresh = _darl(seed=5, gamma_conditioning="embedding", init="trunc_normal")
    fresh.load_state_dict(old_names)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(fresh.features(x), new.features(x), rtol=0, atol=0)


def test_a_two_stream_fixed_order_model_generates_without_a_cache():
    model = _darl(two_stream=True, sample_steps=2, sampler="ddpm", sample_grid="linear")
    assert model.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)
    assert "without a cache" in model.capability_settings("sample")["cache"]
    assert model.capability_settings("sample")["sample_grid"] == "linear"
    assert "query_token" in model.no_weight_decay()


def test_the_rope_base_reaches_every_attention():
    assert _darl().encoder.rope.base == 10000.0
    model = _darl(rope_base=100.0)
    assert model.encoder.rope.base == 100.0
    x = torch.rand(2, 1, 8, 8)
    assert not torch.equal(model.features(x), _darl().features(x))


def test_rope_positions_interpolate_to_the_trained_grid():
    """Weights trained on a 4x4 patch grid read a 8x8 grid (16x16 images) with positions scaled into the trained
    range (model.rope_grid 4): patch (r, c) at ((r + 1) / 2, (c + 1) / 2)."""
    small = _darl()
    big_cfg = tiny_config("darl", **{"model.rope_grid": 4})
    big = build_method("darl", big_cfg.model, DataSpec(image_size=16, channels=1, num_classes=10)).eval()
    big.load_state_dict(small.state_dict())  # RoPE has no weights: the same state on any grid
    pos = big._positions(big.order, True)
    assert pos[0].tolist() == [0, 0] and pos[-1].tolist() == [4.0, 4.0] and pos[1].tolist() == [0.5, 0.5]
    assert torch.isfinite(big.features(torch.rand(2, 1, 16, 16))).all()
    assert "rope_grid" in type(big).read_options
    same = build_method("darl", tiny_config("darl", **{"model.rope_grid": 4}).model, SPEC)
    assert torch.equal(same._positions(same.order, True), small._positions(small.order, True))
    with pytest.raises(GenrepError) as e:
        build_method("darl", tiny_config("darl", **{"model.rope_grid": 4, "model.pos_embed": "learned"}).model, SPEC)
    assert "rope_grid interpolates RoPE positions" in one_line(e)
    darl = type(small)
    assert darl.size_options(small.cfg, 8, 16) == {"rope_grid": 4}  # the trained 4x4 grid
    assert darl.size_options(big_cfg.model, 16, 32) == {"rope_grid": 4}  # trained interpolated: the same range
    assert darl.size_options(_darl(pos_embed="none").cfg, 8, 16) == {}


@pytest.mark.slow
def test_a_run_is_probed_at_another_image_size(tmp_path):
    """genrep probe RUN --data.image_size N: both splits resized, RoPE positions interpolated to the trained grid
    (section 3.4), the features cached apart from the trained size's, and the size in probe.json; a model whose
    positions are absolute, another method, or a size off the patch grid is refused in one line, before any work."""
    import json

    from genrep.eval.evaluate import run_probes
    from genrep.eval.report.summary import probe_table
    from genrep.train.loop import pretrain

    run = tmp_path / "darl"
    pretrain(tiny_config("darl", **{"train.steps": 2}), run)
    native = run_probes(run, progress=False)
    assert native["image_size"] == 8 and "trained_image_size" not in native and native["rope_grid"] == 0
    at16 = run_probes(run, progress=False, image_size=16)
    assert (at16["image_size"], at16["trained_image_size"], at16["rope_grid"]) == (16, 8, 4)
    assert json.loads((run / "results" / "probe.json").read_text()) == at16
    assert "read at 16x16 (trained at 8x8)" in probe_table(at16)
    cached = sorted(p.name for p in (run / "cache").iterdir())
    assert any("rope_grid4" in n and "-at16px-" in n for n in cached)
    assert any("rope_grid0" in n and "-at" not in n for n in cached)
    assert run_probes(run, progress=False, image_size=16, options={"rope_grid": 8})["rope_grid"] == 8  # given wins
    assert "trained_image_size" not in run_probes(run, progress=False, image_size=8)

    # the first refusal as a user meets it, in a fresh interpreter; the others through the same main() in this one
    # (a fresh interpreter per command was most of the test's time)
    proc = run_cli("probe", str(run), "--data.image_size", "15")
    assert_one_line_error(proc, "data.image_size 15 is not a multiple of model.patch_size 2")
    proc = cli_in_process("probe", str(run), "--data.image_size", "4096")
    assert_one_line_error(proc, "data.image_size must be an integer from 1 to 1024", "got 4096")
    proc = cli_in_process("evaluate", str(run), "--data.image_size", "16")
    assert_one_line_error(proc, "got data.image_size; genrep probe RUN --data.image_size N reads a run at another size")
    learned = tmp_path / "learned"
    pretrain(tiny_config("darl", **{"train.steps": 1, "model.pos_embed": "learned"}), learned)
    proc = cli_in_process("probe", str(learned), "--data.image_size", "16")
    assert_one_line_error(proc, "model.pos_embed learned gives absolute positions on the 4x4 patch grid of the trained "
                                "8x8 images")
    genvit = tmp_path / "genvit"
    pretrain(tiny_config("genvit", **{"train.steps": 1}), genvit)
    proc = cli_in_process("probe", str(genvit), "--data.image_size", "16")
    assert_one_line_error(proc, "a trained genvit run reads only images of the size it was trained on (8x8), not "
                                "16x16; of genrep's methods, darl and supervised can read other sizes")
    assert not (learned / "results").exists() and not (genvit / "results").exists()


def test_the_ablation_script_refuses_bad_input_before_any_work(tmp_path, capsys):
    """benchmarks/darl_ablation.py checks its variants, seeds and every variant's config before the first run."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "darl_ablation.py"
    spec = importlib.util.spec_from_file_location("darl_ablation", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "runs"
    for argv, fragment in ((["--variants", "paper,bogus"], "unknown variant bogus in --variants; choose from paper"),
                           (["--seeds", "0,x"], "--seeds takes comma-separated integers, got '0,x'"),
                           (["--model.order", "random", "--model.pos_embed", "rope1d"], "model.order random")):
        assert script.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("genrep: error: ") and fragment in err and err.count("\n") == 1
    assert not out.exists()
