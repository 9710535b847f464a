"""Adversarial robustness: white-box PGD (Madry et al. 2018) under an L-inf or L2 budget.

Protocol (the HybViT paper, Sec. 5.2.3 and Table 12): untargeted PGD on the cross-entropy of the
classifier head, images in [0, 1] pixel space, normalisation inside the model (``Method.normalize``),
the model in eval mode; the reported number is the accuracy on the final PGD iterate, per eps.

Defaults
    * eps lists: the paper's Table 12, as fractions of the [0, 1] range: L-inf eps = 1, 2, 4, 8, 12,
      16, 22, 30 /255 (:data:`LINF_EPS`) and L2 eps = 50, 100, ..., 400 /255 (:data:`L2_EPS`).
      :func:`robust_accuracy` prepends eps = 0 (the paper's "Clean" column) when no list is given.
    * steps and step size: the paper does not state them, so we use the Madry-lab ``robustness``
      library convention: ``steps = 10`` and ``step_size = 2.5 * eps / steps`` (the iterates can
      travel 2.5 eps in total, enough to cross the ball from any random start and back).
    * random start: uniform in the L-inf ball, or uniform in the L2 ball (Gaussian direction, radius
      ``eps * U^(1/d)``), then clipped to [0, 1].

Each step: L-inf ascends along ``sign(grad)``, L2 along ``grad / ||grad||_2`` (per image); then the
perturbation is projected onto the eps ball and the image clipped to [0, 1]. Clipping to the box after
the ball never leaves the ball (it only moves coordinates towards the clean image). eps = 0 returns the
clean images unchanged, so its accuracy is exactly the clean accuracy.

Precision: the loss is cross-entropy in float32; the forward runs in float32 unless ``bf16=True``
(CUDA autocast for the forward only; the sign of a bf16 gradient can differ from the float32 one in
near-zero coordinates, so numbers meant for comparison with the paper should keep float32).
Gradients are taken w.r.t. the input only (``torch.autograd.grad``), so no ``.grad`` is written on the
model's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import GenrepError

__all__ = ["L2_EPS", "LINF_EPS", "NORMS", "pgd_attack", "robust_accuracy", "robustness_figure"]

NORMS = ("linf", "l2")
LINF_EPS = tuple(e / 255 for e in (1, 2, 4, 8, 12, 16, 22, 30))
L2_EPS = tuple(e / 255 for e in (50, 100, 150, 200, 250, 300, 350, 400))
_NORM_TITLES = {"linf": "$L_\\infty$", "l2": "$L_2$"}


# --------------------------------------------------------------------------------------------------
# argument checks


def _check_norm(norm) -> str:
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in NORMS:
        raise GenrepError(f"unknown PGD norm {norm!r}; choose one of {', '.join(NORMS)}")
    return key


def _check_eps(eps) -> float:
    try:
        v = float("nan") if isinstance(eps, bool) else float(eps)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v >= 0):
        raise GenrepError(f"PGD eps must be a finite number >= 0 (a fraction of the [0, 1] pixel range, "
                          f"e.g. 8/255), got {eps!r}")
    return v


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GenrepError(f"PGD steps must be an integer >= 1, got {steps!r}")
    return steps


def _check_step_size(step_size, eps: float, steps: int) -> float:
    if step_size is None:
        return 2.5 * eps / steps
    try:
        v = float("nan") if isinstance(step_size, bool) else float(step_size)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise GenrepError(f"PGD step_size must be a finite number > 0 (or None for 2.5 * eps / steps), "
                          f"got {step_size!r}")
    return v


def _check_eps_list(eps_list) -> list[float]:
    if isinstance(eps_list, (str, bytes)) or not isinstance(eps_list, Sequence) or not eps_list:
        raise GenrepError(f"eps_list must be a non-empty list of numbers >= 0, got {eps_list!r}")
    return [_check_eps(e) for e in eps_list]


# --------------------------------------------------------------------------------------------------
# the attack


def _per_image_norm(t: Tensor) -> Tensor:
    """L2 norm of each image of a batch, shaped to broadcast against it."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _random_start(x: Tensor, norm: str, eps: float, generator: torch.Generator | None) -> Tensor:
    # drawn on the generator's device (CPU by default) and moved, so a seed gives the same start anywhere
    gen_device = generator.device if generator is not None else x.device
    shape = x.shape
    if norm == "linf":
        delta = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32) * 2 - 1
        delta = delta * eps
    else:
        direction = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        direction = direction / _per_image_norm(direction).clamp_min(1e-12)
        u = torch.rand(shape[0], generator=generator, device=gen_device, dtype=torch.float32)
        radius = eps * u.pow(1.0 / x[0].numel())        # uniform in the ball, not on the sphere
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return delta.to(device=x.device, dtype=x.dtype)


