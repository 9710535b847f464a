"""OOD: the metrics and scores (genrep.eval.metrics.ood), the batched pass over a method
(genrep.eval.protocols.ood), the histogram (genrep.eval.report.figures) and genrep.eval.ood_sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_line, rng_images, tiny_config
from scipy.stats import multivariate_normal
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from genrep.data.datasets import load_dataset
from genrep.data.imageset import ImageSet
from genrep.errors import GenrepError
from genrep.eval.metrics.ood import KINDS, GaussianOODScore, energy_score, msp_score, ood_metrics, score_norm
from genrep.eval.protocols.ood import applicable_scores, method_scores
from genrep.eval.report.figures import score_histogram
from genrep.eval.ood_sets import GENERATED, check_ood_images, make_ood_images
from genrep.runs import build_for_data

# tiny problems: on a shared 2-core machine intra-op threads mostly wait on each other
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", "test", image_size=8)


def perturbed(method_name: str, data: ImageSet, **overrides):
    """A tiny untrained method whose weights are random enough for non-trivial logits and features."""
    torch.manual_seed(0)
    method = build_for_data(tiny_config(method_name, **overrides), data).eval()
    with torch.no_grad():
        for p in method.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.3)
    return method


# ----------------------------------------------------------------------------------------------- metrics
def sklearn_metrics(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"auroc": roc_auc_score(y, s), "auprc": average_precision_score(y, s), "fpr95": fpr[tpr >= 0.95].min()}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 3, 12])                   # None: continuous; else heavy ties
def test_ood_metrics_match_sklearn(seed, levels):
    rng = np.random.default_rng(seed)
    n_in, n_out = rng.integers(1, 300, size=2)
    s_in, s_out = rng.normal(0.7, 1, n_in), rng.normal(0, 1, n_out)
    if levels is not None:
        s_in, s_out = np.round(s_in * levels / 4), np.round(s_out * levels / 4)
    ours = ood_metrics(torch.from_numpy(s_in).float() if seed % 2 else s_in, s_out)
    ref = sklearn_metrics(s_in.astype(np.float32) if seed % 2 else s_in, s_out)
    assert ours == pytest.approx(ref, abs=1e-12)


def test_ood_metrics_tpr_exactly_95_percent():
    # 20 in-distribution scores: the 19th highest reaches TPR = 0.95 exactly, with 1 of 4 OOD scores above it
    s_in = np.arange(20, dtype=float)
    s_in[0] = -10
    s_out = np.array([0.5, 5.5, -20, -30])
    assert ood_metrics(s_in, s_out)["fpr95"] == pytest.approx(sklearn_metrics(s_in, s_out)["fpr95"]) == 0.25


def test_ood_metrics_constant_and_separated_scores():
    m = ood_metrics(torch.ones(30), torch.ones(10))
    assert m == {"auroc": 0.5, "auprc": 0.75, "fpr95": 1.0}
    assert ood_metrics(torch.arange(5.0) + 10, -torch.arange(7.0)) == {"auroc": 1.0, "auprc": 1.0, "fpr95": 0.0}
    assert ood_metrics(-torch.arange(5.0) - 10, torch.arange(7.0))["auroc"] == 0.0


@pytest.mark.parametrize("s_in,s_out,fragment", [
    (torch.zeros(0), torch.ones(3), "empty"),
    (torch.ones(3), torch.zeros(0), "empty"),
    (torch.tensor([0.0, float("nan")]), torch.ones(3), "non-finite"),
    (torch.ones(3), torch.tensor([float("inf")]), "non-finite"),
    (torch.ones(3, 2), torch.ones(3), "1-D"),
])
def test_ood_metrics_bad_input(s_in, s_out, fragment):
    with pytest.raises(GenrepError) as e:
        ood_metrics(s_in, s_out)
    assert fragment in one_line(e)


# ----------------------------------------------------------------------------------------------- Gaussian
def gaussian_data(seed=0, d=4, counts=(60, 45, 80)):
    g = torch.Generator().manual_seed(seed)
    zs, ys = [], []
    for c, n in enumerate(counts):
        mix = torch.randn(d, d, generator=g) * 0.5 + torch.eye(d)
        zs.append(torch.randn(n, d, generator=g) @ mix + 3 * torch.randn(d, generator=g))
        ys.append(torch.full((n,), c))
    return torch.cat(zs), torch.cat(ys)


def reference_scores(z: np.ndarray, y: np.ndarray, query: np.ndarray, covariance: str, shrinkage: float):
    """Direct float64 computation: ML covariances + the documented ridge, scipy's log density, max over classes."""
    classes = np.unique(y)
    means = {c: z[y == c].mean(0) for c in classes}
    centred = np.concatenate([z[y == c] - means[c] for c in classes])
    shared = centred.T @ centred / len(z)

    def ridge(cov):
        return cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))

    covs = {c: ridge(shared if covariance == "shared" or (y == c).sum() <= z.shape[1]
                     else np.cov(z[y == c].T, bias=True)) for c in classes}
    logp = np.stack([multivariate_normal(means[c], covs[c]).logpdf(query) for c in classes], axis=1)
    return logp.max(1)


