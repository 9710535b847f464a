"""Run folders: create one, and rebuild a trained method from one."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import Config, load_config_file
from .data.datasets import ImageSet, load_dataset
from .errors import GenrepError
from .methods import DataSpec, Method, build_method
from .train.checkpoint import load_safetensors

CONFIG_FILE = "config.yaml"


def load_split(cfg: Config, split: str) -> ImageSet:
    d = cfg.data
    return load_dataset(d.name, split, image_size=d.image_size, root=d.root, download=d.download)


def load_train_set(cfg: Config) -> ImageSet:
    return load_split(cfg, "train")


def data_spec(images: ImageSet) -> DataSpec:
    _, c, h, w = images.images.shape
    if h != w:
        raise GenrepError(f"data set {images.name} has {h}x{w} images; genrep's models need square images "
                          f"(set --data.image_size)")
    return DataSpec(image_size=h, channels=c, num_classes=len(images.classes))


def build_for_data(cfg: Config, images: ImageSet) -> Method:
    return build_method(cfg.method, cfg.model, data_spec(images))


def new_run_dir(base: Path, name: str) -> Path:
    """``base/name``, or ``base/name-2``, ``-3``... if taken: a new run never overwrites an old one."""
    path, i = Path(base) / name, 2
    while path.exists():
        path, i = Path(base) / f"{name}-{i}", i + 1
    return path


def read_run_config(run: Path) -> Config:
    run = Path(run)
    if not (run / CONFIG_FILE).is_file():
        raise GenrepError(f"{run} is not a genrep run folder (no {CONFIG_FILE}); pass a folder written by "
                          f"genrep pretrain")
    return load_config_file(run / CONFIG_FILE)


def with_feature_options(cfg: Config, options: dict | None) -> Config:
    """``cfg`` with model keys changed that only affect how features are read (``Method.feature_options``)."""
    if not options:
        return cfg
    from .config import apply_overrides, config_from_dict
    from .methods import get_method

    allowed = get_method(cfg.method).feature_options
    bad = [k for k in options if k not in allowed]
    if bad:
        hint = f"; {cfg.method} lets a probe change {', '.join('model.' + k for k in allowed)}" if allowed else ""
        raise GenrepError(f"cannot change {', '.join('model.' + k for k in bad)} of a trained {cfg.method} run "
                          f"(the weights were trained with it){hint}")
    return config_from_dict(apply_overrides(cfg.to_dict(), {f"model.{k}": v for k, v in options.items()}))


def load_trained(run: Path, weights: str = "ema", device: str | torch.device = "cpu",
                 feature_options: dict | None = None) -> tuple[Config, Method, ImageSet]:
    """The run's config, its method with trained weights (eval mode), and its training set."""
    if weights not in ("ema", "model"):
        raise GenrepError(f"weights '{weights}' is unknown; choose ema or model")
    cfg = with_feature_options(read_run_config(run), feature_options)
    train_set = load_train_set(cfg)
    method = build_for_data(cfg, train_set)
    state = load_safetensors(Path(run) / f"{weights}.safetensors")
    try:
        method.load_state_dict(state)
    except RuntimeError as e:
        raise GenrepError(f"{run}/{weights}.safetensors does not fit the model in {run}/{CONFIG_FILE} "
                          f"({str(e).splitlines()[0][:160]})") from None
    return cfg, method.to(device).eval(), train_set
