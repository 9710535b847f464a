import math

import pytest
import torch
import torch.nn.functional as F

from genrep.nn.attention import Attention
from genrep.nn.embeddings import PositionEmbedding, sincos_2d, timestep_embedding
from genrep.nn.patch import PatchEmbed, patchify, unpatchify
from genrep.nn.transformer import Block


def test_patchify_round_trip_and_order():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 4, 48)
    assert torch.equal(unpatchify(tokens, 4, 3), x)
    # token 1 is the top-right patch, pixels laid out (row, col, channel)
    assert torch.equal(tokens[0, 1].view(4, 4, 3), x[0, :, :4, 4:].permute(1, 2, 0))


def test_patch_embed_is_a_linear_map_of_each_patch():
    embed = PatchEmbed(8, 4, 3, 16)
    x = torch.randn(2, 3, 8, 8)
    weight = embed.proj.weight.permute(0, 2, 3, 1).reshape(16, -1)  # (D, p, p, C) like patchify
    expected = patchify(x, 4) @ weight.T + embed.proj.bias
    torch.testing.assert_close(embed(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        PatchEmbed(10, 4, 3, 16)


def _reference_attention(attn: Attention, x, mask=None):
    B, N, D = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).view(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // h)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D))


def test_attention_matches_the_textbook_formula():
    torch.manual_seed(0)
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x), rtol=1e-5, atol=1e-5)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, causal=True), _reference_attention(attn, x, causal), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn(x, mask=causal), attn(x, causal=True), rtol=1e-5, atol=1e-5)


def test_causal_block_does_not_look_ahead():
    torch.manual_seed(0)
    block = Block(16, 2, mlp_ratio=2.0).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] += torch.randn(1, 2, 16)  # not a constant: LayerNorm would remove that
    assert torch.allclose(block(x, causal=True)[:, :4], block(y, causal=True)[:, :4], atol=1e-6)
    assert not torch.allclose(block(x)[:, :4], block(y)[:, :4], atol=1e-3)


def test_sincos_2d_encodes_rows_and_columns():
    emb = sincos_2d(16, 4)
    assert emb.shape == (16, 16)
    # first half depends on the row only, second half on the column only
    assert torch.equal(emb[0, :8], emb[3, :8]) and not torch.equal(emb[0, 8:], emb[3, 8:])
    assert torch.equal(emb[0, 8:], emb[4, 8:]) and not torch.equal(emb[0, :8], emb[4, :8])
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    pos = PositionEmbedding(16, 16, "sincos")
    assert not list(pos.parameters()) and torch.equal(pos(torch.zeros(1, 16, 16))[0], emb)
    with pytest.raises(ValueError, match="unknown position embedding"):
        PositionEmbedding(16, 16, "rope")


def test_timestep_embedding_matches_ddpm_formula():
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_dropout_only_in_training():
    block = Block(16, 2, drop=0.5)
    x = torch.randn(2, 4, 16)
    block.eval()
    assert torch.equal(block(x), block(x))
    block.train()
    assert not torch.equal(block(x), block(x))
    assert F.dropout  # silence unused import linters
