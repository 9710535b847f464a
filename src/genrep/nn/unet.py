"""ADM's U-Net (Dhariwal & Nichol 2021, openai/guided-diffusion ``UNetModel``) in our own code.

Module and parameter names follow guided-diffusion's exactly (``input_blocks.3.0.in_layers.2.weight``, ...),
so a published state dict such as ``256x256_diffusion_uncond.pt`` loads with ``load_state_dict(strict=True)``;
``load_unet_state`` checks the file against the configuration first and says what differs in one line.

The blocks are numbered 1..num_blocks in forward order (encoder blocks, the middle block, decoder blocks),
which is how representation papers name the layer they read (``activations``, ``block_shapes``).

Precision: GroupNorm is computed in float32 and cast back, as guided-diffusion's GroupNorm32 does; every
other layer runs in the input's dtype, so the model works under bf16 autocast or cast to bf16.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenrepError, library_warnings
from .embeddings import timestep_embedding  # guided-diffusion's layout: [cos | sin], max_period 10000
from .state_files import check_state, refusal_reason

__all__ = ["ADM_256_UNCOND", "UNet", "default_channel_mult", "load_unet_state", "timestep_embedding"]

# create_model's defaults in guided-diffusion's script_util.py, by image size
_DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                         64: (1, 2, 3, 4)}

# 256x256_diffusion_uncond.pt: the README's flags (--attention_resolutions 32,16,8 --learn_sigma True
# --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True
# --use_scale_shift_norm True); num_heads is script_util's default, unused since num_head_channels is set.
ADM_256_UNCOND: dict = dict(
    image_size=256, in_channels=3, model_channels=256, out_channels=6, num_res_blocks=2,
    attention_resolutions=(32, 16, 8), channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0, num_classes=None,
    num_heads=4, num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
    use_new_attention_order=False, conv_resample=True,
)


def default_channel_mult(image_size: int) -> tuple[int, ...]:
    """guided-diffusion's channel multipliers for a published image size (create_model, channel_mult="")."""
    if image_size not in _DEFAULT_CHANNEL_MULT:
        sizes = ", ".join(str(s) for s in sorted(_DEFAULT_CHANNEL_MULT))
        raise GenrepError(f"guided-diffusion defines no default channel_mult for image size {image_size} "
                          f"(only {sizes}); give channel_mult explicitly")
    return _DEFAULT_CHANNEL_MULT[image_size]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) computed in float32 and cast back: bf16 statistics over large maps are too coarse."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weights cast too, so a model converted to bf16 still normalises in float32
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a residual branch's last layer, so each block starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _resample(x: torch.Tensor, direction: str | None) -> torch.Tensor:
    """The parameter-free up/down sampling shared by Upsample/Downsample and the up/down ResBlocks."""
    if direction == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if direction == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class ResBlock(nn.Module):
    """ADM's residual block, conditioned on the embedding ``emb`` (timestep, plus the class when given).

    ``direction`` "up"/"down" resamples both branches in the middle of the block (BigGAN-style, ADM's
    resblock_updown); the resampling has no parameters, so the state dict is that of a plain block.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = True, direction: str | None = None, use_conv: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.direction = direction
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        # scale-shift (FiLM) needs a scale and a shift per channel, the additive form one bias per channel
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3 if use_conv else 1,
                                             padding=1 if use_conv else 0)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.direction:
            # resample after norm+SiLU and before the conv, so the conv runs at the new resolution
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](_resample(h, self.direction))
            x = _resample(x, self.direction)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions, with a residual connection.

    guided-diffusion's fused ``qkv`` (Conv1d C -> 3C) is laid out per head in the legacy order
    ([q_h, k_h, v_h] for each head h) and per tensor in the new order ([q | k | v], each split into heads);
    the layout decides how a trained checkpoint's weights are read, so both are kept.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"attention width {channels} is not a multiple of num_head_channels "
                                 f"{num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.use_new_attention_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        x = x.reshape(b, c, height * width)
        qkv = self.qkv(self.norm(x))  # [B, 3C, L]
        heads, length = self.num_heads, height * width
        if self.use_new_attention_order:
            q, k, v = qkv.reshape(b, 3, heads, c // heads, length).unbind(1)
        else:
            q, k, v = qkv.reshape(b, heads, 3 * c // heads, length).chunk(3, dim=2)
        # [B, heads, ch, L] -> [B, heads, L, ch] for the fused kernel; its default scale is 1/sqrt(ch), the
        # same as guided-diffusion's 1/ch**0.25 applied to both q and k
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, length)  # heads back to contiguous channel groups
        return (x + self.proj_out(out)).reshape(b, c, height, width)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (``conv``) when conv_resample."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resample(x, "up")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """A stride-2 3x3 conv (``op``) when conv_resample, else 2x2 average pooling (no parameters)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resample(x, "down") if self.op is None else self.op(x)


