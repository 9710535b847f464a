"""`genrep evaluate RUN`: every protocol that applies to the run's method, one results file.

The results live in ``RUN/results/eval.json`` and are rewritten atomically after each protocol, so an
interrupted evaluation keeps what finished. Protocols evaluated earlier from the same weights are
kept when a later call runs others (``--eval.protocols finetune`` adds fine-tuning to the file);
results from other weights (a run trained further) are dropped, never mixed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import EvalConfig
from ..devices import resolve_device
from ..errors import GenrepError
from ..io import atomic_write_json
from ..runs import load_split, load_trained, read_run_config
from .probe_run import RESULTS_DIR, weights_version
from .protocols import NEEDS, PROTOCOLS, EvalContext

EVAL_FILE = "eval.json"


def check_protocols(names: list[str]) -> None:
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise GenrepError(f"unknown protocol {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    if not names:
        raise GenrepError(f"eval.protocols is empty; list one or more of {', '.join(PROTOCOLS)}")


def skip_reason(name: str, method) -> str | None:
    """Why protocol ``name`` does not apply to ``method`` (None when it does)."""
    need = PROTOCOLS[name][0]
    if need is None or need in method.capabilities:
        return None
    caps = ", ".join(sorted(method.capabilities)) or "none"
    return f"needs {NEEDS[need]}; {method.name} offers: {caps}"


def plan(method, ev: EvalConfig) -> tuple[list[str], dict[str, str]]:
    """(protocols to run, protocol -> reason it is skipped) for ``method`` under ``ev``."""
    check_protocols(ev.protocols)
    run, skipped = [], {}
    for name in PROTOCOLS:
        if name not in ev.protocols:
            continue
        reason = skip_reason(name, method)
        if reason:
            skipped[name] = reason
        else:
            run.append(name)
    return run, skipped


def read_results(run: Path) -> dict:
    path = Path(run) / RESULTS_DIR / EVAL_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged file is rebuilt, never trusted


def _check_data(train, test) -> None:
    for split, s in (("train", train), ("test", test)):
        if len(s) == 0:
            raise GenrepError(f"the {split} split of {s.name} is empty; evaluation needs images in both splits")


def _preflight(ctx: EvalContext, names: list[str]) -> None:
    """Fail on bad settings before minutes of work, not after them."""
    from .ood_sets import make_ood_images
    from .protocols import extractor_for, ood_score_kinds

    ev = ctx.ev
    if ev.weights not in ("ema", "model"):
        raise GenrepError(f"eval.weights '{ev.weights}' is unknown; choose ema or model")
    if ev.batch_size < 1:
        raise GenrepError(f"eval.batch_size must be at least 1, got {ev.batch_size}")
    if "calibration" in names and ev.ece_bins < 1:
        raise GenrepError(f"eval.ece_bins must be at least 1, got {ev.ece_bins}")
    if "ood" in names:
        ood_score_kinds(ctx)
        if ev.gaussian_covariance not in ("shared", "class"):
            raise GenrepError(f"eval.gaussian_covariance '{ev.gaussian_covariance}' is unknown; choose shared or "
                              f"class")
        for name in ev.ood_sets:
            make_ood_images(name, ctx.test, 1, seed=ev.seed, root=ctx.cfg.data.root, download=ctx.cfg.data.download)
    if "generation" in names and ev.fid_extractor != "classifier":  # the classifier is trained when needed
        extractor_for(ctx)
    if "similarity" in names:
        from ..runs import read_run_config
        for other in ev.cka_runs:
            read_run_config(Path(other))  # a folder that is not a run fails here, not after the other protocols
    if "finetune" in names:
        ctx.method.check_feature_args(ev.finetune_layer, ev.finetune_pool)
    if "finetune" in names or "lowshot" in names:
        ctx.transfer_sets()  # a transfer data set missing offline fails here
    if "robustness" in names and ev.pgd_steps < 1:
        raise GenrepError(f"eval.pgd_steps must be at least 1, got {ev.pgd_steps}")
    if "lowshot" in names and ev.lowshot_readout not in ("linear", "finetune"):
        raise GenrepError(f"eval.lowshot_readout '{ev.lowshot_readout}' is unknown; choose linear or finetune")


def evaluate_run(run: Path, ev: EvalConfig | None = None, *, progress: bool = True, say=print) -> dict:
    """Run the applicable protocols of ``ev`` (default: the run's own ``eval`` section) on RUN's weights."""
    run = Path(run)
    cfg = read_run_config(run)
    ev = ev or cfg.eval
    device = resolve_device(ev.device)
    cfg, method, train = load_trained(run, ev.weights, device)
    test = load_split(cfg, "test")
    _check_data(train, test)
    version = weights_version(run, ev.weights)
    ctx = EvalContext(run=run, cfg=cfg, ev=ev, method=method, train=train, test=test, device=device,
                      version=version, progress=progress)
    names, skipped = plan(method, ev)
    _preflight(ctx, names)

    old = read_results(run)
    keep = old.get("protocols", {}) if old.get("weights") == version else {}
    results = {
        "run": str(run), "recipe": cfg.recipe, "method": cfg.method, "data": cfg.data.name,
        "image_size": int(train.image_size), "n_train": len(train), "n_test": len(test),
        "num_classes": train.num_classes, "weights": version,
        "params": sum(p.numel() for p in method.parameters()),
        "flops_per_image": int(method.flops_per_image()), "device": str(device),
        "protocols": {k: v for k, v in keep.items() if k not in names},
    }
    for name, reason in skipped.items():
        results["protocols"][name] = {"skipped": reason}
    results["protocols"] = {k: results["protocols"][k] for k in PROTOCOLS if k in results["protocols"]}
    path = run / RESULTS_DIR / EVAL_FILE
    for name in names:
        say(f"genrep evaluate: {name}")
        t0 = time.perf_counter()
        torch.manual_seed(ev.seed)  # protocols with internal randomness (t-SNE aside) are seeded from here
        out = PROTOCOLS[name][1](ctx)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out["settings"] = _settings(name, ev)
        results["protocols"][name] = out
        results["protocols"] = {k: results["protocols"][k] for k in PROTOCOLS if k in results["protocols"]}
        atomic_write_json(path, results)
    atomic_write_json(path, results)
    return results


_SETTINGS = {
    "probes": ("sweep_layers", "sweep_pools"),
    "calibration": ("ece_bins",),
    "ood": ("ood_sets", "ood_scores", "ood_n", "gaussian_covariance", "bpd_terms"),
    "likelihood": ("bpd_n", "bpd_terms"),
    "generation": ("fid_samples", "fid_extractor", "sample_steps"),
    "robustness": ("pgd_norms", "pgd_linf_eps", "pgd_l2_eps", "pgd_steps", "pgd_n"),
    "similarity": ("cka_n", "tsne_n", "cka_runs"),
    "finetune": ("transfer_data", "finetune_epochs", "finetune_lr", "finetune_batch_size", "finetune_layer", "finetune_pool",
                 "finetune_causal"),
    "lowshot": ("transfer_data", "lowshot_fractions", "lowshot_seeds", "lowshot_readout"),
}


def _settings(name: str, ev: EvalConfig) -> dict:
    d = asdict(ev)
    return {k: d[k] for k in ("seed", "weights", *_SETTINGS[name])}
