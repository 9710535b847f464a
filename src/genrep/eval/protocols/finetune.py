"""The fine-tuning protocol: the whole network and a fresh linear read-out, trained end to end on labels.

Protocol (:func:`finetune`)
    The method is deep-copied (the caller's model is never touched) and a linear head, zero-initialised so
    that it starts at the uniform prediction, reads ``copy.features(x, layer, pool)``: the read-out is the
    representation the linear probe sees, with the method's own default layer and pooling unless given.
    Every parameter of the copy and the head is trained on cross-entropy (optionally label-smoothed) with
    AdamW: weight decay on matrices only (norms, biases and the method's ``no_weight_decay`` embeddings are
    exempt, as in pretraining), gradient-norm clipping at ``clip_grad`` (0: none), a linear learning-rate
    warm-up over ``warmup_epochs`` then a cosine to 0, ``epochs`` passes over a seeded shuffle (the last,
    incomplete batch is kept, since low-shot subsets are small), dropout on, bf16 autocast on CUDA.
    Images are augmented on the device with the batched augmentations pretraining uses
    (:func:`genrep.data.augment.augment`, seeded per step the way the training loop seeds it); ``"weak"``
    is the reflect-padded crop and flip of the supervised ViT. Afterwards the copy is evaluated in eval
    mode without augmentation: test accuracy and ECE (softmax of the head, ``ece_bins`` equal-width bins,
    :mod:`genrep.eval.metrics.calibration`), and accuracy and mean cross-entropy (without label smoothing) on the
    un-augmented train set.

    Defaults: none is a paper's. GCRL's "15 epochs" (section 4.2) are continued *pretraining* of its ImageNet32
    models on CIFAR with the pretraining objective (``genrep pretrain --init RUN``, the
    ``*-cifar10-from-imagenet32`` recipes), not supervised fine-tuning, which the paper does not run; 15 epochs
    here is only a short default. lr 1e-4, weight decay 0.05, batch 128, clipping at 1 and one warm-up epoch
    are common ViT fine-tuning values (and the repository's pretraining clip).

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

from ...data.augment import AUGMENTATIONS, augment
from ...data.batches import mix_seed
from ...data.imageset import ImageSet
from ...errors import GenrepError
from ...fields import Pool, setting
from ...methods import Method
from ...train.optim import build_optimizer, lr_at
from ..metrics.calibration import expected_calibration_error
from .context import check_causal, EvalContext

__all__ = ["FinetuneSettings", "finetune", "run"]

_EVAL_BATCH = 512


@dataclass
class FinetuneSettings:
    epochs: int = setting(15, min=1)         # a short default (GCRL's 15 epochs are continued pretraining)
    lr: float = setting(1e-4, above=0)
    batch_size: int = setting(128, min=1)
    layer: int | None = setting(None, min=1)  # the read-out: None = the method's default layer and pooling
    pool: Pool | None = None
    causal: bool | None = None                # causal methods: fine-tune with (true) or without (false) the mask


class _ReadOut(nn.Module):
    """The method's representation followed by a zero-initialised linear head."""

    def __init__(self, method: Method, layer: int, pool: str, dim: int, num_classes: int):
        super().__init__()
        self.method, self.layer, self.pool = method, layer, pool
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.method.features(x, self.layer, self.pool))


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


