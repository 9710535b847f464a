"""VQ-VAE (van den Oord et al. 2017) with EMA codebook updates: the discrete patch tokenizer GVP reads.

Each code is one f x f patch of the image (``model.downsample`` f): a 3x3 convolution at full resolution,
``depth`` residual blocks (the paper's: ReLU, 3x3 conv, ReLU, 1x1 conv; no normalisation) and a convolution of
kernel = stride = f to ``code_dim`` channels make z_e; the decoder mirrors it (a transposed convolution of
kernel = stride = f, residual blocks, a 3x3 convolution to the image). Training minimises the reconstruction MSE
of the [-1, 1] image plus ``commitment`` x ||z_e - sg(e)||^2; the gradient passes the quantiser straight through.

The codebook is not trained by the gradient: it is the paper's appendix A.1 moving average (decay 0.99, Sonnet's
``VectorQuantizerEMA`` with Laplace-smoothed cluster sizes). ``loss`` only returns the batch's code counts and
sums of assigned z_e (``state_stats``); the loop sums them over micro-batches and processes and calls
``apply_state_stats`` after the optimizer step, so the update does not depend on how the batch is split.

As a tokenizer (``methods/tokenizers.py``): ``encode`` gives the codes of an image in raster order, ``decode``
the image of codes, ``code_vectors`` their codebook vectors. The run records the image size and channels it was
trained on (buffers ``trained_image_size``, ``trained_channels``), so a GVP run refuses a tokenizer of other data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenrepError
from ..fields import setting
from .base import DataSpec, Method, pool_feature_map
from .registry import register


@dataclass
class VQConfig:
    codebook_size: int = setting(512, min=2, max=65536)  # K codes
    code_dim: int = setting(32, min=1, max=4096)  # D: the width of a code vector
    downsample: int = setting(4, min=1, max=1024)  # f: pixels per code side; each code is one f x f patch
    channels: int = setting(64, min=1, max=4096)  # hidden width of the encoder and decoder
    depth: int = setting(2, min=0, max=64)  # residual blocks on each side
    decay: float = setting(0.99, min=0, below=1)  # of the codebook's moving averages (the paper's 0.99)
    eps: float = setting(1e-5, above=0, max=1)  # Laplace smoothing of the cluster sizes (Sonnet's epsilon)
    commitment: float = setting(0.25, min=0, max=100)  # beta of ||z_e - sg(e)||^2 (the paper's 0.25)
    dropout: float = setting(0.0, min=0, below=1)  # in each residual branch (the paper has none)


class ResBlock(nn.Module):
    """The VQ-VAE paper's residual block: x + conv1x1(relu(conv3x3(relu(x))))."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.drop(F.relu(self.conv1(F.relu(x)))))


def encoder(cfg: VQConfig, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, cfg.channels, 3, padding=1),
                         *(ResBlock(cfg.channels, cfg.dropout) for _ in range(cfg.depth)), nn.ReLU(),
                         nn.Conv2d(cfg.channels, cfg.code_dim, cfg.downsample, stride=cfg.downsample))


def decoder(cfg: VQConfig, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cfg.code_dim, cfg.channels, cfg.downsample, stride=cfg.downsample),
                         *(ResBlock(cfg.channels, cfg.dropout) for _ in range(cfg.depth)), nn.ReLU(),
                         nn.Conv2d(cfg.channels, channels, 3, padding=1))


