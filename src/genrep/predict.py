"""Selective prediction: classify images and abstain on those the model should not answer (``genrep predict``,
``Run.predict``).

A prediction is the class of the run's logits (a method without logits: the linear classifier ``genrep probe``
saved, ``results/probe-linear.safetensors``), its probability, and a score of how much the image looks like the
training distribution: the one of the run's OOD evaluation with the best mean AUROC that can be computed per image
(``msp``, ``energy``, ``bpd``, ``gaussian``; without an OOD evaluation, MSP, selective classification's baseline).
The Gaussian score's class-conditional Gaussians are fitted on the training split's features at the OOD evaluation's
read-out and covariance, and saved beside the threshold (``results/predict-gaussian.safetensors``). An image is
answered when its score reaches a threshold fitted on held-out data of the training distribution: one half of a
seeded split of the test split (the other half measures what the threshold does: the coverage, the selective risk
and the risk-coverage curve's area, AURC), at the asked coverage (the share of those images answered) or at the
largest coverage whose selective risk (the error rate of the answered) stays within the asked risk. The fitted
threshold is saved as ``results/predict.json`` and reused while the weights and the request are the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GenrepError
from .eval.metrics.selective import risk_coverage

PROBE_CLASSIFIER = "probe-linear.safetensors"
PREDICT_FILE = "predict.json"
PREDICT_FORMAT = "genrep-predict-1"
PROBE_FORMAT = "genrep-probe-classifier-1"
GAUSSIAN_FILE = "predict-gaussian.safetensors"
GAUSSIAN_FORMAT = "genrep-predict-gaussian-1"
SCORES = ("msp", "energy", "bpd", "gaussian")   # the OOD scores computed per image at prediction time
DEFAULT_COVERAGE = 0.95
SPLIT_SEED = 0


# ------------------------------------------------------------------ requests and the saved probe

def check_request(coverage: float | None, max_risk: float | None) -> dict:
    """The asked operating point as a record: {"coverage": c} or {"max_risk": r}; one line for a bad one."""
    if coverage is not None and max_risk is not None:
        raise GenrepError("give --coverage or --max-risk, not both: the threshold is fitted to one of them")
    if max_risk is not None:
        if isinstance(max_risk, bool) or not isinstance(max_risk, (int, float)) or not 0 < max_risk < 1:
            raise GenrepError(f"max risk {max_risk!r} must lie in (0, 1): the error rate allowed among answered images")
        return {"max_risk": float(max_risk)}
    c = DEFAULT_COVERAGE if coverage is None else coverage
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
        raise GenrepError(f"coverage {c!r} must lie in (0, 1]: the share of in-distribution images answered")
    return {"coverage": float(c)}


def probe_record(results: dict, cfg) -> dict[str, str]:
    """What a saved probe classifier reads: the metadata of ``results/probe-linear.safetensors``."""
    options = {k: results[k] for k in ("feature_t", "feature_noise", "feature_noise_seed", "causal") if k in results}
    return {"format": PROBE_FORMAT, "method": cfg.method, "weights": results["weights"], "layer": str(results["layer"]),
            "pool": str(results["pool"]), "image_size": str(results["image_size"]),
            "options": json.dumps(options, sort_keys=True)}


def read_fitted(run, name: str, fmt: str, keys: tuple[str, ...], what: str, again: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors ``keys`` and metadata of ``results/NAME``, a file genrep fitted on the run's weights, checked to be
    ``fmt`` for the run's method and its present weights; ``again`` says how to fit it anew."""
    from safetensors import SafetensorError, safe_open

    path = run.path / "results" / name
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError):
        raise GenrepError(f"{path} is damaged; {again}") from None
    if meta.get("format") != fmt or meta.get("method") != run.config.method:
        raise GenrepError(f"{path} is not a {run.config.method} {what}; {again}")
    if meta.get("weights") != run.version:
        raise GenrepError(f"{path} was fitted on the {meta.get('weights')} weights and the run's are {run.version} "
                          f"now; {again}")
    return tensors, meta


