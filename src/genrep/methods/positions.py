"""Positional encodings of a ViT-based method, as one config key (the DARL paper's table 1): decomposed 2D RoPE,
1D RoPE over the sequence, a learned or sin-cos absolute embedding, or none; and reading trained weights at another
image size, RoPE positions interpolated to the trained patch grid (section 3.4). DARL and the supervised ViT take
them; ``nn.rope`` and ``nn.vit`` hold the mechanics.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GenrepError
from ..fields import setting
from .base import ViTConfig

POSITIONS = ("rope2d", "rope1d", "learned", "sincos", "none")
# 1D RoPE's base (Su et al.); the DARL paper names the base max_wavelength (appendix D) without its value, and 10000
# is that name's default in the JAX implementations it comes from. rope-vit's axial 2D RoPE uses 100
ROPE_BASE = 10000.0


@dataclass
class PositionsConfig(ViTConfig):
    pos_embed: str = setting("learned", choices=POSITIONS)
    # RoPE positions interpolated to the patch grid they were trained on (0: this data's grid): a run trained at 224 px
    # (14x14 patches) read at 384 px with --model.rope_grid 14 sees every position inside the trained range
    rope_grid: int = setting(0, min=0, max=65536)
    # RoPE's frequencies theta_i = rope_base ** (-2i / d) per axis. Refused unless RoPE is on (as rope_grid), not
    # declared only_if: the supervised ViT's default positions are learned and its keys are all read by default
    rope_base: float = setting(ROPE_BASE, above=1, max=1e12)

    def validate(self, section: str) -> None:
        super().validate(section)
        head = self.dim // self.num_heads
        need = {"rope2d": 4, "rope1d": 2}.get(self.pos_embed)
        if need and head % need:
            raise GenrepError(f"{section}.pos_embed {self.pos_embed} rotates "
                              f"{'a row half and a column half of ' if need == 4 else ''}channel pairs: the head "
                              f"width {section}.dim / {section}.num_heads = {head} must be divisible by {need}")
        if self.rope_grid and not self.pos_embed.startswith("rope"):
            raise GenrepError(f"{section}.rope_grid interpolates RoPE positions; {section}.pos_embed {self.pos_embed} "
                              f"has none: set {section}.rope_grid 0")
        if self.rope_base != ROPE_BASE and not self.pos_embed.startswith("rope"):
            raise GenrepError(f"{section}.rope_base sets RoPE's frequencies; {section}.pos_embed {self.pos_embed} has "
                              f"no RoPE: leave {section}.rope_base at {ROPE_BASE:g}")


def vit_positions(cfg: PositionsConfig) -> dict:
    """The ``nn.vit.ViT`` keywords of ``cfg``'s positions."""
    return {"pos_embed": cfg.pos_embed if cfg.pos_embed in ("learned", "sincos") else "none",
            "rope": {"rope2d": "2d", "rope1d": "1d"}.get(cfg.pos_embed), "rope_grid": cfg.rope_grid,
            "rope_base": cfg.rope_base}


def position_parameters(cfg: PositionsConfig, prefix: str = "encoder.") -> set[str]:
    """The learned position embedding's parameter name, if ``cfg`` has one (out of weight decay)."""
    return {f"{prefix}pos_embed.pos"} if cfg.pos_embed == "learned" else set()


def size_options(cfg: PositionsConfig, trained: int, size: int) -> dict:
    """``Method.size_options`` of a method whose only tie to the image size is its positions."""
    if cfg.pos_embed in ("learned", "sincos"):
        grid = trained // cfg.patch_size
        raise GenrepError(f"model.pos_embed {cfg.pos_embed} gives absolute positions on the {grid}x{grid} patch grid "
                          f"of the trained {trained}x{trained} images; a run read at another image size needs "
                          f"model.pos_embed rope2d, rope1d or none")
    if size % cfg.patch_size:
        raise GenrepError(f"data.image_size {size} is not a multiple of model.patch_size {cfg.patch_size}; "
                          f"choose a multiple of {cfg.patch_size}")
    # a run trained with interpolated positions (rope_grid set) keeps its range
    return {"rope_grid": cfg.rope_grid or trained // cfg.patch_size} if cfg.pos_embed.startswith("rope") else {}
