"""The robustness protocol: accuracy of the classifier head under white-box PGD (the attack is
:func:`genrep.eval.metrics.robustness.pgd_robust`), per norm and eps, and the accuracy curves.

The defaults are genrep's attack (10 steps of 2.5 eps / 10, judged on the final iterate); the HybViT paper's
code ran ``steps: 50``, ``step_size: 20``, ``start: radius``, ``criterion: every_iterate`` (see the metric's
docstring for where each comes from)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import GenrepError
from ...data.packed import is_uint8_images
from ...fields import setting
from ..metrics.robustness import (CRITERIA, L2_EPS, LINF_EPS, NORMS, STARTS, _check_criterion, _check_eps_list,
                                  _check_norm, _check_start, _check_step_size, _check_steps, pgd_robust)
from .context import EvalContext


@dataclass
class RobustnessSettings:
    # the HybViT paper's eps lists, in units of 1/255
    norms: list[str] = setting(["linf", "l2"], choices=NORMS, nonempty=True)
    linf_eps: list[float] = setting([0, 1, 2, 4, 8, 12, 16, 22, 30], min=0, nonempty=True)
    l2_eps: list[float] = setting([0, 50, 100, 150, 200, 250, 300, 350, 400], min=0, nonempty=True)
    steps: int = setting(10, min=1)
    # per step, in units of 1/255 (an L2 length for l2); null: 2.5 * eps / steps; the paper's code: 20 at any eps
    step_size: float | None = setting(None, above=0)
    # uniform: uniform in the eps ball; radius: the paper's code (L2: a uniform radius, clipped at the first step);
    # none: from the clean image
    start: str = setting("uniform", choices=STARTS)
    # final: robust if the last iterate is classified correctly; every_iterate: the clean image and every
    # iterate must be (the paper's code)
    criterion: str = setting("final", choices=CRITERIA)
    n: int = setting(1000, min=1)   # test images (the paper's code: 1000 random ones)


def robust_accuracy(method, images_uint8: Tensor, labels: Tensor, *, norm: str,
                    eps_list: Sequence[float] | None = None, steps: int = 10, step_size: float | None = None,
                    start: str = "uniform", criterion: str = "final", batch_size: int = 256,
                    device: torch.device | str = "cpu", seed: int = 0,
                    bf16: bool = False, progress: bool = False) -> dict[str, float]:
    """The fraction of images ``method.logits`` classifies correctly under PGD, by ``criterion``, as
    ``{str(float(eps)): accuracy}``.

    ``images_uint8`` is uint8 [N, C, H, W], ``labels`` int [N]; the method must already be on
    ``device``. ``eps_list`` defaults to ``(0, *LINF_EPS)`` or ``(0, *L2_EPS)``; ``start`` and ``criterion``
    are those of :func:`genrep.eval.metrics.robustness.pgd_robust`. The method runs in eval
    mode and gets its previous mode back. The random starts are seeded per eps with ``seed`` (so one
    eps's number does not depend on which others are in the list) and drawn on the CPU, so a seed gives
    the same attack on any device for a given ``batch_size``.
    """
    if "logits" not in getattr(method, "capabilities", ()):
        raise GenrepError(f"PGD needs a classifier head, and method {getattr(method, 'name', type(method).__name__)} "
                          f"has no 'logits' capability; attack a supervised or hybvit model")
    norm, start, criterion = _check_norm(norm), _check_start(start), _check_criterion(criterion)
    eps_values = [0.0, *(LINF_EPS if norm == "linf" else L2_EPS)] if eps_list is None else _check_eps_list(eps_list)
    steps = _check_steps(steps)
    for e in eps_values:
        _check_step_size(step_size, e, steps)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenrepError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenrepError(f"seed must be an integer, got {seed!r}")
    if not is_uint8_images(images_uint8):
        raise GenrepError(f"robust_accuracy needs uint8 images [N, C, H, W], got "
                          f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)} "
                          f"{tuple(getattr(images_uint8, 'shape', ()))}")
    n = len(images_uint8)
    if n == 0:
        raise GenrepError("robust_accuracy got no images; pass at least one")
    if (not isinstance(labels, Tensor) or labels.dim() != 1 or len(labels) != n or labels.is_floating_point()
            or labels.dtype == torch.bool):
        raise GenrepError(f"robust_accuracy needs integer labels [N] with N = {n}, got "
                          f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    num_classes = getattr(getattr(method, "data", None), "num_classes", None)
    lo, hi = int(labels.min()), int(labels.max())
    if num_classes is not None and (lo < 0 or hi >= num_classes):
        raise GenrepError(f"labels lie in [{lo}, {hi}] but the classifier has {num_classes} classes; "
                          f"they must lie in [0, {num_classes - 1}]")

    device = torch.device(device)
    gens = [torch.Generator(device="cpu").manual_seed(seed) for _ in eps_values]
    correct = [0] * len(eps_values)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"PGD {norm}", unit="batch", leave=False, dynamic_ncols=True, disable=None)
    was_training = method.training
    method.eval()
    try:
        for i in starts:
            x = images_uint8[i:i + batch_size].to(device, non_blocking=True).float().div_(255)
            y = labels[i:i + batch_size].to(device, dtype=torch.long)
            for j, eps in enumerate(eps_values):
                ok = pgd_robust(method.logits, x, y, norm=norm, eps=eps, steps=steps, step_size=step_size,
                                start=start, criterion=criterion, generator=gens[j], bf16=bf16)
                correct[j] += int(ok.sum())
    finally:
        method.train(was_training)
    return {str(float(e)): c / n for e, c in zip(eps_values, correct)}


def run(ctx: EvalContext) -> dict:
    from ..report.figures import robustness_figure
    from ..report.summary import attack_text

    s = ctx.ev.robustness
    images, labels = ctx.test_subset(s.n)
    lists = {"linf": s.linf_eps, "l2": s.l2_eps}
    step_size = None if s.step_size is None else s.step_size / 255
    results = {norm: robust_accuracy(ctx.method, images, labels, norm=norm, eps_list=[e / 255 for e in lists[norm]],
                                     steps=s.steps, step_size=step_size, start=s.start, criterion=s.criterion,
                                     batch_size=ctx.ev.batch_size, device=ctx.device, seed=ctx.ev.seed,
                                     progress=ctx.progress)
               for norm in s.norms}
    out = {"accuracy": results, "eps_unit": "1/255", "eps": {k: lists[k] for k in results}, "steps": s.steps,
           "step_size": "2.5*eps/steps" if s.step_size is None else s.step_size, "start": s.start,
           "criterion": s.criterion, "n": len(images)}
    fig = robustness_figure(results, ctx.figure("pgd"), title=f"PGD: {attack_text(out)}")
    return {**out, "figures": {"PGD accuracy": ctx.rel(fig)}}
