"""The read-out sweep of the diffusion-features paper (figures 2 and 5): classification accuracy over the grid of
block x noise step t x pooling, for the linear head (the fast full-batch solver) and the heads of appendix A,
on cached features, with heatmaps and the best cell.

Any method sweeps its blocks and poolings; the noise steps need a method read from a noised image
(``feature_t``: ADM, GenViT, HybViT), so a U-Net and a ViT denoiser land in one table. Features of every
(block, pool) come from one pass per t (``Method.feature_sets``) and are cached per (weights, block, t, pool,
noise), so a second sweep, or one with another head, extracts nothing.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field


from ...errors import GenrepError
from ...fields import Pool, setting, show
from ...methods.base import MAP_POOL
from ..metrics.heads import HEADS, MAP_HEADS
from ..metrics.probes import linear_probe
from .context import EvalContext, check_noise_steps, noise_step, reads_noised
from .head_training import HeadSettings, check_head_features, fit_head

MAX_DEFAULT_BLOCKS = 10


@dataclass
class SweepSettings:
    # every list without repeats, as a grid's axis: a repeated value is a cell computed twice
    blocks: list[int] = setting([], min=1, unique=True)  # empty: about 10 spread over the network, and the default
    t: list[int] = setting([], min=0, unique=True)       # noise steps; empty: the run's feature_t alone
    pools: list[Pool] = setting([], unique=True)         # p (p x p average pool of a map), a pooling name; []: default
    heads: list[str] = setting(["linear"], choices=HEADS, nonempty=True, unique=True)
    # the linear head's fast solver: full-batch L-BFGS, weight decay chosen on a held-out 10% of the train split
    weight_decay: list[float] = setting([1e-5, 1e-4, 1e-3, 1e-2], min=0, nonempty=True, unique=True)
    head: HeadSettings = field(default_factory=HeadSettings)  # mlp, cnn and attention: the paper's schedule

    def validate(self, section: str) -> None:
        for pool in self.pools:
            if not ((pool.isdigit() and int(pool) >= 1) or (pool.isalpha() and len(pool) <= 16)) or pool == MAP_POOL:
                raise GenrepError(f"{section}.pools: {show(pool)} is not a pooling; give sizes p >= 1 (p x p average "
                                  f"pool of a map: 1,2,4) or a method's pooling name (mean, cls)")


def sweep_blocks(method, asked: list[int]) -> list[int]:
    if asked:
        return sorted(set(asked))
    n = method.num_layers
    step = max(1, -(-n // MAX_DEFAULT_BLOCKS))
    return sorted({*range(step, n + 1, step), method.default_layer or n})


def sweep_steps(ctx: EvalContext) -> list[int | None]:
    return sorted(set(ctx.ev.sweep.t)) or [getattr(ctx.cfg.model, "feature_t", None)]


def check(ctx: EvalContext) -> None:
    """Blocks, steps, poolings and heads this method can read, before any extraction."""
    s, m = ctx.ev.sweep, ctx.method
    check_noise_steps(m, s.t, "eval.sweep.t")
    for kind in s.heads:
        check_head_features(m, kind, "eval.sweep.heads")
    for b in sweep_blocks(m, s.blocks):
        m.check_feature_args(b, None)
        for pool in sweep_pools(ctx):
            m.check_feature_args(b, pool)
        if any(k in MAP_HEADS for k in s.heads):
            m.check_feature_args(b, MAP_POOL)


def sweep_pools(ctx: EvalContext) -> list[str]:
    return list(ctx.ev.sweep.pools) or [ctx.method.check_feature_args(None, None)[1]]


def _reads(ctx: EvalContext) -> list[tuple[int, str]]:
    s = ctx.ev.sweep
    pools = [p for p in sweep_pools(ctx) if any(k not in MAP_HEADS for k in s.heads)]
    if any(k in MAP_HEADS for k in s.heads):
        pools.append(MAP_POOL)
    return [(b, p) for b in sweep_blocks(ctx.method, s.blocks) for p in pools]


def run(ctx: EvalContext) -> dict:
    s, m = ctx.ev.sweep, ctx.method
    reads = _reads(ctx)
    n_cls = ctx.train.num_classes
    cells = []
    for t in sweep_steps(ctx):
        with noise_step(m, t) if reads_noised(m) else nullcontext():
            train = dict(zip(reads, ctx.feature_sets("train", reads)))
            test = dict(zip(reads, ctx.feature_sets("test", reads)))
        for b, pool in reads:
            for kind in s.heads:
                if (kind in MAP_HEADS) != (pool == MAP_POOL):
                    continue  # map heads read the map, the others the pooled vectors
                xtr, xte = train[(b, pool)], test[(b, pool)]
                cell = {"block": b, "t": t, "pool": pool, "head": kind, "feature_shape": list(xtr.shape[1:])}
                if kind == "linear":
                    lp = linear_probe(xtr.flatten(1), ctx.train.labels, xte.flatten(1), ctx.test.labels, n_cls,
                                      solver="lbfgs", weight_decay=s.weight_decay, seed=ctx.ev.seed)
                    cell.update(acc=lp.test_acc, weight_decay=lp.weight_decay, params=lp.dim * n_cls + n_cls)
                else:
                    r = fit_head(ctx, kind, s.head, xtr, xte)
                    cell.update(acc=r["test_acc"], params=r["params"])
                cells.append(cell)
    return summarise(ctx, cells)


def summarise(ctx: EvalContext, cells: list[dict]) -> dict:
    from ..report.figures import sweep_heatmaps, sweep_pool_lines

    best = {}
    for kind in dict.fromkeys(c["head"] for c in cells):
        top = max((c for c in cells if c["head"] == kind), key=lambda c: c["acc"])
        best[kind] = {k: top[k] for k in ("block", "t", "pool", "acc")}
    overall = max(cells, key=lambda c: c["acc"])
    figures = {"sweep: accuracy over block x t": ctx.rel(sweep_heatmaps(cells, ctx.figure("sweep-heatmaps"),
                                                                        title=f"{ctx.cfg.method}: test accuracy"))}
    if len({c["pool"] for c in cells if c["pool"] != MAP_POOL}) > 1:
        figures["sweep: accuracy over pool size"] = ctx.rel(sweep_pool_lines(cells, ctx.figure("sweep-pools"),
                                                                            title=f"{ctx.cfg.method}: pool size"))
    return {"cells": cells, "best": best,
            "best_overall": {**{k: overall[k] for k in ("head", "block", "t", "pool", "acc")},
                             "selected_on": "test accuracy of the grid (as the paper's ablations report)"},
            "noise": getattr(ctx.cfg.model, "feature_noise", None), "figures": figures}


