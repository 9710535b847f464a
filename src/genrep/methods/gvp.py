"""GVP (Generative Visual Pretraining): autoregressive and masked modeling in one ViT through two-stream attention
and universal causal masks (section 4; masks in ``nn/gvp_masks.py``, the streams in ``nn/two_stream.py``).

A step draws, per sample (or per batch, ``model.segment_per``), an index order z and group boundaries
n_0 < ... < n_K = T; group k is predicted from the condition tokens (a CLS token), the context G_0 and the groups
before it (eq. 6). The content stream h starts from the embedded tokens plus their positions, the query stream g from
a learnable vector w plus the position of the token it predicts (section 4.1 writes w alone; see below); g's last
layer goes through a linear head to the target: the patch's pixels (p2p, MSE; MAE's per-patch normalisation with
``model.norm_pix``), or a tokenizer's code of the patch (p2d: pixels in; d2d: codes in and out; cross-entropy). The
tokenizer, a frozen part, is a genrep run folder (``model.tokenizer``: a ``vq`` run) or, as in the paper, a
taming-transformers VQGAN checkpoint (``model.vqgan``, its architecture the ``vqgan_*`` keys; ``tokenizers.py``,
``nn/vqgan.py``). The condition tokens are a CLS token and, with ``model.condition`` (appendix E's y_extra), a
trained genrep run's pooled features of the image, projected.

The fast path (``mask_layout: permuted``, the default): the tokens are permuted into factorisation order (each
keeping its original position embedding), where the masks are block-causal and, with one segmentation per batch,
one [N, N] mask shared by the batch (SDPA's fused masked kernels; one stream with one token per group and a single
condition token is plain ``is_causal``). ``mask_layout: direct`` builds eq. 12's per-sample masks in the original
order: the same loss (tested), kept as the reference.

Table 10's ablations are options: ``segmentation: masked`` (K = 1: MAE-like masked modeling at ``mask_ratio``),
``streams: one`` (causal masks without the query stream: next-token prediction in the random order, where an output
does not know which position it predicts; it needs ``segmentation: autoregressive``), ``segmentation: fixed``,
``random``, ``mixed`` (section 3.2, appendix B; the paper's default, K = 20).

Read-outs: the content stream over the image in raster order, with the causal mask of the raster order and the
fixed-length segmentation with K groups (``causal_mask`` on: the paper's linear probe keeps it) or without any mask
(fine-tuning drops it), after any block, pooled (CLS, mean, or the patch grid). The paper does not say which order
or segmentation its probe's mask uses; the raster order with fixed-length groups is deterministic, which a read-out
must be. Under that mask the CLS token, a condition token, attends only to the condition tokens and the context
G_0 (editing any later patch changes it by 0.0), so pool ``cls`` with the mask on is refused in one line and left out
of the poolings a probe sweep reads; with the mask off (fine-tuning) it reads the whole image.

The query stream's start departs from section 4.1's text, which writes G^(0) = [w; w; ...; w] (w alone): the
position embedding of the token a query predicts is added to w (as XLNet's query stream, whose relative positions
tell each query where it is). It is required: every token of one group attends to the same content keys and
values, so with w alone their queries stay equal through every layer and the whole group gets one prediction
(tested).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import AUGMENTATIONS
from ..errors import GenrepError
from ..fields import setting
from ..nn.embeddings import PositionEmbedding
from ..nn.flops import linear_flops, transformer_block_flops
from ..nn.gvp_masks import (boundaries_from_cuts, fixed_length_boundaries, masks_from_levels, mixed_length_from_uniform,
                            permute_tokens, token_levels, unpermute_tokens)
from ..nn.patch import PatchEmbed, patchify, unpatchify
from ..nn.pooling import is_map_pool, pool_feature_map
from ..nn.two_stream import TwoStreamTransformer
from ..nn.vqgan import VQGAN_IMAGENET_F16_1024, VQGANArch, arch_problem
from .base import TINY_VIT, DataSpec, Method, ViTConfig, check_vit_shape
from .registry import register

TARGETS = ("p2p", "p2d", "d2d")
SEGMENTATIONS = ("mixed", "random", "fixed", "masked", "autoregressive")


@dataclass
class GVPConfig(ViTConfig):
    # p2p: pixels in, pixels out (MSE); p2d: pixels in, a tokenizer's codes out; d2d: codes in and out (cross-entropy)
    target: str = setting("p2p", choices=TARGETS)
    # the training view: none, or crop (MAE's random resized crop 0.2-1 and flip, the paper's ImageNet augmentation)
    augment: str = setting("none", choices=tuple(a for a in AUGMENTATIONS if a != "classifier"))
    # each target patch normalised by its own mean and variance (MAE's option)
    norm_pix: bool = setting(False, only_if={"target": "p2p"})
    tokenizer: str = ""     # p2d, d2d: a tokenizer run folder (genrep pretrain --recipe vq-digits)
    # p2d, d2d instead of tokenizer: a taming-transformers VQGAN checkpoint (the paper's tokenizer, section 4.1:
    # vqgan_imagenet_f16_1024's ckpts/last.ckpt), read as a frozen part; its architecture is the vqgan_* keys
    # (defaults: that checkpoint's model.yaml), its input channels the data's
    vqgan: str = ""
    vqgan_n_embed: int = setting(VQGAN_IMAGENET_F16_1024.n_embed, min=2, max=1 << 20)
    vqgan_embed_dim: int = setting(VQGAN_IMAGENET_F16_1024.embed_dim, min=1, max=1 << 16)
    vqgan_ch: int = setting(VQGAN_IMAGENET_F16_1024.ch, min=1, max=1 << 16)
    vqgan_ch_mult: list[int] = setting(list(VQGAN_IMAGENET_F16_1024.ch_mult), min=1, max=64, nonempty=True)
    vqgan_num_res_blocks: int = setting(VQGAN_IMAGENET_F16_1024.num_res_blocks, min=1, max=64)
    vqgan_attn_resolutions: list[int] = setting(list(VQGAN_IMAGENET_F16_1024.attn_resolutions), min=1, max=1 << 20)
    vqgan_z_channels: int = setting(VQGAN_IMAGENET_F16_1024.z_channels, min=1, max=1 << 16)
    # the side the VQGAN was built for: it only places the attention blocks (levels whose side is listed above)
    vqgan_resolution: int = setting(VQGAN_IMAGENET_F16_1024.resolution, min=1, max=1 << 20)
    # y_extra (appendix E): a trained genrep run whose features (its default read-out) of the image, projected to
    # the width, are a second condition token after the CLS token; "" = the CLS token alone (section 5)
    condition: str = ""
    order: str = setting("random", choices=("random", "raster"))  # z: uniform over permutations, or raster (table 3)
    # how the T tokens are cut into the context G_0 and K groups (section 3.2, table 4); masked: K = 1 with
    # round(mask_ratio * T) tokens predicted at once (table 10's pure masked modeling); autoregressive: one token per
    # group (K = T, n_0 = 0)
    segmentation: str = setting("mixed", choices=SEGMENTATIONS)
    groups: int = setting(20, min=1, max=1 << 20, only_if={"segmentation": ("fixed", "random", "mixed")})  # K
    # n_{K-1} = round(p T), p ~ N(mean, std)
    mixed_mean: float = setting(0.5, above=0, below=1, only_if={"segmentation": "mixed"})
    mixed_std: float = setting(0.1, min=0, max=1, only_if={"segmentation": "mixed"})
    # the fraction of tokens predicted
    mask_ratio: float = setting(0.75, above=0, below=1, only_if={"segmentation": "masked"})
    # one segmentation per batch (one mask the whole batch shares: the fused kernels' fast path) or per sample; the
    # paper does not say which it draws
    segment_per: str = setting("batch", choices=("batch", "sample"))
    streams: str = setting("two", choices=("two", "one"))  # one: table 10's "+causal masks" without two streams
    mask_layout: str = setting("permuted", choices=("permuted", "direct"))  # direct: eq. 12's masks, the reference
    feature_pool: str = setting("mean", choices=("mean", "cls"))  # the default read-out
    # complete: the hidden tokens are generated in this many groups (appendix F), each from the given and the earlier
    # generated ones; codes are drawn at this temperature (0: the most likely code)
    complete_groups: int = setting(4, min=1, max=1 << 20)
    temperature: float = setting(0.0, min=0, max=100)

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.target != "p2p" and not self.tokenizer and not self.vqgan:
            raise GenrepError(f"{section}.target {self.target} predicts a tokenizer's codes; train one (genrep pretrain "
                              f"--recipe vq-digits --out runs/vq-digits) and pass --{section}.tokenizer runs/vq-digits, "
                              f"or give a taming-transformers VQGAN checkpoint with --{section}.vqgan PATH/last.ckpt")
        if self.tokenizer and self.vqgan:
            raise GenrepError(f"{section}.tokenizer and {section}.vqgan both name a tokenizer; give one of them")
        for name in ("tokenizer", "vqgan"):
            if self.target == "p2p" and getattr(self, name):
                raise GenrepError(f"{section}.{name} is read only by the p2d and d2d targets; {section}.target p2p "
                                  f"predicts pixels: drop {section}.{name} or choose --{section}.target p2d")
        if self.vqgan:
            arch = self.vqgan_arch(1)
            why = arch_problem(arch, f"{section}.vqgan_")
            if why:
                raise GenrepError(why)
            f = arch.downsample
            if self.patch_size != f:
                n = len(self.vqgan_ch_mult)
                raise GenrepError(f"{section}.vqgan gives one code per {f}x{f} pixels ({section}.vqgan_ch_mult has "
                                  f"{n} entries: {n - 1} halvings), but {section}.patch_size is {self.patch_size}: a "
                                  f"code per patch needs --{section}.patch_size {f}")
        if self.norm_pix and self.target != "p2p":
            raise GenrepError(f"{section}.norm_pix normalises pixel targets; {section}.target {self.target} predicts "
                              f"codes: set {section}.norm_pix false")
        if self.streams == "one" and self.segmentation != "autoregressive":
            raise GenrepError(f"{section}.streams one predicts each token from the output of the token before it, "
                              f"which needs one token per group: set --{section}.segmentation autoregressive")

    def vqgan_arch(self, channels: int) -> VQGANArch:
        """The ``vqgan_*`` keys as the VQGAN's architecture, for images of ``channels`` channels."""
        return VQGANArch(n_embed=self.vqgan_n_embed, embed_dim=self.vqgan_embed_dim, ch=self.vqgan_ch,
                         ch_mult=tuple(self.vqgan_ch_mult), num_res_blocks=self.vqgan_num_res_blocks,
                         attn_resolutions=tuple(self.vqgan_attn_resolutions), z_channels=self.vqgan_z_channels,
                         resolution=self.vqgan_resolution, in_channels=channels)