def _train(net: _ReadOut, train_set: ImageSet, device: torch.device, *, epochs: int, lr: float,
           weight_decay: float, batch_size: int, warmup_epochs: float, clip_grad: float, kind: str,
           label_smoothing: float, seed: int, progress: bool) -> int:
    n = len(train_set)
    b = min(batch_size, n)
    steps_per_epoch = math.ceil(n / b)
    total = epochs * steps_per_epoch
    warmup = min(round(warmup_epochs * steps_per_epoch), total - 1)  # as the pretraining loop's schedule
    no_decay = {f"method.{name}" for name in net.method.no_weight_decay()}
    opt = build_optimizer(net, lr, weight_decay, (0.9, 0.999), 1e-8, no_decay,
                          fused=device.type in ("cpu", "cuda"))
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="fine-tune", unit="step", leave=False, dynamic_ncols=True, disable=None)
    net.train()
    step = 0
    try:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 0xF17E)))
            perm = perm.to(device)
            loss_sum = torch.zeros((), device=device)
            for start in range(0, n, b):
                idx = perm[start:start + b]
                g = torch.Generator().manual_seed(mix_seed(seed, step, 0xA06))  # per step, as pretraining
                x = augment(images.index_select(0, idx), kind, g)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, warmup, lr, 0.0)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), labels.index_select(0, idx),
                                       label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad:
                    nn.utils.clip_grad_norm_(net.parameters(), clip_grad)
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
def finetune(method: Method, train_set: ImageSet, test_set: ImageSet, *, layer: int | None = None,
             pool: str | None = None, epochs: int = 15, lr: float = 1e-4, weight_decay: float = 0.05,
             batch_size: int = 128, warmup_epochs: float = 1.0, clip_grad: float = 1.0, augment: str = "weak",
             label_smoothing: float = 0.0, causal: bool | None = None, seed: int = 0,
             device: str | torch.device | None = None, ece_bins: int = 15, progress: bool = False) -> dict:
    """Fine-tune a copy of ``method`` with a fresh linear head on ``train_set``; evaluate on ``test_set``.

    See the module docstring for the protocol. ``device=None`` trains where the method's parameters are.
    Returns a JSON-serialisable dict: ``test_acc``, ``test_ece``, ``train_acc``, ``train_loss`` (un-augmented
    train set, after training), ``causal`` (the mask state trained with; None for a method without one), the
    settings used (``epochs``, ``steps``, ``lr``, ``weight_decay``, ``batch_size``, ``warmup_epochs``,
    ``augment``, ``label_smoothing``, ``layer``, ``pool``, ``seed``, ``ece_bins``), ``n_train``, ``n_test``,
    ``num_classes`` and ``seconds``.
    """
    t0 = time.perf_counter()
    check_image_sets(method, train_set, test_set)
    _number(epochs, "epochs", low=1, integer=True)
    _number(lr, "lr", low=0, low_open=True)
    _number(weight_decay, "weight_decay", low=0)
    _number(batch_size, "batch_size", low=1, integer=True)
    _number(warmup_epochs, "warmup_epochs", low=0)
    _number(clip_grad, "clip_grad", low=0)
    _number(label_smoothing, "label_smoothing", low=0, high=1, high_open=True)
    _number(ece_bins, "ece_bins", low=1, integer=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenrepError(f"seed must be an integer, got {seed!r}")
    if augment not in AUGMENTATIONS:
        raise GenrepError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    layer, pool = method.check_feature_args(layer, pool)
    check_causal(method, causal)
    dev = method_device(method, device)

    rng_devices = []  # fork the CUDA generator too: dropout there is seeded without touching the caller's
    if dev.type == "cuda":
        rng_devices = [torch.cuda.current_device() if dev.index is None else dev.index]
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)  # dropout, and nn.Linear's init before the head is zeroed
        model = copy.deepcopy(method)
        causal_state = _set_causal(model, causal)
        model.to(dev).requires_grad_(True)
        with torch.no_grad():
            dim = model.eval().features(train_set.images[:1].to(dev).float().div_(255), layer, pool).shape[1]
        net = _ReadOut(model, layer, pool, dim, train_set.num_classes).to(dev)
        steps = _train(net, train_set, dev, epochs=epochs, lr=lr, weight_decay=weight_decay,
                       batch_size=batch_size, warmup_epochs=warmup_epochs, clip_grad=clip_grad, kind=augment,
                       label_smoothing=label_smoothing, seed=seed, progress=progress)
    net.eval()
    test_logits = _logits(net, test_set.images, dev)
    train_logits = _logits(net, train_set.images, dev)
    if not (torch.isfinite(test_logits).all() and torch.isfinite(train_logits).all()):
        raise GenrepError(f"fine-tuning diverged (non-finite logits after training); lower lr (now {lr:g})")
    test_probs = test_logits.softmax(dim=1)
    return {
        "test_acc": float((test_logits.argmax(1) == test_set.labels).double().mean()),
        "test_ece": expected_calibration_error(test_probs, test_set.labels, ece_bins),
        "train_acc": float((train_logits.argmax(1) == train_set.labels).double().mean()),
        "train_loss": float(F.cross_entropy(train_logits, train_set.labels)),
        "causal": causal_state,
        "epochs": epochs, "steps": steps, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
        "warmup_epochs": warmup_epochs, "clip_grad": clip_grad, "augment": augment,
        "label_smoothing": label_smoothing,
        "layer": layer, "pool": pool, "seed": seed, "ece_bins": ece_bins,
        "n_train": len(train_set), "n_test": len(test_set), "num_classes": train_set.num_classes,
        "seconds": time.perf_counter() - t0,
    }


def finetune_kwargs(ctx: EvalContext) -> dict:
    """The fine-tuning settings of an evaluation, also low-shot's when its read-out is fine-tuning."""
    s = ctx.ev.finetune
    # the pretraining augmentation: weak flips and crops help CIFAR and wreck digits (its recipes use none)
    return dict(epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, augment=getattr(ctx.cfg.model, "augment", "none"),
                layer=s.layer, pool=s.pool, causal=s.causal)


def check(ctx: EvalContext) -> None:
    """The read-out and the causal switch must exist in this method; a transfer set must be available."""
    s = ctx.ev.finetune
    ctx.method.check_feature_args(s.layer, s.pool)
    check_causal(ctx.method, s.causal, "eval.finetune.causal")
    ctx.transfer_sets()


def run(ctx: EvalContext) -> dict:
    train, test = ctx.transfer_sets()
    out = finetune(ctx.method, train, test, **finetune_kwargs(ctx), seed=ctx.ev.seed, device=ctx.device,
                   ece_bins=ctx.ev.calibration.bins, progress=ctx.progress)
    return {**out, "data": train.name}
