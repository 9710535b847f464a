"""Tests for genrep.eval.metrics.probes: linear probe (LBFGS / AdamW / LARS) and weighted kNN on frozen features."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from genrep.errors import GenrepError
from genrep.eval.metrics.probes import (
    LinearProbeResult,
    _fit_lbfgs,
    knn_classify,
    knn_predict,
    linear_probe,
    standardize,
)

# tiny problems: on a shared 2-core machine intra-op threads mostly wait on each other
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blobs(n_train: int, n_test: int, dim: int, num_classes: int, spread: float, seed: int = 0):
    """Isotropic unit-variance Gaussian blobs around class means of scale ``spread`` (plus an offset and
    per-feature scaling, so standardisation has something to do)."""
    g = _gen(seed)
    means = torch.randn(num_classes, dim, generator=g) * spread
    scale = torch.rand(dim, generator=g) * 5 + 0.2
    offset = torch.randn(dim, generator=g) * 10

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = (torch.randn(n, dim, generator=g) + means[y]) * scale + offset
        return x, y

    return (*draw(n_train), *draw(n_test))


# --------------------------------------------------------------------------------------------------
# standardize


def test_standardize_uses_train_statistics_only():
    g = _gen(0)
    train = torch.randn(500, 7, generator=g) * torch.arange(1, 8) + 3.0
    train[:, 3] = 5.0  # constant feature
    other = torch.randn(200, 7, generator=g) * 4 - 1.0
    s_train, s_other = standardize(train, other)
    ref = StandardScaler().fit(train.double().numpy())
    np.testing.assert_allclose(s_train.numpy(), ref.transform(train.double().numpy()), atol=1e-5)
    # other uses the *train* statistics, so it is not itself standardised
    expected = (other.double().numpy() - ref.mean_) / (np.sqrt(ref.var_) + 1e-6)
    np.testing.assert_allclose(s_other.numpy(), expected, rtol=1e-5, atol=1e-4)
    assert torch.all(s_train[:, 3] == 0)
    assert s_train.dtype == torch.float32 and s_other.shape == other.shape
    assert standardize(train.double())[0].dtype == torch.float64
    assert len(standardize(train)) == 1


def test_standardize_rejects_mismatched_dims():
    with pytest.raises(GenrepError, match="feature dimensions"):
        standardize(torch.randn(5, 3), torch.randn(5, 4))


# --------------------------------------------------------------------------------------------------
# linear probe, LBFGS


@pytest.mark.parametrize("weight_decay", [1e-3, 1e-1])
def test_lbfgs_matches_sklearn_logistic_regression(weight_decay):
    # Our objective: mean_i CE_i + wd/2 ||W||^2 (bias free).  sklearn's: C sum_i CE_i + 1/2 ||W||^2.
    # Dividing sklearn's by C*N gives ours with wd = 1 / (C N), i.e. C = 1 / (wd N).
    x, y, xt, yt = blobs(600, 400, 12, 4, spread=0.6, seed=1)
    n, c = x.shape[0], 4
    sx, sxt = standardize(x, xt)
    clf = LogisticRegression(C=1.0 / (weight_decay * n), tol=1e-10, max_iter=10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(sx.double().numpy(), y.numpy())

    w, b, iters, converged = _fit_lbfgs(sx, y, c, weight_decay, max_iter=1000)
    assert 0 < iters < 1000 and converged
    # W is identifiable (the penalty pins the softmax shift); b only up to a constant: compare centred.
    np.testing.assert_allclose(w.numpy(), clf.coef_, atol=2e-3 * np.abs(clf.coef_).max())
    np.testing.assert_allclose(b.numpy() - b.numpy().mean(), clf.intercept_ - clf.intercept_.mean(),
                               atol=2e-3)
    probs = torch.softmax(sxt @ w.t() + b, dim=1).numpy()
    np.testing.assert_allclose(probs, clf.predict_proba(sxt.double().numpy()), atol=2e-3)

    res = linear_probe(x, y, xt, yt, c, solver="lbfgs", weight_decay=weight_decay)
    sk_test = clf.score(sxt.double().numpy(), yt.numpy())
    sk_train = clf.score(sx.double().numpy(), y.numpy())
    assert abs(res.test_acc - sk_test) <= 1 / len(yt) + 1e-12
    assert abs(res.train_acc - sk_train) <= 1 / len(y) + 1e-12
    assert 0.5 < res.test_acc < 1.0  # a non-trivial problem
    assert res.solver == "lbfgs" and res.weight_decay == weight_decay and res.converged
    assert res.epochs_or_iters == iters and res.sweep == []
    assert (res.n_train, res.n_test, res.dim, res.num_classes) == (600, 400, 12, 4)


def test_lbfgs_reports_non_convergence():
    x, y, xt, yt = blobs(300, 100, 8, 3, spread=1.0, seed=6)
    res = linear_probe(x, y, xt, yt, 3, max_iter=2)
    assert res.epochs_or_iters <= 2 and res.converged is False


def test_separable_blobs_reach_full_accuracy():
    x, y, xt, yt = blobs(2000, 1000, 32, 5, spread=3.0, seed=2)
    res = linear_probe(x, y, xt, yt, 5)
    assert res.train_acc >= 0.995 and res.test_acc >= 0.99


def test_random_labels_give_chance():
    g = _gen(3)
    x, xt = torch.randn(2000, 20, generator=g), torch.randn(2000, 20, generator=g)
    y, yt = torch.randint(0, 5, (2000,), generator=g), torch.randint(0, 5, (2000,), generator=g)
    res = linear_probe(x, y, xt, yt, 5)
    assert 0.15 < res.test_acc < 0.25
    assert res.train_acc < 0.35  # 105 parameters cannot memorise 2000 random labels


def test_adamw_reaches_lbfgs_accuracy_and_is_seeded():
    x, y, xt, yt = blobs(2000, 2000, 16, 4, spread=0.5, seed=4)
    ref = linear_probe(x, y, xt, yt, 4, solver="lbfgs", weight_decay=1e-4)
    assert 0.6 < ref.test_acc < 0.99  # overlapping blobs: there is something to get right
    # the GCRL protocol defaults: AdamW, 100 epochs, batch 512, lr 0.01, weight decay 1e-4, cosine
    kw = dict(solver="adamw", weight_decay=1e-4, seed=7)
    a = linear_probe(x, y, xt, yt, 4, **kw)
    assert abs(a.test_acc - ref.test_acc) <= 0.02
    assert a.train_loss <= ref.train_loss + 0.01  # nearly optimal on the (almost) same objective
    assert a.solver == "adamw" and a.epochs_or_iters == 100 and a.converged is None
    b = linear_probe(x, y, xt, yt, 4, **kw)
    assert (a.test_acc, a.train_acc, a.train_loss) == (b.test_acc, b.train_acc, b.train_loss)


def _correlated_noise(n: int, g: torch.Generator):
    # x1 = signal + big shared noise, x2 = the shared noise: x1 - x2 is clean, x1 alone is not.  A heavily
    # regularised probe degenerates to the class-mean direction (x1 only) and does badly.
    y = torch.randint(0, 2, (n,), generator=g)
    shared = torch.randn(n, generator=g) * 3
    x1 = (2 * y - 1).float() + shared + 0.3 * torch.randn(n, generator=g)
    return torch.stack([x1, shared], dim=1), y


def test_weight_decay_sweep_picks_sensible_value_and_refits():
    g = _gen(5)
    x, y = _correlated_noise(1000, g)
    xt, yt = _correlated_noise(1000, g)
    wds = [1e3, 1.0, 1e-2, 1e-4]
    res = linear_probe(x, y, xt, yt, 2, weight_decay=wds, val_fraction=0.2, seed=3)
    assert [r["weight_decay"] for r in res.sweep] == wds
    val_acc = {r["weight_decay"]: r["val_acc"] for r in res.sweep}
    assert val_acc[1e3] < 0.8 and val_acc[1e-4] > 0.95
    assert res.weight_decay in (1e-2, 1e-4)
    assert val_acc[res.weight_decay] == max(val_acc.values())
    # documented tie-break among the best held-out accuracies: the lowest held-out cross-entropy
    tied = [r for r in res.sweep if r["val_acc"] == max(val_acc.values())]
    assert res.weight_decay == min(tied, key=lambda r: r["val_loss"])["weight_decay"]
    assert res.val_fraction == 0.2 and res.test_acc > 0.95
    # the final model is a refit on the full train set with the chosen value
    direct = linear_probe(x, y, xt, yt, 2, weight_decay=res.weight_decay)
    assert (direct.test_acc, direct.train_acc, direct.train_loss) == (res.test_acc, res.train_acc,
                                                                      res.train_loss)
    # seeded: same split, same sweep
    again = linear_probe(x, y, xt, yt, 2, weight_decay=wds, val_fraction=0.2, seed=3)
    assert again.sweep == res.sweep
    # a one-element sequence is a plain value: no held-out split
    single = linear_probe(x, y, xt, yt, 2, weight_decay=[1e-2])
    assert single.sweep == [] and single.val_fraction is None and single.weight_decay == 1e-2


def test_result_to_dict_is_json_serialisable():
    x, y, xt, yt = blobs(300, 100, 8, 3, spread=1.0, seed=6)
    res = linear_probe(x, y, xt, yt, 3, weight_decay=(1e-3, 1e-1))
    assert isinstance(res, LinearProbeResult)
    d = json.loads(json.dumps(res.to_dict()))
    for key in ("test_acc", "train_acc", "weight_decay", "solver", "epochs_or_iters", "sweep"):
        assert key in d
    assert len(d["sweep"]) == 2 and d["solver"] == "lbfgs"


def test_linear_probe_accepts_inputs_on_different_devices_and_dtypes():
    x, y, xt, yt = blobs(300, 100, 8, 3, spread=1.0, seed=6)
    ref = linear_probe(x, y, xt, yt, 3)
    res = linear_probe(x.double(), y.int(), xt.half().float(), yt, 3)
    assert abs(res.test_acc - ref.test_acc) <= 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probes_run_on_gpu():
    x, y, xt, yt = blobs(2000, 500, 16, 4, spread=0.5, seed=8)
    cpu = linear_probe(x, y, xt, yt, 4)
    gpu = linear_probe(x.cuda(), y.cuda(), xt.cuda(), yt.cuda(), 4)
    assert abs(cpu.test_acc - gpu.test_acc) <= 0.005
    assert knn_classify(x, y, xt, yt, 4, k=(1, 20)) == knn_classify(x.cuda(), y.cuda(), xt.cuda(),
                                                                    yt.cuda(), 4, k=(1, 20))


# --------------------------------------------------------------------------------------------------
# kNN


def _knn_reference(train_x, train_y, test_x, num_classes, k, temperature):
    """Direct float64 numpy computation of the InstDisc/DINO weighted vote."""
    a = train_x.double().numpy()
    b = test_x.double().numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sim = b @ a.T
    labels = train_y.numpy()
    preds = []
    for row in sim:
        nn_idx = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, labels[nn_idx], np.exp(row[nn_idx] / temperature))
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_matches_bruteforce_reference(temperature):
    g = _gen(10)
    c = 6
    train_x, train_y = torch.randn(400, 16, generator=g), torch.randint(0, c, (400,), generator=g)
    test_x, test_y = torch.randn(150, 16, generator=g), torch.randint(0, c, (150,), generator=g)
    preds = knn_predict(train_x, train_y, test_x, c, k=[1, 5, 20], temperature=temperature)
    accs = knn_classify(train_x, train_y, test_x, test_y, c, k=[1, 5, 20], temperature=temperature)
    for k in (1, 5, 20):
        ref = _knn_reference(train_x, train_y, test_x, c, k, temperature)
        np.testing.assert_array_equal(preds[k].numpy(), ref)
        assert accs[k] == pytest.approx(float((ref == test_y.numpy()).mean()))


def test_knn_k1_is_nearest_neighbour_and_recovers_train_labels():
    g = _gen(11)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 3, (200,), generator=g)
    # the test set is the train set rescaled: its cosine nearest neighbour is itself
    assert knn_classify(x, y, 2.5 * x, y, 3, k=1) == {1: 1.0}


def test_knn_chunking_does_not_change_results():
    g = _gen(12)
    train_x, train_y = torch.randn(300, 10, generator=g), torch.randint(0, 4, (300,), generator=g)
    test_x = torch.randn(101, 10, generator=g)
    ks = (1, 7, 50)
    ref = knn_predict(train_x, train_y, test_x, 4, k=ks, batch_size=10_000)
    for bs in (1, 7, 64):
        out = knn_predict(train_x, train_y, test_x, 4, k=ks, batch_size=bs)
        for k in ks:
            assert torch.equal(out[k], ref[k])


def test_knn_clamps_k_to_train_size():
    g = _gen(13)
    train_x, train_y = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    test_x, test_y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    out = knn_classify(train_x, train_y, test_x, test_y, 3, k=(30, 31, 10**6))
    assert set(out) == {30, 31, 10**6}  # keyed by the k asked for
    assert out[31] == out[10**6] == out[30]
    # with every train row voting and a huge temperature, the vote is the train-set majority class
    majority = int(torch.bincount(train_y, minlength=3).argmax())
    p = knn_predict(train_x, train_y, test_x, 3, k=10**6, temperature=1e6)[10**6]
    assert torch.all(p == majority)


def test_knn_default_k_returns_both():
    g = _gen(14)
    x, y = torch.randn(250, 6, generator=g), torch.randint(0, 2, (250,), generator=g)
    out = knn_classify(x, y, x[:20], y[:20], 2)
    assert sorted(out) == [20, 200] and all(0.0 <= v <= 1.0 for v in out.values())


# --------------------------------------------------------------------------------------------------
# errors


def _data():
    g = _gen(20)
    return (torch.randn(50, 4, generator=g), torch.randint(0, 3, (50,), generator=g),
            torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))


def _with(i, value):
    d = list(_data())
    d[i] = value
    return d


_nan_train = _data()[0].clone()
_nan_train[3, 1] = float("nan")
_inf_test = _data()[2].clone()
_inf_test[0, 0] = float("inf")

BAD_DATA = {
    "empty train": (_with(0, torch.empty(0, 4)), "empty"),
    "empty test": (_with(2, torch.empty(0, 4)), "empty"),
    "train length mismatch": (_with(1, torch.zeros(49, dtype=torch.long)), "same length"),
    "test length mismatch": (_with(3, torch.zeros(21, dtype=torch.long)), "same length"),
    "label too large": (_with(1, torch.full((50,), 3)), r"labels must lie in \[0, 2\]"),
    "negative label": (_with(3, torch.full((20,), -1)), r"labels must lie in \[0, 2\]"),
    "float labels": (_with(1, torch.zeros(50)), "integer class indices"),
    "nan in train": (_with(0, _nan_train), "non-finite"),
    "inf in test": (_with(2, _inf_test), "non-finite"),
    "dim mismatch": (_with(2, torch.randn(20, 5)), "feature dimensions"),
    "1-D features": (_with(0, torch.randn(50)), "2-D"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
@pytest.mark.parametrize("probe", ["linear", "knn"])
def test_bad_data_raises_one_line_error(case, probe):
    data, pattern = BAD_DATA[case]
    with pytest.raises(GenrepError, match=pattern) as info:
        if probe == "linear":
            linear_probe(*data, 3)
        else:
            knn_classify(*data, 3)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(solver="sgd"), "unknown linear-probe solver 'sgd'"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(weight_decay=[]), "weight_decay"),
    (dict(weight_decay=[1e-3, float("nan")]), "weight_decay"),
    (dict(weight_decay=[1e-3, 1e-2], val_fraction=1.0), "val_fraction"),
    (dict(max_iter=0), "max_iter"),
    (dict(solver="adamw", epochs=0), "epochs"),
    (dict(solver="adamw", batch_size=0), "batch_size"),
    (dict(solver="adamw", lr=0.0), "lr"),
])
def test_bad_linear_probe_options(kwargs, pattern):
    with pytest.raises(GenrepError, match=pattern) as info:
        linear_probe(*_data(), 3, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(k=0), "k values"),
    (dict(k=[]), "empty"),
    (dict(k=[5, 2.5]), "k values"),
    (dict(temperature=0.0), "temperature"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_knn_options(kwargs, pattern):
    with pytest.raises(GenrepError, match=pattern):
        knn_classify(*_data(), 3, **kwargs)


def test_bad_num_classes():
    with pytest.raises(GenrepError, match="num_classes"):
        linear_probe(*_data(), 1)
    with pytest.raises(GenrepError, match="num_classes"):
        knn_classify(*_data(), 2.0)


# --------------------------------------------------------------------------------------------------
# GCRL section 4.2's protocol: raw features and a constant rate (issue 25)


def test_raw_features_fit_the_features_as_given():
    from genrep.eval.metrics.probes import _evaluate

    x, y, xt, yt = blobs(300, 200, 6, 3, spread=0.8, seed=11)
    raw = linear_probe(x, y, xt, yt, 3, solver="lbfgs", weight_decay=1e-3, standardize_features=False)
    w, b, _, _ = _fit_lbfgs(x, y, 3, 1e-3, 1000)
    assert raw.test_acc == _evaluate(w, b, xt, yt)[0] and raw.train_loss == _evaluate(w, b, x, y)[1]
    assert raw.train_loss != linear_probe(x, y, xt, yt, 3, solver="lbfgs", weight_decay=1e-3).train_loss


def test_constant_lr_schedule_is_plain_adamw():
    """lr_schedule constant: the rate stays lr at every step (an AdamW loop written out); cosine differs."""
    import torch.nn.functional as F

    from genrep.eval.metrics.probes import _fit_adamw

    x, y, _, _ = blobs(200, 10, 5, 3, spread=0.8, seed=12)
    w, b, _, _ = _fit_adamw(x, y, 3, 1e-4, epochs=3, batch_size=64, lr=0.01, seed=5, lr_schedule="constant")
    rw = torch.zeros(3, 5, requires_grad=True)
    rb = torch.zeros(3, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [rw], "weight_decay": 1e-4}, {"params": [rb], "weight_decay": 0.0}],
                            lr=0.01, fused=True)
    gen = _gen(5)
    for _ in range(3):
        perm = torch.randperm(200, generator=gen)
        for start in range(0, 200, 64):
            idx = perm[start:start + 64]
            loss = F.cross_entropy(torch.addmm(rb, x[idx], rw.t()), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    assert torch.equal(w, rw.detach()) and torch.equal(b, rb.detach())
    cw, _, _, _ = _fit_adamw(x, y, 3, 1e-4, epochs=3, batch_size=64, lr=0.01, seed=5)
    assert not torch.equal(cw, w)


def test_unknown_lr_schedule_is_one_line():
    with pytest.raises(GenrepError, match="unknown linear-probe lr_schedule 'step'; choose one of cosine, constant"):
        linear_probe(*_data(), 3, solver="adamw", lr_schedule="step")


# --------------------------------------------------------------------------------------------------
# MAE's linear probe (solver lars; issue 27): BatchNorm on the features, LARS, warm-up and cosine


def test_lars_fit_is_maes_batchnorm_and_linear_head_trained_as_written():
    """A transcription of main_linprobe.py's head (BatchNorm1d(affine=False, eps 1e-6) then Linear, trunc-normal
    0.01, LARS, lr_sched per step, whole batches only; DARL table 13's label smoothing), scored in eval mode, equals
    the folded fit."""
    import torch.nn.functional as F

    from genrep.eval.metrics.lars import LARS
    from genrep.eval.metrics.probes import _fit_lars

    x, y, xt, _ = blobs(200, 50, 6, 3, spread=0.8, seed=13)
    epochs, warmup, batch, blr = 4, 1, 64, 0.1
    w, b, _, _ = _fit_lars(x, y, 3, 1e-3, epochs=epochs, batch_size=batch, base_lr=blr, warmup_epochs=warmup,
                           momentum=0.9, trust_coefficient=0.001, seed=5, label_smoothing=0.1)
    gen = _gen(5)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(6, affine=False, eps=1e-6), torch.nn.Linear(6, 3))
    torch.nn.init.trunc_normal_(head[1].weight, std=0.01, generator=gen)
    torch.nn.init.zeros_(head[1].bias)
    lr = blr * batch / 256
    opt = LARS(head.parameters(), lr=lr, weight_decay=1e-3)
    per_epoch = 200 // batch  # drop_last: 3 batches of 64, 8 rows left out each epoch
    head.train()
    for epoch in range(epochs):
        perm = torch.randperm(200, generator=gen)
        for i in range(per_epoch):
            e = epoch + i / per_epoch
            cosine = 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
            rate = lr * e / warmup if e < warmup else lr * cosine
            for group in opt.param_groups:
                group["lr"] = rate
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(head(x[idx]), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.addmm(b, xt, w.t()), head(xt), rtol=1e-4, atol=1e-5)


def test_lars_probe_clamps_the_batch_records_its_settings_and_learns():
    from genrep.eval.metrics.probes import lars_rate

    x, y, xt, yt = blobs(600, 600, 16, 4, spread=0.5, seed=4)
    ref = linear_probe(x, y, xt, yt, 4, solver="lbfgs", weight_decay=1e-4)
    # the trust ratio moves W by about lr x 0.001 / (1 - momentum) of its norm per step: 90 steps at 0.1 x 600 / 256
    # leave it near its start (chance), so this set needs a larger base rate than ImageNet's 7,000 steps at 6.4
    kw = dict(solver="lars", weight_decay=0.0, epochs=90, batch_size=16384, base_lr=5.0, seed=2,
              standardize_features=False)
    res = linear_probe(x, y, xt, yt, 4, **kw)
    s = res.solver_settings
    assert (s["batch_size"], s["batch_size_asked"], s["steps_per_epoch"]) == (600, 16384, 1)
    assert s["lr"] == pytest.approx(5.0 * 600 / 256) and s["base_lr"] == 5.0
    assert (s["warmup_epochs"], s["momentum"], s["trust_coefficient"], s["label_smoothing"]) == (10, 0.9, 0.001, 0)
    assert "affine=False" in s["feature_norm"] and res.epochs_or_iters == 90 and res.solver == "lars"
    assert res.test_acc >= ref.test_acc - 0.03  # on raw features: its BatchNorm standardises them
    again = linear_probe(x, y, xt, yt, 4, **kw)
    assert (again.test_acc, again.train_loss) == (res.test_acc, res.train_loss)
    # MAE's lr_sched: 0 at the first step, the peak at the end of the warm-up, half of it midway through the cosine
    assert lars_rate(1.0, 0, 5, 90, 10) == 0 and lars_rate(1.0, 25, 5, 90, 10) == pytest.approx(0.5)
    assert lars_rate(1.0, 50, 5, 90, 10) == pytest.approx(1.0) and lars_rate(1.0, 250, 5, 90, 10) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(solver="lars", epochs=10, warmup_epochs=10), r"warmup_epochs must be at least 0 and below epochs \(10\)"),
    (dict(solver="lars", batch_size=1), "needs at least 2 rows: batch_size is 1"),
    (dict(solver="lars", momentum=1.0), r"momentum must be in \[0, 1\)"),
    (dict(solver="lars", base_lr=0.0), "base_lr"),
    (dict(solver="lars", label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
])
def test_bad_lars_options(kwargs, pattern):
    with pytest.raises(GenrepError, match=pattern) as info:
        linear_probe(*_data(), 3, **kwargs)
    assert "\n" not in str(info.value)


def test_lars_settings_are_checked_where_the_config_is_built():
    from genrep.config import ProbeConfig, build_dataclass
    from genrep.fields import inert_fields
    from genrep.eval.protocols.probes import ProbesSettings

    for cls, section in ((ProbesSettings, "eval.probes"), (ProbeConfig, "probe")):
        with pytest.raises(GenrepError, match=rf"{section}.lars.warmup_epochs \(10\) must be below {section}.epochs "
                                              r"\(5\)"):
            build_dataclass(cls, {"solver": "lars", "epochs": 5}, section)
        with pytest.raises(GenrepError, match=f"{section}.batch_size 1 cannot be normalised"):
            build_dataclass(cls, {"solver": "lars", "batch_size": 1}, section)
        with pytest.raises(GenrepError, match=f"{section}.lars.momentum must be at least 0 and below 1"):
            build_dataclass(cls, {"solver": "lars", "lars": {"momentum": 1}}, section)
        s = build_dataclass(cls, {"solver": "lars", "epochs": 5, "lars": {"warmup_epochs": 1}}, section)
        assert set(inert_fields(s, section)) >= {"lr", "standardize", "lr_schedule"}
        assert build_dataclass(cls, {"epochs": 5}, section).solver != "lars"  # warm-up 10 is read only by lars


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    from conftest import tiny_config

    from genrep.train.loop import pretrain

    run = tmp_path_factory.mktemp("lars") / "sup"
    pretrain(tiny_config("supervised", **{"train.steps": 2}), run)
    return run


def test_probe_and_evaluate_take_the_lars_solver_on_a_run_and_record_it(tiny_run):
    """`genrep probe RUN --probe.solver lars` and `--eval.probes.solver lars` (their overrides built as the CLI
    builds them): the result names the solver and every setting, the scaled rate and the batch it used."""
    from dataclasses import replace

    from eval_helpers import FAST

    from genrep.config import ProbeConfig, build_dataclass
    from genrep.eval.evaluate import evaluate_run, run_probes
    from genrep.eval.protocols.probes import ProbesSettings

    over = {"solver": "lars", "epochs": 3, "batch_size": 64, "weight_decay": [0.0],
            "lars": {"warmup_epochs": 1, "label_smoothing": 0.1}}
    out = run_probes(tiny_run, build_dataclass(ProbeConfig, over, "probe"), device="cpu", progress=False)
    lp = out["linear_probe"]
    assert lp["solver"] == "lars" and lp["standardize"] is False and lp["epochs_or_iters"] == 3
    s = lp["solver_settings"]
    assert (s["base_lr"], s["lr"], s["batch_size"], s["warmup_epochs"]) == (0.1, 0.1 * 64 / 256, 64, 1)
    assert (s["momentum"], s["trust_coefficient"], s["label_smoothing"]) == (0.9, 0.001, 0.1)
    assert s["steps_per_epoch"] == out["n_train"] // 64
    assert json.loads((tiny_run / "results" / "probe.json").read_text())["linear_probe"]["solver_settings"] == s
    from genrep.eval.report.summary import linear_text

    assert "BatchNorm on the features" in linear_text(lp) and "raw features" not in linear_text(lp)
    ev = replace(FAST, protocols=["probes"], probes=build_dataclass(ProbesSettings, {**over, "sweep": False},
                                                                    "eval.probes"))
    got = evaluate_run(tiny_run, ev, progress=False, say=lambda m: None)["protocols"]["probes"]["linear"]
    assert got["solver"] == "lars" and got["lr"] == 0.1 * 64 / 256 and got["batch_size"] == 64
    assert got["batch_size_asked"] == 64 and got["base_lr"] == 0.1 and got["standardize"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lars_probe_runs_on_gpu():
    x, y, xt, yt = blobs(600, 300, 16, 4, spread=0.5, seed=8)
    kw = dict(solver="lars", weight_decay=0.0, epochs=20, batch_size=128, base_lr=5.0, warmup_epochs=2)
    cpu = linear_probe(x, y, xt, yt, 4, **kw)
    gpu = linear_probe(x.cuda(), y.cuda(), xt.cuda(), yt.cuda(), 4, **kw)
    assert abs(cpu.test_acc - gpu.test_acc) <= 0.01 and gpu.solver_settings == cpu.solver_settings


def test_probe_reads_features_in_batches_no_larger_than_evaluates(tiny_run, monkeypatch):
    """A solver's batch (lars: MAE's 16,384) is not the network's: `genrep probe` extracts in the probe's batches up
    to evaluate's default, and in the probe's own when they are smaller."""
    from genrep.config import EvalConfig, ProbeConfig, build_dataclass
    from genrep.eval import evaluate
    from genrep.eval.protocols.context import EvalContext

    seen = []

    def stop(run, ev, **kwargs):
        seen.append(ev.batch_size)
        raise RuntimeError("stop before any work")

    monkeypatch.setattr(EvalContext, "open", staticmethod(stop))
    for batch in (16384, 32):
        with pytest.raises(RuntimeError, match="stop before any work"):
            evaluate.run_probes(tiny_run, build_dataclass(ProbeConfig, {"solver": "lars", "batch_size": batch},
                                                          "probe"), device="cpu", progress=False)
    assert seen == [EvalConfig().batch_size, 32]
