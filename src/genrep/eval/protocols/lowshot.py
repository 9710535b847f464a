"""The low-shot protocol: a read-out trained on a small labelled fraction of the train set; test accuracy and ECE.

Protocol (:func:`low_shot`), after GCRL's Table 8 (CIFAR-10 with 1%, 5% and 10% of the labels, i.e. 500,
2,500 and 5,000 images, five random seeds 0..4, accuracy and ECE as mean ± std over the seeds):

* For each fraction and seed, a class-stratified subset of the train set is drawn
  (:func:`stratified_subset`) and a read-out trained on it alone; the whole test set scores it.
* ``readout="linear"``: the frozen representation (``method.features`` at ``layer``/``pool``, the method's
  defaults unless given) is extracted once for all train and test images (or passed in as ``features``),
  and a multinomial logistic regression is fitted on the subset's rows with
  :func:`genrep.eval.metrics.probes.linear_probe` (standardised with the subset's statistics, full-batch LBFGS,
  fixed ``weight_decay``, default 1e-3: the middle of ``genrep probe``'s sweep grid; a held-out sweep is
  unreliable with one or two labels per class). Seeds change only the subset, since the fit is convex.
* ``readout="finetune"``: :func:`genrep.eval.protocols.finetune.finetune` on the subset, with ``finetune_kwargs``.
* ECE: the read-out's softmax probabilities on the test set in ``ece_bins`` equal-width confidence bins
  (:func:`genrep.eval.metrics.calibration.expected_calibration_error`; 15 bins as Guo et al.).
* Spread: the sample standard deviation over seeds (ddof=1); with a single seed it is reported as 0.0.

GCRL does not say which read-out its low-shot numbers use; ``"linear"`` is the default because it is cheap
and isolates the representation; ``"finetune"`` is the transfer setting of its section 4.2.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...data.imageset import ImageSet
from ...errors import GenrepError
from ...fields import setting
from ...methods import Method
from ..features import extract_features
from ..metrics.calibration import expected_calibration_error
from ..metrics.probes import linear_probe
from .context import EvalContext, default_readout
from .finetune import check_image_sets, finetune, finetune_kwargs, method_device

__all__ = ["LOWSHOT_WEIGHT_DECAY", "READOUTS", "LowshotSettings", "low_shot", "run", "stratified_subset"]

READOUTS = ("linear", "finetune")
LOWSHOT_WEIGHT_DECAY = 1e-3
# low_shot sets these for every fine-tune itself
_OWN_FINETUNE_KEYS = ("layer", "pool", "seed", "device", "ece_bins", "progress")


@dataclass
class LowshotSettings:
    fractions: list[float] = setting([0.01, 0.05, 0.1], above=0, max=1, nonempty=True, unique=True,
                                     hint="a fraction of the labels: 0.01 is 1%")
    seeds: list[int] = setting([0, 1, 2, 3, 4], nonempty=True, unique=True)
    readout: str = setting("linear", choices=READOUTS)  # linear (frozen features) | finetune (eval.finetune.*)


def _check_fraction(fraction) -> float:
    ok = not isinstance(fraction, bool) and isinstance(fraction, (int, float)) and 0 < fraction <= 1
    if not ok:
        raise GenrepError(f"a low-shot fraction must be a number in (0, 1] (0.01 is 1% of the labels), "
                          f"got {fraction!r}")
    return float(fraction)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenrepError(f"a seed must be an integer, got {seed!r}")
    return seed


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices (LongTensor) of a class-stratified random subset of ``labels``.

    Each class c present with n_c images contributes ``max(1, floor(fraction * n_c + 0.5))`` of them (rounded
    half up, and at least one, so that every class is represented even at 1% of a small set), drawn without
    replacement from a generator seeded with ``seed``. The draw of a class does not depend on ``fraction``,
    so for one seed the subsets are nested: the 1% subset lies inside the 5% one, which lies inside the 10%.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        got = (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise GenrepError(f"labels must be a 1-D integer tensor of class indices, got {got}")
    if len(labels) == 0:
        raise GenrepError("labels is empty; a subset needs at least one labelled image")
    fraction, seed = _check_fraction(fraction), _check_seed(seed)
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(labels).tolist():  # sorted, so the generator's draws follow a fixed class order
        idx = (labels == c).nonzero().squeeze(1)
        k = max(1, math.floor(fraction * len(idx) + 0.5))
        picks.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picks).sort().values


def _summary(per_seed: list[dict], n_labels: int) -> dict:
    acc = torch.tensor([r["acc"] for r in per_seed], dtype=torch.float64)
    ece = torch.tensor([r["ece"] for r in per_seed], dtype=torch.float64)

    def std(t: torch.Tensor) -> float:
        return float(t.std(unbiased=True)) if len(t) > 1 else 0.0

    return {"n_labels": n_labels, "acc_mean": float(acc.mean()), "acc_std": std(acc),
            "ece_mean": float(ece.mean()), "ece_std": std(ece), "per_seed": per_seed}


def _check_lists(fractions, seeds) -> tuple[list[float], list[int]]:
    for what, v in (("fractions", fractions), ("seeds", seeds)):
        if not isinstance(v, Sequence) or isinstance(v, str) or len(v) == 0:
            raise GenrepError(f"{what} must be a non-empty list, got {v!r}")
    fr = [_check_fraction(f) for f in fractions]
    sd = [_check_seed(s) for s in seeds]
    if len(set(fr)) != len(fr) or len(set(sd)) != len(sd):
        raise GenrepError(f"fractions and seeds must not repeat a value, got fractions {list(fractions)} and "
                          f"seeds {list(seeds)}")
    return fr, sd


def _check_features(features, train_set: ImageSet, test_set: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(features, (tuple, list)) or len(features) != 2 \
            or not all(isinstance(f, torch.Tensor) for f in features):
        raise GenrepError("features must be a pair of tensors (train_x [N_train, D], test_x [N_test, D])")
    train_x, test_x = features
    for what, x, s in (("train", train_x, train_set), ("test", test_x, test_set)):
        if x.dim() != 2 or len(x) != len(s):
            raise GenrepError(f"the {what} features have shape {tuple(x.shape)} but the {what} set has "
                              f"{len(s)} images; pass [N, D] features, one row per image in the set's order")
    return train_x, test_x


def low_shot(method: Method, train_set: ImageSet, test_set: ImageSet, *,
             fractions: Sequence[float] = (0.01, 0.05, 0.10), seeds: Sequence[int] = (0, 1, 2, 3, 4),
             readout: str = "linear", layer: int | None = None, pool: str | None = None,
             weight_decay: float | Sequence[float] = LOWSHOT_WEIGHT_DECAY, ece_bins: int = 15,
             device: str | torch.device | None = None, batch_size: int = 512, progress: bool = False,
             finetune_kwargs: dict | None = None,
             features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Low-shot transfer of ``method`` (see the module docstring); returns a JSON-serialisable dict.

    ``{"readout", "layer", "pool", "seeds", "n_train", "n_test", "seconds", "fractions": {str(fraction):
    {"n_labels", "acc_mean", "acc_std", "ece_mean", "ece_std", "per_seed": [{"seed", "acc", "ece",
    "train_acc"}, ...]}}}`` (keys like ``"0.01"``, ``"0.1"``), plus ``"weight_decay"`` for the linear
    read-out. ``device=None`` uses the method's device; ``batch_size`` is the feature-extraction batch.
    ``features=(train_x, test_x)``, precomputed for every image of the two sets, skips the extraction
    (linear read-out only; then ``layer``/``pool`` must not be given, they are already applied).
    ``finetune_kwargs`` go to :func:`finetune` (e.g. ``epochs``, ``lr``, ``augment``); low_shot sets
    ``layer``, ``pool``, ``seed``, ``device``, ``ece_bins`` and ``progress`` itself.
    """
    t0 = time.perf_counter()
    if readout not in READOUTS:
        raise GenrepError(f"unknown low-shot readout {readout!r}; choose one of {', '.join(READOUTS)}")
    fracs, seed_list = _check_lists(fractions, seeds)
    check_image_sets(method, train_set, test_set)
    if not isinstance(ece_bins, int) or isinstance(ece_bins, bool) or ece_bins < 1:
        raise GenrepError(f"ece_bins must be a positive integer, got {ece_bins!r}")
    dev = method_device(method, device)
    kwargs = dict(finetune_kwargs or {})
    if readout == "linear" and kwargs:
        raise GenrepError("finetune_kwargs apply to readout='finetune' only; drop them or set "
                          "readout='finetune'")
    unknown = sorted(set(kwargs) - set(inspect.signature(finetune).parameters))
    if unknown:
        raise GenrepError(f"finetune_kwargs has unknown keys {', '.join(unknown)}; the keys are the keyword "
                          f"arguments of genrep.eval.protocols.finetune.finetune")
    clash = sorted(set(kwargs) & set(_OWN_FINETUNE_KEYS))
    if clash:
        raise GenrepError(f"finetune_kwargs must not set {', '.join(clash)}; pass them to low_shot itself "
                          f"(seeds=..., layer=..., device=...)")
    if features is not None:
        if readout != "linear":
            raise GenrepError("precomputed features apply to readout='linear' only; drop features=")
        if layer is not None or pool is not None:
            raise GenrepError("pass either features= or layer=/pool=, not both: precomputed features fix the "
                              "read-out already")
        train_x, test_x = _check_features(features, train_set, test_set)
    else:
        layer, pool = method.check_feature_args(layer, pool)

    if readout == "linear" and features is None:
        p = next(method.parameters(), None)
        if p is not None and p.device != dev and not (dev.type == p.device.type and dev.index is None):
            raise GenrepError(f"the method is on {p.device} but device={dev}; move it with method.to(...) or "
                              f"pass device='{p.device}'")
        was_training = method.training  # extract_features switches to eval mode; give the caller theirs back
        try:
            train_x, test_x = (extract_features(method, s.images, layer=layer, pool=pool,
                                                batch_size=batch_size, device=dev, bf16=dev.type == "cuda",
                                                progress=progress, desc=f"features {what}")
                               for what, s in (("train", train_set), ("test", test_set)))
        finally:
            method.train(was_training)

    runs = [(f, s) for f in fracs for s in seed_list]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(runs), desc=f"low-shot ({readout})", unit="fit", leave=False, dynamic_ncols=True,
                   disable=None)
    out: dict[str, dict] = {}
    try:
        for f in fracs:
            per_seed = []
            for s in seed_list:
                idx = stratified_subset(train_set.labels, f, s)
                if readout == "linear":
                    res = linear_probe(train_x[idx].to(dev), train_set.labels[idx], test_x, test_set.labels,
                                       train_set.num_classes, solver="lbfgs", weight_decay=weight_decay,
                                       return_test_probs=True)
                    row = {"seed": s, "acc": res.test_acc, "train_acc": res.train_acc,
                           "ece": expected_calibration_error(res.test_probs, test_set.labels, ece_bins)}
                else:
                    subset = ImageSet(images=train_set.images[idx], labels=train_set.labels[idx],
                                      classes=train_set.classes, name=f"{train_set.name}[{f:g} seed {s}]")
                    res = finetune(method, subset, test_set, layer=layer, pool=pool, seed=s, device=dev,
                                   ece_bins=ece_bins, progress=progress, **kwargs)
                    row = {"seed": s, "acc": res["test_acc"], "train_acc": res["train_acc"],
                           "ece": res["test_ece"]}
                per_seed.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(fraction=f"{f:g}", acc=f"{row['acc']:.3f}")
            out[str(f)] = _summary(per_seed, len(idx))
    finally:
        if bar is not None:
            bar.close()
    result = {"readout": readout, "layer": layer, "pool": pool, "seeds": seed_list, "n_train": len(train_set),
              "n_test": len(test_set)}
    if readout == "linear":
        wd = weight_decay
        result["weight_decay"] = wd if isinstance(wd, (int, float)) else [float(v) for v in wd]
    result["fractions"] = out
    result["seconds"] = time.perf_counter() - t0
    return result


def check(ctx: EvalContext) -> None:
    ctx.transfer_sets()  # a transfer data set missing offline fails before any work


def run(ctx: EvalContext) -> dict:
    s = ctx.ev.lowshot
    layer, pool = default_readout(ctx.method)
    train, test = ctx.transfer_sets()
    own = train is ctx.train
    features = None
    if s.readout == "linear":
        features = (ctx.features("train", layer, pool, None if own else train),
                    ctx.features("test", layer, pool, None if own else test))
    kwargs = finetune_kwargs(ctx) if s.readout == "finetune" else None
    return {"data": train.name, **low_shot(ctx.method, train, test, fractions=tuple(s.fractions), seeds=tuple(s.seeds),
                                           readout=s.readout, ece_bins=ctx.ev.calibration.bins, device=ctx.device,
                                           progress=ctx.progress, features=features, finetune_kwargs=kwargs)}
