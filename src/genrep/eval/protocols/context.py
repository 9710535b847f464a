"""What a protocol sees: one :class:`EvalContext` per evaluation (the run, its trained method, its data, the
settings) and the one feature cache every protocol and `genrep probe` read frozen features through."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...data.imageset import ImageSet
from ...errors import GenrepError
from ...methods import Method
from ..distributed import rank_device
from ..features import cached_feature_sets, extract_feature_sets, extract_features, resolve_precision

if TYPE_CHECKING:
    from ...config import Config, EvalConfig
    from ...run import Run

FIGURES_DIR = Path("figures") / "eval"
RESULTS_DIR = "results"


def methods_where(wanted) -> list[str]:
    """Registered method names whose class satisfies ``wanted``, for error messages that say what would apply."""
    from ...methods import get_method, method_names

    return [m for m in method_names() if wanted(get_method(m))]


def methods_with(capability: str) -> list[str]:
    return methods_where(lambda cls: capability in cls.capabilities)


def reads_noised(method: Method) -> bool:
    """Whether ``method`` reads its features from an image noised to ``feature_t`` (a diffusion model)."""
    return "feature_t" in method.feature_options


def check_noise_steps(method: Method, steps: list[int], key: str) -> None:
    """Noise steps of a read-out (sweep, CKA across t): only for a method that reads noised images, each in [0, T)."""
    if steps and not reads_noised(method):
        noisy = ", ".join(methods_where(reads_noised))
        raise GenrepError(f"{key}: {method.name} reads no noised image; noise steps apply to {noisy}; leave it "
                          f"empty for {method.name}")
    for t in steps:
        if t >= method.diffusion.T:
            raise GenrepError(f"{key} {t} is not a diffusion step; choose 0..{method.diffusion.T - 1} "
                              f"(model.timesteps {method.diffusion.T})")


@contextmanager
def noise_step(method: Method, t: int | None):
    """Read ``method``'s features at noise step ``t`` for the block, then at the step it had (a read option)."""
    trained = method.cfg.feature_t
    method.cfg.feature_t = t
    try:
        yield
    finally:
        method.cfg.feature_t = trained


def default_readout(method: Method) -> tuple[int, str]:
    return method.check_feature_args(None, None)


