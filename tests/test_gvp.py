"""GVP: the permuted fast path equals the direct masked form, the streams depend only on what eq. 11 allows, the
table-10 ablations, read-outs with and without the mask, completion group by group, and bad input."""

import pytest
import torch
from conftest import assert_one_line_error, one_line, run_cli, tiny_config

from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method
from genrep.methods.base import example_batch
from genrep.nn.gvp_masks import fixed_length_boundaries, masks_from_levels, token_levels
from genrep.nn.patch import patchify

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)
T = 16  # 8x8 images, 2x2 patches

# (segmentation, streams): table 4's segmentations, table 10's masked and single-stream rows
VARIANTS = [("mixed", "two"), ("random", "two"), ("fixed", "two"), ("masked", "two"), ("autoregressive", "two"),
            ("autoregressive", "one")]


def _gvp(seed=0, **model):
    torch.manual_seed(seed)
    cfg = tiny_config("gvp", **{f"model.{k}": v for k, v in model.items()})
    return build_method("gvp", cfg.model, SPEC).eval()


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("segmentation,streams", VARIANTS)
@pytest.mark.parametrize("segment_per", ["batch", "sample"])
def test_permuted_fast_path_gives_the_direct_masked_loss(segmentation, streams, segment_per):
    model = dict(segmentation=segmentation, streams=streams, segment_per=segment_per)
    fast, direct = _gvp(**model), _gvp(**model, mask_layout="direct")
    direct.load_state_dict(fast.state_dict())
    batch = example_batch(fast, n=6, seed=3)
    a, b = fast(batch), direct(batch)
    assert torch.isfinite(a["loss"])
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    order, bounds = batch.get("order"), fast.boundaries(batch)
    (pa, la), (pb, lb) = fast.predict(batch["image"], order, bounds), direct.predict(batch["image"], order, bounds)
    assert torch.equal(la.expand_as(lb), lb)
    torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def _input_dependence(model, x, order, bounds):
    """[T, T] bool: prediction of token i (original order) has a gradient by the pixels of token j."""
    x = x.clone().requires_grad_(True)
    pred, _ = model.predict(x, order, bounds)
    rows = []
    for i in range(T):
        (grad,) = torch.autograd.grad(pred[0, i].sum(), x, retain_graph=True)
        rows.append(patchify(grad, 2).abs().sum(-1)[0] > 0)
    return torch.stack(rows)


@pytest.mark.parametrize("segmentation,streams", VARIANTS)
def test_a_prediction_reads_only_earlier_groups_never_its_own_token(segmentation, streams):
    """The query stream of a token (what the loss reads) depends on the tokens of earlier groups (the context
    included) and on no token of its own group or a later one, itself included: for every segmentation."""
    for layout in ("permuted", "direct"):
        model = _gvp(seed=1, segmentation=segmentation, streams=streams, mask_layout=layout)
        batch = example_batch(model, n=1, seed=7)
        order = batch.get("order")
        bounds = model.boundaries(batch)
        depends = _input_dependence(model, batch["image"], order, bounds)
        levels = token_levels(1, T, order, bounds)[0, 1:]
        earlier = levels[None, :] < levels[:, None]
        predicted = levels > 0
        assert torch.equal(depends[predicted], earlier[predicted]), (layout, levels.tolist())
        assert not depends.diagonal()[predicted].any()


@pytest.mark.parametrize("segmentation", ["mixed", "random", "fixed", "masked", "autoregressive"])
def test_the_content_stream_never_reads_a_later_group(segmentation):
    """A token's content-stream output depends on tokens of its own and earlier groups only (eq. 11's M_h), and on
    every one of them; the query stream on strictly earlier groups and the condition."""
    model = _gvp(seed=2, segmentation=segmentation)
    batch = example_batch(model, n=1, seed=5)
    order = batch.get("order")
    levels = token_levels(1, T, order, model.boundaries(batch))
    content, query = masks_from_levels(levels)
    h = torch.randn(1, T + 1, 32, requires_grad=True)
    g = torch.randn(1, T + 1, 32)
    h_out, g_out = model.net(h, g, content_mask=content[:, None], query_mask=query[:, None])
    probe = torch.randn(32)
    for out, allowed in ((h_out, content[0]), (g_out, query[0])):
        for i in range(T + 1):
            # a random read of the row: its plain sum after the final LayerNorm is a constant
            (grad,) = torch.autograd.grad((out[0, i] * probe).sum(), h, retain_graph=True)
            assert torch.equal(grad[0].abs().sum(-1) > 0, allowed[i]), (segmentation, i)


