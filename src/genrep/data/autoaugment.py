"""AutoAugment (Cubuk et al. 2019) for a whole batch at once, each image with its own sub-policy.

Per image this is torchvision's ``transforms.v2.AutoAugment(policy, interpolation=NEAREST, fill=FILL)`` on a
float image in [0, 1]: one of the policy's 25 sub-policies, uniformly; each of its two ops applied with its
probability, at its fixed magnitude bin, the signed ops with a random sign. The op kernels below reproduce
torchvision's ``transforms.v2.functional`` ops for per-sample arguments (tested image by image against them).

The fill of the geometric ops is the HybViT code's: its AutoAugment (DeepVoltaire's CIFAR10Policy, PIL on
uint8 images) fills sheared, translated and rotated-in pixels with (128, 128, 128); torchvision's default
is black. Where that code differs from torchvision otherwise (bicubic shears, sub-pixel translations, rotations
always counter-clockwise, solarize thresholds on 256 levels, uint8 rounding after every op), we follow
torchvision.

Parameters are drawn per sample on the CPU (``autoaugment_params``), as the other augmentations' are. Since
they are known on the host, each slot of the sub-policies sorts the batch by the op its samples get (an order
moved to the device with the other parameters) and runs every op once, on its own contiguous slice: each image
costs one op per slot rather than every op of the policy, with no loop over samples and no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .augment import adjust_brightness, adjust_contrast, adjust_saturation

FILL = 128 / 255
NUM_BINS = 10

# the ops, in the order of their ids
OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness",
       "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_ID = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = frozenset(range(5))  # the first five ops: one affine warp serves them all
SIGNED = frozenset(OP_ID[n] for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                                      "Color", "Contrast", "Sharpness"))

# torchvision's tables (transforms.v2.AutoAugment._get_policies): ((op, probability, magnitude bin), (...)).
_I, _C, _S = "Invert", "Contrast", "Sharpness"
POLICIES: dict[str, tuple] = {
    "cifar10": (
        ((_I, 0.1, None), (_C, 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        ((_S, 0.8, 1), (_S, 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)), ((_S, 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)), ((_C, 0.6, 7), (_S, 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), (_S, 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), (_I, 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), (_I, 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)), ((_I, 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), (_C, 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)), ((_S, 0.4, 7), (_I, 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        ((_I, 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), (_C, 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), (_I, 0.2, None)), (("ShearY", 0.9, 8), (_I, 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)), ((_I, 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)), (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), (_I, 0.4, None)), (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        ((_I, 0.9, None), ("AutoContrast", 0.8, None)), (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)), (("ShearY", 0.8, 8), (_I, 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)), ((_I, 0.9, None), ("Equalize", 0.6, None)),
        ((_C, 0.3, 3), ("Rotate", 0.8, 4)), ((_I, 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)), ((_I, 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)), (("ShearX", 0.1, 6), (_I, 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)), (("ShearY", 0.8, 4), (_I, 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)), (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), (_I, 0.1, None)),
    ),
}
AUTOAUGMENT_POLICIES = (*POLICIES, "none")

# Uniforms drawn per sample: the sub-policy, then (applied, negated) for each of its two ops.
COLUMNS = 5


def magnitude_bins(op: str, h: int, w: int) -> torch.Tensor | None:
    """The op's NUM_BINS magnitudes as torchvision computes them (float32, so a bin is the very same number);
    None for the ops without one (AutoContrast, Equalize, Invert)."""
    n = NUM_BINS
    if op in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.3, n)
    if op in ("TranslateX", "TranslateY"):  # up to 150/331 of the side, the AutoAugment paper's 150 px of 331
        return torch.linspace(0.0, 150.0 / 331.0 * (w if op == "TranslateX" else h), n)
    if op == "Rotate":
        return torch.linspace(0.0, 30.0, n)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.9, n)
    if op == "Posterize":
        return (8 - (torch.arange(n) / ((n - 1) / 4))).round().int()
    if op == "Solarize":
        return torch.linspace(1.0, 0.0, n)
    return None


class AutoAugmentParams(NamedTuple):
    """Per-sample parameters, one row per sample and one column per slot of the sub-policy (CPU tensors)."""

    op: torch.Tensor  # [B, 2] long op ids (OPS)
    on: torch.Tensor  # [B, 2] bool: the op fires
    arg: torch.Tensor  # [B, 2] float64: the colour op's argument (factor, bits or threshold); 0 for the others
    theta: torch.Tensor  # [B, 2, 2, 3] float64: the geometric op's inverse affine map (identity otherwise)
    order: torch.Tensor  # [B, 2] long: per slot, the samples sorted by the op they get (unfired ones last)


def autoaugment_params(u: torch.Tensor, policy: str, h: int, w: int) -> AutoAugmentParams:
    """From uniforms u [B, COLUMNS] (float64): each sample's sub-policy, which ops fire and their arguments."""
    table = POLICIES[policy]
    pick = (u[:, 0] * len(table)).floor().long().clamp(max=len(table) - 1)
    op = torch.tensor([[OP_ID[s[0]] for s in sub] for sub in table])[pick]
    prob = torch.tensor([[s[1] for s in sub] for sub in table], dtype=torch.float64)[pick]
    magnitude = torch.tensor([[_magnitude(s, h, w) for s in sub] for sub in table], dtype=torch.float64)[pick]
    on = u[:, [1, 3]] < prob
    signed = torch.tensor([i in SIGNED for i in range(len(OPS))])[op]
    magnitude = torch.where(signed & (u[:, [2, 4]] < 0.5), -magnitude, magnitude)
    return op_params(op, on, magnitude, h, w)


