"""What iGPT, SimCLR and GCRL share: a k-means colour palette fitted on the training pixels, images as grids
of colour tokens, and one ``TokenTransformer`` (the GCRL paper compares the three on the same architecture).

The palette is the method's data-fitted state (``prepare``): fitted once on rank 0, kept in the run's
``prepared.safetensors`` beside the fingerprint of the data it was fitted on, never refitted; or read from a
user's file (``model.palette``, e.g. iGPT's published ``kmeans_centers.npy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..data.augment import AUGMENTATIONS
from ..data.palette import DEFAULT_COLOURS, cached_palette, decode, encode, palette_from_file
from ..errors import GenrepError
from ..fields import setting
from ..nn.token_transformer import ATTENTIONS, TokenTransformer
from .base import DataSpec, Method, check_heads, file_sha256

FITTED_PALETTE_CAVEAT = "not comparable with the paper, which uses iGPT's published kmeans_centers.npy"
NLL_UNIT = "bits per sub-pixel of the colour-quantized image (bits per token / channels; not pixel bits/dim)"


# the registry-wide tests' tiny model: 8 colours fit every data set they use (digits has 17 grey levels); no
# dropout, since nn.Dropout draws per micro-batch and accumulation is bit-identical only without it
TINY_TOKENS = {"dim": 32, "depth": 2, "num_heads": 2, "colours": 8, "drop": 0.0}


@dataclass
class ColourTokenConfig:
    """The network keys of the three methods (defaults: the GCRL paper's 10M model, width 256 and 12 blocks)."""
    dim: int = setting(256, min=1, max=65536)
    depth: int = setting(12, min=1, max=1024)
    num_heads: int = setting(8, min=1)
    mlp_ratio: float = setting(4.0, above=0, max=64)
    drop: float = setting(0.1, min=0, below=1)  # before every residual (eq. 4's blocks, as iGPT)
    # dense: one causal attention over the sequence (flash on CUDA; the fast default). axial: GCRL's block of
    # Algorithm 1 (row, causal column, shifted causal row attention; table 11)
    attention: str = setting("dense", choices=ATTENTIONS)
    colours: int = setting(DEFAULT_COLOURS, min=2, max=65536)  # K, the palette's size (iGPT: 512 for RGB)
    # a palette file [K, C] in [-1, 1] (.npy, e.g. iGPT's kmeans_centers.npy) instead of fitting k-means
    palette: str = ""
    feature_layer: int | None = setting(None, min=1)  # the default probe layer; None: the method's default

    def validate(self, section: str) -> None:
        check_heads(self.dim, self.num_heads, section)
        if self.feature_layer is not None and self.feature_layer > self.depth:
            raise GenrepError(f"{section}.feature_layer {self.feature_layer} does not exist; choose 1..{self.depth} "
                              f"({section}.depth {self.depth})")


@dataclass
class AugmentedTokenConfig(ColourTokenConfig):
    augment: str = setting("weak", choices=AUGMENTATIONS)  # iGPT: reflect-pad-4 crop + flip


class ColourTokenMethod(Method):
    """A method over colour tokens. Subclasses say whether the stack is autoregressive (``reads_shifted``) and
    ends in the output layer over the palette (``predicts_tokens``)."""

    # "ln": the LayerNorm read-out of the paper's Fig. 1 (LN and GAP before the projection head; iGPT's code: ln_f
    # then the mean), what the objective trained; "mean": the raw mean of the block output, genrep's read-out
    # before issue 25, under its old name so cached features and old results keep their meaning
    feature_pools = ("ln", "mean")
    default_pool = "ln"
    predicts_tokens = True  # the stack ends in the output layer over the palette

    @property
    def reads_shifted(self) -> bool:
        """Input k holds token k-1 behind the start token (an autoregressive stack)."""
        return True

    def __init__(self, cfg: ColourTokenConfig, data: DataSpec):
        super().__init__(cfg, data)
        self.net = TokenTransformer(cfg.colours, data.image_size, data.image_size, cfg.dim, cfg.depth,
                                    cfg.num_heads, cfg.mlp_ratio, cfg.drop, cfg.attention,
                                    start_token=self.reads_shifted, head=self.predicts_tokens)
        # until the fitted palette is installed: K evenly spaced greys, so an unprepared model still runs
        grey = torch.linspace(-1, 1, cfg.colours)[:, None].expand(-1, data.channels).contiguous()
        self.register_buffer("palette", grey, persistent=False)

    # ---- the palette
    def prepare(self, images, *, device, generator):
        cfg = self.cfg
        if cfg.palette:
            palette = palette_from_file(cfg.palette, self.data.channels)
        else:
            palette = cached_palette(images, cfg.colours, seed=generator.initial_seed(), device=device)
        if palette.shape[0] != cfg.colours:
            raise GenrepError(f"the palette {cfg.palette} has {palette.shape[0]} colours but model.colours is "
                              f"{cfg.colours}; set --model.colours {palette.shape[0]}")
        return {"palette": palette}

    def load_prepared(self, state):
        want = (self.cfg.colours, self.data.channels)
        palette = state.get("palette")
        if set(state) != {"palette"} or palette is None or tuple(palette.shape) != want \
                or not palette.is_floating_point() or not bool(torch.isfinite(palette).all()):
            got = {k: list(v.shape) for k, v in state.items()}
            raise GenrepError(f"{self.name}'s fitted state must be one palette of {want[0]} colours x {want[1]} "
                              f"channels, got {got}; was the run trained on other data or with another "
                              f"model.colours?")
        super().load_prepared({"palette": palette.float().to(self.palette.device)})

    def palette_record(self) -> str:
        """Which palette the tokens use, for every result that depends on it: iGPT's published palette (a file,
        by sha256) is the paper's; a palette fitted here gives numbers not comparable with the paper's; a palette
        inherited with the weights (``--init``) is the source run's, whatever this run's config says."""
        meta = self.prepared_meta
        if "inherited_from" in meta:
            return (f"inherited from run {meta['inherited_from']} (trained on {meta.get('fitted_data', '?')}): "
                    f"{meta.get('fitted_origin', 'origin not recorded')}")
        return meta.get("origin") or self.prepared_origin()

    def prepared_origin(self) -> str:
        if self.cfg.palette:
            try:
                digest = file_sha256(self.cfg.palette)
            except OSError as e:  # a record, not a refusal: the palette itself lives in the run
                digest = f"unreadable ({e.strerror})"
            return f"file {self.cfg.palette} sha256 {digest}"
        return f"k-means fitted on its run's training set ({FITTED_PALETTE_CAVEAT})"

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] -> colour tokens [B, H*W] in raster order."""
        return encode(x, self.palette)

    def images(self, tokens: torch.Tensor) -> torch.Tensor:
        return decode(tokens, self.palette, self.data.image_size)

    # ---- representation
    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    def readout_refusal(self, causal: bool) -> str | None:
        if self.cfg.attention == "axial" and not causal:
            return (f"{self.name} with axial attention has no unmasked read-out (the axial block is causal by "
                    f"construction); read it with the mask (true) or as trained (null)")
        return None

    def hidden(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Block ``layer``'s output [B, H*W, D] on images x, as features read it."""
        causal = self.causal_mask  # the probes' and fine-tuning's switch
        why = self.readout_refusal(causal)
        if why:
            raise GenrepError(why)
        return self.net.run(self.net.embed(self.tokens(x), self.reads_shifted), 0, layer, causal=causal)

    def features(self, x, layer=None, pool=None):
        layer, pool = self.check_feature_args(layer, pool)
        h = self.hidden(x, layer)
        return h.mean(dim=1) if pool == "mean" else self.ln_readout(h)

    def ln_readout(self, h: torch.Tensor) -> torch.Tensor:
        """The "ln" pool of a block output [B, n, D] -> [B, D]: iGPT's code, ln_f then the mean over positions
        (its ln_f is trained on the last block only; the code applies it to whichever block it probes). SimCLR
        and GCRL use their contrastive branch's LayerNorm on the mean instead."""
        return self.net.norm(h).mean(dim=1)

    def no_weight_decay(self) -> set[str]:
        # the GCRL paper: no decay on LayerNorm and token embeddings (norms and biases are spared anyway)
        return {"net.tok_embed.weight", "net.row_embed", "net.col_embed", "net.start"} & \
            {name for name, _ in self.named_parameters()}


