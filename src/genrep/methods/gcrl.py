"""GCRL (Kim et al., hybrid generative-contrastive representation learning).

The colour-token transformer's blocks are split into an encoder (the first ``encoder_depth``) and a decoder.
The encoder reads a weakly augmented view (iGPT's reflect-pad-4 crop + flip) and a strongly augmented one
(SimCLR's table 2); their pooled outputs go through SimCLR's projection head into NT-Xent (L_c). The decoder
continues from the encoder on the weak view only and predicts its tokens (L_g, eq. 2); both views run the causal
stack, the weak one because the decoder needs it causal and the strong one because it is the same encoder.
L = alpha * L_g + beta * L_c (eq. 1; alpha = beta = 1), with L_c switched off for the first ``generative_only``
fraction of training (section 4.1: "only with the generative loss for the first half"), read from the loop's
``progress`` input. The representation is the encoder's pooled output, before the projection head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import GenrepError
from ..fields import setting
from ..nn.contrastive import nt_xent
from .colour_tokens import TINY_TOKENS, AutoregressiveTokens, bits
from .igpt import IGPTConfig
from .registry import register
from .simclr import ContrastiveConfig, ContrastiveHead


@dataclass
class GCRLConfig(IGPTConfig, ContrastiveConfig):
    encoder_depth: int | None = setting(None, min=1)  # None: half the blocks (the paper's (5+5)M and (38+38)M)
    alpha: float = setting(1.0, min=0)  # weight of the generative loss
    beta: float = setting(1.0, min=0)   # weight of the contrastive loss
    # the fraction of training with the generative loss alone (the paper: the first half)
    generative_only: float = setting(0.5, min=0, below=1)

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.encoder_depth is not None and self.encoder_depth >= self.depth:
            raise GenrepError(f"{section}.encoder_depth {self.encoder_depth} must be smaller than {section}.depth "
                              f"{self.depth}: the decoder needs at least one block (the paper: half, "
                              f"{max(self.depth // 2, 1)})")
        if self.depth < 2:
            raise GenrepError(f"{section}.depth {self.depth}: GCRL needs at least 2 blocks, an encoder and a decoder")


@register
class GCRL(AutoregressiveTokens):
    name = "gcrl"
    config_class = GCRLConfig
    batch_coupled = True
    tiny_config: ClassVar[dict] = {**TINY_TOKENS, "encoder_depth": 1, "augment": "none", "proj_hidden": 32,
                                   "proj_dim": 16}

    def __init__(self, cfg: GCRLConfig, data):
        super().__init__(cfg, data)
        self.encoder_depth = cfg.encoder_depth or max(cfg.depth // 2, 1)
        self.contrastive = ContrastiveHead(cfg.dim, cfg.proj_hidden, cfg.proj_dim)

    @property
    def default_layer(self) -> int:
        return self.cfg.feature_layer or self.encoder_depth

    def views(self):
        return {"weak": self.cfg.augment, "strong": self.cfg.contrastive_augment}

    def flops_per_image(self) -> int:
        # both views through the encoder and the projection head, the weak one through the decoder and the head
        blocks = self.net.block_flops()
        encoder = 2 * (self.encoder_depth * blocks + self.contrastive.proj.flops())
        return encoder + (self.cfg.depth - self.encoder_depth) * blocks + self.net.head_flops()

    def random_inputs(self):
        return {"progress": ("progress", None)}

    def loss(self, batch):
        cfg, net = self.cfg, self.net
        weak = self.tokens(batch["weak"])
        both = torch.cat([weak, self.tokens(batch["strong"])])
        encoded = net.run(net.embed(both, shift=True), 0, self.encoder_depth, causal=True)
        z_weak, z_strong = self.contrastive(encoded.mean(dim=1)).chunk(2)
        contrastive = nt_xent(z_weak, z_strong, cfg.tau)
        h = net.run(encoded[:len(weak)], self.encoder_depth, causal=True)
        generative = self.generative_nll(weak, h).mean()
        # a tensor, not a Python branch: the compiled step stays one graph through the switch
        progress = batch["progress"][0] if "progress" in batch else torch.ones((), device=weak.device)
        on = (progress >= cfg.generative_only).to(contrastive.dtype)
        loss = cfg.alpha * generative + cfg.beta * on * contrastive
        return {"loss": loss, "generative": generative.detach(), "contrastive": contrastive.detach(),
                "bits_per_token": bits(generative).detach()}
