"""Calibration: the expected calibration error.

ECE (Guo et al. 2017; the GCRL and HybViT papers): predictions are binned by confidence (the top-class
probability) into ``n_bins`` equal-width bins; ECE = sum_b (n_b / N) |acc_b - conf_b|. Bin b holds
confidences in (b/n, (b+1)/n], except that bin 0 also holds 0 exactly, so a confidence of exactly 1.0
falls in the last bin (not in a phantom bin n) and empty bins contribute nothing.

A classifier's probabilities come from :func:`genrep.eval.protocols.calibration.predict_probs`; the
reliability diagram is :func:`genrep.eval.report.figures.reliability_diagram`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import GenrepError


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