def op_params(op: torch.Tensor, on: torch.Tensor, magnitude: torch.Tensor, h: int, w: int) -> AutoAugmentParams:
    """Parameters of ops ``op`` [B, 2], firing where ``on``, at signed ``magnitude`` (float64), with the
    arguments torchvision's AutoAugment passes to its functional ops: factor 1 + m, bits, threshold m, or the
    geometric op's inverse map."""
    arg = torch.zeros_like(magnitude)
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        arg = torch.where(op == OP_ID[name], 1.0 + magnitude, arg)
    for name in ("Posterize", "Solarize"):  # bits, and the threshold on [0, 1] images
        arg = torch.where(op == OP_ID[name], magnitude, arg)
    order = _slot_key(op, on).argsort(dim=0, stable=True)
    return AutoAugmentParams(op, on, arg, _geometric_theta(op, magnitude, h, w), order)


def _slot_key(op, on):
    return torch.where(on, op, len(OPS))  # the op id, or len(OPS) where the op does not fire


def _magnitude(step, h, w) -> float:
    bins = magnitude_bins(step[0], h, w)
    return 0.0 if bins is None else float(bins[step[2]])


def _geometric_theta(op, magnitude, h, w) -> torch.Tensor:
    """The inverse affine map of each geometric op as torchvision builds it, [B, 2, 2, 3] float64."""
    zero = torch.zeros_like(magnitude)
    shear = torch.rad2deg(torch.atan(magnitude))  # torchvision passes shear angles in degrees
    # ShearX/Y turn about the top-left corner (center=[0, 0]), as the AutoAugment paper's PIL code does;
    # translations and rotations about the image centre. Translations are whole pixels (torchvision's int()).
    is_shear = (op == OP_ID["ShearX"]) | (op == OP_ID["ShearY"])
    cx, cy = torch.where(is_shear, -0.5 * w, 0.0), torch.where(is_shear, -0.5 * h, 0.0)
    angle = torch.where(op == OP_ID["Rotate"], -torch.remainder(magnitude, 360.0), zero)
    tx = torch.where(op == OP_ID["TranslateX"], magnitude.trunc(), zero)
    ty = torch.where(op == OP_ID["TranslateY"], magnitude.trunc(), zero)
    sx = torch.where(op == OP_ID["ShearX"], shear, zero)
    sy = torch.where(op == OP_ID["ShearY"], shear, zero)
    return _inverse_affine(cx, cy, angle, tx, ty, sx, sy)


