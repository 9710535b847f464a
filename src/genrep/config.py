"""Typed run configuration: dataclasses, YAML recipes shipped in the package, dotted overrides.

A config is plain data. Every key is checked against its dataclass: an unknown key or a value of
the wrong type is a GenrepError that names the key and what would be valid; so is a value outside the
valid values its field declares (:func:`genrep.fields.setting`), checked here, once. The ``model``
section is typed by the chosen method's own config dataclass (``Method.config_class``). A run's
``config.yaml`` records ``config_version``; :func:`load_config_file` migrates older versions.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .data.packed import DECODE_PLACES
from .data.resize import RESIZES
from .errors import GenrepError
from .eval.features import PRECISIONS
from .eval.metrics.heads import HEADS
from .eval.metrics.probes import LR_SCHEDULES, SOLVERS
from .eval.periodic import PERIODIC_METRICS
from .eval.protocols.calibration import CalibrationSettings
from .eval.protocols.completion import CompletionSettings
from .eval.protocols.energy import EnergySettings
from .eval.protocols.finetune import FinetuneSettings
from .eval.protocols.generation import GenerationSettings
from .eval.protocols.likelihood import LikelihoodSettings
from .eval.protocols.head_training import HeadSettings
from .eval.protocols.lowshot import LowshotSettings
from .eval.protocols.ood import OODSettings
from .eval.protocols.probes import HEADLINES, LarsSettings, ProbesSettings, check_lars
from .eval.protocols.robustness import RobustnessSettings
from .eval.protocols.similarity import SimilaritySettings
from .eval.protocols.sweep import SweepSettings
from .fields import Pool, check_fields, one_line, setting, show

# 1: flat eval keys (eval.ood_n, eval.sample_steps...); 2: one eval section per protocol, sampling and
# likelihood options in the model section; 3: DARL's gamma_embedding is gamma_conditioning and its initialisation a
# key, both with new defaults (load_config_file migrates each to the next)
CONFIG_VERSION = 3
MAX_IMAGE_SIZE = 1024  # the largest side any recipe uses is 256 (ADM on ImageNet); 1024 leaves room
WEIGHTS = ("ema", "model")


@dataclass
class DataConfig:
    name: str = "digits"            # registry name, or npz:PATH / folder:PATH
    # resize to this; None keeps the data set's own (digits: 8). The bound keeps a typo from allocating terabytes
    image_size: int | None = setting(None, min=1, max=MAX_IMAGE_SIZE)
    # how image_size is reached: squash (the whole image, bilinear) or center_crop (guided-diffusion's: the short
    # side to image_size, then the centred square, as the diffusion-features paper reads its inputs); None: the data
    # set's own, squash for every set but the fine-grained transfer sets (cub, aircraft, ...), which centre-crop
    resize: str | None = setting(None, choices=RESIZES)
    # train on N images of the training split, an equal share of each class taken in the split's order (the CPU
    # scale of genrep reproduce; a budget, not a method change); None: the whole split. The test split is whole.
    train_images: int | None = setting(None, min=1)
    root: str | None = None         # cache folder for torchvision data sets ($GENREP_DATA by default)
    download: bool = True
    device_resident: bool | None = None  # None: on the device when the uint8 set fits comfortably
    num_workers: int = setting(2, min=0, max=256)  # only for the streaming (not device-resident) path
    # where a packed set's JPEGs are decoded for training: workers (the DataLoader's processes, on the CPU), device
    # (the training device, one batched call: nvjpeg on CUDA), auto (device on CUDA for a colour pack that is square
    # at the read size, else workers)
    decode: str = setting("auto", choices=DECODE_PLACES)


@dataclass
class OptimConfig:
    lr: float = setting(1e-3, above=0)
    min_lr: float = setting(1e-6, min=0)
    weight_decay: float = setting(0.05, min=0)  # never applied to norms, biases, embeddings and tokens
    betas: list[float] = setting([0.9, 0.999], min=0, below=1)
    eps: float = setting(1e-8, above=0)
    warmup_epochs: float = setting(10.0, min=0)  # linear warm-up, then cosine to min_lr
    warmup_steps: int = setting(0, min=0)        # > 0 overrides warmup_epochs (the paper recipes count steps)
    # False decays every parameter, as the HybViT code's AdamW(model.parameters()); True spares norms, biases,
    # embeddings and tokens (timm's and DiT's habit)
    decay_exclusions: bool = True
    clip_grad: float = setting(1.0, min=0)       # max global grad norm; 0 turns clipping off
    # a second phase of the schedule (GCRL's generative-only first half at one peak, the hybrid second half at
    # another): at this fraction of the steps the schedule restarts, warm-up then cosine from second_phase_lr
    second_phase_at: float | None = setting(None, above=0, below=1)
    second_phase_lr: float | None = setting(None, above=0)

    def validate(self, section: str) -> None:
        if len(self.betas) != 2:
            raise GenrepError(f"{section}.betas must be two numbers in [0, 1), got {self.betas}")
        if (self.second_phase_at is None) != (self.second_phase_lr is None):
            raise GenrepError(f"{section}.second_phase_at and {section}.second_phase_lr go together: set both "
                              f"(a fraction of the steps in (0, 1) and a peak learning rate) or neither")


@dataclass
class TrainConfig:
    # the budget, in passes over the training set or in optimizer steps; steps > 0 wins, and then epochs is
    # written null in the run's config.yaml, so a run says in one unit how long it trained
    epochs: float | None = setting(100.0, min=0)
    steps: int = setting(0, min=0)
    batch_size: int = setting(128, min=1)        # global: summed over processes and accumulation steps
    accum_steps: int = setting(1, min=1)
    ema_decay: float = setting(0.999, min=0, below=1)
    ema_warmup: bool = True         # decay min(ema_decay, (1+n)/(10+n)) at update n, so short runs work
    precision: str = setting("auto", choices=("auto", "bf16", "fp32"))  # auto: bf16 on CUDA, fp32 on the CPU
    compile: bool = False
    seed: int = setting(0, min=0)
    device: str = "auto"            # auto | cpu | cuda | cuda:N (checked against the machine when resolved)
    log_every: int = setting(10, min=1)
    ckpt_every: int = setting(500, min=1)
    keep_checkpoints: int = setting(2, min=0)    # 0 keeps them all
    tensorboard: bool = False
    progress: bool = True
    # evaluation during training (eval/periodic.py): every eval_every steps (None: never), logged to log.jsonl
    eval_every: int | None = setting(None, min=1)
    eval_metrics: list[str] = setting(["knn"], choices=PERIODIC_METRICS, nonempty=True, unique=True)
    eval_n: int | None = setting(None, min=1)       # train and test images for knn/accuracy; None: all
    eval_samples: int = setting(1000, min=2)        # samples for fid

    def validate(self, section: str) -> None:
        if self.steps > 0:
            self.epochs = None
        elif self.epochs is None:
            raise GenrepError(f"{section}.epochs is null and {section}.steps is 0: set one of them to a positive "
                              f"value (passes over the data, or optimizer steps)")


@dataclass
class ProbeConfig:
    """`genrep probe`: the probes protocol at one read-out, without the sweep (``eval.probes`` is `genrep
    evaluate`'s)."""
    layer: int | None = setting(None, min=1)   # None: the method's default layer
    pool: Pool | None = None        # None: the method's default pooling
    weights: str = setting("ema", choices=WEIGHTS)
    # lbfgs (full batch) | adamw (the GCRL protocol) | lars (MAE's linear probe: BatchNorm on the features, LARS)
    solver: str = setting("lbfgs", choices=SOLVERS)
    weight_decay: list[float] = setting([1e-5, 1e-4, 1e-3, 1e-2], min=0, nonempty=True)  # several: held-out choice
    epochs: int = setting(100, min=1, only_if={"solver": ("adamw", "lars")})
    lr: float = setting(0.01, above=0, only_if={"solver": "adamw"})  # lars: lars.base_lr
    knn_k: list[int] = setting([20, 200], min=1, nonempty=True)
    knn_temperature: float = setting(0.07, above=0)
    batch_size: int = setting(512, min=1, only_if={"solver": ("adamw", "lars")})  # lars: clamped to the train set
    # genrep's habits beyond GCRL's section 4.2 (which the paper recipes turn off): standardised features, and
    # the adamw rate decayed on a cosine (lars normalises with its BatchNorm instead)
    standardize: bool = setting(True, only_if={"solver": ("lbfgs", "adamw")})
    lr_schedule: str = setting("cosine", choices=LR_SCHEDULES, only_if={"solver": "adamw"})
    lars: LarsSettings = field(default_factory=LarsSettings)  # the lars solver's own keys
    # heads of the diffusion-features paper trained at the read-out's layer besides the linear probe (mlp on the
    # pooled vector; cnn and attention on the layer's map)
    heads: list[str] = setting([], choices=HEADS, unique=True)
    head: HeadSettings = field(default_factory=HeadSettings)
    # the result the summary prints first and probe.json names: genrep's linear probe, or one of the heads (trained
    # whether or not heads names it)
    headline: str = setting("linear_probe", choices=HEADLINES)
    # the network's precision while extracting features: auto is bf16 on CUDA and fp32 elsewhere; fp16 needs CUDA
    precision: str = setting("auto", choices=PRECISIONS)

    def validate(self, section: str) -> None:
        check_lars(self, section)


PROTOCOLS = ("probes", "calibration", "ood", "likelihood", "generation", "completion", "energy", "robustness",
             "similarity", "finetune", "lowshot", "sweep")
# run only when named (`genrep sweep`, or --eval.protocols sweep): a grid of read-outs is minutes to hours
ON_DEMAND = ("sweep",)


@dataclass
class EvalConfig:
    """`genrep evaluate`: which protocols run, what they share, and one section of settings per protocol
    (its dataclass lives beside the protocol in genrep.eval.protocols); where a paper fixes a setting it is
    the default."""
    protocols: list[str] = setting([p for p in PROTOCOLS if p not in ON_DEMAND], choices=PROTOCOLS,
                                   nonempty=True)  # those that apply run
    weights: str = setting("ema", choices=WEIGHTS)
    device: str = "auto"
    batch_size: int = setting(256, min=1)
    seed: int = setting(0, min=0)
    # the network's precision while extracting features (every protocol's; part of the feature-cache key): auto is
    # bf16 on CUDA and fp32 elsewhere, fp16 needs CUDA
    precision: str = setting("auto", choices=PRECISIONS)
    # the labelled data of fine-tuning and low-shot: "" = the run's own; or a data set name, loaded at the
    # run's image size and channel count (GCRL fine-tunes and low-shot-transfers ImageNet32 models to CIFAR-10)
    transfer_data: str = ""
    probes: ProbesSettings = field(default_factory=ProbesSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    ood: OODSettings = field(default_factory=OODSettings)
    likelihood: LikelihoodSettings = field(default_factory=LikelihoodSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    energy: EnergySettings = field(default_factory=EnergySettings)
    robustness: RobustnessSettings = field(default_factory=RobustnessSettings)
    similarity: SimilaritySettings = field(default_factory=SimilaritySettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    lowshot: LowshotSettings = field(default_factory=LowshotSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)


@dataclass
class Config:
    config_version: int = CONFIG_VERSION  # the layout of this file: what load_config_file reads and migrates
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
    if tp is Pool:
        return "a pooling (a name such as mean, or a size p)"
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
        raise GenrepError(f"config key '{key}' must be {_type_name(tp)}, got {show(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and "," in value:  # `--eval.protocols ood,calibration`: no shell quoting
            value = [_yaml_scalar(v.strip()) for v in value.split(",")]
        elif not isinstance(value, (list, tuple)):
            value = [value]  # `--probe.knn_k 20` means [20]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range (10**400)
            raise GenrepError(f"{key} must be a finite number, got {show(value)}") from None
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, bool, str) and type(value) is tp:
        return value
    if tp is Pool and (type(value) is str or (type(value) is int and 0 <= value < 2**31)):
        return str(value)  # `--probe.pool 2` and YAML's `pool: 2` name the pool "2"
    raise GenrepError(f"config key '{key}' must be {_type_name(tp)}, got {show(value)} ({type(value).__name__})")


def _unknown_key(section: str, key: str, valid: list[str]) -> GenrepError:
    where = show(f"{section}.{key}" if section else key)
    if section == "eval" and key in V1_EVAL_KEYS:
        return GenrepError(f"config key 'eval.{key}' is now '{V1_EVAL_KEYS[key]}' (config version 2)")
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return GenrepError(f"unknown config key {where}{hint}; valid keys{' in ' + section if section else ''}: "
                       f"{', '.join(valid)}")


# Evaluating a dataclass's string annotations was most of the time of building a config (a sweep or a test builds
# thousands); a class's hints never change, so each class's are evaluated once. Callers only read the dict.
_type_hints = functools.cache(typing.get_type_hints)


def build_dataclass(cls: type, values: dict | None, section: str = "") -> Any:
    """Instantiate ``cls`` from a dict, checking every key and type."""
    values = values or {}
    if not isinstance(values, dict):
        raise GenrepError(f"config section '{section}' must be a mapping of keys to values, got {show(values)}")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise GenrepError(f"config section '{section or 'top level'}' has a key {show(key)} that is not text; "
                              f"valid keys: {', '.join(names)}")
        if key not in names:
            raise _unknown_key(section, key, names)
        full = f"{section}.{key}" if section else key
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build_dataclass(hints[key], value, full)
        else:
            kwargs[key] = _coerce(value, hints[key], full)
    obj = cls(**kwargs)
    check_fields(obj, section)
    return obj


def model_config_class(method: str) -> type:
    from .methods.registry import get_method  # methods register themselves on import

    return get_method(method).config_class


def config_from_dict(d: dict, source: str = "the config") -> Config:
    """A Config from plain data; data without ``config_version`` is read as the current version (a recipe)."""
    d = migrate(dict(d or {}), d.get("config_version", CONFIG_VERSION) if isinstance(d, dict) else CONFIG_VERSION,
                source)
    method = d.get("method", Config.method)
    if not isinstance(method, str):
        raise GenrepError(f"config key 'method' must be a method name, got {show(method)}")
    model = d.pop("model", None)
    cfg = build_dataclass(Config, d)
    cfg.model = build_dataclass(model_config_class(method), model, "model")
    return cfg


# ---------------------------------------------------------------- recipes and overrides

def recipe_names() -> list[str]:
    return list(_shipped_names())


@functools.cache
def _shipped_names() -> tuple[str, ...]:
    """Listed once per process, like ``_shipped_recipe``'s files (every shipped recipe's build looked its name up)."""
    return tuple(sorted(p.name[:-5] for p in resources.files("genrep.recipes").iterdir() if p.name.endswith(".yaml")))


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
        return copy.deepcopy(_shipped_recipe(name))
    return _parse_recipe(text, name, path.stem)


@functools.lru_cache(maxsize=None)
def _shipped_recipe(name: str) -> dict:
    """A shipped recipe, parsed once per process (the package's files do not change under it); callers get a
    deep copy."""
    return _parse_recipe(resources.files("genrep.recipes").joinpath(f"{name}.yaml").read_text(), name, name)


def _parse_recipe(text: str, name: str, default_name: str) -> dict:
    try:
        d = yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:
        raise GenrepError(f"recipe '{name}' is not valid YAML: {one_line(e)}") from None
    if not isinstance(d, dict):
        raise GenrepError(f"recipe '{name}' must be a YAML mapping, got {type(d).__name__}")
    d.setdefault("recipe", default_name)
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
        parsed = _yaml_scalar(value)
        # "npz:" or "a: b" is YAML for a mapping; on the command line it is text unless written as {...}
        out[key] = value if isinstance(parsed, dict) and not value.lstrip().startswith("{") else parsed
        i += 1
    return out


def _yaml_scalar(text: str) -> Any:
    """``text`` read as YAML (``1e-3``, ``true``, ``[20,200]``), or the text itself where it is not valid YAML
    (or YAML that Python cannot hold: a 5000-digit integer, a date like 2024-13-45, 10k nested brackets)."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        return text


def apply_overrides(d: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (validation happens when the Config is built)."""
    d = copy.deepcopy(d)
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
    d = apply_overrides(load_recipe(recipe), overrides or {})
    check_budget_override(d, overrides or {}, f"recipe {recipe}")
    return config_from_dict(d)


def check_budget_override(d: dict, overrides: dict[str, Any], source: str) -> None:
    """An epoch override of a config that counts steps would be ignored (steps win): say so instead."""
    for section, key in (("train", "steps"), ("optim", "warmup_steps")):
        epochs = "epochs" if section == "train" else "warmup_epochs"
        values = d.get(section) if isinstance(d.get(section), dict) else {}
        steps = values.get(key, 0)
        if f"{section}.{epochs}" in overrides and f"{section}.{key}" not in overrides and isinstance(steps, int) \
                and steps > 0:
            what = "its budget" if section == "train" else "its warm-up"
            raise GenrepError(f"{source} counts {what} in steps ({section}.{key} {steps}); set --{section}.{key} N, "
                              f"or --{section}.{key} 0 "
                              f"to count --{section}.{epochs} {show(overrides[f'{section}.{epochs}'])} instead")


def save_config(cfg: Config, path: Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config_file(path: Path) -> Config:
    try:
        d = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, OverflowError, RecursionError, yaml.YAMLError) as e:
        # ValueError: not UTF-8 text, or YAML Python cannot hold (a 5000-digit integer, the date 2024-13-45)
        raise GenrepError(f"cannot read run config {path}: {one_line(e)}") from None
    if not isinstance(d, dict):
        raise GenrepError(f"run config {path} must be a YAML mapping, got {type(d).__name__}")
    # files written before versions existed have none: version 1
    return config_from_dict({**d, "config_version": d.get("config_version", 1)}, str(path))


# ---------------------------------------------------------------- versions

# version 1's flat eval keys and where version 2 keeps them
V1_EVAL_KEYS = {
    "sweep_layers": "eval.probes.sweep_layers", "sweep_pools": "eval.probes.sweep_pools",
    "ece_bins": "eval.calibration.bins",
    "ood_sets": "eval.ood.sets", "ood_scores": "eval.ood.scores", "ood_n": "eval.ood.n",
    "gaussian_covariance": "eval.ood.gaussian_covariance",
    "bpd_n": "eval.likelihood.n", "bpd_terms": "model.nll_terms",
    "fid_samples": "eval.generation.samples", "fid_extractor": "eval.generation.extractor",
    "inception_weights": "eval.generation.inception_weights", "sample_steps": "model.sample_steps",
    "pgd_norms": "eval.robustness.norms", "pgd_linf_eps": "eval.robustness.linf_eps",
    "pgd_l2_eps": "eval.robustness.l2_eps", "pgd_steps": "eval.robustness.steps", "pgd_n": "eval.robustness.n",
    "cka_n": "eval.similarity.cka_n", "tsne_n": "eval.similarity.tsne_n", "cka_runs": "eval.similarity.cka_runs",
    "finetune_epochs": "eval.finetune.epochs", "finetune_lr": "eval.finetune.lr",
    "finetune_batch_size": "eval.finetune.batch_size", "finetune_layer": "eval.finetune.layer",
    "finetune_pool": "eval.finetune.pool", "finetune_causal": "eval.finetune.causal",
    "lowshot_fractions": "eval.lowshot.fractions", "lowshot_seeds": "eval.lowshot.seeds",
    "lowshot_readout": "eval.lowshot.readout",
}
# version 1's evaluation probes read these keys of the probe section
V1_PROBE_KEYS = {"epochs": "epochs", "lr": "lr", "knn_k": "knn_k", "knn_temperature": "knn_temperature",
                 "weight_decay": "sweep_weight_decay"}


def _migrate_1_to_2(d: dict) -> dict:
    sections = [d.get(s) or {} for s in ("eval", "model", "probe")]
    if not all(isinstance(s, dict) for s in sections) or not isinstance(d.get("method", Config.method), str):
        return {**d, "config_version": 2}  # nothing to move; building it names the key that is not a section
    ev, model, probe = dict(sections[0]), dict(sections[1]), sections[2]
    new_eval = {k: v for k, v in ev.items() if k not in V1_EVAL_KEYS}
    probes = {new: probe[old] for old, new in V1_PROBE_KEYS.items() if old in probe}
    if probes:
        new_eval["probes"] = probes
    model_keys = {f.name for f in dataclasses.fields(model_config_class(d.get("method", Config.method)))}
    for key, value in ev.items():
        target = V1_EVAL_KEYS.get(key)
        if target is None:
            continue
        section, *path = target.split(".")
        if section == "model":
            # a sampling or likelihood option is the method's now; a method without it never used it
            if path[0] in model_keys:
                model.setdefault(path[0], value)
            continue
        new_eval.setdefault(path[0], {})[path[1]] = value
    out = {**d, "eval": new_eval, "config_version": 2}
    if model or "model" in d:
        out["model"] = model
    return out


def _migrate_2_to_3(d: dict) -> dict:
    """A DARL run before issue 27 told its decoder gamma by an embedding unless gamma_embedding was false, and drew
    its backbone and decoder trunc-normal: what the new keys' defaults (none, xavier) no longer mean."""
    model = d.get("model") or {}  # none written: every default of its day
    if d.get("method", Config.method) != "darl" or not isinstance(model, dict):
        return {**d, "config_version": 3}
    model = dict(model)
    told = model.pop("gamma_embedding", True)
    if isinstance(told, bool):
        model.setdefault("gamma_conditioning", "embedding" if told else "none")
    else:
        model["gamma_embedding"] = told  # building it names the key that no longer exists
    model.setdefault("init", "trunc_normal")
    return {**d, "model": model, "config_version": 3}


_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3}


def migrate(d: dict, version: Any, source: str = "the config") -> dict:
    """``d`` (plain config data of ``version``) in the current version's layout."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise GenrepError(f"{source} has config_version {version!r}; this genrep reads config versions 1 to "
                          f"{CONFIG_VERSION} (a newer genrep wrote it? update genrep to read it)")
    while version < CONFIG_VERSION:
        d = _MIGRATIONS[version](d)
        version += 1
    return {**d, "config_version": CONFIG_VERSION}
