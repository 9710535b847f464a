"""A run folder, opened once per command: ``Run.open(path, mode)`` (and ``genrep.load(path)`` in a notebook).

Opening checks the folder once (genrep made it, no link in it), reads its config once (migrated by the config
reader) and, for the modes that write (``evaluate``, ``probe``, ``predict``), takes the run's lock for
as long as the ``Run`` is open: ``with Run.open(path, "evaluate") as run: ...``. What a command does with the run is
handed the ``Run``: :meth:`Run.reading` (the config with read options and another image size applied),
:meth:`Run.load` (the trained method, its fitted state and frozen parts checked, and its data) and
:meth:`Run.weights_version` (what results and caches fitted on a weights file name), so nothing below the command
reads the folder's config again.

In a notebook the run's model is built on first use for the data shape it was trained on (from the data
registry: no image is read) with its fitted state, frozen parts and weights, in eval mode. What the method can do
is what the ``Run`` offers: features always, and ``logits``, ``sample``, ``complete``, ``nll`` and ``predict``
where the method has the capability; images come in any form :mod:`genrep.data.inputs` takes, brought to the run's
channels and size the way its data set was.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .config import Config
from .data.imageset import ImageSet
from .errors import GenrepError
from .methods import Method

WEIGHTS = ("ema", "model")
# what a command that writes into a trained run says it does there ("wait for it to finish before you evaluate it")
WRITE_MODES = ("evaluate", "probe", "predict")
MODES = ("read", *WRITE_MODES)


def weights_version(path: Path, weights: str) -> str:
    """The identity of a run's weights file (``"ema@660"``: its checkpoint step): what results and feature caches
    fitted on it name, so they are never read with other weights."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / f"{weights}.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    return f"{weights}@{meta.get('step', 'unknown')}"


