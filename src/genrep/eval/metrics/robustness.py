"""Adversarial robustness: white-box PGD (Madry et al. 2018) under an L-inf or L2 budget.

Protocol (the HybViT paper, Sec. 5.2.3 and Table 12): untargeted PGD on the cross-entropy of the
classifier head, images in [0, 1] pixel space, normalisation inside the model (``Method.normalize``),
the model in eval mode; the reported number is the accuracy on the final PGD iterate, per eps.

Defaults
    * eps lists: the paper's Table 12, as fractions of the [0, 1] range: L-inf eps = 1, 2, 4, 8, 12,
      16, 22, 30 /255 (:data:`LINF_EPS`) and L2 eps = 50, 100, ..., 400 /255 (:data:`L2_EPS`).
      :func:`genrep.eval.protocols.robustness.robust_accuracy` prepends eps = 0 (the paper's "Clean" column) when no list is given.
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

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import GenrepError

__all__ = ["L2_EPS", "LINF_EPS", "NORMS", "pgd_attack"]

NORMS = ("linf", "l2")
LINF_EPS = tuple(e / 255 for e in (1, 2, 4, 8, 12, 16, 22, 30))
L2_EPS = tuple(e / 255 for e in (50, 100, 150, 200, 250, 300, 350, 400))


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


