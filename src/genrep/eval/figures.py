"""Figures of a run (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt

from ..io import save_figure
from ..train.logger import read_log

# logged columns that are not loss terms
NOT_LOSS_TERMS = {"step", "epoch", "lr", "grad_norm", "images_per_s", "acc"}


def summary_figure(run: Path, probe: dict, path: Path) -> Path:
    """Training loss (and its terms, e.g. HybViT's ce and diff) over steps, and test accuracy of each read-out."""
    rows = read_log(run)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    if rows:
        steps = [r["step"] for r in rows]
        parts = [k for k in rows[-1] if k not in NOT_LOSS_TERMS and k != "loss"]
        # one term is the loss itself; several are worth seeing apart (HybViT: ce and diff)
        terms = ["loss"] + (parts if len(parts) > 1 else [])
        positive = True
        for k in terms:
            values = [r.get(k, float("nan")) for r in rows]
            ax_loss.plot(steps, values, lw=1.5 if k == "loss" else 1.0, label=k)
            positive &= min(values) > 0
        if positive:  # the last orders of magnitude are where runs differ
            ax_loss.set_yscale("log")
        if len(terms) > 1:
            ax_loss.legend(fontsize=8)
    ax_loss.set(xlabel="step", ylabel="training loss", title=f"{probe.get('recipe') or probe['method']}")
    ax_loss.grid(alpha=0.3)
    names, accs = [], []
    if "classifier_test_acc" in probe:
        names.append("classifier")
        accs.append(probe["classifier_test_acc"])
    names.append("linear probe")
    accs.append(probe["linear_probe"]["test_acc"])
    for k, acc in probe["knn"].items():
        names.append(f"kNN k={k}")
        accs.append(acc)
    bars = ax_acc.bar(names, [100 * a for a in accs], color="#4c72b0")
    ax_acc.bar_label(bars, fmt="%.1f")
    chance = 100 / probe["num_classes"]
    ax_acc.axhline(chance, color="grey", ls="--", lw=1)
    ax_acc.annotate("chance", (1.0, chance), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", color="grey", fontsize=8)
    ax_acc.set(ylabel="test accuracy (%)", ylim=(0, 105),
               title=f"{probe['data']}: layer {probe['layer']}, {probe['pool']} pool")
    ax_acc.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return save_figure(path, fig)
