"""The similarity protocol: linear CKA between the method's layers (and with other runs' layers), and a t-SNE
map of its features with OOD points in grey (the first of ``eval.ood.sets``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import GenrepError
from ...fields import setting
from ..metrics.similarity import cka_matrix
from .context import EvalContext, check_noise_steps, default_readout, noise_step


@dataclass
class SimilaritySettings:
    cka_n: int = setting(1000, min=1)   # test images of CKA
    tsne_n: int = setting(1000, min=1)  # test images of the t-SNE map
    cka_runs: list[str] = field(default_factory=list)  # other run folders on the same data: CKA between models
    # noise steps: CKA between every (t, layer) pair of a method read from noised images (the diffusion-features
    # paper's figure 6: how alike the blocks are across t); empty: none
    cka_t: list[int] = setting([], min=0, unique=True)


def check(ctx: EvalContext) -> None:
    """A folder that is not a run, or a t-SNE OOD set missing offline, fails here, not after the other protocols."""
    from ...run import Run

    check_noise_steps(ctx.method, ctx.ev.similarity.cka_t, "eval.similarity.cka_t")
    for other in ctx.ev.similarity.cka_runs:
        Run.open(other)
    if ctx.ev.ood.sets:
        ctx.ood_images(ctx.ev.ood.sets[0], 1)


def other_run_features(ctx: EvalContext, other: Path, images: torch.Tensor):
    """Every layer's features (its default pooling) of another run on the same images, for CKA between models."""
    from ...run import Run

    o_run = Run.open(other)
    o_cfg = o_run.config
    if (o_cfg.data.name, o_cfg.data.image_size) != (ctx.cfg.data.name, ctx.cfg.data.image_size):
        raise GenrepError(f"eval.similarity.cka_runs: {other} was trained on {o_cfg.data.name} at image_size "
                          f"{o_cfg.data.image_size}, this run on {ctx.cfg.data.name} at {ctx.cfg.data.image_size}; "
                          f"CKA between models needs the same images")
    o_cfg, o_method, _, _ = o_run.load(ctx.ev.weights, ctx.device)
    _, o_pool = default_readout(o_method)
    return o_cfg, o_method, all_layers(ctx, images, o_pool, o_method)


def run(ctx: EvalContext) -> dict:
    from ..report.figures import cka_heatmap
    from ..report.tsne import tsne_figure

    s, m = ctx.ev.similarity, ctx.method
    layer, pool = default_readout(m)
    images, _labels = ctx.test_subset(s.cka_n)
    layers = list(range(1, m.num_layers + 1))
    feats = all_layers(ctx, images, pool)
    matrix = cka_matrix(feats)
    names = [str(ly) for ly in layers]
    heat = cka_heatmap(matrix, ctx.figure("cka-layers"), names, names, title=f"linear CKA between layers ({pool})",
                       xlabel="layer", ylabel="layer")
    figures = {"CKA between layers": ctx.rel(heat)}
    between = {}
    for i, other in enumerate(s.cka_runs):
        o_cfg, o_method, o_feats = other_run_features(ctx, Path(other), images)
        cross = cka_matrix(feats, o_feats)
        o_names = [str(ly) for ly in range(1, o_method.num_layers + 1)]
        fig = cka_heatmap(cross, ctx.figure(f"cka-vs-{i + 1}"), names, o_names,
                          title=f"linear CKA: {ctx.cfg.method} vs {o_cfg.method} ({Path(other).name})",
                          xlabel=f"{o_cfg.method} layer", ylabel=f"{ctx.cfg.method} layer")
        between[str(other)] = {"method": o_cfg.method, "matrix": cross.tolist(),
                               "same_layer_mean": float(torch.diagonal(cross).mean()) if cross.shape[0] ==
                               cross.shape[1] else None, "max": float(cross.max())}
        figures[f"CKA vs {Path(other).name}"] = ctx.rel(fig)
    across_t = {}
    if s.cka_t:
        across_t, fig = cka_across_steps(ctx, images, pool)
        figures["CKA between blocks across t"] = ctx.rel(fig)
    t_images, t_labels = ctx.test_subset(s.tsne_n)
    t_feats = ctx.features("test", layer, pool)
    if len(t_images) < len(ctx.test):
        t_feats = ctx.extract(t_images, layer, pool)
    ood_name = ctx.ev.ood.sets[0] if ctx.ev.ood.sets else None
    ood_feats = None
    if ood_name:
        ood_feats = ctx.extract(ctx.ood_images(ood_name, max(1, len(t_images) // 4)), layer, pool)
    tsne = tsne_figure(t_feats, t_labels, ctx.figure("tsne"), classes=ctx.test.classes, ood_features=ood_feats,
                       ood_name=ood_name or "OOD", seed=ctx.ev.seed,
                       title=f"t-SNE of layer {layer} ({pool}) features")
    figures["t-SNE"] = ctx.rel(tsne)
    return {"layers": layers, "pool": pool, "cka": matrix.tolist(), "n": len(images),
            "cka_adjacent_mean": float(torch.diagonal(matrix, 1).mean()) if len(layers) > 1 else 1.0,
            "between_models": between, **({"across_t": across_t} if across_t else {}), "figures": figures}


def all_layers(ctx: EvalContext, images: torch.Tensor, pool: str, method=None) -> list[torch.Tensor]:
    """Every layer's features of ``images`` (the run's method, or another run's) from one pass per batch."""
    method = method or ctx.method
    return ctx.extract_sets(images, [(ly, pool) for ly in range(1, method.num_layers + 1)], method=method)


def cka_across_steps(ctx: EvalContext, images: torch.Tensor, pool: str) -> tuple[dict, Path]:
    """Linear CKA between every (t, layer) read-out of ``images``: one matrix over t-major blocks of layers."""
    from ..report.figures import cka_heatmap

    m, steps = ctx.method, sorted(ctx.ev.similarity.cka_t)
    feats, labels = [], []
    for t in steps:
        with noise_step(m, t):
            feats += all_layers(ctx, images, pool)
        labels += [f"t{t}/{ly}" for ly in range(1, m.num_layers + 1)]
    matrix = cka_matrix(feats)
    fig = cka_heatmap(matrix, ctx.figure("cka-across-t"), labels, labels,
                      title=f"linear CKA between (t, layer) read-outs ({pool})", xlabel="t/layer", ylabel="t/layer")
    n = m.num_layers
    same_layer = {f"{a}-{b}": float(torch.diagonal(matrix[i * n:(i + 1) * n, j * n:(j + 1) * n]).mean())
                  for i, a in enumerate(steps) for j, b in enumerate(steps) if i < j}
    return {"t": steps, "labels": labels, "matrix": matrix.tolist(), "same_layer_mean": same_layer}, fig
