"""RandAugment (Cubuk et al. 2020) for a whole batch at once, each image with its own ops and magnitudes.

Per image, ``ops`` times: one op drawn uniformly from the policy's list (with replacement), its magnitude, a
random sign for the signed ops, applied to the float image in [0, 1]. The op kernels are AutoAugment's
(``autoaugment.py``), each checked image by image against torchvision's ``transforms.v2.functional`` ops.

Magnitude: one scale, 0..30, torchvision's 31 bins (``RandAugment(magnitude=m, num_magnitude_bins=31)``); an
op's argument is its bin m, linearly between bins when the magnitude is not a whole number. Two policies:

``torchvision``
    ``transforms.v2.RandAugment``: its 14 ops (Identity, shears, translations of up to 150/331 of the side,
    rotation, the four enhancements 1 +- 0.9 m / 30, posterize 8..4 bits, solarize, autocontrast, equalize),
    every drawn op applied, black fill.
``timm``
    timm's ``rand-...-inc1`` (MAE's and DeiT's ``rand-m9-mstd0.5-inc1``): its 15 "increasing" ops (autocontrast,
    equalize, invert, rotation, posterize 4..0 bits, solarize, solarize-add of up to 110/255 below 128/255,
    the four enhancements, shears, translations of up to 0.45 of the side), each drawn op applied with
    probability 0.5, and geometric ops filling with MAE's ImageNet mean colour (124, 116, 104)/255. timm's
    magnitude runs 0..10: its m9 is 27 here, its magnitude std 0.5 is 1.5 here.

``mstd`` (both policies) draws each op's magnitude from N(magnitude, mstd) and clips it to [0, 30], as timm
draws ``random.gauss(m, mstd)`` clipped to [0, 10].

What genrep does not reproduce of timm's PIL pipeline, and why: geometric ops sample the nearest pixel
(torchvision's RandAugment default) where MAE resamples bicubically (``interpolation='bicubic'``), since a
batched bicubic affine matching PIL's is a separate kernel; translations move whole pixels (torchvision's
``int()``) where timm's move fractions of one; ops act on float images without PIL's rounding to 0..255 after
each op (except equalize, which torchvision computes on 256 levels). Grey (1-channel) images: colour is a no-op,
as torchvision's, and the timm fill is the mean of the three.

Parameters are drawn per sample on the CPU from the caller's generator, as the other augmentations' are, and
moved to the device in one copy; each slot sorts the batch by the op its samples get and runs every op once on
its contiguous slice (no loop over samples, no host sync).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import GenrepError
from .augment import _to_device, adjust_brightness, adjust_contrast, adjust_saturation
from .autoaugment import (_geometric_theta, adjust_sharpness, affine_nearest, autocontrast, equalize, invert,
                          posterize, solarize)

MAX_MAGNITUDE = 30  # torchvision's num_magnitude_bins=31
POLICIES = ("torchvision", "timm")

# The kernels, geometric first (ids 0-4 are autoaugment.OPS' geometric ids, so its affine maps serve them).
KERNELS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
           "Sharpness", "Posterize", "Solarize", "SolarizeAdd", "AutoContrast", "Equalize", "Invert")
KERNEL_ID = {name: i for i, name in enumerate(KERNELS)}
NONE = len(KERNELS)  # the key of a sample whose op does not fire (or is Identity)
N_GEOMETRIC = 5

# Each policy's ops in its library's order: name -> (kernel, signed).
OPS = {
    "torchvision": {"Identity": (None, False), "ShearX": ("ShearX", True), "ShearY": ("ShearY", True),
                    "TranslateX": ("TranslateX", True), "TranslateY": ("TranslateY", True),
                    "Rotate": ("Rotate", True), "Brightness": ("Brightness", True), "Color": ("Color", True),
                    "Contrast": ("Contrast", True), "Sharpness": ("Sharpness", True),
                    "Posterize": ("Posterize", False), "Solarize": ("Solarize", False),
                    "AutoContrast": ("AutoContrast", False), "Equalize": ("Equalize", False)},
    "timm": {"AutoContrast": ("AutoContrast", False), "Equalize": ("Equalize", False), "Invert": ("Invert", False),
             "Rotate": ("Rotate", True), "PosterizeIncreasing": ("Posterize", False),
             "SolarizeIncreasing": ("Solarize", False), "SolarizeAdd": ("SolarizeAdd", False),
             "ColorIncreasing": ("Color", True), "ContrastIncreasing": ("Contrast", True),
             "BrightnessIncreasing": ("Brightness", True), "SharpnessIncreasing": ("Sharpness", True),
             "ShearX": ("ShearX", True), "ShearY": ("ShearY", True), "TranslateXRel": ("TranslateX", True),
             "TranslateYRel": ("TranslateY", True)},
}
APPLY_PROB = {"torchvision": 1.0, "timm": 0.5}  # timm's AugmentOp(prob=0.5)
# timm's fill is MAE's img_mean, round(255 * IMAGENET_DEFAULT_MEAN); torchvision RandAugment's default is black
TIMM_FILL = (124 / 255, 116 / 255, 104 / 255)
SOLARIZE_ADD_THRESHOLD = 128 / 255  # timm's solarize_add(img, add, thresh=128)

COLUMNS_PER_OP = 5  # op choice, fires, sign, two uniforms of a Box-Muller normal (the magnitude noise)


class RandAugmentParams(NamedTuple):
    """Per-sample parameters, one row per sample and one column per op slot (CPU tensors)."""

    kernel: torch.Tensor  # [B, n] long: KERNELS id, NONE where the slot does nothing
    arg: torch.Tensor  # [B, n] float64: the colour op's argument (factor, bits, threshold, addend)
    theta: torch.Tensor  # [B, n, 2, 3] float64: the geometric op's inverse affine map (identity otherwise)
    magnitude: torch.Tensor  # [B, n] float64: the magnitude drawn (after noise and clipping), 0..30


def check_options(ops: int, magnitude: float, mstd: float, policy: str) -> None:
    if isinstance(ops, bool) or not isinstance(ops, int) or ops < 0:
        raise GenrepError(f"RandAugment ops must be an integer >= 0 (how many ops per image; 0: off), got {ops!r}")
    if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) \
            or not 0 <= magnitude <= MAX_MAGNITUDE:
        raise GenrepError(f"RandAugment magnitude must be in 0..{MAX_MAGNITUDE} (torchvision's 31 bins; timm's "
                          f"m9 is 27), got {magnitude!r}")
    if isinstance(mstd, bool) or not isinstance(mstd, (int, float)) or not 0 <= mstd < math.inf:
        raise GenrepError(f"RandAugment mstd must be a finite number >= 0, got {mstd!r}")
    if policy not in POLICIES:
        raise GenrepError(f"unknown RandAugment policy {policy!r}; choose one of {', '.join(POLICIES)}")


def _bins(lo: float, hi: float, m: torch.Tensor) -> torch.Tensor:
    """torchvision's ``linspace(lo, hi, 31)[m]`` (float32, so a whole m gives its very number), linear between."""
    bins = torch.linspace(lo, hi, MAX_MAGNITUDE + 1).double()
    low = m.floor().long().clamp(0, MAX_MAGNITUDE)
    high = (low + 1).clamp(max=MAX_MAGNITUDE)
    return bins[low] + (m - low) * (bins[high] - bins[low])


