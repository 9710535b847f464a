"""Attention's options (masks, two streams, RoPE, KV cache) against direct references; no graph break."""

import math

import pytest
import torch

from genrep.nn.attention import Attention, causal_mask
from genrep.nn.kv_cache import KVCache
from genrep.nn.rope import RoPE1D, RoPE2D
from genrep.nn.transformer import Block, TimeModulation
from genrep.nn.vit import ViT

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _reference(attn, x, context=None, mask=None, rope=None, pos=None, ctx_pos=None):
    """Textbook attention with q from x and k, v from the context, through explicit slices of qkv."""
    context = x if context is None else context
    B, N, D = x.shape
    h, d = attn.num_heads, D // attn.num_heads
    w, b = attn.qkv.weight, attn.qkv.bias

    def heads(t, rows):
        return (t @ w[rows].T + b[rows]).view(B, t.shape[1], h, d).transpose(1, 2)
    q, k, v = heads(x, slice(0, D)), heads(context, slice(D, 2 * D)), heads(context, slice(2 * D, 3 * D))
    if rope is not None:
        q, k = rope(q, pos), rope(k, pos if ctx_pos is None else ctx_pos)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D))


def test_causal_flag_equals_an_explicit_lower_triangular_mask():
    torch.manual_seed(0)
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 7, 16)
    tril = torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.equal(causal_mask(7, 7), tril)
    torch.testing.assert_close(attn(x, is_causal=True), _reference(attn, x, mask=tril), **TOL)
    torch.testing.assert_close(attn(x, is_causal=True), attn(x, mask=tril), **TOL)
    # with an offset (new queries after cached keys): query i sees keys 0 .. offset + i
    assert torch.equal(causal_mask(2, 5, offset=3), torch.ones(5, 5, dtype=torch.bool).tril()[3:])


def test_shared_and_per_batch_masks_agree():
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x = torch.randn(3, 6, 16)
    mask = torch.rand(6, 6) > 0.5
    mask |= torch.eye(6, dtype=torch.bool)  # every query sees at least itself
    shared = attn(x, mask=mask)
    torch.testing.assert_close(shared, _reference(attn, x, mask=mask), **TOL)
    torch.testing.assert_close(attn(x, mask=mask[None, None]), shared, **TOL)
    torch.testing.assert_close(attn(x, mask=mask.expand(3, 1, 6, 6)), shared, **TOL)
    # per-batch masks (GVP's permutations): each image as if alone with its own shared mask
    masks = torch.stack([mask, mask.T, torch.ones(6, 6, dtype=torch.bool).tril()])[:, None]
    out = attn(x, mask=masks)
    for b in range(3):
        torch.testing.assert_close(out[b:b + 1], attn(x[b:b + 1], mask=masks[b, 0]), **TOL)


def test_two_stream_attention_reads_keys_and_values_from_the_context():
    torch.manual_seed(0)
    attn = Attention(16, 4).eval()
    g, h = torch.randn(2, 5, 16), torch.randn(2, 8, 16)
    torch.testing.assert_close(attn(g, context=h), _reference(attn, g, context=h), **TOL)
    mask = torch.rand(2, 1, 5, 8) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attn(g, context=h, mask=mask), _reference(attn, g, context=h, mask=mask), **TOL)
    torch.testing.assert_close(attn(h, context=h), attn(h), **TOL)  # the same stream twice: self-attention
    rope = RoPE1D(4)
    pq, pk = torch.arange(3, 8), torch.arange(8)
    torch.testing.assert_close(attn(g, context=h, rope=rope, positions=pq, context_positions=pk),
                               _reference(attn, g, context=h, rope=rope, pos=pq, ctx_pos=pk), **TOL)
    assert len(attn.state_dict()) == 4  # qkv and proj, nothing new


def test_rope_held_or_passed_matches_the_reference():
    torch.manual_seed(0)
    rope = RoPE2D(8)
    held = Attention(16, 2, rope=rope).eval()
    plain = Attention(16, 2).eval()
    plain.load_state_dict(held.state_dict())  # RoPE adds no key
    x = torch.randn(2, 5, 16)
    pos = torch.randint(0, 4, (5, 2))
    expected = _reference(plain, x, rope=rope, pos=pos, mask=causal_mask(5, 5))
    torch.testing.assert_close(held(x, positions=pos, is_causal=True), expected, **TOL)
    torch.testing.assert_close(plain(x, rope=rope, positions=pos, is_causal=True), expected, **TOL)


def _decode(step, x, prefill, chunks=(1,)):
    """Prefill a prompt, then the rest in chunks of the given sizes (cycled): the outputs concatenated."""
    outs, i, c = [step(x[:, :prefill])], prefill, 0
    while i < x.shape[1]:
        n = chunks[c % len(chunks)]
        outs.append(step(x[:, i:i + n]))
        i, c = i + n, c + 1
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("rope", [None, RoPE1D(8)])
@torch.no_grad()
def test_kv_cache_decoding_equals_the_causal_forward(rope):
    torch.manual_seed(0)
    attn = Attention(16, 2, rope=rope).eval()
    x = torch.randn(2, 9, 16)
    full = attn(x, is_causal=True)
    for chunks in ((1,), (2, 1)):  # one token at a time; or several, which needs the offset mask
        cache = KVCache(9)
        torch.testing.assert_close(_decode(lambda t: attn(t, is_causal=True, cache=cache), x, 3, chunks), full,
                                   **TOL)
        assert cache.length == 9


