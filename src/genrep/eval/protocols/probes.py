"""The probes protocol: a linear probe and kNN on frozen features at one read-out, then (for `genrep evaluate`)
a full-batch sweep over layers and poolings.

`genrep evaluate` runs it with ``eval.probes`` (the GCRL linear protocol: AdamW, 100 epochs, batch 512,
weight decay 1e-4, lr 0.01; genrep's defaults also standardise the features and decay the rate on a cosine,
which the GCRL/iGPT/SimCLR recipes turn off, as section 4.2 names nothing else); `genrep probe` runs it with
the run's ``probe`` section (:func:`from_probe_config`: its read-out and solver, no sweep) and writes
``results/probe.json``. The linear probe's test ECE (``eval.calibration.bins`` bins) is reported beside its
accuracy (GCRL's table 9 reports it). ``solver: lars`` is MAE's linear probe (DARL's table 13, GVP's linear
evaluation): its own keys are the ``lars`` section, and it reads the probe's ``epochs``, ``batch_size`` and
``weight_decay`` (MAE's are 90, 16384 and 0; the recipes of those papers set them). ``headline`` names the result
reported first: genrep's linear probe, or one of the diffusion-features paper's heads (its own linear head is that
paper's headline number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...errors import GenrepError
from ...fields import Pool, setting
from ...methods import Method
from ..metrics.heads import HEADS
from ..metrics.calibration import expected_calibration_error
from ..metrics.probes import LR_SCHEDULES, SOLVERS, knn_classify, linear_probe
from ..metrics.selective import msp_selective
from ..feature_store import is_mapped
from .context import EvalContext, check_causal
from .head_training import HeadSettings, check_head_features, train_head_at

HEADLINES = ("linear_probe", *HEADS)


def trained_heads(s) -> list[str]:
    """The heads a probe trains: those asked for, and the headline's when it names a head (a recipe's headline
    head is trained whatever ``heads`` a command line gives)."""
    return list(dict.fromkeys([*s.heads, *([s.headline] if s.headline != "linear_probe" else [])]))


# L-BFGS line searches and hundreds of tiny AdamW steps are latency-bound on a GPU (the digits probes took
# 25 s on an H200 and 5.7 s on 2 CPU cores), so probe problems smaller than this many train-feature
# elements are solved on the CPU; features are still extracted on the evaluation device
SMALL_PROBE = 1 << 22


@dataclass
class LarsSettings:
    """The lars solver's own keys (read only with ``solver: lars``; MAE's ``main_linprobe.py`` defaults)."""
    base_lr: float = setting(0.1, above=0)       # the rate is base_lr x batch / 256, of the batch used
    warmup_epochs: int = setting(10, min=0)      # linear warm-up, then a half-cycle cosine to 0, per step
    momentum: float = setting(0.9, min=0, below=1)
    trust_coefficient: float = setting(0.001, above=0)  # LARS's eta: the step of W is eta ||W|| / ||grad||
    label_smoothing: float = setting(0.0, min=0, below=1)  # MAE's code: none; DARL's table 13: 0.1


def check_lars(s, section: str) -> None:
    """The lars solver's rules across keys (``s``: the probes settings or a run's probe section)."""
    if s.solver != "lars":
        return
    if s.lars.warmup_epochs >= s.epochs:
        raise GenrepError(f"{section}.lars.warmup_epochs ({s.lars.warmup_epochs}) must be below {section}.epochs "
                          f"({s.epochs}): the cosine follows the warm-up (MAE: 10 of 90)")
    if s.batch_size < 2:
        raise GenrepError(f"{section}.batch_size 1 cannot be normalised by the lars solver's BatchNorm; give 2 or more "
                          f"(MAE: 16384, clamped to the train set)")


@dataclass
class ProbesSettings:
    layer: int | None = setting(None, min=1)   # the read-out; None: the method's default layer
    pool: Pool | None = None                    # None: the method's default pooling
    # adamw: the GCRL protocol; lbfgs: full batch; lars: MAE's linear probe (BatchNorm on the features, LARS)
    solver: str = setting("adamw", choices=SOLVERS)
    weight_decay: list[float] = setting([1e-4], min=0, nonempty=True)  # several: chosen on a held-out 10%
    epochs: int = setting(100, min=1, only_if={"solver": ("adamw", "lars")})
    lr: float = setting(0.01, above=0, only_if={"solver": "adamw"})  # lars: lars.base_lr
    batch_size: int = setting(512, min=1, only_if={"solver": ("adamw", "lars")})  # lars: clamped to the train set
    # features standardised with train statistics before the fit (lars normalises with its BatchNorm instead)
    standardize: bool = setting(True, only_if={"solver": ("lbfgs", "adamw")})
    lars: LarsSettings = field(default_factory=LarsSettings)
    lr_schedule: str = setting("cosine", choices=LR_SCHEDULES, only_if={"solver": "adamw"})
    knn_k: list[int] = setting([20, 200], min=1, nonempty=True)
    knn_temperature: float = setting(0.07, above=0)
    causal: bool | None = None                  # causal methods: read with (true) or without (false) the mask
    sweep: bool = True                          # then a full-batch L-BFGS probe at other read-outs
    sweep_layers: list[int] = setting([], min=1)  # empty: half, last and every k-th block
    sweep_pools: list[Pool] = field(default_factory=list)  # empty: every pooling the method offers
    sweep_weight_decay: list[float] = setting([1e-5, 1e-4, 1e-3, 1e-2], min=0, nonempty=True)
    # heads of the diffusion-features paper trained at the read-out's layer besides the linear probe (mlp on the
    # pooled vector; cnn and attention on the layer's map)
    heads: list[str] = setting([], choices=HEADS, unique=True)
    head: HeadSettings = field(default_factory=HeadSettings)
    # the result reported first: genrep's linear probe above, or one of the heads
    headline: str = setting("linear_probe", choices=HEADLINES)  # a head named here is trained even if not in heads

    def validate(self, section: str) -> None:
        check_lars(self, section)


def from_probe_config(p) -> ProbesSettings:
    """`genrep probe`'s settings (a run's ``probe`` section) as the protocol's: one read-out, no sweep."""
    return ProbesSettings(layer=p.layer, pool=p.pool, solver=p.solver, weight_decay=list(p.weight_decay),
                          epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, knn_k=list(p.knn_k),
                          knn_temperature=p.knn_temperature, sweep=False, heads=list(p.heads), head=p.head,
                          standardize=p.standardize, lr_schedule=p.lr_schedule, headline=p.headline,
                          lars=p.lars)


