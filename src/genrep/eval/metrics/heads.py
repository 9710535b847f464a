"""Classification heads on cached frozen features: linear, MLP, CNN and attention heads.

The heads of "Diffusion Models Beat GANs on Image Classification" (Mukhopadhyay et al., appendix A and
tables 7-9), trained on already-extracted features with the paper's VISSL-style recipe.  Every head ends in a
``Linear`` to ``num_classes``; none has BatchNorm.

``linear``     vector ``[N, D]`` -> ``Linear(D, K)``.
``mlp``        vector ``[N, D]`` -> ``(Linear, ReLU)`` per hidden size -> ``Linear(last, K)``
               (MLP-4k-2k: D=4096, ``hidden=(2048,)``), as the authors' ``ssl_diff/head.py``
               (soumik-kanad/diffssl).
``cnn``        map ``[N, C, H, W]`` -> two blocks of ``Conv2d(k=2)``, ReLU (``relu``; genrep's choice),
               ``MaxPool2d(2)`` -> ``AdaptiveAvgPool2d(2)`` -> flatten -> ``Linear(4 * c2, K)``
               (CNN-1k-256-256: C=1024, ``channels=(256, 256)``).
``attention``  map ``[N, C, H, W]`` -> adaptive average pool to ``min(H, 8) x min(W, 8)`` -> tokens, a learned
               CLS token in front -> ``blocks`` pre-norm transformer blocks of width C -> ``Linear(C, K)`` on
               the CLS token.

Training: ``epochs`` passes over a seeded shuffle with Adam or SGD (``optimizer``, ``momentum``), the learning
rate multiplied by ``gamma`` every ``step_every`` epochs (``StepLR``, stepped per epoch), cross-entropy.  With
``standardize`` the inputs are standardised with train statistics: per feature for vectors (the transform of
:func:`probes.standardize`), per channel (over N, H, W) for maps; without it they are read raw (the paper: "no
batch norm").  :func:`train_head` trains on cached features: they stay where they are (the CPU, float32 or a
float16 cache); each batch is gathered, cast to float32, normalised and moved to the training device, so no
standardised copy is made.  :func:`train_head_streamed` trains on features a caller makes per batch and epoch (a
new noise draw and augmentation each epoch, extracted on the fly), and scores the head on a stream of test
features; it knows no method, only the callables it is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import StepLR

from ...devices import resolve_device
from ...errors import GenrepError
from ...nn.transformer import Block
from .probes import _check_labels, _check_num_classes, _positive_float, _positive_int
from .rows import Moments, bad_rows, feature_stats

__all__ = ["HEADS", "MAP_HEADS", "OPTIMIZERS", "AttentionHead", "ConvHead", "HeadResult", "HeadSpec", "build_head",
           "head_params", "train_head", "train_head_streamed"]

HEADS = ("linear", "mlp", "cnn", "attention")
MAP_HEADS = ("cnn", "attention")  # need feature maps [N, C, H, W]; the others take vectors [N, D]
OPTIMIZERS = ("adam", "sgd")
MAX_TOKENS_SIDE = 8  # the paper pools the attention head's input to 8x8 = 64 tokens
ATTENTION_LN_EPS = 1e-5  # the authors' timm-style block: nn.LayerNorm's default


@dataclass
class HeadSpec:
    """Which head and its size.  ``hidden`` is read by ``mlp``, ``channels`` (c1, c2) and ``relu`` (a ReLU after
    each convolution) by ``cnn``, ``blocks`` (transformer blocks) by ``attention``; the other fields are ignored."""

    kind: str
    hidden: tuple[int, ...] = (2048,)
    channels: tuple[int, int] = (256, 256)
    blocks: int = 1
    relu: bool = True


@dataclass
class HeadResult:
    """Outcome of :func:`train_head` and :func:`train_head_streamed`; JSON-ready through :meth:`to_dict`.
    ``params`` counts the head's parameters (the K-class layer included); ``spec`` is the :class:`HeadSpec` as a
    dict; the schedule's fields are what it trained with.  ``train_acc_on`` says what ``train_acc`` counts: the
    train split scored after training (cached features), or the last epoch's training batches as they were
    trained on (streamed: scoring the train split again would be one more extraction pass over it)."""

    head: str
    test_acc: float
    train_acc: float
    params: int
    epochs: int
    lr: float
    batch_size: int
    seconds: float
    spec: dict
    optimizer: str = "adam"
    momentum: float = 0.0
    step_every: int = 8
    gamma: float = 0.1
    weight_decay: float = 0.0
    standardize: bool = True
    train_acc_on: str = "train split"

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# heads


class ConvHead(nn.Module):
    """Two blocks of [Conv2d(k=2), ReLU, MaxPool2d(2)], a 2x2 adaptive average pool, then a Linear.

    The authors' public code (soumik-kanad/diffssl) ships no CNN head, so this follows appendix A's words:
    unpadded 2x2 convolutions (PyTorch's default) and 2x2 max pools; the ReLU after each convolution is our
    choice (the paper names no activation; ``relu=False`` leaves it out, the max pools the only non-linearity).  On a 16x16 map: 16 -> 15 -> 7 -> 6 -> 3 -> 2x2.  Small maps
    (the digits features go down to 1x1) still work: a side shorter than 2 is zero-padded (bottom/right) to
    2 before a convolution, and a pool uses a window of min(2, side), so it never empties the map; maps of at
    least 2x2 before each step are computed exactly as with the plain layers.
    """

    def __init__(self, in_channels: int, channels: tuple[int, int], num_classes: int, relu: bool = True):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=2)
        self.fc = nn.Linear(4 * c2, num_classes)
        self.relu = relu

    def _block(self, x: Tensor, conv: nn.Conv2d) -> Tensor:
        h, w = x.shape[-2:]
        if h < 2 or w < 2:
            x = F.pad(x, (0, max(0, 2 - w), 0, max(0, 2 - h)))
        x = conv(x)
        if self.relu:
            x = F.relu(x)
        return F.max_pool2d(x, (min(2, x.shape[-2]), min(2, x.shape[-1])))

    def forward(self, x: Tensor) -> Tensor:
        x = self._block(self._block(x, self.conv1), self.conv2)
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def _num_heads(width: int) -> int:
    """The most attention heads among (8, 4, 2, 1) that divide ``width`` with a head dimension of at least 32
    (1 when none does): 8 at the paper's width 1024, as the authors' ``Attention:1024:8:4:N`` head."""
    return next((h for h in (8, 4, 2) if width % h == 0 and width // h >= 32), 1)


def _authors_block(width: int) -> Block:
    """genrep's Block with the authors' exact GELU and LayerNorm eps 1e-5 where Block has the tanh GELU and 1e-6
    (ViT's, which its other users keep): set on this instance, so the parameters and Block itself are unchanged."""
    block = Block(width, _num_heads(width), qkv_bias=False)
    block.norm1.eps = block.norm2.eps = ATTENTION_LN_EPS
    block.mlp.act = nn.GELU()
    return block


class AttentionHead(nn.Module):
    """CLS token + pre-norm transformer blocks over the pooled map's tokens, then a Linear on the CLS token.

    Follows the authors' ``ssl_diff/attention_head.py`` (soumik-kanad/diffssl, the CLS-token variant in its
    ``__main__``, whose counts are table 9's): CLS token initialised to zeros, no positional embedding,
    blocks of LayerNorm, attention without q/k/v biases, LayerNorm, MLP ratio 4 with GELU, and no final
    LayerNorm before the Linear.  The blocks are genrep's ``nn.transformer.Block``
    (scaled_dot_product_attention) given what the authors' timm-style block has (:func:`_authors_block`).  The
    authors pool a 16x16 map with a 2x2 average pool; the adaptive pool to ``min(H, 8) x min(W, 8)`` is the same
    there and also serves other map sizes.
    """

    def __init__(self, width: int, num_classes: int, blocks: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(_authors_block(width) for _ in range(blocks))
        self.fc = nn.Linear(width, num_classes)

    def tokens(self, x: Tensor) -> Tensor:
        """Map [B, C, H, W] -> tokens [B, 1 + h * w, C] (CLS first), h, w = min(H, 8), min(W, 8)."""
        size = (min(x.shape[-2], MAX_TOKENS_SIDE), min(x.shape[-1], MAX_TOKENS_SIDE))
        x = F.adaptive_avg_pool2d(x, size).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        t = self.tokens(x)
        for block in self.blocks:
            t = block(t)
        return self.fc(t[:, 0])


def _check_spec(spec: HeadSpec) -> None:
    if not isinstance(spec, HeadSpec):
        raise GenrepError(f"expected a HeadSpec, got {type(spec).__name__}")
    if spec.kind not in HEADS:
        raise GenrepError(f"unknown head {spec.kind!r}; choose one of {', '.join(HEADS)}")

    def positive_ints(values, name, length=None):
        ok = isinstance(values, (tuple, list)) and len(values) > 0 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
        if not ok or (length is not None and len(values) != length):
            what = f"{length} positive integers" if length else "a non-empty list of positive integers"
            raise GenrepError(f"the {spec.kind} head's {name} must be {what}, got {values!r}")

    if spec.kind == "mlp":
        positive_ints(spec.hidden, "hidden sizes")
    elif spec.kind == "cnn":
        positive_ints(spec.channels, "channels (c1, c2)", 2)
    elif spec.kind == "attention":
        positive_ints([spec.blocks], "number of blocks", 1)


def _check_in_shape(kind: str, in_shape) -> tuple[int, ...]:
    shape = tuple(in_shape)
    if kind in MAP_HEADS and len(shape) != 3:
        raise GenrepError(f"the {kind} head needs feature maps [N, C, H, W] (in_shape (C, H, W)), got "
                          f"in_shape {shape}; read the features as maps (unpooled) or choose linear or mlp")
    if kind not in MAP_HEADS and len(shape) != 1:
        raise GenrepError(f"the {kind} head needs feature vectors [N, D] (in_shape (D,)), got in_shape "
                          f"{shape}; pool and flatten the maps first, or choose cnn or attention")
    if not all(isinstance(s, int) and s >= 1 for s in shape):
        raise GenrepError(f"in_shape must hold positive integers, got {shape}")
    return shape


def build_head(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The head ``spec`` for inputs of shape ``in_shape`` ((D,) for vector heads, (C, H, W) for map heads)."""
    _check_spec(spec)
    shape = _check_in_shape(spec.kind, in_shape)
    num_classes = _check_num_classes(num_classes)
    if spec.kind == "linear":
        return nn.Linear(shape[0], num_classes)
    if spec.kind == "mlp":
        layers, width = [], shape[0]
        for h in spec.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, num_classes))
    if spec.kind == "cnn":
        return ConvHead(shape[0], tuple(spec.channels), num_classes, relu=bool(spec.relu))
    return AttentionHead(shape[0], num_classes, spec.blocks)


def head_params(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int) -> int:
    """Parameters of the head (the K-class layer included), counted on the meta device: no memory, no init."""
    with torch.device("meta"):
        head = build_head(spec, in_shape, num_classes)
    return sum(p.numel() for p in head.parameters())


# --------------------------------------------------------------------------------------------------
# training


def _check_x(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise GenrepError(f"{name} must be a tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                  torch.int64)):
        raise GenrepError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise GenrepError(f"{name} must be a non-empty batch of features [N, ...], "
                          f"got shape {tuple(x.shape)}")
    return x


def _check_finite(x: Tensor, name: str) -> None:
    bad = bad_rows(x)
    if bad:
        raise GenrepError(f"{name} has non-finite values (NaN/inf) in {bad} of {x.shape[0]} rows; "
                          "drop or fix those rows before training a head")


def _batch(x: Tensor, norm: tuple[Tensor, Tensor] | None, device: torch.device) -> Tensor:
    x = x.to(device, non_blocking=True).float()
    if norm is None:
        return x
    mean, scale = norm
    return (x - mean) * scale


def _accuracy(head: nn.Module, batches: Iterable[Tensor], y: Tensor, norm: tuple[Tensor, Tensor] | None,
              device: torch.device, autocast: bool) -> float:
    """Accuracy over feature batches that cover the rows of ``y`` in order."""
    head.eval()
    correct, seen = 0, 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for x in batches:
            logits = head(_batch(x, norm, device))
            correct += int((logits.argmax(dim=1) == y[seen:seen + x.shape[0]]).sum())
            seen += x.shape[0]
    if seen != y.shape[0]:
        raise GenrepError(f"the test features covered {seen} rows but there are {y.shape[0]} test labels")
    return correct / y.shape[0]


def _chunks(x: Tensor, batch_size: int):
    return (x[s:s + batch_size] for s in range(0, x.shape[0], batch_size))


def _check_schedule(epochs, lr, step_every, gamma, batch_size, weight_decay, optimizer, momentum, seed) -> None:
    _positive_int(epochs, "epochs"), _positive_int(batch_size, "batch_size"), _positive_int(step_every, "step_every")
    _positive_float(lr, "lr"), _positive_float(gamma, "gamma")
    for value, name in ((weight_decay, "weight_decay"), (momentum, "momentum")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise GenrepError(f"{name} must be a finite number >= 0, got {value!r}")
    if optimizer not in OPTIMIZERS:
        raise GenrepError(f"optimizer {optimizer!r} is unknown; choose {', '.join(OPTIMIZERS)}")
    if momentum and optimizer != "sgd":
        raise GenrepError(f"momentum {momentum!r} applies to the sgd optimizer; Adam keeps its own moments: "
                          "leave momentum 0 or choose sgd")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenrepError(f"seed must be an integer, got {seed!r}")


def _fit(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int, train_y: Tensor,
         batch_of: Callable[[Tensor, int], Tensor], norm: tuple[Tensor, Tensor] | None, *, epochs: int, lr: float,
         step_every: int, gamma: float, batch_size: int, weight_decay: float, optimizer: str, momentum: float,
         seed: int, device: torch.device, autocast: bool) -> tuple[nn.Module, float]:
    """Train a new head on ``batch_of(rows, epoch)`` (features of those train rows, any device and real dtype):
    (the head, its accuracy over the last epoch's batches as it trained on them)."""
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: the head is built on the CPU
        torch.manual_seed(seed)
        head = build_head(spec, in_shape, num_classes)
    head.to(device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = StepLR(opt, step_size=step_every, gamma=gamma)
    gen = torch.Generator().manual_seed(seed)
    n = train_y.shape[0]
    correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no sync per step
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            xb = _batch(batch_of(idx, epoch), norm, device)
            yb = train_y[idx.to(device)]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits = head(xb).float()
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch == epochs - 1:
                correct += (logits.detach().argmax(dim=1) == yb).sum()
        sched.step()  # per epoch: lr * gamma ** (epoch // step_every), VISSL's StepLR
    return head, int(correct) / n


def _device(device, fallback: torch.device) -> torch.device:
    if device is None:
        return fallback
    return resolve_device(device) if isinstance(device, str) else torch.device(device)


def _result(spec: HeadSpec, head: nn.Module, test_acc: float, train_acc: float, t0: float, train_acc_on: str,
            **schedule) -> HeadResult:
    keep = ("epochs", "lr", "batch_size", "optimizer", "momentum", "step_every", "gamma", "weight_decay",
            "standardize")
    return HeadResult(
        head=spec.kind, test_acc=test_acc, train_acc=train_acc, params=sum(p.numel() for p in head.parameters()),
        seconds=time.perf_counter() - t0, train_acc_on=train_acc_on,
        spec={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()},
        **{k: schedule[k] for k in keep})


def train_head(spec: HeadSpec, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
               num_classes: int, *, epochs: int = 28, lr: float = 1e-3, step_every: int = 8,
               gamma: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0, optimizer: str = "adam",
               momentum: float = 0.0, standardize: bool = True, seed: int = 0, device=None,
               bf16: bool = False) -> HeadResult:
    """Train the head ``spec`` on frozen features and report train/test accuracy (see the module docstring).

    ``train_x``/``test_x``: [N, D] for linear/mlp, [N, C, H, W] for cnn/attention, on any device, any real
    dtype (cast to float32 per batch).  ``device``: where the head trains (default: ``train_x``'s device).
    ``bf16``: bfloat16 autocast, on CUDA only.  The head is initialised from ``seed`` without touching the
    global RNG, and the shuffle comes from a generator seeded by ``seed``, so two calls on the CPU give
    identical results.
    """
    t0 = time.perf_counter()
    _check_spec(spec)
    num_classes = _check_num_classes(num_classes)
    train_x, test_x = _check_x(train_x, "train_x"), _check_x(test_x, "test_x")
    in_shape = tuple(train_x.shape[1:])
    _check_in_shape(spec.kind, in_shape)
    if tuple(test_x.shape[1:]) != in_shape:
        raise GenrepError(f"test_x has per-sample shape {tuple(test_x.shape[1:])} but train_x has "
                          f"{in_shape}; both must come from the same feature extractor")
    schedule = dict(epochs=epochs, lr=lr, step_every=step_every, gamma=gamma, batch_size=batch_size,
                    weight_decay=weight_decay, optimizer=optimizer, momentum=momentum)
    _check_schedule(**schedule, seed=seed)
    device = _device(device, train_x.device)
    train_y = _check_labels(train_y, "train_y", train_x.shape[0], num_classes, device)
    test_y = _check_labels(test_y, "test_y", test_x.shape[0], num_classes, device)
    _check_finite(train_x, "train_x")
    _check_finite(test_x, "test_x")
    autocast = bool(bf16) and device.type == "cuda"

    norm = tuple(t.to(device) for t in feature_stats(train_x)) if standardize else None
    head, _ = _fit(spec, in_shape, num_classes, train_y, lambda idx, _epoch: train_x[idx.to(train_x.device)], norm,
                   **schedule, seed=seed, device=device, autocast=autocast)
    eval_batch = 4 * batch_size  # no activations kept for backward: larger chunks fit
    test_acc = _accuracy(head, _chunks(test_x, eval_batch), test_y, norm, device, autocast)
    train_acc = _accuracy(head, _chunks(train_x, eval_batch), train_y, norm, device, autocast)
    return _result(spec, head, test_acc, train_acc, t0, "train split", **schedule, standardize=bool(standardize))


def train_head_streamed(spec: HeadSpec, in_shape: tuple[int, ...], train_y: Tensor, test_y: Tensor,
                        num_classes: int, *, train_batch: Callable[[Tensor, int], Tensor],
                        test_batches: Callable[[], Iterable[Tensor]],
                        stats_batches: Callable[[], Iterable[Tensor]] | None = None, epochs: int = 28,
                        lr: float = 1e-3, step_every: int = 8, gamma: float = 0.1, batch_size: int = 256,
                        weight_decay: float = 0.0, optimizer: str = "adam", momentum: float = 0.0,
                        seed: int = 0, device=None, bf16: bool = False) -> HeadResult:
    """Train the head ``spec`` on features made per batch and epoch, and score it on streamed test features.

    ``train_batch(rows, epoch)``: features [len(rows), *in_shape] of those train rows for that epoch (a new noise
    draw and augmentation each epoch, extracted on the fly); ``test_batches()``: the test features in order,
    in batches; ``stats_batches()``: train features to standardise with (None: raw inputs).  ``train_acc``
    counts the last epoch's training batches.  Seeds as :func:`train_head`: the same callables give the same
    head.
    """
    t0 = time.perf_counter()
    _check_spec(spec)
    num_classes = _check_num_classes(num_classes)
    in_shape = _check_in_shape(spec.kind, in_shape)
    schedule = dict(epochs=epochs, lr=lr, step_every=step_every, gamma=gamma, batch_size=batch_size,
                    weight_decay=weight_decay, optimizer=optimizer, momentum=momentum)
    _check_schedule(**schedule, seed=seed)
    device = _device(device, torch.device("cpu"))
    train_y = _check_labels(train_y, "train_y", len(train_y), num_classes, device)
    test_y = _check_labels(test_y, "test_y", len(test_y), num_classes, device)
    autocast = bool(bf16) and device.type == "cuda"
    norm = None
    if stats_batches is not None:
        moments = Moments()
        for x in stats_batches():
            moments.add(x)
        norm = tuple(t.to(device) for t in moments.norm())
    head, train_acc = _fit(spec, in_shape, num_classes, train_y, train_batch, norm, **schedule, seed=seed,
                           device=device, autocast=autocast)
    test_acc = _accuracy(head, test_batches(), test_y, norm, device, autocast)
    return _result(spec, head, test_acc, train_acc, t0, "last epoch's training batches", **schedule,
                   standardize=stats_batches is not None)
