"""Frozen-feature probes on cached feature tensors: linear probe and weighted kNN.

Both probes take already-extracted features (float tensors ``[N, D]``) with integer labels and run on
whichever device the *train* features live on (the other tensors are moved there).  Everything is
computed in float32.

Linear probe (:func:`linear_probe`)
    Features are standardised with train statistics (:func:`standardize`; ``standardize=False`` fits the raw
    features, as GCRL's section 4.2 protocol, which names nothing but the optimiser).  Then a multinomial logistic
    regression ``logits = x @ W.T + b`` is fitted by minimising

        mean_i CE(logits_i, y_i) + weight_decay / 2 * ||W||^2          (bias unpenalised)

    * ``solver="lbfgs"``: full batch, :class:`torch.optim.LBFGS` with a strong-Wolfe line search, from
      zero initialisation (the problem is convex, so the result does not depend on a seed).  This is the
      same objective as scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))`` (sklearn
      minimises ``C * sum_i CE_i + ||W||^2 / 2``; divide by ``C * N``).
    * ``solver="adamw"``: the GCRL linear evaluation protocol: mini-batch AdamW (decoupled weight decay,
      applied to ``W`` only), ``epochs`` passes over a seeded shuffle, zero initialisation; the learning rate
      follows ``lr_schedule`` (``LR_SCHEDULES``): ``cosine`` per step from ``lr`` to 0, or ``constant``
      (section 4.2 names no schedule).
    * ``solver="lars"``: MAE's linear probe (``main_linprobe.py``; DARL's table 13): a parameter-free BatchNorm
      (``affine=False``, eps 1e-6: batch statistics while training, running statistics, momentum 0.1, at test)
      before the linear layer, :class:`~genrep.eval.metrics.lars.LARS` (momentum, trust coefficient; weight decay
      on ``W`` only, and ``W`` alone gets the trust ratio), ``W`` drawn from a truncated normal of std 0.01 and
      ``b = 0``, the rate ``base_lr * batch / 256`` with the batch clamped to the rows fitted, linear warm-up over
      ``warmup_epochs`` then a half-cycle cosine to 0, both per step, and whole batches only (the remainder of
      each seeded shuffle is dropped, as MAE's loader); the cross-entropy may be label-smoothed (``label_smoothing``:
      DARL's table 13 has 0.1, MAE's code none). The fitted BatchNorm is folded into ``W`` and ``b``, so
      the classifier reported and scored is linear on the raw features.

    If ``weight_decay`` is a sequence of several values, each is fitted on a seeded random split of the
    train set (``1 - val_fraction`` for fitting, ``val_fraction`` held out; standardised with the
    fitting part's statistics) and scored on the held-out part; the value with the best held-out
    accuracy (ties: lowest held-out cross-entropy, then the larger weight decay) is refitted on the
    full train set.  The sweep is reported in :attr:`LinearProbeResult.sweep`.

Weighted kNN (:func:`knn_classify`)
    The InstDisc / DINO protocol: features are L2-normalised, the ``k`` nearest train features of each
    test feature by cosine similarity vote for their labels with weight ``exp(sim / temperature)``,
    and the class with the largest summed weight wins.  Test rows are processed in chunks of
    ``batch_size`` so memory stays ``O(batch_size * N_train)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import GenrepError
from .lars import LARS
from .rows import Rows, bad_rows, streams

__all__ = ["LR_SCHEDULES", "SOLVERS", "LinearProbeResult", "knn_classify", "knn_predict", "linear_probe", "standardize"]

SOLVERS = ("lbfgs", "adamw", "lars")
LR_SCHEDULES = ("cosine", "constant")  # the adamw solver's learning rate over its steps


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`; every field but ``test_probs`` is JSON-serialisable (:meth:`to_dict`).

    ``weight_decay`` is the value used for the final fit (the chosen one when a sweep ran).
    ``epochs_or_iters`` is the number of LBFGS iterations actually run (solver ``"lbfgs"``) or the number
    of epochs (solver ``"adamw"``).  ``train_loss`` is the mean cross-entropy on the full train set of
    the final fit (without the penalty).  ``converged`` is whether LBFGS stopped on its tolerances rather
    than on ``max_iter`` (``None`` for AdamW).  ``sweep`` has one entry per candidate weight decay
    (``{"weight_decay", "val_acc", "val_loss"}``, in the order given), empty when no sweep ran.
    ``test_probs`` is the final fit's softmax over the test rows (float32 ``[N_test, K]`` on the CPU) when
    :func:`linear_probe` was asked for it (``return_test_probs=True``, e.g. for an ECE), else ``None``;
    :meth:`to_dict` leaves it out. ``solver_settings`` holds what the final fit ran with beyond the fields above
    (adamw: lr, batch size, schedule; lars: the base and scaled rate, the batch asked for and used, steps per epoch,
    warm-up, momentum, trust coefficient, label smoothing, the feature BatchNorm and the head's start).
    """

    test_acc: float
    train_acc: float
    weight_decay: float
    solver: str
    epochs_or_iters: int
    train_loss: float = float("nan")
    converged: bool | None = None
    num_classes: int = 0
    n_train: int = 0
    n_test: int = 0
    dim: int = 0
    val_fraction: float | None = None
    sweep: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    solver_settings: dict = field(default_factory=dict)
    test_probs: Tensor | None = field(default=None, repr=False, compare=False)
    # the fitted classifier on the raw features (any standardisation folded in): logits = x @ weight.T + bias
    weight: Tensor | None = field(default=None, repr=False, compare=False)
    bias: Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(replace(self, test_probs=None, weight=None, bias=None))  # no deep copy of tensors only to drop them
        for key in ("test_probs", "weight", "bias"):
            del d[key]
        return d


