"""GCRL's axial attention block (Kim et al., section 3.2, Table 1 and Algorithm 1 in the appendix).

One multi-head attention module, its parameters shared, runs three times on a [B, H, W, C] grid:
unmasked attention along each row, causal attention down each column, a shift down by one row, then
causal attention along each row of the sum with the input. Each call is plain SDPA on a reshaped batch
with ``is_causal`` True or False, never a materialised mask, so flash attention applies on CUDA; the
cost is O(HW(H + W)) instead of dense attention's O((HW)^2).

Output position (r, c) sees every input position of rows < r (the unmasked row attention spreads a whole
row into each of its columns, the causal column attention carries rows <= r' down, the shift keeps only
rows < r) and positions (r, 0..c) (the last, causal row attention): the receptive field of a dense
raster-causal attention, in one block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .flops import linear_flops
from .transformer import Block


def axial_attention(attn: Attention, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """x: [B, height*width, D] tokens in raster order (already normalised by the block) ->
    [B, height*width, D]: Algorithm 1 with the one module ``attn`` for all three attentions. Output
    position (r, c) sees every input position of rows < r and positions (r, 0..c): raster-causal, as a
    dense causal attention.

    ``attn`` runs as it is, so its own dropout (``proj_drop``) applies in each of the three calls;
    ``AxialBlock`` turns that off and drops out the axial output once.
    """
    if x.ndim != 3 or x.shape[1] != height * width:
        raise ValueError(f"axial attention takes [B, {height}*{width}={height * width}, D] tokens in raster "
                         f"order, got {list(x.shape)}")
    if attn.rope is not None:
        raise ValueError("axial attention takes no RoPE: its row and column calls would restart positions "
                         "at 0")
    B, _, D = x.shape
    h = x.reshape(B, height, width, D)
    ha = attn(h.reshape(B * height, width, D)).view(B, height, width, D)
    # the transposes make the other axis the sequence; reshape copies them into the layout SDPA wants
    ha = attn(ha.transpose(1, 2).reshape(B * width, height, D), is_causal=True)
    ha = ha.view(B, width, height, D).transpose(1, 2)
    # row r now holds only rows < r (its own row would leak positions right of each column into it)
    ha = F.pad(ha[:, :-1], (0, 0, 0, 0, 1, 0))
    out = attn((h + ha).reshape(B * height, width, D), is_causal=True)
    return out.view(B, height * width, D)


class AxialBlock(Block):
    """Block (nn/transformer.py) whose attention is ``axial_attention``: x + Dropout(Axial(LN(x))), then
    x + Dropout(MLP(LN(x))) (eq. 4 of the paper with dropout before every residual; stochastic depth as
    Block's). The same parameter names and shapes as Block (norm1, attn, norm2, mlp), so a dense and an axial
    model have the same state-dict keys and load each other's weights.

    Everything after ``mlp_ratio`` is keyword-only: Block's positional order (qkv_bias before drop) would
    otherwise give a positional ``drop`` a different meaning in the two classes.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, height: int, width: int):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                         drop_path=drop_path)
        if height < 1 or width < 1:
            raise ValueError(f"an axial block needs a grid of at least 1x1 tokens, got {height}x{width}")
        self.height, self.width = height, width
        # one dropout on the axial output (the paper's Table 1), not one inside each of the three calls;
        # neither holds state, so the state dict stays Block's
        self.attn.proj_drop = nn.Identity()
        self.axial_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, *, is_causal: bool = True, cache=None, **others) -> torch.Tensor:
        """x: [B, height*width, D] in raster order. ``others`` takes the keywords a ViT passes every block;
        each must be None: the axial block has no use for a mask, a second stream, RoPE or conditioning."""
        if not is_causal:
            raise ValueError("the axial block is raster-causal by construction (Algorithm 1's masks); pass "
                             "is_causal=True or use Block for bidirectional attention")
        if cache is not None:
            raise ValueError("the axial block has no key/value cache: sampling with axial attention "
                             "recomputes the prefix at each step (call the model without a cache)")
        given = sorted(name for name, value in others.items() if value is not None)
        if given:
            raise ValueError(f"the axial block takes no {', '.join(given)}; only is_causal=True")
        attn = axial_attention(self.attn, self.norm1(x), self.height, self.width)
        x = x + self.drop_path(self.axial_drop(attn))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"height={self.height}, width={self.width}"


def axial_attention_flops(dim: int, height: int, width: int) -> int:
    """Forward matmul FLOPs of one axial attention on one image (qkv and proj projections run three times
    on all height*width tokens; the score and value matmuls of row attention are 2 * 2 * H * W * W * D
    each, of column attention 2 * 2 * W * H * H * D), matching torch.utils.flop_counter on the math SDPA
    path. The causal calls count their full square, as the math path computes it (flash skips about half)."""
    tokens = height * width
    projections = 3 * (linear_flops(tokens, dim, 3 * dim) + linear_flops(tokens, dim, dim))
    rows = 2 * (2 * 2 * height * width * width * dim)
    columns = 2 * 2 * width * height * height * dim
    return projections + rows + columns
