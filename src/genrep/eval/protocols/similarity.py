"""The similarity protocol: linear CKA between the method's layers (and with other runs' layers), and a t-SNE
map of its features with OOD points in grey (the first of ``eval.ood.sets``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import GenrepError
from ...fields import setting
from ..metrics.similarity import cka_matrix
from .context import EvalContext, default_readout


@dataclass
class SimilaritySettings:
    cka_n: int = setting(1000, min=1)   # test images of CKA
    tsne_n: int = setting(1000, min=1)  # test images of the t-SNE map
    cka_runs: list[str] = field(default_factory=list)  # other run folders on the same data: CKA between models


def check(ctx: EvalContext) -> None:
    """A folder that is not a run, or a t-SNE OOD set missing offline, fails here, not after the other protocols."""
    from ...runs import read_run_config

    for other in ctx.ev.similarity.cka_runs:
        read_run_config(Path(other))
    if ctx.ev.ood.sets:
        ctx.ood_images(ctx.ev.ood.sets[0], 1)


def other_run_features(ctx: EvalContext, other: Path, images: torch.Tensor):
    """Every layer's features (its default pooling) of another run on the same images, for CKA between models."""
    from ...runs import load_trained, read_run_config

    o_cfg = read_run_config(other)
    if (o_cfg.data.name, o_cfg.data.image_size) != (ctx.cfg.data.name, ctx.cfg.data.image_size):
        raise GenrepError(f"eval.similarity.cka_runs: {other} was trained on {o_cfg.data.name} at image_size "
                          f"{o_cfg.data.image_size}, this run on {ctx.cfg.data.name} at {ctx.cfg.data.image_size}; "
                          f"CKA between models needs the same images")
    o_cfg, o_method, _ = load_trained(other, ctx.ev.weights, ctx.device)
    _, o_pool = default_readout(o_method)
    feats = [ctx.extract(images, ly, o_pool, method=o_method) for ly in range(1, o_method.num_layers + 1)]
    return o_cfg, o_method, feats


def run(ctx: EvalContext) -> dict:
    from ..report.figures import cka_heatmap
    from ..report.tsne import tsne_figure

    s, m = ctx.ev.similarity, ctx.method
    layer, pool = default_readout(m)
    images, _labels = ctx.test_subset(s.cka_n)
    layers = list(range(1, m.num_layers + 1))
    feats = [ctx.extract(images, ly, pool) for ly in layers]
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
            "between_models": between, "figures": figures}
