"""Calibration: expected calibration error and reliability diagrams.

ECE (Guo et al. 2017; the GCRL and HybViT papers): predictions are binned by confidence (the top-class
probability) into ``n_bins`` equal-width bins; ECE = sum_b (n_b / N) |acc_b - conf_b|. Bin b holds
confidences in (b/n, (b+1)/n], except that bin 0 also holds 0 exactly, so a confidence of exactly 1.0
falls in the last bin (not in a phantom bin n) and empty bins contribute nothing.

:func:`predict_probs` gives a classifier's softmax probabilities (float32) for images, and
:func:`reliability_diagram` draws the per-bin accuracy against the diagonal with the ECE.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import GenrepError


def _check_probs(probs: Tensor, labels: Tensor, n_bins: int) -> None:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise GenrepError(f"the number of ECE bins must be a positive integer, got {n_bins!r}")
    if probs.dim() != 2 or labels.dim() != 1 or len(probs) != len(labels):
        raise GenrepError(f"ECE needs probabilities [N, K] and labels [N], got {tuple(probs.shape)} and "
                          f"{tuple(labels.shape)}")
    if len(probs) == 0:
        raise GenrepError("ECE of an empty set is undefined; evaluate on at least one image")
    if not torch.isfinite(probs).all():
        raise GenrepError("ECE got non-finite probabilities (NaN or inf); check the model's logits")


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (0 where a bin is empty), float64."""
    _check_probs(probs, labels, n_bins)
    conf, pred = probs.double().max(dim=1)
    correct = (pred == labels.to(pred.device)).double()
    # ceil(conf * n) - 1 puts conf in (b/n, (b+1)/n] into bin b; clamp sends 0 to bin 0, 1.0 stays in n-1
    idx = (torch.ceil(conf * n_bins) - 1).clamp_(0, n_bins - 1).long()
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, idx, conf)
    acc_sum = torch.zeros_like(count).index_add_(0, idx, correct)
    safe = count.clamp(min=1)
    return {"count": count.cpu(), "confidence": (conf_sum / safe).cpu(), "accuracy": (acc_sum / safe).cpu()}


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE in [0, 1] of class probabilities ``probs`` [N, K] against integer ``labels`` [N]."""
    b = calibration_bins(probs, labels, n_bins)
    return float((b["count"] / b["count"].sum() * (b["accuracy"] - b["confidence"]).abs()).sum())


def methods_with(capability: str) -> list[str]:
    """Registered method names offering ``capability``, for error messages that say what would apply."""
    from ..methods import get_method, method_names

    return [m for m in method_names() if capability in get_method(m).capabilities]


def predict_probs(method, images_uint8: Tensor, *, device: torch.device | str = "cpu", batch_size: int = 512,
                  progress: bool = False) -> Tensor:
    """Class probabilities softmax(logits) [N, K], float32 on the CPU, of uint8 [N, C, H, W] images.

    The softmax is taken in float32 whatever dtype the head returns, so a bf16 model's confidences are
    not rounded into the wrong ECE bin.
    """
    if "logits" not in method.capabilities:
        raise GenrepError(f"ECE needs a classifier head, and {method.name} has none; it applies to methods with "
                          f"the 'logits' capability ({', '.join(methods_with('logits')) or 'none registered'})")
    if not isinstance(images_uint8, Tensor) or images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise GenrepError(f"predict_probs needs uint8 images [N, C, H, W], got "
                          f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)} "
                          f"{tuple(getattr(images_uint8, 'shape', ()))}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GenrepError(f"batch_size must be a positive integer, got {batch_size!r}")
    method.eval()
    from .features import image_batches

    chunks = [torch.zeros(0, method.data.num_classes)]
    with torch.no_grad():
        for x in image_batches(images_uint8, batch_size, device, progress=progress, desc="probabilities"):
            chunks.append(torch.softmax(method.logits(x).float(), dim=-1).cpu())
    return torch.cat(chunks)


def reliability_diagram(probs: Tensor, labels: Tensor, path, n_bins: int = 15, title: str = "") -> Path:
    """Reliability diagram (Guo et al. 2017) as a PNG: per-bin accuracy bars against the diagonal, the gap
    to each bin's mean confidence shaded, the ECE in the title, and a panel with the number of
    predictions per confidence bin below. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    from ..io import save_figure

    b = calibration_bins(probs, labels, n_bins)
    count, conf, acc = b["count"].numpy(), b["confidence"].numpy(), b["accuracy"].numpy()
    ece = float((count / count.sum() * abs(acc - conf)).sum())
    width = 1.0 / n_bins
    left = [i * width for i in range(n_bins)]
    filled = count > 0
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(4.6, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(left, acc, width=width, align="edge", color="#4c72b0", edgecolor="white", lw=0.5, label="accuracy")
    # the gap is drawn from accuracy to the bin's mean confidence (not its centre): that is what ECE sums
    ax.bar([x for x, f in zip(left, filled) if f], (conf - acc)[filled], bottom=acc[filled], width=width,
           align="edge", color="#dd8452", alpha=0.45, edgecolor="#c44e52", hatch="//", lw=0.5, label="gap")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
           title=f"{title + ': ' if title else ''}ECE {100 * ece:.2f}% ({n_bins} bins, n={int(count.sum())})")
    ax.legend(loc="upper left", fontsize=8, title=f"ECE = {100 * ece:.2f}%", title_fontsize=8)
    ax.grid(alpha=0.3)
    ax_n.bar(left, count, width=width, align="edge", color="#8c8c8c", edgecolor="white", lw=0.5)
    ax_n.set(xlabel="confidence (top-class probability)", ylabel="predictions")
    ax_n.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(path, fig)
