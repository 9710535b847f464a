"""t-SNE map of features (the GCRL paper's Figure 4).

scikit-learn's Barnes-Hut t-SNE with ``init="pca"``, seeded, perplexity 30 clipped to (n - 1) / 3 for small
n, on features first reduced to 50 dimensions by PCA when wider (the usual t-SNE preprocessing).
In-distribution points are coloured by class; OOD points, embedded jointly with them, are grey.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from ...errors import GenrepError

__all__ = ["tsne_figure"]


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
    (default: the label numbers). See the module docstring for the settings.
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

    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    from ...io import save_figure

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
