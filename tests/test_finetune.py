"""Fine-tuning (genrep.eval.protocols.finetune) and low-shot transfer (genrep.eval.protocols.lowshot): tiny
models, digits."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types

import pytest
import torch
from conftest import one_line, tiny_config

from genrep.data.datasets import load_dataset
from genrep.data.imageset import ImageSet
from genrep.errors import GenrepError
from genrep.eval.metrics.probes import linear_probe
from genrep.eval.protocols.finetune import FinetuneSettings, finetune, finetune_kwargs, layer_ids
from genrep.eval.protocols.lowshot import low_shot, stratified_subset
from genrep.runs import build_for_data

# from scratch a tiny ViT learns digits slowly: 5 epochs reach 0.37-0.46 test accuracy over init seeds 0-3
FAST = dict(epochs=5, lr=2e-3, batch_size=32, augment="none", warmup_epochs=0.5)


# tiny problems: on a shared 2-core machine intra-op threads mostly wait on each other
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train", image_size=8), load_dataset("digits", "test", image_size=8)


def _build(name: str, train: ImageSet, **overrides):
    torch.manual_seed(0)  # the initial weights must not depend on which tests ran before
    return build_for_data(tiny_config(name, **overrides), train).eval()


def _subset(s: ImageSet, n: int) -> ImageSet:
    return ImageSet(images=s.images[:n], labels=s.labels[:n], classes=s.classes, name=s.name)


# ----------------------------------------------------------------------------------------------- finetune
def test_finetune_learns_and_leaves_the_method_alone(digits):
    train, test = digits
    method = _build("hybvit", train)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.random.get_rng_state()
    r = finetune(method, train, test, **FAST)
    assert r["test_acc"] > 0.2  # chance is 0.10
    assert 0.0 <= r["test_ece"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0 and math.isfinite(r["train_loss"])
    assert r["layer"] == method.check_feature_args(None, None)[0] and r["pool"] == method.default_pool
    assert (r["n_train"], r["n_test"], r["epochs"], r["causal"]) == (len(train), len(test), 5, None)
    assert r["steps"] == 5 * math.ceil(len(train) / 32)
    json.dumps(r)
    # the caller's model: same weights, same mode, and their global RNG not advanced
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
    assert not method.training
    assert torch.equal(rng, torch.random.get_rng_state())


def test_finetune_is_deterministic_for_a_seed(digits):
    train, test = digits
    train, test = _subset(train, 256), _subset(test, 128)
    method = _build("supervised", train, **{"model.drop": 0.1})  # dropout and augmentation both seeded
    kw = dict(epochs=1, lr=1e-3, batch_size=64, augment="strong", label_smoothing=0.1, layer=1, pool="mean")
    a, b = finetune(method, train, test, seed=3, **kw), finetune(method, train, test, seed=3, **kw)
    c = finetune(method, train, test, seed=4, **kw)
    drop = {"seconds"}
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert (a["train_loss"], a["test_ece"]) != (c["train_loss"], c["test_ece"])
    assert (a["layer"], a["pool"]) == (1, "mean")


def test_causal_mask_protocol(digits):
    train, test = digits
    train, test = _subset(train, 64), _subset(test, 32)
    method = _build("supervised", train)
    for causal, verb in ((False, "off"), (True, "on")):
        with pytest.raises(GenrepError) as e:
            finetune(method, train, test, epochs=1, causal=causal)
        assert f"supervised has no causal mask to switch {verb}; causal applies to causal methods (" \
            in one_line(e)
    with pytest.raises(GenrepError) as e:
        finetune(method, train, test, epochs=1, causal="no")
    assert "causal must be True, False or None" in one_line(e)
    # a method that declares a causal mask (Method.causal_readout): fine-tuning switches it on the copy only
    method.causal_readout = True
    method.causal_mask = True
    assert finetune(method, train, test, epochs=1, causal=False)["causal"] is False
    assert finetune(method, train, test, epochs=1)["causal"] is True
    assert method.causal_mask is True


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(epochs=1.5), "epochs must be an integer >= 1"),
    (dict(lr=0.0), "lr must be a number > 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(label_smoothing=1.0), "label_smoothing must be a number >= 0 and < 1"),
    (dict(augment="heavy"), "unknown augmentation 'heavy'"),
    (dict(layer=99), "layer 99 does not exist"),
    (dict(pool="max"), "pooling 'max' is not offered"),
])
def test_finetune_rejects_bad_settings(digits, kwargs, fragment):
    train, test = digits
    method = _build("supervised", train)
    with pytest.raises(GenrepError) as e:
        finetune(method, train, test, **kwargs)
    assert fragment in one_line(e)


def test_finetune_rejects_bad_sets(digits):
    train, test = digits
    method = _build("supervised", train)
    empty = ImageSet(images=train.images[:0], labels=train.labels[:0], classes=train.classes, name="empty")
    with pytest.raises(GenrepError) as e:
        finetune(method, empty, test)
    assert "train_set (empty) is empty" in one_line(e)
    big = ImageSet(images=torch.zeros(4, 1, 16, 16, dtype=torch.uint8),
                   labels=torch.zeros(4, dtype=torch.long), classes=train.classes, name="big")
    with pytest.raises(GenrepError) as e:
        finetune(method, train, big)
    assert "load it with image_size=8" in one_line(e)
    with pytest.raises(GenrepError) as e:
        finetune(method, train.images, test)
    assert "must be a genrep ImageSet" in one_line(e)


def test_finetune_reports_divergence(digits):
    train, test = digits
    method = _build("supervised", train)
    with pytest.raises(GenrepError) as e:
        finetune(method, _subset(train, 64), _subset(test, 32), epochs=1, lr=1e30, clip_grad=0)
    assert "fine-tuning diverged" in one_line(e)


# ----------------------------------------------------------------------------------------------- MAE's recipe
MAE_KEYS = dict(blr=5e-4, min_lr=1e-6, warmup_epochs=0.5, weight_decay=0.05, betas=(0.9, 0.999), clip_grad=0.0,
                layer_decay=0.65, drop_path=0.1, augment="crop", crop_scale=0.08, randaug_ops=2, randaug_magnitude=27,
                randaug_mstd=1.5, randaug_policy="timm", mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5,
                erase_prob=0.25, label_smoothing=0.1, readout="fc_norm")


@pytest.fixture(scope="module")
def gvp(digits):
    return _build("gvp", digits[0])


def test_layer_ids_are_maes_and_the_groups_scale_the_lr(digits, gvp):
    from genrep.train.optim import layer_decay_groups

    ids = layer_ids(gvp, gvp)
    assert {n for n, i in ids.items() if i == 0} == {"cls_token", "query_token", "patch_embed.proj.weight",
                                                     "patch_embed.proj.bias", "pos_embed.pos"}
    assert ids["net.blocks.0.attn.qkv.weight"] == 1 and ids["net.blocks.1.mlp.fc2.bias"] == 2
    assert ids["net.norm.weight"] == ids["head.weight"] == 3  # after the blocks: depth + 1
    darl = _build("darl", digits[0])
    darl_ids = layer_ids(darl, darl, "")
    assert darl_ids["encoder.cls_token"] == darl_ids["encoder.patch_embed.proj.weight"] == 0
    assert darl_ids["encoder.blocks.1.norm1.weight"] == 2 and darl_ids["encoder.norm.bias"] == 3
    groups = layer_decay_groups(gvp, 0.05, {"cls_token"}, ids.__getitem__, 3, 0.5)
    for g in groups:
        assert g["lr_scale"] == 0.5 ** (3 - g["layer"])  # MAE: decay ** (num_layers + 1 - layer_id)
        names = {n for n, p in gvp.named_parameters() if any(p is q for q in g["params"])}
        assert {ids[n] for n in names} == {g["layer"]}
        assert (g["weight_decay"] == 0) == all(gvp.get_parameter(n).ndim <= 1 or n == "cls_token" for n in names)
    assert sum(len(g["params"]) for g in groups) == len(ids)


def test_maes_recipe_trains_and_records_every_setting(digits, gvp):
    train, test = digits
    before = [b.drop_path.rate for b in gvp.net.blocks]
    r = finetune(gvp, _subset(train, 96), _subset(test, 32), epochs=1, batch_size=32, causal=False, **MAE_KEYS)
    assert r["lr"] == 5e-4 * 32 / 256 and r["blr"] == 5e-4
    assert r["drop_path_rates"] == pytest.approx([0.0, 0.1])  # timm's ramp, on the copy only
    assert [b.drop_path.rate for b in gvp.net.blocks] == before
    for key, value in MAE_KEYS.items():
        assert r[key] == (list(value) if key == "betas" else value), key
    assert math.isfinite(r["train_loss"]) and r["steps"] == 3
    json.dumps(r)
    # every key of eval.finetune reaches finetune() through the protocol (layer and pool beside the rest)
    fields = {f.name for f in dataclasses.fields(FinetuneSettings)}
    ctx = types.SimpleNamespace(ev=types.SimpleNamespace(finetune=FinetuneSettings()), cfg=types.SimpleNamespace(
        model=types.SimpleNamespace(augment="weak")))
    kwargs = finetune_kwargs(ctx)
    assert set(kwargs) | {"layer", "pool"} == fields and set(kwargs) <= set(inspect.signature(finetune).parameters)
    assert set(kwargs) <= set(r)  # and each is recorded


def test_mixing_is_timms_batch_mixup(digits):
    from genrep.eval.protocols.finetune import _mixing

    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8)
    g = torch.Generator().manual_seed(0)
    mixed, target = _mixing(10, 0.8, 0.0, 1.0, 0.5)(x, y, g)  # Mixup only, every batch
    lam = target[0, 0]
    assert 0 < lam < 1 and torch.allclose(target.sum(1), torch.ones(8))
    torch.testing.assert_close(mixed[0], lam * x[0] + (1 - lam) * x[1])
    cut, target = _mixing(10, 0.0, 1.0, 1.0, 0.5)(x, y, g)  # CutMix only: pasted boxes, the kept area as lambda
    kept = (cut == x).flatten(1).float().mean(1)
    torch.testing.assert_close(target[torch.arange(8), y], kept)
    assert _mixing(10, 0.0, 0.0, 1.0, 0.5) is None


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(lr=1e-3, blr=5e-4), "lr 0.001 and blr 0.0005 are both set; set one and the other null"),
    (dict(layer_decay=0.0), "layer_decay must be a number > 0 and <= 1"),
    (dict(layer_decay=1.5), "layer_decay must be a number > 0 and <= 1"),
    (dict(randaug_ops=2, randaug_magnitude=31), "RandAugment magnitude must be in 0..30"),
    (dict(betas=(0.9,)), "betas must be two numbers in [0, 1)"),
    (dict(readout="cls"), "unknown fine-tuning readout 'cls'"),
    (dict(erase_prob=1.5), "erase_prob must be a number >= 0 and <= 1"),
])
def test_maes_keys_refuse_bad_values_in_one_line(digits, gvp, kwargs, fragment):
    train, test = digits
    with pytest.raises(GenrepError) as e:
        finetune(gvp, train, test, **kwargs)
    assert fragment in one_line(e)


def test_layer_decay_and_drop_path_need_numbered_blocks(digits):
    vq = _build("vq", digits[0])
    for kwargs, key in ((dict(layer_decay=0.75), "layer_decay"), (dict(drop_path=0.1), "drop_path")):
        with pytest.raises(GenrepError) as e:
            finetune(vq, digits[0], digits[1], **kwargs)
        assert f"{key} needs a stack of 1 transformer blocks" in one_line(e)


# the papers' fine-tuning in the recipes (DARL table 9's ViT-L column, MAE's FINETUNE.md ViT-B for GVP)
_DARL = dict(layer_decay=0.75, betas=[0.9, 0.95], weight_decay=0.05, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
             randaug_ops=2, randaug_magnitude=27.0, randaug_mstd=1.5, randaug_policy="timm", warmup_epochs=5.0,
             blr=1e-3, lr=None, readout="linear", pool="last", causal=False)
_GVP = dict(layer_decay=0.65, betas=[0.9, 0.999], weight_decay=0.05, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
            randaug_ops=2, randaug_magnitude=27.0, randaug_mstd=1.5, randaug_policy="timm", warmup_epochs=5.0,
            blr=5e-4, lr=None, drop_path=0.1, epochs=100, erase_prob=0.25, min_lr=1e-6, clip_grad=0.0,
            readout="fc_norm", pool="mean", causal=False, augment="crop", crop_scale=0.08)


@pytest.mark.parametrize("recipe, expected", [
    ("darl-mse-imagenet", {**_DARL, "epochs": 90, "drop_path": 0.1, "batch_size": 4096}),
    ("darl-diff-imagenet", {**_DARL, "epochs": 90, "drop_path": 0.1, "batch_size": 4096}),
    ("darl-mse-cifar10", {**_DARL, "epochs": 90, "drop_path": 0.0, "batch_size": 512}),
    ("darl-diff-cifar10", {**_DARL, "epochs": 90, "drop_path": 0.0, "batch_size": 512}),
    ("gvp-p2p-imagenet", {**_GVP, "batch_size": 1024}),
    ("gvp-p2d-imagenet", {**_GVP, "batch_size": 1024}),
    ("gvp-d2d-imagenet", {**_GVP, "batch_size": 1024}),
    ("gvp-p2p-cifar10", {**_GVP, "batch_size": 512}),
    ("gvp-p2d-cifar10", {**_GVP, "batch_size": 512}),
])
def test_recipes_carry_the_papers_fine_tuning(recipe, expected):
    from genrep.config import resolve_config

    s = resolve_config(recipe).eval.finetune
    for key, value in expected.items():
        assert getattr(s, key) == value, key


# ----------------------------------------------------------------------------------------------- subsets
def test_stratified_subset_sizes_classes_and_seeds(digits):
    labels = digits[0].labels
    counts = torch.bincount(labels)
    for fraction in (0.01, 0.05, 0.1, 1.0):
        idx = stratified_subset(labels, fraction, seed=0)
        expected = [max(1, math.floor(fraction * int(n) + 0.5)) for n in counts]
        assert torch.bincount(labels[idx], minlength=10).tolist() == expected
        assert idx.dtype == torch.long and torch.equal(idx, idx.unique())  # sorted, no repeats
    assert torch.equal(stratified_subset(labels, 0.05, 1), stratified_subset(labels, 0.05, 1))
    assert not torch.equal(stratified_subset(labels, 0.05, 1), stratified_subset(labels, 0.05, 2))
    small, large = stratified_subset(labels, 0.01, 3), stratified_subset(labels, 0.1, 3)
    assert set(small.tolist()) <= set(large.tolist())  # nested for one seed
    # at least one per class, even where fraction * n_c rounds to 0; a missing class is simply absent
    skewed = torch.tensor([0] * 100 + [1] * 3 + [3] * 1)
    assert torch.bincount(skewed[stratified_subset(skewed, 0.1, 0)], minlength=4).tolist() == [10, 1, 0, 1]


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_stratified_subset_rejects_bad_fractions(fraction):
    with pytest.raises(GenrepError) as e:
        stratified_subset(torch.arange(10) % 2, fraction, 0)
    assert "fraction must be a number in (0, 1]" in one_line(e)


def test_stratified_subset_rejects_bad_labels():
    bad = (torch.rand(5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), [1, 2])
    for labels in bad:
        with pytest.raises(GenrepError) as e:
            stratified_subset(labels, 0.5, 0)
        one_line(e)


# ----------------------------------------------------------------------------------------------- low-shot
def test_low_shot_linear_on_method_features(digits):
    train, test = digits
    method = _build("hybvit", train)
    r = low_shot(method, train, test, fractions=(0.05, 0.1), seeds=(0, 1, 2))
    assert r["readout"] == "linear" and r["seeds"] == [0, 1, 2] and set(r["fractions"]) == {"0.05", "0.1"}
    for key, f in r["fractions"].items():
        accs = torch.tensor([p["acc"] for p in f["per_seed"]], dtype=torch.float64)
        eces = torch.tensor([p["ece"] for p in f["per_seed"]], dtype=torch.float64)
        assert [p["seed"] for p in f["per_seed"]] == [0, 1, 2]
        assert ((eces >= 0) & (eces <= 1)).all() and 0 <= f["ece_mean"] <= 1
        assert f["acc_mean"] == pytest.approx(float(accs.mean()))
        assert f["acc_std"] == pytest.approx(float(accs.std(unbiased=True)))
        assert f["ece_std"] == pytest.approx(float(eces.std(unbiased=True)))
        assert f["n_labels"] == len(stratified_subset(train.labels, float(key), 0))
    assert r["fractions"]["0.1"]["acc_mean"] > 0.15  # chance 0.10; about 0.29 for these untrained features
    json.dumps(r)
    assert not method.training


def test_low_shot_precomputed_features_and_one_seed(digits):
    train, test = digits
    method = _build("supervised", train)
    pixels = (train.images.flatten(1).float() / 255, test.images.flatten(1).float() / 255)
    r = low_shot(method, train, test, fractions=(0.1,), seeds=(7,), features=pixels)
    f = r["fractions"]["0.1"]
    assert f["acc_mean"] > 0.7 and f["acc_std"] == 0.0 and f["ece_std"] == 0.0  # one seed: std reported 0
    assert r["layer"] is None and r["pool"] is None


def test_low_shot_finetune_readout(digits):
    train, test = digits
    method = _build("supervised", train)
    r = low_shot(method, train, _subset(test, 100), fractions=(0.1,), seeds=(0, 1), readout="finetune",
                 finetune_kwargs=dict(epochs=2, lr=3e-3, batch_size=32, augment="none", warmup_epochs=0))
    f = r["fractions"]["0.1"]
    assert r["readout"] == "finetune" and len(f["per_seed"]) == 2 and 0 <= f["ece_mean"] <= 1
    assert "weight_decay" not in r


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(fractions=(0.0,)), "fraction must be a number in (0, 1]"),
    (dict(fractions=(0.1, 1.5)), "fraction must be a number in (0, 1]"),
    (dict(fractions=()), "fractions must be a non-empty list"),
    (dict(seeds=()), "seeds must be a non-empty list"),
    (dict(seeds=(0, 0)), "must not repeat a value"),
    (dict(readout="knn"), "unknown low-shot readout 'knn'"),
    (dict(readout="finetune", features=(torch.zeros(1, 1), torch.zeros(1, 1))), "readout='linear' only"),
    (dict(features=(torch.zeros(3, 4), torch.zeros(3, 4))), "the train features have shape (3, 4)"),
    (dict(finetune_kwargs=dict(epochs=1)), "apply to readout='finetune' only"),
    (dict(readout="finetune", finetune_kwargs=dict(seed=1)), "must not set seed"),
    (dict(readout="finetune", finetune_kwargs=dict(epoch=1)), "unknown keys epoch"),
    (dict(ece_bins=0), "ece_bins must be a positive integer"),
])
def test_low_shot_rejects_bad_settings(digits, kwargs, fragment):
    train, test = digits
    method = _build("supervised", train)
    with pytest.raises(GenrepError) as e:
        low_shot(method, train, test, **kwargs)
    assert fragment in one_line(e)


# ----------------------------------------------------------------------------------------------- probes
def test_linear_probe_returns_test_probabilities():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 5, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 5).float()
    res = linear_probe(x[:40], y[:40], x[40:], y[40:], 3, return_test_probs=True)
    assert res.test_probs.shape == (20, 3) and res.test_probs.device.type == "cpu"
    assert torch.allclose(res.test_probs.sum(1), torch.ones(20))
    assert float((res.test_probs.argmax(1) == y[40:]).double().mean()) == pytest.approx(res.test_acc)
    assert "test_probs" not in res.to_dict() and json.dumps(res.to_dict())
    assert linear_probe(x[:40], y[:40], x[40:], y[40:], 3).test_probs is None
