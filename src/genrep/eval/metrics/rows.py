"""Feature matrices read a block of rows at a time: what lets the probes and heads train on a cache larger than
memory (``eval.feature_store``: float16, memory-mapped) without ever making a float32 copy of it.

:class:`Moments` merges per-feature (or per-channel) statistics block by block; :class:`Rows` stands where a
float32 ``[N, D]`` tensor stands in the linear probe and kNN (``len``, ``shape``, ``device``, indexing by a slice
or an index tensor), each block gathered from the file, cast to float32, standardised and moved to the device the
fit runs on.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROW_BLOCK_ELEMENTS = 1 << 22  # ~4M elements per block: bounded float32/float64 temporaries


def rows_per_chunk(x) -> int:
    return max(1, ROW_BLOCK_ELEMENTS // max(1, x[0].numel()))


def bad_rows(x: Tensor) -> int:
    """Rows with a NaN or inf, counted block by block (a float16 cache is never copied whole to float32)."""
    step = rows_per_chunk(x)
    return sum(int((~torch.isfinite(x[s:s + step].float())).flatten(1).any(dim=1).sum())
               for s in range(0, x.shape[0], step))


class Moments:
    """Mean and population variance merged chunk by chunk in float64 (Chan et al.), per feature for [N, D], per
    channel (over N, H, W) for [N, C, H, W], so no full-size copy is ever made."""

    def __init__(self):
        self.count, self.mean, self.m2, self.ndim = 0, 0.0, 0.0, None

    def add(self, chunk: Tensor) -> None:
        chunk = chunk.double()
        self.ndim = chunk.ndim
        dims = (0,) if chunk.ndim == 2 else (0, 2, 3)
        n = chunk.numel() // chunk.shape[1]
        var_c, mean_c = torch.var_mean(chunk, dim=dims, unbiased=False)
        delta = mean_c - self.mean
        total = self.count + n
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var_c * n + delta.square() * (self.count * n / total)
        self.count = total

    def norm(self, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
        """(mean, 1 / (std + eps)), float32, shaped to broadcast over a batch ([D] or [C, 1, 1])."""
        scale = 1.0 / ((self.m2 / self.count).sqrt() + eps)
        shape = (-1,) if self.ndim == 2 else (-1, 1, 1)
        return self.mean.float().view(shape), scale.float().view(shape)


def feature_stats(x, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(mean, 1 / (std + eps)) of the train features, per feature for [N, D], per channel for [N, C, H, W]
    (shaped [C, 1, 1] to broadcast).  std is the population std, as :func:`probes.standardize`."""
    moments = Moments()
    step = rows_per_chunk(x)
    for s in range(0, x.shape[0], step):
        moments.add(x[s:s + step])
    return moments.norm(eps)


def streams(x) -> bool:
    """Whether a feature matrix is read in blocks: a half-precision one on the CPU (a float16 cache, mapped from its
    file) or one already wrapped. float32 tensors are used whole, as they always were."""
    return isinstance(x, Rows) or (isinstance(x, Tensor) and x.device.type == "cpu"
                                   and x.dtype in (torch.float16, torch.bfloat16))


class Rows:
    """``x[index]`` (all rows when ``index`` is None), standardised with ``norm`` = (mean, scale) when given, read as
    float32 blocks on ``device``."""

    def __init__(self, x: Tensor, device: torch.device | str, index: Tensor | None = None,
                 norm: tuple[Tensor, Tensor] | None = None):
        self.x, self.device, self.index, self.norm = x, torch.device(device), index, norm
        self.chunk_rows = rows_per_chunk(x)

    def __len__(self) -> int:
        return self.x.shape[0] if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), *self.x.shape[1:])

    def _source(self, key) -> Tensor:
        if isinstance(key, slice):
            return self.x[key] if self.index is None else self.x[self.index[key]]
        key = key.cpu()
        return self.x[key if self.index is None else self.index[key]]

    def __getitem__(self, key) -> Tensor:
        """A slice or an index tensor of rows, as float32 on the device, standardised."""
        block = self._source(key).to(self.device, non_blocking=True).float()
        if self.norm is None:
            return block
        mean, scale = self.norm
        return (block - mean) * scale

    def blocks(self):
        return (self[s:s + self.chunk_rows] for s in range(0, len(self), self.chunk_rows))

    def subset(self, idx: Tensor) -> Rows:
        idx = idx.cpu()
        return Rows(self.x, self.device, idx if self.index is None else self.index[idx], self.norm)

    def standardized(self, norm: tuple[Tensor, Tensor] | None) -> Rows:
        return Rows(self.x, self.device, self.index, norm)

    def stats(self, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
        """(mean, scale) of these rows as read, on the device: :func:`feature_stats` over them."""
        moments = Moments()
        for s in range(0, len(self), self.chunk_rows):
            moments.add(self._source(slice(s, s + self.chunk_rows)))
        return tuple(t.to(self.device) for t in moments.norm(eps))