class Run:
    """A trained run folder, its config read once, and (on first use) its model. Open one with :meth:`open`."""

    def __init__(self, path: Path, config: Config, mode: str, weights: str, device: str):
        self.path, self.config, self.mode, self.weights = path, config, mode, weights
        self._device_name = device
        self._lock = None
        self._method: Method | None = None
        self._version: str | None = None

    # ------------------------------------------------------------ opening, the lock

    @classmethod
    def open(cls, path, mode: str = "read", *, weights: str = "ema", device: str = "auto") -> Run:
        """The run at ``path``: its config read (once), the folder checked to be genrep's and to hold no link,
        and, for a ``mode`` that writes, its lock taken until :meth:`close` (or the ``with`` block's end).
        ``weights`` and ``device`` are those :attr:`method` is built with."""
        from .runs import RUN_MARKER, check_no_links, is_genrep_run, read_run_config

        path = Path(path)
        if mode not in MODES:
            raise GenrepError(f"mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
        if weights not in WEIGHTS:
            raise GenrepError(f"weights {weights!r} is unknown; choose {' or '.join(WEIGHTS)}")
        config = read_run_config(path)   # a folder that is not a run says so, and gets no lock file
        if not is_genrep_run(path):
            raise GenrepError(f"{path} was not made by genrep (no {RUN_MARKER} marker and no genrep weights); pass a "
                              f"run folder written by genrep pretrain")
        run = cls(path, config, mode, weights, device)
        if mode == "read":
            check_no_links(path)
        else:
            run._take_lock(mode)
        return run

    @classmethod
    def of(cls, run, mode: str = "read") -> Run:
        """``run`` itself when it is a :class:`Run`, else the folder it names opened in ``mode``."""
        return run if isinstance(run, Run) else cls.open(run, mode)

    def _take_lock(self, what: str) -> None:
        """The run's lock (rank 0 alone under torchrun: the one rank that writes), then the folder's links checked
        under it, so a link made while waiting is seen."""
        from .eval.distributed import is_main
        from .locks import RunLock
        from .runs import check_no_links

        if is_main():
            self._lock = RunLock(self.path, what).acquire()
        check_no_links(self.path)

    @contextlib.contextmanager
    def writing(self, what: str):
        """Hold the run's lock while a command writes into it: the lock this ``Run`` holds already, or one taken
        for the block (a run opened to read, ``genrep.load``, that is then evaluated)."""
        if self._lock is not None or self.mode != "read":
            yield self
            return
        self._take_lock(what)
        try:
            yield self
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Release the lock (a run opened to read holds none)."""
        self._release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ what a command reads

    def weights_version(self, weights: str | None = None) -> str:
        return weights_version(self.path, weights or self.weights)

    @property
    def version(self) -> str:
        """The identity of the weights this ``Run`` reads (:attr:`method`'s): read once, when the model is built or
        first asked for."""
        if self._version is None:
            self._version = self.weights_version(self.weights)
        return self._version

    def trained_size(self) -> int:
        from .runs import trained_data_spec

        return self.config.data.image_size or trained_data_spec(self.config)[0].image_size

    def reading(self, options: dict | None = None, image_size=None) -> tuple[Config, int | None]:
        """The config the run is read with: its own, with the read ``options`` (``Method.read_options``), and with
        ``image_size`` (``genrep probe RUN --data.image_size``) its data resized and the read options the method
        needs there (``Method.size_options``; an option given in ``options`` wins). Second, the size the run was
        trained on when it is read at another (else None)."""
        from .config import MAX_IMAGE_SIZE, apply_overrides, config_from_dict
        from .methods import get_method, method_names

        cfg = self._with_read_options(options)
        if image_size is None:
            return cfg, None
        size = image_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
            raise GenrepError(f"data.image_size must be an integer from 1 to {MAX_IMAGE_SIZE} (the side to read the "
                              f"run's images at), got {size!r}")
        trained = self.trained_size()
        if size == trained:
            return cfg, None
        method = get_method(cfg.method)
        extra = method.size_options(cfg.model, trained, size)
        if extra is None:
            able = [m for m in method_names() if get_method(m).size_options.__func__ is not Method.size_options.__func__]
            raise GenrepError(f"a trained {cfg.method} run reads only images of the size it was trained on ({trained}x"
                              f"{trained}), not {size}x{size}; of genrep's methods, {' and '.join(able)} can read "
                              f"other sizes")
        changes = {"data.image_size": size, **{f"model.{k}": v for k, v in extra.items() if k not in (options or {})}}
        return config_from_dict(apply_overrides(cfg.to_dict(), changes)), trained

    def _with_read_options(self, options: dict | None) -> Config:
        """The config with model keys changed that only affect how a trained model is read (``Method.read_options``:
        feature options such as feature_t, sampler settings, likelihood terms)."""
        cfg = self.config
        if not options:
            return cfg
        from .config import apply_overrides, config_from_dict
        from .methods import get_method

        allowed = get_method(cfg.method).read_options
        bad = [k for k in options if k not in allowed]
        if bad:
            hint = (f"; a trained {cfg.method} run may be read with other {', '.join('model.' + k for k in allowed)}"
                    if allowed else "")
            raise GenrepError(f"cannot change {', '.join('model.' + k for k in bad)} of a trained {cfg.method} run "
                              f"(the weights were trained with it){hint}")
        return config_from_dict(apply_overrides(cfg.to_dict(), {f"model.{k}": v for k, v in options.items()}))

    def load(self, weights: str = "ema", device: str | torch.device = "cpu", options: dict | None = None, *,
             cfg: Config | None = None) -> tuple[Config, Method, ImageSet, ImageSet]:
        """The config it is read with, the method with the trained ``weights`` (eval mode, its fitted state checked
        against the training set), and the train and test splits. ``options``: read options
        (``Method.read_options``); ``cfg``: the config :meth:`reading` made (at another image size)."""
        from .runs import build_for_data, install_run_state, load_splits, load_weights

        if weights not in WEIGHTS:
            raise GenrepError(f"weights '{weights}' is unknown; choose {' or '.join(WEIGHTS)}")
        cfg = cfg if cfg is not None else self.reading(options)[0]
        train_set, test_set = load_splits(cfg)
        method = build_for_data(cfg, train_set, device)
        install_run_state(self.path, method, train_set)
        load_weights(method, self.path, weights)
        return cfg, method.to(device).eval(), train_set, test_set

    # ------------------------------------------------------------ the model, for a notebook

    @property
    def device(self) -> torch.device:
        from .devices import resolve_device

        if not isinstance(self._device_name, torch.device):
            self._device_name = resolve_device(self._device_name)
        return self._device_name

    @property
    def method(self) -> Method:
        """The trained model (``weights``, eval mode, on ``device``), built on first use for the data shape the run
        was trained on, with its fitted state and frozen parts; no image is read for a registered data set."""
        if self._method is None:
            from .methods import build_method
            from .runs import install_run_state, load_weights, trained_data_spec

            method = build_method(self.config.method, self.config.model, trained_data_spec(self.config)[0])
            install_run_state(self.path, method, None)   # the data is not read to check the fitted state again
            _ = self.version   # named before the weights are read, as results fitted on them will name them
            load_weights(method, self.path, self.weights)
            self._method = method.to(self.device).eval()
        return self._method

    def __repr__(self) -> str:
        d = self.method.data
        return (f"Run({str(self.path)!r}: {self.config.method} ({self.config.recipe}), {self.weights} weights, "
                f"{d.channels}x{d.image_size}x{d.image_size} images, {d.num_classes} classes, on {self.device})")

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(self.method.capabilities)

    def images(self, images) -> torch.Tensor:
        """``images`` (any form :mod:`genrep.data.inputs` takes) as the run reads them: uint8 [B, C, S, S]."""
        from .data.datasets import default_resize
        from .data.inputs import to_run_images

        d = self.method.data
        return to_run_images(images, d.channels, d.image_size, self.config.data.resize
                             or default_resize(self.config.data.name))

    def _floats(self, images) -> torch.Tensor:
        return self.images(images).to(self.device).float().div_(255)

    def _needs(self, capability: str) -> None:
        if capability not in self.method.capabilities:
            from .eval.protocols.context import methods_where

            able = ", ".join(methods_where(lambda cls: capability in cls.capabilities))
            raise GenrepError(f"{self.config.method} has no {capability!r} capability; methods that have it: {able}")

    def features(self, images, layer: int | None = None, pool: str | None = None, *, batch_size: int = 256,
                 progress: bool = False) -> torch.Tensor:
        """Frozen features [B, D] (or maps [B, C, h, w] with pool 'map'), float32 on the CPU, in batches."""
        from .eval.features import extract_features

        layer, pool = self.method.check_feature_args(layer, pool)
        return extract_features(self.method, self.images(images), layer=layer, pool=pool, batch_size=batch_size,
                                device=self.device, precision="auto", progress=progress)

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        """Class logits [B, K], float32 on the CPU."""
        self._needs("logits")
        return self.method.logits(self._floats(images)).float().cpu()

    def sample(self, n: int, *, seed: int = 0, progress: bool = False) -> torch.Tensor:
        """``n`` new images [n, C, S, S] in [0, 1] on the CPU, from the run's sampler and a generator seeded by
        ``seed``."""
        self._needs("sample")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise GenrepError(f"n must be a positive number of images, got {n!r}")
        g = torch.Generator().manual_seed(seed)
        return self.method.sample(n, generator=g, progress=progress).float().cpu()

    def complete(self, images, keep, *, seed: int = 0, progress: bool = False) -> torch.Tensor:
        """Fill in the pixels of ``images`` where ``keep`` (bool [B, 1, S, S] or [S, S], at the run's size) is
        False; [B, C, S, S] in [0, 1] on the CPU."""
        self._needs("complete")
        x = self._floats(images)
        keep = torch.as_tensor(keep, dtype=torch.bool)
        shape = (x.shape[0], 1, *x.shape[-2:])
        try:
            keep = keep.expand(shape).to(self.device)
        except RuntimeError:
            raise GenrepError(f"keep has shape {tuple(keep.shape)}; give a bool mask [B, 1, S, S] or [S, S] at the "
                              f"run's size, {x.shape[-1]}") from None
        g = torch.Generator().manual_seed(seed)
        return self.method.complete(x, keep, generator=g, progress=progress).float().cpu()

    def nll(self, images, *, seed: int = 0, progress: bool = False) -> torch.Tensor:
        """-log p(x) in bits/dim, [B], float64 on the CPU."""
        self._needs("nll")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return self.method.nll(self._floats(images), generator=g, progress=progress).double().cpu()

    def predict(self, images, *, coverage: float | None = None, max_risk: float | None = None) -> dict:
        """Selective prediction (:mod:`genrep.predict`): ``classes``, ``probabilities``, ``scores`` and ``abstain``
        [B] of the images, by the threshold ``genrep predict`` saved for these weights (and this coverage or risk,
        when one is given), else one fitted now (coverage 0.95 by default) and not saved: a loaded run writes
        nothing."""
        from .predict import check_request, fit, predict, read_saved

        asked = None if coverage is None and max_risk is None else check_request(coverage, max_risk)
        record, gaussian = read_saved(self, asked), None
        if record is None:
            record, gaussian = fit(self, asked or check_request(None, None))
        return predict(self, self.images(images), record, gaussian)


def load(path, weights: str = "ema", device: str = "auto") -> Run:
    """The trained run at ``path``, read-only (no lock): ``genrep.load("runs/hybvit-digits").features(x)``."""
    run = Run.open(path, weights=weights, device=device)
    _ = run.method   # built now: a run that cannot be read says so here, not at its first use
    return run


def load_trained(path, weights: str = "ema", device: str | torch.device = "cpu", options: dict | None = None
                 ) -> tuple[Config, Method, ImageSet]:
    """The config, trained method and training set of the run at ``path``, read-only (a script's, a benchmark's)."""
    return Run.open(path).load(weights, device, options)[:3]
