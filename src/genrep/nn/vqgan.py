"""VQGAN (Esser et al. 2021; CompVis/taming-transformers ``VQModel``) in our own code, as a frozen patch tokenizer.

GVP's tokenizer is VQGAN (section 4.1, section 5: ``vqgan_imagenet_f16_1024``). Module and parameter names follow
taming's ``VQModel`` exactly (``encoder.down.1.block.0.norm1.weight``, ``quantize.embedding.weight``,
``quant_conv``, ``post_quant_conv``), so the ``state_dict`` of a taming checkpoint loads as it is;
``load_vqgan_state`` checks it first and says in one line what differs. Only the parts a tokenizer runs are built:
no loss, no discriminator (their ``loss.*`` entries are dropped), no dropout (a frozen part runs in eval mode).

The architecture (``VQGANArch``) is taming's ``ddconfig`` plus ``n_embed`` and ``embed_dim``; its defaults are
``vqgan_imagenet_f16_1024``'s ``model.yaml``. As in taming, ``resolution`` only decides where the attention
blocks sit (the levels whose nominal side is in ``attn_resolutions``); the network is convolutional and reads any
image whose side the downsampling ``2 ** (len(ch_mult) - 1)`` divides.

Images: taming trains on [-1, 1] pixels and decodes to them; ``encode`` and ``decode`` take and give [0, 1], like
every genrep tokenizer. Both run in float32 even under autocast, so a reader's targets do not depend on its precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenrepError, library_warnings
from .state_files import check_state, refusal_reason

__all__ = ["VQGAN", "VQGANArch", "VQGAN_IMAGENET_F16_1024", "arch_problem", "load_vqgan_state"]

GROUPS = 32  # taming's Normalize: GroupNorm(32 groups, eps 1e-6)
IGNORED_PREFIXES = ("loss.",)  # VQModel's LPIPS and discriminator: training only


@dataclass(frozen=True)
class VQGANArch:
    n_embed: int = 1024  # codebook size
    embed_dim: int = 256  # width of a code vector
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # len - 1 halvings: f = 16
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQGAN_IMAGENET_F16_1024 = VQGANArch()


def arch_problem(arch: VQGANArch, prefix: str = "") -> str | None:
    """Why ``arch`` cannot be built (None: it can); ``prefix`` names its keys in the message (``model.vqgan_``)."""
    bad = [c for c in (arch.ch * m for m in arch.ch_mult) if c % GROUPS]
    if bad:
        return (f"{prefix}ch {arch.ch} x {prefix}ch_mult {list(arch.ch_mult)} gives a level of {bad[0]} channels, "
                f"which GroupNorm cannot split into {GROUPS} groups; choose widths that are multiples of {GROUPS}")
    return None


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


def _conv3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """norm, swish, conv, norm, swish, conv, plus the input (through a 1x1 convolution where the width changes)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), _conv3(c_in, c_out)
        self.norm2, self.conv2 = _norm(c_out), _conv3(c_out, c_out)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of the map, the channels as the head's width."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, hw, C]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks, each followed by attention where the level has it."""

    def __init__(self, c_in: int, c_out: int, blocks: int, attention: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(blocks if attention else 0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(
            channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, a: VQGANArch):
        super().__init__()
        self.conv_in = _conv3(a.in_channels, a.ch)
        self.down = nn.ModuleList()
        c, side = a.ch, a.resolution
        for level, mult in enumerate(a.ch_mult):
            stage = Level(c, a.ch * mult, a.num_res_blocks, side in a.attn_resolutions)
            c = a.ch * mult
            if level != len(a.ch_mult) - 1:
                stage.downsample = Downsample(c)
                side //= 2
            self.down.append(stage)
        self.mid = Middle(c)
        self.norm_out = _norm(c)
        self.conv_out = _conv3(c, a.z_channels)  # taming's double_z False: a VQ model's z has one half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, a: VQGANArch):
        super().__init__()
        levels = len(a.ch_mult)
        c, side = a.ch * a.ch_mult[-1], a.resolution // 2 ** (levels - 1)
        self.conv_in = _conv3(a.z_channels, c)
        self.mid = Middle(c)
        up: list[Level] = [None] * levels  # indexed by level, built from the coarsest, as taming's up.insert(0, ...)
        for level in reversed(range(levels)):
            stage = Level(c, a.ch * a.ch_mult[level], a.num_res_blocks + 1, side in a.attn_resolutions)
            c = a.ch * a.ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(c)
                side *= 2
            up[level] = stage
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c)
        self.conv_out = _conv3(c, a.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """taming's VectorQuantizer2 at read time: the codebook and the nearest code (no remapping, no loss)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The index of the nearest code of each row of ``z`` [M, D] by squared distance, taming's expansion."""
        e = self.embedding.weight
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
        return d.argmin(1)


class VQGAN(nn.Module):
    """A taming VQModel's tokenizer: the ``PatchTokenizer`` members (``methods/tokenizers.py``)."""

    def __init__(self, arch: VQGANArch = VQGAN_IMAGENET_F16_1024):
        super().__init__()
        why = arch_problem(arch)
        if why:
            raise GenrepError(why)
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        self.quantize = Quantizer(arch.n_embed, arch.embed_dim)
        self.quant_conv = nn.Conv2d(arch.z_channels, arch.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(arch.embed_dim, arch.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.arch.n_embed

    @property
    def downsample(self) -> int:
        return self.arch.downsample

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> codes [B, (H/f) * (W/f)] in raster order."""
        with torch.autocast(x.device.type, enabled=False):
            z = self.quant_conv(self.encoder(x.float() * 2 - 1))
            codes = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        return codes.view(len(x), -1)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] -> their codebook vectors [B, N, D]."""
        return self.quantize.embedding.weight[codes]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] (raster order on a square grid) -> images [B, C, H, W] in [0, 1]."""
        side = math.isqrt(codes.shape[1])
        if side * side != codes.shape[1]:
            raise GenrepError(f"{codes.shape[1]} codes do not make a square grid; decode takes the codes of a "
                              f"square image in raster order")
        with torch.autocast(codes.device.type, enabled=False):
            z = self.code_vectors(codes).view(len(codes), side, side, -1).permute(0, 3, 1, 2)
            y = self.decoder(self.post_quant_conv(z))
        return ((y + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------- reading a taming checkpoint

class _LightningKey:
    """What a Lightning callback's class becomes when read: taming's ``last.ckpt`` keys each callback's saved
    state by the callback's class (a pickled global), beside the weights. The read maps only those names here (a
    class that does nothing and takes no arguments), so the weights-only reader need not refuse the whole file
    for a dictionary key, and Lightning is never imported. A file that makes an instance of one is refused."""

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        raise TypeError("a Lightning callback class is read only as the key of its saved state")


_CALLBACK_MODULES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")


def _callback_keys(path: Path) -> list[tuple[type, str]]:
    """The Lightning callback classes the file names (read from its pickle's opcodes, nothing executed), each
    mapped to ``_LightningKey``; none for a file torch's scan cannot read (the load then says why)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy or broken file: torch.load's own refusal is the message
        return []
    return [(_LightningKey, name) for name in names if name.startswith(_CALLBACK_MODULES)]


def _read_weights_only(path: Path) -> object:
    try:
        with library_warnings(), torch.serialization.safe_globals(_callback_keys(path)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise GenrepError(f"no VQGAN checkpoint file {path}") from e
    except Exception as e:  # noqa: BLE001 -- a foreign file fails the unpickler in many ways, each the file's fault
        raise GenrepError(f"cannot read {path} as a VQGAN checkpoint with torch.load(weights_only=True) "
                          f"({refusal_reason(e)}); "
                          "give taming-transformers' last.ckpt ({'state_dict': ...}) or a plain state dict of its "
                          "VQModel (names to tensors), not a pickled model") from e


def load_vqgan_state(model: VQGAN, path: str | Path, hint: str = "") -> None:
    """Load taming's ``last.ckpt`` (``{"state_dict": ...}`` with VQModel's names) or a plain state dict into
    ``model``. Only tensors and plain containers are unpickled (weights-only; Lightning's callback keys read as a
    stand-in, see ``_LightningKey``); the loss's entries are dropped; names and shapes are checked against the
    model first, so a checkpoint of another configuration is one line naming up to three of each difference (then
    ``hint``: how to describe the checkpoint's architecture)."""
    path = Path(path)
    state = _read_weights_only(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise GenrepError(f"{path} holds a value of type {type(state).__name__}; expected taming's checkpoint "
                          "({'state_dict': ...}) or a state dict (parameter names to tensors) of a VQModel")
    state = {k: v for k, v in state.items() if not (isinstance(k, str) and k.startswith(IGNORED_PREFIXES))}
    check_state(state, model.state_dict(), path, entry_hint="VQModel's parameter names to tensors",
                mismatch="the file is not a VQGAN of this configuration", hint=hint)
    model.load_state_dict(state, strict=True)
