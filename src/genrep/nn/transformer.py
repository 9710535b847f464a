"""Pre-LN transformer block (ViT / GPT-2 style), optionally modulated by a conditioning embedding (DiT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .flops import linear_flops
from .kv_cache import KVCache

MODULATIONS = ("token", "channel")


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)  # dropout on the branch output, before the residual add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class ResidualMlp(nn.Module):
    """x + MLP(LN(x)): one layer of a residual MLP (DARL table 2's MLP patch decoder)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is dropped with probability ``rate`` and
    the kept ones are scaled by 1 / (1 - rate), so the expected branch is unchanged; identity in eval mode.

    The HybViT paper's code (sndnyang/Diffusion_ViT models/vit.py) imports ``DropPath`` from its
    utils/drop_path.py, the per-sample drop path of timm that SPT_LSA_ViT (whose ViT it copies) ships:
    keep = floor(keep_prob + U[0, 1)) of shape [B, 1, ..., 1], out = x / keep_prob * keep. This is that.
    The draw comes from torch's global generator, like nn.Dropout, so the loop's per-step reseed covers it.
    ``rate`` is a Python float, so under torch.compile the branch below is a guard, not a host sync.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        if not 0 <= rate < 1:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:  # draws nothing, so rate 0 leaves every other draw unchanged
            return x
        keep_prob = 1 - self.rate
        # the mask in float32 whatever x's dtype: a bf16 U[0, 1) is too coarse for the keep probability
        keep = (keep_prob + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device)).floor_()
        return x.div(keep_prob) * keep.to(x.dtype)

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


class TimeModulation(nn.Module):
    """Conditioning embedding [B, E] -> (scale, shift), each [B, tokens, 1] (token) or [B, 1, dim] (channel)."""

    def __init__(self, emb_dim: int, tokens: int, dim: int, per: str):
        super().__init__()
        if per not in MODULATIONS:
            raise ValueError(f"unknown time modulation {per!r}; choose one of {', '.join(MODULATIONS)}")
        self.per = per
        self.proj = nn.Linear(emb_dim, 2 * (tokens if per == "token" else dim))
        # zero: every layer starts as the plain block and learns how much conditioning to let in (adaLN-zero)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.proj(F.silu(emb)).chunk(2, dim=-1)
        if self.per == "token":
            return scale.unsqueeze(-1), shift.unsqueeze(-1)
        return scale.unsqueeze(1), shift.unsqueeze(1)

    def flops(self) -> int:
        return linear_flops(1, self.proj.in_features, self.proj.out_features)


def modulate(x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if scale_shift is None:
        return x
    scale, shift = scale_shift
    return x * (1 + scale) + shift


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)).

    With a conditioning embedding ``cond`` and a ``modulation`` (e.g. ``TimeModulation``; held by the
    block, or passed per call, which wins), the residual stream is modulated as x * (1 + scale) + shift
    before the attention and again before the MLP (GenViT's timestep conditioning, eq. 21). It acts on
    the stream, not only on the normalised branch input: with one scalar per token a LayerNorm right
    after it would undo both the scale and the shift. ``cond`` [B_c, E] conditions the *last* B_c rows
    of the batch; the rows before them get scale = shift = 0, the unconditioned block (HybViT runs its
    untimed classification images in front of the timed ones in one batch).

    ``drop_path``: stochastic depth (``DropPath``) on both residual branches, an independent draw for each,
    as the paper's code applies its one DropPath to the attention and the MLP output of every block.

    ``context`` (the other stream's residual, [B, M, D]) gives the keys and values: it goes through
    the same modulation and ``norm1`` as x would, so the query stream reads exactly the keys and
    values the content stream computes for itself (XLNet's two streams). The other keywords go to
    ``Attention`` unchanged.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, modulation: nn.Module | None = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio, drop)
        self.modulation = modulation
        self.drop_path = DropPath(drop_path)  # no parameters or buffers: the state dict is unchanged

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, is_causal: bool = False,
                context: torch.Tensor | None = None, rope: nn.Module | None = None,
                positions: torch.Tensor | None = None, context_positions: torch.Tensor | None = None,
                cache: KVCache | None = None, cond: torch.Tensor | None = None,
                modulation: nn.Module | None = None) -> torch.Tensor:
        scale_shift = None if cond is None else self._scale_shift(cond, modulation, x.shape[0])
        x = modulate(x, scale_shift)
        if context is not None:
            context = self.norm1(modulate(context, scale_shift))
        attn = self.attn(self.norm1(x), mask=mask, is_causal=is_causal, context=context, rope=rope,
                         positions=positions, context_positions=context_positions, cache=cache)
        x = x + self.drop_path(attn)
        x = modulate(x, scale_shift)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _scale_shift(self, cond: torch.Tensor, modulation: nn.Module | None, batch: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        modulation = self.modulation if modulation is None else modulation
        if modulation is None:
            raise ValueError("cond given to a block without a modulation; build it with modulation= or pass one")
        if cond.ndim != 2 or cond.shape[0] > batch:
            raise ValueError(f"cond must be [B_c, E] with B_c <= the batch {batch} (it conditions the last B_c "
                             f"rows), got {list(cond.shape)}")
        scale_shift = modulation(cond)
        unconditioned = batch - cond.shape[0]
        if unconditioned:  # zero scale and shift in front: x * (1 + 0) + 0 is the unconditioned block
            scale_shift = tuple(F.pad(v, (0, 0, 0, 0, unconditioned, 0)) for v in scale_shift)
        return scale_shift
