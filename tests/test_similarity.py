"""Linear CKA, CKA heatmaps and t-SNE figures (genrep.eval.metrics.similarity, genrep.eval.report)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_line
from PIL import Image

from genrep.errors import GenrepError
from genrep.eval.metrics.similarity import cka_matrix, linear_cka
from genrep.eval.report.figures import cka_heatmap
from genrep.eval.report.tsne import tsne_figure


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The kernel form, written out: HSIC(K, L) = tr(K H L H) / (n - 1)^2, K = X X^T, L = Y Y^T."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)

    def hsic(k, m):
        return torch.trace(k @ h @ m @ h) / (n - 1) ** 2

    k, m = x @ x.T, y @ y.T
    return float(hsic(k, m) / torch.sqrt(hsic(k, k) * hsic(m, m)))


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_identical_features_give_one():
    x = _rand(50, 8, 0)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariances():
    x, y = _rand(60, 10, 0), _rand(60, 7, 1) + 0.5 * _rand(60, 10, 0)[:, :7]
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    q = _orthogonal(10, 3)
    assert linear_cka(x.double() @ q, y) == pytest.approx(base, abs=1e-10)       # rotation
    assert linear_cka(37.0 * x.double(), 0.01 * y.double()) == pytest.approx(base, abs=1e-10)      # isotropic scaling
    assert linear_cka(x + 5.0, y - torch.arange(7.0)) == pytest.approx(base, abs=1e-6)  # mean shifts
    assert linear_cka(y, x) == pytest.approx(base, abs=1e-12)                    # symmetric


def test_not_invariant_to_anisotropic_scaling():
    x, y = _rand(60, 6, 0), _rand(60, 6, 1) + _rand(60, 6, 0)
    scale = torch.tensor([10.0, 1, 1, 1, 1, 0.1])
    assert abs(linear_cka(x * scale, y) - linear_cka(x, y)) > 1e-3


@pytest.mark.parametrize("n,d1,d2", [(40, 5, 9), (12, 30, 50)])   # feature form; kernel form (D > N)
def test_matches_the_hsic_kernel_form(n, d1, d2):
    x, y = _rand(n, d1, 2), _rand(n, d2, 3)
    value = linear_cka(x, y)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(_hsic_cka(x, y), abs=1e-10)


def test_accepts_arrays_and_flattens_token_maps():
    x = np.random.default_rng(0).normal(size=(20, 3, 4))
    assert linear_cka(x, x.reshape(20, 12)) == pytest.approx(1.0, abs=1e-12)


def test_cka_matrix():
    base = _rand(40, 6, 0)
    feats = [base, base @ torch.randn(6, 6) + 0.3 * _rand(40, 6, 1), _rand(40, 3, 2)]
    m = cka_matrix(feats)
    assert m.shape == (3, 3) and m.dtype == torch.float64
    torch.testing.assert_close(m.diagonal(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(m, m.T, rtol=0, atol=0)
    assert m[0, 2] == pytest.approx(linear_cka(feats[0], feats[2]), abs=1e-12)
    cross = cka_matrix(feats, feats[:2])
    assert cross.shape == (3, 2)
    torch.testing.assert_close(cross, m[:, :2], rtol=0, atol=1e-12)
    assert ((m >= 0) & (m <= 1)).all()


def test_bad_inputs_are_one_line_errors():
    x = _rand(10, 4, 0)
    cases = [((x, _rand(9, 4, 1)), "rows"), ((x[:1], x[:1]), "at least 2"),
             ((x, torch.ones(10, 3)), "zero variance"), ((torch.full((10, 2), float("nan")), x), "non-finite"),
             ((torch.arange(10.0), x), "[N, D]")]
    for args, fragment in cases:
        with pytest.raises(GenrepError) as e:
            linear_cka(*args)
        assert fragment in one_line(e), one_line(e)
    # a constant float32 column centred in float64 leaves rounding dust: still "zero variance", not a number
    with pytest.raises(GenrepError) as e:
        linear_cka(torch.full((10, 2), 0.1), x)
    assert "x is the same for every image" in one_line(e)
    with pytest.raises(GenrepError) as e:
        cka_matrix([x, _rand(8, 4, 1)])
    assert "feats_a[1]" in one_line(e)
    with pytest.raises(GenrepError) as e:
        cka_matrix([])
    one_line(e)


def _is_png(path):
    with Image.open(path) as im:
        return im.format == "PNG"


def test_cka_heatmap(tmp_path):
    m = cka_matrix([_rand(30, 4, i) for i in range(3)])
    path = cka_heatmap(m, tmp_path / "cka.png", ["block 1", "block 2", "block 3"], None, title="layers")
    assert _is_png(path)
    with pytest.raises(GenrepError) as e:
        cka_heatmap(m, tmp_path / "bad.png", ["a"], None)
    assert "row labels" in one_line(e)


def test_tsne_figure_with_and_without_ood(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    feats = rng.normal(size=(60, 8)) + 4.0 * np.eye(8)[labels]
    ood = torch.from_numpy(rng.normal(size=(30, 8)) - 3.0)
    p1 = tsne_figure(torch.from_numpy(feats), torch.from_numpy(labels), tmp_path / "tsne.png",
                     classes=["a", "b", "c"], title="digits")
    p2 = tsne_figure(feats, labels, tmp_path / "tsne_ood.png", ood_features=ood, ood_name="svhn", max_points=40)
    assert _is_png(p1) and _is_png(p2)
    wide = rng.normal(size=(30, 70))              # > 50 dims: PCA first
    assert _is_png(tsne_figure(wide, labels[:30], tmp_path / "wide.png"))
    with pytest.raises(GenrepError) as e:
        tsne_figure(feats, labels[:10], tmp_path / "bad.png")
    one_line(e)
    with pytest.raises(GenrepError) as e:
        tsne_figure(feats, labels, tmp_path / "bad.png", ood_features=ood[:, :4])
    assert "dimensions" in one_line(e)
    with pytest.raises(GenrepError) as e:
        tsne_figure(feats, labels, tmp_path / "bad.png", classes=["a", "b"])
    one_line(e)