@pytest.mark.parametrize("covariance", ["shared", "class"])
@pytest.mark.parametrize("shrinkage", [0.0, 1e-4, 0.3])
def test_gaussian_score_matches_scipy(covariance, shrinkage):
    z, y = gaussian_data()
    query = torch.cat([z[::7], torch.randn(25, 4, generator=torch.Generator().manual_seed(1)) * 6]).float()
    gauss = GaussianOODScore().fit(z.float(), y, covariance=covariance, shrinkage=shrinkage)
    ours = gauss.score(query, chunk=16)
    ref = reference_scores(z.float().double().numpy(), y.numpy(), query.double().numpy(), covariance, shrinkage)
    assert ours.dtype == torch.float64 and ours.shape == (len(query),)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=1e-9)
    assert gauss.fallback_classes == []


def test_gaussian_class_covariance_falls_back_to_shared_for_small_classes():
    # class 1 has 3 samples in 4 dimensions (a singular covariance); class index 3 is absent (labels 0, 1, 2, 4)
    z, y = gaussian_data(counts=(60, 3, 80, 40))
    y[y == 3] = 4
    gauss = GaussianOODScore().fit(z, y, covariance="class")
    assert gauss.fallback_classes == [1] and gauss.classes.tolist() == [0, 1, 2, 4]
    query = z[::5]
    ref = reference_scores(z.double().numpy(), y.numpy(), query.double().numpy(), "class", 1e-4)
    np.testing.assert_allclose(gauss.score(query).numpy(), ref, rtol=1e-9)


def test_gaussian_score_handles_singular_features():
    # features on a hyperplane (as after a LayerNorm) and a constant feature: the ridge keeps them invertible
    z, y = gaussian_data(d=5)
    z = z - z.mean(1, keepdim=True)
    z[:, 0] = 1.0
    s = GaussianOODScore().fit(z, y).score(z)
    assert torch.isfinite(s).all()
    z_in, z_far = z[:50], z[:50] * 5
    assert ood_metrics(GaussianOODScore().fit(z, y).score(z_in), GaussianOODScore().fit(z, y).score(z_far))[
        "auroc"] > 0.9


def test_gaussian_score_errors():
    z, y = gaussian_data()
    with pytest.raises(GenrepError) as e:
        GaussianOODScore().fit(z, y, covariance="diagonal")
    assert "shared, class" in one_line(e)
    with pytest.raises(GenrepError) as e:
        GaussianOODScore().score(z)
    assert "before fit" in one_line(e)
    with pytest.raises(GenrepError) as e:
        GaussianOODScore().fit(z, y).score(z[:, :3])
    assert "4" in one_line(e) and "3" in one_line(e)
    for bad_labels in (y[:-1], y.float(), -y - 1):
        with pytest.raises(GenrepError) as e:
            GaussianOODScore().fit(z, bad_labels)
        one_line(e)
    with pytest.raises(GenrepError) as e:
        GaussianOODScore().fit(z * float("nan"), y)
    assert "non-finite" in one_line(e)
    with pytest.raises(GenrepError) as e:
        GaussianOODScore().fit(z, y, shrinkage=-1.0)
    one_line(e)


