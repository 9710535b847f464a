"""ADM's U-Net (genrep.nn.unet): guided-diffusion's parameter names, block numbering, loading, attention."""

import math

import pytest
import torch
from conftest import one_line

from genrep.errors import GenrepError
from genrep.nn.unet import (ADM_256_UNCOND, AttentionBlock, UNet, default_channel_mult, load_unet_state,
                            timestep_embedding)

# --- the published architecture, walked independently of the implementation -------------------------------


def _conv(name, cin, cout, k=3):
    return [(f"{name}.weight", (cout, cin, k, k)), (f"{name}.bias", (cout,))]


def _conv1d(name, cin, cout):
    return [(f"{name}.weight", (cout, cin, 1)), (f"{name}.bias", (cout,))]


def _vector(name, c):  # GroupNorm affine
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,))]


def _linear(name, cin, cout):
    return [(f"{name}.weight", (cout, cin)), (f"{name}.bias", (cout,))]


def _resblock(p, cin, cout, emb):  # use_scale_shift_norm: the embedding gives a scale and a shift
    names = (_vector(f"{p}.in_layers.0", cin) + _conv(f"{p}.in_layers.2", cin, cout)
             + _linear(f"{p}.emb_layers.1", emb, 2 * cout)
             + _vector(f"{p}.out_layers.0", cout) + _conv(f"{p}.out_layers.3", cout, cout))
    return names + (_conv(f"{p}.skip_connection", cin, cout, 1) if cin != cout else [])


def _attention(p, c):
    return _vector(f"{p}.norm", c) + _conv1d(f"{p}.qkv", c, 3 * c) + _conv1d(f"{p}.proj_out", c, c)


def _adm_names(image_size, mc, mult, num_res, attn_res, in_ch, out_ch):
    """guided-diffusion UNetModel's (name, shape) list with resblock_updown and scale-shift norm."""
    emb, attn_ds = 4 * mc, {image_size // r for r in attn_res}
    names = _linear("time_embed.0", mc, emb) + _linear("time_embed.2", emb, emb)
    ch = mc * mult[0]
    names += _conv("input_blocks.0.0", in_ch, ch)
    chans, ds, i = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(num_res):
            names += _resblock(f"input_blocks.{i}.0", ch, m * mc, emb)
            ch = m * mc
            if ds in attn_ds:
                names += _attention(f"input_blocks.{i}.1", ch)
            chans.append(ch)
            i += 1
        if level < len(mult) - 1:
            names += _resblock(f"input_blocks.{i}.0", ch, ch, emb)  # the down ResBlock
            chans.append(ch)
            ds, i = ds * 2, i + 1
    names += _resblock("middle_block.0", ch, ch, emb) + _attention("middle_block.1", ch)
    names += _resblock("middle_block.2", ch, ch, emb)
    o = 0
    for level in reversed(range(len(mult))):
        for j in range(num_res + 1):
            names += _resblock(f"output_blocks.{o}.0", ch + chans.pop(), mult[level] * mc, emb)
            ch, k = mult[level] * mc, 1
            if ds in attn_ds:
                names += _attention(f"output_blocks.{o}.1", ch)
                k = 2
            if level and j == num_res:
                names += _resblock(f"output_blocks.{o}.{k}", ch, ch, emb)  # the up ResBlock
                ds //= 2
            o += 1
    return names + _vector("out.0", ch) + _conv("out.2", ch, out_ch)


@pytest.fixture(scope="module")
def adm256():
    with torch.device("meta"):  # 553M parameters, no memory
        return UNet(**ADM_256_UNCOND)


def test_adm256_state_dict_is_guided_diffusions(adm256):
    expected = _adm_names(256, 256, (1, 1, 2, 2, 4, 4), 2, (32, 16, 8), 3, 6)
    assert [(k, tuple(v.shape)) for k, v in adm256.state_dict().items()] == expected
    n = sum(p.numel() for p in adm256.parameters())
    assert n == sum(math.prod(s) for _, s in expected)
    assert abs(n / 1e6 - 552.8) < 0.05  # the paper's 553M
    # num_head_channels 64: 16 heads at 1024 channels (16x16), 8 at 512 (32x32)
    assert adm256.input_blocks[13][1].num_heads == 16 and adm256.output_blocks[7][1].num_heads == 8


def test_adm256_block_numbering(adm256):
    shapes = adm256.block_shapes()
    assert adm256.num_blocks == len(shapes) == 37
    assert shapes[0] == (256, 256)       # block 1: the input conv
    assert shapes[17] == (1024, 8)       # block 18: the last encoder block
    assert shapes[18] == (1024, 8)       # block 19: the middle block
    assert shapes[23] == (1024, 16)      # block 24: the paper's best decoder block
    assert shapes[36] == (256, 256)      # block 37: the last decoder block, fed to `out`
    # a forward on the meta device yields exactly those shapes
    acts = adm256.activations(torch.empty(1, 3, 256, 256, device="meta"), torch.zeros(1, device="meta"),
                              range(1, 38))
    assert [(a.shape[1], a.shape[2]) for a in acts.values()] == shapes
    for bad in (0, 38):
        with pytest.raises(GenrepError, match=r"1\.\.37") as e:
            adm256.activations(torch.empty(1, 3, 256, 256, device="meta"), torch.zeros(1, device="meta"),
                               [bad])
        one_line(e)


# --- a tiny U-Net, run for real -----------------------------------------------------------------------------

TINY = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
            attention_resolutions=(8,), channel_mult=(1, 2))
