"""`genrep probe RUN`: frozen-feature probes (linear, kNN) and, for classifiers, head accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ProbeConfig
from ..devices import resolve_device
from ..io import atomic_write_json
from ..methods import Method
from ..runs import load_split, load_trained, read_run_config
from .features import cached_features, extract_features
from .probes import knn_classify, linear_probe

RESULTS_DIR = "results"


def weights_version(run: Path, weights: str) -> str:
    """Identifies the weights file a cache entry was computed from (its checkpoint step)."""
    with safe_open(str(Path(run) / f"{weights}.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    return f"{weights}@{meta.get('step', 'unknown')}"


def classifier_accuracy(method: Method, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                        batch_size: int = 512) -> float:
    from .calibration import predict_probs

    probs = predict_probs(method, images, device=device, batch_size=batch_size)
    return float((probs.argmax(1) == labels).float().mean())


def run_probes(run: Path, probe: ProbeConfig | None = None, device: str = "auto", progress: bool = True,
               feature_options: dict | None = None) -> dict:
    """Probe the run's frozen features; ``probe`` defaults to the run's own ``probe`` config section;
    ``feature_options`` overrides model keys that only change how features are read (e.g. feature_t)."""
    run = Path(run)
    dev = resolve_device(device)
    p = probe or read_run_config(run).probe
    cfg, method, train_set = load_trained(run, p.weights, dev, feature_options)
    test_set = load_split(cfg, "test")
    layer, pool = method.check_feature_args(p.layer, p.pool)
    version = weights_version(run, p.weights)
    options = {k: getattr(cfg.model, k) for k in method.feature_options}
    tag = "".join(f"-{k}{v}" for k, v in options.items())
    t0 = time.perf_counter()

    def feats(split: str, images: torch.Tensor) -> torch.Tensor:
        return cached_features(run, f"features-{split}-layer{layer}-{pool}{tag}-{p.weights}", version,
                               lambda: extract_features(method, images, layer=layer, pool=pool,
                                                        batch_size=p.batch_size, device=dev,
                                                        progress=progress, desc=f"features {split}"))

    train_x, test_x = feats("train", train_set.images), feats("test", test_set.images)
    n_cls = len(train_set.classes)
    linear = linear_probe(train_x.to(dev), train_set.labels.to(dev), test_x.to(dev), test_set.labels.to(dev), n_cls,
                          solver=p.solver, weight_decay=p.weight_decay, epochs=p.epochs, lr=p.lr,
                          batch_size=p.batch_size, seed=cfg.train.seed)
    knn = knn_classify(train_x.to(dev), train_set.labels.to(dev), test_x.to(dev), test_set.labels.to(dev), n_cls,
                       k=p.knn_k, temperature=p.knn_temperature)
    results = {
        "run": str(run), "recipe": cfg.recipe, "method": cfg.method, "weights": version,
        "data": cfg.data.name, "n_train": len(train_set), "n_test": len(test_set), "num_classes": n_cls,
        "layer": layer, "pool": pool, **options, "feature_dim": int(train_x.shape[1]),
        "linear_probe": linear.to_dict(),
        "knn": {str(k): acc for k, acc in knn.items()},
    }
    if "logits" in method.capabilities:
        results["classifier_test_acc"] = classifier_accuracy(method, test_set.images, test_set.labels, dev)
    results["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(run / RESULTS_DIR / "probe.json", results)
    return results