def _project(x_adv: Tensor, x: Tensor, norm: str, eps: float) -> Tensor:
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_image_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def pgd_attack(logits_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, norm: str, eps: float,
               steps: int = 10, step_size: float | None = None, random_start: bool = True,
               generator: torch.Generator | None = None, bf16: bool = False) -> Tensor:
    """Untargeted PGD on ``CE(logits_fn(x_adv), y)``; returns detached adversarial images in [0, 1].

    ``x`` is a float batch in [0, 1], ``y`` its integer labels. ``norm`` is ``"linf"`` or ``"l2"``;
    ``eps`` the budget in [0, 1] pixel units; ``step_size`` defaults to ``2.5 * eps / steps``. The
    random start draws from ``generator`` (seed it for a reproducible attack). eps = 0 returns ``x``
    unchanged (a copy). See the module docstring for the update and projection rules.
    """
    norm = _check_norm(norm)
    eps = _check_eps(eps)
    steps = _check_steps(steps)
    alpha = _check_step_size(step_size, eps, steps)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise GenrepError(f"PGD needs a float image batch [B, ...] in [0, 1], got "
                          f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, Tensor) or y.dim() != 1 or len(y) != len(x) or y.is_floating_point():
        raise GenrepError(f"PGD needs integer labels [B] with B = {len(x)}, got "
                          f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    x = x.detach()
    if bool(x.min() < 0) or bool(x.max() > 1):
        raise GenrepError(f"PGD works in [0, 1] pixel space but the images span [{float(x.min()):.3g}, "
                          f"{float(x.max()):.3g}]; pass unnormalised images (normalise inside the model)")
    if eps == 0.0:
        return x.clone()
    y = y.to(device=x.device, dtype=torch.long)
    x_adv = _project(x + _random_start(x, norm, eps, generator), x, norm, eps) if random_start else x.clone()
    autocast = bf16 and x.device.type == "cuda"
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = logits_fn(x_adv)
            # sum, not mean: the step is normalised anyway, and the mean's 1/B underflows sooner
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / _per_image_norm(grad).clamp_min(1e-12)
            x_adv = _project(x_adv.detach() + alpha * step, x, norm, eps)
    return x_adv.detach()


# --------------------------------------------------------------------------------------------------
# accuracy under attack


def robust_accuracy(method, images_uint8: Tensor, labels: Tensor, *, norm: str,
                    eps_list: Sequence[float] | None = None, steps: int = 10, step_size: float | None = None,
                    batch_size: int = 256, device: torch.device | str = "cpu", seed: int = 0,
                    bf16: bool = False, progress: bool = False) -> dict[str, float]:
    """Accuracy of ``method.logits`` on PGD adversarial images, ``{str(float(eps)): accuracy}``.

    ``images_uint8`` is uint8 [N, C, H, W], ``labels`` int [N]; the method must already be on
    ``device``. ``eps_list`` defaults to ``(0, *LINF_EPS)`` or ``(0, *L2_EPS)``. The method runs in eval
    mode and gets its previous mode back. The random starts are seeded per eps with ``seed`` (so one
    eps's number does not depend on which others are in the list) and drawn on the CPU, so a seed gives
    the same attack on any device for a given ``batch_size``.
    """
    if "logits" not in getattr(method, "capabilities", ()):
        raise GenrepError(f"PGD needs a classifier head, and method {getattr(method, 'name', type(method).__name__)} "
                          f"has no 'logits' capability; attack a supervised or hybvit model")
    norm = _check_norm(norm)
    eps_values = [0.0, *(LINF_EPS if norm == "linf" else L2_EPS)] if eps_list is None else _check_eps_list(eps_list)
    steps = _check_steps(steps)
    for e in eps_values:
        _check_step_size(step_size, e, steps)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenrepError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenrepError(f"seed must be an integer, got {seed!r}")
    if not isinstance(images_uint8, Tensor) or images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
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
                x_adv = pgd_attack(method.logits, x, y, norm=norm, eps=eps, steps=steps, step_size=step_size,
                                   generator=gens[j], bf16=bf16)
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                     enabled=bf16 and device.type == "cuda"):
                    pred = method.logits(x_adv).argmax(dim=1)
                correct[j] += int((pred == y).sum())
    finally:
        method.train(was_training)
    return {str(float(e)): c / n for e, c in zip(eps_values, correct)}


# --------------------------------------------------------------------------------------------------
# figure


def robustness_figure(results: dict[str, dict], path: Path, title: str = "") -> Path:
    """Accuracy (%) vs eps (in units of 1/255), one panel per norm, from ``{norm: {eps: accuracy}}``.

    ``eps`` keys may be numbers or the strings :func:`robust_accuracy` returns; several curves in one
    panel: pass ``{norm: {label: {eps: accuracy}}}`` instead (e.g. one curve per model).
    """
    if not isinstance(results, dict) or not results:
        raise GenrepError("robustness_figure needs {norm: {eps: accuracy}} with at least one norm")
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    from ..io import save_figure

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
