"""Selective classification: answer the images a score ranks highest, abstain on the rest. The risk-coverage curve
(the error rate among the answered against the share answered) and its area, AURC (Geifman and El-Yaniv, 2017): the
lower, the better the score ranks a classifier's errors last; answering at random gives the error rate itself."""

from __future__ import annotations

import torch
from torch import Tensor

CURVE_POINTS = 50   # the curve as eval.json keeps it: this many coverages, evenly spaced


def risk_coverage(score: Tensor, correct: Tensor) -> tuple[Tensor, Tensor, float]:
    """(coverage, selective risk) answering the k highest-scored images for k = 1..N, and the curve's area."""
    order = torch.argsort(score, descending=True, stable=True)
    errors = torch.cumsum((~correct.bool()[order]).double(), 0)
    k = torch.arange(1, len(score) + 1, dtype=torch.float64)
    risk = errors / k
    return k / len(score), risk, float(risk.mean())


def msp_selective(probs: Tensor, labels: Tensor) -> dict:
    """:func:`selective_summary` of a classifier's class probabilities ranked by their top one (MSP)."""
    top, predicted = probs.max(1)
    return selective_summary(top, predicted == labels.to(predicted.device))


def selective_summary(score: Tensor, correct: Tensor, points: int = CURVE_POINTS) -> dict:
    """AURC, the error rate answering everything, and the curve at ``points`` coverages; JSON-ready."""
    coverage, risk, aurc = risk_coverage(score.double().cpu(), correct.cpu())
    at = torch.linspace(0, len(risk) - 1, min(points, len(risk))).round().long()
    return {"aurc": aurc, "error_rate": float(risk[-1]), "n": len(risk),
            "coverage": [round(float(c), 6) for c in coverage[at]], "risk": [round(float(r), 6) for r in risk[at]]}
