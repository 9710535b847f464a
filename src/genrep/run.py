"""A trained run, opened once for reading: ``genrep.load(path)`` in a notebook or a script.

The folder is checked (genrep's, no links out of it), its config read once, its method built for the data shape it
was trained on (from the data registry: no image is read for a registered set), given its fitted state and frozen
parts and its weights, in eval mode. What the method can do is what the ``Run`` offers: features always, and
``logits``, ``sample``, ``complete`` and ``nll`` where the method has the capability; images come in any form
:mod:`genrep.data.inputs` takes, brought to the run's channels and size the way its data set was.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import Config
from .errors import GenrepError
from .methods import Method

WEIGHTS = ("ema", "model")


class Run:
    """A trained run folder and its model (read-only: no lock is taken and nothing is written)."""

    def __init__(self, path: Path, config: Config, method: Method, weights: str, device: torch.device):
        from .eval.protocols.context import weights_version

        self.path, self.config, self.method, self.weights, self.device = path, config, method, weights, device
        self.version = weights_version(path, weights)   # "ema@660": what results fitted on these weights name

    @classmethod
    def open(cls, path, weights: str = "ema", device: str = "auto") -> Run:
        from .devices import resolve_device
        from .runs import (
            check_no_links,
            install_run_state,
            is_genrep_run,
            load_weights,
            read_run_config,
            trained_data_spec,
        )

        path = Path(path)
        if weights not in WEIGHTS:
            raise GenrepError(f"weights {weights!r} is unknown; choose {' or '.join(WEIGHTS)}")
        config = read_run_config(path)
        if not is_genrep_run(path):
            raise GenrepError(f"{path} was not made by genrep (no marker and no genrep weights); pass a run folder "
                              f"written by genrep pretrain")
        check_no_links(path)
        dev = resolve_device(device)
        from .methods import build_method

        method = build_method(config.method, config.model, trained_data_spec(config)[0])
        install_run_state(path, method, None)   # the data is not read to check the fitted state against it again
        load_weights(method, path, weights)
        return cls(path, config, method.to(dev).eval(), weights, dev)

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
        record = read_saved(self, asked) or fit(self, asked or check_request(None, None))
        return predict(self, self.images(images), record)


def load(path, weights: str = "ema", device: str = "auto") -> Run:
    """The trained run at ``path``, read-only (no lock): ``genrep.load("runs/hybvit-digits").features(x)``."""
    return Run.open(path, weights, device)