def _inverse_affine(cx, cy, angle, tx, ty, shear_x, shear_y) -> torch.Tensor:
    """torchvision's _get_inverse_affine_matrix (scale 1) for tensors of arguments, same operations in the same
    order, so that the float32 maps agree with torchvision's bit for bit. Degrees in, [..., 2, 3] out."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack((torch.stack((m0, m1, m2), -1), torch.stack((m3, m4, m5), -1)), -2)


def autoaugment(x: torch.Tensor, p: AutoAugmentParams, device_p: AutoAugmentParams | None = None) -> torch.Tensor:
    """Apply each sample's sub-policy to x float [B, C, H, W] in [0, 1] on its device.

    ``p`` holds the CPU parameters (their op counts give the slices, without a host sync); ``device_p`` the same
    already on x's device (one transfer for a whole augmentation), or None to move them here.
    """
    if device_p is None:
        device_p = AutoAugmentParams(*(t.to(x.device, torch.float32 if t.is_floating_point() else t.dtype)
                                       for t in p))
    for slot in range(2):
        counts = torch.bincount(_slot_key(p.op[:, slot], p.on[:, slot]), minlength=len(OPS) + 1).tolist()
        order = device_p.order[:, slot].long()
        xs = x.index_select(0, order)
        arg = device_p.arg[:, slot].float().index_select(0, order)
        n_geo = sum(counts[:len(GEOMETRIC)])
        pieces = [affine_nearest(xs[:n_geo], device_p.theta[:, slot].float().index_select(0, order[:n_geo]), FILL)]
        start = n_geo
        for op_id in range(len(GEOMETRIC), len(OPS)):
            end = start + counts[op_id]
            if end > start:
                pieces.append(_COLOUR_OPS[OPS[op_id]](xs[start:end], arg[start:end]))
            start = end
        pieces.append(xs[start:])  # the samples whose op does not fire
        x = torch.empty_like(x).index_copy_(0, order, torch.cat(pieces))
    return x


# ----------------------------------------------------------------------------------------------------
# Kernels: x float [B, C, H, W] in [0, 1]; one argument per sample. Each matches the torchvision.transforms.v2
# functional op of its name image by image on float images.


def affine_nearest(x: torch.Tensor, theta: torch.Tensor, fill: float) -> torch.Tensor:
    """torchvision's affine_image/rotate_image (nearest, no expand) with one inverse map per sample, theta
    [B, 2, 3] in pixels about the image centre; pixels from outside the image take ``fill``."""
    b, c, h, w = x.shape
    if b == 0:
        return x
    # torchvision's _affine_grid: pixel centres about the image centre, mapped, then scaled to [-1, 1]. Written
    # out rather than as its bmm, so that TF32 matmuls (where enabled) cannot move a nearest-neighbour pick.
    px = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device).view(1, 1, w)
    py = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).view(1, h, 1)
    tx = theta[:, 0].view(b, 3, 1, 1) / (0.5 * w)  # torchvision scales the map first, then applies it
    ty = theta[:, 1].view(b, 3, 1, 1) / (0.5 * h)
    gx = px * tx[:, 0] + py * tx[:, 1] + tx[:, 2]
    gy = px * ty[:, 0] + py * ty[:, 1] + ty[:, 2]
    grid = torch.stack((gx, gy), dim=-1)
    # a ones channel sampled alongside tells which output pixels came from outside (torchvision's trick)
    sampled = F.grid_sample(torch.cat((x, torch.ones_like(x[:, :1])), 1), grid, mode="nearest",
                            padding_mode="zeros", align_corners=False)
    img, mask = sampled[:, :c], sampled[:, c:]
    return torch.where(mask < 0.5, torch.full_like(img, fill), img)


def adjust_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a 3x3 smoothed copy (PIL's SMOOTH kernel) inside a one-pixel border kept as it is."""
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    # the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as a separable box sum plus 4 x the centre: several
    # times faster than a grouped conv2d on the CPU, the same to float rounding
    inner = x[..., 1:-1, 1:-1]
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    blurred = (box + 4.0 * inner) * (1.0 / 13.0)
    out = x.clone()
    out[..., 1:-1, 1:-1] = inner + (1.0 - factor.view(-1, 1, 1, 1)) * (blurred - inner)
    return out.clamp(0, 1)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep ``bits`` bits: torchvision's float posterize (floor onto 2**bits levels)."""
    levels = torch.exp2(bits).view(-1, 1, 1, 1)
    return torch.minimum((x * levels).floor().clamp(min=0), levels - 1) * (1.0 / levels)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 1.0 - x, x)


def autocontrast(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """Stretch each channel to [0, 1]; a flat channel is left as it is."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, 1.0, hi - lo)
    return ((x - torch.where(flat, 0.0, lo)) / scale).clamp(0, 1)


def equalize(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """PIL's histogram equalisation per channel on 256 levels, as torchvision's tensor kernel computes it
    (which converts a float image to uint8 first, so the result is on the 1/255 grid)."""
    b, c, h, w = x.shape
    levels = (x * (255 + 1.0 - 1e-3)).to(torch.uint8).flatten(2).long()  # torchvision's float -> uint8
    hist = torch.zeros(b, c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(2, levels, torch.ones_like(levels))
    cum = hist.cumsum(-1)
    # PIL: step = (pixels not in the highest occupied bin) // 255; a channel with step 0 is left unchanged
    top = cum.argmax(-1, keepdim=True)
    step = torch.div(h * w - hist.gather(-1, top), 255, rounding_mode="floor")
    lut = torch.div(cum[..., :-1] + step // 2, step.clamp(min=1), rounding_mode="floor").clamp(0, 255)
    lut = torch.cat((torch.zeros_like(lut[..., :1]), lut), -1)
    out = torch.where(step != 0, lut.gather(-1, levels), levels)
    return out.view(b, c, h, w).float() * (1.0 / 255)


def invert(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return 1.0 - x


_COLOUR_OPS = {
    "Brightness": adjust_brightness, "Color": adjust_saturation, "Contrast": adjust_contrast,
    "Sharpness": adjust_sharpness, "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast,
    "Equalize": equalize, "Invert": invert,
}