@register
class VQVAE(Method):
    name = "vq"
    config_class = VQConfig
    feature_maps = True  # z_e on its code grid
    state_stats: ClassVar[tuple[str, ...]] = ("vq_counts", "vq_sums")
    tiny_config: ClassVar[dict] = {"codebook_size": 16, "code_dim": 8, "channels": 16, "depth": 1, "downsample": 2}

    def __init__(self, cfg: VQConfig, data: DataSpec):
        super().__init__(cfg, data)
        if data.image_size % cfg.downsample:
            raise GenrepError(f"model.downsample {cfg.downsample} does not divide the image size {data.image_size} "
                              f"(each code is one {cfg.downsample}x{cfg.downsample} patch); choose a divisor of "
                              f"{data.image_size}")
        self.grid = data.image_size // cfg.downsample
        self.encoder = encoder(cfg, data.channels)
        self.decoder = decoder(cfg, data.channels)
        # random normal from torch's default generator (seeded like the weights), of unit expected norm (Sonnet's
        # scale): N(0, 1) codes lie so far from a fresh encoder's outputs that one code takes every patch
        codebook = torch.randn(cfg.codebook_size, cfg.code_dim) / math.sqrt(cfg.code_dim)
        self.register_buffer("codebook", codebook)
        # one pseudo-observation of each code at its initial vector: a code no batch has picked keeps its vector
        # (decaying slowly) instead of being divided by eps, as a zero start without Sonnet's debiasing would
        self.register_buffer("cluster_size", torch.ones(cfg.codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        # what the tokenizer was trained on, in the checkpoint, so that a reader can refuse other data
        self.register_buffer("trained_image_size", torch.tensor(data.image_size, dtype=torch.int64))
        self.register_buffer("trained_channels", torch.tensor(data.channels, dtype=torch.int64))

    def views(self):
        return {"image": "none"}

    # ---- quantisation
    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The index of the nearest code of each row of ``z`` [M, D], by squared distance in float32."""
        with torch.autocast(z.device.type, enabled=False):
            z, e = z.float(), self.codebook
            d = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)
        return d.argmin(1)

    def _flat(self, z_e: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] -> [B * h * w, D], the vectors of each image in raster order."""
        return z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])

    def _grid(self, vectors: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h*w, D] (raster order) -> [B, D, h, w]."""
        return vectors.view(len(vectors), h, w, -1).permute(0, 3, 1, 2)

    def loss(self, batch):
        target = self.normalize(batch["image"])
        z_e = self.encoder(target)
        flat = self._flat(z_e).float()
        codes = self._nearest(flat)
        z_q = self._grid(self.codebook[codes].view(len(z_e), -1, self.cfg.code_dim), *z_e.shape[-2:])
        recon = self.decoder(z_e + (z_q - z_e).detach())  # straight through: the gradient skips the argmin
        rec = F.mse_loss(recon.float(), target)
        commit = F.mse_loss(z_e.float(), z_q.detach())
        with torch.autocast(flat.device.type, enabled=False):
            # the statistics of the codebook's update, summed over this micro-batch (one-hot matmul: deterministic)
            onehot = (codes[:, None] == torch.arange(self.cfg.codebook_size, device=codes.device)).float()
            counts = onehot.sum(0)
            sums = onehot.t() @ flat.detach()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())  # of this micro-batch's codes
        return {"loss": rec + self.cfg.commitment * commit, "recon": rec.detach(), "commitment": commit.detach(),
                "perplexity": perplexity.detach(), "vq_counts": counts, "vq_sums": sums}

    @torch.no_grad()
    def apply_state_stats(self, stats):
        """The EMA update of appendix A.1: N = decay N + (1 - decay) n, m = decay m + (1 - decay) sum z_e, and
        e = m / N with N Laplace-smoothed (Sonnet), so that no cluster size is zero."""
        c = self.cfg
        self.cluster_size.mul_(c.decay).add_(stats["vq_counts"], alpha=1 - c.decay)
        self.embed_sum.mul_(c.decay).add_(stats["vq_sums"], alpha=1 - c.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + c.eps) / (n + c.codebook_size * c.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed[:, None])

    # ---- the tokenizer (methods/tokenizers.py): codes in raster order, images in [0, 1]
    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> codes [B, (H/f) * (W/f)] in raster order. In float32 even under autocast, so
        a reader's targets do not depend on its precision."""
        with torch.autocast(x.device.type, enabled=False):
            z_e = self.encoder(self.normalize(x.float()))
        return self._nearest(self._flat(z_e)).view(len(x), -1)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] -> their codebook vectors [B, N, D]."""
        return self.codebook[codes]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] (raster order on a square grid) -> images [B, C, H, W] in [0, 1]."""
        side = math.isqrt(codes.shape[1])
        if side * side != codes.shape[1]:
            raise GenrepError(f"{codes.shape[1]} codes do not make a square grid; decode takes the codes of a "
                              f"square image in raster order")
        y = self.decoder(self._grid(self.code_vectors(codes), side, side))
        return ((y + 1) / 2).clamp(0, 1)

    # ---- representation: z_e, the encoder's output before quantisation
    @property
    def num_layers(self) -> int:
        return 1

    def feature_map_size(self, layer: int) -> int:
        return self.grid

    def features(self, x, layer=None, pool=None):
        layer, pool = self.check_feature_args(layer, pool)
        z_e = self.encoder(self.normalize(x))
        return z_e.mean((2, 3)) if pool == "mean" else pool_feature_map(z_e, pool)
