"""SimCLR's contrastive part, shared by ``simclr`` and ``gcrl``: the projection head and the NT-Xent loss.

The loss follows eq. 3 of the GCRL paper (SimCLR's symmetric normalized-temperature cross-entropy). Under
torch.distributed its negatives are the whole global batch, and each process returns the mean over its own
anchors, so the gradient DDP averages over processes is the one-process gradient on the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .flops import linear_flops

# Finite rather than -inf, so no arithmetic on the logits (a max shift, a cast, a fused kernel) can meet
# inf - inf; it is far below any real logit (|cosine| / temperature), so its exp() after the max shift is 0.
_SELF_FILL = -1e9


class ProjectionHead(nn.Module):
    """SimCLR's two-layer projection head with LayerNorm in place of BatchNorm: Linear(dim, hidden) ->
    LayerNorm -> ReLU -> Linear(hidden, out).

    GCRL section 4.1: hidden 1,024; out 64 for CIFAR, 128 for ImageNet. LayerNorm rather than BatchNorm keeps
    the head per sample, so it needs no cross-process statistics and does not depend on the batch split.
    """

    def __init__(self, dim: int, hidden: int = 1024, out: int = 64):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("out", out)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"projection head {name} must be a positive integer; got {value!r}")
        self.dim, self.hidden, self.out = dim, hidden, out
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> [..., out]."""
        return self.fc2(F.relu(self.norm(self.fc1(x))))

    def flops(self) -> int:
        """Forward matmul FLOPs per sample (norm and activation are not counted; see nn/flops.py)."""
        return linear_flops(1, self.dim, self.hidden) + linear_flops(1, self.hidden, self.out)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(z: torch.Tensor) -> torch.Tensor:
    """[B, D] on every process -> [world * B, D] in rank order, differentiable: the backward sums every
    process's gradient for this process's rows back onto it (a reduce-scatter)."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z), dim=0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent of two views [B, D] (row i of z1 and z2 are the positive pair), eq. 3: both are
    L2-normalised inside; each of the 2B anchors has its partner as positive and the other 2B - 2 embeddings
    as negatives. Computed in float32 whatever the input dtype (bf16 autocast). Under torch.distributed
    (initialised, world > 1) the negatives are the whole GLOBAL batch: embeddings are all-gathered WITH
    gradients (torch.distributed.nn.functional.all_gather), and the returned value is the mean over this
    process's own 2B anchors, so that DDP's gradient averaging over processes gives exactly the gradient of
    the single-process loss on the global batch (the loop's test "2 processes equal 1 process" holds).

    Normalisation: eq. 3 is L_c = -1/(2N) sum_{i=1..N} [log p(z1_i -> z2_i) + log p(z2_i -> z1_i)], i.e. the
    mean over all 2N anchors (both directions of every pair), each anchor's denominator holding its positive
    and its 2N - 2 negatives (not itself). With equal per-process batches the mean of the processes' values
    is that global mean, which is what the loop logs.

    The result is float32 for half-precision inputs and float64 for float64 ones (so gradcheck applies). Every
    process must hold the same B (all_gather needs equal shapes; the loop splits the global batch evenly).
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise ValueError(f"nt_xent takes two views of the same shape [B, D] with B >= 1; got "
                         f"{list(z1.shape)} and {list(z2.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"nt_xent temperature must be a finite number > 0 (SimCLR uses 0.1-0.5); got "
                         f"{temperature!r}")
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    # Autocast would run the similarity matmul in bf16 again, and 1/temperature amplifies its rounding.
    with torch.autocast(z1.device.type, enabled=False):
        z1 = F.normalize(z1.to(dtype), dim=1)
        z2 = F.normalize(z2.to(dtype), dim=1)
        rank, world = _rank_world()
        k1, k2 = (_gather(z1), _gather(z2)) if world > 1 else (z1, z2)
        b, n = z1.shape[0], k1.shape[0]
        # anchors: this process's rows of both views; keys: the global [z1; z2] (z1_j at j, z2_j at n + j)
        logits = torch.cat([z1, z2]) @ torch.cat([k1, k2]).T / temperature  # [2b, 2n]
        own = torch.arange(rank * b, rank * b + b, device=z1.device)
        self_idx = torch.cat([own, own + n])
        positive = torch.cat([own + n, own])
        is_self = torch.arange(2 * n, device=z1.device) == self_idx[:, None]
        logits = logits.masked_fill(is_self, _SELF_FILL)
        return F.cross_entropy(logits, positive)