def sweep_layers(method: Method, asked: list[int]) -> list[int]:
    """Half, last and every k-th block (k = depth // 4, at least 1), unless the settings list layers."""
    n = method.num_layers
    if asked:
        return sorted(set(asked))
    k = max(1, n // 4)
    return sorted({math.ceil(n / 2), n, *range(k, n + 1, k)})


def sweep_pools(method: Method, asked: list[str]) -> list[str]:
    return list(asked) or list(method.feature_pools) or [method.default_pool]  # a U-Net's: its default p


def _on(feats: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Features on the device the probe fits on; a float16 file stays mapped (the probe reads it in blocks)."""
    return feats if is_mapped(feats) else feats.to(dev)


def _cache_kind(feats: torch.Tensor) -> str:
    return "float16, memory-mapped" if is_mapped(feats) else "float32, in memory"


def check(ctx: EvalContext) -> None:
    """What the boundary cannot know: the read-outs asked for must exist in this method."""
    s, m = ctx.ev.probes, ctx.method
    m.check_feature_args(s.layer, s.pool)
    check_causal(m, s.causal, "eval.probes.causal")
    for kind in trained_heads(s):
        check_head_features(m, kind, "probes.heads")
    if s.sweep:
        for layer in s.sweep_layers:
            m.check_feature_args(layer, None)
        for pool in s.sweep_pools:
            m.check_feature_args(None, pool)


def headline(name: str, out: dict) -> dict:
    """The result reported first: its name as the summary prints it and its test accuracy."""
    if name == "linear_probe":
        return {"name": "linear probe", "test_acc": out["linear_acc"]}
    return {"name": f"{name} head", "test_acc": out["heads"][name]["test_acc"]}


def classifier_accuracy(ctx: EvalContext) -> float:
    from .calibration import predict_probs

    probs = predict_probs(ctx.method, ctx.test.images, device=ctx.device, batch_size=ctx.ev.batch_size)
    return float((probs.argmax(1) == ctx.test.labels).float().mean())


def run(ctx: EvalContext) -> dict:
    """With ``causal`` set, a causal method's mask is switched for the probes and back afterwards (GVP
    probes with the mask it trained with; its features without the mask are another cache entry)."""
    s, m = ctx.ev.probes, ctx.method
    trained = m.causal_mask
    if s.causal is not None:
        m.causal_mask = s.causal
    try:
        out = _run(ctx, s, m)
    finally:
        m.causal_mask = trained
    if m.causal_readout:
        out["causal"] = bool(s.causal if s.causal is not None else trained)
    return out


def _run(ctx: EvalContext, s: ProbesSettings, m: Method) -> dict:
    n_cls = ctx.train.num_classes
    layer, pool = m.check_feature_args(s.layer, s.pool)
    xtr, xte = ctx.features("train", layer, pool), ctx.features("test", layer, pool)
    dev = ctx.device if xtr.numel() >= SMALL_PROBE else torch.device("cpu")
    xtr, xte = _on(xtr, dev), _on(xte, dev)
    ytr, yte = ctx.train.labels.to(dev), ctx.test.labels.to(dev)
    lars = s.solver == "lars"
    standardize = s.standardize and not lars
    lin = linear_probe(xtr, ytr, xte, yte, n_cls, solver=s.solver, weight_decay=s.weight_decay, epochs=s.epochs,
                       lr=s.lr, batch_size=s.batch_size, seed=ctx.ev.seed, return_test_probs=True,
                       standardize_features=standardize, lr_schedule=s.lr_schedule, base_lr=s.lars.base_lr,
                       warmup_epochs=s.lars.warmup_epochs, momentum=s.lars.momentum,
                       trust_coefficient=s.lars.trust_coefficient, label_smoothing=s.lars.label_smoothing,
                       device=dev)
    ctx.linear_classifier = {"weight": lin.weight, "bias": lin.bias}
    bins = ctx.ev.calibration.bins
    ece = expected_calibration_error(lin.test_probs, ctx.test.labels, bins)
    knn = knn_classify(xtr, ytr, xte, yte, n_cls, k=s.knn_k, temperature=s.knn_temperature, device=dev)
    selective = msp_selective(lin.test_probs, ctx.test.labels)   # every method can predict through its probe
    out = {"layer": layer, "pool": pool, **ctx.feature_options, "precision": ctx.precision,
           "feature_dim": int(xtr.shape[1]), "feature_cache": _cache_kind(xtr),
           "solver_device": str(dev), "linear_acc": lin.test_acc, "linear_ece": ece,
           "linear_selective": selective,
           "linear": {"solver": s.solver, "epochs": s.epochs, "lr": s.lr, "weight_decay": lin.weight_decay,
                      "batch_size": s.batch_size, "standardize": standardize,
                      **({"lr_schedule": s.lr_schedule} if s.solver == "adamw" else {}),
                      **(lin.solver_settings if lars else {})},  # lars: the scaled rate and the batch it used
           "linear_probe": {**lin.to_dict(), "test_ece": ece, "ece_bins": bins,
                            "standardize": standardize, "lr_schedule": s.lr_schedule if s.solver == "adamw" else None},
           "knn": {str(k): v for k, v in knn.items()}}
    if trained_heads(s):
        out["heads"] = {kind: train_head_at(ctx, kind, s.head, layer, pool) for kind in trained_heads(s)}
    out["headline"] = headline(s.headline, out)
    if s.sweep:
        sweep = []
        for ly in sweep_layers(m, s.sweep_layers):
            for pl in sweep_pools(m, s.sweep_pools):
                a, b = _on(ctx.features("train", ly, pl), dev), _on(ctx.features("test", ly, pl), dev)
                lp = linear_probe(a, ytr, b, yte, n_cls, solver="lbfgs", weight_decay=s.sweep_weight_decay,
                                  seed=ctx.ev.seed, device=dev)
                k_min = knn_classify(a, ytr, b, yte, n_cls, k=[min(s.knn_k)], temperature=s.knn_temperature,
                                     device=dev)
                sweep.append({"layer": ly, "pool": pl, "linear_acc": lp.test_acc, "weight_decay": lp.weight_decay,
                              "knn_acc": next(iter(k_min.values()))})
        best = max(sweep, key=lambda r: r["linear_acc"])
        out["sweep"] = sweep
        out["best"] = {**best, "selected_on": "test accuracy of the sweep (as the papers' layer sweeps report)"}
    if "logits" in m.capabilities:
        out["classifier_acc"] = classifier_accuracy(ctx)
    return out
