"""Representation similarity: linear CKA between layers / models, and t-SNE maps of features.

Linear CKA (Kornblith et al. 2019, "Similarity of neural network representations revisited"; used by
the diffusion-features paper, Sec. 4.3, between the blocks of one model and across models). For
features X [N, D1] and Y [N, D2] of the same N images, with columns centred,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = X X^T, L = Y Y^T,

where HSIC(K, L) = tr(K H L H) / (N - 1)^2 and H = I - 11^T / N (the constants cancel). It lies in
[0, 1], is 1 for identical features, and is invariant to orthogonal transforms, isotropic scaling and
mean shifts of either side. Computed in float64 on the device of the inputs, each term in whichever of
the feature form (D x D products) or the kernel form (N x N Gram matrices) is cheaper. Inputs with
more than two dimensions (e.g. token maps [N, T, D]) are flattened to [N, -1].

A representation that is the same for every image (zero variance after centring) makes CKA 0/0; that
is an error (GenrepError naming the input), never a NaN or an invented 0 or 1.

t-SNE (:func:`tsne_figure`; the GCRL paper's Figure 4): scikit-learn's Barnes-Hut t-SNE with
``init="pca"``, seeded, perplexity 30 clipped to (n - 1) / 3 for small n, on features first reduced
to 50 dimensions by PCA when wider (the usual t-SNE preprocessing). In-distribution points are
coloured by class; OOD points, embedded jointly with them, are grey.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import GenrepError

__all__ = ["cka_heatmap", "cka_matrix", "linear_cka", "tsne_figure"]


# --------------------------------------------------------------------------------------------------
# linear CKA


def _as_features(x, name: str, device: torch.device | None = None) -> Tensor:
    """Any [N, ...] real array -> float64 [N, D] on ``device`` (or its own device)."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(np.asarray(x))
        except Exception as exc:
            raise GenrepError(f"{name} must be a tensor or array of features [N, D], got "
                              f"{type(x).__name__}") from exc
    if x.dim() < 2:
        raise GenrepError(f"{name} must be features [N, D] (one row per image), got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise GenrepError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.shape[0] < 2:
        raise GenrepError(f"{name} has {x.shape[0]} row(s); CKA compares how images relate to each other, "
                          f"so it needs at least 2 images")
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] == 0:
        raise GenrepError(f"{name} has 0 feature dimensions; pass features [N, D] with D >= 1")
    x = x.to(device=device if device is not None else x.device, dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise GenrepError(f"{name} has non-finite values (NaN/inf); fix or drop those rows before CKA")
    return x


def _centred_unit(x: Tensor, name: str) -> Tensor:
    """Columns centred, then scaled to unit Frobenius norm (CKA is scale-free; this keeps sums O(1))."""
    xc = x - x.mean(dim=0, keepdim=True)
    total, spread = float(x.norm()), float(xc.norm())
    # relative test: centring a constant float32 column in float64 leaves rounding dust, not signal
    if spread <= 1e-10 * total:
        raise GenrepError(f"{name} is the same for every image (zero variance), so CKA is undefined; "
                          f"check that the layer/model produces input-dependent features")
    return xc / spread


def _self_term(xc: Tensor) -> float:
    """||X^T X||_F (= ||X X^T||_F), through the smaller Gram matrix."""
    n, d = xc.shape
    gram = xc.T @ xc if d <= n else xc @ xc.T
    return float(gram.norm())


def _cross_term(xc: Tensor, yc: Tensor) -> float:
    """||Y^T X||_F^2 (= <X X^T, Y Y^T>_F), by the cheaper of the feature and the kernel form."""
    n, d1 = xc.shape
    d2 = yc.shape[1]
    if d1 * d2 <= n * (d1 + d2 + 1):
        return float((yc.T @ xc).pow(2).sum())
    return float(((xc @ xc.T) * (yc @ yc.T)).sum())


def _cka(xc: Tensor, yc: Tensor, sx: float, sy: float) -> float:
    # Cauchy-Schwarz bounds it by [0, 1]; clamp only the last-bit rounding
    return min(1.0, max(0.0, _cross_term(xc, yc) / (sx * sy)))


def linear_cka(x, y) -> float:
    """Linear CKA of two feature sets of the same N images, ``x`` [N, D1] and ``y`` [N, D2] (a float in [0, 1]).

    See the module docstring for the formula and the zero-variance rule. ``y`` is moved to ``x``'s device.
    """
    x = _as_features(x, "x")
    y = _as_features(y, "y", x.device)
    if x.shape[0] != y.shape[0]:
        raise GenrepError(f"CKA compares features of the same images, but x has {x.shape[0]} rows and y has "
                          f"{y.shape[0]}; extract both from the same image set")
    xc, yc = _centred_unit(x, "x"), _centred_unit(y, "y")
    return _cka(xc, yc, _self_term(xc), _self_term(yc))


def _prepare_list(feats, name: str, device: torch.device | None, n: int | None):
    if isinstance(feats, (Tensor, np.ndarray, str)) or not isinstance(feats, Sequence) or not feats:
        raise GenrepError(f"{name} must be a non-empty list of feature tensors [N, D] (one per layer or model)")
    out = []
    for i, f in enumerate(feats):
        f = _as_features(f, f"{name}[{i}]", device)
        device = f.device
        if n is None:
            n = f.shape[0]
        elif f.shape[0] != n:
            raise GenrepError(f"{name}[{i}] has {f.shape[0]} rows but the other features have {n}; CKA needs "
                              f"every feature set extracted from the same images")
        fc = _centred_unit(f, f"{name}[{i}]")
        out.append((fc, _self_term(fc)))
    return out, device, n


def cka_matrix(feats_a: Sequence[Tensor], feats_b: Sequence[Tensor] | None = None) -> Tensor:
    """Linear CKA between every pair, ``M[i, j] = CKA(feats_a[i], feats_b[j])``: float64 [La, Lb] on the CPU.

    ``feats_b`` defaults to ``feats_a`` (layers of one model against each other): the matrix is then
    symmetric and each pair is computed once. All feature sets must come from the same N images;
    they are moved to the device of ``feats_a[0]``.
    """
    a, device, n = _prepare_list(feats_a, "feats_a", None, None)
    if feats_b is None:
        m = torch.empty(len(a), len(a), dtype=torch.float64)
        for i, (xc, sx) in enumerate(a):
            for j in range(i, len(a)):
                yc, sy = a[j]
                m[i, j] = m[j, i] = _cka(xc, yc, sx, sy)
        return m
    b, _, _ = _prepare_list(feats_b, "feats_b", device, n)
    m = torch.empty(len(a), len(b), dtype=torch.float64)
    for i, (xc, sx) in enumerate(a):
        for j, (yc, sy) in enumerate(b):
            m[i, j] = _cka(xc, yc, sx, sy)
    return m


# --------------------------------------------------------------------------------------------------
# figures


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


def _labels_for(labels, count: int, what: str) -> list[str]:
    if labels is None:
        return [str(i + 1) for i in range(count)]
    labels = [str(v) for v in labels]
    if len(labels) != count:
        raise GenrepError(f"cka_heatmap got {len(labels)} {what} labels for a matrix with {count} {what}s; "
                          f"pass one label per {what}")
    return labels


def cka_heatmap(matrix, path: Path, row_labels: Sequence | None = None, col_labels: Sequence | None = None,
                title: str = "", xlabel: str = "layer", ylabel: str = "layer") -> Path:
    """A CKA matrix [La, Lb] as a heatmap PNG (colour scale fixed to [0, 1]; values written in small matrices).

    Row 0 is at the bottom, as in Kornblith et al.; labels default to 1..L.
    """
    m = np.asarray(matrix.detach().cpu() if isinstance(matrix, Tensor) else matrix, dtype=np.float64)
    if m.ndim != 2 or 0 in m.shape:
        raise GenrepError(f"cka_heatmap needs a 2-D CKA matrix [La, Lb], got shape {m.shape}")
    rows = _labels_for(row_labels, m.shape[0], "row")
    cols = _labels_for(col_labels, m.shape[1], "column")
    plt = _pyplot()
    from ..io import save_figure

    side = 0.45
    fig, ax = plt.subplots(figsize=(max(3.5, 1.6 + side * m.shape[1]), max(3.0, 1.0 + side * m.shape[0])))
    im = ax.imshow(m, origin="lower", cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set_xticks(range(m.shape[1]), cols, rotation=90 if max(map(len, cols)) > 3 else 0)
    ax.set_yticks(range(m.shape[0]), rows)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if max(m.shape) <= 12:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 else "white")
    fig.tight_layout()
    return save_figure(path, fig)


def _as_numpy_features(x, name: str) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise GenrepError(f"{name} must be features [N, D] with N >= 1, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise GenrepError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.reshape(x.shape[0], -1).astype(np.float32)
    if not np.isfinite(x).all():
        raise GenrepError(f"{name} has non-finite values (NaN/inf); fix or drop those rows before t-SNE")
    return x


def _subsample(n: int, max_points: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= max_points else np.sort(rng.choice(n, size=max_points, replace=False))


def _class_colours(plt, k: int):
    if k <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(k)]
    if k <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(k)]
    return [plt.get_cmap("turbo")(v) for v in np.linspace(0.05, 0.95, k)]


def tsne_figure(features, labels, path: Path, *, classes: Sequence[str] | None = None, ood_features=None,
                ood_name: str = "OOD", seed: int = 0, max_points: int = 2000, title: str = "") -> Path:
    """2-D t-SNE of ``features`` [N, D] coloured by ``labels`` [N], with ``ood_features`` in grey (PNG).

    At most ``max_points`` in-distribution and ``max_points`` OOD points are kept (seeded random
    subsets); both sets are embedded together. ``classes`` names the labels in the legend
    (default: the label numbers). See the module docstring for the t-SNE settings.
    """
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise GenrepError(f"max_points must be an integer >= 2, got {max_points!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenrepError(f"seed must be an integer, got {seed!r}")
    x = _as_numpy_features(features, "features")
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise GenrepError(f"labels must be integer class indices [N] with N = {len(x)}, got {y.dtype} {y.shape}")
    if y.min() < 0:
        raise GenrepError(f"labels must be >= 0 (class indices), got {int(y.min())}")
    num_classes = int(y.max()) + 1 if classes is None else len(classes)
    if y.max() >= num_classes:
        raise GenrepError(f"labels go up to {int(y.max())} but {num_classes} class names were given; "
                          f"pass one name per class")
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(num_classes)]
    rng = np.random.default_rng(seed)
    keep = _subsample(len(x), max_points, rng)
    x, y = x[keep], y[keep]
    parts = [x]
    if ood_features is not None:
        ood = _as_numpy_features(ood_features, "ood_features")
        if ood.shape[1] != x.shape[1]:
            raise GenrepError(f"ood_features have {ood.shape[1]} dimensions but features have {x.shape[1]}; "
                              f"extract both with the same model, layer and pooling")
        ood = ood[_subsample(len(ood), max_points, rng)]
        parts.append(ood)
    data = np.concatenate(parts)
    n = len(data)
    if n < 4:
        raise GenrepError(f"t-SNE needs at least 4 points, got {n}")

    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if data.shape[1] > 50:
        data = PCA(n_components=min(50, n), random_state=seed).fit_transform(data)
    perplexity = min(30.0, max(1.0, (n - 1) / 3))
    # scikit-learn's OpenMP threads and torch's (a second OpenMP runtime) spin against each other: a
    # 60-point t-SNE took 30 s instead of 0.3 s. One thread embeds max_points=2000 in about 10 s.
    with threadpool_limits(limits=1, user_api="openmp"):
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                   random_state=seed).fit_transform(data)

    plt = _pyplot()
    from ..io import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    if len(parts) > 1:
        e = emb[len(x):]
        ax.scatter(e[:, 0], e[:, 1], s=6, c="0.6", alpha=0.6, linewidths=0, label=ood_name)
    colours = _class_colours(plt, num_classes)
    e = emb[:len(x)]
    for k in range(num_classes):
        sel = y == k
        if sel.any():
            ax.scatter(e[sel, 0], e[sel, 1], s=6, color=colours[k], linewidths=0, label=names[k])
    shown = int(np.unique(y).size) + (len(parts) > 1)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=2.5, frameon=False,
              ncol=max(1, math.ceil(shown / 20)))
    ax.set(xticks=[], yticks=[], title=title or "t-SNE of features")
    fig.tight_layout()
    return save_figure(path, fig)