# ----------------------------------------------------------------------------------------------- logit scores
def test_msp_and_energy_scores():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(msp_score(logits), torch.softmax(logits, 1).max(1).values)
    torch.testing.assert_close(energy_score(logits), logits.exp().sum(1).log())
    torch.testing.assert_close(energy_score(logits, temperature=2.0), 2 * (logits / 2).exp().sum(1).log())
    # bf16 logits are computed in float32; huge logits do not overflow
    half = logits.bfloat16()
    assert msp_score(half).dtype == energy_score(half).dtype == torch.float32
    big = torch.tensor([[1000.0, 999.0, -1000.0]])
    assert torch.isfinite(energy_score(big)).all() and energy_score(big).item() == pytest.approx(
        1000 + np.log1p(np.exp(-1.0)))
    assert msp_score(big).item() == pytest.approx(1 / (1 + np.exp(-1.0)))


def test_score_norm_matches_the_analytic_gradient():
    # log N(x | mu, s^2 I) has gradient -(x - mu) / s^2
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 4, 4, generator=g)
    mu = torch.rand(1, 3, 4, 4, generator=g)
    s = 0.3
    log_density = torch.nn.Parameter(torch.tensor(1.0))    # a parameter must not receive a gradient

    def fn(v):
        return -((v - mu) ** 2).flatten(1).sum(1) / (2 * s * s) * log_density

    out = score_norm(fn, x)
    expected = -((x - mu) / s**2).flatten(1).norm(dim=1)
    torch.testing.assert_close(out, expected)
    assert not out.requires_grad and log_density.grad is None and not x.requires_grad
    with pytest.raises(GenrepError) as e:
        score_norm(lambda v: torch.zeros(len(v)), x)
    assert "does not depend" in one_line(e)
    with pytest.raises(GenrepError) as e:
        score_norm(lambda v: v.sum(), x)
    assert "one value per image" in one_line(e)