def op_argument(kernel: str, policy: str, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The unsigned argument of ``kernel`` at magnitude m (float64 [..]) under ``policy``: shear factor, pixels,
    degrees, enhancement amount (the factor is 1 +- it), bits, threshold or addend (on [0, 1] images)."""
    f = m / MAX_MAGNITUDE  # timm's level / 10
    if kernel in ("ShearX", "ShearY"):
        return _bins(0.0, 0.3, m)
    if kernel in ("TranslateX", "TranslateY"):
        side = w if kernel == "TranslateX" else h
        return _bins(0.0, 150.0 / 331.0 * side, m) if policy == "torchvision" else f * 0.45 * side
    if kernel == "Rotate":
        return _bins(0.0, 30.0, m)
    if kernel in ("Brightness", "Color", "Contrast", "Sharpness"):
        return _bins(0.0, 0.9, m)
    if kernel == "Posterize":  # torchvision: 8 - round(m / 7.5); timm: 4 - int(level / 10 * 4)
        return 8 - (m / (MAX_MAGNITUDE / 4)).round() if policy == "torchvision" else 4 - (f * 4).floor()
    if kernel == "Solarize":  # torchvision: linspace(1, 0)[m]; timm: 256 - int(level / 10 * 256) of 255
        return _bins(1.0, 0.0, m) if policy == "torchvision" else (256 - (f * 256).floor()) / 255
    if kernel == "SolarizeAdd":
        return (f * 110).floor() / 255
    return torch.zeros_like(m)


def randaugment_params(u: torch.Tensor, ops: int, magnitude: float, mstd: float, policy: str, h: int,
                       w: int) -> RandAugmentParams:
    """From uniforms u [B, ops * COLUMNS_PER_OP] (float64): each sample's ops, magnitudes and arguments."""
    names = list(OPS[policy])
    b = u.shape[0]
    u = u.view(b, ops, COLUMNS_PER_OP)
    pick = (u[..., 0] * len(names)).floor().long().clamp(max=len(names) - 1)
    fires = u[..., 1] < APPLY_PROB[policy]
    negate = u[..., 2] < 0.5
    normal = torch.sqrt(-2.0 * torch.log1p(-u[..., 3])) * torch.cos(2 * math.pi * u[..., 4])
    m = (magnitude + mstd * normal).clamp(0, MAX_MAGNITUDE) if mstd > 0 else torch.full_like(u[..., 0], magnitude)
    kernel = torch.full((b, ops), NONE, dtype=torch.long)
    arg = torch.zeros(b, ops, dtype=torch.float64)
    signed_arg = torch.zeros(b, ops, dtype=torch.float64)
    for i, name in enumerate(names):
        k, signed = OPS[policy][name]
        mine = pick == i
        if k is None:
            continue
        kernel = torch.where(mine & fires, KERNEL_ID[k], kernel)
        value = op_argument(k, policy, m, h, w)
        signed_value = torch.where(negate, -value, value) if signed else value
        signed_arg = torch.where(mine, signed_value, signed_arg)
    for k in ("Brightness", "Color", "Contrast", "Sharpness"):  # the factor, as torchvision's 1.0 + magnitude
        arg = torch.where(kernel == KERNEL_ID[k], 1.0 + signed_arg, arg)
    for k in ("Posterize", "Solarize", "SolarizeAdd"):
        arg = torch.where(kernel == KERNEL_ID[k], signed_arg, arg)
    geometric = torch.where(kernel < N_GEOMETRIC, kernel, NONE)
    theta = _geometric_theta(geometric, torch.where(kernel < N_GEOMETRIC, signed_arg, 0.0), h, w)
    return RandAugmentParams(kernel, arg, theta, m)


def randaugment(x: torch.Tensor, generator: torch.Generator, *, ops: int = 2, magnitude: float = 9,
                mstd: float = 0.0, policy: str = "torchvision") -> torch.Tensor:
    """RandAugment each image of x (float [B, C, H, W] in [0, 1], any device); parameters drawn on the CPU from
    ``generator``. ``ops`` 0 returns x as it is (and draws nothing)."""
    check_options(ops, magnitude, mstd, policy)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise GenrepError("randaugment needs a CPU torch.Generator (torch.Generator() or torch.Generator('cpu'))")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[1] not in (1, 3):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise GenrepError(f"randaugment expects float images [B, C, H, W] in [0, 1] with C = 1 or 3, got {got}")
    if ops == 0 or x.shape[0] == 0:
        return x
    b, c, h, w = x.shape
    u = torch.rand(b, ops * COLUMNS_PER_OP, generator=generator, dtype=torch.float64)
    p = randaugment_params(u, ops, float(magnitude), float(mstd), policy, h, w)
    fill = torch.zeros(c) if policy == "torchvision" else torch.tensor(TIMM_FILL)
    if c == 1:
        fill = fill.mean(0, keepdim=True)
    return apply(x, p, fill)


def apply(x: torch.Tensor, p: RandAugmentParams, fill: torch.Tensor) -> torch.Tensor:
    """Each sample's ops, slot after slot; ``fill`` [C] is the colour geometric ops bring in."""
    orders = p.kernel.argsort(dim=0, stable=True)  # per slot: the batch sorted by kernel, NONE last
    order_d, arg_d, theta_d = _to_device([orders, p.arg, p.theta], x.device)
    fill = fill.to(x.device, x.dtype).view(1, -1, 1, 1)
    for slot in range(p.kernel.shape[1]):
        counts = torch.bincount(p.kernel[:, slot], minlength=NONE + 1).tolist()
        order = order_d[:, slot].long()
        xs = x.index_select(0, order)
        arg = arg_d[:, slot].index_select(0, order)
        n_geo = sum(counts[:N_GEOMETRIC])
        theta = theta_d[:, slot].index_select(0, order[:n_geo])
        # nearest sampling picks pixels, so shifting by the fill and back brings in the fill's colour exactly
        pieces = [affine_nearest(xs[:n_geo] - fill, theta, 0.0) + fill if n_geo else xs[:0]]
        start = n_geo
        for k in range(N_GEOMETRIC, NONE):
            end = start + counts[k]
            if end > start:
                pieces.append(_KERNELS[KERNELS[k]](xs[start:end], arg[start:end]))
            start = end
        pieces.append(xs[start:])
        x = torch.empty_like(x).index_copy_(0, order, torch.cat(pieces))
    return x


def solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add: pixels below 128/255 brightened by ``add`` (on [0, 1]), capped at 1."""
    return torch.where(x < SOLARIZE_ADD_THRESHOLD, (x + add.view(-1, 1, 1, 1)).clamp(max=1.0), x)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    return posterize(x, bits.to(x.dtype))


_KERNELS = {
    "Brightness": adjust_brightness, "Color": adjust_saturation, "Contrast": adjust_contrast,
    "Sharpness": adjust_sharpness, "Posterize": _posterize, "Solarize": solarize, "SolarizeAdd": solarize_add,
    "AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert,
}
