"""The PNG figures of a run and of each protocol (written atomically): the training summary, the
reliability diagram, OOD score histograms, per-class energy histograms, PGD accuracy curves and CKA heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from ...errors import GenrepError
from ...io import save_figure
from ...train.logger import read_log
from ..metrics.calibration import calibration_bins
from ..metrics.ood import _scores, ood_metrics
from ..metrics.robustness import _check_eps, _check_norm
from .summary import fit_text, sweep_panels

__all__ = ["cka_heatmap", "energy_histograms", "reliability_diagram", "robustness_figure", "score_histogram",
           "summary_figure"]

_NORM_TITLES = {"linf": "$L_\\infty$", "l2": "$L_2$"}

# logged columns that are not loss terms
NOT_LOSS_TERMS = {"step", "epoch", "lr", "grad_norm", "images_per_s", "acc"}


def summary_figure(run: Path, probe: dict, path: Path) -> Path:
    """Training loss (and its terms, e.g. HybViT's ce and diff) over steps, and test accuracy of each read-out."""
    logged = read_log(run)
    rows = [r for r in logged if "loss" in r]
    evals = [r for r in logged if "eval_seconds" in r]  # train.eval_every (eval/periodic.py)
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(13.5 if evals else 9, 3.4))
    ax_loss, ax_acc = axes[0], axes[-1]
    if evals:
        _periodic_panel(axes[1], evals)
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


# right-hand axes of the periodic panel: (log key, label, colour); each gets its own axis, as their units differ
_PERIODIC_RIGHT = (("eval_knn5_loss", "5-NN test loss (0-1)", "#8172b2"), ("eval_fid", "FID", "#c44e52"))


def _periodic_panel(ax, rows: list[dict]) -> None:
    """The evaluations during training: accuracies (%) on the left axis; the 5-NN test loss (GCRL's table 9) and
    FID each on a right one."""
    steps = [r["step"] for r in rows]
    labels = {"eval_knn": "kNN accuracy", "eval_accuracy": "classifier accuracy"}
    for key, label in labels.items():
        if key in rows[-1]:
            ax.plot(steps, [100 * r.get(key, float("nan")) for r in rows], marker="o", ms=3, label=label)
    ax.set(xlabel="step", ylabel="test accuracy (%)", title="during training (EMA weights)")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    right = [spec for spec in _PERIODIC_RIGHT if spec[0] in rows[-1]]
    for i, (key, label, colour) in enumerate(right):
        twin = ax.twinx()
        if i:  # a second right axis sits outside the first
            twin.spines["right"].set_position(("axes", 1.0 + 0.18 * i))
        line, = twin.plot(steps, [r.get(key, float("nan")) for r in rows], color=colour, marker="s", ms=3,
                          label=label)
        twin.set_ylabel(label, color=colour)
        handles, names = handles + [line], names + [label]
    if handles:
        ax.legend(handles, names, fontsize=8)


def reliability_diagram(probs: Tensor, labels: Tensor, path, n_bins: int = 15, title: str = "") -> Path:
    """Reliability diagram (Guo et al. 2017) as a PNG: per-bin accuracy bars against the diagonal, the gap
    to each bin's mean confidence shaded, the ECE in the title, and a panel with the number of
    predictions per confidence bin below. Returns ``path``."""

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


def risk_coverage_figure(curves: dict[str, dict], path, title: str = "") -> Path:
    """Risk-coverage curves (PNG): each score's error rate among the answered against the share answered, its AURC
    in the legend, the error rate answering everything dotted. ``curves``: name -> ``selective_summary``'s dict."""
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for name, c in curves.items():
        ax.plot(c["coverage"], c["risk"], lw=1.5, label=f"{name} (AURC {c['aurc']:.3f})")
    rate = next(iter(curves.values()))["error_rate"]
    ax.axhline(rate, color="grey", ls=":", lw=1, label=f"answering all ({100 * rate:.1f}% errors)")
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage (share answered)", ylabel="selective risk (error rate)",
           title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(path, fig)


