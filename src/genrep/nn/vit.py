"""A ViT encoder (timm/DeiT layout) whose every layer can be read out for probes.

Positions: an absolute embedding added to the tokens (``pos_embed``: learned, sincos or none) and/or
rotary positions in every attention (``rope``: None, 1d or 2d; see ``rope.py`` for where the CLS token
sits). Masks, causality, a KV cache and a conditioning embedding go through ``forward`` to the blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import PositionEmbedding
from .kv_cache import KVCache
from .patch import PatchEmbed
from .pooling import MAP_POOL, is_map_pool, pool_feature_map
from .rope import make_rope
from .transformer import Block

POOLS = ("cls", "mean", "last")


class ViT(nn.Module):
    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, cls_token: bool = True, pos_embed: str = "learned", drop: float = 0.0,
                 rope: str | None = None, rope_base: float = 10000.0, drop_path: float = 0.0, rope_grid: int = 0):
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, dim)
        self.num_prefix = 1 if cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = PositionEmbedding(self.patch_embed.num_patches, dim, pos_embed)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, drop=drop, drop_path=rate)
                                    for rate in drop_path_rates(drop_path, depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dim, self.depth = dim, depth
        self.rope = make_rope(rope, dim // num_heads, rope_base)  # no state: the state dict is unchanged
        self.rope_grid = rope_grid  # the patch grid RoPE positions are interpolated to (0: this one)
        # optional per-block maps of a conditioning embedding to (scale, shift); a subclass sets them. They
        # live here and not in the blocks so DenoiserViT's checkpoint keys stay `modulations.{i}`.
        self.modulations: nn.ModuleList | None = None
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(self.patch_embed(x))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def check_layer(self, layer: int | None) -> int:
        layer = self.depth if layer is None else layer
        if not 1 <= layer <= self.depth:
            raise ValueError(f"layer must be in 1..{self.depth}, got {layer}")
        return layer

    def forward(self, x: torch.Tensor, layer: int | None = None, *, is_causal: bool = False,
                mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens of images x [B, C, H, W] after block ``layer`` (1-based; None or depth: the last block, then
        the final norm). The keywords: see ``forward_tokens``."""
        layer = self.check_layer(layer)
        return self.forward_tokens(self.tokens(x), layer, is_causal=is_causal, mask=mask, positions=positions,
                                   cache=cache, cond=cond)

    def forward_tokens(self, h: torch.Tensor, layer: int | None = None, *, is_causal: bool = False,
                       mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                       cache: list[KVCache] | None = None, cond: torch.Tensor | None = None,
                       hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The blocks (and the final norm after the last one) on embedded tokens h [B, n, D].

        ``is_causal`` / ``mask``: see ``Attention``. ``positions``: RoPE positions of the n tokens; by
        default the layout of ``tokens()`` (``rope.token_positions``) from the cache offset on. ``cache``: one
        ``KVCache`` per block (``new_cache``), for decoding a few tokens at a time. ``cond`` [B_c, E]: the
        conditioning embedding the blocks' modulations map to scale and shift (the last B_c rows). ``hidden``: a
        list each block's output is appended to (``hidden_states``).
        """
        layer = self.check_layer(layer)
        if cache is not None and len(cache) != self.depth:
            raise ValueError(f"cache must hold one KVCache per block ({self.depth}), got {len(cache)}")
        if cond is not None and self.modulations is None:
            raise ValueError("cond given to a ViT without modulations; only a conditioned ViT (DenoiserViT) "
                             "takes it")
        if self.rope is not None and positions is None:
            positions = self._rope_positions(h.shape[1], cache[0].length if cache is not None else 0, h.device)
        for i, block in enumerate(self.blocks[:layer]):
            h = block(h, is_causal=is_causal, mask=mask, rope=self.rope, positions=positions,
                      cache=None if cache is None else cache[i], cond=cond,
                      modulation=None if self.modulations is None else self.modulations[i])
            if hidden is not None:
                hidden.append(h)
        return self.norm(h) if layer == self.depth else h

    def hidden_states(self, x: torch.Tensor, upto: int, *, cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Tokens after each block 1..``upto`` of one pass (the last block's after the final norm, as ``forward``
        gives it): every read-out of a layer sweep for the price of the deepest."""
        out: list[torch.Tensor] = []
        last = self.forward_tokens(self.tokens(x), upto, cond=cond, hidden=out)
        out[-1] = last  # after the final norm when ``upto`` is the last block
        return out

    def _rope_positions(self, n: int, offset: int, device: torch.device) -> torch.Tensor:
        grid = self.patch_embed.grid
        layout = self.rope.interpolate(self.rope.token_positions(grid, self.num_prefix, device), self.rope_grid, grid)
        if offset + n > layout.shape[0]:
            raise ValueError(f"tokens {offset}..{offset + n - 1} run past the ViT's {layout.shape[0]} tokens; "
                             f"pass positions= for longer sequences")
        return layout[offset:offset + n]

    def new_cache(self, max_len: int | None = None) -> list[KVCache]:
        """One empty ``KVCache`` per block, for up to ``max_len`` tokens (default: the prefix and every patch)."""
        return [KVCache(max_len or self.num_prefix + self.patch_embed.num_patches) for _ in self.blocks]

    def token_map(self, h: torch.Tensor) -> torch.Tensor:
        """Tokens [B, prefix + N, D] -> the patch tokens on their grid, [B, D, g, g] (a feature map)."""
        g = self.patch_embed.grid
        return h[:, self.num_prefix:].transpose(1, 2).reshape(h.shape[0], -1, g, g)

    def pool(self, h: torch.Tensor, pool: str) -> torch.Tensor:
        """Tokens -> a feature: the CLS token, the mean or last patch token, or the patch grid as a map
        ('map', or 'p': its p x p average pool)."""
        if is_map_pool(pool):
            return pool_feature_map(self.token_map(h), pool)
        if pool == "cls":
            if self.cls_token is None:
                raise ValueError("pool 'cls' needs a CLS token; this model has none (use 'mean')")
            return h[:, 0]
        if pool == "mean":
            return h[:, self.num_prefix:].mean(dim=1)
        if pool == "last":
            return h[:, -1]
        raise ValueError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}, {MAP_POOL} or a size p")


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The stochastic-depth rate of each block: ``rate`` in every one. The HybViT paper's code
    (sndnyang/Diffusion_ViT, models/vit.py) builds a single ``DropPath(stochastic_depth)`` in its Transformer
    and applies it in all ``depth`` blocks, not timm/DeiT's linear ramp ``torch.linspace(0, rate, depth)``."""
    return [rate] * depth


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):  # patch embedding: initialise like a linear layer (MAE)
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        nn.init.zeros_(m.bias)


def mae_init(module: nn.Module, tokens: tuple[nn.Parameter, ...] = ()) -> None:
    """MAE's initialisation (facebookresearch/mae models_mae.py, ``initialize_weights`` and ``_init_weights``, after
    the JAX ViT), in its order: each patch embedding's convolution Xavier-uniform on its weight flattened to a linear
    layer's (its bias drawn as PyTorch's default, which MAE leaves it at), the learned ``tokens`` normal with std 0.02
    (MAE: "timm's trunc_normal_(std=.02) is effectively normal_(std=0.02)"), then every Linear Xavier-uniform with a
    zero bias and every LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
            nn.init.xavier_uniform_(m.weight.data.view(m.weight.shape[0], -1))
    for token in tokens:
        nn.init.normal_(token, std=0.02)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
