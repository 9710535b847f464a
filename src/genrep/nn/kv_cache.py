"""Keys and values of past tokens, kept per attention layer for autoregressive sampling."""

from __future__ import annotations

import torch


class KVCache:
    """One attention layer's keys and values, [B, heads, max_len, head_dim] each.

    The storage is allocated at the first ``append`` of a sequence, in the keys' shape, dtype and device
    (so a cache made before ``autocast`` or ``.to(device)`` still matches what the layer produces). ``length`` is
    the number of cached tokens: the offset of the next token, which RoPE positions and the causal mask
    follow. Meant for sampling under ``torch.no_grad()``: appends write in place, which would corrupt
    what autograd saved for an earlier step.
    """

    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"a KV cache needs max_len >= 1 (the longest sequence it will hold), got {max_len}")
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add n new keys and values [B, H, n, Dh]; return all cached ones [B, H, length, Dh]."""
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"a KV cache takes keys and values of one shape [B, heads, n, head_dim], got "
                             f"{list(k.shape)} and {list(v.shape)}")
        B, H, n, D = k.shape
        fits = self.k is not None and self.k.shape == (B, H, self.max_len, D) and self.k.dtype == k.dtype \
            and self.k.device == k.device
        if self.length == 0 and not fits:
            self.k = k.new_empty(B, H, self.max_len, D)
            self.v = v.new_empty(B, H, self.max_len, D)
        elif not fits:
            raise ValueError(f"keys [B={B}, H={H}, Dh={D}] {k.dtype} do not match the cache's "
                             f"[B={self.k.shape[0]}, H={self.k.shape[1]}, Dh={self.k.shape[3]}] {self.k.dtype}")
        end = self.length + n
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {n} new tokens > max_len "
                             f"{self.max_len}; make the cache with max_len >= {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        """Forget the cached tokens; the storage is reused if the next sequence has the same shape."""
        self.length = 0