def score_histogram(scores: dict[str, Tensor], path, title: str = "", in_name: str | None = None) -> Path:
    """Overlaid density histograms of each set's scores (PNG), on shared bins; the in-distribution set
    (``in_name``, default the first entry) is drawn filled and each other set's legend entry carries its
    AUROC against it. Returns ``path``."""
    if not scores:
        raise GenrepError("score_histogram needs at least one set of scores")
    arrays = {k: _scores(v, k) for k, v in scores.items()}
    in_name = next(iter(arrays)) if in_name is None else in_name
    if in_name not in arrays:
        raise GenrepError(f"in-distribution set {in_name!r} is not among the scores ({', '.join(arrays)})")
    lo = min(a.min() for a in arrays.values())
    hi = max(a.max() for a in arrays.values())
    bins = np.linspace(lo, hi, 41) if hi > lo else np.linspace(lo - 0.5, hi + 0.5, 41)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.hist(arrays[in_name], bins=bins, density=True, alpha=0.5, color="#4c72b0",
            label=f"{in_name} (in, n={arrays[in_name].size})")
    colours = ["#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974"]
    for i, (name, a) in enumerate((k, v) for k, v in arrays.items() if k != in_name):
        auroc = ood_metrics(arrays[in_name], a)["auroc"]
        ax.hist(a, bins=bins, density=True, histtype="step", lw=1.5, color=colours[i % len(colours)],
                label=f"{name} (n={a.size}, AUROC {auroc:.3f})")
    ax.set(xlabel="score (higher = more in-distribution)", ylabel="density", title=title or None)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(path, fig)