# ----------------------------------------------------------------------------------------------- histogram
def test_score_histogram_writes_a_png(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    scores = {"digits": torch.randn(200, generator=g) + 2, "noise": torch.randn(100, generator=g),
              "constant": torch.full((50,), 0.5)}
    path = score_histogram(scores, tmp_path / "hist.png", title="gaussian", in_name="digits")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    score_histogram({"a": torch.ones(3)}, tmp_path / "one.png")      # a single constant set still draws
    with pytest.raises(GenrepError) as e:
        score_histogram(scores, tmp_path / "x.png", in_name="cifar10")
    assert "cifar10" in one_line(e)


# ----------------------------------------------------------------------------------------------- driver
def test_applicable_scores():
    data = load_dataset("digits", "train", image_size=8)
    expect = {"supervised": {"gaussian", "msp", "energy"}, "genvit": {"gaussian", "bpd", "score_norm"},
              "hybvit": {"gaussian", "msp", "energy", "bpd", "score_norm"}}
    for name, ok in expect.items():
        why = applicable_scores(build_for_data(tiny_config(name), data))
        assert set(why) == set(KINDS)
        assert {k for k, v in why.items() if v is None} == ok
        assert all(isinstance(v, str) and "\n" not in v for k, v in why.items() if k not in ok)
    assert "logits" in applicable_scores(build_for_data(tiny_config("genvit"), data))["msp"]


def test_method_scores_supervised(digits8):
    method = perturbed("supervised", digits8)
    train_x = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = method.features(train_x)
    gauss = GaussianOODScore().fit(feats, torch.arange(200) % 10)
    images = digits8.images[:45]
    out = method_scores(method, images, ["msp", "energy", "gaussian"], device="cpu", batch_size=16, gaussian=gauss)
    assert set(out) == {"msp", "energy", "gaussian"}
    x = images.float() / 255
    with torch.no_grad():
        logits = method.logits(x)
        ref_gauss = gauss.score(method.features(x))
    for k, ref in (("msp", msp_score(logits)), ("energy", energy_score(logits)), ("gaussian", ref_gauss)):
        assert out[k].shape == (45,) and out[k].dtype == torch.float64
        torch.testing.assert_close(out[k], ref.double(), rtol=1e-5, atol=1e-5)
    assert out["msp"].std() > 0
    again = method_scores(method, images, ["gaussian"], device="cpu", batch_size=45, gaussian=gauss)
    torch.testing.assert_close(again["gaussian"], out["gaussian"], rtol=1e-6, atol=1e-6)


def test_method_scores_hybvit_bpd_and_score_norm(digits8):
    method = perturbed("hybvit", digits8, **{"model.nll_terms": 2})  # the bound's terms: a method option
    images = digits8.images[:6]
    out = method_scores(method, images, ["bpd", "score_norm", "energy"], device="cpu", batch_size=4, seed=3)
    assert all(v.shape == (6,) and torch.isfinite(v).all() for v in out.values())
    assert (out["bpd"] < 0).all() and (out["score_norm"] <= 0).all()
    x = images.float() / 255
    with torch.no_grad():
        direct = -method.grad_log_density(x).flatten(1).double().norm(dim=1)
    torch.testing.assert_close(out["score_norm"], direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["energy"], method.energy(x).detach().double(), rtol=1e-5, atol=1e-5)
    same = method_scores(method, images, ["bpd"], device="cpu", batch_size=4, seed=3)
    other = method_scores(method, images, ["bpd"], device="cpu", batch_size=4, seed=4)
    assert torch.equal(same["bpd"], out["bpd"]) and not torch.equal(other["bpd"], out["bpd"])


def test_method_scores_errors(digits8):
    sup = build_for_data(tiny_config("supervised"), digits8)
    gen = build_for_data(tiny_config("genvit"), digits8)
    images = digits8.images[:4]
    cases = [(sup, ["bpd"], {}, "nll"), (gen, ["msp"], {}, "classifier head"),
             (sup, ["score_norm"], {}, "score"), (sup, ["mahalanobis"], {}, "unknown"),
             (sup, [], {}, "no OOD score"), (sup, ["gaussian"], {}, "GaussianOODScore"),
             (sup, ["gaussian"], {"gaussian": GaussianOODScore(), "layer": 1}, "GaussianOODScore")]
    for method, kinds, kw, fragment in cases:
        with pytest.raises(GenrepError) as e:
            method_scores(method, images, kinds, device="cpu", **kw)
        assert fragment in one_line(e), (kinds, str(e.value))
    with pytest.raises(GenrepError) as e:
        method_scores(sup, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["msp"], device="cpu")
    assert "8x8x3" in one_line(e) and "8x8x1" in one_line(e)
    with pytest.raises(GenrepError) as e:
        method_scores(sup, images.float(), ["msp"], device="cpu")
    assert "uint8" in one_line(e)
    gauss = GaussianOODScore().fit(torch.randn(30, 32), torch.arange(30) % 3)
    with pytest.raises(GenrepError) as e:
        method_scores(sup, images, ["gaussian"], device="cpu", gaussian=gauss, layer=99)
    assert "layer 99" in one_line(e)


# ----------------------------------------------------------------------------------------------- OOD sets
@pytest.mark.parametrize("name", GENERATED)
def test_generated_sets_are_shaped_and_seeded(name, digits8):
    rgb = ImageSet(torch.from_numpy(rng_images(30, 3, 12, 12)), torch.arange(30) % 3, ["a", "b", "c"], "rgb")
    for in_set in (digits8, rgb):
        x = make_ood_images(name, in_set, 17, seed=5)
        assert x.dtype == torch.uint8 and x.shape == (17, in_set.channels, *in_set.image_shape)
        assert torch.equal(x, make_ood_images(name, in_set, 17, seed=5))
        assert not torch.equal(x, make_ood_images(name, in_set, 17, seed=6))
        assert x.is_contiguous()


def test_noise_and_constant_content(digits8):
    noise = make_ood_images("noise", digits8, 400)
    assert noise.min() == 0 and noise.max() == 255 and abs(noise.float().mean().item() - 127.5) < 3
    rgb = ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ["a"], "rgb")
    const = make_ood_images("constant", rgb, 50)
    flat = const.flatten(2)
    assert (flat == flat[:, :, :1]).all()                             # one colour per image
    assert len({tuple(c) for c in flat[:, :, 0].tolist()}) > 40        # colours differ between images


