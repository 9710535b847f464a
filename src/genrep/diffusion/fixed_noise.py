"""Noise that is a function of (image, seed, step), for deterministic diffusion features.

Reading features from a noised image x_t needs a noise draw. Drawn from a generator per batch, an image's noise
would depend on its batch and its place in it, so the same image would get other features at another batch size
or in a cache entry made by another command. Here each image's noise comes from a counter-based hash of its 8-bit
pixels, a seed and the step: the same image gets the same noise in any batch, on any device, cached or not.
Everything is integer tensor arithmetic on the image's device (no host sync, no generator).
"""

from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF


def _mix(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors (values kept in [0, 2^32): products wrap, the low bits hold)."""
    h = h & _M32
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & _M32
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def image_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 [B]: a hash of each image's 8-bit pixels (x in [0, 1]); every pixel's value is hashed with its place,
    so two images differ in key unless they are equal at 8 bits."""
    q = (x.detach().float().flatten(1) * 255).round().to(torch.int64)
    place = torch.arange(q.shape[1], device=x.device, dtype=torch.int64)
    return _mix(_mix(q * 0x9E3779B1 + _mix(place + 1)).sum(1))


def fixed_noise(x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (images in [0, 1]), a function of each image's pixels, ``seed`` and
    ``step`` only (Box-Muller on two hashed uniforms per element), in float32."""
    key = _mix(image_keys(x) ^ _mix(torch.tensor(seed * 1_000_003 + step + 1, device=x.device)))
    n = x[0].numel()
    counter = torch.arange(n, device=x.device, dtype=torch.int64) * 2
    # uniforms in (0, 1): never 0, so the log is finite
    u1 = (_mix(key[:, None] * 0x27D4EB2F + counter).double() + 0.5) / 2**32
    u2 = (_mix(key[:, None] * 0x165667B1 + counter + 1).double() + 0.5) / 2**32
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return z.float().view_as(x)
