"""Every registered method honours the interface the loop and the evaluation rely on."""

import json

import pytest
import torch
from conftest import tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from genrep.data.augment import AUGMENTATIONS, augmentation_kind
from genrep.errors import GenrepError
from genrep.methods import CAPABILITIES, DataSpec, Method, build_method, get_method
from genrep.data.random_inputs import check_random_spec
from genrep.methods.base import CAPABILITY_API, count_flops_per_image, example_batch
from genrep.train.optim import param_groups

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)


def _build(name):
    torch.manual_seed(0)
    cfg = tiny_config(name)
    return build_method(name, cfg.model, SPEC)


def _batch(method, n=4):
    return example_batch(method, n)  # views, labels and the method's random inputs, as the loop delivers them


def test_declarations(method_name):
    cls = get_method(method_name)
    assert cls.name == method_name
    assert set(cls.capabilities) <= set(CAPABILITIES)
    method = _build(method_name)
    assert method.views() and {augmentation_kind(v) for v in method.views().values()} <= set(AUGMENTATIONS)
    assert method.flops_per_image() > 0
    check_random_spec(method.random_inputs(), list(method.views()))
    assert set(cls.read_options) >= set(cls.feature_options)
    for cap, keys in cls.capability_options.items():
        assert cap in cls.capabilities and set(keys) <= set(cls.read_options)
        assert all(hasattr(method.cfg, k) for k in keys), (cap, keys)
    for cap in cls.capabilities:
        settings = method.capability_settings(cap)
        assert isinstance(settings, dict) and json.dumps(settings)
    counts = method.param_counts()
    assert 0 < counts["trainable"] <= counts["total"]
    assert counts["total"] - counts["trainable"] == sum(
        p.numel() for name in method.frozen_parts for p in getattr(method, name).parameters())


def test_loss_is_a_finite_scalar_with_gradients(method_name):
    method = _build(method_name).train()
    out = method(_batch(method))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_features_every_layer_and_pool(method_name):
    method = _build(method_name).eval()
    x = torch.rand(3, 1, 8, 8)
    for layer in range(1, method.num_layers + 1):
        for pool in method.feature_pools:
            f = method.features(x, layer=layer, pool=pool)
            assert f.shape[0] == 3 and f.ndim == 2 and torch.isfinite(f).all()
    assert method.features(x).shape == method.features(x, layer=None, pool=None).shape
    with pytest.raises(GenrepError, match="does not exist"):
        method.features(x, layer=method.num_layers + 1)
    with pytest.raises(GenrepError, match="not offered"):
        method.features(x, pool="nonsense")


def test_features_do_not_depend_on_the_rest_of_the_batch(method_name):
    method = _build(method_name).eval()
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(method.features(x)[:2], method.features(x[:2]), rtol=1e-4, atol=1e-5)


def test_capabilities_are_callable(method_name):
    method = _build(method_name).eval()
    x = torch.rand(2, 1, 8, 8)
    if "logits" in method.capabilities:
        assert method.logits(x).shape == (2, SPEC.num_classes)
    for cap in method.capabilities:
        api = CAPABILITY_API[cap]
        assert callable(getattr(method, api)), cap
        assert getattr(type(method), api) is not getattr(Method, api, None), f"{cap}: {api} is not implemented"
    if "score" in method.capabilities:
        g = method.grad_log_density(x)
        shape_ok = g.shape == x.shape if method.score_wrt == "pixels" else g.shape[0] == x.shape[0]
        assert shape_ok and torch.isfinite(g).all()
    gen = torch.Generator().manual_seed(0)
    if "sample" in method.capabilities:
        s = method.sample(2, generator=gen)
        assert s.shape == (2, 1, 8, 8) and 0 <= s.min() and s.max() <= 1
    if "complete" in method.capabilities:
        keep = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
        keep[:, :, :4] = True  # the top half given
        out = method.complete(x, keep, generator=gen)
        assert out.shape == x.shape and torch.equal(out[:, :, :4], x[:, :, :4]) and 0 <= out.min() and out.max() <= 1
    if "nll" in method.capabilities:
        bpd = method.nll((x * 255).round() / 255, generator=gen)
        assert bpd.shape == (2,) and torch.isfinite(bpd).all()


def test_flops_match_a_counter(method_name):
    """The FLOPs a method gives (analytic, matmuls only; or counted once where it has no formula) equal
    torch's FLOP counter on the training forward pass.

    The counter does not see the CPU's fused attention kernel, so attention runs on the math path here,
    whose matmuls it counts."""
    method = _build(method_name).eval()
    assert count_flops_per_image(method) == pytest.approx(method.flops_per_image(), rel=0.01)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        method(_batch(method, n=1))
    counted = counter.get_total_flops()
    assert counted > 0
    assert method.flops_per_image() == pytest.approx(counted, rel=0.01)


def test_no_weight_decay_names_exist_and_are_excluded(method_name):
    method = _build(method_name)
    names = dict(method.named_parameters())
    assert method.no_weight_decay() <= set(names)
    decay, _ = param_groups(method, 0.05, method.no_weight_decay())
    decayed = {id(p) for p in decay["params"]}
    for name in method.no_weight_decay():
        assert id(names[name]) not in decayed
    assert all(p.ndim >= 2 for p in decay["params"])


def test_weights_round_trip_through_safetensors(method_name, tmp_path):
    from safetensors.torch import load_file, save_file

    method = _build(method_name)
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, tmp_path / "w.safetensors")
    other = build_method(method_name, tiny_config(method_name).model, SPEC)
    other.load_state_dict(load_file(tmp_path / "w.safetensors"))
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(other.eval().features(x), method.eval().features(x))


def test_size_options_read_trained_weights_at_another_size_or_refuse(method_name):
    """``size_options``: None (the method reads only its trained size), a one-line refusal, or read options under
    which the trained state loads into the model built for 16x16 images and reads them."""
    method, cls = _build(method_name), get_method(method_name)
    try:
        options = cls.size_options(method.cfg, 8, 16)
    except GenrepError as e:
        assert "\n" not in str(e)
        return
    if options is None:
        return
    assert set(options) <= set(cls.read_options)
    cfg = tiny_config(method_name, **{f"model.{k}": v for k, v in options.items()})
    bigger = build_method(method_name, cfg.model, DataSpec(image_size=16, channels=1, num_classes=10))
    bigger.load_state_dict(method.state_dict())
    f = bigger.eval().features(torch.rand(2, 1, 16, 16))
    assert torch.isfinite(f).all() and f.shape == method.eval().features(torch.rand(2, 1, 8, 8)).shape


def test_a_few_steps_reduce_the_loss_on_one_batch(method_name):
    method = _build(method_name).train()
    batch = _batch(method, n=16)
    # rows of one colour: an autoregressive model has something to learn besides memorising i.i.d. noise, whose
    # entropy is a floor no few steps get below
    batch.update({v: batch[v][..., :1].expand_as(batch[v]).contiguous() for v in method.views()})
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    torch.manual_seed(0)
    first = method(batch)["loss"].item()
    for _ in range(30):
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert method(batch)["loss"].item() < 0.7 * first


def test_bad_architecture_is_a_clear_error():
    cfg = tiny_config("supervised", **{"model.patch_size": 3})
    with pytest.raises(GenrepError, match="patch_size 3 does not divide the image size 8"):
        build_method("supervised", cfg.model, SPEC)


def test_training_objective_compiles_to_one_graph(method_name):
    """The CUDA fast path compiles the whole objective; a graph break would split it (and slow it)."""
    method = _build(method_name).train()
    explanation = torch._dynamo.explain(method)(_batch(method))
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1