# --------------------------------------------------------------------------------------------------
# input checks


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except Exception as exc:
        raise GenrepError(f"{name} must be a tensor (or array-like), got {type(x).__name__}") from exc


def _check_features(x, name: str, device: torch.device | None = None) -> Tensor | Rows:
    """The features as float32 on ``device`` (default: where they are), or, for a half-precision matrix on the CPU
    (a float16 cache mapped from its file), :class:`Rows` reading it in blocks onto that device."""
    if isinstance(x, Rows):
        return x
    x = _as_tensor(x, name)
    if x.ndim != 2:
        raise GenrepError(f"{name} must be a 2-D feature tensor [N, D], got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32,
                                                  torch.int64)):
        raise GenrepError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise GenrepError(f"{name} is empty (0 rows); pass at least one feature row")
    if x.shape[1] == 0:
        raise GenrepError(f"{name} has 0 feature dimensions; pass features of shape [N, D] with D >= 1")
    if streams(x):
        bad = bad_rows(x)
        if bad:
            raise GenrepError(f"{name} has non-finite values (NaN/inf) in {bad} of {x.shape[0]} rows; "
                              "drop or fix those rows before probing")
        return Rows(x, x.device if device is None else device)
    if device is not None:
        x = x.to(device)
    x = x.float()
    # one cheap reduction first; the element-wise check only when the sum is not finite (NaN/inf, or
    # overflow of huge-but-finite values)
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise GenrepError(f"{name} has non-finite values (NaN/inf) in {bad} of {x.shape[0]} rows; "
                          "drop or fix those rows before probing")
    return x


