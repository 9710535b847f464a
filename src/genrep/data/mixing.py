"""Mixup and CutMix on a classification batch, with soft targets, as the HybViT paper's code mixes its batches.

What that code does (Diffusion_ViT utils/losses.py ``ce_loss`` and utils/mix.py): with probability
``mix_prob`` (0.5) a whole batch is mixed, by CutMix or Mixup with probability 1/2 each; lambda ~ Beta(1, 1)
once per batch; every image is paired with another one of the batch; Mixup blends the pair's images, CutMix
pastes one box of the partner (``rand_bbox``: centre uniform over the pixels, half-sides
floor(floor(side * sqrt(1 - lambda)) / 2), clipped to the image) and recomputes lambda as the kept area. The
loss is lambda * CE(y) + (1 - lambda) * CE(y_partner) with label smoothing, which is the CE against the mixed
soft target; accuracy is counted against y.

The box and the label mass follow torchvision.transforms.v2.CutMix and MixUp, which compute the same box.
The pairing is not that code's ``randperm`` of the batch but images 2k and 2k + 1 with each other (what
torchvision's ``roll(1)`` does on a batch of two): the batch is already a random sample in random order, and a
pair never straddles two processes or two gradient-accumulation micro-batches (of even sizes), so, like all of
genrep's randomness, the mixing of a step does not depend on how its batch is split. An odd last image is its
own partner: it stays as it is.

All random numbers come in as tensors (the method's ``random_inputs``, drawn once for the global batch), and
every branch is computed and selected with ``torch.where``: no host sync, one compiled graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_partners(b: int, device: torch.device) -> torch.Tensor:
    """Index of each image's partner: 2k <-> 2k + 1; an odd last image is its own."""
    idx = torch.arange(b, device=device)
    partner = idx ^ 1
    return torch.where(partner < b, partner, idx)


def cutmix_box(lam: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, h: int, w: int):
    """torchvision's CutMix box around pixel (cy, cx) for Beta draw ``lam`` -> (y1, y2, x1, x2, kept area)."""
    r = 0.5 * torch.sqrt(1.0 - lam)
    half_w, half_h = (r * w).floor(), (r * h).floor()  # int() of a non-negative number
    x1, x2 = (cx - half_w).clamp(min=0), (cx + half_w).clamp(max=w)
    y1, y2 = (cy - half_h).clamp(min=0), (cy + half_h).clamp(max=h)
    return y1, y2, x1, x2, 1.0 - (x2 - x1) * (y2 - y1) / (h * w)


def mix(x: torch.Tensor, labels: torch.Tensor, num_classes: int, u: torch.Tensor, lam_mixup: torch.Tensor,
        lam_cutmix: torch.Tensor, *, mix_prob: float, cutmix_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the batch x [B, C, H, W] -> (images, soft targets float32 [B, num_classes]).

    The batch's shared random numbers: u [4] uniforms (mixed if u0 < mix_prob; CutMix if u1 < cutmix_share,
    else Mixup; the box centre's row and column), and the Beta draws lam_mixup and lam_cutmix (scalars).
    """
    b, _, h, w = x.shape
    partner = pair_partners(b, x.device)
    one_hot = F.one_hot(labels, num_classes).float()
    other = x[partner]

    y1, y2, x1, x2, lam_cut = cutmix_box(lam_cutmix, (u[2] * h).floor(), (u[3] * w).floor(), h, w)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    box = ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]
    cut = torch.where(box, other, x)
    # torchvision's operand order, so Mixup agrees with it bit for bit
    blend = other * (1.0 - lam_mixup) + x * lam_mixup

    mixed, use_cut = u[0] < mix_prob, u[1] < cutmix_share
    lam = torch.where(mixed, torch.where(use_cut, lam_cut, lam_mixup), torch.ones_like(lam_mixup))
    images = torch.where(mixed, torch.where(use_cut, cut, blend), x)
    target = one_hot[partner] * (1.0 - lam) + one_hot * lam
    return images, target
