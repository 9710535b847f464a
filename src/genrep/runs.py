"""Run folders: create and mark one, decide which folders are genrep's, and the files that rebuild a trained method
(weights, fitted state, frozen parts). Reading a trained run for a command is :class:`genrep.run.Run`'s.

Besides the config and the weights, a run folder holds what a method's weights need to mean anything:
``prepared.safetensors``, the state the method fitted on the training set before step 0 (``Method.prepare``,
checked against the data set it was fitted on whenever it is read back), and ``frozen.json``, the path and
sha256 of each frozen part's source file (``Method.freeze``; the weights are referenced, not copied).

Ownership: genrep writes only into run folders it made. Creating one writes ``.genrep-run`` (a small JSON,
``{"format": "genrep-run-1", ...}``) before anything else; a new run refuses an existing folder unless it is
empty, and a resume needs the marker, or, for folders written before the marker existed, genrep's
``config.yaml`` and ``checkpoints/step_*`` of genrep's layout (the folder is then adopted: marked).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .config import Config, load_config_file
from .data.datasets import ImageSet, load_dataset
from .errors import GenrepError
from .locks import LOCK_FILE, RunLock
from .methods import DataSpec, Method, build_method
from .train.checkpoint import CKPT_DIR, checkpoint_dirs, checkpoint_step, is_genrep_checkpoint, load_safetensors

CONFIG_FILE = "config.yaml"
PREPARED_FILE = "prepared.safetensors"
FROZEN_FILE = "frozen.json"
INIT_FILE = "init.json"  # where a run continued from another one's weights (genrep pretrain --init RUN)
_INIT_FORMAT = "genrep-init-1"
# the weights a continuation starts from: the trained ones, as iGPT's code restores its saved model for further
# training (it keeps no EMA; the GCRL paper recipes keep none either, ema_decay 0, so both files agree there)
INIT_WEIGHTS = "model.safetensors"
_PREPARED_FORMAT = "genrep-prepared-1"
RUN_MARKER = ".genrep-run"
_RUN_FORMAT = "genrep-run-1"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


def load_split(cfg: Config, split: str) -> ImageSet:
    d = cfg.data
    images = load_dataset(d.name, split, image_size=d.image_size, root=d.root, download=d.download, resize=d.resize)
    return class_balanced_head(images, d.train_images) if split == "train" and d.train_images else images


def class_balanced_head(images: ImageSet, n: int) -> ImageSet:
    """The first ``n`` images of ``images`` with an equal share per class (the first classes take one more when
    ``n`` does not divide; a class with fewer gives all it has), in the split's order: the same images on every
    machine, every class present."""
    k = len(images.classes)
    if n < k:
        raise GenrepError(f"data.train_images {n} is below the {k} classes of {images.name}; give at least {k}")
    if n >= len(images.labels):
        return images
    labels = images.labels
    keep = []
    for c in range(k):
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[: n // k + (c < n % k)])
    idx = torch.cat(keep).sort().values
    return ImageSet(images.images[idx], labels[idx], images.classes, images.name)


def load_splits(cfg: Config) -> tuple[ImageSet, ImageSet]:
    """The training and test splits, checked against each other so that a run never trains on data its
    evaluation will refuse (channels, size, labels, an empty or missing test split)."""
    from .data.datasets import check_splits

    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    check_splits(train, test)
    return train, test


def load_train_set(cfg: Config) -> ImageSet:
    return load_splits(cfg)[0]


def data_spec(images: ImageSet) -> DataSpec:
    _, c, h, w = images.images.shape
    if h != w:
        raise GenrepError(f"data set {images.name} has {h}x{w} images; genrep's models need square images "
                          f"(set --data.image_size)")
    return DataSpec(image_size=h, channels=c, num_classes=len(images.classes))


def build_for_data(cfg: Config, images: ImageSet, device: str | torch.device = "cpu", training: bool = False) -> Method:
    """The config's method for this data, once it is known to fit in memory on ``device``."""
    spec = data_spec(images)
    check_model_fits(cfg, spec, torch.device(device), training)
    return build_method(cfg.method, cfg.model, spec)


