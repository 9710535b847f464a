"""The fine-tuning protocol: the whole network and a fresh linear read-out, trained end to end on labels.

Protocol (:func:`finetune`)
    The method is deep-copied (the caller's model is never touched) and a linear head, zero-initialised so
    that it starts at the uniform prediction, reads ``copy.features(x, layer, pool)``: the read-out is the
    representation the linear probe sees, with the method's own default layer and pooling unless given;
    ``readout="fc_norm"`` puts a fresh LayerNorm (eps 1e-6) between them, MAE's ``fc_norm`` after its global
    pool. Every parameter of the copy and the head is trained on cross-entropy (optionally label-smoothed, on
    soft targets when Mixup/CutMix mix the batch) with AdamW (``betas``): weight decay on matrices only (norms,
    biases and the method's ``no_weight_decay`` embeddings are exempt, as in pretraining), optionally MAE's
    layer-wise lr decay, gradient-norm clipping at ``clip_grad`` (0: none), a linear learning-rate warm-up over
    ``warmup_epochs`` then a half-cycle cosine to ``min_lr``, per step, ``epochs`` passes over a seeded shuffle
    (the last, incomplete batch is kept, since low-shot subsets are small), dropout on, bf16 autocast on CUDA.
    Each training batch goes through, on the device: the batched augmentation ``augment`` of pretraining
    (:func:`genrep.data.augment.augment`, seeded per step the way the training loop seeds it; ``"weak"`` is
    the reflect-padded crop and flip of the supervised ViT, ``"crop"`` MAE's random resized crop, of area
    ``crop_scale``..1), RandAugment (:mod:`genrep.data.randaugment`), random erasing
    (:func:`genrep.data.augment.random_erase`) and Mixup/CutMix (:func:`genrep.data.mixing.mix`), each off
    unless asked for, in MAE's order (its timm transform: crop and flip, RandAugment, erasing; then the batch's
    mix). Afterwards the copy is evaluated in eval mode without augmentation: test accuracy and ECE (softmax
    of the head, ``ece_bins`` equal-width bins, :mod:`genrep.eval.metrics.calibration`), and accuracy and mean
    cross-entropy (without label smoothing) on the un-augmented train set.

    Defaults: none is a paper's, and they are what the protocol always ran, so an older run evaluates as before.
    GCRL's "15 epochs" (section 4.2) are continued *pretraining* of its ImageNet32 models on CIFAR with the
    pretraining objective (``genrep pretrain --init RUN``, the ``*-cifar10-from-imagenet32`` recipes), not
    supervised fine-tuning, which the paper does not run; 15 epochs here is only a short default. lr 1e-4,
    weight decay 0.05, batch 128, clipping at 1 and one warm-up epoch are common ViT fine-tuning values (and the
    repository's pretraining clip). The papers' fine-tuning lives in the recipes' ``eval.finetune`` sections.

MAE's recipe (facebookresearch/mae main_finetune.py, util/lr_decay.py, util/lr_sched.py)
    ``blr``: lr = blr x batch_size / 256 (MAE's ``--blr``). MAE lets an absolute ``--lr`` win over ``--blr``;
    here setting both is refused, so a recipe's blr never hides a command line's lr (``--eval.finetune.blr
    null`` clears it). ``layer_decay``: MAE's ``param_groups_lrd``, lr x decay ** (depth + 1 - layer) with the
    embeddings at layer 0, block i at i + 1 and the rest (final norm, fc_norm, head) at depth + 1; the layer of
    a parameter is read from its name (:func:`layer_ids`: a ViT's ``blocks.<i>`` and per-block
    ``modulations.<i>``, names ending in ``embed`` or ``token``, iGPT's ``start``), refused for a method with
    no such stack. ``drop_path``: timm's linear ramp, 0 in the first block to the rate in the last, as MAE's
    models_vit builds it (genrep's pretraining uses one rate in every block), set on the copy only; None keeps
    the trained model's. Warm-up: MAE's lr_sched ramps from 0 at fractional epochs; here from lr / warmup_steps
    at the first step (genrep's :func:`~genrep.train.optim.lr_at`), one step apart. Mixup/CutMix: timm's Mixup
    in batch mode (one lambda and one choice per batch, ``switch_prob`` the chance of CutMix when both are on,
    ``mix_prob`` of mixing at all, CutMix's lambda corrected to the pasted area, label smoothing on the mixed
    target); images are paired 2k <-> 2k + 1 where timm pairs the batch with its reverse, the same in
    distribution for a shuffled batch. The head starts at 0 (MAE: trunc-normal std 2e-5). genrep's mean pool
    reads the last block after the encoder's final norm (what the probes see); MAE deletes that norm before
    its global pool and fc_norm, so the ``fc_norm`` read-out here keeps one LayerNorm more (trained).

Causal methods
    An autoregressive (iGPT-like) method trains with a causal attention mask. Such a method declares it with
    ``Method.causal_readout = True``, and its attention reads the instance switch ``causal_mask`` at forward
    time. ``causal=False`` fine-tunes with the mask off (bidirectional attention, as GCRL's encoder),
    ``causal=True`` with it on, ``causal=None`` leaves it as trained; only the copy is changed. For any
    other method ``causal`` must be None. iGPT and GCRL are causal; with axial attention they refuse
    ``causal=False`` (the axial block has no unmasked form).

Determinism
    The shuffle, the augmentation and dropout are drawn from ``seed`` (the global RNG is forked, so the
    caller's is not advanced): on the CPU the same call gives the same numbers.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...data.augment import AUGMENTATIONS, DEFAULT_CROP_SCALE, Augmentation, augment, random_erase
from ...data.batches import mix_seed
from ...data.imageset import ImageSet
from ...data.mixing import mix
from ...data.randaugment import MAX_MAGNITUDE
from ...data.randaugment import POLICIES as RANDAUG_POLICIES
from ...data.randaugment import check_options as check_randaugment
from ...data.randaugment import randaugment
from ...data.random_inputs import sample_beta
from ...errors import GenrepError
from ...fields import Pool, setting
from ...methods import Method
from ...nn.transformer import DropPath
from ...train.optim import build_optimizer, layer_decay_groups, lr_at
from ..metrics.calibration import expected_calibration_error
from .context import check_causal, EvalContext

__all__ = ["FinetuneSettings", "finetune", "layer_ids", "run"]

_EVAL_BATCH = 512
DEFAULT_LR = 1e-4  # the absolute lr when neither lr nor blr is set
READOUTS = ("linear", "fc_norm")


@dataclass
class FinetuneSettings:
    """eval.finetune: the defaults are genrep's generic fine-tuning; the recipes carry the papers' (MAE's
    FINETUNE.md for GVP, DARL's table 9), each key's source in the recipe's header."""
    epochs: int = setting(15, min=1)         # a short default (GCRL's 15 epochs are continued pretraining)
    lr: float | None = setting(None, above=0)   # absolute; null: blr x batch_size / 256 if blr is set, else 1e-4
    blr: float | None = setting(None, above=0)  # MAE's base lr; setting it and lr both is refused
    batch_size: int = setting(128, min=1)
    min_lr: float = setting(0.0, min=0)         # the cosine's floor (MAE: 1e-6)
    warmup_epochs: float = setting(1.0, min=0)
    weight_decay: float = setting(0.05, min=0)
    betas: list[float] = setting([0.9, 0.999], min=0, below=1)
    clip_grad: float = setting(1.0, min=0)      # gradient-norm clip; 0: none (MAE)
    layer_decay: float = setting(1.0, above=0, max=1)  # MAE's layer-wise lr decay; 1: off
    drop_path: float | None = setting(None, min=0, below=1)  # timm's ramp to this rate; null: the model's own
    label_smoothing: float = setting(0.0, min=0, below=1)
    augment: str | None = setting(None, choices=AUGMENTATIONS)  # null: the run's model.augment
    crop_scale: float = setting(DEFAULT_CROP_SCALE, above=0, max=1)  # strong / crop: the smallest crop area
    randaug_ops: int = setting(0, min=0, max=64)  # RandAugment's ops per image; 0: off
    randaug_magnitude: float = setting(9.0, min=0, max=MAX_MAGNITUDE)  # torchvision's 0..30 (timm's m9 = 27)
    randaug_mstd: float = setting(0.0, min=0, max=MAX_MAGNITUDE)  # magnitude noise (timm's mstd0.5 = 1.5)
    randaug_policy: str = setting("torchvision", choices=RANDAUG_POLICIES)
    mixup: float = setting(0.0, min=0, max=1000)   # Mixup's Beta alpha; 0: off
    cutmix: float = setting(0.0, min=0, max=1000)  # CutMix's Beta alpha; 0: off
    mix_prob: float = setting(1.0, min=0, max=1)   # the chance a batch is mixed, with mixup or cutmix on
    switch_prob: float = setting(0.5, min=0, max=1)  # with both on, the chance of CutMix
    erase_prob: float = setting(0.0, min=0, max=1)   # random erasing (timm's mode 'pixel')
    readout: str = setting("linear", choices=READOUTS)  # linear: head on the features; fc_norm: MAE's norm first
    layer: int | None = setting(None, min=1)  # the read-out: None = the method's default layer and pooling
    pool: Pool | None = None
    causal: bool | None = None                # causal methods: fine-tune with (true) or without (false) the mask

    def validate(self, section: str) -> None:
        check_lr(self.lr, self.blr, section)
        if len(self.betas) != 2:
            raise GenrepError(f"{section}.betas must be two numbers in [0, 1), got {self.betas}")


def check_lr(lr: float | None, blr: float | None, section: str = "") -> None:
    if lr is not None and blr is not None:
        dot = f"{section}." if section else ""
        raise GenrepError(f"{dot}lr {lr:g} and {dot}blr {blr:g} are both set; set one and the other null "
                          f"(lr: the absolute rate; blr: lr = blr x batch_size / 256, MAE's rule)")


def effective_lr(lr: float | None, blr: float | None, batch_size: int) -> float:
    return lr if lr is not None else blr * batch_size / 256 if blr is not None else DEFAULT_LR


class _ReadOut(nn.Module):
    """The method's representation (optionally LayerNorm-ed, MAE's fc_norm) and a zero-initialised linear head."""

    def __init__(self, method: Method, layer: int, pool: str, dim: int, num_classes: int, readout: str = "linear"):
        super().__init__()
        self.method, self.layer, self.pool = method, layer, pool
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if readout == "fc_norm" else None
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.method.features(x, self.layer, self.pool)
        return self.head(h if self.fc_norm is None else self.fc_norm(h))


# ----------------------------------------------------------------------------------------------- blocks
def block_stack(method: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The one trainable stack of ``method.num_layers`` transformer blocks named ``blocks`` (a ViT's, GVP's
    two-stream network's, iGPT's), as (its name, the ModuleList); None when there is not exactly one."""
    found = [(name, m) for name, m in method.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "blocks"
             and any(p.requires_grad for p in m.parameters()) and len(m) == method.num_layers]
    return found[0] if len(found) == 1 else None


def _refuse_structure(method: Method, key: str, what: str) -> None:
    raise GenrepError(f"{key} needs a stack of {method.num_layers} transformer blocks ('blocks.<i>') {what}; "
                      f"{method.name} has none (leave {key} at its default)")


def layer_ids(model: nn.Module, method: Method, prefix: str = "") -> dict[str, int]:
    """MAE's layer of every trainable parameter of ``model`` (``method`` itself, or a module holding it under
    ``prefix``): 0 for the embeddings (a name part ending in 'embed' or 'token', or iGPT's 'start'), i + 1 for
    block i (and the block's own conditioning 'modulations.<i>'), num_layers + 1 for the rest (get_layer_id_for_vit
    reads 'cls_token', 'pos_embed', 'patch_embed' and 'blocks.<i>' the same way)."""
    stack = block_stack(method)
    if stack is None:
        _refuse_structure(method, "layer_decay", "to number its layers")
    blocks = f"{prefix}{stack[0]}."
    modulations = f"{prefix}{stack[0].rsplit('.', 1)[0]}.modulations." if "." in stack[0] else f"{prefix}modulations."
    top = method.num_layers + 1
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        out[name] = top
        for head in (blocks, modulations):
            if name.startswith(head):
                out[name] = int(name[len(head):].split(".")[0]) + 1
                break
        else:
            if any(part.endswith(("embed", "token")) or part == "start" for part in name.split(".")):
                out[name] = 0
    return out


def drop_path_blocks(method: nn.Module) -> nn.ModuleList | None:
    """The block stack when every block has a stochastic-depth layer to ramp, else None."""
    stack = block_stack(method)
    if stack is None or not all(isinstance(getattr(b, "drop_path", None), DropPath) for b in stack[1]):
        return None
    return stack[1]


def set_drop_path(model: Method, rate: float) -> list[float]:
    """timm's stochastic-depth ramp on ``model``'s blocks: linspace(0, rate, depth), as MAE builds its ViT."""
    blocks = drop_path_blocks(model)
    if blocks is None:
        _refuse_structure(model, "drop_path", "with stochastic depth")
    rates = torch.linspace(0, rate, len(blocks)).tolist()  # float32, as timm's
    for block, r in zip(blocks, rates):
        block.drop_path.rate = float(r)
    return rates


# ----------------------------------------------------------------------------------------------- checks
def _number(value, name: str, *, low: float, low_open: bool = False, high: float | None = None,
            high_open: bool = False, integer: bool = False):
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    v = value if ok else float("nan")
    ok = ok and math.isfinite(v) and (v > low if low_open else v >= low)
    ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        lo = f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f" and {'<' if high_open else '<='} {high:g}"
        raise GenrepError(f"{name} must be {'an integer' if integer else 'a number'} {lo}{hi}, got {value!r}")
    return value


def check_image_sets(method: Method, train_set, test_set) -> None:
    """The labelled sets a read-out is trained and tested on must fit the method's input and each other."""
    for what, s in (("train_set", train_set), ("test_set", test_set)):
        if not isinstance(s, ImageSet):
            raise GenrepError(f"{what} must be a genrep ImageSet (genrep.data.datasets.load_dataset), "
                              f"got {type(s).__name__}")
        if len(s) == 0:
            raise GenrepError(f"{what} ({s.name}) is empty; a read-out needs at least one labelled image")
        d = method.data
        if s.channels != d.channels:
            raise GenrepError(f"{what} ({s.name}) has {s.channels}-channel images but {method.name} takes "
                              f"{d.channels}-channel ones; use a data set with {d.channels} channel(s)")
        if s.image_shape != (d.image_size, d.image_size):
            h, w = s.image_shape
            raise GenrepError(f"{what} ({s.name}) has {h}x{w} images but {method.name} takes "
                              f"{d.image_size}x{d.image_size}; load it with image_size={d.image_size}")
    if train_set.num_classes < 2:
        raise GenrepError(f"train_set ({train_set.name}) has {train_set.num_classes} class; a classifier "
                          f"needs at least 2")
    if test_set.num_classes != train_set.num_classes:
        raise GenrepError(f"test_set has {test_set.num_classes} classes but train_set has "
                          f"{train_set.num_classes}; both must be splits of the same labelled data set")
    for what, s in (("train_set", train_set), ("test_set", test_set)):
        if int(s.labels.min()) < 0 or int(s.labels.max()) >= train_set.num_classes:
            raise GenrepError(f"{what} ({s.name}) has labels outside 0..{train_set.num_classes - 1}")


def method_device(method: Method, device) -> torch.device:
    """``device`` as a torch.device; None means where the method's parameters are."""
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise GenrepError(f"device {device!r} is not a torch device; use e.g. 'cpu' or 'cuda'") from e
    p = next(method.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _set_causal(model: Method, causal: bool | None) -> bool | None:
    """Apply the (checked) ``causal`` request to the copy; returns the mask state it trains with."""
    if not model.causal_readout:
        return None
    if causal is not None:
        model.causal_mask = causal
    return bool(model.causal_mask)


# ----------------------------------------------------------------------------------------------- steps
@torch.no_grad()
def _logits(net: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Un-augmented logits, float32 [N, K] on the CPU."""
    out = []
    for i in range(0, len(images), _EVAL_BATCH):
        x = images[i:i + _EVAL_BATCH].to(device, non_blocking=True).float().div_(255)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(net(x).float().cpu())
    return torch.cat(out)


def _mixing(n_classes: int, mixup: float, cutmix: float, mix_prob: float, switch_prob: float):
    """The batch mix of timm's Mixup (batch mode) as a function of the step's generator, or None when off."""
    if not (mixup or cutmix):
        return None
    share = switch_prob if mixup and cutmix else 1.0 if cutmix else 0.0

    def beta(alpha: float, g: torch.Generator) -> torch.Tensor:
        if not alpha:
            return torch.ones((), dtype=torch.float64)
        return sample_beta(alpha, alpha, (), g, torch.device("cpu"))

    def apply(x: torch.Tensor, labels: torch.Tensor, g: torch.Generator):
        u = torch.rand(4, generator=g, dtype=torch.float64)
        lam_mixup, lam_cutmix = beta(mixup, g), beta(cutmix, g)
        u, lam_mixup, lam_cutmix = (t.to(x.device, torch.float32) for t in (u, lam_mixup, lam_cutmix))
        return mix(x, labels, n_classes, u, lam_mixup, lam_cutmix, mix_prob=mix_prob, cutmix_share=share)
    return apply


def _train(net: _ReadOut, train_set: ImageSet, device: torch.device, o: dict, *, seed: int, progress: bool) -> int:
    n = len(train_set)
    b = min(o["batch_size"], n)
    steps_per_epoch = math.ceil(n / b)
    total = o["epochs"] * steps_per_epoch
    warmup = min(round(o["warmup_epochs"] * steps_per_epoch), total - 1)  # as the pretraining loop's schedule
    lr = o["lr"]
    no_decay = {f"method.{name}" for name in net.method.no_weight_decay()}
    groups = None
    if o["layer_decay"] < 1:
        ids = layer_ids(net, net.method, "method.")
        groups = layer_decay_groups(net, o["weight_decay"], no_decay, ids.__getitem__, net.method.num_layers + 1,
                                    o["layer_decay"])
    opt = build_optimizer(net, lr, o["weight_decay"], o["betas"], 1e-8, no_decay,
                          fused=device.type in ("cpu", "cuda"), groups=groups)
    kind = Augmentation(o["augment"], crop_scale=o["crop_scale"])
    mixing = _mixing(train_set.num_classes, o["mixup"], o["cutmix"], o["mix_prob"], o["switch_prob"])
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="fine-tune", unit="step", leave=False, dynamic_ncols=True, disable=None)
    net.train()
    step = 0
    try:
        for epoch in range(o["epochs"]):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 0xF17E)))
            perm = perm.to(device)
            loss_sum = torch.zeros((), device=device)
            for start in range(0, n, b):
                idx = perm[start:start + b]
                g = torch.Generator().manual_seed(mix_seed(seed, step, 0xA06))  # per step, as pretraining
                x = augment(images.index_select(0, idx), kind, g)
                x = randaugment(x, g, ops=o["randaug_ops"], magnitude=o["randaug_magnitude"],
                                mstd=o["randaug_mstd"], policy=o["randaug_policy"])
                x = random_erase(x, o["erase_prob"], g)
                y = labels.index_select(0, idx)
                if mixing is not None:
                    x, y = mixing(x, y, g)
                now = lr_at(step, total, warmup, lr, o["min_lr"])
                for group in opt.param_groups:
                    group["lr"] = now * group.get("lr_scale", 1.0)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=o["label_smoothing"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if o["clip_grad"]:
                    nn.utils.clip_grad_norm_(net.parameters(), o["clip_grad"])
                opt.step()
                loss_sum += loss.detach()
                step += 1
                if bar is not None:
                    bar.update(1)
            mean = float(loss_sum) / steps_per_epoch  # one host sync per epoch
            if not math.isfinite(mean):
                raise GenrepError(f"fine-tuning diverged (loss {mean} in epoch {epoch + 1}); lower lr "
                                  f"(now {lr:g})")
            if bar is not None:
                bar.set_postfix(loss=f"{mean:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return total


# ----------------------------------------------------------------------------------------------- entry
def _check_options(o: dict) -> None:
    """Every option of :func:`finetune` (bar the sets, the read-out and causal), one line each, before any work."""
    _number(o["epochs"], "epochs", low=1, integer=True)
    if o["lr"] is not None:
        _number(o["lr"], "lr", low=0, low_open=True)
    if o["blr"] is not None:
        _number(o["blr"], "blr", low=0, low_open=True)
    check_lr(o["lr"], o["blr"])
    _number(o["weight_decay"], "weight_decay", low=0)
    _number(o["batch_size"], "batch_size", low=1, integer=True)
    _number(o["warmup_epochs"], "warmup_epochs", low=0)
    _number(o["min_lr"], "min_lr", low=0)
    _number(o["clip_grad"], "clip_grad", low=0)
    _number(o["label_smoothing"], "label_smoothing", low=0, high=1, high_open=True)
    _number(o["layer_decay"], "layer_decay", low=0, low_open=True, high=1)
    if o["drop_path"] is not None:
        _number(o["drop_path"], "drop_path", low=0, high=1, high_open=True)
    betas = o["betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise GenrepError(f"betas must be two numbers in [0, 1), got {betas!r}")
    for beta in betas:
        _number(beta, "betas", low=0, high=1, high_open=True)
    if o["augment"] not in AUGMENTATIONS:
        raise GenrepError(f"unknown augmentation {o['augment']!r}; choose one of {', '.join(AUGMENTATIONS)}")
    _number(o["crop_scale"], "crop_scale", low=0, low_open=True, high=1)
    check_randaugment(o["randaug_ops"], o["randaug_magnitude"], o["randaug_mstd"], o["randaug_policy"])
    for key in ("mixup", "cutmix"):
        _number(o[key], key, low=0)
    for key in ("mix_prob", "switch_prob", "erase_prob"):
        _number(o[key], key, low=0, high=1)
    if o["readout"] not in READOUTS:
        raise GenrepError(f"unknown fine-tuning readout {o['readout']!r}; choose one of {', '.join(READOUTS)}")


def check_structure(method: Method, layer_decay: float, drop_path: float | None, section: str = "") -> None:
    """Layer decay and a drop-path ramp need the method's numbered blocks (refused in one line otherwise)."""
    if layer_decay < 1 and block_stack(method) is None:
        _refuse_structure(method, f"{section}layer_decay", "to number its layers")
    if drop_path is not None and drop_path_blocks(method) is None:
        _refuse_structure(method, f"{section}drop_path", "with stochastic depth")


def finetune(method: Method, train_set: ImageSet, test_set: ImageSet, *, layer: int | None = None,
             pool: str | None = None, epochs: int = 15, lr: float | None = None, blr: float | None = None,
             weight_decay: float = 0.05, batch_size: int = 128, warmup_epochs: float = 1.0, min_lr: float = 0.0,
             betas=(0.9, 0.999), clip_grad: float = 1.0, layer_decay: float = 1.0, drop_path: float | None = None,
             augment: str = "weak", crop_scale: float = DEFAULT_CROP_SCALE, randaug_ops: int = 0,
             randaug_magnitude: float = 9.0, randaug_mstd: float = 0.0, randaug_policy: str = "torchvision",
             mixup: float = 0.0, cutmix: float = 0.0, mix_prob: float = 1.0, switch_prob: float = 0.5,
             erase_prob: float = 0.0, label_smoothing: float = 0.0, readout: str = "linear",
             causal: bool | None = None, seed: int = 0, device: str | torch.device | None = None,
             ece_bins: int = 15, progress: bool = False) -> dict:
    """Fine-tune a copy of ``method`` with a fresh linear head on ``train_set``; evaluate on ``test_set``.

    See the module docstring for the protocol and :class:`FinetuneSettings` for the options. ``device=None``
    trains where the method's parameters are. Returns a JSON-serialisable dict: ``test_acc``, ``test_ece``,
    ``train_acc``, ``train_loss`` (un-augmented train set, after training), ``causal`` (the mask state trained
    with; None for a method without one), every setting used (``lr`` the rate applied, ``blr`` the base it came
    from or None; ``drop_path_rates`` the blocks' rates when ``drop_path`` set them), ``steps``, ``n_train``,
    ``n_test``, ``num_classes`` and ``seconds``.
    """
    t0 = time.perf_counter()
    o = dict(epochs=epochs, lr=lr, blr=blr, weight_decay=weight_decay, batch_size=batch_size,
             warmup_epochs=warmup_epochs, min_lr=min_lr, betas=betas, clip_grad=clip_grad, layer_decay=layer_decay,
             drop_path=drop_path, augment=augment, crop_scale=crop_scale, randaug_ops=randaug_ops,
             randaug_magnitude=randaug_magnitude, randaug_mstd=randaug_mstd, randaug_policy=randaug_policy,
             mixup=mixup, cutmix=cutmix, mix_prob=mix_prob, switch_prob=switch_prob, erase_prob=erase_prob,
             label_smoothing=label_smoothing, readout=readout)
    check_image_sets(method, train_set, test_set)
    _check_options(o)
    _number(ece_bins, "ece_bins", low=1, integer=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenrepError(f"seed must be an integer, got {seed!r}")
    layer, pool = method.check_feature_args(layer, pool)
    check_causal(method, causal)
    check_structure(method, layer_decay, drop_path)
    dev = method_device(method, device)
    o["lr"] = effective_lr(lr, blr, batch_size)
    o["betas"] = [float(v) for v in betas]

    rng_devices = []  # fork the CUDA generator too: dropout there is seeded without touching the caller's
    if dev.type == "cuda":
        rng_devices = [torch.cuda.current_device() if dev.index is None else dev.index]
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)  # dropout, and nn.Linear's init before the head is zeroed
        model = copy.deepcopy(method)
        causal_state = _set_causal(model, causal)
        rates = set_drop_path(model, drop_path) if drop_path is not None else None
        model.to(dev).requires_grad_(True)
        with torch.no_grad():
            dim = model.eval().features(train_set.images[:1].to(dev).float().div_(255), layer, pool).shape[1]
        net = _ReadOut(model, layer, pool, dim, train_set.num_classes, readout).to(dev)
        steps = _train(net, train_set, dev, o, seed=seed, progress=progress)
    net.eval()
    test_logits = _logits(net, test_set.images, dev)
    train_logits = _logits(net, train_set.images, dev)
    if not (torch.isfinite(test_logits).all() and torch.isfinite(train_logits).all()):
        raise GenrepError(f"fine-tuning diverged (non-finite logits after training); lower lr (now {o['lr']:g})")
    test_probs = test_logits.softmax(dim=1)
    return {
        "test_acc": float((test_logits.argmax(1) == test_set.labels).double().mean()),
        "test_ece": expected_calibration_error(test_probs, test_set.labels, ece_bins),
        "train_acc": float((train_logits.argmax(1) == train_set.labels).double().mean()),
        "train_loss": float(F.cross_entropy(train_logits, train_set.labels)),
        "causal": causal_state,
        **o, "steps": steps, "drop_path_rates": rates,
        "layer": layer, "pool": pool, "seed": seed, "ece_bins": ece_bins,
        "n_train": len(train_set), "n_test": len(test_set), "num_classes": train_set.num_classes,
        "seconds": time.perf_counter() - t0,
    }


def finetune_kwargs(ctx: EvalContext) -> dict:
    """The fine-tuning settings of an evaluation but the read-out's layer and pool, also low-shot's when its
    read-out is fine-tuning (it reads its own layer and pool)."""
    s = ctx.ev.finetune
    # by default the pretraining augmentation: weak flips and crops help CIFAR and wreck digits (its recipes use none)
    aug = s.augment if s.augment is not None else getattr(ctx.cfg.model, "augment", "none")
    return dict(epochs=s.epochs, lr=s.lr, blr=s.blr, batch_size=s.batch_size, min_lr=s.min_lr,
                warmup_epochs=s.warmup_epochs, weight_decay=s.weight_decay, betas=tuple(s.betas),
                clip_grad=s.clip_grad, layer_decay=s.layer_decay, drop_path=s.drop_path,
                label_smoothing=s.label_smoothing, augment=aug, crop_scale=s.crop_scale, randaug_ops=s.randaug_ops,
                randaug_magnitude=s.randaug_magnitude, randaug_mstd=s.randaug_mstd,
                randaug_policy=s.randaug_policy, mixup=s.mixup, cutmix=s.cutmix, mix_prob=s.mix_prob,
                switch_prob=s.switch_prob, erase_prob=s.erase_prob, readout=s.readout, causal=s.causal)


def check(ctx: EvalContext) -> None:
    """The read-out, the causal switch, layer decay and drop path must exist in this method; a transfer set must
    be available."""
    s = ctx.ev.finetune
    ctx.method.check_feature_args(s.layer, s.pool)
    check_causal(ctx.method, s.causal, "eval.finetune.causal")
    check_structure(ctx.method, s.layer_decay, s.drop_path, "eval.finetune.")
    ctx.transfer_sets()


def run(ctx: EvalContext) -> dict:
    train, test = ctx.transfer_sets()
    s = ctx.ev.finetune
    out = finetune(ctx.method, train, test, **finetune_kwargs(ctx), layer=s.layer, pool=s.pool, seed=ctx.ev.seed,
                   device=ctx.device, ece_bins=ctx.ev.calibration.bins, progress=ctx.progress)
    return {**out, "data": train.name}