def read_probe_classifier(run) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """(weight, bias, layer, pool) of the probe genrep probe saved, checked to read what ``run`` reads now."""
    path = run.path / "results" / PROBE_CLASSIFIER
    again = f"run genrep probe {run.path} to fit one"
    if not path.is_file():
        raise GenrepError(f"{run.config.method} has no logits, so it predicts through the linear classifier genrep "
                          f"probe saves, and {run.path} has none ({path.name}); {again}")
    t, meta = read_fitted(run, PROBE_CLASSIFIER, PROBE_FORMAT, ("weight", "bias"), "probe classifier", again)
    weight, bias = t["weight"], t["bias"]
    if meta.get("image_size") != str(run.method.data.image_size):
        raise GenrepError(f"{path} was fitted on features read at {meta.get('image_size')} px and the run reads "
                          f"{run.method.data.image_size} px; {again} at its own size")
    if weight.dim() != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] != run.method.data.num_classes:
        raise GenrepError(f"{path} holds a classifier of shape {tuple(weight.shape)}, not one of the run's "
                          f"{run.method.data.num_classes} classes; {again}")
    return weight.float(), bias.float(), int(meta["layer"]), meta["pool"]


# ------------------------------------------------------------------ logits and scores

def logits(run, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class logits [N, K] of uint8 images at the run's size: the method's, or the saved probe's on its features."""
    from .eval.features import image_batches

    if "logits" not in run.method.capabilities:
        weight, bias, layer, pool = read_probe_classifier(run)
        feats = run.features(images, layer=layer, pool=pool, batch_size=batch_size)
        return torch.addmm(bias, feats.flatten(1), weight.t())
    parts = [torch.zeros(0, run.method.data.num_classes)]
    with torch.no_grad():
        for x in image_batches(images, batch_size, run.device):
            parts.append(run.method.logits(x).float().cpu())
    return torch.cat(parts)


def choose_score(run) -> tuple[str, str, dict]:
    """The score an image is judged by, why, and the run's OOD evaluation record ({} without one): the evaluation's
    best (mean AUROC over its sets) of the scores computable per image, else MSP."""
    from .eval.evaluate import EVAL_FILE, read_results

    usable = [k for k in SCORES if k != "bpd" or "nll" in run.method.capabilities]
    if (run.path / "results" / EVAL_FILE).is_file():
        ood = read_results(run.path).get("protocols", {}).get("ood", {})
        ranked = []
        for kind, per_set in (ood.get("scores") or {}).items():
            aurocs = [m.get("auroc") for m in per_set.values() if isinstance(m, dict)]
            if kind in usable and aurocs and all(isinstance(a, (int, float)) for a in aurocs):
                ranked.append((sum(aurocs) / len(aurocs), kind))
        if ranked:
            auroc, kind = max(ranked)
            return kind, (f"the best mean AUROC ({auroc:.3f}) over {', '.join(ood.get('sets', []))} of the scores "
                          f"computable per image in the run's OOD evaluation"), ood
    return "msp", "the run has no OOD evaluation (genrep evaluate RUN --eval.protocols ood): MSP, the baseline", {}


# ------------------------------------------------------------------ the Gaussian score's fitted state

@dataclass
class ReadoutGaussians:
    """Class-conditional Gaussians (``GaussianOODScore``) and the read-out whose features they score."""
    score: object
    layer: int
    pool: str


def gaussian_readout(run, ood: dict) -> tuple[int, str, str]:
    """(layer, pool, covariance) the OOD evaluation fitted its Gaussians with, checked to be a read-out of the run."""
    from .eval.metrics.ood import COVARIANCES

    layer, pool, covariance = ood.get("layer"), ood.get("pool"), ood.get("gaussian_covariance")
    if covariance not in COVARIANCES or isinstance(layer, bool) or not isinstance(layer, int) \
            or not isinstance(pool, str):
        raise GenrepError(f"{run.path}/results/eval.json's OOD record names no Gaussian read-out (layer {layer!r}, "
                          f"pool {pool!r}, covariance {covariance!r}); evaluate it again: genrep evaluate "
                          f"{run.path} --eval.protocols ood")
    layer, pool = run.method.check_feature_args(layer, pool)
    return layer, pool, covariance


def fit_gaussian(run, ood: dict, batch_size: int = 256):
    """Class-conditional Gaussians on the training split's features at the OOD evaluation's read-out and covariance
    (what its ``gaussian`` score was measured with), and that read-out."""
    from .eval.metrics.ood import GaussianOODScore
    from .runs import load_split

    layer, pool, covariance = gaussian_readout(run, ood)
    train = load_split(run.config, "train")
    feats = run.features(train.images, layer=layer, pool=pool, batch_size=batch_size)
    return ReadoutGaussians(GaussianOODScore().fit(feats.flatten(1), train.labels, covariance=covariance), layer, pool)


def save_gaussian(run, fitted: ReadoutGaussians) -> None:
    from .io import atomic_save_safetensors

    meta = {"format": GAUSSIAN_FORMAT, "method": run.config.method, "weights": run.version,
            "layer": str(fitted.layer), "pool": fitted.pool, "covariance": fitted.score.covariance}
    atomic_save_safetensors(run.path / "results" / GAUSSIAN_FILE, fitted.score.state(), meta,
                            "the Gaussian score's fit")


def read_gaussian(run) -> ReadoutGaussians:
    """The Gaussians ``genrep predict`` saved, checked: the run's method and weights, and shapes that fit."""
    from .eval.metrics.ood import GaussianOODScore

    path = run.path / "results" / GAUSSIAN_FILE
    again = f"move it away and run genrep predict {run.path} again"
    state, meta = read_fitted(run, GAUSSIAN_FILE, GAUSSIAN_FORMAT, ("means", "chol", "classes"), "Gaussian score fit",
                              again)
    if not str(meta.get("layer", "")).isdigit():
        raise GenrepError(f"{path} names no read-out layer ({meta.get('layer')!r}); {again}")
    try:
        g = GaussianOODScore.from_state(state, meta.get("covariance"))
    except GenrepError as e:
        raise GenrepError(f"{path}: {e}; {again}") from None
    return ReadoutGaussians(g, int(meta["layer"]), meta["pool"])


def scores(run, images: torch.Tensor, class_logits: torch.Tensor, kind: str, batch_size: int = 256,
           gaussian=None) -> torch.Tensor:
    """Higher is more like the training distribution: float64 [N] (``gaussian``: the :class:`ReadoutGaussians`, for
    that score)."""
    from .eval.metrics.ood import energy_score, msp_score

    if kind == "msp":
        return msp_score(class_logits).double()
    if kind == "energy":
        return energy_score(class_logits).double()
    if kind == "bpd":
        return -torch.cat([run.nll(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    if kind == "gaussian":
        feats = run.features(images, layer=gaussian.layer, pool=gaussian.pool, batch_size=batch_size)
        return gaussian.score.score(feats.flatten(1)).cpu()
    raise GenrepError(f"score {kind!r} is not computed per image; choose among {', '.join(SCORES)}")


# ------------------------------------------------------------------ the threshold

def fit_threshold(score: torch.Tensor, correct: torch.Tensor, request: dict) -> float:
    """The least score answered: the asked coverage's, or the largest coverage's whose selective risk is within the
    asked risk (+inf: none is, and everything is abstained on)."""
    ranked = torch.sort(score, descending=True).values
    if "coverage" in request:
        k = max(1, math.ceil(request["coverage"] * len(score)))
        return float(ranked[k - 1])
    _, risk, _ = risk_coverage(score, correct)
    ok = torch.nonzero(risk <= request["max_risk"]).flatten()
    return float(ranked[int(ok[-1])]) if len(ok) else math.inf


def held_out_halves(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[: n // 2], perm[n // 2:]


def fit(run, request: dict, batch_size: int = 256) -> tuple[dict, ReadoutGaussians | None]:
    """Fit the threshold on one half of the run's test split and measure it on the other: the record to save, and
    the Gaussians the score needs (None for the other scores), to save beside it (:func:`save_gaussian`)."""
    from .runs import load_split

    test = load_split(run.config, "test")
    if len(test) < 4:
        raise GenrepError(f"the test split of {test.name} has {len(test)} images; fitting a threshold needs at least 4")
    kind, why, ood = choose_score(run)
    gaussian = fit_gaussian(run, ood, batch_size) if kind == "gaussian" else None
    lg = logits(run, test.images, batch_size)
    s = scores(run, test.images, lg, kind, batch_size, gaussian)
    correct = lg.argmax(1) == test.labels
    fit_idx, check_idx = held_out_halves(len(test))
    threshold = fit_threshold(s[fit_idx], correct[fit_idx], request)
    answered = s[check_idx] >= threshold
    n_ans = int(answered.sum())
    _, _, aurc = risk_coverage(s[check_idx], correct[check_idx])
    record = {
        "format": PREDICT_FORMAT, "request": request, "score": kind, "score_reason": why, "threshold": threshold,
        "classifier": ("the method's logits" if "logits" in run.method.capabilities
                       else f"genrep probe's linear classifier ({PROBE_CLASSIFIER})"),
        "weights": run.version, "classes": list(test.classes),
        "fitted_on": {"data": run.config.data.name, "split": "test", "images": len(fit_idx),
                      "how": f"one half of a permutation of the test split seeded by {SPLIT_SEED}"},
        "held_out": {"images": len(check_idx), "coverage": n_ans / len(check_idx),
                     "selective_risk": (float((~correct[check_idx][answered]).double().mean()) if n_ans else None),
                     "risk_all": float((~correct[check_idx]).double().mean()), "aurc": aurc},
    }
    if gaussian is not None:
        record["gaussian"] = {"file": GAUSSIAN_FILE, "layer": gaussian.layer, "pool": gaussian.pool,
                              "covariance": gaussian.score.covariance,
                              "fitted_on": f"the {run.config.data.name} train split"}
    return record, gaussian


def read_saved(run, request: dict | None) -> dict | None:
    """``results/predict.json`` when it was fitted for these weights (and this request, when one is given); a file
    there that is not genrep's is a one-line error, never fitted over."""
    path = saved_path(run)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != PREDICT_FORMAT:
        raise GenrepError(f"{path} is not genrep's fitted threshold (format {PREDICT_FORMAT}); move it away and "
                          f"predict again")
    if record.get("weights") != run.version:
        return None
    if request is not None and record.get("request") != request:
        return None
    if record.get("score") not in SCORES or not isinstance(record.get("threshold"), (int, float)):
        return None
    if record["score"] == "gaussian" and not (run.path / "results" / GAUSSIAN_FILE).is_file():
        return None   # fitted again, with its Gaussians
    return record


def predict(run, images: torch.Tensor, record: dict, gaussian=None, batch_size: int = 256) -> dict:
    """Classes, probabilities, scores and abstentions of uint8 images at the run's size, by a fitted ``record`` (and
    its Gaussians: those just fitted, else the saved ones)."""
    lg = logits(run, images, batch_size)
    probs = torch.softmax(lg, dim=1)
    p, cls = probs.max(1)
    if record["score"] == "gaussian" and gaussian is None:
        gaussian = read_gaussian(run)
    s = scores(run, images, lg, record["score"], batch_size, gaussian)
    return {"classes": cls, "probabilities": p, "scores": s, "abstain": s < record["threshold"],
            "score": record["score"], "threshold": record["threshold"]}


def saved_path(run) -> Path:
    return run.path / "results" / PREDICT_FILE
