"""GCRL's axial attention block: raster causality, Algorithm 1 against a flat-mask reference, Block's
state dict, analytic FLOPs against torch's counter, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from genrep.nn.attention import Attention
from genrep.nn.axial import AxialBlock, axial_attention, axial_attention_flops
from genrep.nn.transformer import Block
from genrep.nn.vit import ViT

GRIDS = [(3, 5), (5, 3), (4, 4), (1, 4), (4, 1)]


def _blocks(depth: int, height: int, width: int, dim: int = 8, heads: int = 2) -> list[AxialBlock]:
    torch.manual_seed(0)
    return [AxialBlock(dim, heads, 2.0, height=height, width=width).double().eval() for _ in range(depth)]


def _influence(blocks: list[AxialBlock], x: torch.Tensor) -> torch.Tensor:
    """[N, N]: the largest |d out[k] / d x[j]| over channels, for output position k and input position j."""
    _, N, D = x.shape

    def run(flat):
        h = flat.view(1, N, D)
        for block in blocks:
            h = block(h)
        return h.reshape(N * D)
    jac = torch.autograd.functional.jacobian(run, x.reshape(N * D), vectorize=True)
    return jac.view(N, D, N, D).abs().amax(dim=(1, 3))


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("height,width", GRIDS)
def test_every_earlier_position_and_no_later_one_reaches_each_output(depth, height, width):
    """Raster causality, exactly: output k has gradient exactly 0 w.r.t. every input j > k, and non-zero
    w.r.t. every input j <= k.

    This holds from ONE block on, not only through a stack: position (r, c)'s last, causal row attention reads
    (r, c') for c' <= c, each of which carries (after the shift) the causal column attention's output of row
    r - 1 at column c', which read rows <= r - 1 of that column, each of which the unmasked row attention had
    filled with its whole row. So a single block sees every position of rows < r, whatever the column: the
    receptive field of dense causal attention, which the stack then keeps."""
    N = height * width
    x = torch.randn(1, N, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reach = _influence(_blocks(depth, height, width), x)
    later = torch.ones(N, N, dtype=torch.bool).triu(1)
    assert torch.all(reach[later] == 0)
    assert torch.all(reach[~later] > 1e-8), reach


def _reference_algorithm_1(attn: Attention, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Algorithm 1 on the flat raster sequence, without a reshape or a transpose: each attention is a
    dense one over all N tokens with an explicit boolean [N, N] mask, the softmax by hand; the shift is an
    index shift."""
    B, N, D = x.shape
    heads, d = attn.num_heads, D // attn.num_heads
    w, b = attn.qkv.weight, attn.qkv.bias
    r, c = torch.arange(N) // width, torch.arange(N) % width
    same_row, same_col = r[:, None] == r[None], c[:, None] == c[None]
    row_causal = same_row & (c[None] <= c[:, None])
    col_causal = same_col & (r[None] <= r[:, None])

    def msa(t, mask):
        q, k, v = (t @ w.T + b).view(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
        weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
        return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, D))

    ha = msa(msa(x, same_row), col_causal)
    shifted = torch.zeros_like(ha)
    shifted[:, width:] = ha[:, :-width]  # raster index k - width is the same column one row up
    return msa(x + shifted, row_causal)


@pytest.mark.parametrize("height,width", GRIDS)
def test_equals_algorithm_1_with_explicit_masks(height, width):
    torch.manual_seed(0)
    attn = Attention(12, 3).double().eval()
    x = torch.randn(2, height * width, 12, dtype=torch.float64)
    torch.testing.assert_close(axial_attention(attn, x, height, width),
                               _reference_algorithm_1(attn, x, height, width), rtol=1e-10, atol=1e-10)


def test_block_is_the_pre_ln_residual_around_axial_attention():
    torch.manual_seed(0)
    block = AxialBlock(16, 4, height=3, width=5).eval()
    x = torch.randn(2, 15, 16)
    h = x + axial_attention(block.attn, block.norm1(x), 3, 5)
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))


def test_dropout_falls_once_on_the_axial_output():
    """The paper's Table 1: LN -> axial attention -> Dropout -> add; no dropout inside the 3 calls."""
    torch.manual_seed(0)
    block = AxialBlock(16, 4, drop=0.5, height=3, width=5).train()
    x = torch.randn(2, 15, 16)
    torch.manual_seed(7)
    out = block(x)
    torch.manual_seed(7)
    mask = torch.nn.functional.dropout(torch.ones(2, 15, 16), 0.5)  # the first draw: the axial output's
    h = x + mask * axial_attention(block.attn, block.norm1(x), 3, 5)
    torch.testing.assert_close(out, h + block.mlp(block.norm2(h)))


def test_state_dict_is_blocks_both_ways():
    kwargs = dict(mlp_ratio=2.0, qkv_bias=False, drop=0.1, drop_path=0.1)
    dense, axial = Block(16, 4, **kwargs), AxialBlock(16, 4, **kwargs, height=2, width=3)
    shapes = {k: v.shape for k, v in dense.state_dict().items()}
    assert {k: v.shape for k, v in axial.state_dict().items()} == shapes
    axial.load_state_dict(dense.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(axial.state_dict().values(), dense.state_dict().values()))
    torch.manual_seed(1)
    dense.load_state_dict(AxialBlock(16, 4, **kwargs, height=2, width=3).state_dict())


def test_refusals_are_one_line():
    block = AxialBlock(8, 2, height=2, width=3)
    x = torch.randn(1, 6, 8)
    calls = [lambda: block(x, is_causal=False), lambda: block(x, cache=ViT(4, 2, 1, 8, 1, 2).new_cache()[0]),
             lambda: block(x, mask=torch.ones(6, 6, dtype=torch.bool)), lambda: block(torch.randn(1, 7, 8)),
             lambda: AxialBlock(8, 2, height=0, width=3)]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        assert "\n" not in str(e.value)
    # what a plain ViT passes to every block is accepted
    block(x, is_causal=True, mask=None, rope=None, positions=None, cache=None, cond=None, modulation=None)


@pytest.mark.parametrize("height,width", [(3, 5), (4, 2)])
def test_flops_match_the_counter_on_the_math_path(height, width):
    """The counter does not see the CPU's fused kernel, so attention runs on the math path, whose matmuls it
    counts (causal calls as full squares)."""
    attn = Attention(16, 4)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        axial_attention(attn, torch.randn(1, height * width, 16), height, width)
    assert counter.get_total_flops() == axial_attention_flops(16, height, width)


def _compile_case():
    torch.manual_seed(0)
    block = AxialBlock(16, 4, height=3, width=5).eval()
    x = torch.randn(2, 15, 16)
    return block, x, block(x)


def test_compiles_to_one_graph():
    """A graph break would raise; the cheap backend checks that much."""
    block, x, expected = _compile_case()
    torch.testing.assert_close(torch.compile(block, backend="eager", fullgraph=True)(x), expected)


@pytest.mark.slow  # inductor's CPU compile takes about 15 s
def test_inductor_compile_matches_eager():
    block, x, expected = _compile_case()
    torch.testing.assert_close(torch.compile(block, fullgraph=False)(x), expected, rtol=1e-5, atol=1e-5)