def test_read_outs_keep_the_mask_for_probes_and_drop_it_for_fine_tuning():
    model = _gvp(seed=0, segmentation="fixed", groups=3)
    x = torch.rand(2, 1, 8, 8)
    assert model.causal_mask  # as trained
    masked = model.features(x, pool="map")
    bounds = fixed_length_boundaries(T, 3)  # the read-out's groups: n_0 = 4, then 8, 12, 16
    x2 = x.clone()
    x2[:, :, 6:] = torch.rand(2, 1, 2, 8)  # the last patch row: tokens 12..15, the last group
    changed = model.features(x2, pool="map") - masked
    first_groups = changed.flatten(2)[:, :, :int(bounds[-2])]
    assert first_groups.abs().max() == 0 and changed.abs().max() > 0
    model.causal_mask = False  # fine-tuning's read-out sees every token
    free = model.features(x2, pool="map") - model.features(x, pool="map")
    assert free.flatten(2)[:, :, :12].abs().max() > 0


@pytest.mark.parametrize("segmentation", ["mixed", "random", "fixed", "masked", "autoregressive"])
def test_every_segmentation_builds_on_the_meta_device(segmentation):
    """The loop sizes a model on the meta device before building it: no check may read a tensor's value there."""
    cfg = tiny_config("gvp", **{"model.segmentation": segmentation})
    with torch.device("meta"):
        model = build_method("gvp", cfg.model, SPEC)
    assert model.head.weight.is_meta and model.readout_bounds.device.type == "cpu"


@pytest.mark.parametrize("causal", [True, False])
def test_feature_sets_equal_single_reads(causal):
    model = _gvp()
    model.causal_mask = causal
    x = torch.rand(3, 1, 8, 8)
    reads = [(1, "mean"), (2, "2"), (1, "map")] + ([] if causal else [(2, "cls")])  # cls under the mask: refused
    for got, (layer, pool) in zip(model.feature_sets(x, reads), reads):
        torch.testing.assert_close(got, model.features(x, layer=layer, pool=pool))


def test_cls_under_the_causal_mask_sees_only_the_context_and_is_refused():
    """Item 13 of issue 27: with the probe's mask the CLS token attends to the condition and G_0 only (the first
    floor(T / (K + 1)) = 3 patches), so an edit of the bottom half changes it by exactly 0.0; reading it is one
    line, at the preflight for the default read-out and before the forward pass for an asked one."""
    from genrep.eval.protocols.context import check_causal

    model = _gvp()
    x = torch.rand(2, 1, 8, 8)
    edited = x.clone()
    edited[:, :, 4:] = torch.rand(2, 1, 4, 8)
    with torch.no_grad():
        assert torch.equal(model._content(x, 2)[:, 0], model._content(edited, 2)[:, 0])
        model.causal_mask = False
        assert not torch.equal(model.features(x, pool="cls"), model.features(edited, pool="cls"))
        model.causal_mask = True
        for read in (lambda: model.features(x, pool="cls"), lambda: model.feature_sets(x, [(1, "mean"), (2, "cls")])):
            with pytest.raises(GenrepError) as e:
                read()
            assert one_line(e).startswith("pool cls: under GVP's causal mask the CLS token reads only")
            assert "(the first 3 of 16 patches in raster order)" in one_line(e)
    cls_default = _gvp(feature_pool="cls")
    with pytest.raises(GenrepError) as e:
        check_causal(cls_default, True, "eval.probes.causal")
    assert one_line(e).startswith("eval.probes.causal=True: model.feature_pool cls, the default read-out")
    check_causal(cls_default, False, "eval.probes.causal")  # fine-tuning drops the mask: the CLS token sees all
    check_causal(model, True, "eval.probes.causal")
    # a probe checks its read-out before it switches the mask; its sweep reads the poolings offered once switched
    assert model.check_feature_args(None, "cls") == (2, "cls") and cls_default.check_feature_args(None, None)[1] == "cls"
    assert model.feature_pools == ("mean",)
    model.causal_mask = False
    assert model.feature_pools == ("mean", "cls")