def test_interp_different_class_pairs(digits8):
    small = ImageSet(digits8.images[:40], digits8.labels[:40], digits8.classes, "digits")
    out = make_ood_images("interp", small, 25, seed=1, interp_pairs="different_class").flatten(1).to(torch.int32)
    a = small.images.flatten(1).to(torch.int32)
    sums = a[:, None, :] + a[None, :, :]                              # [40, 40, D]: every pair
    for img in out:
        # (a + b + 1) // 2 == img  <=>  a + b in {2 img - 1, 2 img}
        ok = ((sums == 2 * img) | (sums == 2 * img - 1)).all(-1).nonzero()
        assert len(ok), "an interp image is not the average of two in-distribution images"
        assert all(small.labels[i] != small.labels[j] for i, j in ok.tolist())
    assert len(make_ood_images("interp", small, None, interp_pairs="different_class")) == 40
    one_class = ImageSet(digits8.images[:5], torch.zeros(5, dtype=torch.long), ["0"], "one")
    with pytest.raises(GenrepError) as e:
        make_ood_images("interp", one_class, 3, interp_pairs="different_class")
    assert "one class" in one_line(e) and "random" in one_line(e)
    assert len(make_ood_images("interp", one_class, 3)) == 3     # random pairs need no second class


def hybvit_code_interp(images: torch.Tensor, seed: int, batch: int = 100) -> torch.Tensor:
    """The HybViT code's "cifar_interp" (Task/eval_tasks.py, OODAUC), written out independently: a shuffled
    loader of batches of 100, each batch after the first averaged with the one before it (here on uint8,
    rounded half up, as genrep's OOD sets are uint8)."""
    p = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    out, last = [], None
    for i in range(0, len(p), batch):
        x = images[p[i:i + batch]].to(torch.int16)
        if last is not None:
            out.append((x + last + 1) // 2)
        last = x
    return torch.cat(out).to(torch.uint8)


def test_interp_random_pairs_follow_the_hybvit_code():
    x = torch.from_numpy(rng_images(300, 3, 6, 6, seed=4))
    labels = torch.arange(300) % 3
    in_set = ImageSet(x, labels, ["a", "b", "c"], "rgb")
    whole = make_ood_images("interp", in_set, None, seed=7)
    assert whole.shape == (200, 3, 6, 6)                     # N - 100, as the code's 9,900 of CIFAR-10's 10,000
    assert torch.equal(whole, hybvit_code_interp(x, seed=7))
    # any two images, of the same class too: the pairs are (p[k], p[k + 100])
    p = torch.randperm(300, generator=torch.Generator().manual_seed(7))
    assert (labels[p[:200]] == labels[p[100:]]).any() and (labels[p[:200]] != labels[p[100:]]).any()
    assert torch.equal(make_ood_images("interp", in_set, 50, seed=7), whole[:50])
    more = make_ood_images("interp", in_set, 450, seed=7)   # past one shuffle: the next, as the code's next epoch
    assert more.shape == (450, 3, 6, 6) and torch.equal(more[:200], whole)
    assert not torch.equal(more[200:400], whole)
    # a set under 200 images pairs at half its size
    small = ImageSet(x[:40], labels[:40], ["a", "b", "c"], "rgb")
    assert torch.equal(make_ood_images("interp", small, None, seed=2), hybvit_code_interp(x[:40], seed=2, batch=20))
    with pytest.raises(GenrepError) as e:
        make_ood_images("interp", ImageSet(x[:1], labels[:1], ["a"], "one"), 3)
    assert "only 1" in one_line(e)


def test_whole_sets(digits8):
    """n=None: every image of a registry set's test split, N of noise and constant."""
    for name in ("noise", "constant"):
        assert make_ood_images(name, digits8, None).shape == (len(digits8), 1, 8, 8)
    rgb_in = ImageSet(torch.from_numpy(rng_images(500, 3, 8, 8)), torch.zeros(500, dtype=torch.long), ["a"], "rgb")
    full = load_dataset("digits", "test", image_size=8).images
    assert torch.equal(make_ood_images("digits", rgb_in, None), full.expand(-1, 3, -1, -1))


def test_registry_set_is_resized_subsampled_and_seeded():
    in_set = load_dataset("digits", "train", image_size=12)
    full = load_dataset("digits", "test", image_size=12)
    x = make_ood_images("digits", in_set, 50, seed=2)
    assert x.shape == (50, 1, 12, 12) and x.dtype == torch.uint8
    assert torch.equal(x, make_ood_images("Digits", in_set, 50, seed=2))
    assert not torch.equal(x, make_ood_images("digits", in_set, 50, seed=3))
    # every image is one of the test split's, each at most once
    match = (x.flatten(1)[:, None] == full.images.flatten(1)[None]).all(-1)
    assert (match.sum(1) >= 1).all() and len(set(match.float().argmax(1).tolist())) == 50
    # more than there are: all of them, in order
    assert torch.equal(make_ood_images("digits", in_set, 10_000), full.images)


def test_registry_set_channel_conversion(tmp_path):
    grey = load_dataset("digits", "test", image_size=8)
    rgb_in = ImageSet(torch.from_numpy(rng_images(10, 3, 8, 8)), torch.zeros(10, dtype=torch.long), ["a"], "rgb")
    x = make_ood_images("digits", rgb_in, 1000)
    assert x.shape == (len(grey), 3, 8, 8) and torch.equal(x, grey.images.expand(-1, 3, -1, -1))
    # an RGB npz set into a grey in-distribution set: ITU-R 601 luma
    rgb = rng_images(12, 8, 8, 3, seed=1)
    labels = np.arange(12) % 2
    np.savez(tmp_path / "rgb.npz", x_train=rgb, y_train=labels, x_test=rgb, y_test=labels)
    y = make_ood_images(f"npz:{tmp_path / 'rgb.npz'}", grey, 12)
    luma = np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    assert y.shape == (12, 1, 8, 8)
    assert np.abs(y[:, 0].numpy().astype(int) - luma.astype(int)).max() <= 1  # float32 rounding at .5


def test_make_ood_images_errors(digits8):
    with pytest.raises(GenrepError) as e:
        make_ood_images("svhm", digits8, 5)
    msg = one_line(e)
    assert all(k in msg for k in ("noise", "constant", "interp", "svhn", "cifar10", "digits"))
    for n in (0, -3, 2.5, True):
        with pytest.raises(GenrepError) as e:
            make_ood_images("noise", digits8, n)
        one_line(e)
    with pytest.raises(GenrepError) as e:
        make_ood_images("interp", digits8, 5, interp_pairs="pairs")
    assert "random, different_class" in one_line(e)
    with pytest.raises(GenrepError) as e:
        make_ood_images("", digits8, 5)
    one_line(e)


def test_check_ood_images(digits8):
    check_ood_images(make_ood_images("noise", digits8, 3), digits8, "noise")
    with pytest.raises(GenrepError) as e:
        check_ood_images(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), digits8, "cifar-like")
    msg = one_line(e)
    assert "cifar-like has 32x32x3" in msg and "digits has 8x8x1" in msg and "by name" in msg
    with pytest.raises(GenrepError) as e:
        check_ood_images(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), digits8, "nothing")
    assert "empty" in one_line(e)
    with pytest.raises(GenrepError) as e:
        check_ood_images(torch.zeros(2, 1, 8, 8), digits8, "floats")
    assert "uint8" in one_line(e)