def _check_labels(y, name: str, n: int, num_classes: int, device: torch.device) -> Tensor:
    y = _as_tensor(y, name)
    if y.ndim != 1:
        raise GenrepError(f"{name} must be a 1-D tensor of class indices, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise GenrepError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.shape[0] != n:
        raise GenrepError(f"{name} has {y.shape[0]} labels but the features have {n} rows; "
                          "they must have the same length")
    y = y.to(device=device, dtype=torch.long)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise GenrepError(f"{name} has labels in [{lo}, {hi}] but num_classes={num_classes}; "
                          f"labels must lie in [0, {num_classes - 1}]")
    return y


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise GenrepError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def _check_data(train_x, train_y, test_x, test_y, num_classes, device=None):
    num_classes = _check_num_classes(num_classes)
    train_x = _check_features(train_x, "train_x", device)
    device = train_x.device
    test_x = _check_features(test_x, "test_x", device)
    if test_x.shape[1] != train_x.shape[1]:
        raise GenrepError(f"test_x has {test_x.shape[1]} feature dimensions but train_x has "
                          f"{train_x.shape[1]}; both must come from the same feature extractor")
    train_y = _check_labels(train_y, "train_y", train_x.shape[0], num_classes, device)
    if test_y is not None:
        test_y = _check_labels(test_y, "test_y", test_x.shape[0], num_classes, device)
    return train_x, train_y, test_x, test_y, num_classes


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GenrepError(f"{name} must be a positive integer, got {value!r}")
    return value


def _positive_float(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise GenrepError(f"{name} must be a finite number > 0, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------------
# standardisation


def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Standardise ``train`` and ``others`` with the per-feature mean and std of ``train`` only.

    Returns ``((train - mean) / (std + eps), *((o - mean) / (std + eps) for o in others))``, where std is
    the population standard deviation (``unbiased=False``, as scikit-learn's ``StandardScaler``).  A
    constant feature maps to 0.  Statistics are computed in float32 (float64 for float64 input);
    outputs keep the input's floating dtype (integer inputs become float32).
    """
    tensors = (train, *others)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise GenrepError(f"standardize expects 2-D tensors [N, D]; argument {i} is {shape}")
        if t.shape[1] != train.shape[1]:
            raise GenrepError(f"standardize: argument {i} has {t.shape[1]} feature dimensions but the "
                              f"train tensor has {train.shape[1]}; they must match")
    if train.shape[0] == 0:
        raise GenrepError("standardize: the train tensor is empty; statistics need at least one row")
    return _apply_norm(tensors, _mean_scale(train, eps))


def _mean_scale(train: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(mean, 1 / (std + eps)) per feature of ``train``, in float32 (float64 for float64 input)."""
    acc = torch.float64 if train.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(train.to(acc), dim=0, unbiased=False)  # Welford: no float64 copy needed
    return mean, 1.0 / (var.sqrt() + eps)


def _apply_norm(tensors, norm: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    mean, scale = norm
    out = []
    for t in tensors:
        dtype = t.dtype if t.is_floating_point() else torch.float32
        m, s = mean.to(device=t.device, dtype=dtype), scale.to(device=t.device, dtype=dtype)
        out.append((t.to(dtype) - m) * s)
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# linear probe


def _standardized(train, *others) -> tuple[tuple, tuple[Tensor, Tensor]]:
    """:func:`standardize` (or for :class:`Rows` the same transform applied to each block as it is read), and the
    (mean, scale) it applied, which the saved classifier folds in."""
    if not any(isinstance(x, Rows) for x in (train, *others)):
        norm = _mean_scale(train)
        return _apply_norm((train, *others), norm), norm
    train, *others = (x if isinstance(x, Rows) else Rows(x, x.device) for x in (train, *others))
    norm = train.stats()
    return tuple(x.standardized(norm) for x in (train, *others)), norm


def _chunk(x, chunk: int) -> int:
    return x.chunk_rows if isinstance(x, Rows) else chunk


def _take(x, idx: Tensor):
    return x.subset(idx) if isinstance(x, Rows) else x[idx]


@torch.no_grad()
def _probabilities(weight: Tensor, bias: Tensor, x: Tensor, chunk: int = 65536) -> Tensor:
    """Softmax class probabilities of the linear classifier on x, float32 [N, K] on the CPU."""
    chunk = _chunk(x, chunk)
    return torch.cat([torch.softmax(torch.addmm(bias, x[s:s + chunk], weight.t()), dim=1).cpu()
                      for s in range(0, x.shape[0], chunk)])


@torch.no_grad()
def _evaluate(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, chunk: int = 65536) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the linear classifier on (x, y)."""
    chunk = _chunk(x, chunk)
    correct = 0
    loss = 0.0
    for start in range(0, x.shape[0], chunk):
        logits = torch.addmm(bias, x[start:start + chunk], weight.t())
        yy = y[start:start + chunk]
        correct += int((logits.argmax(dim=1) == yy).sum())
        loss += float(F.cross_entropy(logits, yy, reduction="sum"))
    n = x.shape[0]
    return correct / n, loss / n


def _fit_lbfgs(x: Tensor, y: Tensor, num_classes: int, weight_decay: float,
               max_iter: int) -> tuple[Tensor, Tensor, int, bool]:
    """Minimise mean CE + wd/2 ||W||^2 with full-batch LBFGS from zeros.

    Returns ``(W, b, iterations, converged)``; ``converged`` is False when LBFGS stopped because it ran
    out of iterations or function evaluations rather than on its gradient / progress tolerances.
    """
    d = x.shape[1]
    max_eval = int(max_iter * 1.25) + 1
    weight = torch.zeros(num_classes, d, device=x.device, dtype=torch.float32, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=max_eval,
                            tolerance_grad=1e-7, tolerance_change=1e-9, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=False)
        if isinstance(x, Rows):   # the full batch's loss and gradient summed block by block
            total = 0.0
            for start in range(0, len(x), x.chunk_rows):
                part = F.cross_entropy(torch.addmm(bias, x[start:start + x.chunk_rows], weight.t()),
                                       y[start:start + x.chunk_rows], reduction="sum") / len(x)
                part.backward()
                total += part.detach()
            loss = total
            if weight_decay:
                penalty = 0.5 * weight_decay * weight.pow(2).sum()
                penalty.backward()
                loss = loss + penalty.detach()
            return loss
        loss = F.cross_entropy(torch.addmm(bias, x, weight.t()), y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    state = opt.state[weight]
    n_iter, n_eval = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
    return weight.detach(), bias.detach(), n_iter, n_iter < max_iter and n_eval < max_eval


def _fit_adamw(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, *, epochs: int,
               batch_size: int, lr: float, seed: int, lr_schedule: str = "cosine") -> tuple[Tensor, Tensor, int, None]:
    """Mini-batch AdamW from zeros, the rate per step on ``lr_schedule``; returns (W, b, epochs, None)."""
    n, d = x.shape
    weight = torch.zeros(num_classes, d, device=x.device, dtype=torch.float32, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [weight], "weight_decay": weight_decay},
                             {"params": [bias], "weight_decay": 0.0}], lr=lr,
                            fused=x.device.type in ("cpu", "cuda") or None)  # fused: ~2x less overhead
    gen = torch.Generator(device="cpu").manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(x.device)
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                if lr_schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(torch.addmm(bias, x[idx], weight.t()), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    return weight.detach(), bias.detach(), epochs, None


LARS_BN_MOMENTUM, LARS_BN_EPS = 0.1, 1e-6  # torch's BatchNorm1d momentum; MAE's eps
LARS_HEAD_STD = 0.01  # MAE's linear probe draws the head as MoCo v3 does


def lars_batch(n: int, batch_size: int, base_lr: float) -> tuple[int, float, int]:
    """(batch used, peak rate, steps per epoch) of the lars solver on ``n`` rows: the batch is clamped to ``n``
    and the rate is MAE's ``base_lr * batch / 256`` of the batch used."""
    batch = min(batch_size, n)
    return batch, base_lr * batch / 256, n // batch


def lars_rate(lr: float, step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float) -> float:
    """MAE's ``lr_sched.adjust_learning_rate`` at a step: the fractional epoch rises linearly over the warm-up,
    then a half-cycle cosine to 0."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def _fit_lars(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, *, epochs: int, batch_size: int,
              base_lr: float, warmup_epochs: float, momentum: float, trust_coefficient: float,
              seed: int, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, int, None]:
    """BatchNorm(affine=False) + linear layer trained with LARS; returns the BatchNorm folded into (W, b)."""
    n, d = x.shape
    batch, lr, steps_per_epoch = lars_batch(n, batch_size, base_lr)
    if batch < 2:  # a weight-decay sweep's fitting part of a 2-row set
        raise GenrepError(f"the lars solver's BatchNorm needs batches of at least 2 rows; it was given {n} rows to fit")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # the draw is made on the CPU so a seed gives the same head on any device; MAE's bounds are timm's absolute
    # -2 and 2, which cut nothing at std 0.01
    w0 = torch.nn.init.trunc_normal_(torch.empty(num_classes, d), std=LARS_HEAD_STD, a=-2.0, b=2.0, generator=gen)
    weight = w0.to(x.device).requires_grad_(True)
    bias = torch.zeros(num_classes, device=x.device, dtype=torch.float32, requires_grad=True)
    running_mean = torch.zeros(d, device=x.device, dtype=torch.float32)
    running_var = torch.ones(d, device=x.device, dtype=torch.float32)
    opt = LARS([weight, bias], lr=lr, weight_decay=weight_decay, momentum=momentum,
               trust_coefficient=trust_coefficient)
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(x.device)
            for start in range(0, steps_per_epoch * batch, batch):
                idx = perm[start:start + batch]
                for group in opt.param_groups:
                    group["lr"] = lars_rate(lr, step, steps_per_epoch, epochs, warmup_epochs)
                # the whole batch's statistics; MAE's recipe (512 per GPU on 32 GPUs) normalised each GPU's 512 apart,
                # its BatchNorm not being synchronised
                h = F.batch_norm(x[idx], running_mean, running_var, training=True, momentum=LARS_BN_MOMENTUM,
                                 eps=LARS_BN_EPS)
                loss = F.cross_entropy(torch.addmm(bias, h, weight.t()), y[idx], label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    scale = (running_var + LARS_BN_EPS).rsqrt()
    w = weight.detach() * scale
    return w, bias.detach() - w @ running_mean, epochs, None


def _check_weight_decays(weight_decay) -> list[float]:
    values = list(weight_decay) if isinstance(weight_decay, Sequence) and not isinstance(
        weight_decay, str) else [weight_decay]
    if not values:
        raise GenrepError("weight_decay is an empty sequence; pass a number or a non-empty list of numbers")
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if isinstance(v, bool) or not (math.isfinite(f) and f >= 0):
            raise GenrepError(f"weight_decay values must be finite numbers >= 0, got {v!r}")
        out.append(f)
    return out


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, *,
                 solver: str = "lbfgs", weight_decay: float | Sequence[float] = 1e-4, epochs: int = 100,
                 batch_size: int = 512, lr: float = 0.01, max_iter: int = 1000, val_fraction: float = 0.1,
                 seed: int = 0, return_test_probs: bool = False, standardize_features: bool = True,
                 lr_schedule: str = "cosine", base_lr: float = 0.1, warmup_epochs: float = 10,
                 momentum: float = 0.9, trust_coefficient: float = 0.001,
                 label_smoothing: float = 0.0, device: torch.device | str | None = None) -> LinearProbeResult:
    """Fit a linear classifier on (by default standardised) frozen features; report train/test accuracy.

    See the module docstring for the objective and the three solvers.  ``max_iter`` applies to
    ``"lbfgs"``; ``epochs`` and ``batch_size`` to ``"adamw"`` and ``"lars"``; ``lr`` to ``"adamw"``; ``base_lr``,
    ``warmup_epochs``, ``momentum``, ``trust_coefficient`` and ``label_smoothing`` to ``"lars"``.
    ``weight_decay`` may be a sequence, in which case it is chosen on a held-out ``val_fraction`` of the train set (split seeded
    by ``seed``) and the model is refitted on the full train set.  ``return_test_probs=True`` also
    returns the test rows' softmax probabilities in :attr:`LinearProbeResult.test_probs`.
    ``standardize_features=False`` fits the raw features; ``lr_schedule`` (``LR_SCHEDULES``) applies to
    ``"adamw"``. The fit runs on ``device`` (default: where ``train_x`` is). A half-precision ``train_x`` on the
    CPU (a float16 feature cache mapped from its file) is never copied whole: every solver reads it a block of rows
    at a time (:class:`~genrep.eval.metrics.rows.Rows`; L-BFGS sums its full-batch loss over the blocks).
    """
    t0 = time.perf_counter()
    if solver not in SOLVERS:
        raise GenrepError(f"unknown linear-probe solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if lr_schedule not in LR_SCHEDULES:
        raise GenrepError(f"unknown linear-probe lr_schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    train_x, train_y, test_x, test_y, num_classes = _check_data(train_x, train_y, test_x, test_y,
                                                                num_classes, device)
    wds = _check_weight_decays(weight_decay)
    max_iter = _positive_int(max_iter, "max_iter")
    epochs = _positive_int(epochs, "epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    lr = _positive_float(lr, "lr")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GenrepError(f"seed must be an integer, got {seed!r}")
    if solver == "lars":
        base_lr = _positive_float(base_lr, "base_lr")
        trust_coefficient = _positive_float(trust_coefficient, "trust_coefficient")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise GenrepError(f"momentum must be in [0, 1), got {momentum!r}")
        if not (isinstance(warmup_epochs, (int, float)) and 0 <= warmup_epochs < epochs):
            raise GenrepError(f"warmup_epochs must be at least 0 and below epochs ({epochs}), got {warmup_epochs!r}")
        if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 1):
            raise GenrepError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if min(batch_size, train_x.shape[0]) < 2:
            raise GenrepError("the lars solver normalises each batch with a BatchNorm, which needs at least 2 rows: "
                              f"batch_size is {batch_size} and the train set has {train_x.shape[0]} rows")

    def fit(x, y, wd):
        if solver == "lbfgs":
            return _fit_lbfgs(x, y, num_classes, wd, max_iter)
        if solver == "lars":
            return _fit_lars(x, y, num_classes, wd, epochs=epochs, batch_size=batch_size, base_lr=base_lr,
                             warmup_epochs=warmup_epochs, momentum=momentum, trust_coefficient=trust_coefficient,
                             seed=seed, label_smoothing=label_smoothing)
        return _fit_adamw(x, y, num_classes, wd, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          lr_schedule=lr_schedule)

    def prepare(train, *others):   # -> (the features as fitted, the standardisation applied or None)
        return _standardized(train, *others) if standardize_features else ((train, *others), None)

    n = train_x.shape[0]
    sweep: list[dict] = []
    used_val_fraction = None
    if len(wds) > 1:
        try:
            vf = float("nan") if isinstance(val_fraction, bool) else float(val_fraction)
        except (TypeError, ValueError):
            vf = float("nan")
        if not (0.0 < vf < 1.0):
            raise GenrepError(f"val_fraction must be in (0, 1) for a weight-decay sweep, "
                              f"got {val_fraction!r}")
        if n < 2:
            raise GenrepError(f"a weight-decay sweep needs at least 2 train rows, got {n}; "
                              "pass a single weight_decay instead")
        n_val = min(max(1, round(vf * n)), n - 1)
        used_val_fraction = vf
        perm = torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed)).to(train_x.device)
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        (fx, vx), _ = prepare(_take(train_x, fit_idx), _take(train_x, val_idx))
        fy, vy = train_y[fit_idx], train_y[val_idx]
        for wd in wds:
            w, b, _, _ = fit(fx, fy, wd)
            acc, loss = _evaluate(w, b, vx, vy)
            sweep.append({"weight_decay": wd, "val_acc": acc, "val_loss": loss})
        best = max(sweep, key=lambda r: (r["val_acc"], -r["val_loss"], r["weight_decay"]))
        chosen = best["weight_decay"]
    else:
        chosen = wds[0]

    (sx, tx), norm = prepare(train_x, test_x)
    w, b, iters, converged = fit(sx, train_y, chosen)
    raw_w, raw_b = _on_raw_features(w, b, norm)
    train_acc, train_loss = _evaluate(w, b, sx, train_y)
    test_acc, _ = _evaluate(w, b, tx, test_y)
    test_probs = _probabilities(w, b, tx) if return_test_probs else None
    if solver == "lars":
        used, lr_used, steps = lars_batch(n, batch_size, base_lr)
        settings = {"base_lr": base_lr, "lr": lr_used, "batch_size": used, "batch_size_asked": batch_size,
                    "steps_per_epoch": steps, "warmup_epochs": warmup_epochs, "momentum": momentum,
                    "trust_coefficient": trust_coefficient, "label_smoothing": label_smoothing,
                    "schedule": "linear warm-up, then half-cycle cosine to 0, per step",
                    "feature_norm": f"BatchNorm1d(affine=False, eps={LARS_BN_EPS:g}, momentum={LARS_BN_MOMENTUM:g})",
                    "head_init": f"trunc_normal std {LARS_HEAD_STD:g}, bias 0"}
    elif solver == "adamw":
        settings = {"lr": lr, "batch_size": batch_size, "lr_schedule": lr_schedule}
    else:
        settings = {"max_iter": max_iter}
    return LinearProbeResult(
        test_acc=test_acc, train_acc=train_acc, weight_decay=chosen, solver=solver, epochs_or_iters=iters,
        train_loss=train_loss, converged=converged,
        num_classes=num_classes, n_train=n, n_test=test_x.shape[0], dim=train_x.shape[1],
        val_fraction=used_val_fraction, sweep=sweep, seconds=time.perf_counter() - t0, solver_settings=settings,
        test_probs=test_probs, weight=raw_w.cpu(), bias=raw_b.cpu())


def _on_raw_features(w: Tensor, b: Tensor, norm: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """The classifier fitted on standardised features as one on the raw ones: W (x - m) s + b = (W s) x + b - (W s) m."""
    if norm is None:
        return w, b
    mean, scale = norm
    folded = w * scale.to(w)
    return folded, b - folded @ mean.to(w)


# --------------------------------------------------------------------------------------------------
# weighted kNN


def _check_ks(k) -> list[int]:
    ks = list(k) if isinstance(k, Sequence) and not isinstance(k, str) else [k]
    if not ks:
        raise GenrepError("k is an empty sequence; pass a positive integer or a list of them, e.g. (20, 200)")
    for v in ks:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise GenrepError(f"k values must be positive integers, got {v!r}")
    return ks


@torch.no_grad()
def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int, *,
                k: int | Sequence[int] = (20, 200), temperature: float = 0.07,
                batch_size: int = 1024, device: torch.device | str | None = None) -> dict[int, Tensor]:
    """Weighted-kNN predictions for each ``k``: ``{k: LongTensor [N_test]}`` (see :func:`knn_classify`)."""
    train_x, train_y, test_x, _, num_classes = _check_data(train_x, train_y, test_x, None, num_classes, device)
    ks = _check_ks(k)
    temperature = _positive_float(temperature, "temperature")
    batch_size = _positive_int(batch_size, "batch_size")

    n_train = train_x.shape[0]
    eff = {kk: min(kk, n_train) for kk in ks}
    distinct = sorted(set(eff.values()))
    k_max = distinct[-1]
    streamed = isinstance(train_x, Rows) or isinstance(test_x, Rows)
    train_n = train_x if streamed else F.normalize(train_x, dim=1)
    test_n = test_x if streamed else F.normalize(test_x, dim=1)
    preds = {kk: torch.empty(test_n.shape[0], dtype=torch.long, device=train_x.device) for kk in distinct}
    for start in range(0, test_n.shape[0], batch_size):
        if streamed:
            q = F.normalize(test_n[start:start + batch_size], dim=1)
            top_sim, top_idx = _streamed_top_k(q, train_n, k_max)
        else:
            q = test_n[start:start + batch_size]
            sim = q @ train_n.t()                                    # [B, N_train]
            top_sim, top_idx = sim.topk(k_max, dim=1, largest=True, sorted=True)
            del sim
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp_()
        labels = train_y[top_idx]                               # [B, k_max]
        for kk in distinct:
            votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=weights.dtype)
            votes.scatter_add_(1, labels[:, :kk], weights[:, :kk])
            preds[kk][start:start + q.shape[0]] = votes.argmax(dim=1)
    return {kk: preds[eff[kk]] for kk in ks}


def _streamed_top_k(q: Tensor, train: Tensor | Rows, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most cosine-similar train rows of each (normalised) query, the train rows read a block at a time:
    each block's own top k merged into the running top k."""
    step = train.chunk_rows if isinstance(train, Rows) else len(train)
    best_sim = best_idx = None
    for start in range(0, len(train), step):
        sim = q @ F.normalize(train[start:start + step], dim=1).t()
        top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1, largest=True, sorted=True)
        top_idx += start
        if best_sim is not None:
            merged = torch.cat([best_sim, top_sim], 1)
            top_sim, at = merged.topk(min(k, merged.shape[1]), dim=1, largest=True, sorted=True)
            top_idx = torch.cat([best_idx, top_idx], 1).gather(1, at)
        best_sim, best_idx = top_sim, top_idx
    return best_sim, best_idx


@torch.no_grad()
def knn_classify(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, *,
                 k: int | Sequence[int] = (20, 200), temperature: float = 0.07,
                 batch_size: int = 1024, device: torch.device | str | None = None) -> dict[int, float]:
    """Weighted kNN accuracy (InstDisc / DINO protocol) for each ``k``; returns ``{k: test accuracy}``.

    Features are L2-normalised; each test row's ``k`` most cosine-similar train rows vote for their
    label with weight ``exp(sim / temperature)``; the class with the largest summed weight is predicted.
    Weights are computed as ``exp((sim - max_sim) / temperature)`` (the same ranking of classes, without
    overflow for small temperatures).  Test rows are processed ``batch_size`` at a time, so peak memory is
    about ``batch_size * N_train`` floats.  A ``k`` larger than the train set is clamped to ``N_train``
    (all train rows vote); the returned dict is keyed by the ``k`` as requested.  Ties between equally
    similar neighbours or equal class votes are broken by ``torch.topk`` / ``argmax``.
    """
    train_x, train_y, test_x, test_y, num_classes = _check_data(train_x, train_y, test_x, test_y,
                                                                num_classes, device)
    preds = knn_predict(train_x, train_y, test_x, num_classes, k=k, temperature=temperature,
                        batch_size=batch_size)
    n_test = test_x.shape[0]
    return {kk: int((p == test_y).sum()) / n_test for kk, p in preds.items()}