CONFIGS = {
    "updown-conv-legacy-classes": dict(num_head_channels=16, num_classes=10),
    "resblock-updown-new-order": dict(num_heads=2, resblock_updown=True, use_new_attention_order=True),
    "avgpool-additive-emb": dict(num_heads=4, num_heads_upsample=2, conv_resample=False,
                                 use_scale_shift_norm=False, num_res_blocks=2),
}


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    unet = UNet(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # the zero-initialised layers would make every output zero
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def _inputs(unet, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, unet.image_size, unet.image_size, generator=g)
    t = torch.tensor([3.0, 700.0])[:batch]
    y = None if unet.num_classes is None else torch.arange(batch)
    return x, t, y


@pytest.mark.parametrize("name", CONFIGS)
def test_activations_match_block_shapes_and_forward(name):
    unet = _tiny(**CONFIGS[name])
    x, t, y = _inputs(unet)
    acts = unet.activations(x, t, range(1, unet.num_blocks + 1), y=y)
    assert list(acts) == list(range(1, unet.num_blocks + 1))
    assert [(a.shape[1], a.shape[2]) for a in acts.values()] == unet.block_shapes()
    out = unet(x, t, y)
    assert out.shape == (2, 6, 16, 16)
    torch.testing.assert_close(unet.out(acts[unet.num_blocks]), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_round_trip(name, tmp_path):
    unet = _tiny(**CONFIGS[name])
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    fresh = UNet(**{**TINY, **CONFIGS[name]}).eval()
    load_unet_state(fresh, tmp_path / "unet.pt")
    x, t, y = _inputs(unet)
    assert torch.equal(fresh(x, t, y), unet(x, t, y))


def test_load_refuses_other_files(tmp_path):
    unet = UNet(**TINY)
    torch.save(UNet(**{**TINY, "model_channels": 64}).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(GenrepError, match="not a state dict of this configuration") as e:
        load_unet_state(unet, tmp_path / "wide.pt")
    msg = one_line(e)
    assert "time_embed.0.weight: file (256, 64) vs model (128, 32)" in msg and "(+" in msg  # first 3 of many

    torch.save(UNet(**TINY, num_classes=5).state_dict(), tmp_path / "classes.pt")
    with pytest.raises(GenrepError, match="unexpected keys label_emb.weight") as e:
        load_unet_state(unet, tmp_path / "classes.pt")
    one_line(e)

    state = unet.state_dict()
    del state["out.2.bias"]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(GenrepError, match="missing keys out.2.bias") as e:
        load_unet_state(unet, tmp_path / "short.pt")
    one_line(e)

    cases = {
        "list.pt": ([1, 2], "holds a value of type list"),
        "nested.pt": ({"model": unet.state_dict()}, "entry 'model' is not a tensor"),
        "pickled.pt": (unet, "plain state dict"),  # a whole pickled model: weights_only refuses it
    }
    for file, (obj, match) in cases.items():
        torch.save(obj, tmp_path / file)
        with pytest.raises(GenrepError, match=match) as e:
            load_unet_state(unet, tmp_path / file)
        one_line(e)
    assert "genrep.nn.unet.UNet" in str(e.value)  # names what the pickle holds
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GenrepError, match="plain state dict") as e:
        load_unet_state(unet, tmp_path / "garbage.pt")
    one_line(e)
    with pytest.raises(GenrepError, match="no U-Net weights file"):
        load_unet_state(unet, tmp_path / "absent.pt")


def _reference_attention(block, x, legacy):
    """guided-diffusion's QKVAttentionLegacy / QKVAttention math, with einsum and explicit softmax."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h * w)
    qkv = block.qkv(torch.nn.functional.group_norm(x, 32, block.norm.weight, block.norm.bias))
    heads, ch = block.num_heads, c // block.num_heads
    if legacy:  # heads first: each head's [q; k; v] is contiguous
        q, k, v = qkv.reshape(b * heads, 3 * ch, h * w).split(ch, dim=1)
    else:  # q, k, v first, then heads
        q, k, v = (z.reshape(b * heads, ch, h * w) for z in qkv.chunk(3, dim=1))
    scale = ch ** -0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
    return (x + block.proj_out(a)).reshape(b, c, h, w)


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_matches_the_einsum_reference(legacy):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16, use_new_attention_order=not legacy)
    torch.nn.init.normal_(block.proj_out.weight, std=0.2)  # zero-initialised: would hide the attention
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(block(x), _reference_attention(block, x, legacy), rtol=1e-5, atol=1e-5)
    assert block.num_heads == 4


def test_activations_stop_at_the_last_block_asked(monkeypatch):
    unet = _tiny()
    x, t, _ = _inputs(unet)

    def refuse(*args):
        raise AssertionError("ran a block after the last one asked for")

    monkeypatch.setattr(unet.middle_block, "forward", refuse)
    for block in unet.output_blocks:
        monkeypatch.setattr(block, "forward", refuse)
    acts = unet.activations(x, t, [2, 1])
    assert sorted(acts) == [1, 2] and acts[2].shape == (2, 32, 16, 16)
    last_encoder = len(unet.input_blocks)
    assert unet.activations(x, t, [last_encoder])[last_encoder].shape == (2, 64, 8, 8)


def test_low_precision_and_channels_last():
    unet = _tiny(**CONFIGS["resblock-updown-new-order"])
    x, t, _ = _inputs(unet)
    reference = unet(x, t)
    last = unet.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(last, reference, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = unet(x, t)
    half = unet.to(torch.bfloat16)(x.bfloat16(), t)
    assert auto.dtype == half.dtype == torch.bfloat16
    for out in (auto, half):
        torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_timestep_embedding_and_defaults():
    t = torch.tensor([0.0, 10.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    args = t[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], 1))
    assert default_channel_mult(256) == ADM_256_UNCOND["channel_mult"]
    assert default_channel_mult(512)[0] == 0.5
    with pytest.raises(GenrepError, match="give channel_mult explicitly") as e:
        default_channel_mult(96)
    one_line(e)
    with pytest.raises(GenrepError, match="attention resolution 6"):
        UNet(**{**TINY, "attention_resolutions": (6,)})
