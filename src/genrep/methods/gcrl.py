"""GCRL (Kim et al., hybrid generative-contrastive representation learning).

The colour-token transformer's blocks are split into an encoder (the first ``encoder_depth``) and a decoder.
The encoder reads a weakly augmented view (iGPT's reflect-pad-4 crop + flip) and a strongly augmented one
(SimCLR's table 2); their pooled outputs go through SimCLR's projection head into NT-Xent (L_c). The decoder
continues from the encoder on the weak view only and predicts its tokens (L_g, eq. 2); both views run the causal
stack, the weak one because the decoder needs it causal and the strong one because it is the same encoder.
L = alpha * L_g + beta * L_c (eq. 1; alpha = beta = 1), with L_c switched off for the first ``generative_only``
fraction of training (section 4.1: "only with the generative loss for the first half"), read from the loop's
``progress`` input. The representation is the encoder's pooled output, before the projection head: by default
(pool "ln") the branch's LayerNorm of the mean, what the head reads (Fig. 1); pool "mean" is the raw mean.

While L_c is off its branch does not run (the strong view skips encoder, head and NT-Xent): a host branch in
eager mode and ``torch.cond`` when compiled, so the compiled objective stays one graph. The branch's parameters
get exactly zero gradients then, as they did under weight 0, so AdamW's decay and step count, and with them every
phase-2 step, are unchanged; ``skip_off_branch: false`` runs it at weight 0 as before (the equivalence test).

Table 7's no-split rows are ``encoder_depth == depth`` (both losses on the final block). Table 10's hybrid
classifier is ``encoder_loss: supervised``: cross-entropy on the labels of the strong view replaces L_c (the
paper: "we replace the contrastive loss into the supervised loss"), read through the same LayerNorm and a linear
layer, which also gives the ``logits`` capability; with ``alpha: 0`` and no generative-only part it is table 10's
supervised baseline on the same network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import Augmentation
from ..errors import GenrepError
from ..fields import setting
from ..nn.flops import linear_flops
from ..nn.contrastive import nt_xent
from .colour_tokens import TINY_TOKENS, AutoregressiveTokens, bits
from .igpt import IGPTConfig
from .registry import register
from .simclr import ContrastiveConfig, ContrastiveHead


ENCODER_LOSSES = ("contrastive", "supervised")


@dataclass
class GCRLConfig(IGPTConfig, ContrastiveConfig):
    # None: half the blocks (the paper's (5+5)M and (38+38)M); == depth: no split, both losses on the final block
    # (table 7's 6/6 and 12/12 rows)
    encoder_depth: int | None = setting(None, min=1)
    alpha: float = setting(1.0, min=0)  # weight of the generative loss
    beta: float = setting(1.0, min=0)   # weight of the encoder's loss (L_c, or the supervised one)
    # the fraction of training with the generative loss alone (the paper: the first half)
    generative_only: float = setting(0.5, min=0, below=1)
    # the encoder's loss: contrastive (L_c, eq. 3) or supervised (cross-entropy on the labels: table 10)
    encoder_loss: str = setting("contrastive", choices=ENCODER_LOSSES)
    # while the encoder's loss is off, do not run its branch (false: run it at weight 0, the pre-issue-25 step,
    # kept to test that both give the same weights)
    skip_off_branch: bool = True

    def validate(self, section: str) -> None:
        super().validate(section)
        if self.encoder_depth is not None and self.encoder_depth > self.depth:
            raise GenrepError(f"{section}.encoder_depth {self.encoder_depth} is larger than {section}.depth "
                              f"{self.depth}; choose 1..{self.depth} (the paper: half, {max(self.depth // 2, 1)}; "
                              f"{self.depth}: no split, table 7)")


class ClassifierHead(nn.Module):
    """Table 10's supervised branch: pooled encoder output -> LayerNorm -> linear layer to the classes."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))


