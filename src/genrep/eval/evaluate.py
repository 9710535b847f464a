"""The driver of `genrep evaluate RUN` and `genrep probe RUN`: plan, preflight, results files.

`genrep evaluate` runs every protocol of ``eval.protocols`` that applies to the run's method into
``RUN/results/eval.json``, rewritten atomically after each protocol, so an interrupted evaluation keeps
what finished. Protocols evaluated earlier from the same weights are kept when a later call runs others
(``--eval.protocols finetune`` adds fine-tuning to the file); results from other weights (a run trained
further) are dropped, never mixed. `genrep probe` runs the probes protocol alone with the run's ``probe``
section into ``RUN/results/probe.json``.

Settings arrive checked (the config boundary validates every field); the preflight checks only what needs
the method or the data: a read-out that does not exist, an OOD set or transfer set that cannot be loaded,
missing Inception weights, a ``cka_runs`` folder that is not a run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..config import EvalConfig, ProbeConfig
from ..errors import GenrepError
from ..io import atomic_write_json
from .distributed import is_main
from .protocols import PROTOCOLS, skip_reason
from .protocols import probes as probes_protocol
from .protocols.context import RESULTS_DIR, EvalContext

EVAL_FILE = "eval.json"
PROBE_FILE = "probe.json"
# settings shared by all protocols that a protocol also depends on
_SHARED = {"finetune": ("transfer_data",), "lowshot": ("transfer_data",)}


def plan(method, ev: EvalConfig) -> tuple[list[str], dict[str, str]]:
    """(protocols to run, protocol -> reason it is skipped) for ``method`` under ``ev``, in registry order."""
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


def read_results(run: Path, file: str = EVAL_FILE) -> dict:
    """RUN's evaluation results ({} when there are none yet), checked: a file that is not genrep's results is a
    one-line error, never silently rebuilt over (it may hold results the user wants back)."""
    path = Path(run) / RESULTS_DIR / file
    if not path.exists():
        return {}
    again = f"move it away and run genrep evaluate {run} again"
    try:
        d = json.loads(path.read_bytes())
    except OSError as e:
        raise GenrepError(f"cannot read {path} ({e.strerror or e}); {again}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenrepError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {again}") from None
    if not isinstance(d, dict) or not isinstance(d.get("protocols"), dict) or not isinstance(d.get("method"), str):
        got = type(d).__name__ if not isinstance(d, dict) else "an object without 'protocols' and 'method'"
        raise GenrepError(f"{path} is not a genrep results file (expected an object with 'protocols' and 'method', got {got}); "
                          f"{again}")
    return d


def preflight(ctx: EvalContext, names: list[str]) -> None:
    """Fail on what only the method or the data can tell, before minutes of work rather than after them."""
    for name in names:
        check = PROTOCOLS[name].check
        if check is not None:
            check(ctx)


def settings(name: str, ev: EvalConfig) -> dict:
    """What protocol ``name`` ran with, recorded beside its numbers."""
    return {"seed": ev.seed, "weights": ev.weights, **{k: getattr(ev, k) for k in _SHARED.get(name, ())},
            **asdict(getattr(ev, name))}


def _ordered(protocols: dict) -> dict:
    return {k: protocols[k] for k in PROTOCOLS if k in protocols}


def evaluate_run(run, ev: EvalConfig | None = None, *, options: dict | None = None, progress: bool = True,
                 say=print) -> dict:
    """Run the applicable protocols of ``ev`` (default: the run's own ``eval`` section) on the weights of ``run``
    (a :class:`~genrep.run.Run`, or a folder opened here), under the run's lock so two evaluations never interleave
    eval.json; ``options`` changes model keys that change how a trained model is read (``Method.read_options``,
    e.g. ``sample_steps``, ``nll_terms``, ``feature_t``)."""
    from ..run import Run

    run = Run.of(run)
    with run.writing("evaluate"):
        return _evaluate_run(run, ev, options=options, progress=progress and is_main(),
                             say=say if is_main() else _silent)


def _evaluate_run(run, ev: EvalConfig | None, *, options: dict | None, progress: bool, say) -> dict:
    from ..runs import read_init_record

    path = run.path
    ev = ev or run.config.eval
    ctx = EvalContext.open(run, ev, options=options, progress=progress)
    method, cfg = ctx.method, ctx.cfg
    names, skipped = plan(method, ev)
    preflight(ctx, names)

    old = read_results(path)
    keep = old.get("protocols", {}) if old.get("weights") == ctx.version else {}
    results = {
        "run": str(path), "recipe": cfg.recipe, "method": cfg.method, "data": cfg.data.name,
        "image_size": int(ctx.train.image_size), "n_train": len(ctx.train), "n_test": len(ctx.test),
        "num_classes": ctx.train.num_classes, "weights": ctx.version, "params": method.param_counts(),
        "flops_per_image": int(method.flops_per_image()), "device": str(ctx.device),
        "precision": ctx.precision,  # of the feature extraction, as eval.precision resolved on this device
        "protocols": {k: v for k, v in keep.items() if k not in names},
    }
    init = read_init_record(path)  # provenance: the run this one continued from (genrep pretrain --init)
    if init is not None:
        results["init"] = init
    for name, reason in skipped.items():
        results["protocols"][name] = {"skipped": reason}
    results["protocols"] = _ordered(results["protocols"])
    out = path / RESULTS_DIR / EVAL_FILE
    for name in names:
        say(f"genrep evaluate: {name}")
        t0 = time.perf_counter()
        torch.manual_seed(ev.seed)  # protocols with internal randomness (t-SNE aside) are seeded from here
        r = PROTOCOLS[name].run(ctx)
        r["seconds"] = round(time.perf_counter() - t0, 2)
        r["settings"] = settings(name, ev)
        results["protocols"][name] = r
        results["protocols"] = _ordered(results["protocols"])
        atomic_write_json(out, results)
    atomic_write_json(out, results)
    return results


def run_probes(run, probe: ProbeConfig | None = None, device: str = "auto", progress: bool = True,
               options: dict | None = None, image_size: int | None = None) -> dict:
    """`genrep probe RUN`: the probes protocol with ``probe`` (default: the run's own ``probe`` section) at
    one read-out, no sweep, on ``run`` (a :class:`~genrep.run.Run`, or a folder opened here), under its lock;
    ``options`` changes model keys that change features (e.g. feature_t), and ``image_size`` reads both splits
    at another size (:meth:`Run.reading`). Writes and returns ``RUN/results/probe.json``."""
    from ..run import Run

    run = Run.of(run)
    with run.writing("probe"):
        return _run_probes(run, probe, device, progress and is_main(), options, image_size)


def _silent(*_args) -> None:
    pass


def _run_probes(run, probe: ProbeConfig | None, device: str, progress: bool, options: dict | None,
                image_size: int | None) -> dict:
    cfg = run.config
    p = probe or cfg.probe
    # the probe's seed is the run's; the features are read in the probe's batches up to evaluate's default, since
    # a solver's batch (lars: MAE's 16,384) is no size for the network's forward pass
    extract_batch = min(p.batch_size, EvalConfig().batch_size)
    ev = replace(EvalConfig(), protocols=["probes"], weights=p.weights, device=device, batch_size=extract_batch,
                 seed=cfg.train.seed, precision=p.precision, probes=probes_protocol.from_probe_config(p))
    t0 = time.perf_counter()
    ctx = EvalContext.open(run, ev, options=options, progress=progress, image_size=image_size)
    probes_protocol.check(ctx)
    r = probes_protocol.run(ctx)
    results = {
        "run": str(run.path), "recipe": ctx.cfg.recipe, "method": ctx.cfg.method, "weights": ctx.version,
        "data": ctx.cfg.data.name, "image_size": int(ctx.train.image_size),
        **({"trained_image_size": ctx.trained_size} if ctx.trained_size else {}),
        "n_train": len(ctx.train), "n_test": len(ctx.test), "num_classes": ctx.train.num_classes, "layer": r["layer"], "pool": r["pool"], **ctx.feature_options,
        "precision": r["precision"], "feature_dim": r["feature_dim"], "headline": r["headline"],
        "linear_probe": r["linear_probe"], "knn": r["knn"],
    }
    if "classifier_acc" in r:
        results["classifier_test_acc"] = r["classifier_acc"]
    if "heads" in r:
        results["heads"] = r["heads"]
    if "causal" in r:  # a causal method's mask state at the read-out
        results["causal"] = r["causal"]
    results["seconds"] = round(time.perf_counter() - t0, 2)
    save_probe_classifier(ctx, results)
    atomic_write_json(run.path / RESULTS_DIR / PROBE_FILE, results)
    return results


def save_probe_classifier(ctx: EvalContext, results: dict) -> None:
    """The linear probe's classifier on the raw features, for ``genrep predict`` on a method without logits; with
    what it reads (the read-out, the read options, the size) so a prediction reads the same features."""
    from ..io import atomic_save_safetensors
    from ..predict import PROBE_CLASSIFIER, probe_record

    c = ctx.linear_classifier
    atomic_save_safetensors(ctx.run / RESULTS_DIR / PROBE_CLASSIFIER, {"weight": c["weight"], "bias": c["bias"]},
                            probe_record(results, ctx.cfg), "the probe's classifier")
