"""Representation similarity: linear CKA between layers / models.

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
(The t-SNE map is :func:`genrep.eval.report.tsne.tsne_figure`.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ...errors import GenrepError

__all__ = ["cka_matrix", "linear_cka"]


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


