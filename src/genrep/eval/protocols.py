"""The evaluation protocols of the five papers, each a function of one :class:`EvalContext`.

Every protocol returns a JSON-ready dict (its settings next to its numbers, and ``figures``: name ->
PNG path relative to the run folder). ``PROTOCOLS`` maps a name to (what the method must offer, the
function); :mod:`genrep.eval.evaluate` runs those that apply and records why the others do not.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, EvalConfig
from ..data.imageset import ImageSet
from ..errors import GenrepError
from ..methods import Method
from .features import cached_features, extract_features

FIGURES_DIR = Path("figures") / "eval"


@dataclass
class EvalContext:
    run: Path
    cfg: Config
    ev: EvalConfig
    method: Method
    train: ImageSet
    test: ImageSet
    device: torch.device
    version: str          # the weights' identity ("ema@660"): cache entries are keyed by it
    progress: bool = True
    _transfer: tuple[ImageSet, ImageSet] | None = None

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda"

    def transfer_sets(self) -> tuple[ImageSet, ImageSet]:
        """(train, test) of fine-tuning and low-shot: the run's own data, or ``eval.transfer_data`` loaded at
        the run's image size and channel count."""
        name = self.ev.transfer_data
        if not name or name == self.cfg.data.name:
            return self.train, self.test
        if self._transfer is None:
            from ..data.datasets import load_dataset
            from .ood_sets import to_channels

            sets = []
            for split in ("train", "test"):
                s = load_dataset(name, split, image_size=self.train.image_size, root=self.cfg.data.root,
                                 download=self.cfg.data.download)
                sets.append(ImageSet(to_channels(s.images, self.train.channels), s.labels, s.classes, s.name))
            self._transfer = (sets[0], sets[1])
        return self._transfer

    def features(self, split: str, layer: int, pool: str, data: ImageSet | None = None) -> torch.Tensor:
        """Frozen features of ``split`` of the run's data (or of ``data``, e.g. a transfer set), cached."""
        own = data is None
        images = (self.train if split == "train" else self.test).images if own else data.images
        w = self.ev.weights
        options = "".join(f"-{k}{getattr(self.cfg.model, k)}" for k in self.method.feature_options)
        source = "" if own else "-" + "".join(c if c.isalnum() else "_" for c in data.name)
        return cached_features(self.run, f"features{source}-{split}-layer{layer}-{pool}{options}-{w}", self.version,
                               lambda: extract_features(self.method, images, layer=layer, pool=pool,
                                                        batch_size=self.ev.batch_size, device=self.device,
                                                        bf16=self.bf16, progress=self.progress,
                                                        desc=f"features {split} layer {layer} {pool}"))

    def test_subset(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded subset of ``n`` test images (all when n <= 0 or n >= the split), with labels."""
        if n <= 0 or n >= len(self.test):
            return self.test.images, self.test.labels
        idx = torch.randperm(len(self.test), generator=torch.Generator().manual_seed(self.ev.seed))[:n]
        return self.test.images[idx], self.test.labels[idx]

    def figure(self, name: str) -> Path:
        return self.run / FIGURES_DIR / f"{name}.png"

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run))


def default_readout(method: Method) -> tuple[int, str]:
    return method.check_feature_args(None, None)


def sweep_layers(method: Method, asked: list[int]) -> list[int]:
    """Half, last and every k-th block (k = depth // 4, at least 1), unless the config lists layers."""
    n = method.num_layers
    if asked:
        for layer in asked:
            method.check_feature_args(layer, None)
        return sorted(set(asked))
    k = max(1, n // 4)
    return sorted({math.ceil(n / 2), n, *range(k, n + 1, k)})


# ------------------------------------------------------------------------------------------------ probes
# L-BFGS line searches and hundreds of tiny AdamW steps are latency-bound on a GPU (the digits probes took
# 25 s on an H200 and 5.7 s on 2 CPU cores), so probe problems smaller than this many train-feature
# elements are solved on the CPU; features are still extracted on the evaluation device
SMALL_PROBE = 1 << 22


def probes(ctx: EvalContext) -> dict:
    """The GCRL linear protocol (AdamW) and kNN at the default read-out, then a full-batch sweep."""
    from .probes import knn_classify, linear_probe

    m, p = ctx.method, ctx.cfg.probe
    n_cls = ctx.train.num_classes
    layer, pool = default_readout(m)
    xtr, xte = ctx.features("train", layer, pool), ctx.features("test", layer, pool)
    dev = ctx.device if xtr.numel() >= SMALL_PROBE else torch.device("cpu")
    xtr, xte = xtr.to(dev), xte.to(dev)
    ytr, yte = ctx.train.labels.to(dev), ctx.test.labels.to(dev)
    gcrl = linear_probe(xtr, ytr, xte, yte, n_cls, solver="adamw", weight_decay=1e-4, epochs=p.epochs, lr=p.lr,
                        batch_size=512, seed=ctx.ev.seed)
    knn = knn_classify(xtr, ytr, xte, yte, n_cls, k=p.knn_k, temperature=p.knn_temperature)
    pools = ctx.ev.sweep_pools or list(m.feature_pools)
    for pl in pools:
        m.check_feature_args(None, pl)
    sweep = []
    for ly in sweep_layers(m, ctx.ev.sweep_layers):
        for pl in pools:
            a, b = ctx.features("train", ly, pl).to(dev), ctx.features("test", ly, pl).to(dev)
            lin = linear_probe(a, ytr, b, yte, n_cls, solver="lbfgs", weight_decay=p.weight_decay, seed=ctx.ev.seed)
            k20 = knn_classify(a, ytr, b, yte, n_cls, k=[min(p.knn_k)], temperature=p.knn_temperature)
            sweep.append({"layer": ly, "pool": pl, "linear_acc": lin.test_acc, "weight_decay": lin.weight_decay,
                          "knn_acc": next(iter(k20.values()))})
    best = max(sweep, key=lambda r: r["linear_acc"])
    out = {"layer": layer, "pool": pool, "feature_dim": int(xtr.shape[1]), "solver_device": str(dev),
           "linear_acc": gcrl.test_acc, "linear": {"solver": "adamw", "epochs": p.epochs, "lr": p.lr,
                                                   "weight_decay": 1e-4, "batch_size": 512},
           "knn": {str(k): v for k, v in knn.items()}, "sweep": sweep,
           "best": {**best, "selected_on": "test accuracy of the sweep (as the papers' layer sweeps report)"}}
    if "logits" in m.capabilities:
        from .probe_run import classifier_accuracy
        out["classifier_acc"] = classifier_accuracy(m, ctx.test.images, ctx.test.labels, ctx.device,
                                                    ctx.ev.batch_size)
    return out


# ------------------------------------------------------------------------------------------- calibration
def calibration(ctx: EvalContext) -> dict:
    from .calibration import expected_calibration_error, predict_probs, reliability_diagram

    bins = ctx.ev.ece_bins
    probs = predict_probs(ctx.method, ctx.test.images, device=ctx.device, batch_size=ctx.ev.batch_size,
                          progress=ctx.progress)
    ece = expected_calibration_error(probs, ctx.test.labels, bins)
    fig = reliability_diagram(probs, ctx.test.labels, ctx.figure("reliability"), n_bins=bins,
                              title=f"{ctx.cfg.method} on {ctx.cfg.data.name}")
    return {"ece": ece, "bins": bins, "accuracy": float((probs.argmax(1) == ctx.test.labels).float().mean()),
            "mean_confidence": float(probs.max(1).values.mean()), "n": len(probs),
            "figures": {"reliability diagram": ctx.rel(fig)}}


# ----------------------------------------------------------------------------------------------- OOD
def ood_score_kinds(ctx: EvalContext) -> tuple[list[str], dict[str, str]]:
    """The scores to compute and, for those asked for but not applicable, why not."""
    from .ood import applicable_scores

    app = applicable_scores(ctx.method)
    asked = ctx.ev.ood_scores or list(app)
    unknown = [k for k in asked if k not in app]
    if unknown:
        raise GenrepError(f"unknown OOD score {', '.join(unknown)}; choose from {', '.join(app)}")
    return [k for k in asked if app[k] is None], {k: app[k] for k in asked if app[k] is not None}


def ood(ctx: EvalContext) -> dict:
    from .ood import GaussianOODScore, method_scores, ood_metrics, score_histogram
    from .ood_sets import make_ood_images

    kinds, skipped = ood_score_kinds(ctx)
    layer, pool = default_readout(ctx.method)
    gaussian = None
    if "gaussian" in kinds:
        gaussian = GaussianOODScore().fit(ctx.features("train", layer, pool), ctx.train.labels,
                                          covariance=ctx.ev.gaussian_covariance)
    in_images, _ = ctx.test_subset(ctx.ev.ood_n)
    n = len(in_images)
    nll_terms = ctx.ev.bpd_terms or None

    def scores(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return method_scores(ctx.method, images, kinds, device=ctx.device, batch_size=ctx.ev.batch_size,
                             gaussian=gaussian, layer=layer, pool=pool, nll_terms=nll_terms, seed=ctx.ev.seed,
                             progress=ctx.progress)

    s_in = scores(in_images)
    results = {k: {} for k in kinds}
    s_out_all = {}
    for name in ctx.ev.ood_sets:
        images = make_ood_images(name, ctx.test, n, seed=ctx.ev.seed, root=ctx.cfg.data.root,
                                 download=ctx.cfg.data.download)
        s_out_all[name] = scores(images)
        for k in kinds:
            results[k][name] = ood_metrics(s_in[k], s_out_all[name][k])
    figures = {}
    for k in kinds:
        fig = score_histogram({f"{ctx.cfg.data.name} (in)": s_in[k], **{nm: s[k] for nm, s in s_out_all.items()}},
                              ctx.figure(f"ood-{k}"), title=f"OOD score: {k}", in_name=f"{ctx.cfg.data.name} (in)")
        figures[f"OOD scores: {k}"] = ctx.rel(fig)
    return {"scores": results, "n_in": n, "sets": list(ctx.ev.ood_sets), "layer": layer, "pool": pool,
            "gaussian_covariance": ctx.ev.gaussian_covariance, "bpd_terms": ctx.ev.bpd_terms or "all",
            "not_applicable": skipped, "figures": figures}


# ----------------------------------------------------------------------------------------- likelihood
def likelihood(ctx: EvalContext) -> dict:
    from .ood import method_scores

    images, _ = ctx.test_subset(ctx.ev.bpd_n)
    terms = ctx.ev.bpd_terms or None
    bpd = -method_scores(ctx.method, images, ["bpd"], device=ctx.device, batch_size=ctx.ev.batch_size,
                         nll_terms=terms, seed=ctx.ev.seed, progress=ctx.progress)["bpd"]
    return {"bpd": float(bpd.mean()), "bpd_sem": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else 0.0,
            "n": len(bpd), "terms": terms or "all"}


# ----------------------------------------------------------------------------------------- generation
def extractor_for(ctx: EvalContext):
    from .extractors import dataset_classifier_extractor, inception_extractor

    kind = ctx.ev.fid_extractor
    if kind == "inception":
        return inception_extractor(ctx.ev.inception_weights or None)
    if kind == "classifier":
        from ..data.datasets import default_data_root
        return dataset_classifier_extractor(ctx.train, ctx.test, cache_dir=default_data_root() / "extractors",
                                            seed=ctx.ev.seed, device=ctx.device)
    raise GenrepError(f"eval.fid_extractor '{kind}' is unknown; choose inception (Inception v3, needs local "
                      f"weights) or classifier (custom: a small CNN trained on the data set)")


def generation(ctx: EvalContext) -> dict:
    from ..data.datasets import default_data_root
    from .generation import generation_metrics
    from .samples import display_scale, grid, save_png

    extractor = extractor_for(ctx)  # first: a missing weights file must fail before minutes of sampling
    n, bs = ctx.ev.fid_samples, max(1, ctx.ev.batch_size)
    if n < 2:
        raise GenrepError(f"eval.fid_samples must be at least 2, got {n}")
    g = torch.Generator().manual_seed(ctx.ev.seed)
    t0 = time.perf_counter()
    chunks = []
    batches = range(0, n, bs)
    if ctx.progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"sampling {n} images", unit="batch", leave=False, disable=None)
    for i in batches:
        x = ctx.method.sample(min(bs, n - i), steps=min(ctx.ev.sample_steps, ctx.method.diffusion.T), generator=g)
        chunks.append((x * 255).round().to(torch.uint8).cpu())
    fake = torch.cat(chunks)
    sample_seconds = time.perf_counter() - t0
    scores = generation_metrics(fake, ctx.train.images, extractor, batch_size=ctx.ev.batch_size, device=ctx.device,
                                reference_cache=default_data_root() / "fid-reference", progress=ctx.progress)
    scores["not_computed"] = scores.pop("skipped", {})  # "skipped" means a whole protocol did not apply
    path = ctx.figure("samples")
    k = min(64, n)
    save_png(grid(fake[:k].float() / 255, nrow=math.ceil(math.sqrt(k))), path, display_scale(fake.shape[-1]))
    return {**scores, "sampler": "ddim", "steps": min(ctx.ev.sample_steps, ctx.method.diffusion.T),
            "sampling_seconds": round(sample_seconds, 2), "reference": f"{ctx.cfg.data.name} train",
            "figures": {"samples": ctx.rel(path)}}


# ----------------------------------------------------------------------------------------- robustness
def robustness(ctx: EvalContext) -> dict:
    from .robustness import robust_accuracy, robustness_figure

    images, labels = ctx.test_subset(ctx.ev.pgd_n)
    lists = {"linf": ctx.ev.pgd_linf_eps, "l2": ctx.ev.pgd_l2_eps}
    results = {}
    for norm in ctx.ev.pgd_norms:
        if norm not in lists:
            raise GenrepError(f"eval.pgd_norms has '{norm}'; choose linf and/or l2")
        results[norm] = robust_accuracy(ctx.method, images, labels, norm=norm,
                                        eps_list=[e / 255 for e in lists[norm]], steps=ctx.ev.pgd_steps,
                                        batch_size=ctx.ev.batch_size, device=ctx.device, seed=ctx.ev.seed,
                                        progress=ctx.progress)
    fig = robustness_figure(results, ctx.figure("pgd"), title=f"PGD, {ctx.ev.pgd_steps} steps")
    return {"accuracy": results, "eps_unit": "1/255", "eps": {k: lists[k] for k in results},
            "steps": ctx.ev.pgd_steps, "n": len(images), "figures": {"PGD accuracy": ctx.rel(fig)}}


# ----------------------------------------------------------------------------------------- similarity
def similarity(ctx: EvalContext) -> dict:
    from .ood_sets import make_ood_images
    from .similarity import cka_heatmap, cka_matrix, tsne_figure

    m = ctx.method
    layer, pool = default_readout(m)
    images, _labels = ctx.test_subset(ctx.ev.cka_n)
    layers = list(range(1, m.num_layers + 1))
    feats = [extract_features(m, images, layer=ly, pool=pool, batch_size=ctx.ev.batch_size, device=ctx.device,
                              bf16=ctx.bf16) for ly in layers]
    matrix = cka_matrix(feats)
    names = [str(ly) for ly in layers]
    heat = cka_heatmap(matrix, ctx.figure("cka-layers"), names, names, title=f"linear CKA between layers ({pool})",
                       xlabel="layer", ylabel="layer")
    figures = {"CKA between layers": ctx.rel(heat)}
    between = {}
    for i, other in enumerate(ctx.ev.cka_runs):
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
    t_images, t_labels = ctx.test_subset(ctx.ev.tsne_n)
    t_feats = ctx.features("test", layer, pool)
    if len(t_images) < len(ctx.test):
        t_feats = extract_features(m, t_images, layer=layer, pool=pool, batch_size=ctx.ev.batch_size,
                                   device=ctx.device, bf16=ctx.bf16)
    ood_name = ctx.ev.ood_sets[0] if ctx.ev.ood_sets else None
    ood_feats = None
    if ood_name:
        ood_images = make_ood_images(ood_name, ctx.test, max(1, len(t_images) // 4), seed=ctx.ev.seed,
                                     root=ctx.cfg.data.root, download=ctx.cfg.data.download)
        ood_feats = extract_features(m, ood_images, layer=layer, pool=pool, batch_size=ctx.ev.batch_size,
                                     device=ctx.device, bf16=ctx.bf16)
    tsne = tsne_figure(t_feats, t_labels, ctx.figure("tsne"), classes=ctx.test.classes, ood_features=ood_feats,
                       ood_name=ood_name or "OOD", seed=ctx.ev.seed,
                       title=f"t-SNE of layer {layer} ({pool}) features")
    figures["t-SNE"] = ctx.rel(tsne)
    return {"layers": layers, "pool": pool, "cka": matrix.tolist(), "n": len(images),
            "cka_adjacent_mean": float(torch.diagonal(matrix, 1).mean()) if len(layers) > 1 else 1.0,
            "between_models": between, "figures": figures}


def other_run_features(ctx: EvalContext, other: Path, images: torch.Tensor):
    """Every layer's features (its default pooling) of another run on the same images, for CKA between models."""
    from ..runs import load_trained, read_run_config

    o_cfg = read_run_config(other)
    if (o_cfg.data.name, o_cfg.data.image_size) != (ctx.cfg.data.name, ctx.cfg.data.image_size):
        raise GenrepError(f"eval.cka_runs: {other} was trained on {o_cfg.data.name} at image_size "
                          f"{o_cfg.data.image_size}, this run on {ctx.cfg.data.name} at {ctx.cfg.data.image_size}; "
                          f"CKA between models needs the same images")
    o_cfg, o_method, _ = load_trained(other, ctx.ev.weights, ctx.device)
    _, o_pool = default_readout(o_method)
    feats = [extract_features(o_method, images, layer=ly, pool=o_pool, batch_size=ctx.ev.batch_size,
                              device=ctx.device, bf16=ctx.bf16) for ly in range(1, o_method.num_layers + 1)]
    return o_cfg, o_method, feats


# ----------------------------------------------------------------------------------------- fine-tuning
def finetune(ctx: EvalContext) -> dict:
    from .finetune import finetune as run_finetune

    train, test = ctx.transfer_sets()
    out = run_finetune(ctx.method, train, test, **finetune_settings(ctx), seed=ctx.ev.seed, device=ctx.device,
                       ece_bins=ctx.ev.ece_bins, progress=ctx.progress)
    return {**out, "data": train.name}


def finetune_settings(ctx: EvalContext) -> dict:
    # the pretraining augmentation: weak flips and crops help CIFAR and wreck digits (its recipes use none)
    return dict(epochs=ctx.ev.finetune_epochs, lr=ctx.ev.finetune_lr, batch_size=ctx.ev.finetune_batch_size,
                augment=getattr(ctx.cfg.model, "augment", "none"), layer=ctx.ev.finetune_layer,
                pool=ctx.ev.finetune_pool, causal=ctx.ev.finetune_causal)


def lowshot(ctx: EvalContext) -> dict:
    from .lowshot import low_shot

    layer, pool = default_readout(ctx.method)
    train, test = ctx.transfer_sets()
    own = train is ctx.train
    features = None
    if ctx.ev.lowshot_readout == "linear":
        features = (ctx.features("train", layer, pool, None if own else train),
                    ctx.features("test", layer, pool, None if own else test))
    kwargs = finetune_settings(ctx)
    return {"data": train.name, **low_shot(ctx.method, train, test, fractions=tuple(ctx.ev.lowshot_fractions),
                    seeds=tuple(ctx.ev.lowshot_seeds), readout=ctx.ev.lowshot_readout, ece_bins=ctx.ev.ece_bins,
                    device=ctx.device, progress=ctx.progress, features=features,
                    finetune_kwargs=kwargs if ctx.ev.lowshot_readout == "finetune" else None)}


# name -> (capability the method must have, or None; the protocol; whether it is expensive)
PROTOCOLS = {
    "probes": (None, probes, False),
    "calibration": ("logits", calibration, False),
    "ood": (None, ood, False),
    "likelihood": ("nll", likelihood, False),
    "generation": ("sample", generation, True),
    "robustness": ("logits", robustness, True),
    "similarity": (None, similarity, False),
    "finetune": (None, finetune, True),
    "lowshot": (None, lowshot, False),
}

NEEDS = {"logits": "a classifier head (the 'logits' capability)", "nll": "a likelihood (the 'nll' capability)",
         "sample": "a sampler (the 'sample' capability)"}