@pytest.mark.parametrize("rope", [None, "1d", "2d"])
@torch.no_grad()
def test_a_causal_vit_decodes_with_a_cache_like_its_full_forward(rope):
    torch.manual_seed(0)
    vit = ViT(8, 2, 1, 32, 3, 2, 2.0, pos_embed="none" if rope else "learned", rope=rope).eval()
    x = torch.randn(2, 1, 8, 8)
    h = vit.tokens(x)  # 17 tokens: CLS, then 16 patches in raster order
    full = vit.forward_tokens(h, is_causal=True)
    assert torch.equal(full, vit(x, is_causal=True))
    cache = vit.new_cache()
    torch.testing.assert_close(_decode(lambda t: vit.forward_tokens(t, is_causal=True, cache=cache), h, 5),
                               full, **TOL)
    assert [c.length for c in cache] == [17] * 3
    for c in cache:
        c.reset()
    torch.testing.assert_close(_decode(lambda t: vit.forward_tokens(t, is_causal=True, cache=cache), h, 1, (3,)),
                               full, **TOL)


def test_a_stack_of_blocks_decodes_with_a_cache():
    torch.manual_seed(0)
    blocks = [Block(16, 2, 2.0).eval() for _ in range(2)]
    rope = RoPE1D(8)
    x = torch.randn(1, 6, 16)

    def run(t, caches=None):
        for i, block in enumerate(blocks):
            t = block(t, is_causal=True, rope=rope, cache=None if caches is None else caches[i])
        return t
    with torch.no_grad():
        caches = [KVCache(6), KVCache(6)]
        torch.testing.assert_close(_decode(lambda t: run(t, caches), x, 2), run(x), **TOL)


def test_a_block_owns_or_receives_its_modulation():
    torch.manual_seed(0)
    mod = TimeModulation(8, 5, 16, "channel")
    torch.nn.init.normal_(mod.proj.weight, std=0.3)
    owner = Block(16, 2, 2.0, modulation=mod).eval()
    plain = Block(16, 2, 2.0).eval()
    plain.load_state_dict({k: v for k, v in owner.state_dict().items() if not k.startswith("modulation.")})
    x, c = torch.randn(3, 5, 16), torch.randn(2, 8)
    out = owner(x, cond=c)
    assert torch.equal(out, plain(x, cond=c, modulation=mod))
    # cond covers the last two rows; the first is the unconditioned block
    torch.testing.assert_close(out[:1], plain(x[:1]), **TOL)
    assert not torch.allclose(out[1:], plain(x[1:]), atol=1e-3)
    with pytest.raises(ValueError, match="without a modulation"):
        plain(x, cond=c)
    with pytest.raises(ValueError, match="B_c <= the batch 3"):
        owner(x, cond=torch.randn(4, 8))


def test_bad_attention_inputs_say_what_is_expected():
    attn = Attention(16, 2)
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="either mask or is_causal"):
        attn(x, mask=causal_mask(4, 4), is_causal=True)
    with pytest.raises(ValueError, match=r"mask must be bool .* \[4, 4\]"):
        attn(x, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        attn(x, mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"attention takes tokens \[B, N, 16\], got \[4, 16\]"):
        attn(x[0])
    with pytest.raises(ValueError, match="context must be"):
        attn(x, context=torch.randn(2, 4, 8))
    cache = KVCache(5)
    with torch.no_grad():
        attn(x, cache=cache)
        with pytest.raises(ValueError, match="KV cache overflow: 4 cached \\+ 4 new tokens > max_len 5"):
            attn(x, cache=cache)
        with pytest.raises(ValueError, match="do not match the cache"):
            attn(x[:1, :1], cache=cache)
    with pytest.raises(ValueError, match="max_len >= 1"):
        KVCache(0)
    vit = ViT(4, 2, 1, 16, 2, 2, 2.0, rope="2d")
    with pytest.raises(ValueError, match="one KVCache per block \\(2\\)"):
        vit(torch.randn(1, 1, 4, 4), cache=[KVCache(5)])
    with pytest.raises(ValueError, match="run past the ViT's 5 tokens"), torch.no_grad():
        vit.forward_tokens(torch.randn(1, 6, 16))
    with pytest.raises(ValueError, match="without modulations"):
        vit(torch.randn(1, 1, 4, 4), cond=torch.randn(1, 16))


def test_a_causal_rope_vit_compiles_without_graph_breaks():
    import torch._dynamo

    torch.manual_seed(0)
    vit = ViT(8, 2, 1, 32, 2, 2, 2.0, cls_token=False, pos_embed="none", rope="2d").eval()
    x = torch.randn(2, 1, 8, 8)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda t: vit(t, is_causal=True))(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(lambda t: vit(t, is_causal=True), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), vit(x, is_causal=True))
    torch._dynamo.reset()