VQGAN_KEYS = tuple(f.name for f in fields(GVPConfig) if f.name.startswith("vqgan_"))


def segment_count(cfg: GVPConfig, T: int) -> tuple[int, int | None]:
    """(K, n_0 or None when it is drawn) of the configured segmentation on T tokens, checked against T."""
    seg, K = cfg.segmentation, cfg.groups
    if seg == "autoregressive":
        return T, 0
    if seg == "masked":
        predicted = round(cfg.mask_ratio * T)
        if not 1 <= predicted <= T - 1:
            raise GenrepError(f"model.mask_ratio {cfg.mask_ratio:g} of the {T} tokens predicts {predicted}; choose a "
                              f"ratio that leaves at least one token given and one predicted")
        return 1, T - predicted
    limit = T if seg == "fixed" else T - 1  # random and mixed draw n_0 >= 1
    if K > limit:
        raise GenrepError(f"model.groups K = {K} is larger than the {T} tokens allow for the {seg}-length "
                          f"segmentation; choose K in 1..{limit}")
    return K, (None if seg in ("random", "mixed") else T // (K + 1))  # fixed length: n_0 = floor(T / (K + 1))


@register
class GVP(Method):
    name = "gvp"
    config_class = GVPConfig
    capabilities = frozenset({"complete"})
    feature_maps = True  # the content stream's patch tokens on their grid
    causal_readout = True
    capability_options: ClassVar[dict[str, tuple[str, ...]]] = {"complete": ("complete_groups", "temperature")}
    tiny_config = {**TINY_VIT, "patch_size": 2, "groups": 4}

    def __init__(self, cfg: GVPConfig, data: DataSpec):
        super().__init__(cfg, data)
        check_vit_shape(cfg, data)
        self.grid = data.image_size // cfg.patch_size
        self.T = self.grid * self.grid
        self.K, _ = segment_count(cfg, self.T)
        self.patch_dim = cfg.patch_size ** 2 * data.channels
        self.tokenizer = None
        if cfg.target != "p2p":
            self._load_tokenizer(cfg, data)
        self.condition_model = None
        self.S = 1  # condition tokens: the CLS token, and y_extra with model.condition
        if cfg.condition:
            self.condition_proj = nn.Linear(self._load_condition(cfg, data), cfg.dim)
            self.S = 2
        if cfg.target == "d2d":
            self.code_embed = nn.Embedding(self.tokenizer.codebook_size, cfg.dim)
            nn.init.trunc_normal_(self.code_embed.weight, std=0.02)
        else:
            self.patch_embed = PatchEmbed(data.image_size, cfg.patch_size, data.channels, cfg.dim)
            nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(cfg.dim, -1))
            nn.init.zeros_(self.patch_embed.proj.bias)
        self.pos_embed = PositionEmbedding(self.T, cfg.dim, cfg.pos_embed)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.query_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))  # w, the query stream's start
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.query_token, std=0.02)
        self.net = TwoStreamTransformer(cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.drop, cfg.drop_path)
        out = self.patch_dim if cfg.target == "p2p" else self.tokenizer.codebook_size
        self.head = nn.Linear(cfg.dim, out)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.device("cpu"):  # checked integers, also when the model is built on the meta device to size it
            fixed = self._fixed_boundaries()
            readout = fixed if fixed is not None else fixed_length_boundaries(self.T, self.K)
        self.register_buffer("fixed_bounds", readout if fixed is None else fixed, persistent=False)
        self.register_buffer("readout_bounds", readout, persistent=False)

    def _load_tokenizer(self, cfg: GVPConfig, data: DataSpec) -> None:
        from .tokenizers import load_tokenizer, load_vqgan

        key = "model.vqgan" if cfg.vqgan else "model.tokenizer"
        if cfg.vqgan:
            module, source = load_vqgan(cfg.vqgan, cfg.vqgan_arch(data.channels), data, key)
        else:
            module, source = load_tokenizer(cfg.tokenizer, data, key=key)
        if module.downsample != cfg.patch_size:
            raise GenrepError(f"{key} {cfg.vqgan or cfg.tokenizer} gives one code per {module.downsample}x"
                              f"{module.downsample} pixels, but model.patch_size is {cfg.patch_size}: a code per patch "
                              f"needs --model.patch_size {module.downsample} or a tokenizer with downsample "
                              f"{cfg.patch_size}")
        self.freeze("tokenizer", module, source)

    @classmethod
    def inert_keys(cls, cfg: GVPConfig) -> dict[str, str]:
        out = super().inert_keys(cfg)
        if not cfg.vqgan:
            out.update({k: f"model.{k} is read only with model.vqgan (a VQGAN checkpoint), which is not set"
                        for k in VQGAN_KEYS})
        return out

    def _load_condition(self, cfg: GVPConfig, data: DataSpec) -> int:
        """Hold the run ``model.condition`` as the frozen part ``condition_model``; its feature width."""
        from ..runs import load_frozen_run

        _, model, weights = load_frozen_run(cfg.condition, data, "model.condition", "the trained run folder whose "
                                            "features condition GVP (appendix E)", real=True)
        with torch.no_grad(), torch.device("cpu"):  # run for its width, also while this model is sized on meta
            width = model.features(torch.zeros(1, data.channels, data.image_size, data.image_size)).shape[-1]
        self.freeze("condition_model", model, weights)
        return width

    def _conditions(self, x: torch.Tensor) -> torch.Tensor:
        """The S condition tokens [B, S, D]: the CLS token, then y_extra (the frozen run's projected features)."""
        cls = self.cls_token.expand(len(x), -1, -1)
        if self.condition_model is None:
            return cls
        with torch.no_grad():
            extra = self.condition_model.features(x)
        return torch.cat([cls, self.condition_proj(extra.float())[:, None]], 1)

    def _fixed_boundaries(self) -> torch.Tensor | None:
        seg, T = self.cfg.segmentation, self.T
        if seg == "autoregressive":
            return fixed_length_boundaries(T, T)
        if seg == "masked":
            _, n0 = segment_count(self.cfg, T)
            return torch.tensor([n0, T])
        if seg == "fixed":
            return fixed_length_boundaries(T, self.K)
        return None

    # ---- what the loop delivers
    def views(self) -> dict[str, str]:
        return {"image": self.cfg.augment}

    def random_inputs(self) -> dict[str, tuple[str, object]]:
        cfg, T = self.cfg, self.T
        out: dict[str, tuple[str, object]] = {}
        if cfg.order == "random":
            out["order"] = ("permutation", T)
        if cfg.segmentation == "random":
            out["cuts"] = ("boundaries", (T, self.K))
        elif cfg.segmentation == "mixed":
            out["cuts"] = ("uniform", (T,))
        if "cuts" in out and cfg.segment_per == "batch":
            out["cuts"] = ("shared", out["cuts"])
        return out

    def boundaries(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """n_0 < ... < n_K = T of this step: ``[1, K+1]`` when the batch shares them, else ``[B, K+1]``."""
        cfg = self.cfg
        if cfg.segmentation in ("random", "mixed"):
            cuts = batch["cuts"]
            if cfg.segment_per == "batch":  # every row holds the one draw
                cuts = cuts[:1]
            if cfg.segmentation == "random":
                return boundaries_from_cuts(cuts, self.T)
            return mixed_length_from_uniform(cuts, self.T, self.K, cfg.mixed_mean, cfg.mixed_std)
        return self.fixed_bounds[None]

    # ---- tokens
    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(self.normalize(x), self.cfg.patch_size)

    def _embed(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens [B, T, D] in raster order with their position embeddings."""
        if self.cfg.target == "d2d":
            tokens = self.code_embed(self.tokenizer.encode(x) if codes is None else codes)
        else:
            tokens = self.patch_embed(self.normalize(x))
        return self.pos_embed(tokens)

    def _queries(self, B: int) -> torch.Tensor:
        """The query stream's start [B, S+T, D]: w, plus the position of the token it predicts."""
        pos = self.pos_embed(self.query_token.new_zeros(1, self.T, self.cfg.dim)) + self.query_token
        return torch.cat([self.query_token.expand(1, self.S, -1), pos], 1).expand(B, -1, -1)

    def _targets(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.target != "p2p":
            return self.tokenizer.encode(x)
        target = self._patches(x)
        if self.cfg.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def _token_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token loss [B, T]: the patch's MSE, or the code's cross-entropy."""
        if self.cfg.target == "p2p":
            return (pred.float() - target.float()).pow(2).mean(-1)
        return F.cross_entropy(pred.float().transpose(1, 2), target, reduction="none")

    # ---- training
    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["image"]
        pred, levels, target = self._forward(x, batch.get("order"), self.boundaries(batch))
        predicted = (levels[:, self.S:] > 0).float()  # the targets: every token of groups 1..K
        per_token = self._token_loss(pred, target)
        # a mean per image, then over images: micro-batches and processes then average to the same loss
        loss = ((per_token * predicted).sum(1) / predicted.sum(1)).mean()
        term = "mse" if self.cfg.target == "p2p" else "ce"
        return {"loss": loss, term: loss.detach(), "predicted": predicted.sum(1).mean().detach()}

    def _forward(self, x: torch.Tensor, order: torch.Tensor | None, bounds: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predictions [B, T, out], levels [B or 1, S+T], targets [B, T, ...]), all three in factorisation order
        (``mask_layout: permuted``) or all in the original order (``direct``)."""
        B, S = len(x), self.S
        permuted = self.cfg.mask_layout == "permuted"
        tokens, target = self._embed(x), self._targets(x)
        if order is not None and permuted:  # factorisation order; each token keeps its position embedding
            tokens, target = permute_tokens(tokens, order), permute_tokens(target, order)
        levels = token_levels(S, self.T, None if permuted or order is None else order, bounds)
        h = torch.cat([self._conditions(x), tokens], 1)
        if self.cfg.streams == "one":
            return self._one_stream(h, levels, None if permuted else order), levels, target
        g = self._queries(B)
        if order is not None and permuted:
            g = permute_tokens(g, order, leading=S)
        content, query = masks_from_levels(levels)
        _, g = self.net(h, g, content_mask=_sdpa_mask(content), query_mask=_sdpa_mask(query))
        return self.head(g[:, S:]), levels, target

    def predict(self, x: torch.Tensor, order: torch.Tensor | None, bounds: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions [B, T, out], levels [B or 1, T]) in the original token order, whichever the layout: what
        the training step predicts for order z and boundaries n_0 < ... < n_K (``[1 or B, K+1]``)."""
        pred, levels, _ = self._forward(x, order, bounds)
        if order is not None and self.cfg.mask_layout == "permuted":
            pred = unpermute_tokens(pred, order)
            levels = token_levels(self.S, self.T, order, bounds)
        return pred, levels[:, self.S:]

    def _one_stream(self, h: torch.Tensor, levels: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """Table 10's causal single stream: token z_p is predicted from the output of z_{p-1} (the CLS token for the
        first), which cannot know which position comes next."""
        S = self.S
        if order is None:  # factorisation order, one token per group: plain causal attention with one CLS token
            out = self.net.content(h, is_causal=S == 1, mask=None if S == 1 else _sdpa_mask(masks_from_levels(
                levels)[0]))
        else:
            out = self.net.content(h, mask=_sdpa_mask(masks_from_levels(levels)[0]))
            out = permute_tokens(out, order, leading=S)
        pred = self.head(out[:, S - 1:-1])
        if order is not None:  # back to the original order of the targets
            pred = unpermute_tokens(pred, order)
        return pred

    # ---- representation
    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    @property
    def default_pool(self) -> str:
        return self.cfg.feature_pool

    def readout_mask(self) -> torch.Tensor:
        """The content stream's mask in raster order, fixed-length groups (or the trained fixed segmentation)."""
        levels = token_levels(self.S, self.T, None, self.readout_bounds[None])
        return masks_from_levels(levels)[0][0]

    def _content(self, x: torch.Tensor, layer: int, hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        h = torch.cat([self._conditions(x), self._embed(x)], 1)
        mask = self.readout_mask() if self.causal_mask else None
        return self.net.content(h, mask=mask, layer=layer, hidden=hidden)

    def _pool(self, h: torch.Tensor, pool: str) -> torch.Tensor:
        if is_map_pool(pool):
            grid = h[:, self.S:].transpose(1, 2).reshape(len(h), -1, self.grid, self.grid)
            return pool_feature_map(grid, pool)
        return h[:, 0] if pool == "cls" else h[:, self.S:].mean(1)

    @property
    def feature_pools(self) -> tuple[str, ...]:
        """The poolings the read-out offers as the mask is switched now (a probe sweep reads these): without the
        CLS token under the mask, which sees the context only."""
        return ("mean",) if self.causal_mask else ("mean", "cls")

    def check_feature_args(self, layer: int | None, pool: str | None) -> tuple[int, str]:
        # cls is a valid name whichever way the mask is switched now: the probes and fine-tuning check their read-out
        # before they switch it; a cls read under the mask is refused when it happens (_check_reads)
        pool = self.default_pool if pool is None or pool == "" else str(pool)
        if pool == "cls":
            return super().check_feature_args(layer, "mean")[0], "cls"
        return super().check_feature_args(layer, pool)

    def _cls_blind(self) -> str:
        n0 = int(self.readout_bounds[0])
        return (f"under GVP's causal mask the CLS token reads only the condition tokens and the context G_0 (the "
                f"first {n0} of {self.T} patches in raster order), so the rest of the image cannot change it: read "
                f"pool mean or a map pool with the mask, or cls without it (causal false)")

    def readout_refusal(self, causal: bool) -> str | None:
        if causal and self.cfg.feature_pool == "cls":
            return f"model.feature_pool cls, the default read-out: {self._cls_blind()}"
        return None

    def _check_reads(self, reads: list[tuple[int | None, str | None]]) -> list[tuple[int, str]]:
        """The read-outs checked, and refused (before any forward pass) where the mask blinds the CLS token."""
        reads = [self.check_feature_args(layer, pool) for layer, pool in reads]
        if self.causal_mask and any(pool == "cls" for _, pool in reads):
            raise GenrepError(f"pool cls: {self._cls_blind()}")
        return reads

    def features(self, x: torch.Tensor, layer: int | None = None, pool: str | None = None) -> torch.Tensor:
        [(layer, pool)] = self._check_reads([(layer, pool)])
        return self._pool(self._content(x, layer), pool)

    def feature_sets(self, x: torch.Tensor, reads: list[tuple[int, str]]) -> list[torch.Tensor]:
        reads = self._check_reads(reads)
        hidden: list[torch.Tensor] = []
        self._content(x, max(layer for layer, _ in reads), hidden)
        return [self._pool(hidden[layer - 1], pool) for layer, pool in reads]

    def feature_map_size(self, layer: int) -> int:
        return self.grid

    # ---- completion (appendix F)
    @torch.no_grad()
    def complete(self, x: torch.Tensor, keep: torch.Tensor, *, generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor:
        """The hidden patches generated group by group: the given patches (every pixel kept) are the context G_0,
        the hidden ones in a random order are cut into ``complete_groups`` groups of about equal size, and each group
        is predicted from the given patches and the groups generated before it (the query stream; the content stream
        reads what was generated). Pixel targets are the predicted patches (with ``norm_pix``, un-normalised with the
        mean and spread of the image's given patches); codes are drawn at ``temperature`` and decoded by the
        tokenizer. Given pixels come back unchanged."""
        B, C = x.shape[:2]
        S, T, p = self.S, self.T, self.cfg.patch_size
        given = patchify(keep.expand(-1, C, -1, -1).float(), p).amin(-1) > 0.5  # [B, T]: a token with every pixel
        n_given = given.sum(1)
        hidden = T - n_given
        some = hidden[hidden > 0]  # an image with nothing hidden has no group to generate
        K = max(1, min(self.cfg.complete_groups, int(some.min()) if len(some) else 1))
        keys = torch.rand(B, T, generator=generator).to(x.device) + 2 * given  # hidden first after sorting
        order = (-keys).argsort(1)  # given tokens first (any order among them), then the hidden in random order
        k = torch.arange(K + 1, device=x.device)
        bounds = n_given[:, None] + torch.div(k * hidden[:, None], K, rounding_mode="floor")
        levels = token_levels(S, T, order, bounds)
        content, query = (m[:, None] for m in masks_from_levels(levels))
        patches, codes = self._patches(x), (self.tokenizer.encode(x) if self.tokenizer is not None else None)
        conditions = self._conditions(x)  # of the given image: the same for every group
        for group in range(1, K + 1):
            h = torch.cat([conditions, self._current_tokens(patches, codes, C)], 1)
            if self.cfg.streams == "one":
                pred = self._one_stream(h, levels, order)
            else:
                _, g = self.net(h, self._queries(B), content_mask=content, query_mask=query)
                pred = self.head(g[:, S:])
            now = levels[:, S:] == group
            if self.cfg.target == "p2p":
                patches = torch.where(now[..., None], self._pixels(pred.float(), patches, given), patches)
            else:
                codes = torch.where(now, self._draw_codes(pred.float(), generator), codes)
                if self.cfg.target == "p2d":
                    decoded = self._patches(self.tokenizer.decode(codes))
                    patches = torch.where(now[..., None], decoded, patches)
        if self.cfg.target == "p2p":
            image = (unpatchify(patches, p, C) + 1) / 2
        else:
            image = self.tokenizer.decode(codes)
        return torch.where(keep.expand(-1, C, -1, -1), x, image.clamp(0, 1))

    def _current_tokens(self, patches: torch.Tensor, codes: torch.Tensor | None, channels: int) -> torch.Tensor:
        if self.cfg.target == "d2d":
            return self.pos_embed(self.code_embed(codes))
        return self.pos_embed(self.patch_embed(unpatchify(patches, self.cfg.patch_size, channels)))

    def _pixels(self, pred: torch.Tensor, patches: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        if not self.cfg.norm_pix:
            return pred
        w = given.float()[..., None]
        count = w.sum(1).clamp_min(1)
        mean = (patches.mean(-1, keepdim=True) * w).sum(1, keepdim=True) / count[:, None]
        std = (patches.var(-1, keepdim=True).add(1e-6).sqrt() * w).sum(1, keepdim=True) / count[:, None]
        return pred * std + mean

    def _draw_codes(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.cfg.temperature == 0:
            return logits.argmax(-1)
        probs = (logits / self.cfg.temperature).softmax(-1)
        flat = probs.reshape(-1, probs.shape[-1]).cpu()
        return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1]).to(logits.device)

    # ---- optimisation hints
    def no_weight_decay(self) -> set[str]:
        names = {"cls_token", "query_token", "pos_embed.pos"}
        return names | ({"code_embed.weight"} if self.cfg.target == "d2d" else set())

    def flops_per_image(self) -> int:
        if self.tokenizer is not None or self.condition_model is not None:  # a frozen part's cost: counted
            return super().flops_per_image()
        c = self.cfg
        n = self.S + self.T
        streams = 2 if c.streams == "two" else 1
        return (linear_flops(self.T, self.patch_dim, c.dim) + streams * c.depth * transformer_block_flops(
            n, c.dim, c.mlp_ratio) + linear_flops(self.T, c.dim, self.patch_dim))


def _sdpa_mask(mask: torch.Tensor) -> torch.Tensor:
    """[1, N, N] (one mask the batch shares) -> [N, N]; [B, N, N] -> [B, 1, N, N] (Attention's mask shapes)."""
    return mask[0] if mask.shape[0] == 1 else mask[:, None]