# bytes per trainable parameter in training: fp32 weights, gradients, AdamW's two moments and the EMA copy
_TRAIN_BYTES, _WEIGHT_BYTES = 20, 4


def check_model_fits(cfg: Config, spec: DataSpec, device: torch.device, training: bool) -> None:
    """Refuse in one line a model every key of which is valid but which together cannot fit (model.dim 65536
    with depth 1024): the method is built on the meta device, which allocates nothing, and its parameter count
    is weighed against the memory free on ``device`` (and on the CPU, where every model is built first).

    This build writes no file and reads no weights: a frozen part's file is neither made, hashed nor read
    (``Method.freeze``, ``load_frozen_run``); what it reads is the configs of frozen runs, for their shapes. The
    one exception is a frozen run the holder must run to size itself (GVP's ``model.condition``, whose feature
    width only its forward pass tells), which is built and read on the CPU."""
    with torch.device("meta"):
        probe = build_method(cfg.method, cfg.model, spec)
    counts = probe.param_counts()
    weights = _WEIGHT_BYTES * (counts["total"] + sum(b.numel() for b in probe.buffers()))
    del probe
    need = {torch.device("cpu"): weights}
    target = weights + (_TRAIN_BYTES - _WEIGHT_BYTES) * counts["trainable"] if training else weights
    need[device] = max(need.get(device, 0), target)
    for where, n in need.items():
        free = free_memory(where)
        if free is not None and n > free:
            gib = 2 ** 30
            raise GenrepError(f"the {cfg.method} model of this config has {counts['total']:,} parameters and needs "
                              f"about {n / gib:,.1f} GiB {'to train' if training and where == device else 'to hold'} "
                              f"on {where}, which has {free / gib:,.1f} GiB free; choose smaller model sizes "
                              f"(model.dim, model.depth, ...)")


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def new_run_dir(base: Path, name: str) -> Path:
    """``base/name``, or ``base/name-2``, ``-3``... if taken: a new run never overwrites an old one."""
    path, i = Path(base) / name, 2
    while path.exists() or path.is_symlink():
        path, i = Path(base) / f"{name}-{i}", i + 1
    return path


def claim_new_run_dir(base: Path, name: str) -> Path:
    """Like :func:`new_run_dir`, but the folder is made here, with one atomic ``mkdir`` per candidate, so two
    commands started together never pick the same default name. It is left empty: the trainer marks it."""
    base = Path(base)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenrepError(f"cannot make the runs folder {base} ({e.strerror}); choose another --runs-dir") from None
    while True:
        path = new_run_dir(base, name)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue  # another command claimed it between the look and the mkdir
        except OSError as e:
            raise GenrepError(f"cannot make the run folder {path} ({e.strerror}); choose another --runs-dir") from None


# ---------------------------------------------------------------- ownership of run folders

def has_marker(folder: Path, name: str, fmt: str) -> bool:
    """Whether ``folder`` holds genrep's marker file ``name`` (a regular file, not a link) of format ``fmt``."""
    marker = Path(folder) / name
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        d = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("format") == fmt


def is_marked_run(run: Path) -> bool:
    return has_marker(run, RUN_MARKER, _RUN_FORMAT)


def is_unmarked_old_run(run: Path) -> bool:
    """A run folder written before the marker existed: genrep's config.yaml and only checkpoints of genrep's
    layout (an arbitrary folder has neither, so it is never taken for one)."""
    run = Path(run)
    ckpts = checkpoint_dirs(run)
    return bool(ckpts) and all(is_genrep_checkpoint(c) for c in ckpts) and _holds_genrep_config(run)


def _holds_genrep_config(run: Path) -> bool:
    """Whether ``run/config.yaml`` is a config genrep can read (any version)."""
    if not (run / CONFIG_FILE).is_file():
        return False
    try:
        load_config_file(run / CONFIG_FILE)
    except GenrepError:
        return False
    return True