class EmbedSequential(nn.Sequential):
    """A sequence of layers where the ResBlocks also take the embedding (guided-diffusion's
    TimestepEmbedSequential; the indices give the state dict's ``input_blocks.<i>.<j>`` names)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """ADM's U-Net: ``forward(x, t, y=None)`` is the denoiser output ([B, out_channels, H, W]).

    ``attention_resolutions`` are resolutions (e.g. (32, 16, 8) on 256 images), as guided-diffusion's command
    line gives them; ``channel_mult`` entries may be fractions (0.5 for 512 images): a level has
    int(mult * model_channels) channels. ``num_heads_upsample`` -1 means num_heads.
    """

    def __init__(self, *, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: tuple[int, ...], channel_mult: tuple[int, ...],
                 dropout: float = 0.0, num_classes: int | None = None, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = True,
                 resblock_updown: bool = False, use_new_attention_order: bool = False,
                 conv_resample: bool = True):
        super().__init__()
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            # odd sizes round differently in the encoder and decoder and the skips would not concatenate
            raise GenrepError(f"image_size {image_size} is not divisible by 2**{levels - 1}, which "
                              f"{levels} channel_mult levels need")
        resolutions = [image_size >> level for level in range(levels)]
        for res in attention_resolutions:
            if res not in resolutions:
                raise GenrepError(f"attention resolution {res} is not one of the U-Net's resolutions "
                                  f"{', '.join(map(str, resolutions))}")
        attention_ds = {image_size // res for res in attention_resolutions}
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes = model_channels, num_classes

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res_block(ch_in: int, ch_out: int, direction: str | None = None) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, direction)

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        # Encoder. skip_chans: the channels each encoder block hands to the decoder; shapes: (channels,
        # spatial size) after every block, in forward order.
        ch = int(channel_mult[0] * model_channels)
        ds = 1
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans, shapes = [ch], [(ch, image_size)]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
                shapes.append((ch, image_size // ds))
            if level != levels - 1:
                down = res_block(ch, ch, "down") if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(EmbedSequential(down))
                ds *= 2
                skip_chans.append(ch)
                shapes.append((ch, image_size // ds))

        self.middle_block = EmbedSequential(res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch))
        shapes.append((ch, image_size // ds))

        # Decoder: num_res_blocks + 1 blocks per level, each taking one skip; the last of a level upsamples
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, "up") if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
                shapes.append((ch, image_size // ds))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))
        self._block_shapes = shapes

    @property
    def num_blocks(self) -> int:
        return len(self.input_blocks) + 1 + len(self.output_blocks)

    def block_shapes(self) -> list[tuple[int, int]]:
        """(channels, spatial size) of the activation after block b, at index b - 1 (image_size inputs)."""
        return list(self._block_shapes)

    def _embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if (y is None) != (self.num_classes is None):
            raise ValueError("give labels y if and only if the U-Net is class-conditional "
                             f"(num_classes={self.num_classes})")
        dtype = self.time_embed[0].weight.dtype  # float32 sinusoids into a model that may be cast to bf16
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        return emb if y is None else emb + self.label_emb(y)

    def _run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, last: int,
             keep: set[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks 1..last; return the activation after ``last`` and those after the blocks in ``keep``."""
        emb = self._embed(t, y)
        steps = ([(block, "push") for block in self.input_blocks] + [(self.middle_block, None)]
                 + [(block, "pop") for block in self.output_blocks])
        h, skips, kept = x, [], {}
        for b, (block, skip) in enumerate(steps[:last], start=1):
            if skip == "pop":
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
            if skip == "push":
                skips.append(h)
            if b in keep:
                kept[b] = h
        return h, kept

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy images x [B, in_channels, H, W], steps t [B] (labels y [B]) -> [B, out_channels, H, W]."""
        h, _ = self._run(x, t, y, self.num_blocks, set())
        return self.out(h)

    def activations(self, x: torch.Tensor, t: torch.Tensor, blocks: Iterable[int],
                    y: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """The activation after each requested block (1-based, forward order; a decoder block's is its output,
        after the skip concatenation and the block). The forward stops at the largest block asked for."""
        blocks = set(blocks)
        bad = sorted(b for b in blocks if not 1 <= b <= self.num_blocks)
        if bad or not blocks:
            raise GenrepError(f"U-Net blocks are numbered 1..{self.num_blocks}, got "
                              f"{', '.join(map(str, bad)) if bad else 'none'}")
        return self._run(x, t, y, max(blocks), blocks)[1]


def load_unet_state(unet: UNet, path: str | Path) -> None:
    """Load a plain state dict (e.g. guided-diffusion's 256x256_diffusion_uncond.pt) into ``unet``.

    Only tensors are unpickled (weights_only), so a file from elsewhere cannot run code. The keys and shapes
    are checked before loading, so a file of another configuration is a one-line error naming what differs.
    """
    try:
        with library_warnings():  # torch warns of a legacy pickle's protocol just before it refuses the file
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise GenrepError(f"no U-Net weights file {path}") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise GenrepError(f"cannot read {path} as a plain state dict with torch.load(weights_only=True) "
                          f"({refusal_reason(e)}); a plain state dict (module.state_dict(), names to tensors) is "
                          "needed, not a pickled model") from e

    if not isinstance(state, Mapping):
        raise GenrepError(f"{path} holds a value of type {type(state).__name__}; expected a state dict "
                          "(a mapping of parameter names to tensors) of the U-Net")
    check_state(state, unet.state_dict(), path, entry_hint="a state dict (a mapping of parameter names to tensors) "
                "of the U-Net", mismatch="the file is not a state dict of this configuration")
    unet.load_state_dict(state, strict=True)

