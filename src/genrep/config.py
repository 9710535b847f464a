"""Typed run configuration: dataclasses, YAML recipes shipped in the package, dotted overrides.

A config is plain data. Every key is checked against its dataclass: an unknown key or a value of
the wrong type is a GenrepError that names the key and what would be valid. The ``model`` section
is typed by the chosen method's own config dataclass (``Method.config_class``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import GenrepError


@dataclass
class DataConfig:
    name: str = "digits"            # registry name, or npz:PATH / folder:PATH
    image_size: int | None = None   # resize to this; None keeps the data set's own (digits: 16)
    root: str | None = None         # cache folder for torchvision data sets ($GENREP_DATA by default)
    download: bool = True
    device_resident: bool | None = None  # None: on the device when the uint8 set fits comfortably
    num_workers: int = 2            # only for the streaming (not device-resident) path


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05      # never applied to norms, biases, embeddings and tokens
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_epochs: float = 10.0     # linear warm-up, then cosine to min_lr
    clip_grad: float = 1.0          # max global grad norm; 0 turns clipping off


@dataclass
class TrainConfig:
    epochs: float = 100.0
    steps: int = 0                  # > 0 overrides epochs
    batch_size: int = 128           # global: summed over processes and accumulation steps
    accum_steps: int = 1
    ema_decay: float = 0.999
    ema_warmup: bool = True         # decay min(ema_decay, (1+n)/(10+n)) at update n, so short runs work
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = False
    progress: bool = True


@dataclass
class ProbeConfig:
    layer: int | None = None        # None: the method's default layer
    pool: str | None = None         # None: the method's default pooling
    weights: str = "ema"            # ema | model
    solver: str = "lbfgs"           # lbfgs (full batch) | adamw (the GCRL protocol)
    weight_decay: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2])
    epochs: int = 100
    lr: float = 0.01
    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    batch_size: int = 512


PROTOCOLS = ("probes", "calibration", "ood", "likelihood", "generation", "robustness", "similarity",
             "finetune", "lowshot")


@dataclass
class EvalConfig:
    """`genrep evaluate`: which protocols run and their sizes; where a paper fixes a setting it is the default."""
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))  # those that apply to the method run
    weights: str = "ema"
    device: str = "auto"
    batch_size: int = 256
    seed: int = 0
    # probes: the GCRL linear protocol at the default read-out, then a fast sweep over layers and pools
    sweep_layers: list[int] = field(default_factory=list)   # empty: half, last and every k-th block
    sweep_pools: list[str] = field(default_factory=list)    # empty: every pooling the method offers
    # calibration
    ece_bins: int = 15              # 15 (Guo et al., GCRL); the HybViT recipes use 20 like its code
    # out-of-distribution detection (generated sets, or any data set name of the registry, resized)
    ood_sets: list[str] = field(default_factory=lambda: ["noise", "constant", "interp"])
    ood_scores: list[str] = field(default_factory=list)     # empty: every score the method supports
    ood_n: int = 1000               # in-distribution test images and images per OOD set
    gaussian_covariance: str = "shared"  # shared | class
    # likelihood (bits/dim on the test set)
    bpd_n: int = 1000
    bpd_terms: int = 0              # 0: all T terms of the bound; k: an unbiased stratified subset of k
    # generation
    fid_samples: int = 10000
    fid_extractor: str = "inception"  # inception (needs local weights) | classifier (custom: a CNN on the data)
    inception_weights: str = ""     # path; or the environment variable GENREP_INCEPTION_WEIGHTS
    sample_steps: int = 100         # DDIM steps
    # adversarial robustness: PGD with random start (eps lists: the HybViT paper's, in /255 units)
    pgd_norms: list[str] = field(default_factory=lambda: ["linf", "l2"])
    pgd_linf_eps: list[float] = field(default_factory=lambda: [0, 1, 2, 4, 8, 12, 16, 22, 30])
    pgd_l2_eps: list[float] = field(default_factory=lambda: [0, 50, 100, 150, 200, 250, 300, 350, 400])
    pgd_steps: int = 10
    pgd_n: int = 1000
    # representation similarity
    cka_n: int = 1000
    tsne_n: int = 1000
    cka_runs: list[str] = field(default_factory=list)  # other run folders on the same data: CKA between models
    # the labelled data of fine-tuning and low-shot: "" = the run's own; or a data set name, loaded at the
    # run's image size and channel count (GCRL fine-tunes and low-shot-transfers ImageNet32 models to CIFAR-10)
    transfer_data: str = ""
    # fine-tuning (whole network, fresh linear head on the default read-out)
    finetune_epochs: int = 15       # GCRL fine-tunes its ImageNet32 models for 15 epochs
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 128
    finetune_layer: int | None = None   # the read-out: None = the method's default layer and pooling
    finetune_pool: str | None = None
    finetune_causal: bool | None = None  # causal methods: fine-tune with (true) or without (false) the mask
    # low-shot transfer
    lowshot_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1])
    lowshot_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    lowshot_readout: str = "linear"  # linear (frozen features) | finetune


@dataclass
class Config:
    recipe: str = ""
    method: str = "supervised"
    model: Any = None               # the method's config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building from plain data

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except GenrepError:
                pass
        raise GenrepError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and "," in value:  # `--eval.protocols ood,calibration`: no shell quoting
            value = [yaml.safe_load(v.strip()) for v in value.split(",")]
        elif not isinstance(value, (list, tuple)):
            value = [value]  # `--probe.knn_k 20` means [20]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, bool, str) and type(value) is tp:
        return value
    raise GenrepError(f"config key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _unknown_key(section: str, key: str, valid: list[str]) -> GenrepError:
    where = f"'{section}.{key}'" if section else f"'{key}'"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return GenrepError(f"unknown config key {where}{hint}; valid keys{' in ' + section if section else ''}: "
                       f"{', '.join(valid)}")


def build_dataclass(cls: type, values: dict | None, section: str = "") -> Any:
    """Instantiate ``cls`` from a dict, checking every key and type."""
    values = values or {}
    if not isinstance(values, dict):
        raise GenrepError(f"config section '{section}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(section, key, names)
        full = f"{section}.{key}" if section else key
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build_dataclass(hints[key], value, full)
        else:
            kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def model_config_class(method: str) -> type:
    from .methods.registry import get_method  # methods register themselves on import

    return get_method(method).config_class


def config_from_dict(d: dict) -> Config:
    d = dict(d or {})
    method = d.get("method", Config.method)
    if not isinstance(method, str):
        raise GenrepError(f"config key 'method' must be a method name, got {method!r}")
    model = d.pop("model", None)
    cfg = build_dataclass(Config, d)
    cfg.model = build_dataclass(model_config_class(method), model, "model")
    return cfg


# ---------------------------------------------------------------- recipes and overrides

def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("genrep.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict:
    """A recipe is a shipped name or a path to a YAML file."""
    path = Path(name)
    if name.endswith((".yaml", ".yml")) and path.is_file():
        text = path.read_text()
    else:
        if name not in recipe_names():
            close = difflib.get_close_matches(name, recipe_names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise GenrepError(f"unknown recipe '{name}'{hint}; shipped recipes: {', '.join(recipe_names())} "
                              f"(or pass a path to a .yaml file)")
        text = resources.files("genrep.recipes").joinpath(f"{name}.yaml").read_text()
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise GenrepError(f"recipe '{name}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise GenrepError(f"recipe '{name}' must be a YAML mapping, got {type(d).__name__}")
    d.setdefault("recipe", path.stem if path.suffix in (".yaml", ".yml") else name)
    return d


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``['--optim.lr', '3e-4', '--train.compile', 'true']`` -> ``{'optim.lr': 3e-4, ...}``.

    Values are read as YAML scalars/lists, so ``1e-3``, ``true``, ``null`` and ``[20,200]`` work.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise GenrepError(f"unexpected argument '{arg}'; overrides look like --section.key VALUE "
                              f"(e.g. --optim.lr 3e-4)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise GenrepError(f"override '{arg}' needs a value, e.g. {arg} VALUE")
            value = args[i + 1]
            i += 1
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
        i += 1
    return out


def apply_overrides(d: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (validation happens when the Config is built)."""
    d = yaml.safe_load(yaml.safe_dump(d))  # deep copy of plain data
    for dotted, value in overrides.items():
        node = d
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise GenrepError(f"config key '{part}' in '{dotted}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return d


def resolve_config(recipe: str, overrides: dict[str, Any] | None = None) -> Config:
    return config_from_dict(apply_overrides(load_recipe(recipe), overrides or {}))


def save_config(cfg: Config, path: Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config_file(path: Path) -> Config:
    try:
        d = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise GenrepError(f"cannot read run config {path}: {e}") from None
    return config_from_dict(d)
