"""Adversarial robustness: white-box PGD (Madry et al. 2018) under an L-inf or L2 budget.

Protocol (the HybViT paper, Sec. 5.2.3 and Table 12): untargeted PGD on the cross-entropy of the
classifier head, images in [0, 1] pixel space, normalisation inside the model (``Method.normalize``),
the model in eval mode.

Two ways to run it, chosen by ``steps``, ``step_size``, ``start`` and ``criterion``:

    * genrep's default: the Madry-lab ``robustness`` library convention, ``steps = 10`` and
      ``step_size = 2.5 * eps / steps`` (the iterates can travel 2.5 eps in total, enough to cross the
      ball from any random start and back), a start uniform in the ball (``start="uniform"``: L-inf
      uniform in the cube; L2 a Gaussian direction at radius ``eps * U^(1/d)``), and an image counts
      as robust if the final iterate is classified correctly (``criterion="final"``).
    * the paper's code (sndnyang/Diffusion_ViT, ``bpda_eot_attack.py`` with ``bpda_eot_attack.json``,
      run by ``scripts/bpda_attack.sh``): 50 steps of a fixed 20/255 whatever eps (``adv_eta = 20``,
      scaled like eps), a start drawn as Hill et al.'s ``rand_init_l_p`` (``start="radius"``: L-inf as
      above; L2 a Gaussian direction at radius ``eps * U``, not clipped to the pixel box until the first
      step), and an image counts as robust only if the clean image and every iterate (the start and
      each of the 50 steps) are classified correctly (``criterion="every_iterate"``). Despite its name
      the script is plain PGD there: its ``langevin_steps = 0`` switches the purification off, so BPDA
      never applies and its 15 EOT copies of a deterministic classifier give the same prediction.

eps lists: the paper's Table 12, as fractions of the [0, 1] range: L-inf eps = 1, 2, 4, 8, 12, 16, 22,
30 /255 (:data:`LINF_EPS`) and L2 eps = 50, 100, ..., 400 /255 (:data:`L2_EPS`).
:func:`genrep.eval.protocols.robustness.robust_accuracy` prepends eps = 0 (the paper's "Clean" column)
when no list is given.

Each step: L-inf ascends along ``sign(grad)``, L2 along ``grad / ||grad||_2`` (per image); then the
perturbation is projected onto the eps ball and the image clipped to [0, 1]. Clipping to the box after
the ball never leaves the ball (it only moves coordinates towards the clean image). eps = 0 returns the
clean images unchanged, so its accuracy is exactly the clean accuracy under either criterion.

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

__all__ = ["CRITERIA", "L2_EPS", "LINF_EPS", "NORMS", "STARTS", "pgd_attack", "pgd_robust"]

NORMS = ("linf", "l2")
LINF_EPS = tuple(e / 255 for e in (1, 2, 4, 8, 12, 16, 22, 30))
L2_EPS = tuple(e / 255 for e in (50, 100, 150, 200, 250, 300, 350, 400))
# uniform: uniform in the eps ball; radius: the paper's code (L2 radius uniform in [0, eps]); none: the clean image
STARTS = ("uniform", "radius", "none")
# final: correct on the last iterate; every_iterate: on the clean image and every iterate (the paper's code)
CRITERIA = ("final", "every_iterate")


# --------------------------------------------------------------------------------------------------
# argument checks


def _check_choice(value, choices: tuple, what: str) -> str:
    key = value.lower() if isinstance(value, str) else value
    if key not in choices:
        raise GenrepError(f"unknown PGD {what} {value!r}; choose one of {', '.join(choices)}")
    return key


def _check_norm(norm) -> str:
    return _check_choice(norm, NORMS, "norm")


def _check_start(start) -> str:
    return _check_choice(start, STARTS, "start")


def _check_criterion(criterion) -> str:
    return _check_choice(criterion, CRITERIA, "criterion")


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


def _check_batch(x, y) -> tuple[Tensor, Tensor]:
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
    return x, y.to(device=x.device, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# the attack


def _per_image_norm(t: Tensor) -> Tensor:
    """L2 norm of each image of a batch, shaped to broadcast against it."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _random_start(x: Tensor, norm: str, eps: float, start: str, generator: torch.Generator | None) -> Tensor:
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
        # uniform in the ball needs U^(1/d); the paper's code takes the radius itself uniform, so its starts
        # crowd towards the clean image (in 3072 dimensions almost all of the ball's volume is near its surface)
        radius = eps * (u.pow(1.0 / x[0].numel()) if start == "uniform" else u)
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return delta.to(device=x.device, dtype=x.dtype)


