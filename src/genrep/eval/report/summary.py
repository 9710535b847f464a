"""The plain-text tables the CLI prints: probe results and a one-line headline per evaluation protocol."""

from __future__ import annotations


def probe_table(r: dict) -> str:
    rows = []
    if "classifier_test_acc" in r:
        rows.append(("classifier head", r["classifier_test_acc"]))
    lp = r["linear_probe"]
    rows.append((f"linear probe ({linear_text(lp)})", lp["test_acc"]))
    rows += [(f"kNN k={k}", acc) for k, acc in r["knn"].items()]
    first = r.get("headline", {}).get("name")
    for kind, h in r.get("heads", {}).items():
        row = (f"{kind} head ({h['pool']} pool, {h['params']:,} parameters){head_text(h)}", h["test_acc"])
        if f"{kind} head" == first:
            rows.insert(0, row)
        else:
            rows.append(row)
    width = max(len(name) for name, _ in rows)
    t = f", at step t={r['feature_t']}" if r.get("feature_t") is not None else ""
    size = r.get("image_size")
    at = (f" read at {size}x{size} (trained at {r['trained_image_size']}x{r['trained_image_size']})"
          if r.get("trained_image_size") else "")
    head = (f"{r['method']} on {r['data']}{at} ({r['n_train']} train / {r['n_test']} test), features: layer "
            f"{r['layer']}, {r['pool']} pool{t}, dim {r['feature_dim']}, {r['weights']} weights"
            + (f", {r['precision']} extraction" if "precision" in r else "")
            + (f", cached {r['feature_cache']}" if r.get("feature_cache", "").startswith("float16") else ""))
    lines = [head, f"{'read-out':<{width}}  test accuracy", f"{'-' * width}  -------------"]
    lines += [f"{name:<{width}}  {100 * acc:12.2f}%" for name, acc in rows]
    lines.append(f"{'chance':<{width}}  {100 / r['num_classes']:12.2f}%")
    if "test_ece" in lp:
        lines.append(f"linear probe ECE {pct(lp['test_ece'])} ({lp['ece_bins']} bins)")
    return "\n".join(lines)


def head_text(h: dict) -> str:
    """How a head trained, where its results say (files before issue 26 do not: Adam, cached features)."""
    if "optimizer" not in h:
        return ""
    seen = f", {h['train_noise']} noise, augment {h['augment']}" if "augment" in h else ""
    return f": {h['optimizer']} lr {h['lr']:g}{seen}"


def linear_text(lp: dict) -> str:
    """The linear probe's solver and the habits beyond GCRL's section 4.2 it used (files before issue 25 record
    neither: they standardised, and adamw decayed on a cosine)."""
    parts = [lp["solver"], f"wd {lp['weight_decay']:g}"]
    if lp["solver"] == "lars":  # its parameter-free BatchNorm stands for the standardisation it does not read
        parts.append("BatchNorm on the features")
    elif not lp.get("standardize", True):
        parts.append("raw features")
    if lp["solver"] == "adamw":
        parts.append(f"{lp.get('lr_schedule') or 'cosine'} lr")
    return ", ".join(parts)


def params_text(params) -> str:
    """Parameter counts as people read them; eval.json files before trainable/total held one number."""
    if isinstance(params, dict):
        total, trainable = params["total"], params["trainable"]
        return f"{total / 1e6:.2f}M parameters" + (f", {trainable / 1e6:.2f}M trainable" if trainable != total else
                                                   " (all trainable)")
    return f"{params / 1e6:.2f}M parameters"


def sampling_text(r: dict) -> str:
    """How generation sampled: the method's own sample settings (older files: sampler and steps)."""
    cs = r.get("sample") or {"sampler": r.get("sampler"), "sample_steps": r.get("steps")}
    steps = cs.get("sample_steps", cs.get("steps"))
    parts = [str(cs["sampler"])] if cs.get("sampler") else []
    if steps is not None:
        parts.append(f"{steps} steps")
    parts += [f"{k} {v}" for k, v in cs.items() if k not in ("sampler", "sample_steps", "steps")]
    return ", ".join(parts)


def attack_text(r: dict) -> str:
    """The PGD attack of an eval.json robustness entry in words (entries before issue 11 hold only its steps);
    its step_size is in units of 1/255, or a rule that follows eps."""
    size = r.get("step_size")
    size = f"{size:g}/255" if isinstance(size, (int, float)) else "2.5 eps/steps"
    judged = "every iterate" if r.get("criterion") == "every_iterate" else "the final iterate"
    return f"{r['steps']} steps of {size}, {r.get('start', 'uniform')} start, robust on {judged}"


def _t(t) -> str:
    return "clean" if t is None else str(t)


def _pool_key(pool: str) -> tuple:
    """Pool sizes by size, then named poolings: a pool left out at the first block is met late in the cells."""
    return (0, int(pool), "") if pool.isdigit() else (1, 0, pool)


