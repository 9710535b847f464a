"""The read-out sweep of the diffusion-features paper (figures 2 and 5): classification accuracy over the grid of
block x noise step t x pooling, for the linear head and the heads of appendix A, on cached features, with
heatmaps and the best cell.

The linear head is fitted one of two ways (``linear_solver``): ``lbfgs``, the fast screening solver (full batch on
standardised features, the weight decay chosen on a held-out part of the train split), or ``paper``, figure 2's
ablations (appendix B: the heads' schedule, ``head``, for ``linear_epochs`` = 15 instead of the full recipe's 28).
Every cell, the best cells and the figures name which. The read-out is the cached one either way: with
``model.feature_noise fixed`` (the default) a noised image's noise is a function of the image, so a cell's features
are the same in any sweep; the result names the noise ("fixed per image, cached").

Any method sweeps its blocks and poolings; the noise steps need a method read from a noised image
(``feature_t``: ADM, GenViT, HybViT), so a U-Net and a ViT denoiser land in one table. Features of every
(block, pool) come from one pass per t (``Method.feature_sets``), or from a few passes when they would not fit in
memory at once, and are cached per (weights, block, t, pool, noise), so a second sweep, or one with another head,
extracts nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from ...errors import GenrepError
from ...fields import Pool, setting, show
from ...methods.base import MAP_POOL
from ...nn.pooling import reads_map
from ..metrics.heads import HEADS, MAP_HEADS
from ..metrics.probes import linear_probe
from .context import EvalContext, check_noise_steps, noise_step, reads_noised
from .head_training import HeadSettings, check_head_features, draws_per_epoch, fit_head, head_pool

MAX_DEFAULT_BLOCKS = 10
BEST_KEYS = ("block", "t", "pool", "acc")
FIT_KEYS = ("solver", "optimizer", "epochs")  # how a cell's head was fitted, in short: figure titles, best cells
# what a head's training records beside the cells (as its trainer reports it), for the summary and the report
SCHEDULE_KEYS = ("optimizer", "epochs", "lr", "momentum", "step_every", "gamma", "batch_size", "weight_decay",
                 "standardize")
LINEAR_SOLVERS = ("lbfgs", "paper")
# one pass's features (both splits, float32) may take this fraction of the memory free when the sweep starts:
# extraction holds each read's batches and their concatenation at once, and the linear solver a standardised copy
MEMORY_SHARE = 1 / 3


@dataclass
class SweepSettings:
    # every list without repeats, as a grid's axis: a repeated value is a cell computed twice
    blocks: list[int] = setting([], min=1, unique=True)  # empty: about 10 spread over the network, and the default
    t: list[int] = setting([], min=0, unique=True)       # noise steps; empty: the run's feature_t alone
    # p (p x p average pool of a map; left out at a block whose map is smaller than p), a pooling name; []: default
    pools: list[Pool] = setting([], unique=True)
    heads: list[str] = setting(["linear"], choices=HEADS, nonempty=True, unique=True)
    # how the linear head is fitted: lbfgs, the fast screening solver (full batch on standardised features, the
    # weight decay below chosen on a held-out part of the train split); paper, figure 2's ablations (appendix B):
    # the head schedule of `head` (Adam, the rate x0.1 every step_every epochs) for linear_epochs
    linear_solver: str = setting("lbfgs", choices=LINEAR_SOLVERS)
    weight_decay: list[float] = setting([1e-5, 1e-4, 1e-3, 1e-2], min=0, nonempty=True, unique=True,
                                        only_if={"linear_solver": "lbfgs"})
    linear_epochs: int = setting(15, min=1, max=10000, only_if={"linear_solver": "paper"})  # appendix B: 15
    head: HeadSettings = field(default_factory=HeadSettings)  # mlp, cnn and attention (linear too with paper)

    def validate(self, section: str) -> None:
        for pool in self.pools:
            # the length bound first: int() of a 4,301-digit string raises Python's own error, not ours
            if not ((pool.isdigit() and len(pool) <= 6 and int(pool) >= 1) or (pool.isalpha() and len(pool) <= 16)) or pool == MAP_POOL:
                raise GenrepError(f"{section}.pools: {show(pool)} is not a pooling; give sizes p >= 1 (p x p average "
                                  f"pool of a map: 1,2,4) or a method's pooling name (mean, cls)")


def head_schedule(s: SweepSettings, kind: str) -> HeadSettings | None:
    """The schedule head ``kind`` trains with; None for the linear head under the L-BFGS solver."""
    if kind != "linear":
        return s.head
    return replace(s.head, epochs=s.linear_epochs) if s.linear_solver == "paper" else None


def noise_policy(ctx: EvalContext) -> str | None:
    """How the noised read-outs were drawn, in words; None when no cell reads a noised image."""
    if not reads_noised(ctx.method) or sweep_steps(ctx) == [None]:
        return None
    kind = ctx.method.cfg.feature_noise
    return "fixed per image, cached" if kind == "fixed" else f"{kind}: one draw per image when extracted, cached"


def sweep_blocks(method, asked: list[int]) -> list[int]:
    if asked:
        return sorted(set(asked))
    n = method.num_layers
    step = max(1, -(-n // MAX_DEFAULT_BLOCKS))
    return sorted({*range(step, n + 1, step), method.default_layer or n})


def sweep_steps(ctx: EvalContext) -> list[int | None]:
    return sorted(set(ctx.ev.sweep.t)) or [getattr(ctx.cfg.model, "feature_t", None)]


def sweep_pools(ctx: EvalContext) -> list[str]:
    return list(ctx.ev.sweep.pools) or [ctx.method.check_feature_args(None, None)[1]]


def pool_fits(method, block: int, pool: str) -> bool:
    """Whether ``pool`` reads ``block``: a p x p average pool of a smaller map would only repeat its values, so the
    sweep leaves that cell out (and lists it) rather than refuse a grid whose blocks differ in size."""
    return not (method.feature_maps and pool.isdigit() and int(pool) > method.feature_map_size(block))


def check(ctx: EvalContext) -> None:
    """Blocks, steps, poolings and heads this method can read, before any extraction."""
    s, m = ctx.ev.sweep, ctx.method
    check_noise_steps(m, s.t, "eval.sweep.t")
    for kind in s.heads:
        check_head_features(m, kind, "eval.sweep.heads")
    if draws_per_epoch(m, s.head):
        raise GenrepError(f"eval.sweep.head.noise {s.head.noise} and eval.sweep.head.augment {s.head.augment} read "
                          f"new features every epoch, and the sweep trains its heads on the cached read-out of each "
                          f"cell; set eval.sweep.head.noise fixed and eval.sweep.head.augment none (genrep probe "
                          f"trains a head on fresh noise and flips at one read-out)")
    blocks = sweep_blocks(m, s.blocks)
    for b in blocks:
        m.check_feature_args(b, None)
        if any(k in MAP_HEADS for k in s.heads):
            m.check_feature_args(b, MAP_POOL)
    for pool in sweep_pools(ctx):
        fit = [b for b in blocks if pool_fits(m, b, pool)]
        if not fit:
            side = max(m.feature_map_size(b) for b in blocks)
            at = ", ".join(str(b) for b in blocks if m.feature_map_size(b) == side)
            raise GenrepError(f"eval.sweep.pools: pool {pool} is larger than the map of every swept block (the "
                              f"largest is {side}x{side}, at block {at}); choose pools up to {side}, or sweep "
                              f"blocks with larger maps")
        for b in fit:
            m.check_feature_args(b, pool)


def _vector_pools(ctx: EvalContext) -> list[str]:
    """The poolings the vector heads read (none when every head takes the map)."""
    return sweep_pools(ctx) if any(k not in MAP_HEADS for k in ctx.ev.sweep.heads) else []


def _reads(ctx: EvalContext) -> list[tuple[int, str]]:
    s, m = ctx.ev.sweep, ctx.method
    maps = list(dict.fromkeys(head_pool(k, "") for k in s.heads if k in MAP_HEADS))
    return [(b, p) for b in sweep_blocks(m, s.blocks)
            for p in [*(p for p in _vector_pools(ctx) if pool_fits(m, b, p)), *maps]]


def _passes(ctx: EvalContext, reads: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """``reads`` (in block order) cut into groups whose features, both splits in float32, fit ``MEMORY_SHARE`` of
    the memory free now; each group is one pass that stops at its deepest block. A grid too large to hold at once
    (figure 2's pools up to 8 on ImageNet-50) costs passes, not memory; the features are the same either way."""
    from ...runs import free_memory  # runs imports the config, which imports this module

    free = free_memory(torch.device("cpu"))
    if free is None or len(reads) < 2:
        return [reads]
    x = ctx.train.images[:1].to(ctx.device).float().div_(255)
    with torch.no_grad():  # one image's read-outs give each read's width
        widths = [f[0].numel() for f in ctx.method.feature_sets(x, reads)]
    rows = len(ctx.train) + len(ctx.test)
    groups: list[list[tuple[int, str]]] = []
    held = 0
    for read, width in zip(reads, widths):
        size = 4 * width * rows
        if not groups or held + size > MEMORY_SHARE * free:
            groups.append([])
            held = 0
        groups[-1].append(read)
        held += size
    return groups


def _fit(ctx: EvalContext, kind: str, xtr: torch.Tensor, xte: torch.Tensor) -> tuple[dict, dict]:
    """Head ``kind`` on one cell's features: (the cell's accuracy, size and how it was fitted in short, the
    training's record: the solver's settings, or the schedule the head trainer reports it trained with)."""
    s, n_cls = ctx.ev.sweep, ctx.train.num_classes
    schedule = head_schedule(s, kind)
    if schedule is None:
        lp = linear_probe(xtr.flatten(1), ctx.train.labels, xte.flatten(1), ctx.test.labels, n_cls,
                          solver="lbfgs", weight_decay=s.weight_decay, seed=ctx.ev.seed)
        return ({"acc": lp.test_acc, "params": lp.dim * n_cls + n_cls, "solver": "lbfgs",
                 "weight_decay": lp.weight_decay}, {"solver": "lbfgs", "weight_decay": list(s.weight_decay)})
    r = fit_head(ctx, kind, schedule, xtr, xte)
    fitted = {"solver": "paper", **{k: r[k] for k in SCHEDULE_KEYS if k in r}}
    return {"acc": r["test_acc"], "params": r["params"], **{k: fitted[k] for k in FIT_KEYS if k in fitted}}, fitted


def run(ctx: EvalContext) -> dict:
    s, m = ctx.ev.sweep, ctx.method
    reads = _reads(ctx)
    passes = _passes(ctx, reads)
    cells, training = [], {}
    for t in sweep_steps(ctx):
        for group in passes:
            with noise_step(m, t) if reads_noised(m) else nullcontext():
                train = dict(zip(group, ctx.feature_sets("train", group)))
                test = dict(zip(group, ctx.feature_sets("test", group)))
            for b, pool in group:
                for kind in s.heads:
                    if pool != head_pool(kind, pool) or (kind not in MAP_HEADS and reads_map(pool)):
                        continue  # a map head reads its map, the others the pooled vectors
                    xtr, xte = train[(b, pool)], test[(b, pool)]
                    cell, training[kind] = _fit(ctx, kind, xtr, xte)
                    cells.append({"block": b, "t": t, "pool": pool, "head": kind,
                                  "feature_shape": list(xtr.shape[1:]), **cell})
            del train, test  # freed before the next pass extracts: one group's features held at a time
    left_out = [{"block": b, "pool": p, "map_size": m.feature_map_size(b)}
               for b in sweep_blocks(m, s.blocks) for p in _vector_pools(ctx) if not pool_fits(m, b, p)]
    return summarise(ctx, cells, training, left_out)


def summarise(ctx: EvalContext, cells: list[dict], training: dict, left_out: list[dict]) -> dict:
    from ..report.figures import sweep_heatmaps, sweep_pool_lines

    best = {}
    for kind in dict.fromkeys(c["head"] for c in cells):
        top = max((c for c in cells if c["head"] == kind), key=lambda c: c["acc"])
        best[kind] = {k: top[k] for k in (*BEST_KEYS, *FIT_KEYS) if k in top}
    overall = max(cells, key=lambda c: c["acc"])
    figures = {"sweep: accuracy over block x t": ctx.rel(sweep_heatmaps(cells, ctx.figure("sweep-heatmaps"),
                                                                        title=f"{ctx.cfg.method}: test accuracy"))}
    if len({c["pool"] for c in cells if not reads_map(c["pool"])}) > 1:
        figures["sweep: accuracy over pool size"] = ctx.rel(sweep_pool_lines(cells, ctx.figure("sweep-pools"),
                                                                            title=f"{ctx.cfg.method}: pool size"))
    return {"cells": cells, "best": best,
            "best_overall": {**{k: overall[k] for k in ("head", *BEST_KEYS, *FIT_KEYS) if k in overall},
                             "selected_on": "test accuracy of the grid (as the paper's ablations report)"},
            "linear_solver": ctx.ev.sweep.linear_solver,
            "training": {kind: training[kind] for kind in best},
            "noise": noise_policy(ctx), "left_out": left_out, "figures": figures}