@register
class GCRL(AutoregressiveTokens):
    name = "gcrl"
    config_class = GCRLConfig
    batch_coupled = True
    # skip_off_branch false: the registry's FLOP test counts the step at progress 0, which the run-averaged
    # count of the skipping step does not describe (tests/test_gcrl.py checks that step and its one graph)
    tiny_config: ClassVar[dict] = {**TINY_TOKENS, "encoder_depth": 1, "augment": "none", "proj_hidden": 32,
                                   "proj_dim": 16, "skip_off_branch": False}

    def __init__(self, cfg: GCRLConfig, data):
        super().__init__(cfg, data)
        self.encoder_depth = cfg.encoder_depth or max(cfg.depth // 2, 1)
        self.supervised = cfg.encoder_loss == "supervised"
        if self.supervised:
            self.needs_labels = True
            self.capabilities = self.capabilities | {"logits"}
            self.classifier = ClassifierHead(cfg.dim, data.num_classes)
        else:
            self.contrastive = ContrastiveHead(cfg.dim, cfg.proj_hidden, cfg.proj_dim)

    @property
    def branch(self) -> nn.Module:
        """The encoder's head: the contrastive one, or table 10's classifier."""
        return self.classifier if self.supervised else self.contrastive

    @property
    def default_layer(self) -> int:
        return self.cfg.feature_layer or self.encoder_depth

    def ln_readout(self, h):
        return self.branch.norm(h.mean(dim=1))  # Fig. 1: GAP, LN, then (not read) the head

    def views(self):
        return {"weak": self.cfg.augment,
                "strong": Augmentation(self.cfg.contrastive_augment, crop_scale=self.cfg.crop_scale)}

    def flops_per_image(self) -> int:
        """Per training image, averaged over the run: the hybrid step (both views through the encoder and the
        branch's head, the weak one through the decoder and the output layer) and, for the generative-only
        fraction when its branch is skipped, the weak view alone through the whole stack."""
        blocks = self.net.block_flops()
        head = linear_flops(1, self.cfg.dim, self.data.num_classes) if self.supervised else \
            self.contrastive.proj.flops()
        hybrid = (2 * self.encoder_depth * blocks + (1 if self.supervised else 2) * head
                  + (self.cfg.depth - self.encoder_depth) * blocks + self.net.head_flops())
        if not self.cfg.skip_off_branch:
            return hybrid
        generative = self.cfg.depth * blocks + self.net.head_flops()
        off = self.cfg.generative_only
        return round(off * generative + (1 - off) * hybrid)

    def random_inputs(self):
        return {"progress": ("progress", None)}

    @torch.no_grad()
    def logits(self, x):
        h = self.net.run(self.net.embed(self.tokens(x), shift=True), 0, self.encoder_depth, causal=True)
        return self.classifier(h.mean(dim=1)).float()

    def loss(self, batch):
        cfg = self.cfg
        weak, strong = self.tokens(batch["weak"]), self.tokens(batch["strong"])
        labels = (batch["label"],) if self.supervised else ()
        # a tensor, not a Python branch: the compiled step stays one graph through the switch
        progress = batch["progress"][0] if "progress" in batch else torch.ones((), device=weak.device)
        on = progress >= cfg.generative_only
        if not cfg.skip_off_branch or cfg.generative_only == 0:
            generative, encoder = self._hybrid(weak, strong, *labels)
        elif torch.compiler.is_compiling():
            generative, encoder = torch.cond(on, self._hybrid, self._generative_only, (weak, strong, *labels))
        else:
            # eager: one host read of a scalar; the skipped branch is the point
            generative, encoder = (self._hybrid if bool(on) else self._generative_only)(weak, strong, *labels)
        loss = cfg.alpha * generative + cfg.beta * on.to(encoder.dtype) * encoder
        out = {"loss": loss, "generative": generative.detach(), "bits_per_token": bits(generative).detach()}
        # 0 while the branch is off (not run)
        out["supervised" if self.supervised else "contrastive"] = encoder.detach()
        return out

    def _hybrid(self, weak, strong, *labels):
        """(L_g, the encoder's loss) with both views through the encoder (the pre-issue-25 step, op for op)."""
        net = self.net
        encoded = net.run(net.embed(torch.cat([weak, strong]), shift=True), 0, self.encoder_depth, causal=True)
        pooled = encoded.mean(dim=1)
        if self.supervised:
            encoder = F.cross_entropy(self.classifier(pooled[len(weak):]).float(), labels[0])
        else:
            z_weak, z_strong = self.contrastive(pooled).chunk(2)
            encoder = nt_xent(z_weak, z_strong, self.cfg.tau)
        h = net.run(encoded[:len(weak)], self.encoder_depth, causal=True)
        return self.generative_nll(weak, h).mean(), encoder

    def _generative_only(self, weak, strong, *labels):
        """(L_g, 0) from the weak view alone. The branch's parameters get exactly zero gradients (0 x their sum),
        as under weight 0, so AdamW decays them and counts the step as before: phase 2 is unchanged."""
        net = self.net
        h = net.run(net.embed(weak, shift=True), causal=True)
        zero = sum(p.sum() for p in self.branch.parameters()) * 0.0
        return self.generative_nll(weak, h).mean(), zero.float()
