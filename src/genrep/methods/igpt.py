"""iGPT (Chen et al. 2020) as the GCRL paper's baseline: an autoregressive transformer over colour tokens.

Training minimises eq. 2's negative log-likelihood of the tokens in raster order. Its capabilities (shared
with GCRL in ``colour_tokens.AutoregressiveTokens``): ``sample`` and ``complete`` (token by token with a key/value cache under dense attention; axial attention recomputes the
prefix), ``nll`` in bits per sub-pixel of the colour-quantized image (bits per token / channels; the paper's
"bpd on the color-quantized space" is bits per token, which the likelihood protocol reports first; neither is
comparable with pixel bits/dim — its footnote 2), and ``score``: the
gradient of log p(x) with respect to the token embeddings (section 4.3: quantized inputs have no input
gradient), whose norm is the unsupervised OOD score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..fields import setting
from .colour_tokens import TINY_TOKENS, AugmentedTokenConfig, AutoregressiveTokens, bits
from .registry import register


@dataclass
class IGPTConfig(AugmentedTokenConfig):
    # softmax temperature of sample and complete (the paper shows 1.0, 0.99 and 0.98)
    temperature: float = setting(1.0, above=0, max=100)


@register
class IGPT(AutoregressiveTokens):
    name = "igpt"
    config_class = IGPTConfig
    tiny_config: ClassVar[dict] = {**TINY_TOKENS, "augment": "none"}

    # the middle block: iGPT's best linear-probe features lie in the middle of the stack (the paper probes
    # the middle and the last)
    @property
    def default_layer(self) -> int:
        return self.cfg.feature_layer or math.ceil(self.cfg.depth / 2)

    def views(self):
        return {"image": self.cfg.augment}

    def flops_per_image(self) -> int:
        return self.cfg.depth * self.net.block_flops() + self.net.head_flops()

    def loss(self, batch):
        tokens = self.tokens(batch["image"])
        nll = self.generative_nll(tokens, self.autoregressive_hidden(tokens)).mean()
        return {"loss": nll, "bits_per_token": bits(nll).detach()}