def _project(x_adv: Tensor, x: Tensor, norm: str, eps: float) -> Tensor:
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_image_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _pgd(logits_fn, x: Tensor, y: Tensor, *, norm: str, eps: float, steps: int, alpha: float, start: str,
         generator, bf16: bool, track: bool) -> tuple[Tensor, Tensor | None]:
    """(the final iterate, and with ``track`` per image whether every earlier iterate was classified
    correctly, read off the forward passes the gradients come from, as the paper's code does)."""
    if start == "none":
        x_adv = x.clone()
    elif start == "radius" and norm == "l2":
        x_adv = x + _random_start(x, norm, eps, start, generator)  # the paper's code clips it at the first step
    else:
        x_adv = _project(x + _random_start(x, norm, eps, start, generator), x, norm, eps)
    autocast = bf16 and x.device.type == "cuda"
    held = torch.ones(len(x), dtype=torch.bool, device=x.device) if track else None
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = logits_fn(x_adv)
            # sum, not mean: the step is normalised anyway, and the mean's 1/B underflows sooner
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if track:
                held &= logits.argmax(dim=1) == y
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / _per_image_norm(grad).clamp_min(1e-12)
            x_adv = _project(x_adv.detach() + alpha * step, x, norm, eps)
    return x_adv.detach(), held


def pgd_attack(logits_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, norm: str, eps: float,
               steps: int = 10, step_size: float | None = None, start: str = "uniform",
               generator: torch.Generator | None = None, bf16: bool = False) -> Tensor:
    """Untargeted PGD on ``CE(logits_fn(x_adv), y)``; returns detached adversarial images in [0, 1].

    ``x`` is a float batch in [0, 1], ``y`` its integer labels. ``norm`` is ``"linf"`` or ``"l2"``;
    ``eps`` the budget in [0, 1] pixel units; ``step_size`` defaults to ``2.5 * eps / steps``; ``start``
    one of :data:`STARTS`, drawn from ``generator`` (seed it for a reproducible attack). eps = 0 returns
    ``x`` unchanged (a copy). See the module docstring for the update and projection rules.
    """
    norm, start = _check_norm(norm), _check_start(start)
    eps = _check_eps(eps)
    steps = _check_steps(steps)
    alpha = _check_step_size(step_size, eps, steps)
    x, y = _check_batch(x, y)
    if eps == 0.0:
        return x.clone()
    return _pgd(logits_fn, x, y, norm=norm, eps=eps, steps=steps, alpha=alpha, start=start, generator=generator,
                bf16=bf16, track=False)[0]


def pgd_robust(logits_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, norm: str, eps: float,
               steps: int = 10, step_size: float | None = None, start: str = "uniform", criterion: str = "final",
               generator: torch.Generator | None = None, bf16: bool = False) -> Tensor:
    """Per image (bool [B]), whether the classifier withstands :func:`pgd_attack` with these arguments:
    ``criterion="final"``: the final iterate is classified correctly; ``"every_iterate"``: the clean image
    and every iterate are (the paper's code). The second implies the first on the same attack (same
    ``generator`` state), and at eps = 0 both are the clean prediction."""
    norm, start, criterion = _check_norm(norm), _check_start(start), _check_criterion(criterion)
    eps = _check_eps(eps)
    steps = _check_steps(steps)
    alpha = _check_step_size(step_size, eps, steps)
    x, y = _check_batch(x, y)
    every = criterion == "every_iterate"
    held = None
    x_adv = x
    if eps > 0.0:
        x_adv, held = _pgd(logits_fn, x, y, norm=norm, eps=eps, steps=steps, alpha=alpha, start=start,
                           generator=generator, bf16=bf16, track=every)
    autocast = bf16 and x.device.type == "cuda"
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        ok = logits_fn(x_adv).argmax(dim=1) == y
        if every and eps > 0.0:
            ok &= held & (logits_fn(x).argmax(dim=1) == y)
    return ok