def sweep_panels(cells: list[dict]) -> list[tuple[str, str]]:
    """(head, pool) pairs of a sweep: the heads in the order met, each head's pools by size."""
    heads = list(dict.fromkeys(c["head"] for c in cells))
    return sorted({(c["head"], c["pool"]) for c in cells}, key=lambda hp: (heads.index(hp[0]), _pool_key(hp[1])))


OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def fit_text(cell: dict) -> str:
    """How a sweep cell's (or best cell's) head was fitted, in a few words (files before issue 26 record no solver:
    their linear head was L-BFGS, the other heads Adam with the paper's schedule)."""
    solver = cell.get("solver") or ("lbfgs" if cell.get("head", "linear") == "linear" else "paper")
    if solver == "lbfgs":
        return "L-BFGS"
    name = OPTIMIZER_NAMES.get(cell.get("optimizer", "adam"), cell.get("optimizer"))
    if "epochs" not in cell:
        return name
    return f"{name}, {cell['epochs']} epoch{'' if cell['epochs'] == 1 else 's'}"


def training_text(t: dict) -> str:
    """A sweep head's training record (``sweep.training``) in words, with what its trainer reported."""
    if t["solver"] == "lbfgs":
        wds = ", ".join(f"{w:g}" for w in t["weight_decay"])
        return (f"full-batch L-BFGS on standardised features, weight decay {wds}"
                + (" chosen on a held-out part of the train split" if len(t["weight_decay"]) > 1 else ""))
    text = f"{fit_text(t)}, lr {t['lr']:g}, batch {t['batch_size']}"
    if "step_every" in t:
        text += f", the rate x{t['gamma']:g} every {t['step_every']} epochs"
    return text + (", raw features" if t.get("standardize") is False else "")


def sweep_setup(r: dict) -> list[str]:
    """What produced a sweep's numbers: each head's training and the noise of the read-out (files before issue
    26 record neither)."""
    lines = [f"{head}: {training_text(t)}" for head, t in r.get("training", {}).items()]
    if r.get("noise"):
        lines.append(f"noise of the read-out: {r['noise']}")
    if r.get("left_out"):
        lines.append("left out (pool larger than the block's map): " + ", ".join(
            f"block {c['block']} pool {c['pool']} ({c['map_size']}x{c['map_size']})" for c in r["left_out"]))
    return lines


def sweep_table(r: dict) -> str:
    """The sweep's grid as text: how it was fitted, one row per (head, pool, t), one column per block; the best
    cell per head."""
    blocks = sorted({c["block"] for c in r["cells"]})
    acc = {(c["head"], c["pool"], c["t"], c["block"]): c["acc"] for c in r["cells"]}
    met = {(c["head"], c["pool"], c["t"]) for c in r["cells"]}
    steps = sorted({t for *_, t in met}, key=lambda t: -1 if t is None else t)
    rows = [(h, p, t) for t in steps for h, p in sweep_panels(r["cells"]) if (h, p, t) in met]
    width = max(len(f"{h} pool {p} t={_t(t)}") for h, p, t in rows)
    lines = [*sweep_setup(r), f"{'head, pool, t':<{width}}  " + " ".join(f"{'b' + str(b):>6}" for b in blocks)]
    for h, p, t in rows:
        cells = [f"{100 * acc[(h, p, t, b)]:6.1f}" if (h, p, t, b) in acc else f"{'-':>6}" for b in blocks]
        lines.append(f"{f'{h} pool {p} t={_t(t)}':<{width}}  " + " ".join(cells))
    for head, b in r["best"].items():
        lines.append(f"best {head} ({fit_text({'head': head, **b})}): block {b['block']}, t={_t(b['t'])}, "
                     f"pool {b['pool']}: {pct(b['acc'])}")
    return "\n".join(lines)


def evaluation_summary(results: dict) -> str:
    """Run, weights, then one headline per protocol (or why it was skipped)."""
    size = f", {params_text(results['params'])}" if "params" in results else ""
    lines = [f"{results['method']} on {results['data']} ({results['weights']} weights{size}):"]
    for name, r in results["protocols"].items():
        lines.append(f"  {name:<12} {headline(name, r)}")
    return "\n".join(lines)


def mask_text(r: dict) -> str:
    """How a causal method's features were read (GVP's probes keep the mask, its fine-tuning drops it); "" for a
    method without one."""
    causal = r.get("causal")
    return "" if causal is None else " (causal mask kept)" if causal else " (causal mask off)"


