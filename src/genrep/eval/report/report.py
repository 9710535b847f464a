"""`genrep report RUN... -o report.html`: one self-contained page comparing runs side by side.

One table per protocol with one row per run (as the papers' tables), then each run's figures. Images
are inlined as base64 data URIs so the file can be mailed or archived alone. The report only reads
``RUN/results/eval.json`` (and the figures it names): it never recomputes a number. A figure is embedded
only if it is a PNG inside the run folder; any other entry is shown as "figure not shown: <reason>".
A grid folder (`genrep grid`) among the folders gets a section of its own: its ``grid.json`` (checked to be
genrep's, else a one-line error naming it) as a table, and its heatmap, embedded under the same rules.
"""

from __future__ import annotations

import base64
import html
import io
import os
import stat
import sys
import time
from pathlib import Path

from ...errors import GenrepError
from ...io import atomic_write_text
from ..evaluate import EVAL_FILE, read_results
from ..protocols import PROTOCOLS
from ..protocols.context import RESULTS_DIR
from .summary import attack_text, fit_text, gaussian_text, linear_text, mask_text, sampling_text, training_text

TITLES = {"probes": "Representation probes", "calibration": "Calibration", "ood": "Out-of-distribution detection",
          "likelihood": "Likelihood", "generation": "Generation", "completion": "Image completion",
          "energy": "Energy of samples by class",
          "robustness": "Adversarial robustness (PGD)",
          "similarity": "Representation similarity", "finetune": "Fine-tuning", "lowshot": "Low-shot transfer",
          "sweep": "Read-out sweep (block x t x pool x head)"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}td.skip{color:#777;font-style:italic;text-align:left}
tr.best td{font-weight:600}.note{color:#555;font-size:.92em}figure{display:inline-block;margin:.5em;vertical-align:top}
figure img{max-width:540px;border:1px solid #ddd}figcaption{font-size:.9em;color:#444;text-align:center}
.custom{color:#a33}.refused{color:#a33}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x, fmt=".4f") -> str:
    return "–" if x is None else format(x, fmt)


def _mb(mean, std, scale=100.0, fmt=".2f") -> str:
    return f"{scale * mean:{fmt}} ± {scale * std:{fmt}}"


class Table:
    def __init__(self, columns: list[str]):
        self.columns, self.rows = columns, []

    def add(self, cells: list[str]) -> None:
        self.rows.append("<tr>" + "".join(f'<td class="l">{c}</td>' if i < 2 else f"<td>{c}</td>"
                                          for i, c in enumerate(cells)) + "</tr>")

    def skip(self, run_label: str, reason: str) -> None:
        self.rows.append(f'<tr><td class="l">{run_label}</td><td class="skip" colspan="{len(self.columns) - 1}">'
                         f"not applicable: {_e(reason)}</td></tr>")

    def html(self) -> str:
        head = "".join(f'<th class="l">{_e(c)}</th>' if i < 2 else f"<th>{_e(c)}</th>"
                       for i, c in enumerate(self.columns))
        return f"<table><tr>{head}</tr>{''.join(self.rows)}</table>"


def _label(r: dict) -> str:
    return f"{_e(r['method'])} <span class='note'>({_e(Path(r['run']).name)})</span>"


def _init_note(r: dict) -> str:
    """Where a continued run's weights came from (genrep pretrain --init): the source run, step and weights sha256."""
    init = r.get("init")
    if not isinstance(init, dict):
        return ""
    step = f" step {init['step']}" if init.get("step") is not None else ""
    return (f"<br><span class='note'>continued from {_e(str(init.get('run')))}{step} (weights sha256 "
            f"{_e(str(init.get('sha256'))[:12])})</span>")


def _size(r: dict) -> str:
    """Trainable / total parameters (files before the split held the total alone)."""
    p = r["params"]
    if isinstance(p, dict):
        return f"{p['trainable'] / 1e6:.2f}M / {p['total'] / 1e6:.2f}M"
    return f"{p / 1e6:.2f}M"


# ----------------------------------------------------------------------------------------- per protocol
def _results(runs: list[dict], name: str, table: Table | None = None):
    """(run, its results of protocol ``name``) for each run that has them; a skipped run gets a row saying
    why in ``table``."""
    for r in runs:
        p = r["protocols"].get(name)
        if p is None:
            continue
        if "skipped" in p:
            if table is not None:
                table.skip(_label(r), p["skipped"])
            continue
        yield r, p


def _probes(runs: list[dict]) -> str:
    knn_ks = sorted({k for r in runs for k in r["protocols"].get("probes", {}).get("knn", {})}, key=int)
    t = Table(["run", "data", "size (trainable / total)", "layer / pool", "classifier", "linear", "linear ECE",
               "linear AURC", *[f"kNN k={k}" for k in knn_ks], "best sweep: layer / pool", "best sweep linear"])
    linear = set()
    for r, p in _results(runs, "probes"):
        b = p.get("best") or {}
        lin = p.get("linear", {})
        linear.add(f"{linear_text({'solver': 'adamw', 'weight_decay': 1e-4, **lin})}, batch {lin.get('batch_size', 512)}")
        t.add([_label(r), _e(r["data"]), _size(r), f"{p['layer']} / {p['pool']}{mask_text(p)}", _pct(p.get("classifier_acc")),
               _pct(p["linear_acc"]), _pct(p.get("linear_ece")), _num(p.get("linear_selective", {}).get("aurc")),
               *[_pct(p["knn"].get(k)) for k in knn_ks],
               f"{b['layer']} / {b['pool']}" if b else "–", _pct(b.get("linear_acc"))])
    sweeps = []
    for r, p in _results(runs, "probes"):
        if "sweep" not in p:
            continue
        s = Table(["layer", "pool", "linear (L-BFGS)", "kNN"])
        best = (p["best"]["layer"], p["best"]["pool"])
        for row in p["sweep"]:
            s.add([str(row["layer"]), _e(row["pool"]), _pct(row["linear_acc"]), _pct(row["knn_acc"])])
            if (row["layer"], row["pool"]) == best:
                s.rows[-1] = s.rows[-1].replace("<tr>", '<tr class="best">', 1)
        sweeps.append(f"<details><summary>{_label(r)}: layer and pooling sweep</summary>{s.html()}</details>")
    note = (f"<p class='note'>Test accuracy (%), and the linear probe's ECE (%). The linear probe "
            f"({_e('; '.join(sorted(linear)))}; AdamW with batch 512 and wd 1e-4 on raw features at a constant rate is "
            "the GCRL protocol, section 4.2) is at the method's default read-out; the sweep uses the "
            "full-batch L-BFGS solver, and its best cell is selected on test accuracy, as the papers' layer sweeps "
            "report.</p>")
    heads = Table(["run", "head", "layer / pool", "parameters", "accuracy", "epochs", "schedule", "training features"])
    for r, p in _results(runs, "probes"):
        for kind, h in p.get("heads", {}).items():
            # files before issue 26 record no schedule: Adam, x0.1 every 8 epochs, on cached features
            schedule = (f"{h.get('optimizer', 'adam')} lr {h['lr']:g}, x{h.get('gamma', 0.1):g} every "
                        f"{h.get('step_every', 8)}, batch {h['batch_size']}")
            seen = (f"{h['features']}, {h['train_noise']} noise, augment {h['augment']}" if "features" in h
                    else "cached")
            heads.add([_label(r), _e(kind), f"{p['layer']} / {_e(h['pool'])}", f"{h['params']:,}",
                       _pct(h["test_acc"]), str(h["epochs"]), _e(schedule), _e(seen)])
    if heads.rows:
        note += ("<p class='note'>Heads of the diffusion-features paper (appendix A) at the same read-out, each with "
                 "the schedule and training features its results record:</p>" + heads.html())
    return t.html() + note + "".join(sweeps)


def _calibration(runs: list[dict]) -> str:
    t = Table(["run", "data", "accuracy", "ECE (%)", "bins", "mean confidence", "AURC by MSP"])
    for r, c in _results(runs, "calibration", t):
        t.add([_label(r), _e(r["data"]), _pct(c["accuracy"]), _pct(c["ece"]), str(c["bins"]),
               _pct(c["mean_confidence"]), _num(c.get("selective", {}).get("aurc"))])
    return t.html() + ("<p class='note'>AURC: the area under the risk-coverage curve of answering the images the "
                       "classifier is surest of first (lower is better; answering at random gives the error rate); "
                       "genrep predict abstains by such a ranking.</p>")


def _ood(runs: list[dict]) -> str:
    sets = list(dict.fromkeys(s for r in runs for s in r["protocols"].get("ood", {}).get("sets", [])))
    cols = ["run", "score"] + [f"{s} {m}" for s in sets for m in ("AUROC", "AUPRC", "FPR95")]
    t = Table(cols)
    for r, o in _results(runs, "ood"):
        for score, per_set in o["scores"].items():
            cells = []
            for s in sets:
                m = per_set.get(s)
                cells += [_num(m and m["auroc"]), _num(m and m["auprc"]), _num(m and m["fpr95"])]
            t.add([_label(r), _e(score), *cells])
        for score, reason in o.get("not_applicable", {}).items():
            t.skip(f"{_label(r)} · {_e(score)}", reason)
    note = ("<p class='note'>In-distribution: the test split; scores are higher for more typical inputs "
            "(gaussian: class-conditional Gaussian log-density of the features; msp: maximum softmax probability; "
            "energy: logsumexp of the logits; bpd: minus bits/dim, or minus bits per sub-pixel of the colour-quantized "
            "image for token models; score_norm: minus the norm of the gradient of log p(x) by the pixels, or by "
            "the token embeddings for token models, whose inputs are quantized). AUPRC takes the in-distribution "
            "set as positive.</p>")
    fits = [f"{_label(r)}{_e(gaussian_text(o['gaussian']))}" for r, o in _results(runs, "ood") if o.get("gaussian")]
    if fits:
        note += "<p class='note'>The Gaussian score's fit: " + "; ".join(fits) + ".</p>"
    return t.html() + note


def _likelihood(runs: list[dict]) -> str:
    from ..protocols.likelihood import likelihood_figures

    # one row per unit: numbers of different units never share a row without theirs beside them
    t = Table(["run", "data", "negative log-likelihood", "unit", "images", "terms of the bound"])
    for r, lk in _results(runs, "likelihood", t):
        for unit, mean, sem in likelihood_figures(lk):
            t.add([_label(r), _e(r["data"]), f"{mean:.3f} ± {sem:.3f}", _e(unit), str(lk["n"]), _e(lk["terms"])])
    note = ("<p class='note'>A colour-token model's first row, bits per token, is the GCRL paper's bpd (table 4; "
            "iGPT's own unit); its bits per sub-pixel divide that by the channels. Neither is comparable with a "
            "diffusion model's pixel bits/dim (the GCRL paper's footnote 2).</p>")
    return t.html() + note


def _generation(runs: list[dict]) -> str:
    t = Table(["run", "data", "FID", "KID", "IS", "samples", "feature extractor"])
    for r, g in _results(runs, "generation", t):
        ext = f"<span class='custom'>{_e(g['extractor'])}</span>" if g["custom_extractor"] else _e(g["extractor"])
        is_ = (f"{g['inception_score']:.2f} ± {g['inception_score_std']:.2f}" if g.get("inception_score") is not None
               else "–")
        t.add([_label(r), _e(r["data"]), f"{g['fid']:.2f}", f"{g['kid']:.4g} ± {g['kid_std']:.2g}", is_,
               f"{g['n_fake']} ({_e(sampling_text(g))})", ext])
    return t.html() + ("<p class='note'>Against the training set. Numbers from a custom extractor (red) are not "
                       "comparable with Inception-v3 FIDs in the literature.</p>")


def _completion(runs: list[dict]) -> str:
    t = Table(["run", "data", "mask", "images x samples", "PSNR (dB)", "MSE", "best of samples: PSNR / MSE"])
    for r, c in _results(runs, "completion", t):
        how = sampling_text({"sample": c["complete"]})
        b = c["best_of_samples"]
        t.add([_label(r), _e(r["data"]), _e(c["mask_text"]),
               f"{c['n']} x {c['samples']}" + (f" ({_e(how)})" if how else ""),
               f"{c['psnr']:.2f} ± {c['psnr_sem']:.2f}", f"{c['mse']:.4g} ± {c['mse_sem']:.2g}",
               f"{b['psnr']:.2f} / {b['mse']:.4g}"])
    return t.html() + ("<p class='note'>Held-out test images with part hidden, filled in by the method's own "
                       "completion; errors on the filled-in pixels only, images in [0, 1], mean ± standard error over "
                       "completions (best of samples: each image's closest completion). Completions are samples, so "
                       "their error measures plausibility as much as recall.</p>")


def _energy(runs: list[dict]) -> str:
    t = Table(["run", "samples", "E(x) mean ± std", "classes shown: count, mean E(x)"])
    for r, en in _results(runs, "energy", t):
        shown = list(en["per_class"].items())[:en["classes_shown"]]  # 1000 ImageNet classes would swamp the table
        per = "; ".join(f"{_e(c)}: {v['count']}" + (f", {v['energy_mean']:.2f}" if v["count"] else "")
                        for c, v in shown)
        e = en["energy"]
        t.add([_label(r), f"{en['n']} ({_e(sampling_text(en))})", f"{e['mean']:.3f} ± {e['std']:.3f}", per])
    return t.html() + ("<p class='note'>E(x) = logsumexp of the classifier's logits on the method's own samples, "
                       "each assigned the class its head prefers (the HybViT paper's figures 10 and 11).</p>")


def _robustness(runs: list[dict]) -> str:
    out = []
    for norm in ("linf", "l2"):
        eps = list(dict.fromkeys(e for r in runs for e in r["protocols"].get("robustness", {}).get("eps", {})
                                 .get(norm, [])))
        if not eps:
            continue
        t = Table(["run", "attack"] + [f"ε={e:g}/255" for e in eps])
        for r in runs:
            rb = r["protocols"].get("robustness")
            if rb is None or norm not in rb.get("accuracy", {}):
                continue
            acc = rb["accuracy"][norm]
            vals = list(acc.values())
            t.add([_label(r), _e(attack_text(rb)), *[_pct(vals[rb["eps"][norm].index(e)]) if e in rb["eps"][norm]
                                                  else "–" for e in eps]])
        out.append(f"<h3>{'L∞' if norm == 'linf' else 'L2'}</h3>" + t.html())
    for r in runs:
        rb = r["protocols"].get("robustness")
        if rb and "skipped" in rb:
            out.append(f"<p class='note'>{_label(r)}: not applicable: {_e(rb['skipped'])}</p>")
    return "".join(out) + ("<p class='note'>Test accuracy (%) under PGD; ε=0 is clean accuracy. Robust on every "
                           "iterate: the clean image and every PGD iterate are classified correctly (the HybViT "
                           "paper's code).</p>")


def _similarity(runs: list[dict]) -> str:
    t = Table(["run", "pool", "layers", "mean CKA of adjacent layers", "images", "CKA with other runs"])
    for r, s in _results(runs, "similarity"):
        other = "; ".join(f"{_e(Path(k).name)} ({_e(v['method'])}): max {v['max']:.3f}"
                          + (f", same layer {v['same_layer_mean']:.3f}" if v.get("same_layer_mean") is not None
                             else "") for k, v in s.get("between_models", {}).items()) or "–"
        t.add([_label(r), _e(s["pool"]), str(len(s["layers"])), f"{s['cka_adjacent_mean']:.3f}", str(s["n"]), other])
    return t.html() + ("<p class='note'>Linear CKA (Kornblith et al. 2019) on the same test images; 1 = the same "
                       "representation up to rotation and scale. Heatmaps are among the figures.</p>")


def _sweep(runs: list[dict]) -> str:
    t = Table(["run", "head", "fitted by", "best block", "best t", "best pool", "accuracy", "cells", "noise"])
    for r, s in _results(runs, "sweep"):
        for head, b in s["best"].items():
            cells = sum(1 for c in s["cells"] if c["head"] == head)
            how = s.get("training", {}).get(head)
            t.add([_label(r), _e(head), _e(training_text(how) if how else fit_text({"head": head, **b})),
                   str(b["block"]), "clean" if b["t"] is None else str(b["t"]), _e(b["pool"]), _pct(b["acc"]),
                   str(cells), _e(s.get("noise") or "–")])
    return t.html() + ("<p class='note'>Test accuracy of each head on frozen features over the grid of blocks, noise "
                       "steps and poolings; the best cell is selected on the test split, as the paper's ablations "
                       "report. The linear head is fitted by full-batch L-BFGS, the fast screening solver "
                       "(eval.sweep.linear_solver lbfgs), or by the paper's head schedule for as many epochs as figure "
                       "2's ablations (paper); the read-out is the cached one, its noise drawn as the last column "
                       "says. Heatmaps are among the figures.</p>")


def _finetune(runs: list[dict]) -> str:
    t = Table(["run", "data", "accuracy", "ECE (%)", "epochs", "lr", "layer / pool"])
    for r, f in _results(runs, "finetune"):
        t.add([_label(r), _e(f.get("data", r["data"])), _pct(f["test_acc"]), _pct(f["test_ece"]), str(f["epochs"]), f"{f['lr']:g}",
               f"{f['layer']} / {f['pool']}{mask_text(f)}"])
    return t.html()


def _lowshot(runs: list[dict]) -> str:
    fracs = list(dict.fromkeys(k for r in runs for k in r["protocols"].get("lowshot", {}).get("fractions", {})))
    t = Table(["run", "data", "read-out", *[f"{100 * float(f):g}% acc" for f in fracs], *[f"{100 * float(f):g}% ECE"
                                                                                  for f in fracs]])
    for r, lo in _results(runs, "lowshot"):
        fr = lo["fractions"]
        t.add([_label(r), _e(lo.get("data", r["data"])), _e(lo["readout"]),
               *[_mb(fr[f]["acc_mean"], fr[f]["acc_std"]) if f in fr else "–" for f in fracs],
               *[_mb(fr[f]["ece_mean"], fr[f]["ece_std"]) if f in fr else "–" for f in fracs]])
    return t.html() + "<p class='note'>Mean ± std over seeds, in %.</p>"


SECTIONS = {"probes": _probes, "calibration": _calibration, "ood": _ood, "likelihood": _likelihood,
            "generation": _generation, "completion": _completion, "energy": _energy, "robustness": _robustness,
            "similarity": _similarity, "finetune": _finetune, "lowshot": _lowshot, "sweep": _sweep}


# ----------------------------------------------------------------------------------------------- page
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_FIGURE_BYTES = 64 * 2**20


class FigureRefused(Exception):
    """A figure named in eval.json that the report will not embed; the message says why."""


def _read_png(run: Path, rel) -> bytes:
    """The bytes of figure ``rel`` of ``run``, only if it is a PNG file inside the run folder.

    eval.json is data, possibly from someone else: a figure entry naming /etc/shadow, ../../secret or a
    symlink out of the run would otherwise be copied, base64-encoded, into a page meant to be mailed around.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise FigureRefused(f"the entry is {type(rel).__name__} {rel!r}, not a path inside the run")
    shown = rel if rel.isprintable() else repr(rel)  # the warning stays one line whatever the entry holds
    root = run.resolve()
    try:
        # resolve() follows every symlink, so a link inside figures/ that points out of the run lands outside
        path = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise FigureRefused(f"{shown} cannot be resolved ({type(e).__name__})") from None
    if not path.is_relative_to(root):
        raise FigureRefused(f"{shown} resolves outside the run folder {run}")
    # O_NONBLOCK: a FIFO swapped in after the checks must not hang the report; O_NOFOLLOW: nor a new symlink
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise FigureRefused(f"{shown} cannot be opened ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FigureRefused(f"{shown} is not a regular file")
        if st.st_size > MAX_FIGURE_BYTES:
            size, limit = st.st_size / 2**20, MAX_FIGURE_BYTES >> 20
            raise FigureRefused(f"{shown} is {size:.0f} MiB, over the {limit} MiB limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FIGURE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FIGURE_BYTES:
        raise FigureRefused(f"{shown} is over the {MAX_FIGURE_BYTES >> 20} MiB limit")
    # the bytes checked are the bytes embedded: nothing is read twice
    if not (data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR"):
        raise FigureRefused(f"{shown} is not a PNG image (no PNG signature and IHDR header)")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a damaged file
        why = ("unrecognised image data" if isinstance(e, UnidentifiedImageError)
               else " ".join(str(e).split())[:120] or type(e).__name__)
        raise FigureRefused(f"{shown} does not decode as a PNG ({why})") from None
    return data


def _figure(run: Path, rel, caption: str, alt: str, missing_ok: bool = False) -> str:
    try:
        data = _read_png(run, rel)
    except FileNotFoundError:
        return "" if missing_ok else f"<p class='note'>missing figure {_e(rel)} ({_e(alt)})</p>"
    except FigureRefused as e:
        print(f"genrep report: warning: {run}: figure not shown: {e}", file=sys.stderr)
        return f"<p class='note refused'>figure not shown: {_e(e)} ({_e(alt)})</p>"
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f"<figure><img alt='{_e(alt)}' src='{src}'><figcaption>{caption}</figcaption></figure>"


def _figures(r: dict, run: Path) -> str:
    figs = [_figure(run, str(Path("figures") / "summary.png"), "training loss and probe accuracy",
                    "training summary", missing_ok=True)]
    for name in PROTOCOLS:
        p = r["protocols"].get(name, {})
        named = p.get("figures", {}) if isinstance(p, dict) else {}
        if not isinstance(named, dict):
            why = f"the {name} figures are a {type(named).__name__}, not a caption-to-path mapping"
            print(f"genrep report: warning: {run}: figure not shown: {why}", file=sys.stderr)
            figs.append(f"<p class='note refused'>figure not shown: {_e(why)}</p>")
            continue
        for caption, rel in named.items():
            figs.append(_figure(run, rel, f"{_e(TITLES[name])}: {_e(caption)}", caption))
    return "".join(figs)


def _grid_section(g: dict, folder: Path) -> str:
    """A grid folder: the heatmap's numbers as a table (rows: the first axis, columns: the second), linear probe
    and kNN per cell, the best in bold; then its heatmap."""
    from ...grid import GRID_FIGURE, METRIC, best_cell, cell_summary, first_knn, value_text

    axes = g["axes"]
    rows = [value_text(v) for v in axes[0]["values"]] if len(axes) == 2 else ["linear / kNN"]
    cols = [value_text(v) for v in axes[-1]["values"]]
    corner = f"{axes[0]['key']} \\ {axes[1]['key']}" if len(axes) == 2 else axes[0]["key"]
    head = f'<th class="l">{_e(corner)}</th>' + "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    at = {tuple(c["index"]) if len(axes) == 2 else (0, c["index"][0]): c for c in g["cells"]}
    best = best_cell(g)
    for i, r in enumerate(rows):
        cells = []
        for j in range(len(cols)):
            c = at.get((i, j))
            if c is None or c.get("status") != "done":
                cells.append("–" if c is None else _e(c.get("status", "–")))
                continue
            k = first_knn(c)
            text = _pct(c["linear_acc"]) + (f" / {_pct(k[1])}" if k is not None else "")
            cells.append(f"<b>{text}</b>" if c is best else text)
        body.append("<tr>" + f'<td class="l">{_e(r)}</td>' + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    knn_k = next((first_knn(c)[0] for c in g["cells"] if c.get("status") == "done" and first_knn(c)), None)
    over = "; ".join(f"{_e(k)} {_e(value_text(v))}" for k, v in g["overrides"].items()) or "none"
    done = sum(c.get("status") == "done" for c in g["cells"])
    note = (f"<p class='note'>{_e(METRIC)} (%)" + (f" / kNN k={_e(knn_k)} (%)" if knn_k else "") + f" of each cell, "
            f"{done} of {len(g['cells'])} done; every cell: recipe {_e(g['recipe'])} with {over}. Each cell is a "
            f"run folder {_e(folder)}/NAME, trained as genrep pretrain trains and probed as genrep probe probes; the "
            f"best cell (bold, outlined in the heatmap) is selected on test accuracy.</p>")
    if best is not None:
        note += f"<p class='note'>best: {_e(best['name'])}: {_e(cell_summary(best))}</p>"
    fig = _figure(folder, g.get("figure", GRID_FIGURE), f"{_e(g['recipe'])}: {_e(METRIC)}", "grid heatmap")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>" + note + fig


def _reproduction_section(d: dict) -> str:
    """A reproduction (genrep reproduce): the claim, per row the paper's value beside genrep's (mean ± std over
    seeds) and their difference, then the verdict on the claim's ordering at this scale."""
    m = d["metric"]
    unit = f" ({_e(m['unit'])})" if m.get("unit") else ""
    t = Table(["row", f"paper{unit}", f"genrep{unit}", "difference", "seeds", "runs"])

    def num(x) -> str:
        return "–" if x is None else f"{x:.4g}"

    for name in d["comparison"] + [r for r in d["rows"] if r not in d["comparison"]]:
        r = d["rows"].get(name)
        if r is None:
            t.add([_e(name), "–", "not run yet", "–", "0", "–"])
            continue
        ours = num(r["mean"]) + (f" ± {r['std']:.2g}" if r.get("std") is not None else "")
        copied = d.get("copied") or {}
        t.add([_e(name), num(r["paper"]), ours, num(r["difference"]), str(len(r["values"])),
               _e(", ".join(f"{f} (copied from {copied[f]})" if f in copied else f for f in d["runs"].get(name, [])))])
    v = d.get("verdict") or {"result": "incomplete", "words": "no row has a value yet"}
    better = "higher" if m["better"] == "higher" else "lower"
    return (f"<p><b>Claim</b> ({_e(d['table'])}): {_e(d['claim'])}</p>" + t.html()
            + f"<p class='note'>{_e(m['name'])}, {better} is better (eval key {_e(m['key'])} x {m['factor']:g}); scale "
              f"{_e(d['scale'])}: {_e(d['about'])}" + (f"; data read from {_e(d['data'])}" if d.get("data") else "")
            + ". Rows are ordered best first, as the claim orders them.</p>"
            + f"<p><b>Verdict at this scale: {_e(v['result'])}</b> <span class='note'>{_e(v['words'])}</span></p>")


def load_reproductions(folders: list[Path]) -> list[dict]:
    from ...reproduce import read_reproduction

    out = []
    for folder in folders:
        d = read_reproduction(folder)
        d["_path"] = Path(folder)
        out.append(d)
    return out


def load_grids(folders: list[Path]) -> list[dict]:
    from ...grid import GRID_FILE, read_grid

    out = []
    for folder in folders:
        g = read_grid(folder)
        if g is None:
            raise GenrepError(f"{folder} is a grid folder with no {GRID_FILE}; run its genrep grid command again")
        g["_path"] = Path(folder)
        out.append(g)
    return out


def load_runs(runs: list[Path]) -> list[dict]:
    if not runs:
        raise GenrepError("genrep report needs at least one run folder")
    out = []
    for run in runs:
        r = read_results(run)
        if not r:
            raise GenrepError(f"{run} has no {RESULTS_DIR}/{EVAL_FILE}; evaluate it first with genrep evaluate {run}")
        r["_path"] = Path(run)
        out.append(r)
    return out


def render(runs: list[dict], grids: list[dict] | None = None, reproductions: list[dict] | None = None) -> str:
    grids, reproductions = grids or [], reproductions or []
    what = ", ".join([f"{len(runs)} run(s)"] * bool(runs or not (grids or reproductions))
                     + [f"{len(grids)} grid(s)"] * bool(grids) + [f"{len(reproductions)} reproduction(s)"]
                     * bool(reproductions))
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>genrep report</title><style>{CSS}</style>"
             f"</head><body><h1>genrep report</h1><p class='note'>{what}, written "
             f"{time.strftime('%Y-%m-%d %H:%M')}</p>")]
    for n, d in enumerate(reproductions, 1):
        parts.append(f"<h2 id='reproduction-{n}'>{_e(d['paper'])}, {_e(d['table'])}: {_e(d['title'])} "
                     f"<span class='note'>({_e(d['spec'])}, scale {_e(d['scale'])})</span></h2>"
                     + _reproduction_section(d))
    for n, g in enumerate(grids, 1):
        over = " x ".join(_e(a["key"]) for a in g["axes"])
        parts.append(f"<h2 id='grid-{n}'>Grid over {over}: {_e(g['recipe'])} <span class='note'>"
                     f"({_e(g['_path'].name)})</span></h2>" + _grid_section(g, g["_path"]))
    if not runs:
        parts.append("</body></html>")
        return "\n".join(parts)
    t = Table(["run", "recipe", "data", "parameters (trainable / total)", "GFLOPs / image", "weights", "device",
               "skipped protocols"])
    for r in runs:
        skipped = ", ".join(k for k, v in r["protocols"].items() if "skipped" in v) or "–"
        t.add([_label(r), _e(r["recipe"]) + _init_note(r), f"{_e(r['data'])} ({r['image_size']}px, {r['n_train']}/{r['n_test']})",
               _size(r), f"{r['flops_per_image'] / 1e9:.3f}", _e(r["weights"]), _e(r["device"]), _e(skipped)])
    parts.append("<h2>Runs</h2>" + t.html())
    for name, section in SECTIONS.items():
        present = [r for r in runs if name in r["protocols"]]
        if not present:
            continue
        parts.append(f"<h2 id='{name}'>{_e(TITLES[name])}</h2>" + section(present))
    parts.append("<h2>Figures</h2>")
    for r in runs:
        parts.append(f"<h3>{_label(r)}</h3>{_figures(r, r['_path'])}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(runs: list[Path], out: Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise GenrepError(f"the report is an HTML page; name it with .html (got {out})")
    from ...grid import is_grid_folder

    folders = [Path(r) for r in runs]
    if not folders:
        raise GenrepError("genrep report needs at least one run folder (or grid folder)")
    from ...reproduce import is_reproduction

    grids = [f for f in folders if is_grid_folder(f)]
    reproductions = [f for f in folders if is_reproduction(f)]
    plain = [f for f in folders if f not in grids and f not in reproductions]
    atomic_write_text(out, render(load_runs(plain) if plain else [], load_grids(grids),
                                  load_reproductions(reproductions)))
    return out
