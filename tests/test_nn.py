import math

import pytest
import torch
import torch.nn.functional as F
from test_nn_attention import _reference  # the one textbook attention of the nn tests

from genrep.nn.attention import Attention
from genrep.nn.denoiser import DenoiserViT
from genrep.nn.embeddings import PositionEmbedding, sincos_2d, timestep_embedding
from genrep.nn.patch import PatchEmbed, patchify, unpatchify
from genrep.nn.transformer import Block
from genrep.nn.vit import ViT


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


def test_attention_matches_the_textbook_formula():
    torch.manual_seed(0)
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x), _reference(attn, x), rtol=1e-5, atol=1e-5)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, is_causal=True), _reference(attn, x, mask=causal), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn(x, mask=causal), attn(x, is_causal=True), rtol=1e-5, atol=1e-5)


def test_causal_block_does_not_look_ahead():
    torch.manual_seed(0)
    block = Block(16, 2, mlp_ratio=2.0).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] += torch.randn(1, 2, 16)  # not a constant: LayerNorm would remove that
    assert torch.allclose(block(x, is_causal=True)[:, :4], block(y, is_causal=True)[:, :4], atol=1e-6)
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
    none = PositionEmbedding(16, 16, "none")
    x = torch.randn(1, 16, 16)
    assert not list(none.state_dict()) and none(x) is x


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


# ---- the plain call is the computation from before masks, RoPE, caches and conditioning were options

def _old_attention(attn, x):
    B, N, D = x.shape
    q, k, v = attn.qkv(x).view(B, N, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0)
    return attn.proj(out.transpose(1, 2).reshape(B, N, D))


def _old_vit(vit, x, layer, scale_shifts=None):
    """The blocks with the scale and shift computed outside them and threaded through, as they were."""
    h = vit.tokens(x)
    for i, block in enumerate(vit.blocks[:layer]):
        scale, shift = scale_shifts[i] if scale_shifts else (0.0, 0.0)
        if scale_shifts:
            h = h * (1 + scale) + shift
        h = h + _old_attention(block.attn, block.norm1(h))
        if scale_shifts:
            h = h * (1 + scale) + shift
        h = h + block.mlp(block.norm2(h))
    return vit.norm(h) if layer == vit.depth else h


def _old_denoiser(net, x, layer, t):
    if t is None:
        return _old_vit(net, x, layer)
    emb, untimed = net.time_embed(t), x.shape[0] - t.shape[0]
    scale_shifts = [tuple(F.pad(v, (0, 0, 0, 0, untimed, 0)) for v in mod(emb)) for mod in net.modulations]
    return _old_vit(net, x, layer, scale_shifts)


@torch.no_grad()
def test_plain_vit_is_bit_identical_to_the_old_path():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    for vit in (ViT(8, 2, 3, 32, 3, 4, 2.0).eval(), ViT(8, 2, 3, 32, 2, 4, cls_token=False, pos_embed="sincos")):
        for layer in range(1, vit.depth + 1):
            assert torch.equal(vit(x, layer=layer), _old_vit(vit, x, layer))


@pytest.mark.parametrize("per", ["token", "channel"])
@torch.no_grad()
def test_denoiser_is_bit_identical_to_the_old_path(per):
    torch.manual_seed(0)
    net = DenoiserViT(8, 2, 3, 32, 3, 4, 2.0, modulation=per).eval()
    for mod in net.modulations:
        torch.nn.init.normal_(mod.proj.weight, std=0.1)
        torch.nn.init.normal_(mod.proj.bias, std=0.1)
    torch.nn.init.normal_(net.to_patches.weight, std=0.1)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([3, 900, 5, 0])
    for layer in (1, 2, 3):
        for steps in (t, t[1:], t[3:], None):  # all timed, an untimed prefix of 1 or 3 images, none timed
            assert torch.equal(net(x, layer=layer, t=steps), _old_denoiser(net, x, layer, steps))
    h = _old_denoiser(net, x, 3, t)
    assert torch.equal(net.denoise(x, t), net.to_image(h))
    assert torch.equal(net.pool(net(x, t=t), "mean"), h[:, 1:].mean(dim=1))
    assert net.conditioning_flops() == 2 * (256 * 32 + 32 * 32) + 3 * 2 * 32 * 2 * (17 if per == "token" else 32)


def test_denoiser_checkpoint_keys_and_parameter_order_are_unchanged():
    """Old run folders (weights by name) and optimizer states (by parameter order) must still load."""
    net = DenoiserViT(4, 2, 1, 16, 1, 2, 2.0)
    block = [f"{m}.{k}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for k in ("weight", "bias")]
    expected = (["cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed.pos"]
                + [f"blocks.0.{k}" for k in block] + ["norm.weight", "norm.bias"]
                + [f"time_embed.mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")]
                + ["modulations.0.proj.weight", "modulations.0.proj.bias"]
                + ["to_patches.weight", "to_patches.bias"])
    assert list(net.state_dict()) == expected
    assert [name for name, _ in net.named_parameters()] == expected
    rope_vit = ViT(4, 2, 1, 16, 1, 2, rope="2d", pos_embed="sincos")
    assert list(rope_vit.state_dict()) == expected[:3] + expected[4:18]  # no pos_embed.pos, nothing new