@dataclass
class EvalContext:
    run: Path             # the run's folder: figures and caches go there
    cfg: Config           # the run's config, with the model options of this evaluation applied
    ev: EvalConfig
    method: Method
    train: ImageSet
    test: ImageSet
    device: torch.device
    version: str          # the weights' identity ("ema@660"): cache entries are keyed by it
    progress: bool = True
    trained_size: int | None = None  # set when the run is read at another image size than it was trained on
    _transfer: tuple[ImageSet, ImageSet] | None = None
    # the probes protocol's fitted linear classifier (weight, bias on the raw features), which genrep probe saves
    # for genrep predict
    linear_classifier: dict | None = None

    @classmethod
    def open(cls, run: Run, ev: EvalConfig, *, options: dict | None = None, progress: bool = True,
             image_size: int | None = None) -> EvalContext:
        """Load the open ``run``'s trained method (``ev.weights``, with model ``options`` such as feature_t) and
        its data (at ``image_size``: the run read at another size, :meth:`Run.reading`)."""
        device = rank_device(ev.device)   # under torchrun, this rank's GPU
        resolve_precision(ev.precision, device)  # a precision this device cannot run: refused before any loading
        cfg, trained = run.reading(options, image_size)
        cfg, method, train, test = run.load(ev.weights, device, cfg=cfg)
        for split, s in (("train", train), ("test", test)):
            if len(s) == 0:
                raise GenrepError(f"the {split} split of {s.name} is empty; evaluation needs images in both splits")
        return cls(run=run.path, cfg=cfg, ev=ev, method=method, train=train, test=test, device=device,
                   version=run.weights_version(ev.weights), progress=progress, trained_size=trained)

    @property
    def bf16(self) -> bool:
        """bf16 autocast of trained heads and classifiers (CUDA only); extraction follows :attr:`precision`."""
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        """The network's precision while extracting features (``eval.precision`` resolved: fp32, fp16 or bf16)."""
        return resolve_precision(self.ev.precision, self.device)

    @property
    def feature_options(self) -> dict:
        """The model options that change features (``Method.feature_options``) and their values in this run."""
        return {k: getattr(self.cfg.model, k) for k in self.method.feature_options}

    def feature_key(self, split: str, layer: int, pool: str, source: str = "") -> str:
        """The cache key of frozen features: everything they depend on but the weights' step (checked apart), the
        extraction precision included, so an entry of one precision is never read as another."""
        causal = f"-causal{int(self.method.causal_mask)}" if self.method.causal_readout else ""
        size = f"-at{self.train.image_size}px" if self.trained_size else ""
        return (f"features{source}-{split}-layer{layer}-{pool}{self.method.feature_tag()}{causal}{size}-"
                f"{self.precision}-{self.ev.weights}")

    def features(self, split: str, layer: int, pool: str, data: ImageSet | None = None) -> torch.Tensor:
        """Frozen features of ``split`` of the run's data (or of ``data``, e.g. a transfer set), cached: float32, or
        float16 mapped from a file when too large for memory (``feature_store``)."""
        return self.feature_sets(split, [(layer, pool)], data)[0]

    def feature_sets(self, split: str, reads: list[tuple[int, str]],
                     data: ImageSet | None = None) -> list[torch.Tensor]:
        """Several read-outs of ``split``, cached like ``features``; those missing come from one pass per batch."""
        own = data is None
        images = (self.train if split == "train" else self.test).images if own else data.images
        source = "" if own else "-" + "".join(c if c.isalnum() else "_" for c in data.name)
        keys = [self.feature_key(split, layer, pool, source) for layer, pool in reads]

        def extract(todo, spill, record):
            what = ", ".join(f"{reads[i][0]}/{reads[i][1]}" for i in todo[:4]) + (" ..." if len(todo) > 4 else "")
            return self.extract_sets(images, [reads[i] for i in todo], desc=f"features {split} {what}", spill=spill,
                                     record=record)

        return cached_feature_sets(self.run, keys, self.version, extract)

    def extract_sets(self, images: torch.Tensor, reads: list[tuple[int, str]], *, method: Method | None = None,
                     desc: str | None = None, spill=None, record=None) -> list[torch.Tensor]:
        """Uncached read-outs of any images from one pass per batch (``Method.feature_sets``)."""
        return extract_feature_sets(method or self.method, images, reads, batch_size=self.ev.batch_size,
                                    device=self.device, precision=self.precision,
                                    progress=self.progress and desc is not None,
                                    desc=desc or "features", spill=spill, record=record)

    def extract(self, images: torch.Tensor, layer: int, pool: str, *, method: Method | None = None,
                desc: str | None = None) -> torch.Tensor:
        """Uncached features of any images (subsets, OOD sets, another run's ``method``); a bar with ``desc``."""
        return extract_features(method or self.method, images, layer=layer, pool=pool, batch_size=self.ev.batch_size,
                                device=self.device, precision=self.precision,
                                progress=self.progress and desc is not None,
                                desc=desc or "features")

    def transfer_sets(self) -> tuple[ImageSet, ImageSet]:
        """(train, test) of fine-tuning and low-shot: the run's own data, or ``eval.transfer_data`` loaded at
        the run's image size and channel count."""
        name = self.ev.transfer_data
        if not name or name == self.cfg.data.name:
            return self.train, self.test
        if self._transfer is None:
            from ...data.datasets import load_dataset
            from ..ood_sets import to_channels

            sets = []
            for split in ("train", "test"):
                s = load_dataset(name, split, image_size=self.train.image_size, root=self.cfg.data.root,
                                 download=self.cfg.data.download)
                sets.append(ImageSet(to_channels(s.images, self.train.channels), s.labels, s.classes, s.name))
            self._transfer = (sets[0], sets[1])
        return self._transfer

    def test_subset(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded subset of ``n`` test images (all when n >= the split), with labels."""
        if n >= len(self.test):
            return self.test.images, self.test.labels
        idx = torch.randperm(len(self.test), generator=torch.Generator().manual_seed(self.ev.seed))[:n]
        return self.test.images[idx], self.test.labels[idx]

    def ood_images(self, name: str, n: int | None) -> torch.Tensor:
        """``n`` images of the OOD set ``name`` (None: all of it) at the run's size and channels."""
        from ..ood_sets import make_ood_images

        return make_ood_images(name, self.test, n, seed=self.ev.seed, root=self.cfg.data.root,
                               download=self.cfg.data.download, interp_pairs=self.ev.ood.interp_pairs)

    def figure(self, name: str) -> Path:
        return self.run / FIGURES_DIR / f"{name}.png"

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run))


def check_causal(method: Method, causal: bool | None, key: str = "causal") -> None:
    if causal is not None and not isinstance(causal, bool):
        raise GenrepError(f"{key} must be True, False or None (leave as trained), got {causal!r}")
    if causal is not None and not method.causal_readout:
        known = ", ".join(methods_where(lambda cls: cls.causal_readout)) or "none is registered"
        raise GenrepError(f"{method.name} has no causal mask to switch {'on' if causal else 'off'}; {key} "
                          f"applies to causal methods ({known}); leave {key}=None for {method.name}")
    why = method.readout_refusal(causal) if causal is not None else None
    if why:
        raise GenrepError(f"{key}={causal}: {why}")