def mark_run(run: Path, adopted: bool = False) -> None:
    import datetime

    from . import __version__
    from .io import atomic_write_json

    atomic_write_json(Path(run) / RUN_MARKER, {
        "format": _RUN_FORMAT, "genrep": __version__, "adopted": adopted,
        "marked": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


def check_new_run_dir(run: Path) -> None:
    """A new run goes only where it cannot damage anything: a path that does not exist, or an empty folder."""
    run = Path(run)
    if not run.exists() and not run.is_symlink():
        return
    if not run.is_dir():
        raise GenrepError(f"{run} exists and is not a folder; choose another --out")
    if is_marked_run(run) or is_unmarked_old_run(run):
        raise GenrepError(f"{run} already holds a genrep run; continue it with --resume {run} or choose another "
                          f"--out")
    if any(p.name != LOCK_FILE for p in run.iterdir()):
        raise GenrepError(f"{run} exists and was not made by genrep; choose another --out or remove it")


def make_folders(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders this call created, deepest first (what a failed start may remove)."""
    made, p = [], Path(path)
    while not p.exists():
        made.append(p)
        p = p.parent
    Path(path).mkdir(parents=True, exist_ok=True)
    return made


def create_run_dir(run: Path, lock: RunLock) -> list[Path]:
    """Make the run folder, take its lock and mark it as genrep's; returns the folders this call created,
    deepest first, so a failed start can remove exactly those. Under the lock the folder is checked again: of
    two commands racing for one --out, the second stops in one line instead of writing into the first's run."""
    run = Path(run)
    check_new_run_dir(run)
    made = make_folders(run)
    lock.acquire()
    check_new_run_dir(run)  # again, now that no other genrep command can write into it
    mark_run(run)
    return made


def check_no_links(run: Path) -> None:
    """Refuse a run folder holding a symbolic link: genrep never makes one, and writing through one (a linked
    ``results/``, ``figures/`` or ``checkpoints/``) would put genrep's files, or its pruning, outside the run."""
    import os

    for root, dirs, files in os.walk(run):  # followlinks=False: a linked folder is listed, not entered
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise GenrepError(f"{path} is a symbolic link (to {os.readlink(path)}); genrep writes only inside "
                                  f"its run folders and never through links: replace it with a real "
                                  f"{'folder' if path.is_dir() else 'file'}")


def is_inside(path: Path, run: Path) -> bool:
    """Whether ``path`` is in the folder ``run`` (both resolved, so ``RUN/../RUN/x`` counts)."""
    try:
        return Path(path).resolve().is_relative_to(Path(run).resolve())
    except (OSError, RuntimeError):
        return False


def is_genrep_run(run: Path) -> bool:
    """A folder genrep trained into: marked, or from before the marker (genrep's config.yaml with genrep's
    checkpoints or weights), so evaluation results never land in a folder that merely holds a config."""
    run = Path(run)
    if is_marked_run(run) or is_unmarked_old_run(run):
        return True
    return any((run / w).is_file() for w in WEIGHT_FILES) and _holds_genrep_config(run)


def check_resumable(run: Path) -> None:
    """Resuming rewrites the run's weights and log from its last checkpoint: refuse when there is none to
    continue from but trained weights would be replaced, and refuse folders genrep did not make."""
    run = Path(run)
    if not checkpoint_dirs(run) and any((run / name).exists() for name in WEIGHT_FILES):
        raise GenrepError(f"{run} has trained weights but no complete checkpoint in {run / CKPT_DIR} (the "
                          f"optimizer state and step a resume continues from); restore {CKPT_DIR}/, or use the "
                          f"weights as they are (genrep evaluate {run}) or start a new run with --out")
    if is_marked_run(run) or is_unmarked_old_run(run):
        return
    if not (run / CONFIG_FILE).is_file():
        raise GenrepError(f"{run} is not a genrep run folder (no {CONFIG_FILE}); pass a folder written by "
                          f"genrep pretrain")
    raise GenrepError(f"{run} was not made by genrep (no {RUN_MARKER} marker and no genrep checkpoints); resume "
                      f"only a folder written by genrep pretrain, or start a new run with --out")


def read_run_config(run: Path) -> Config:
    run = Path(run)
    if not (run / CONFIG_FILE).is_file():
        raise GenrepError(f"{run} is not a genrep run folder (no {CONFIG_FILE}); pass a folder written by "
                          f"genrep pretrain")
    return load_config_file(run / CONFIG_FILE)


# ---------------------------------------------------------------- data-fitted state and frozen parts

def data_fingerprint(images: ImageSet) -> dict[str, str]:
    """What fitted state must match: the data set's name, shape and the sha256 of its uint8 pixels (of a packed
    set, which is never whole in memory, the sha256 of its shards' digests and its read size, resize and channels:
    what its decoded pixels are a function of)."""
    from .data.packed import PackedImages

    x = images.images
    if isinstance(x, PackedImages):
        sha = x.digest
    else:
        sha = hashlib.sha256(x.contiguous().numpy()).hexdigest()  # the buffer itself: no copy of a 150 MB set
    return {"data": images.name, "images": str(len(x)), "shape": "x".join(map(str, x.shape[1:])),
            "images_sha256": sha}


# a packed set's fitted state (a palette) is fitted on a seeded sample of its images of at most this many bytes of
# pixels: the whole set is never decoded at once (the palette's k-means reads at most a million pixels of it anyway;
# iGPT's k-means also fits a sample of ImageNet's pixels)
PREPARE_BYTES = 256 * 2 ** 20


def prepare_images(train_set: ImageSet, generator: torch.Generator) -> torch.Tensor:
    """The uint8 images ``Method.prepare`` fits on: the set itself in memory, or a seeded sample of a packed one."""
    from .data.packed import PackedImages

    x = train_set.images
    if not isinstance(x, PackedImages):
        return x
    n = max(1, min(len(x), PREPARE_BYTES // (x.shape[1] * x.shape[2] * x.shape[3])))
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(generator.initial_seed()))
    return x[pick[:n].sort().values]


def fit_prepared(method: Method, train_set: ImageSet, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Run ``method.prepare`` on the training images; the state is returned on the CPU, not yet installed."""
    from .data.batches import mix_seed

    g = torch.Generator().manual_seed(mix_seed(seed, 0x9E9A))
    state = method.prepare(prepare_images(train_set, g), device=device, generator=g)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError(f"{method.name}.prepare must return a dict of tensors, got {type(state).__name__}")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_prepared(run: Path, method: Method, state: dict[str, torch.Tensor], train_set: ImageSet,
                  inherited: dict[str, str] | None = None) -> None:
    """Keep the fitted state with the fingerprint of the data the run trains on. A state inherited from another
    run (``--init``: an ImageNet32 palette continued on CIFAR) is recorded with ``inherited`` (where it came from and
    the data it was fitted on, :func:`inherited_prepared_meta`); the fingerprint is still this run's data, so
    resuming or evaluating the run on other data is refused as for a state fitted here."""
    from .io import atomic_save_safetensors

    origin = {} if inherited else {"origin": method.prepared_origin()}
    meta = {"format": _PREPARED_FORMAT, "method": method.name, **data_fingerprint(train_set), **origin,
            **(inherited or {})}
    atomic_save_safetensors(Path(run) / PREPARED_FILE, state, meta)


def read_prepared(run: Path, method: Method, train_set: ImageSet | None) -> dict[str, torch.Tensor]:
    """The run's fitted state, checked against the data set it is about to be used with (None: a run read without
    its data, ``genrep.load``, whose state is used as it was fitted)."""
    path = Path(run) / PREPARED_FILE
    state, meta = read_prepared_file(run, method)
    now = data_fingerprint(train_set) if train_set is not None else {}
    fitted = {k: meta.get(k) for k in now}
    if fitted != now:
        raise GenrepError(f"{path} was fitted on {fitted['data']} ({fitted['images']} images of "
                          f"{fitted['shape']}, sha256 {str(fitted['images_sha256'])[:12]}) but the training set "
                          f"is now {now['data']} ({now['images']} images of {now['shape']}, sha256 "
                          f"{now['images_sha256'][:12]}); use the data the run was trained on, or start a new run")
    method.prepared_meta = meta
    return state


def read_prepared_file(run: Path, method: Method) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A run's fitted state and its metadata, checked to be ``method``'s (not yet against any data)."""
    from safetensors import SafetensorError, safe_open

    path = Path(run) / PREPARED_FILE
    if not path.is_file():
        raise GenrepError(f"{run} has no {PREPARED_FILE}, the state {method.name} fits on its training set before "
                          f"training (Method.prepare); the run is incomplete: start a new run")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise GenrepError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]}); start a new run") from None
    if meta.get("format") != _PREPARED_FORMAT or meta.get("method") != method.name:
        raise GenrepError(f"{path} is not {method.name}'s fitted state (format {meta.get('format')!r}, method "
                          f"{meta.get('method')!r}); start a new run")
    return state, meta


_FINGERPRINT_KEYS = ("data", "images", "shape", "images_sha256")


def inherited_prepared_meta(source: Path, meta: dict[str, str]) -> dict[str, str]:
    """What a continuation's prepared.safetensors records of a state it took from run ``source`` (whose file had
    ``meta``): the source, and the data the state was fitted on (the source's own, or what the source itself
    inherited)."""
    fitted = {f"fitted_{k}": meta.get(f"fitted_{k}", meta.get(k, "?")) for k in _FINGERPRINT_KEYS}
    # a source from before origins were recorded: what it was fitted on is all that is known
    origin = meta.get("fitted_origin") or meta.get("origin") or f"fitted on {fitted['fitted_data']}"
    return {"inherited_from": str(Path(source).resolve()), **fitted, "fitted_origin": origin}


def write_frozen(run: Path, method: Method) -> None:
    from .io import atomic_write_json

    parts = method.frozen_parts
    if parts:
        atomic_write_json(Path(run) / FROZEN_FILE, {k: {"path": v.path, "sha256": v.sha256} for k, v in parts.items()})


def check_frozen(run: Path, method: Method) -> None:
    """A frozen part must be the very file the run was trained with (the weights are not in the run)."""
    parts = method.frozen_parts
    path = Path(run) / FROZEN_FILE
    if not parts:
        return
    try:
        recorded = json.loads(path.read_text())
        assert isinstance(recorded, dict)
    except (OSError, ValueError, AssertionError):
        raise GenrepError(f"{path} is missing or unreadable; it records the files {method.name}'s frozen parts "
                          f"were read from; the run is incomplete: start a new run") from None
    for name, part in parts.items():
        was = recorded.get(name)
        if not isinstance(was, dict) or was.get("sha256") != part.sha256:
            old = was.get("sha256", "?")[:12] if isinstance(was, dict) else "not recorded"
            raise GenrepError(f"frozen part '{name}' of {run} was trained from a file with sha256 {old}, but "
                              f"{part.path} now has sha256 {part.sha256[:12]}; the file changed since training: "
                              f"restore the original file")


def install_run_state(run: Path, method: Method, train_set: ImageSet | None) -> None:
    """Give a method rebuilt from a run folder its fitted state (checked against ``train_set`` when given), and check
    its frozen parts."""
    if method.has_prepare:
        method.load_prepared(read_prepared(run, method, train_set))
    check_frozen(run, method)


def trained_data_spec(cfg: Config) -> tuple[DataSpec, ImageSet | None]:
    """The data shape the run of ``cfg`` was trained on, from the data registry without reading an image; for the
    path forms (npz:, folder:) from its training split, which is returned for reuse (None otherwise)."""
    from .data.datasets import registered_spec

    known = registered_spec(cfg.data.name, cfg.data.image_size)
    if known is not None:
        return DataSpec(*known), None
    train_set = load_train_set(cfg)
    return data_spec(train_set), train_set


def load_weights(method: Method, run: Path, weights: str) -> None:
    """The run's ``weights`` (ema or model) into ``method``, checked to fit its config."""
    state = load_safetensors(Path(run) / f"{weights}.safetensors")
    try:
        method.load_state_dict(state)
    except RuntimeError as e:
        raise GenrepError(f"{run}/{weights}.safetensors does not fit the model in {run}/{CONFIG_FILE} "
                          f"({str(e).splitlines()[0][:160]})") from None


def load_frozen_run(run: str | Path, data: DataSpec, key: str, wanted: str, accept=None,
                    real: bool = False) -> tuple[Config, Method, Path]:
    """The trained run ``run`` (its EMA weights, eval mode, built on the CPU) as another model's frozen part for
    images of ``data``, its config, and the weights file (the ``Method.freeze`` source). The run's data shape
    comes from the data registry without reading its images, which are loaded only for fitted state
    (``Method.prepare``) or the path forms (npz:, folder:). ``key`` names the config key in the errors, ``wanted``
    what it takes ("the run folder of a trained tokenizer"); ``accept(cfg)`` may refuse the run's method.

    Built while the model holding it is sized on the meta device (the memory check), it is checked and built
    there, and nothing is read into it; ``real`` builds and fills it on the CPU even then, for a holder that must
    run it to size itself."""
    run = Path(run)
    if not run.is_dir():
        raise GenrepError(f"{key} {run} is not a folder; give {wanted}")
    if not (run / CONFIG_FILE).is_file():
        raise GenrepError(f"{key} {run} is not a genrep run (no {CONFIG_FILE}); give {wanted}")
    try:
        cfg = read_run_config(run)
    except GenrepError as e:
        raise GenrepError(f"{key} {run}: {e}") from None
    if accept is not None:
        accept(cfg)
    weights = run / "ema.safetensors"
    if not weights.is_file():
        raise GenrepError(f"{key} {run} has no trained weights ({weights.name}); let its training write a "
                          f"checkpoint, or give a finished run")
    spec, train_set = trained_data_spec(cfg)
    if (spec.image_size, spec.channels) != (data.image_size, data.channels):
        raise GenrepError(f"{key} {run} was trained on {spec.image_size}x{spec.image_size} images with "
                          f"{_count(spec.channels, 'channel')}; this run's data are {data.image_size}x"
                          f"{data.image_size} with {_count(data.channels, 'channel')}: give {wanted}, trained on "
                          f"this data")
    if torch.get_default_device().type == "meta" and not real:
        return cfg, build_method(cfg.method, cfg.model, spec).eval(), weights
    try:
        state = load_safetensors(weights)
    except GenrepError as e:
        raise GenrepError(f"{key} {run}: {e}") from None
    with torch.device("cpu"):
        method = build_method(cfg.method, cfg.model, spec)
    if method.has_prepare and train_set is None:
        train_set = load_train_set(cfg)
    install_run_state(run, method, train_set)
    try:
        method.load_state_dict(state)
    except RuntimeError as e:
        raise GenrepError(f"{key} {weights} does not fit the model in {run / CONFIG_FILE} "
                          f"({str(e).splitlines()[0][:160]})") from None
    return cfg, method.eval(), weights


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- continued pretraining (genrep pretrain --init RUN)

_INIT_WANTED = "the folder of a finished genrep pretrain run of this method and architecture"


def check_init_source(source: str | Path, cfg: Config, spec: DataSpec | None = None) -> Config:
    """Refuse in one line, before any work, a run that ``cfg``'s run cannot continue from: missing, not genrep's,
    without trained weights, of another method, of another palette size, trained on another number of channels,
    or of another architecture (the two models built on the meta device, their state dicts compared: up to three
    mismatched keys named). ``spec``: the new run's data shape (default: from the data registry). Returns the
    source's config."""
    source = Path(source)
    if not source.is_dir():
        raise GenrepError(f"--init {source} is not a folder; give {_INIT_WANTED}")
    if not (source / CONFIG_FILE).is_file() or not is_genrep_run(source):
        raise GenrepError(f"--init {source} is not a genrep run (no {CONFIG_FILE}, or not made by genrep "
                          f"pretrain); give {_INIT_WANTED}")
    try:
        src = read_run_config(source)
    except GenrepError as e:
        raise GenrepError(f"--init {source}: {e}") from None
    if src.method != cfg.method:
        raise GenrepError(f"--init {source} is a {src.method} run but this config trains {cfg.method}; continue a "
                          f"{cfg.method} run (its weights mean nothing to another method)")
    if not (source / INIT_WEIGHTS).is_file():
        raise GenrepError(f"--init {source} has no trained weights ({INIT_WEIGHTS}); let its training write a "
                          f"checkpoint, or give a finished run")
    k_src, k_new = getattr(src.model, "colours", None), getattr(cfg.model, "colours", None)
    if k_src != k_new:
        raise GenrepError(f"--init {source} has a palette of {k_src} colours but this config's model.colours is "
                          f"{k_new}; the run continues with the source's palette: set --model.colours {k_src}")
    src_spec = trained_data_spec(src)[0]
    spec = spec or trained_data_spec(cfg)[0]
    if src_spec.channels != spec.channels:
        raise GenrepError(f"--init {source} was trained on images with {_count(src_spec.channels, 'channel')}; this "
                          f"run's data have {_count(spec.channels, 'channel')}: continue on data of the same kind")
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in build_method(src.method, src.model, src_spec).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in build_method(cfg.method, cfg.model, spec).state_dict().items()}
    bad = [f"{k} ({_shape(theirs.get(k))} there, {_shape(ours.get(k))} here)"
           for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise GenrepError(f"--init {source} has another architecture than this config: {', '.join(bad[:3])}{more}; "
                          f"use the source's model sizes (its {CONFIG_FILE}: model.dim, model.depth, ...)")
    return src


def _shape(shape: tuple | None) -> str:
    return "absent" if shape is None else "x".join(map(str, shape)) or "scalar"


def read_init_source(source: str | Path, method: Method, expect_sha256: str | None = None
                     ) -> tuple[dict[str, torch.Tensor], tuple[dict[str, torch.Tensor], dict[str, str]] | None, dict]:
    """What a run continued from ``source`` starts with (checked by :func:`check_init_source`): the source's trained
    weights (``INIT_WEIGHTS``), its fitted state with what the new run's prepared.safetensors records of it (None for
    a method without one; never compared with the new run's data: an ImageNet32 palette continued on CIFAR is the
    paper's setting), and the record of ``INIT_FILE`` (path, weights file and its sha256, step, method, recipe).
    ``expect_sha256``: the weights must be the bytes recorded (a resumed continuation that had no checkpoint yet)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    source = Path(source)
    weights = source / INIT_WEIGHTS
    try:
        data = weights.read_bytes()
        state = load_bytes(data)
    except OSError as e:
        raise GenrepError(f"--init {source}: cannot read {weights} ({e.strerror})") from None
    except (SafetensorError, ValueError) as e:
        raise GenrepError(f"--init {source}: {weights} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    sha = hashlib.sha256(data).hexdigest()
    if expect_sha256 is not None and sha != expect_sha256:
        raise GenrepError(f"{weights} has changed since this run started from it (sha256 {sha[:12]}, recorded "
                          f"{expect_sha256[:12]}); restore it, or start a new run with --init")
    prepared = None
    if method.has_prepare:
        try:
            fitted, meta = read_prepared_file(source, method)
        except GenrepError as e:
            raise GenrepError(f"--init {source}: {e}") from None
        prepared = fitted, inherited_prepared_meta(source, meta)
    src = read_run_config(source)
    ckpts = checkpoint_dirs(source)
    record = {"format": _INIT_FORMAT, "run": str(source.resolve()), "weights": INIT_WEIGHTS, "sha256": sha,
              "step": checkpoint_step(ckpts[-1]) if ckpts else None, "method": src.method, "recipe": src.recipe,
              "data": src.data.name}
    return state, prepared, record


def write_init_record(run: Path, record: dict) -> None:
    from .io import atomic_write_json

    atomic_write_json(Path(run) / INIT_FILE, record)


def read_init_record(run: Path) -> dict | None:
    """The run this one continued from (``INIT_FILE``), or None for a run that started from scratch."""
    path = Path(run) / INIT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        assert isinstance(record, dict) and record.get("format") == _INIT_FORMAT
        assert isinstance(record.get("run"), str) and isinstance(record.get("sha256"), str)
    except (OSError, ValueError, AssertionError):
        raise GenrepError(f"{path} is unreadable or not genrep's record of the run this one continued from; "
                          f"restore it, or start a new run") from None
    return record
