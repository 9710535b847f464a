"""The OOD protocol: every score the method offers (higher = more in-distribution), against generated sets
and registry data sets resized to the run's images; AUROC, AUPRC, FPR95 and score histograms.

Which score needs what is in ``_NEEDS``; :func:`method_scores` is the batched pass over a method that
also serves t-SNE's OOD points and any script.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import GenrepError
from ...data.packed import is_uint8_images
from ...fields import Pool, setting
from ..features import image_batches
from ..metrics.ood import COVARIANCES, KINDS, GaussianOODScore, energy_score, msp_score, ood_metrics
from ..ood_sets import INTERP_PAIRS
from .context import EvalContext, methods_with

__all__ = ["OODSettings", "applicable_scores", "method_scores", "run"]

_NEEDS = {"msp": ("logits", "needs a classifier head (logits)"),
          "energy": ("logits", "needs a classifier head (logits)"),
          "bpd": ("nll", "needs a likelihood (the nll capability: a diffusion model's bits/dim)"),
          "score_norm": ("score", "needs the score function d log p(x) / dx (the score capability)")}


@dataclass
class OODSettings:
    # generated sets (noise, constant, interp) or any data set name of the registry (svhn, npz:PATH), resized
    sets: list[str] = setting(["noise", "constant", "interp"])
    scores: list[str] = setting([], choices=KINDS)  # empty: every score the method offers
    # in-distribution test images, and images per OOD set; null: all of both, as the HybViT paper scores them
    n: int | None = setting(1000, min=1, hint="null: the whole test split and every OOD set whole")
    gaussian_covariance: str = setting("shared", choices=COVARIANCES)
    # random: the HybViT code's pairs of any two test images; different_class: only pairs of two classes
    interp_pairs: str = setting("random", choices=INTERP_PAIRS)
    # the Gaussian score's read-out; None: the method's default. The colour-token models' default LN read-out
    # gives every image the same norm, which the score on interpolations relies on (docs/benchmarks.md, issue 25):
    # their raw read-out is pool mean
    layer: int | None = setting(None, min=1)
    pool: Pool | None = None


def applicable_scores(method) -> dict[str, str | None]:
    """For each kind in ``KINDS``: None if ``method`` offers it, else the one-line reason it does not."""
    out: dict[str, str | None] = {"gaussian": None}  # every method has frozen features
    for kind in KINDS[1:]:
        cap, reason = _NEEDS[kind]
        out[kind] = None if cap in method.capabilities else reason
    return out


def _check_kinds(method, kinds, gaussian) -> list[str]:
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = list(dict.fromkeys(kinds))
    if not kinds:
        raise GenrepError(f"no OOD score requested; choose among {', '.join(KINDS)}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise GenrepError(f"unknown OOD score {unknown[0]!r}; choose among {', '.join(KINDS)}")
    why = applicable_scores(method)
    for k in kinds:
        if why[k] is not None:
            cap = _NEEDS[k][0]
            raise GenrepError(f"OOD score {k} {why[k]}, which {method.name} does not have; it applies to "
                              f"{', '.join(methods_with(cap)) or 'no registered method'}")
    if "gaussian" in kinds and (gaussian is None or gaussian.means is None):
        raise GenrepError("the gaussian OOD score needs a GaussianOODScore fitted on the training set's features "
                          "(pass gaussian=GaussianOODScore().fit(features, labels))")
    return kinds


def method_scores(method, images_uint8: Tensor, kinds: list[str], *, device: torch.device | str = "cpu",
                  batch_size: int = 256, gaussian: GaussianOODScore | None = None, layer: int | None = None,
                  pool: str | None = None, seed: int = 0, progress: bool = False) -> dict[str, Tensor]:
    """OOD scores of uint8 images [N, C, H, W]: ``{kind: float64 [N]}`` on the CPU, higher = in-distribution.

    ``gaussian`` reads ``method.features(x, layer, pool)`` (use the layer and pooling it was fitted with)
    and is moved to ``device``;
    ``bpd`` is minus ``method.nll(x)`` (its terms are the method's option ``model.nll_terms``) with one CPU
    generator seeded by ``seed`` for the whole pass (the estimate then depends on ``batch_size``, not on the
    device). The method is put in eval mode.
    """
    kinds = _check_kinds(method, kinds, gaussian)
    if not is_uint8_images(images_uint8):
        raise GenrepError(f"OOD scoring needs uint8 images [N, C, H, W], got "
                          f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)} "
                          f"{tuple(getattr(images_uint8, 'shape', ()))}")
    d = method.data
    if tuple(images_uint8.shape[1:]) != (d.channels, d.image_size, d.image_size):
        _, c, h, w = images_uint8.shape
        raise GenrepError(f"OOD scoring got {h}x{w}x{c} images but {method.name} was built for "
                          f"{d.image_size}x{d.image_size}x{d.channels}; resize them (genrep.eval.ood_sets.make_ood_images does)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenrepError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device)
    if "gaussian" in kinds:
        method.check_feature_args(layer, pool)
        gaussian.to(device)
    method.eval()
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, list[Tensor]] = {k: [torch.zeros(0, dtype=torch.float64)] for k in kinds}
    for x in image_batches(images_uint8, batch_size, device, progress=progress,
                           desc=f"OOD scores ({', '.join(kinds)})"):
        with torch.no_grad():
            if "gaussian" in kinds:
                out["gaussian"].append(gaussian.score(method.features(x, layer=layer, pool=pool).float()).cpu())
            if "msp" in kinds or "energy" in kinds:
                logits = method.logits(x).float()
                for k, fn in (("msp", msp_score), ("energy", energy_score)):
                    if k in kinds:
                        out[k].append(fn(logits).double().cpu())
            if "bpd" in kinds:
                out["bpd"].append(-method.nll(x, generator=generator).double().cpu())
        if "score_norm" in kinds:
            with torch.no_grad():
                out["score_norm"].append(-method.grad_log_density(x).flatten(1).double().norm(dim=1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def score_kinds(ctx: EvalContext) -> tuple[list[str], dict[str, str]]:
    """The scores to compute and, for those asked for but not offered by the method, why not."""
    app = applicable_scores(ctx.method)
    asked = ctx.ev.ood.scores or list(app)
    return [k for k in asked if app[k] is None], {k: app[k] for k in asked if app[k] is not None}


def check(ctx: EvalContext) -> None:
    """Every OOD set must be one genrep can make (a registry set must be available: one missing offline fails
    here, not after the features are extracted), and at least one asked-for score must apply to the method,
    before any work. A registry set is loaded whole once; the run reuses it."""
    kinds, skipped = score_kinds(ctx)
    ctx.method.check_feature_args(ctx.ev.ood.layer, ctx.ev.ood.pool)
    if not kinds:
        offered = [k for k, why in applicable_scores(ctx.method).items() if why is None]
        reasons = "; ".join(f"{k} {why}" for k, why in skipped.items())
        raise GenrepError(f"eval.ood.scores asks only for scores {ctx.method.name} does not offer ({reasons}); "
                          f"choose among {', '.join(offered)}")
    for name in ctx.ev.ood.sets:
        ctx.ood_images(name, 1)


def run(ctx: EvalContext) -> dict:
    from ..report.figures import score_histogram

    s = ctx.ev.ood
    kinds, skipped = score_kinds(ctx)
    layer, pool = ctx.method.check_feature_args(s.layer, s.pool)
    gaussian = None
    if "gaussian" in kinds:
        gaussian = GaussianOODScore().fit(ctx.features("train", layer, pool), ctx.train.labels,
                                          covariance=s.gaussian_covariance)
    in_images, _ = ctx.test_subset(len(ctx.test) if s.n is None else s.n)
    n = len(in_images)

    def scores(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return method_scores(ctx.method, images, kinds, device=ctx.device, batch_size=ctx.ev.batch_size,
                             gaussian=gaussian, layer=layer, pool=pool, seed=ctx.ev.seed, progress=ctx.progress)

    s_in = scores(in_images)
    results = {k: {} for k in kinds}
    s_out_all, n_out = {}, {}
    for name in s.sets:
        images = ctx.ood_images(name, None if s.n is None else n)
        n_out[name] = len(images)
        s_out_all[name] = scores(images)
        for k in kinds:
            results[k][name] = ood_metrics(s_in[k], s_out_all[name][k])
    figures = {}
    in_name = f"{ctx.cfg.data.name} (in)"
    for k in kinds:
        fig = score_histogram({in_name: s_in[k], **{nm: sc[k] for nm, sc in s_out_all.items()}},
                              ctx.figure(f"ood-{k}"), title=f"OOD score: {k}", in_name=in_name)
        figures[f"OOD scores: {k}"] = ctx.rel(fig)
    out = {"scores": results, "n_in": n, "n_out": n_out, "sets": list(s.sets), "layer": layer, "pool": pool,
           "gaussian_covariance": s.gaussian_covariance, "interp_pairs": s.interp_pairs, "not_applicable": skipped,
           "figures": figures}
    if gaussian is not None:  # its ridge and the classes that fell back to the shared covariance
        out["gaussian"] = gaussian.summary()
    if "bpd" in kinds:
        out["nll"] = ctx.method.capability_settings("nll")
    if "score_norm" in kinds:  # what the gradient is taken by: the pixels, or a token model's input embeddings
        out["score_wrt"] = ctx.method.score_wrt
    return out