# ----------------------------------------------------------------------------------------------- the protocol
def test_ood_settings_declare_all_and_the_pairing():
    from genrep.config import EvalConfig, build_dataclass

    ev = build_dataclass(EvalConfig, {"ood": {"n": None, "interp_pairs": "different_class"}}, "eval")
    assert ev.ood.n is None and ev.ood.interp_pairs == "different_class"
    assert EvalConfig().ood.n == 1000 and EvalConfig().ood.interp_pairs == "random"
    for bad, fragment in (({"n": 0}, "eval.ood.n must be at least 1, got 0 (null: the whole test split"),
                          ({"n": "all"}, "eval.ood.n"),
                          ({"interp_pairs": "mixed"}, "eval.ood.interp_pairs 'mixed' is unknown; choose random, "
                                                      "different_class")):
        with pytest.raises(GenrepError) as e:
            build_dataclass(EvalConfig, {"ood": bad}, "eval")
        assert fragment in one_line(e)


@pytest.mark.parametrize("n, expect_in, expect_out", [
    (None, 360, {"interp": 260, "digits": 360, "noise": 360}),     # everything, as the paper
    (50, 50, {"interp": 50, "digits": 50, "noise": 50}),
])
def test_ood_protocol_scores_whole_sets_when_n_is_null(digits8, tmp_path, n, expect_in, expect_out):
    from genrep.config import EvalConfig
    from genrep.eval.protocols import ood
    from genrep.eval.protocols.context import EvalContext
    from genrep.eval.protocols.ood import OODSettings

    ev = EvalConfig(device="cpu", ood=OODSettings(sets=["interp", "digits", "noise"], scores=["msp"], n=n))
    ctx = EvalContext(run=tmp_path, cfg=tiny_config("supervised"), ev=ev, method=perturbed("supervised", digits8),
                      train=load_dataset("digits", "train", image_size=8), test=digits8, device=torch.device("cpu"),
                      version="ema@0", progress=False)
    ood.check(ctx)
    out = ood.run(ctx)
    assert out["n_in"] == expect_in and out["n_out"] == expect_out and out["interp_pairs"] == "random"
    assert set(out["scores"]["msp"]) == set(expect_out)