def test_the_query_stream_needs_the_target_position():
    """Item 14 of issue 27: section 4.1's literal start, w alone, gives every token of a group one prediction
    (they attend to the same content keys and values); w plus the target's position tells them apart."""
    model = _gvp(segmentation="fixed")
    x = torch.rand(2, 1, 8, 8)
    pred, levels = model.predict(x, None, model.fixed_bounds[None])
    group = levels[0] == 2
    assert group.sum() >= 2
    assert (pred[:, group] - pred[:, group][:, :1]).abs().amax() > 1e-4
    model._queries = lambda B: model.query_token.expand(B, model.S + model.T, -1)
    literal, _ = model.predict(x, None, model.fixed_bounds[None])
    torch.testing.assert_close(literal[:, group], literal[:, group][:, :1].expand_as(literal[:, group]))


@pytest.mark.parametrize("streams,norm_pix", [("two", False), ("two", True), ("one", False)])
def test_completion_fills_hidden_patches_group_by_group(streams, norm_pix, monkeypatch):
    model = _gvp(streams=streams, norm_pix=norm_pix, segmentation="autoregressive" if streams == "one" else "mixed",
                 complete_groups=3)
    x = torch.rand(2, 1, 8, 8)
    keep = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    keep[:, :, :4] = True        # the top half: 8 tokens given, 8 generated in 3 groups
    keep[1, :, 4:6, :2] = True   # a ninth token given in the second image
    calls = []
    forward = type(model.net).forward if streams == "two" else type(model.net).content
    monkeypatch.setattr(type(model.net), forward.__name__, lambda self, *a, **k: calls.append(1) or forward(
        self, *a, **k))
    out = model.complete(x, keep, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3
    assert out.shape == x.shape and torch.equal(out[keep.expand_as(x)], x[keep.expand_as(x)])
    assert (out[~keep.expand_as(x)] != x[~keep.expand_as(x)]).all() and out.min() >= 0 and out.max() <= 1
    again = model.complete(x, keep, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_completion_of_a_hidden_group_reads_only_given_and_earlier_tokens():
    """With one group the completion is one pass: the hidden patches' pixels do not reach it."""
    model = _gvp(complete_groups=1)
    x = torch.rand(1, 1, 8, 8)
    keep = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    keep[:, :, :, :4] = True
    other = torch.where(keep, x, torch.rand_like(x))
    g = torch.Generator().manual_seed(0)
    a = model.complete(x * keep, keep, generator=g)
    b = model.complete(other, keep, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_the_ablations_cost_what_they_run():
    two, one = _gvp(), _gvp(streams="one", segmentation="autoregressive")
    assert two.flops_per_image() > 1.8 * one.flops_per_image()  # the query stream runs every block again


@pytest.mark.parametrize("override,fragment", [
    ({"model.groups": 99}, "model.groups K = 99 is larger than the 16 tokens"),
    ({"model.groups": 16, "model.segmentation": "random"}, "choose K in 1..15"),
    ({"model.segmentation": "masked", "model.mask_ratio": 0.01}, "leaves at least one token given"),
    ({"model.target": "p2d"}, "pass --model.tokenizer"),
    ({"model.streams": "one"}, "--model.segmentation autoregressive"),
    ({"model.norm_pix": True, "model.target": "d2d", "model.tokenizer": "x"}, "norm_pix normalises pixel targets"),
    ({"model.tokenizer": "runs/vq"}, "model.tokenizer is read only by the p2d and d2d targets"),
    ({"model.vqgan": "x.ckpt"}, "model.vqgan is read only by the p2d and d2d targets"),
    ({"model.target": "p2d", "model.vqgan": "x", "model.tokenizer": "y"}, "tokenizer and model.vqgan both name"),
    ({"model.target": "p2d", "model.vqgan": "x"}, "16x16 pixels (model.vqgan_ch_mult has 5 entries: 4 halvings)"),
    ({"model.target": "p2d", "model.vqgan": "x", "model.vqgan_ch_mult": [1, 2], "model.vqgan_ch": 40},
     "model.vqgan_ch 40 x model.vqgan_ch_mult [1, 2] gives a level of 40 channels"),
])
def test_bad_settings_are_one_line_errors(override, fragment):
    with pytest.raises(GenrepError) as e:
        cfg = tiny_config("gvp", **override)
        build_method("gvp", cfg.model, SPEC)
    assert fragment in one_line(e)


@pytest.mark.slow
def test_bad_settings_stop_before_any_work(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("pretrain", "--recipe", "gvp-digits", "--model.groups", "40", "--out", str(out))
    assert_one_line_error(proc, "model.groups K = 40")
    assert not out.exists()
    proc = run_cli("pretrain", "--recipe", "gvp-p2d-digits", "--model.tokenizer", str(tmp_path / "none"),
                   "--out", str(out))
    assert_one_line_error(proc, "model.tokenizer", str(tmp_path / "none"))
    assert not out.exists()


@pytest.mark.slow
def test_a_frozen_run_conditions_gvp(tmp_path):
    """Appendix E's y_extra: another run's features, projected, are a second condition token; that run is a
    frozen part (no gradient, out of the checkpoint, referenced by sha256)."""
    from genrep.train.loop import pretrain

    pretrain(tiny_config("supervised", **{"train.steps": 2}), tmp_path / "sup")
    model = _gvp(condition=str(tmp_path / "sup")).train()
    assert model.S == 2 and "condition_model" in model.frozen_parts
    batch = example_batch(model, n=3)
    model(batch)["loss"].backward()
    assert model.condition_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.condition_model.parameters())
    assert not any(k.startswith("condition_model.") for k in model.state_dict())
    fast, direct = _gvp(condition=str(tmp_path / "sup")).eval(), _gvp(condition=str(tmp_path / "sup"),
                                                                         mask_layout="direct").eval()
    direct.load_state_dict(fast.state_dict())
    torch.testing.assert_close(fast(batch)["loss"], direct(batch)["loss"])
    with pytest.raises(GenrepError) as e:
        build_method("gvp", tiny_config("gvp", **{"model.condition": str(tmp_path / "sup")}).model,
                     DataSpec(image_size=16, channels=1, num_classes=10))
    assert "trained on 8x8 images" in one_line(e)
    with pytest.raises(GenrepError) as e:
        _gvp(condition=str(tmp_path))
    assert "is not a genrep run (no config.yaml)" in one_line(e)


@pytest.mark.slow
def test_a_condition_run_is_read_without_its_images(tmp_path, monkeypatch):
    """The frozen run's data shape comes from the data registry: building GVP, the memory check's meta build
    included, reads none of its images (they are only needed for fitted state or the npz:/folder: forms)."""
    from genrep import runs
    from genrep.train.loop import pretrain

    pretrain(tiny_config("supervised", **{"train.steps": 1}), tmp_path / "sup")
    cfg = tiny_config("gvp", **{"model.condition": str(tmp_path / "sup")})
    monkeypatch.setattr(runs, "load_dataset", lambda *a, **k: pytest.fail(f"the images of {a} were read"))
    runs.check_model_fits(cfg, SPEC, torch.device("cpu"), training=True)
    with torch.device("meta"):
        assert not build_method("gvp", cfg.model, SPEC).condition_model.head.weight.is_meta  # run for its width
    assert build_method("gvp", cfg.model, SPEC).S == 2


@pytest.mark.slow
def test_a_condition_run_on_the_users_own_files_reads_its_shape_from_them(tmp_path):
    """npz:/folder: sets are not in the registry: the frozen run's training split gives its shape."""
    import numpy as np

    from genrep.data.datasets import load_dataset
    from genrep.train.loop import pretrain

    tr, te = load_dataset("digits", image_size=8), load_dataset("digits", "test", image_size=8)
    np.savez(tmp_path / "d.npz", x_train=tr.images[:64].numpy(), y_train=tr.labels[:64].numpy(),
             x_test=te.images[:16].numpy(), y_test=te.labels[:16].numpy())
    pretrain(tiny_config("supervised", **{"train.steps": 1, "data.name": f"npz:{tmp_path / 'd.npz'}"}), tmp_path / "sup")
    assert _gvp(condition=str(tmp_path / "sup")).S == 2
    with pytest.raises(GenrepError) as e:
        build_method("gvp", tiny_config("gvp", **{"model.condition": str(tmp_path / "sup")}).model,
                     DataSpec(image_size=16, channels=1, num_classes=10))
    assert "was trained on 8x8 images with 1 channel" in one_line(e)


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    from genrep.train.loop import pretrain

    run = tmp_path_factory.mktemp("vq") / "vq"
    pretrain(tiny_config("vq", **{"train.steps": 3}), run)  # 2x2 patches: one code per GVP token
    return str(run)


@pytest.mark.parametrize("target", ["p2d", "d2d"])
def test_code_targets_read_a_frozen_tokenizer(target, tokenizer_run):
    fast = _gvp(target=target, tokenizer=tokenizer_run)
    direct = _gvp(target=target, tokenizer=tokenizer_run, mask_layout="direct")
    direct.load_state_dict(fast.state_dict())
    assert "tokenizer" in fast.frozen_parts and not any(k.startswith("tokenizer.") for k in fast.state_dict())
    batch = example_batch(fast, n=4, seed=1)
    a = fast.train()(batch)
    assert "ce" in a and torch.isfinite(a["loss"])
    torch.testing.assert_close(a["loss"], direct.train()(batch)["loss"], rtol=1e-5, atol=1e-6)
    a["loss"].backward()
    assert all(p.grad is None for p in fast.tokenizer.parameters())
    x = torch.rand(2, 1, 8, 8)
    keep = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    keep[:, :, :, :4] = True
    out = fast.eval().complete(x, keep, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[keep.expand_as(x)], x[keep.expand_as(x)]) and 0 <= out.min() and out.max() <= 1


def test_a_tokenizer_of_another_patch_or_image_size_is_refused(tokenizer_run):
    with pytest.raises(GenrepError) as e:
        _gvp(target="p2d", tokenizer=tokenizer_run, patch_size=4, groups=2)
    assert "one code per 2x2 pixels" in one_line(e)
    with pytest.raises(GenrepError) as e:
        build_method("gvp", tiny_config("gvp", **{"model.target": "p2d", "model.tokenizer": tokenizer_run}).model,
                     DataSpec(image_size=16, channels=1, num_classes=10))
    assert "was trained on 8x8 images" in one_line(e) and tokenizer_run in one_line(e)


def test_results_say_whether_the_causal_mask_was_kept():
    from genrep.eval.report.summary import headline

    probes = {"linear_acc": 0.9, "knn": {"20": 0.8}, "causal": True}
    assert headline("probes", probes).endswith("(causal mask kept)")
    finetune = {"test_acc": 0.95, "test_ece": 0.1, "epochs": 20, "causal": False}
    assert headline("finetune", finetune).endswith("(causal mask off)")
    assert "mask" not in headline("finetune", {**finetune, "causal": None})


# a VQGAN for the digits: 1 channel, one code per 2x2 pixels (GVP's patch), attention at the 4x4 level
VQGAN_KEYS = {"vqgan_n_embed": 16, "vqgan_embed_dim": 8, "vqgan_ch": 32, "vqgan_ch_mult": [1, 2],
              "vqgan_num_res_blocks": 1, "vqgan_attn_resolutions": [4], "vqgan_z_channels": 8, "vqgan_resolution": 8}


@pytest.fixture(scope="module")
def vqgan_file(tmp_path_factory):
    from genrep.methods.gvp import GVPConfig
    from genrep.nn.vqgan import VQGAN

    cfg = GVPConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in VQGAN_KEYS.items()})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vqgan") / "last.ckpt"
    torch.save({"state_dict": VQGAN(cfg.vqgan_arch(1)).state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("target", ["p2d", "d2d"])
def test_a_vqgan_checkpoint_is_the_frozen_tokenizer(target, vqgan_file, monkeypatch):
    from genrep.methods.gvp import GVP
    from genrep.nn.vqgan import VQGAN

    model = _gvp(target=target, vqgan=vqgan_file, **VQGAN_KEYS).train()
    assert isinstance(model.tokenizer, VQGAN) and model.frozen_parts["tokenizer"].sha256
    assert not any(k.startswith("tokenizer.") for k in model.state_dict())
    batch = example_batch(model, n=4, seed=1)
    out = model(batch)
    assert "ce" in out and torch.isfinite(out["loss"]) and model.head.out_features == 16
    out["loss"].backward()
    assert all(p.grad is None for p in model.tokenizer.parameters()) and not model.tokenizer.training
    cfg = tiny_config("gvp", **{"model.target": target, "model.vqgan": vqgan_file,
                                **{f"model.{k}": v for k, v in VQGAN_KEYS.items()}})
    assert not any(k.startswith("vqgan_") for k in GVP.inert_keys(cfg.model))
    assert "vqgan_ch" in GVP.inert_keys(tiny_config("gvp").model)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the checkpoint was read"))
    with torch.device("meta"):
        assert build_method("gvp", cfg.model, SPEC).tokenizer.quant_conv.weight.is_meta
