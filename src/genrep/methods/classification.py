"""What the supervised ViT and HybViT's classification stream share: the HybViT code's training-time keys for
the classifier (AutoAugment policy, random erasing, Mixup/CutMix) and the loss on soft targets.

With ``mix_prob`` > 0 the method asks the loop for the batch's mixing randomness (``mixing_inputs``), mixes
its classification images in ``loss`` and trains on the soft targets; ``batch["label"]`` stays the hard labels,
which the accuracy is counted against (as the paper's code does). With ``mix_prob`` 0 nothing is drawn and the
loss is the plain CE on hard labels, as before these keys existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.augment import CLASSIFIER_ERASE_PROB, CLASSIFIER_POLICY, Augmentation
from ..data.autoaugment import AUTOAUGMENT_POLICIES
from ..data.mixing import mix
from ..fields import setting


@dataclass
class ClassifierTrainingConfig:
    """The defaults are the HybViT code's, except ``mix_prob`` (its 0.5), which is off unless a recipe sets it."""

    autoaugment: str = setting(CLASSIFIER_POLICY, choices=AUTOAUGMENT_POLICIES)  # with augment: classifier
    erase_prob: float = setting(CLASSIFIER_ERASE_PROB, min=0, max=1)  # random erasing, with augment: classifier
    mix_prob: float = setting(0.0, min=0, max=1)  # the fraction of batches mixed (Mixup or CutMix)
    cutmix_share: float = setting(0.5, min=0, max=1)  # of the mixed batches, the fraction by CutMix (else Mixup)
    mixup_alpha: float = setting(1.0, above=0, max=1000)  # lambda ~ Beta(alpha, alpha)
    cutmix_alpha: float = setting(1.0, above=0, max=1000)


def image_view(augment: str, cfg: ClassifierTrainingConfig) -> str | Augmentation:
    """The classification view's augmentation: the kind, with its options where it has any."""
    if augment == "classifier":
        return Augmentation("classifier", policy=cfg.autoaugment, erase_prob=cfg.erase_prob)
    return augment


def mixing_inputs(cfg: ClassifierTrainingConfig) -> dict[str, tuple[str, object]]:
    """The batch's mixing randomness, one draw per global batch (``shared``): whether and how to mix and the
    box centre (4 uniforms), and the two lambdas."""
    if cfg.mix_prob == 0:
        return {}
    return {"mix_u": ("shared", ("uniform", 4)),
            "mixup_lam": ("shared", ("beta", (cfg.mixup_alpha, cfg.mixup_alpha, ()))),
            "cutmix_lam": ("shared", ("beta", (cfg.cutmix_alpha, cfg.cutmix_alpha, ())))}


def classification_inputs(batch: dict[str, torch.Tensor], cfg: ClassifierTrainingConfig, num_classes: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, target) of the classification stream: ``batch["image"]`` and the hard labels, or, with mixing
    on, the mixed images and their soft targets [B, num_classes]."""
    images, labels = batch["image"], batch["label"]
    if cfg.mix_prob == 0:
        return images, labels
    return mix(images, labels, num_classes, batch["mix_u"][0], batch["mixup_lam"][0], batch["cutmix_lam"][0],
               mix_prob=cfg.mix_prob, cutmix_share=cfg.cutmix_share)


def classification_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross entropy with label smoothing against hard labels [B] or soft targets [B, K] (probabilities).

    Smoothing mixes the target with the uniform distribution, (1 - s) * target + s / K, so on a Mixup target
    this is lambda * CE_s(y_a) + (1 - lambda) * CE_s(y_b), the paper code's mixup_criterion with its
    LabelSmoothingCrossEntropy; on a one-hot target it is the hard CE.
    """
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
