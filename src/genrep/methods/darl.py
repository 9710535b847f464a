"""DARL (Denoising Autoregressive Representation Learning): a causal ViT that predicts the next patch.

The patches, in a chosen order (``model.order``: raster, nested raster or round-robin over ``block`` x ``block``
blocks, section 4.4), behind a start-of-sequence token, go through a ViT with causal attention (the fused
``is_causal`` kernels, never a materialised mask), so the output at step k has seen the patches before k only and
predicts patch k. Positions (``model.pos_embed``, table 1): decomposed 2D RoPE (the paper's), 1D RoPE over the
sequence, or an absolute embedding (learned, sin-cos) or none.

Patch decoders (section 3.1-3.3, table 2):
- ``mse``: a linear layer to the patch's pixels, MSE (``norm_pix``: MAE's per-patch normalised target, appendix B.2);
- ``diffusion``: ``decoder_depth`` transformer blocks (no mask; one by default, the paper's choice after table 2) over
  two tokens, the backbone's output and the embedding of the patch corrupted to noise level gamma (x_s = sqrt(gamma)
  x_0 + sqrt(1 - gamma) eps, every patch with its own gamma ~ Beta(a, b), a = 0.03, b = 1 by default), predicting the
  clean patch (x_0, the paper's choice) or the noise; or (``decoder_net: mlp``) a residual MLP of that depth on the
  sum of the two. ``gamma_conditioning``: the decoder is not told gamma (``none``, the default: table 2's best with
  one block, kept thereafter), or, as section 4.1 does it, gamma is "added as a channel to the noise corrupted image
  patch and linearly projected" (``channel``; appendix F's generation model), or a sinusoidal embedding of gamma and
  an MLP are added to the corrupted patch's token as a DDPM denoiser is told its step (``embedding``, genrep's own).

Initialisation (``init``): MAE's (``xavier``, table 8; ``nn.vit.mae_init``), or timm's trunc-normal with std 0.02 for
the backbone and the decoder and Xavier for the head (``trunc_normal``, the runs before issue 27).

Random order (``order: random``) is the paper's two-stream (XLNet) variant: the content stream is the causal
sequence itself, permuted per sample (appendix A.5: the permuted tokens are fed, the masks stay the same), and a
query stream of a learnable token at the next patch's position reads the content before it; the two share every
weight (``nn.two_stream``). A fixed order runs through the same model with ``two_stream`` (figure 6 compares raster
and random order both so). The query says which patch it predicts only through its position: a random order needs
2D RoPE (appendix A.5) or absolute positions, and is refused with 1D RoPE (the place in the sequence, the same for
every order) or none.

Read-outs: any block, mean-pooled over the patch tokens or the last token, with the causal mask (the paper's linear
evaluation) or without (``causal_mask`` off: table 3's fine-tuning options), the patches in the trained fixed order
(raster for a random-order model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import AUGMENTATIONS
from ..errors import GenrepError
from ..fields import setting
from ..nn.attention import causal_mask
from ..nn.embeddings import TimestepEmbedder
from ..nn.flops import linear_flops, transformer_block_flops
from ..nn.orderings import ORDERINGS, patch_order
from ..nn.patch import patchify, unpatchify
from ..nn.transformer import Block, ResidualMlp
from ..nn.two_stream import two_streams
from ..nn.vit import ViT, _init_weights, mae_init
from .base import TINY_VIT, DataSpec, Method, check_vit_shape
from .positions import POSITIONS, PositionsConfig, position_parameters, size_options, vit_positions
from .registry import register

DECODERS = ("diffusion", "mse")
DECODER_NETS = ("transformer", "mlp")
GAMMA_CONDITIONINGS = ("none", "channel", "embedding")
INITS = ("xavier", "trunc_normal")
SAMPLE_GRIDS = ("cosine", "linear")
GAMMA_SCALE = 1000.0  # gamma in [0, 1] is embedded like a DDPM step in [0, 1000)


@dataclass
class DARLConfig(PositionsConfig):
    # table 1's positional encodings: decomposed 2D RoPE (the paper's), 1D RoPE over the sequence, absolute ones
    pos_embed: str = setting("rope2d", choices=POSITIONS)
    decoder: str = setting("diffusion", choices=DECODERS)
    # each target patch normalised by its own mean and variance (MAE's option)
    norm_pix: bool = setting(False, only_if={"decoder": "mse"})
    # what the decoder predicts (section 3.3)
    prediction: str = setting("x0", choices=("x0", "eps"), only_if={"decoder": "diffusion"})
    # gamma ~ Beta(a, b) per patch (figure 3)
    beta_a: float = setting(0.03, above=0, max=1000, only_if={"decoder": "diffusion"})
    beta_b: float = setting(1.0, above=0, max=1000, only_if={"decoder": "diffusion"})
    # how the decoder is told gamma (table 2): not at all (the paper's choice with one block), as a channel of the
    # corrupted patch (section 4.1, appendix F), or by a sinusoidal embedding and an MLP (genrep's own)
    gamma_conditioning: str = setting("none", choices=GAMMA_CONDITIONINGS, only_if={"decoder": "diffusion"})
    # table 2's denoising decoders: transformer blocks over the two tokens, or a residual MLP on their sum
    decoder_net: str = setting("transformer", choices=DECODER_NETS, only_if={"decoder": "diffusion"})
    decoder_depth: int = setting(1, min=1, max=8, only_if={"decoder": "diffusion"})  # table 2: 1, 2, 4, 8
    # xavier: MAE's initialisation (table 8); trunc_normal: std 0.02 but a Xavier head (runs before issue 27)
    init: str = setting("xavier", choices=INITS)
    order: str = setting("raster", choices=ORDERINGS + ("random",))  # section 4.4; random: the two-stream variant
    # a fixed order through the two-stream model (figure 6); a random order always is
    two_stream: bool = setting(False, only_if={"order": ORDERINGS})
    # a block's side in patches (2, 4, 8)
    block: int = setting(2, min=1, max=4096, only_if={"order": ("nested", "round_robin")})
    feature_pool: str = setting("mean", choices=("mean", "last"))  # the default read-out (table 3)
    # sample, complete: each patch of the denoising decoder by the reverse process over sample_steps noise levels
    # (DDIM, or DDPM's ancestral steps, on a cosine or linear grid of gamma, see ``reverse_levels``; appendix F:
    # ddpm, linear, 1000 steps); the MSE decoder gives its mean
    sampler: str = setting("ddim", choices=("ddim", "ddpm"))
    sample_grid: str = setting("cosine", choices=SAMPLE_GRIDS)
    sample_steps: int = setting(50, min=1, max=100000)
    cache: bool = True  # fixed orders decode with a key/value cache (false: recompute the sequence at every patch)
    # the training view: none, or crop (random resized crop and flip: table 8's "spatial" augmentation, MAE's)
    augment: str = setting("none", choices=tuple(a for a in AUGMENTATIONS if a != "classifier"))

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.norm_pix and self.decoder != "mse":
            raise GenrepError(f"{section}.norm_pix normalises the MSE decoder's targets; with {section}.decoder "
                              f"{self.decoder} set it false")
        if self.order == "random" and self.pos_embed in ("rope1d", "none"):
            given = "only its place in the sequence, the same whatever the order" if self.pos_embed == "rope1d" \
                else "no position"
            raise GenrepError(f"{section}.order random: the query stream learns which patch it predicts from its "
                              f"position, and {section}.pos_embed {self.pos_embed} gives it {given}; choose "
                              f"{section}.pos_embed rope2d (appendix A.5), learned or sincos")


@register
class DARL(Method):
    name = "darl"
    config_class = DARLConfig
    feature_pools = ("mean", "last")
    feature_options = ("rope_grid",)  # another resolution's read-out, on trained weights
    causal_readout = True
    capabilities = frozenset({"sample", "complete"})
    capability_options: ClassVar[dict[str, tuple[str, ...]]] = {
        "sample": ("sampler", "sample_grid", "sample_steps", "cache"),
        "complete": ("sampler", "sample_grid", "sample_steps", "cache")}
    tiny_config = {**TINY_VIT, "patch_size": 2}

    @classmethod
    def size_options(cls, cfg: DARLConfig, trained: int, size: int) -> dict:
        """Section 3.4: RoPE positions are interpolated to the trained patch grid; no positions need nothing."""
        return size_options(cfg, trained, size)

    def __init__(self, cfg: DARLConfig, data: DataSpec):
        super().__init__(cfg, data)
        check_vit_shape(cfg, data)
        self.grid = data.image_size // cfg.patch_size
        self.T = self.grid * self.grid
        self.patch_dim = cfg.patch_size ** 2 * data.channels
        self.encoder = ViT(data.image_size, cfg.patch_size, data.channels, cfg.dim, cfg.depth, cfg.num_heads,
                           cfg.mlp_ratio, cls_token=True, drop=cfg.drop, drop_path=cfg.drop_path,
                           **vit_positions(cfg))  # the CLS token is the start-of-sequence token
        with torch.device("cpu"):  # also when the model is sized on the meta device
            order = patch_order("raster" if cfg.order == "random" else cfg.order, self.grid, cfg.block)
        self.register_buffer("order", order, persistent=False)
        self.two_stream = cfg.order == "random" or cfg.two_stream
        if self.two_stream:
            self.query_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
            nn.init.trunc_normal_(self.query_token, std=0.02)
        if cfg.decoder == "mse":
            self.head = nn.Linear(cfg.dim, self.patch_dim)
        else:
            # the channel: gamma at every pixel of the patch, in patchify's (p, p, C + 1) layout
            pixels = cfg.patch_size ** 2 if cfg.gamma_conditioning == "channel" else 0
            self.noisy_embed = nn.Linear(self.patch_dim + pixels, cfg.dim)
            self.gamma_embed = TimestepEmbedder(cfg.dim) if cfg.gamma_conditioning == "embedding" else None
            layer = (lambda: Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, drop=cfg.drop)) \
                if cfg.decoder_net == "transformer" else (lambda: ResidualMlp(cfg.dim, cfg.mlp_ratio, cfg.drop))
            self.decoder_blocks = nn.ModuleList(layer() for _ in range(cfg.decoder_depth))
            self.decoder_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
            self.head = nn.Linear(cfg.dim, self.patch_dim)
            if cfg.init == "trunc_normal":  # the embedding's MLP kept PyTorch's default
                for m in (self.noisy_embed, self.decoder_blocks, self.decoder_norm):
                    m.apply(_init_weights)
        if cfg.init == "xavier":
            tokens = [self.encoder.cls_token] + ([self.query_token] if self.two_stream else [])
            mae_init(self, tuple(tokens) + ((self.encoder.pos_embed.pos,) if cfg.pos_embed == "learned" else ()))
        else:
            nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a run before issue 27 named its one decoder block decoder_block
        old = prefix + "decoder_block."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[f"{prefix}decoder_blocks.0.{key[len(old):]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- what the loop delivers
    def views(self) -> dict[str, str]:
        return {"image": self.cfg.augment}

    def random_inputs(self) -> dict[str, tuple[str, object]]:
        out: dict[str, tuple[str, object]] = {}
        if self.cfg.decoder == "diffusion":
            out["noise"] = ("normal", "image")
            out["gamma"] = ("beta", (self.cfg.beta_a, self.cfg.beta_b, (self.T,)))
        if self.cfg.order == "random":
            out["order"] = ("permutation", self.T)
        return out

    # ---- the sequence
    def _positions(self, order: torch.Tensor, start: bool) -> torch.Tensor | None:
        """RoPE positions of the tokens [SOS?, patch order[0], ...]: 2D (row + 1, col + 1) with the start token at
        (0, 0), as ``RoPE2D.token_positions``; 1D the place in the sequence."""
        rope = self.encoder.rope
        if rope is None:
            return None
        n = order.shape[-1] + int(start)
        if rope.ndim == 1:
            return rope.interpolate(torch.arange(n, device=order.device), self.cfg.rope_grid, self.grid)
        layout = rope.token_positions(self.grid, 1, order.device)  # [1 + T, 2]: the start token, then raster
        index = order + 1
        if start:
            index = torch.cat([index.new_zeros(*order.shape[:-1], 1), index], -1)
        return rope.interpolate(layout[index], self.cfg.rope_grid, self.grid)

    def _tokens(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """The patch embeddings [B, T, D] (absolute positions added at each patch's place) in ``order`` ([T] or
        [B, T])."""
        tokens = self.encoder.pos_embed(self.encoder.patch_embed(self.normalize(x)))
        index = order.expand(len(x), -1)
        return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))

    def _start(self, B: int) -> torch.Tensor:
        return self.encoder.cls_token.expand(B, -1, -1)

    def backbone(self, x: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D]: row k is what predicts the k-th patch of the order (the fixed one, or ``order`` [B, T] for a
        random-order model) from the patches before it: the causal sequence's output, or the query stream's."""
        B = len(x)
        if not self.two_stream:
            seq = self._tokens(x, self.order)[:, :-1]
            h = torch.cat([self._start(B), seq], 1)
            return self.encoder.forward_tokens(h, is_causal=True, positions=self._positions(self.order[:-1], True))
        order = self.order.expand(B, -1) if order is None else order
        h = torch.cat([self._start(B), self._tokens(x, order)], 1)
        g = self.query_token.repeat(B, self.T, 1)  # not a view: the FLOP counter's hooks need a fresh tensor
        if self.encoder.pos_embed.kind != "none":  # the query's place: the next patch's absolute position
            g = g + self.encoder.pos_embed.pos.expand(B, -1, -1).gather(1, order[..., None].expand(-1, -1, g.shape[-1]))
        positions = self._positions(order, True)
        # query k sits where the patch it predicts sits: content token k + 1
        query_positions = None if positions is None else positions[:, 1:] if positions.ndim == 3 else positions[1:]
        # query k reads the start token and the patches before k: the first k + 1 content tokens
        _, g = two_streams(self.encoder.blocks, h, g, content_causal=True, query_mask=causal_mask(
            self.T, self.T + 1, device=x.device), rope=self.encoder.rope, positions=positions,
            query_positions=query_positions)
        return self.encoder.norm(g)

    # ---- decoders
    def decode(self, z: torch.Tensor, noisy: torch.Tensor | None = None, gamma: torch.Tensor | None = None
               ) -> torch.Tensor:
        """The patch decoder: backbone rows z [B, T, D] -> patches [B, T, P] (MSE: the prediction; diffusion: x_0
        or eps of ``noisy`` [B, T, P] at noise levels ``gamma`` [B, T])."""
        if self.cfg.decoder == "mse":
            return self.head(z)
        B, T, D = z.shape
        if self.cfg.gamma_conditioning == "channel":
            pixels = noisy.view(B, T, -1, self.data.channels)
            level = gamma.to(noisy.dtype).view(B, T, 1, 1).expand(-1, -1, pixels.shape[2], 1)
            noisy = torch.cat([pixels, level], -1).view(B, T, -1)
        e = self.noisy_embed(noisy)
        if self.gamma_embed is not None:
            e = e + self.gamma_embed(gamma.reshape(-1) * GAMMA_SCALE).view(B, T, D)
        if self.cfg.decoder_net == "mlp":  # the paper does not say how its MLP joins the two inputs: their sum
            h = z + e
            for layer in self.decoder_blocks:
                h = layer(h)
            return self.head(self.decoder_norm(h))
        pair = torch.stack([z, e], 2).view(B * T, 2, D)  # each patch its own two-token sequence
        for block in self.decoder_blocks:
            pair = block(pair)
        return self.head(self.decoder_norm(pair[:, 1])).view(B, T, -1)

    def _patches(self, images: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> its patches [B, T, P] in ``order``."""
        patches = patchify(images, self.cfg.patch_size)
        return patches.gather(1, order.expand(len(images), -1)[..., None].expand(-1, -1, patches.shape[-1]))

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["image"]
        order = batch["order"] if self.cfg.order == "random" else self.order
        z = self.backbone(x, order if self.cfg.order == "random" else None)
        x0 = self._patches(self.normalize(x), order)
        if self.cfg.decoder == "mse":
            target = x0
            if self.cfg.norm_pix:
                target = (x0 - x0.mean(-1, keepdim=True)) / (x0.var(-1, keepdim=True) + 1e-6).sqrt()
            mse = (self.decode(z).float() - target.float()).pow(2).mean()
            return {"loss": mse, "mse": mse.detach()}
        eps, gamma = self._patches(batch["noise"], order), batch["gamma"]  # gamma: one per step, independent
        g = gamma[..., None].to(x0.dtype)
        noisy = g.sqrt() * x0 + (1 - g).sqrt() * eps
        pred = self.decode(z, noisy, gamma)
        target = x0 if self.cfg.prediction == "x0" else eps
        diff = (pred.float() - target.float()).pow(2).mean()
        return {"loss": diff, "diffusion": diff.detach()}

    # ---- representation
    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    @property
    def default_pool(self) -> str:
        return self.cfg.feature_pool

    def _read(self, x: torch.Tensor, layer: int, hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        h = torch.cat([self._start(len(x)), self._tokens(x, self.order)], 1)
        return self.encoder.forward_tokens(h, layer, is_causal=self.causal_mask, hidden=hidden,
                                           positions=self._positions(self.order, True))

    @staticmethod
    def _pool(h: torch.Tensor, pool: str) -> torch.Tensor:
        return h[:, 1:].mean(1) if pool == "mean" else h[:, -1]

    def features(self, x: torch.Tensor, layer: int | None = None, pool: str | None = None) -> torch.Tensor:
        layer, pool = self.check_feature_args(layer, pool)
        return self._pool(self._read(x, layer), pool)

    def feature_sets(self, x: torch.Tensor, reads: list[tuple[int, str]]) -> list[torch.Tensor]:
        reads = [self.check_feature_args(layer, pool) for layer, pool in reads]
        hidden: list[torch.Tensor] = []
        last = self._read(x, max(layer for layer, _ in reads), hidden)
        hidden[-1] = last
        return [self._pool(hidden[layer - 1], pool) for layer, pool in reads]

    # ---- generation
    def capability_settings(self, capability: str) -> dict:
        out = super().capability_settings(capability)
        if self.cfg.decoder == "mse":  # the mean: no reverse process
            out = {"decoder": "mse (the predicted mean)", "cache": out["cache"]}
        if self.cfg.order == "random":
            out["order"] = "raster (a random-order model decodes in raster order, without a cache)"
        elif self.two_stream:
            out["cache"] = "off (the two-stream model's query stream decodes without a cache)"
        return out

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        d = self.data
        blank = torch.zeros(n, d.channels, d.image_size, d.image_size, device=self.encoder.cls_token.device)
        return self.complete(blank, torch.zeros_like(blank[:, :1], dtype=torch.bool), generator=generator,
                             progress=progress)

    @torch.no_grad()
    def complete(self, x: torch.Tensor, keep: torch.Tensor, *, generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Patch by patch in the model's order (raster for a random-order model): a patch whose pixels are all given
        is taken as given, any other is the decoder's prediction from the patches before it (figure 7: the top half
        given, the bottom half sampled). Given pixels come back unchanged."""
        C = x.shape[1]
        out = unpatchify(self.generate(x, keep, generator=generator, progress=progress), self.cfg.patch_size, C)
        return torch.where(keep.expand(-1, C, -1, -1), x, ((out + 1) / 2).clamp(0, 1))

    @torch.no_grad()
    def generate(self, x: torch.Tensor, keep: torch.Tensor, *, generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor:
        """``complete``'s patches [B, T, P] in raster order, in the model's [-1, 1] scale, not clamped."""
        B, C = x.shape[:2]
        order = self.order
        given = self._patches(keep.expand(-1, C, -1, -1).float(), order).amin(-1) > 0.5  # [B, T] in order
        patches = self._patches(self.normalize(x), order)
        steps = range(self.T)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"{self.name}: {B} images, {self.T} patches", leave=False, disable=None)
        cache = self.encoder.new_cache(self.T) if not self.two_stream and self.cfg.cache else None
        positions = self._positions(order, True)
        for k in steps:
            if cache is not None:  # the new token: the start token, or the patch decided at step k - 1
                token = self._start(B) if k == 0 else self._embed_patches(patches[:, k - 1:k], order[k - 1:k])
                z = self.encoder.forward_tokens(token, is_causal=True, positions=positions[k:k + 1], cache=cache)[:, 0]
            else:
                images = unpatchify(self._to_raster(patches, order), self.cfg.patch_size, C)
                z = self.backbone((images + 1) / 2)[:, k]
            new = self._decode_patch(z, generator)
            patches[:, k] = torch.where(given[:, k, None], patches[:, k], new)
        return self._to_raster(patches, order)

    @staticmethod
    def _to_raster(patches: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Patches [B, T, P] in ``order`` -> in raster order."""
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
        return patches.gather(1, inverse[None, :, None].expand(patches.shape[0], -1, patches.shape[-1]))

    def _embed_patches(self, patches: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Patch vectors [B, n, P] (patchify's layout) at raster places ``where`` [n] -> tokens [B, n, D], as the
        patch embedding and the absolute positions make them from an image."""
        conv = self.encoder.patch_embed.proj
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (p, p, C) as patchify orders
        tokens = F.linear(patches, weight, conv.bias)
        if self.encoder.pos_embed.kind != "none":
            tokens = tokens + self.encoder.pos_embed.pos[:, where]
        return tokens

    def reverse_levels(self) -> torch.Tensor:
        """The noise levels the reverse process visits, float64 [sample_steps + 1], from gamma = 0 (pure noise) to 1
        (clean) at u = 0, 1/S, ..., 1: the cosine grid gamma = sin^2(pi/2 u), or the linear one gamma = u (appendix F:
        "step size 0.001, that is T = 1000", for a decoder trained on Beta(1, 1)). Training drew gamma from Beta(a, b)
        over all of (0, 1), so any grid stays where the decoder was trained; the cosine one spends its steps at both
        ends, where a Beta with a < 1 or b < 1 puts its mass."""
        u = torch.linspace(0, 1, self.cfg.sample_steps + 1, dtype=torch.float64)
        return u if self.cfg.sample_grid == "linear" else torch.sin(math.pi / 2 * u) ** 2

    def _decode_patch(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One patch [B, P] (in [-1, 1]) from its backbone row z [B, D]: the MSE decoder's mean, or the denoising
        decoder's reverse process from pure noise (DDIM, or DDPM's stochastic steps, on ``reverse_levels``)."""
        B = z.shape[0]
        if self.cfg.decoder == "mse":
            return self.head(z).float()
        levels = self.reverse_levels()
        x = torch.randn(B, self.patch_dim, generator=generator, dtype=torch.float64).to(z.device, torch.float32)
        x0 = x
        for i in range(len(levels) - 1):
            g, g_next = float(levels[i]), float(levels[i + 1])
            gamma = torch.full((B, 1), g, device=z.device)
            pred = self.decode(z[:, None], x[:, None], gamma)[:, 0].float()
            if self.cfg.prediction == "x0":
                x0 = pred
                eps = (x - math.sqrt(g) * x0) / math.sqrt(1 - g)
            else:
                eps = pred
                x0 = (x - math.sqrt(1 - g) * eps) / math.sqrt(max(g, 1e-4))  # gamma 0: the prediction is pure noise
            if g_next >= 1:
                break
            # DDPM's ancestral step, the posterior q(x' | x, x_0) of appendix E eq. 4 with x_0 predicted:
            # sigma^2 = (1 - g') / (1 - g) (1 - g / g')
            if self.cfg.sampler == "ddpm":
                var = (1 - g_next) / (1 - g) * (1 - g / g_next)
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device, x.dtype)
                x = math.sqrt(g_next) * x0 + math.sqrt(max(1 - g_next - var, 0.0)) * eps + math.sqrt(var) * noise
            else:
                x = math.sqrt(g_next) * x0 + math.sqrt(1 - g_next) * eps
        return x0

    # ---- optimisation hints
    def no_weight_decay(self) -> set[str]:
        names = {"encoder.cls_token"} | ({"query_token"} if self.two_stream else set())
        return names | position_parameters(self.cfg)

    def flops_per_image(self) -> int:
        c = self.cfg
        if self.two_stream:  # the two streams' uneven shapes: counted, not derived
            return super().flops_per_image()
        T, D, P = self.T, c.dim, self.patch_dim
        flops = linear_flops(T, P, D) + c.depth * transformer_block_flops(T, D, c.mlp_ratio)
        if c.decoder == "diffusion":
            flops += linear_flops(T, self.noisy_embed.in_features, D)
            if c.decoder_net == "transformer":
                flops += c.decoder_depth * T * transformer_block_flops(2, D, c.mlp_ratio)
            else:
                hidden = int(D * c.mlp_ratio)
                flops += c.decoder_depth * (linear_flops(T, D, hidden) + linear_flops(T, hidden, D))
            if self.gamma_embed is not None:
                flops += linear_flops(T, self.gamma_embed.freq_dim, D) + linear_flops(T, D, D)
        return flops + linear_flops(T, D, P)