def energy_histograms(histogram: dict, path: Path, classes: Sequence[str], title: str = "") -> Path:
    """One panel per class of ``classes``: the counts ``histogram["counts"][class]`` over the shared
    ``histogram["edges"]``, drawn horizontally with shared axes as the HybViT paper's figure 11 (energy up,
    count across), five panels a row. Returns ``path``."""
    if not classes:
        raise GenrepError("energy_histograms needs at least one class to draw")
    edges = np.asarray(histogram["edges"], dtype=float)
    missing = [c for c in classes if c not in histogram["counts"]]
    if edges.ndim != 1 or len(edges) < 2 or missing:
        raise GenrepError(f"energy_histograms needs bin edges and counts for every class drawn; missing: "
                          f"{', '.join(missing) or 'edges'}")
    cols = min(5, len(classes))
    rows = -(-len(classes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, classes):
        counts = np.asarray(histogram["counts"][name])
        ax.barh(edges[:-1], counts, height=np.diff(edges), align="edge", color="#4c72b0")
        ax.set_title(f"{name} (n={int(counts.sum())})", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("E(x) = logsumexp")
    for ax in axes[-1]:
        ax.set_xlabel("samples")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(path, fig)


def robustness_figure(results: dict[str, dict], path: Path, title: str = "") -> Path:
    """Accuracy (%) vs eps (in units of 1/255), one panel per norm, from ``{norm: {eps: accuracy}}``.

    ``eps`` keys may be numbers or the strings :func:`robust_accuracy` returns; several curves in one
    panel: pass ``{norm: {label: {eps: accuracy}}}`` instead (e.g. one curve per model).
    """
    if not isinstance(results, dict) or not results:
        raise GenrepError("robustness_figure needs {norm: {eps: accuracy}} with at least one norm")

    panels = {}
    for norm, curves in results.items():
        key = _check_norm(norm)
        if not isinstance(curves, dict) or not curves:
            raise GenrepError(f"robustness_figure: the {norm} entry must be a non-empty {{eps: accuracy}} dict")
        if not any(isinstance(v, dict) for v in curves.values()):
            curves = {"": curves}
        parsed = {}
        for label, accs in curves.items():
            try:
                pts = sorted((_check_eps(e), float(a)) for e, a in accs.items())
            except (TypeError, ValueError, AttributeError) as exc:
                raise GenrepError(f"robustness_figure: the {norm} entry must map eps to accuracy numbers") from exc
            parsed[str(label)] = pts
        panels[key] = parsed

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (norm, curves) in zip(axes[0], panels.items()):
        for label, pts in curves.items():
            ax.plot([e * 255 for e, _ in pts], [100 * a for _, a in pts], marker="o", ms=3.5, label=label or None)
        ax.set(xlabel="$\\epsilon$ (/255)", ylabel="accuracy (%)", ylim=(-2, 102),
               title=f"PGD {_NORM_TITLES[norm]}")
        ax.grid(alpha=0.3)
        if any(curves):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(path, fig)


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



def sweep_heatmaps(cells: list[dict], path: Path, title: str = "") -> Path:
    """One heatmap of test accuracy over block x t per (head, pool) of a read-out sweep (the paper's figure 2), each
    titled with how its head was fitted (L-BFGS, or Adam for so many epochs), the best cell of each panel outlined."""
    panels = sweep_panels(cells)
    blocks = sorted({c["block"] for c in cells})
    steps = sorted({c["t"] for c in cells}, key=lambda t: -1 if t is None else t)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * max(3.2, 1.2 + 0.42 * len(blocks)),
                                                  rows * max(2.6, 1.2 + 0.4 * len(steps))), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (head, pool) in zip(axes.flat, panels):
        m = np.full((len(steps), len(blocks)), np.nan)
        for c in cells:
            if (c["head"], c["pool"]) == (head, pool):
                m[steps.index(c["t"]), blocks.index(c["block"])] = 100 * c["acc"]
        im = ax.imshow(m, origin="lower", cmap="viridis", aspect="auto", interpolation="nearest")
        i, j = np.unravel_index(np.nanargmax(m), m.shape)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        if m.size <= 80:
            for (r, k), v in np.ndenumerate(m):
                if not np.isnan(v):
                    ax.text(k, r, f"{v:.0f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_yticks(range(len(steps)), ["clean" if t is None else str(t) for t in steps], fontsize=7)
        fit = fit_text(next(c for c in cells if (c["head"], c["pool"]) == (head, pool)))
        ax.set(xlabel="block", ylabel="t")
        ax.set_title(f"{head} ({fit}), pool {pool}", fontsize=8)
        fig.colorbar(im, ax=ax, label="accuracy (%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(path, fig)


def sweep_pool_lines(cells: list[dict], path: Path, title: str = "") -> Path:
    """Best accuracy over t per block, one line per (head, pool): what the pooling size does (figure 2, right)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for head, pool in sweep_panels(cells):
        mine = [c for c in cells if (c["head"], c["pool"]) == (head, pool)]
        blocks = sorted({c["block"] for c in mine})
        best = [100 * max(c["acc"] for c in mine if c["block"] == b) for b in blocks]
        ax.plot(blocks, best, marker="o", label=f"{head} ({fit_text(mine[0])}), pool {pool}")
    ax.set(xlabel="block", ylabel="best accuracy over t (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(path, fig)


def grid_heatmap(values, path: Path, row_labels: Sequence[str], col_labels: Sequence[str], *,
                 row_name: str = "", col_name: str = "", title: str = "", label: str = "accuracy (%)") -> Path:
    """A grid of short runs (`genrep grid`) as a heatmap PNG: rows x columns of accuracy (%), NaN where a cell has
    no result, each cell written in %, the best outlined in red. Row 0 is at the top, as in the printed table."""
    m = np.asarray(values, dtype=np.float64)
    if m.ndim != 2 or 0 in m.shape or m.shape != (len(row_labels), len(col_labels)):
        raise GenrepError(f"grid_heatmap needs a rows x columns matrix with one label per row and column, got shape "
                          f"{m.shape} for {len(row_labels)} x {len(col_labels)} labels")
    fig, ax = plt.subplots(figsize=(max(3.8, 2.2 + 0.85 * m.shape[1]), max(2.4, 1.5 + 0.6 * m.shape[0])))
    finite = np.isfinite(m)
    lo, hi = (np.nanmin(m), np.nanmax(m)) if finite.any() else (0.0, 100.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=lo, vmax=hi, aspect="auto",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label=label)
    for (i, j), v in np.ndenumerate(m):
        if np.isfinite(v):
            light = (v - lo) / (hi - lo) > 0.6  # viridis is light at the top of its range
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="black" if light else "white")
        else:
            ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="grey")
    if finite.any():
        i, j = np.unravel_index(np.nanargmax(m), m.shape)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(m.shape[1]), list(col_labels), rotation=30 if max(map(len, col_labels)) > 6 else 0)
    ax.set_yticks(range(m.shape[0]), list(row_labels))
    ax.set(xlabel=col_name, ylabel=row_name, title=title)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return save_figure(path, fig)
