"""Generation metrics: FID/KID/IS through torchmetrics, the reference cache, and the extractors."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, rng_images
from torch import nn

from genrep.errors import GenrepError
from genrep.eval.metrics.extractors import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    INCEPTION_LABEL,
    INCEPTION_URL,
    custom_extractor,
    dataset_classifier_extractor,
    inception_extractor,
)
from genrep.eval.metrics.generation import feature_statistics, frechet_distance, generation_metrics


def conv_net(channels: int = 3, dim: int = 16, seed: int = 0) -> nn.Module:
    """A small random conv extractor: [B, C, H, W] in [0, 1] -> [B, dim]."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, dim, 3, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


class UniformLogits(nn.Module):
    def forward(self, x):
        return torch.zeros(len(x), 10)


def two_sets(n_fake=120, n_real=150, c=3, size=8):
    fake = torch.from_numpy(rng_images(n_fake, c, size, size, seed=1))
    # the real set is brighter, so FID is clearly > 0
    real = torch.from_numpy(rng_images(n_real, c, size, size, seed=2) // 2 + 100)
    return fake, real


def test_fid_matches_direct_frechet_distance():
    fake, real = two_sets()
    net = conv_net()
    ext = custom_extractor(net, "random conv")
    res = generation_metrics(fake, real, ext, kid_subsets=5, kid_subset_size=50)
    with torch.no_grad():
        ff, fr = net(fake.float() / 255), net(real.float() / 255)
    direct = frechet_distance(*feature_statistics(ff), *feature_statistics(fr))
    assert res["fid"] > 0.01
    assert res["fid"] == pytest.approx(direct, rel=1e-3)
    assert res["extractor"] == "custom: random conv" and res["custom_extractor"] is True
    assert (res["n_fake"], res["n_real"], res["feature_dim"]) == (120, 150, 16)
    # float images in [0, 1] give the same numbers as uint8 ones
    res_f = generation_metrics(fake.float() / 255, real.float() / 255, ext, kid_subsets=5, kid_subset_size=50)
    assert res_f["fid"] == pytest.approx(res["fid"], rel=1e-5) and res_f["kid"] == pytest.approx(res["kid"], rel=1e-4)


def test_identical_sets_give_zero_fid_and_kid():
    x = torch.from_numpy(rng_images(100, 1, 8, 8))
    res = generation_metrics(x, x.clone(), custom_extractor(conv_net(1), "random conv"), kid_subsets=20)
    assert abs(res["fid"]) < 1e-6
    assert abs(res["kid"]) < 1e-3
    assert res["kid_subset_size"] == 100   # clipped from 1000 to the set size
    assert res["inception_score"] is None and "inception_score" in res["skipped"]


def test_kid_and_is_are_seeded_and_is_of_uniform_logits_is_one():
    fake, real = two_sets()
    ext = custom_extractor(conv_net(), "random conv + uniform logits", logits_module=UniformLogits())
    a = generation_metrics(fake, real, ext, kid_subsets=10, kid_subset_size=60)
    b = generation_metrics(fake, real, ext, kid_subsets=10, kid_subset_size=60)
    assert a["kid"] == b["kid"] and a["kid_std"] == b["kid_std"] and a["kid"] > 0
    assert a["inception_score"] == pytest.approx(1.0, abs=1e-9)
    assert a["inception_score_std"] == pytest.approx(0.0, abs=1e-9)
    assert a["skipped"] == {} and a["is_splits"] == 10


def test_reference_cache_reused_only_for_the_same_extractor_and_set(tmp_path, monkeypatch):
    fake, real = two_sets()
    ext = custom_extractor(conv_net(seed=0), "random conv")
    kw = dict(kid_subsets=5, kid_subset_size=50, reference_cache=tmp_path, reference_key="toy-train")
    first = generation_metrics(fake, real, ext, **kw)
    assert first["reference_cached"] is False and len(list(tmp_path.glob("*.safetensors"))) == 1

    calls = []
    orig = ext.features_and_logits
    monkeypatch.setattr(ext, "features_and_logits", lambda x: calls.append(len(x)) or orig(x))
    second = generation_metrics(fake, real, ext, **kw)
    assert second["reference_cached"] is True and sum(calls) == len(fake)   # only the fake images were extracted
    for k in ("fid", "kid", "kid_std"):
        assert second[k] == first[k]

    # same label, different weights: must not reuse; a different real set must not either
    other = generation_metrics(fake, real, custom_extractor(conv_net(seed=1), "random conv"), **kw)
    assert other["reference_cached"] is False and other["fid"] != first["fid"]
    assert generation_metrics(fake, real[:-1], ext, **kw)["reference_cached"] is False
    assert len(list(tmp_path.glob("*.safetensors"))) == 3

    # a corrupt cache file is recomputed, not trusted
    for p in tmp_path.glob("*.safetensors"):
        p.write_bytes(b"garbage")
    again = generation_metrics(fake, real, ext, **kw)
    assert again["reference_cached"] is False and again["fid"] == first["fid"]


@pytest.mark.parametrize("bad, fragment", [
    (lambda f, r: (f[:1], r), "fake has 1 images"),
    (lambda f, r: (f, r[:0]), "real has 0 images"),
    (lambda f, r: (f[:, :1], r), "same channels and size"),
    (lambda f, r: (f[..., :4, :4], r), "same channels and size"),
    (lambda f, r: (f.float(), r), "must lie in [0, 1]"),
    (lambda f, r: (f.float() / 255 * float("nan"), r), "must lie in [0, 1]"),
    (lambda f, r: (f[0], r), "[N, C, H, W]"),
])
def test_bad_inputs_give_one_line_errors(bad, fragment):
    fake, real = two_sets(20, 20)
    with pytest.raises(GenrepError) as e:
        generation_metrics(*bad(fake, real), custom_extractor(conv_net(), "random conv"))
    assert fragment in one_line(e)


def test_bad_extractor_outputs_give_one_line_errors():
    fake, real = two_sets(20, 20)
    with pytest.raises(GenrepError) as e:
        generation_metrics(fake, real, custom_extractor(nn.Identity(), "identity"))
    assert "[B, D]" in one_line(e)
    with pytest.raises(GenrepError) as e:
        generation_metrics(fake, real, custom_extractor(conv_net(channels=1), "one-channel net"))
    assert "failed on a real batch" in one_line(e)
    with pytest.raises(GenrepError) as e:
        generation_metrics(fake, real, conv_net())
    assert "custom_extractor" in one_line(e)
    with pytest.raises(GenrepError) as e:
        custom_extractor(conv_net(), " ")
    one_line(e)


# ------------------------------------------------------------------------------------------------- Inception
def test_missing_inception_weights_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(GenrepError) as e:
        inception_extractor()
    msg = one_line(e)
    assert INCEPTION_FILE in msg and INCEPTION_URL in msg and INCEPTION_ENV in msg and "--eval.inception_weights" in msg
    missing = tmp_path / INCEPTION_FILE
    with pytest.raises(GenrepError) as e:
        inception_extractor(missing)
    assert str(missing) in one_line(e)
    monkeypatch.setenv(INCEPTION_ENV, str(missing))
    with pytest.raises(GenrepError) as e:
        inception_extractor()
    assert str(missing) in one_line(e)


def test_inception_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_URL == URL_INCEPTION_V3


@pytest.mark.parametrize("content", [b"not a checkpoint", "state"])
def test_invalid_inception_weights_file_is_a_one_line_error(tmp_path, monkeypatch, content):
    path = tmp_path / INCEPTION_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    monkeypatch.setenv(INCEPTION_ENV, str(path))
    with pytest.raises(GenrepError) as e:
        inception_extractor()
    assert str(path) in one_line(e) and INCEPTION_FILE in one_line(e)


def _random_inception_weights(path, monkeypatch):
    """A state dict of torch-fidelity's Inception with random weights (the real file cannot be fetched offline)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inc

    with monkeypatch.context() as m:
        m.setattr(tf_inc, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tf_inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tf_inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():  # the default init shrinks activations to ~0 over 90+ layers; keep them alive
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


def _no_download(*a, **k):
    raise AssertionError("tried to download")


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    with pytest.MonkeyPatch.context() as m:
        _random_inception_weights(path, m)
    return path


@pytest.fixture(scope="module")
def random_inception(random_inception_file):
    """inception_extractor over a random-weight file, built with downloading made impossible."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inc

    with pytest.MonkeyPatch.context() as m:
        m.setattr(tf_inc, "load_state_dict_from_url", _no_download)
        return inception_extractor(random_inception_file)


class _Payload:
    """Unpickled without weights_only, this touches ``marker``: the stand-in for code in a weights file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_inception_weights_file_with_code_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / INCEPTION_FILE, tmp_path / "code-ran"
    torch.save({"fc.weight": _Payload(marker)}, path)
    with pytest.raises(GenrepError) as e:
        inception_extractor(path)
    assert str(path) in one_line(e) and INCEPTION_FILE in one_line(e) and not marker.exists()


def test_torch_fidelity_never_loads_the_inception_file_itself(random_inception, random_inception_file, tmp_path,
                                                             monkeypatch):
    """The file is swapped for one carrying code right after genrep's safe read: the code must not run, and
    the network must hold the tensors genrep read (torch-fidelity reloaded the path with weights_only=False)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inc

    path, marker = tmp_path / INCEPTION_FILE, tmp_path / "code-ran"
    shutil.copyfile(random_inception_file, path)
    real_load, calls = torch.load, []

    def load(f, *a, **k):
        calls.append((f, k.get("weights_only")))
        out = real_load(f, *a, **k)
        if isinstance(f, (str, os.PathLike)) and Path(f) == path:
            torch.save({"fc.weight": _Payload(marker)}, path)
        return out

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(tf_inc, "load_state_dict_from_url", _no_download)
    ext = inception_extractor(path)
    assert not marker.exists()
    assert [(Path(f), w) for f, w in calls if isinstance(f, (str, os.PathLike))] == [(path, True)]
    assert ext.fingerprint() == random_inception.fingerprint()
    x = torch.from_numpy(rng_images(2, 3, 8, 8)).float() / 255
    with torch.no_grad():
        assert torch.equal(ext(x), random_inception(x))
    real_load(path, weights_only=False)  # the swapped file really does run code when unpickled freely
    assert marker.exists()


def test_inception_extractor_loads_a_local_file(random_inception):
    ext = random_inception
    assert ext.label == INCEPTION_LABEL and not ext.is_custom and ext.has_logits and ext.input_shape is None
    assert not ext.training and not ext.net.training


@pytest.mark.slow
def test_inception_metrics_with_random_weights(random_inception):
    ext = random_inception
    x = torch.from_numpy(rng_images(3, 1, 8, 8))          # grey, tiny: repeated to RGB and resized to 299
    with torch.no_grad():
        f, lg = ext.features_and_logits(x.float() / 255)
        rgb = ext(x.expand(-1, 3, -1, -1).float() / 255)
    assert f.shape == (3, 2048) and lg.shape == (3, 1008) and torch.isfinite(f).all()
    assert (f[0] - f[1]).abs().max() > 1e-3 * f.abs().max()          # features depend on the image
    assert torch.allclose(f, rgb)                                    # grey = the same image as explicit RGB
    res = generation_metrics(x, torch.from_numpy(rng_images(2, 1, 8, 8, seed=5)), ext, is_splits=2)
    assert res["extractor"] == INCEPTION_LABEL and res["custom_extractor"] is False
    assert res["fid"] > 0 and res["inception_score"] > 1 and res["kid_subset_size"] == 2


# ------------------------------------------------------------------------------------------------- data-set CNN
def test_dataset_classifier_extractor_on_digits(tmp_path, monkeypatch):
    from genrep.data.datasets import load_dataset
    from genrep.eval.metrics import extractors

    train = load_dataset("digits", "train", image_size=8)
    test = load_dataset("digits", "test", image_size=8)
    t0 = time.perf_counter()
    ext = dataset_classifier_extractor(train, test, cache_dir=tmp_path, epochs=10)
    first = time.perf_counter() - t0
    assert ext.test_accuracy > 0.8
    assert ext.label.startswith("custom: digits-cnn classifier (10 epochs, test acc ") and ext.is_custom
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    trained = []
    orig_train = extractors._train
    monkeypatch.setattr(extractors, "_train", lambda *a, **k: trained.append(1) or orig_train(*a, **k))
    t0 = time.perf_counter()
    again = dataset_classifier_extractor(train, test, cache_dir=tmp_path, epochs=10)
    assert not trained and time.perf_counter() - t0 < max(1.0, first)    # loaded, not retrained
    assert again.label == ext.label
    for a, b in zip(ext.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    # real test digits vs real train digits: small FID; vs noise: large; IS of real digits is well above 1
    noise = torch.from_numpy(rng_images(360, 1, 8, 8))
    good = generation_metrics(test.images, train.images, ext, kid_subsets=10, kid_subset_size=300)
    bad = generation_metrics(noise, train.images, ext, kid_subsets=10, kid_subset_size=300)
    assert good["fid"] < bad["fid"] and good["kid"] < bad["kid"]
    assert good["inception_score"] > 5 and good["custom_extractor"] is True and good["extractor"] == ext.label
    with pytest.raises(GenrepError) as e:
        generation_metrics(noise[:, :, :4, :4], noise[:, :, :4, :4], ext)
    one_line(e)

    # a corrupt cache is retrained (deterministically: same weights)
    for p in tmp_path.glob("*.safetensors"):
        p.write_bytes(p.read_bytes()[:100])
    retrained = dataset_classifier_extractor(train, test, cache_dir=tmp_path, epochs=10)
    assert trained
    for a, b in zip(ext.state_dict().values(), retrained.state_dict().values()):
        assert torch.equal(a, b)


def test_dataset_classifier_extractor_bad_input(tmp_path):
    from genrep.data.datasets import load_dataset

    train = load_dataset("digits", "train", image_size=8)
    with pytest.raises(GenrepError) as e:
        dataset_classifier_extractor(train, load_dataset("digits", "test"), cache_dir=tmp_path)
    assert "same image_size" in one_line(e)
    with pytest.raises(GenrepError) as e:
        dataset_classifier_extractor(train.images, cache_dir=tmp_path)
    one_line(e)
    with pytest.raises(GenrepError) as e:
        dataset_classifier_extractor(train, cache_dir=tmp_path, epochs=0)
    one_line(e)


def test_frechet_distance_known_values():
    mu, s = np.zeros(3), np.eye(3)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-12)
    # N(0, I) vs N(1, 4I) in 3-D: 3 * 1 + 3 * (1 + 4 - 2 * 2) = 6
    assert frechet_distance(mu, s, np.ones(3), 4 * s) == pytest.approx(6.0)
    with pytest.raises(GenrepError) as e:
        frechet_distance(mu, s, np.ones(2), s)
    one_line(e)