@pytest.mark.parametrize("missing", ["celeba", "tinyimagenet", "imagenet32"])
def test_an_ood_set_missing_offline_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, missing):
    """Through the CLI: exit 2, one `genrep: error:` line naming the set and its folder, nothing extracted
    or scored (the probes, planned first, would extract features) and no results file."""
    from genrep.cli import main
    from genrep.eval.protocols import context, ood
    from genrep.train.loop import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config("supervised", **{"train.steps": 2, "data.download": False}), run)
    capsys.readouterr()
    monkeypatch.setenv("GENREP_DATA", str(tmp_path / "data"))
    work = []

    def no_work(*args, **kwargs):
        work.append(args)
        raise AssertionError("features extracted or scores computed before the preflight failed")

    for module, fn in ((context, "cached_feature_sets"), (context, "extract_features"),
                       (context, "extract_feature_sets"), (ood, "method_scores")):
        monkeypatch.setattr(module, fn, no_work)
    # the OOD protocol's sets; the similarity protocol's t-SNE, which draws its OOD points from the first set
    for protocols, sets in (("probes,ood,similarity", f"noise,{missing}"), ("probes,similarity", missing)):
        rc = main(["evaluate", str(run), "--eval.device", "cpu", "--eval.protocols", protocols,
                   "--eval.ood.sets", sets, "--eval.ood.n", "null"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("genrep: error: "), lines
        assert f"{missing} is not available" in lines[0] and str(tmp_path / "data" / missing) in lines[0]
        assert work == [] and not (run / "results" / "eval.json").exists()


def test_gaussian_summary_records_the_ridge_and_the_classes_that_fell_back():
    """Never silent (issue 25): the fit says which classes use the shared covariance and what ridge it added;
    a refit with the shared covariance does not report the earlier fit's classes."""
    from genrep.eval.report.summary import gaussian_text

    z, y = gaussian_data(counts=(60, 3, 80, 40))
    gauss = GaussianOODScore().fit(z, y, covariance="class", shrinkage=1e-3)
    s = gauss.summary()
    assert s["fallback_classes"] == [1] and s["min_class_samples"] == 3 and s["dim"] == 4 and s["classes"] == 4
    assert s["ridge"]["relative"] == 1e-3 and 0 < s["ridge"]["min"] <= s["ridge"]["max"]
    scale = torch.stack([(z[y == c] - z[y == c].mean(0)).double().pow(2).mean(0).mean() for c in (0, 2, 3)])
    assert s["ridge"]["max"] >= 1e-3 * float(scale.max()) * (1 - 1e-9)
    text = gaussian_text(s)
    assert "1 of 4 classes have <= D = 4 samples and use the shared covariance: 1" in text and "ridge 0.001" in text
    shared = gauss.fit(z, y, covariance="shared").summary()
    assert "fallback_classes" not in shared and gauss.fallback_classes == []
    assert "no class fell back" in gaussian_text(GaussianOODScore().fit(*gaussian_data(), covariance="class").summary())
    with pytest.raises(GenrepError, match="before fit"):
        GaussianOODScore().summary()
