"""Per-sample randomness a method asks the loop for, by kind: an extensible table of drawers.

A method declares ``random_inputs() -> {name: (kind, arg)}``; the loop draws every entry for the whole
global batch from a generator seeded by (seed, step, the entry's place), on the batch's device, and hands
each process its slice. So a step's noise, diffusion steps, noise levels or orders do not depend on the
number of processes or on gradient accumulation, and the compiled objective holds no random op.

Kinds (``arg`` in brackets), each drawn as ``[total, ...]``:
- ``normal`` [a view name]: standard normal noise shaped like that view's images.
- ``steps`` [T]: integers uniform in [0, T) (diffusion steps).
- ``uniform`` [shape]: floats uniform in [0, 1), ``[total, *shape]``.
- ``beta`` [(a, b, shape)]: Beta(a, b) floats, ``[total, *shape]`` (DARL's noise level per sample, shape
  ``()``, or per patch, shape ``(N,)``).
- ``permutation`` [n]: a uniformly random permutation of 0..n-1 per sample, long ``[total, n]`` (GVP's and
  DARL's random orders).
- ``boundaries`` [(n, k)]: k distinct cut points in 1..n-1 per sample, sorted, long ``[total, k]`` (GVP's
  random-length group segmentation, appendix B: the first k of a random permutation of 1..n-1, sorted).
- ``shared`` [(kind, arg)]: one draw of another kind, the same in every row (Mixup's lambda and CutMix's box,
  drawn once per batch), so every process and micro-batch of a step reads the same value from its rows.

A new kind is one function registered with :func:`random_kind`.

One more kind is not random: ``progress`` [None], float ``[total]``, every row the fraction of training done at
this step (the loop's ``step / total_steps``; 0 outside training). A loss term with a schedule reads it, e.g.
GCRL's contrastive term, off for the first half of training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PROGRESS_KIND = "progress"
Drawer = Callable[[object, int, torch.Tensor, torch.Generator], torch.Tensor]
RANDOM_KINDS: dict[str, Drawer] = {}


def random_kind(name: str) -> Callable[[Drawer], Drawer]:
    """Register ``fn(arg, total, like, generator) -> [total, ...]``; ``like`` is the view the entry names
    (``normal``) or the first view, for the device and dtype."""
    def add(fn: Drawer) -> Drawer:
        if name in RANDOM_KINDS:
            raise ValueError(f"random input kind {name!r} registered twice")
        RANDOM_KINDS[name] = fn
        return fn
    return add


def _shape(shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _float(like: torch.Tensor) -> torch.dtype:
    return like.dtype if like.dtype.is_floating_point else torch.float32


@random_kind("normal")
def _normal(arg, total, like, g):
    return torch.randn((total, *like.shape[1:]), generator=g, device=like.device, dtype=_float(like))


@random_kind("steps")
def _steps(arg, total, like, g):
    return torch.randint(0, int(arg), (total,), generator=g, device=like.device)


@random_kind("uniform")
def _uniform(arg, total, like, g):
    return torch.rand((total, *_shape(arg)), generator=g, device=like.device, dtype=_float(like))


# Marsaglia and Tsang's gamma sampler accepts more than 95% of proposals for shape >= 1; with this many
# proposals per draw the chance that none is accepted is below 1e-20, so the draw needs no data-dependent loop
_GAMMA_PROPOSALS = 16


def sample_gamma(shape_param: float, size: tuple[int, ...], generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """Gamma(shape_param, 1) draws in float64 from ``generator`` (torch's own gamma takes no generator).

    Marsaglia & Tsang (2000); for shape < 1 it draws Gamma(shape + 1) and multiplies by U^(1/shape)."""
    if not shape_param > 0:
        raise ValueError(f"a gamma shape must be > 0, got {shape_param}")
    a = shape_param if shape_param >= 1 else shape_param + 1
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    x = torch.randn((_GAMMA_PROPOSALS, *size), generator=generator, device=device, dtype=torch.float64)
    u = torch.rand((_GAMMA_PROPOSALS, *size), generator=generator, device=device, dtype=torch.float64)
    v = (1 + c * x) ** 3
    ok = (v > 0) & (u.log() < 0.5 * x * x + d - d * v + d * v.clamp_min(1e-300).log())
    first = ok.double().argmax(0, keepdim=True)  # the first accepted proposal of each draw
    out = (d * v).gather(0, first)[0]
    if shape_param < 1:
        boost = torch.rand(size, generator=generator, device=device, dtype=torch.float64)
        out = out * boost ** (1.0 / shape_param)
    return out


def sample_beta(a: float, b: float, size: tuple[int, ...], generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """Beta(a, b) draws in float64 from ``generator``: X / (X + Y) of Gamma(a) and Gamma(b) draws, in that order."""
    x = sample_gamma(float(a), size, generator, device)
    y = sample_gamma(float(b), size, generator, device)
    return x / (x + y)


@random_kind("beta")
def _beta(arg, total, like, g):
    a, b, shape = arg
    return sample_beta(a, b, (total, *_shape(shape)), g, like.device).to(_float(like))


@random_kind("permutation")
def _permutation(arg, total, like, g):
    # float64 keys: ties (which would make the order depend on the sort kernel) are then negligible
    keys = torch.rand((total, int(arg)), generator=g, device=like.device, dtype=torch.float64)
    return keys.argsort(dim=1)


@random_kind("boundaries")
def _boundaries(arg, total, like, g):
    n, k = int(arg[0]), int(arg[1])
    if not 0 <= k <= n - 1:
        raise ValueError(f"cannot cut a sequence of {n} into {k + 1} non-empty groups; choose k in 0..{n - 1}")
    cuts = _permutation(n - 1, total, like, g)[:, :k] + 1
    return cuts.sort(dim=1).values


@random_kind("shared")
def _shared(arg, total, like, g):
    if not (isinstance(arg, tuple) and len(arg) == 2 and arg[0] in RANDOM_KINDS):
        raise ValueError(f"a shared random input takes a (kind, arg) pair of a known kind, got {arg!r}")
    one = RANDOM_KINDS[arg[0]](arg[1], 1, like, g)
    return one.expand(total, *one.shape[1:])


def check_random_spec(spec: dict[str, tuple[str, object]], views: list[str]) -> None:
    """What a method declares must name known kinds (and, for ``normal``, one of its views)."""
    for name, entry in spec.items():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ValueError(f"random input {name!r} must be a (kind, arg) pair, got {entry!r}")
        kind, arg = entry
        if kind not in RANDOM_KINDS and kind != PROGRESS_KIND:
            raise ValueError(f"random input {name!r} has unknown kind {kind!r}; known kinds: "
                             f"{', '.join(RANDOM_KINDS)}")
        if kind == "normal" and arg not in views:
            raise ValueError(f"random input {name!r} is noise shaped like view {arg!r}, which the method does "
                             f"not ask for; its views: {', '.join(views)}")
