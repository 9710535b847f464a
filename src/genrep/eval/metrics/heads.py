"""Classification heads on cached frozen features: linear, MLP, CNN and attention heads.

The heads of "Diffusion Models Beat GANs on Image Classification" (Mukhopadhyay et al., appendix A and
tables 7-9), trained on already-extracted features with the paper's VISSL-style recipe.  Every head ends in a
``Linear`` to ``num_classes``; none has BatchNorm.

``linear``     vector ``[N, D]`` -> ``Linear(D, K)``.
``mlp``        vector ``[N, D]`` -> ``(Linear, ReLU)`` per hidden size -> ``Linear(last, K)``
               (MLP-4k-2k: D=4096, ``hidden=(2048,)``), as the authors' ``ssl_diff/head.py``
               (soumik-kanad/diffssl).
``cnn``        map ``[N, C, H, W]`` -> two blocks of ``Conv2d(k=2)``, ReLU, ``MaxPool2d(2)``
               -> ``AdaptiveAvgPool2d(2)`` -> flatten -> ``Linear(4 * c2, K)``
               (CNN-1k-256-256: C=1024, ``channels=(256, 256)``).
``attention``  map ``[N, C, H, W]`` -> adaptive average pool to ``min(H, 8) x min(W, 8)`` -> tokens, a learned
               CLS token in front -> ``blocks`` pre-norm transformer blocks of width C -> ``Linear(C, K)`` on
               the CLS token.

Training (:func:`train_head`): Adam, ``epochs`` passes over a seeded shuffle, the learning rate multiplied by
``gamma`` every ``step_every`` epochs (``StepLR``, stepped per epoch), cross-entropy.  Inputs are standardised
with train statistics: per feature for vectors (the transform of :func:`probes.standardize`), per channel
(over N, H, W) for maps.  Features stay where they are (the CPU, float32 or a float16 cache); each batch is
gathered, cast to float32, normalised and moved to the training device, so no standardised copy is made.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import StepLR

from ...devices import resolve_device
from ...errors import GenrepError
from ...nn.transformer import Block
from .probes import _check_labels, _check_num_classes, _positive_float, _positive_int

__all__ = ["HEADS", "MAP_HEADS", "AttentionHead", "ConvHead", "HeadResult", "HeadSpec", "build_head",
           "head_params", "train_head"]

HEADS = ("linear", "mlp", "cnn", "attention")
MAP_HEADS = ("cnn", "attention")  # need feature maps [N, C, H, W]; the others take vectors [N, D]
MAX_TOKENS_SIDE = 8  # the paper pools the attention head's input to 8x8 = 64 tokens


@dataclass
class HeadSpec:
    """Which head and its size.  ``hidden`` is read by ``mlp``, ``channels`` (c1, c2) by ``cnn``, ``blocks``
    (transformer blocks) by ``attention``; the other fields are ignored."""

    kind: str
    hidden: tuple[int, ...] = (2048,)
    channels: tuple[int, int] = (256, 256)
    blocks: int = 1


@dataclass
class HeadResult:
    """Outcome of :func:`train_head`; JSON-ready through :meth:`to_dict`.  ``params`` counts the head's
    parameters (the K-class layer included); ``spec`` is the :class:`HeadSpec` as a dict."""

    head: str
    test_acc: float
    train_acc: float
    params: int
    epochs: int
    lr: float
    batch_size: int
    seconds: float
    spec: dict

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# heads


class ConvHead(nn.Module):
    """Two blocks of [Conv2d(k=2), ReLU, MaxPool2d(2)], a 2x2 adaptive average pool, then a Linear.

    The authors' public code (soumik-kanad/diffssl) ships no CNN head, so this follows appendix A's words:
    unpadded 2x2 convolutions (PyTorch's default) and 2x2 max pools; the ReLU after each convolution is our
    choice (the paper names no activation).  On a 16x16 map: 16 -> 15 -> 7 -> 6 -> 3 -> 2x2.  Small maps
    (the digits features go down to 1x1) still work: a side shorter than 2 is zero-padded (bottom/right) to
    2 before a convolution, and a pool uses a window of min(2, side), so it never empties the map; maps of at
    least 2x2 before each step are computed exactly as with the plain layers.
    """

    def __init__(self, in_channels: int, channels: tuple[int, int], num_classes: int):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=2)
        self.fc = nn.Linear(4 * c2, num_classes)

    @staticmethod
    def _block(x: Tensor, conv: nn.Conv2d) -> Tensor:
        h, w = x.shape[-2:]
        if h < 2 or w < 2:
            x = F.pad(x, (0, max(0, 2 - w), 0, max(0, 2 - h)))
        x = F.relu(conv(x))
        return F.max_pool2d(x, (min(2, x.shape[-2]), min(2, x.shape[-1])))

    def forward(self, x: Tensor) -> Tensor:
        x = self._block(self._block(x, self.conv1), self.conv2)
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def _num_heads(width: int) -> int:
    """The most attention heads among (8, 4, 2, 1) that divide ``width`` with a head dimension of at least 32
    (1 when none does): 8 at the paper's width 1024, as the authors' ``Attention:1024:8:4:N`` head."""
    return next((h for h in (8, 4, 2) if width % h == 0 and width // h >= 32), 1)


class AttentionHead(nn.Module):
    """CLS token + pre-norm transformer blocks over the pooled map's tokens, then a Linear on the CLS token.

    Follows the authors' ``ssl_diff/attention_head.py`` (soumik-kanad/diffssl, the CLS-token variant in its
    ``__main__``, whose counts are table 9's): CLS token initialised to zeros, no positional embedding,
    blocks of LayerNorm, attention without q/k/v biases, LayerNorm, MLP ratio 4 with GELU, and no final
    LayerNorm before the Linear.  The blocks are genrep's ``nn.transformer.Block``
    (scaled_dot_product_attention; its GELU is the tanh approximation and its LayerNorm eps 1e-6, where the
    authors' timm-style block has exact GELU and 1e-5: the same parameters).  The authors pool a 16x16 map
    with a 2x2 average pool; the adaptive pool to ``min(H, 8) x min(W, 8)`` is the same there and also serves
    other map sizes.
    """

    def __init__(self, width: int, num_classes: int, blocks: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, _num_heads(width), qkv_bias=False) for _ in range(blocks))
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
        return ConvHead(shape[0], tuple(spec.channels), num_classes)
    return AttentionHead(shape[0], num_classes, spec.blocks)


def head_params(spec: HeadSpec, in_shape: tuple[int, ...], num_classes: int) -> int:
    """Parameters of the head (the K-class layer included), counted on the meta device: no memory, no init."""
    with torch.device("meta"):
        head = build_head(spec, in_shape, num_classes)
    return sum(p.numel() for p in head.parameters())


# --------------------------------------------------------------------------------------------------
# training


def _rows_per_chunk(x: Tensor) -> int:
    return max(1, (1 << 22) // max(1, x[0].numel()))  # ~4M elements: bounded float32/float64 temporaries


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
    """Chunked, so a float16 cache is never copied whole to float32."""
    step = _rows_per_chunk(x)
    bad = sum(int((~torch.isfinite(x[s:s + step].float())).flatten(1).any(dim=1).sum())
              for s in range(0, x.shape[0], step))
    if bad:
        raise GenrepError(f"{name} has non-finite values (NaN/inf) in {bad} of {x.shape[0]} rows; "
                          "drop or fix those rows before training a head")


def _feature_stats(x: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(mean, 1 / (std + eps)) of the train features, per feature for [N, D], per channel for [N, C, H, W]
    (shaped [C, 1, 1] to broadcast).  std is the population std, as :func:`probes.standardize`; the moments
    are merged chunk by chunk in float64 (Chan et al.), so no full-size copy is made."""
    dims = (0,) if x.ndim == 2 else (0, 2, 3)
    count, mean, m2 = 0, 0.0, 0.0
    step = _rows_per_chunk(x)
    for s in range(0, x.shape[0], step):
        chunk = x[s:s + step].double()
        n = chunk.numel() // chunk.shape[1]
        var_c, mean_c = torch.var_mean(chunk, dim=dims, unbiased=False)
        delta = mean_c - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + var_c * n + delta.square() * (count * n / total)
        count = total
    scale = 1.0 / ((m2 / count).sqrt() + eps)
    shape = (-1,) if x.ndim == 2 else (-1, 1, 1)
    return mean.float().view(shape), scale.float().view(shape)


def _accuracy(head: nn.Module, x: Tensor, y: Tensor, norm: tuple[Tensor, Tensor], device: torch.device,
              batch_size: int, autocast: bool) -> float:
    head.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for s in range(0, x.shape[0], batch_size):
            logits = head(_batch(x[s:s + batch_size], norm, device))
            correct += int((logits.argmax(dim=1) == y[s:s + batch_size]).sum())
    return correct / x.shape[0]


def _batch(x: Tensor, norm: tuple[Tensor, Tensor], device: torch.device) -> Tensor:
    mean, scale = norm
    return (x.to(device, non_blocking=True).float() - mean) * scale


def train_head(spec: HeadSpec, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
               num_classes: int, *, epochs: int = 28, lr: float = 1e-3, step_every: int = 8,
               gamma: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0,
               device=None, bf16: bool = False) -> HeadResult:
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
    epochs, batch_size = _positive_int(epochs, "epochs"), _positive_int(batch_size, "batch_size")
    step_every = _positive_int(step_every, "step_every")
    lr, gamma = _positive_float(lr, "lr"), _positive_float(gamma, "gamma")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (
            math.isfinite(weight_decay) and weight_decay >= 0):
        raise GenrepError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenrepError(f"seed must be an integer, got {seed!r}")
    device = train_x.device if device is None else (
        resolve_device(device) if isinstance(device, str) else torch.device(device))
    train_y = _check_labels(train_y, "train_y", train_x.shape[0], num_classes, device)
    test_y = _check_labels(test_y, "test_y", test_x.shape[0], num_classes, device)
    _check_finite(train_x, "train_x")
    _check_finite(test_x, "test_x")
    autocast = bool(bf16) and device.type == "cuda"

    norm = tuple(t.to(device) for t in _feature_stats(train_x))
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: the head is built on the CPU
        torch.manual_seed(seed)
        head = build_head(spec, in_shape, num_classes)
    head.to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = StepLR(opt, step_size=step_every, gamma=gamma)
    gen = torch.Generator().manual_seed(seed)
    n = train_x.shape[0]
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            xb = _batch(train_x[idx.to(train_x.device)], norm, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(head(xb).float(), train_y[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()  # per epoch: lr * gamma ** (epoch // step_every), VISSL's StepLR

    eval_batch = 4 * batch_size  # no activations kept for backward: larger chunks fit
    return HeadResult(
        head=spec.kind,
        test_acc=_accuracy(head, test_x, test_y, norm, device, eval_batch, autocast),
        train_acc=_accuracy(head, train_x, train_y, norm, device, eval_batch, autocast),
        params=sum(p.numel() for p in head.parameters()), epochs=epochs, lr=lr, batch_size=batch_size,
        seconds=time.perf_counter() - t0,
        spec={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()})
