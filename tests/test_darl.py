"""DARL: the causal property for every ordering and decoder, the orderings, the Beta noise levels, read-outs with and
without the mask, the positional-encoding options and bad input."""

import pytest
import torch
from conftest import assert_one_line_error, one_line, run_cli, tiny_config

from genrep.data.batches import draw_random_inputs
from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method
from genrep.methods.base import example_batch
from genrep.nn.orderings import patch_order
from genrep.nn.patch import patchify

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)
T = 16  # 8x8 images, 2x2 patches: a 4x4 grid
ORDERS = ["raster", "nested", "round_robin", "random"]


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


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("decoder", ["mse", "diffusion"])
def test_the_prediction_of_a_patch_reads_only_earlier_patches(order, decoder):
    """The backbone row that predicts step k has a zero gradient by the patches at steps k and later, and a non-zero
    one by every earlier patch; the diffusion decoder adds only the patch's own corrupted copy."""
    model = _darl(seed=1, order=order, decoder=decoder)
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


@pytest.mark.parametrize("decoder,extra", [("mse", {}), ("mse", {"norm_pix": True}), ("diffusion", {}),
                                          ("diffusion", {"prediction": "eps"}),
                                          ("diffusion", {"gamma_embedding": False})])
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


def test_the_reverse_process_runs_from_noise_to_clean():
    levels = _darl(sample_steps=10).reverse_levels()
    assert levels[0] == 0 and levels[-1] == pytest.approx(1) and (levels.diff() > 0).all()


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

    proc = run_cli("probe", str(run), "--data.image_size", "15")
    assert_one_line_error(proc, "data.image_size 15 is not a multiple of model.patch_size 2")
    proc = run_cli("probe", str(run), "--data.image_size", "4096")
    assert_one_line_error(proc, "data.image_size must be an integer from 1 to 1024", "got 4096")
    proc = run_cli("evaluate", str(run), "--data.image_size", "16")
    assert_one_line_error(proc, "got data.image_size; genrep probe RUN --data.image_size N reads a run at another size")
    learned = tmp_path / "learned"
    pretrain(tiny_config("darl", **{"train.steps": 1, "model.pos_embed": "learned"}), learned)
    proc = run_cli("probe", str(learned), "--data.image_size", "16")
    assert_one_line_error(proc, "model.pos_embed learned gives absolute positions on the 4x4 patch grid of the trained "
                                "8x8 images")
    genvit = tmp_path / "genvit"
    pretrain(tiny_config("genvit", **{"train.steps": 1}), genvit)
    proc = run_cli("probe", str(genvit), "--data.image_size", "16")
    assert_one_line_error(proc, "a trained genvit run reads only images of the size it was trained on (8x8), not "
                                "16x16; of genrep's methods, darl and supervised can read other sizes")
    assert not (learned / "results").exists() and not (genvit / "results").exists()