class AutoregressiveTokens(ColourTokenMethod):
    """The autoregressive capabilities over the whole stack, shared by iGPT and GCRL (whose decoder continues
    its encoder, so the full stack is the generative model)."""

    capabilities = frozenset({"sample", "complete", "nll", "score"})
    capability_options: ClassVar[dict[str, tuple[str, ...]]] = {"sample": ("temperature",),
                                                                 "complete": ("temperature",)}
    causal_readout = True
    score_wrt = "token embeddings"

    def autoregressive_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, n, D] on tokens behind the start token, under the causal mask."""
        return self.net.run(self.net.embed(tokens, shift=True), causal=True)

    def generative_nll(self, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood in nats [B, n] from the last block's output h."""
        logits = self.net.logits(h).float()
        return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")

    # ---- likelihood
    @torch.no_grad()
    def nll(self, x, *, generator=None, progress=False):
        tokens = self.tokens(x)
        return bits(self.generative_nll(tokens, self.autoregressive_hidden(tokens)).mean(dim=1)) / self.data.channels

    def capability_settings(self, capability):
        out = super().capability_settings(capability)
        if capability == "nll":
            out.update(unit=NLL_UNIT, colours=self.cfg.colours, bits_per_token_factor=self.data.channels)
        if capability == "score":
            out.update(with_respect_to=f"{self.score_wrt} (colour inputs are quantized: no pixel gradient)")
        out.update(palette=self.palette_record())
        if capability in ("sample", "complete"):
            out.update(attention=self.cfg.attention,
                       decoding="key/value cache" if self.cfg.attention == "dense" else "prefix recomputed")
        return out

    def grad_log_density(self, x):
        """d log p(x) / d(token embeddings) [B, H*W, D] (section 4.3): the score whose norm is the OOD score."""
        tokens = self.tokens(x)
        with torch.enable_grad():
            emb = self.net.tok_embed(tokens).detach().requires_grad_(True)
            h = self.net.run(self.net.embed_vectors(emb, shift=True), causal=True)
            log_p = -self.generative_nll(tokens, h).sum()
            (grad,) = torch.autograd.grad(log_p, emb)
        return grad

    # ---- generation
    def sample(self, n, *, generator=None, progress=False):
        d = self.data
        blank = torch.zeros(n, d.channels, d.image_size, d.image_size, device=self.palette.device)
        return self.complete(blank, torch.zeros_like(blank[:, :1], dtype=torch.bool), generator=generator,
                             progress=progress)

    @torch.no_grad()
    def complete(self, x, keep, *, generator=None, progress=False):
        """Raster-order decoding: a pixel kept by ``keep`` is its own (quantized) token, every other one is drawn
        from softmax(logits / temperature); the kept pixels come back as given."""
        given = self.tokens(x)
        keep_tokens = keep[:, 0].flatten(1)
        step = self._cached_step if self.cfg.attention == "dense" else self._recomputed_step
        state = self.net.new_cache() if self.cfg.attention == "dense" else None
        tokens = torch.zeros_like(given)
        positions = range(self.net.length)
        if progress:
            from tqdm.auto import tqdm
            positions = tqdm(positions, desc=f"{self.name} decoding", unit="token", leave=False)
        for k in positions:
            logits = step(tokens, k, state)
            drawn = self._draw(logits, generator)
            tokens[:, k] = torch.where(keep_tokens[:, k], given[:, k], drawn)
        out = self.images(tokens)
        return torch.where(keep.expand_as(x), x, out)

    def _cached_step(self, tokens, k, cache):
        """Logits for token k: one new input (the start token, or token k-1) through the cached stack."""
        if k == 0:
            h = self.net.start.expand(len(tokens), -1, -1)
        else:
            h = self.net.tok_embed(tokens[:, k - 1:k])
        h = h + self.net.positions(k, 1)
        return self.net.logits(self.net.run(h, causal=True, cache=cache))[:, 0].float()

    def _recomputed_step(self, tokens, k, _):
        """Logits for token k from the whole sequence (later tokens cannot reach position k: causal)."""
        return self.net.logits(self.autoregressive_hidden(tokens)[:, k]).float()

    def _draw(self, logits, generator):
        # Gumbel-max with uniforms from the caller's (CPU) generator: the same draw on every device
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        return (logits.double() / self.cfg.temperature + gumbel).argmax(dim=-1)


def bits(nats: torch.Tensor) -> torch.Tensor:
    return nats / math.log(2)