def gaussian_text(g: dict | None) -> str:
    """The Gaussian OOD score's departures from plain Sigma_c, in words ("" for files before issue 25)."""
    if not g:
        return ""
    text = f" (gaussian: {g['covariance']} covariance, ridge {g['ridge']['relative']:g} x mean variance"
    if g["covariance"] == "class":
        fb = g["fallback_classes"]
        text += (f"; {len(fb)} of {g['classes']} classes have <= D = {g['dim']} samples and use the shared "
                 f"covariance: {', '.join(map(str, fb[:10]))}{', ...' if len(fb) > 10 else ''}" if fb else
                 "; no class fell back to the shared covariance")
    return text + ")"


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def headline(name: str, r: dict) -> str:
    """The one line `genrep evaluate` prints for protocol ``name``."""
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if name == "probes":
        k = min(r["knn"], key=int)
        head = f"classifier {pct(r['classifier_acc'])}, " if "classifier_acc" in r else ""
        b = r.get("best")
        sweep = f"; best of sweep: layer {b['layer']}, {b['pool']} pool {pct(b['linear_acc'])}" if b else ""
        ece = f" (ECE {pct(r['linear_ece'])})" if "linear_ece" in r else ""
        first = r.get("headline", {}).get("name", "linear probe")
        lead = f"{first} {pct(r['headline']['test_acc'])}, " if first != "linear probe" else ""
        return (f"{lead}{head}linear {pct(r['linear_acc'])}{ece}, kNN k={k} {pct(r['knn'][k])}{sweep}"
                f"{mask_text(r)}")
    if name == "calibration":
        aurc = f", AURC by MSP {r['selective']['aurc']:.3f}" if "selective" in r else ""
        return f"ECE {pct(r['ece'])} ({r['bins']} bins), accuracy {pct(r['accuracy'])}{aurc}"
    if name == "ood":
        parts = [f"{score} " + "/".join(f"{m['auroc']:.3f}" for m in sets.values()) for score, sets in r["scores"].items()]
        return f"AUROC on {'/'.join(r['sets'])}: " + "; ".join(parts) + gaussian_text(r.get("gaussian"))
    if name == "likelihood":
        from ..protocols.likelihood import likelihood_figures

        figures = likelihood_figures(r)
        terms = f", {r['terms']} terms" if len(figures) == 1 else ""  # a token model's likelihood is exact
        return "; ".join(f"{mean:.3f} {unit}" for unit, mean, _ in figures) + f" ({r['n']} images{terms})"
    if name == "generation":
        label = " [CUSTOM extractor]" if r["custom_extractor"] else ""
        return f"FID {r['fid']:.2f}, KID {r['kid']:.4f}, {r['n_fake']} samples; {r['extractor']}{label}"
    if name == "completion":
        return (f"PSNR {r['psnr']:.2f} dB, MSE {r['mse']:.4f} on the filled-in pixels ({r['mask_text']}; "
                f"{r['n']} images x {r['samples']} samples)")
    if name == "energy":
        e = r["energy"]
        return f"E(x) {e['mean']:.3f} ± {e['std']:.3f} over {r['n']} samples; per-class histograms in the figures"
    if name == "robustness":
        return "; ".join(f"{norm} eps={r['eps'][norm][-1]:g}/255: {pct(list(acc.values())[-1])}"
                         for norm, acc in r["accuracy"].items()) + f" ({attack_text(r)})"
    if name == "similarity":
        return f"mean CKA of adjacent layers {r['cka_adjacent_mean']:.3f}"
    if name == "finetune":
        return f"accuracy {pct(r['test_acc'])}, ECE {pct(r['test_ece'])} ({r['epochs']} epochs){mask_text(r)}"
    if name == "sweep":
        b = r["best_overall"]
        noise = f"; noise {r['noise']}" if r.get("noise") else ""
        return (f"best {b['head']} ({fit_text(b)}) at block {b['block']}, t={_t(b['t'])}, pool {b['pool']}: "
                f"{pct(b['acc'])} ({len(r['cells'])} cells{noise})")
    if name == "lowshot":
        return ", ".join(f"{100 * float(f):g}%: {pct(v['acc_mean'])} ± {100 * v['acc_std']:.2f}"
                         for f, v in r["fractions"].items()) + f" ({r['readout']} read-out)"
    return ""


def reproduction_table(d: dict) -> str:
    """genrep reproduce's text: the claim, per row the paper's value beside genrep's, and the verdict."""
    m = d["metric"]
    unit = f" ({m['unit']})" if m.get("unit") else ""

    def num(x) -> str:
        return "-" if x is None else f"{x:.4g}"

    lines = [f"{d['paper']}, {d['table']}: {d['title']} (scale {d['scale']}: {d['about']})",
             f"claim: {d['claim']}", f"{m['name']}{unit}, {m['better']} is better",
             f"{'row':24s} {'paper':>10s} {'genrep':>18s} {'difference':>11s}"]
    for name, r in d["rows"].items():
        ours = num(r["mean"]) + (f" ± {r['std']:.2g}" if r.get("std") is not None else "")
        lines.append(f"{name:24s} {num(r['paper']):>10s} {ours:>18s} {num(r['difference']):>11s}")
    v = d.get("verdict") or {}
    lines.append(f"verdict at this scale: {v.get('result', 'incomplete')} ({v.get('words', '')})")
    return "\n".join(lines)
