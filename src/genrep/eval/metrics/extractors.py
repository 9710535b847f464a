"""Feature extractors for the generation metrics (:mod:`genrep.eval.metrics.generation`).

An :class:`Extractor` maps float images in [0, 1], ``[B, C, H, W]``, to features ``[B, D]`` (its
``forward``) and, when it has a classifier head, to class logits ``[B, K]`` for the Inception Score
(:meth:`Extractor.features_and_logits` gives both from one pass). Every extractor carries a ``label``
that each result it produces repeats, and ``is_custom``: numbers from anything but the standard
Inception network are not comparable with published FID/IS/KID and are labelled ``"custom: ..."``.

* :func:`inception_extractor`: the standard one, torch-fidelity's Inception v3 with the FID weights
  converted from TensorFlow (``pool3``, 2048-d features for FID/KID; ``logits_unbiased``, 1008 classes,
  for IS, as torch-fidelity does). Images are quantised to uint8, grey images repeated to 3 channels,
  and resized to 299x299 inside the network with torch-fidelity's TensorFlow-1-compatible bilinear
  resize (torchmetrics' ``antialias=False``), the resize the original FID code used. Offline only:
  the weights file must be given, nothing is ever downloaded.
* :func:`custom_extractor`: any ``nn.Module`` (optionally a second one for logits).
* :func:`dataset_classifier_extractor`: a small CNN trained on the training split, the usual stand-in
  for Inception on small or grey data (8x8 digits, MNIST) where ImageNet features mean little. Its
  weights are cached as safetensors; a cache that does not load cleanly is retrained.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import GenrepError, library_warnings
from ...io import atomic_save_safetensors

__all__ = ["INCEPTION_ENV", "INCEPTION_FILE", "INCEPTION_LABEL", "INCEPTION_URL", "Extractor", "content_digest",
           "custom_extractor", "dataset_classifier_extractor", "inception_extractor", "inception_weights_path"]

INCEPTION_ENV = "GENREP_INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (0.4), where torch-fidelity itself fetches it
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_LABEL = "inception-v3 (torch-fidelity FID weights)"
_CNN_VERSION = "1"  # bump when the classifier's architecture or training changes, so old caches are not used


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def content_digest(*tensors: Tensor) -> str:
    """A hex digest of the tensors' shapes, dtypes and bytes (blake2b; ~1 GB/s, so cheap next to a forward pass)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Extractor(nn.Module):
    """Images in [0, 1] ``[B, C, H, W]`` -> features ``[B, D]`` (and logits ``[B, K]`` if ``has_logits``).

    ``input_shape`` is ``(C, H, W)`` when the extractor only accepts one shape, else ``None``.
    """

    def __init__(self, label: str, is_custom: bool, has_logits: bool,
                 input_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.label, self.is_custom, self.has_logits, self.input_shape = label, is_custom, has_logits, input_shape

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[0]

    def fingerprint(self) -> str:
        """Digest of the label and every parameter and buffer: two extractors share cached statistics only if equal."""
        h = hashlib.blake2b(self.label.encode(), digest_size=16)
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(content_digest(t).encode())
        return h.hexdigest()

    def extra_repr(self) -> str:
        return f"label={self.label!r}"


# ----------------------------------------------------------------------------------------------- Inception
class _InceptionExtractor(Extractor):
    def __init__(self, net: nn.Module) -> None:
        super().__init__(INCEPTION_LABEL, is_custom=False, has_logits=True)
        self.net = net

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # the network wants uint8 (it subtracts 128 and divides by 128 itself); round, not truncate
        u8 = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
        feats, logits = self.net._torch_fidelity_forward(u8)
        return feats.float(), logits.float()


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``weights_path``, else ``$GENREP_INCEPTION_WEIGHTS``; it must exist."""
    how = (f"pass its path with --eval.inception_weights PATH or the environment variable {INCEPTION_ENV} "
           f"(nothing is downloaded)")
    need = f"Inception v3 FID/IS/KID need torch-fidelity's weights file {INCEPTION_FILE} (from {INCEPTION_URL})"
    if weights_path is None or str(weights_path).strip() == "":
        weights_path = os.environ.get(INCEPTION_ENV, "").strip() or None
        if weights_path is None:
            raise GenrepError(f"{need}; {how}")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise GenrepError(f"{need}, but {path} is not a file; {how}")
    return path


def inception_extractor(weights_path: str | os.PathLike | None = None) -> Extractor:
    """torch-fidelity's Inception v3 (FID weights) from a local file; never downloads (see module docstring)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = inception_weights_path(weights_path)
    expect = f"it must be torch-fidelity's {INCEPTION_FILE} ({INCEPTION_URL})"
    # the file is read once, safely; torch-fidelity would unpickle it again without weights_only, so a file
    # swapped between the two reads could run code. It gets an in-memory copy of the checked tensors instead.
    try:
        with library_warnings():  # torch warns of a legacy pickle's protocol just before it refuses the file
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - bad zip, pickle opcode, non-allow-listed global...
        raise GenrepError(f"cannot read Inception weights {path}: {_one_line(e)}; {expect}") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(fc, Tensor) or tuple(fc.shape) != (1008, 2048):
        raise GenrepError(f"{path} is not an Inception v3 state dict (no fc.weight of shape 1008x2048); {expect}")
    tensors = {}
    for k, v in state.items():
        t = v.detach() if isinstance(v, Tensor) else v
        # only plain tensors under str keys go into the copy, so what torch-fidelity unpickles is tensors alone
        if not isinstance(k, str) or type(t) is not Tensor:
            raise GenrepError(f"{path} holds {type(v).__name__} under {k!r}, not a tensor; {expect}")
        tensors[k] = t
    del state, fc
    buf = io.BytesIO()
    torch.save(tensors, buf)
    del tensors
    buf.seek(0)
    try:
        # a file object, not None: torch-fidelity's download branch is never taken, the path never reopened
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                 feature_extractor_weights_path=buf, antialias=False)
    except Exception as e:  # noqa: BLE001 - key/shape mismatches and whatever torch-fidelity raises
        raise GenrepError(f"cannot load Inception weights {path}: {_one_line(e)}; {expect}") from None
    return _InceptionExtractor(net).eval()


# ----------------------------------------------------------------------------------------------- custom
class _CustomExtractor(Extractor):
    def __init__(self, module: nn.Module, description: str, logits_module: nn.Module | None) -> None:
        super().__init__(f"custom: {description}", is_custom=True, has_logits=logits_module is not None)
        self.module, self.logits_module = module, logits_module

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = [self.module(x), None if self.logits_module is None else self.logits_module(x)]
        for i, (t, what) in enumerate(zip(out, ("features", "logits"))):
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[0] != x.shape[0]:
                raise GenrepError(f"extractor {self.label!r}: its {what} module must return a [B, D] tensor, got "
                                  f"{tuple(getattr(t, 'shape', ())) or type(t).__name__} for a batch of {len(x)}")
            out[i] = t.float()
        return out[0], out[1]


def custom_extractor(module: nn.Module, description: str, logits_module: nn.Module | None = None) -> Extractor:
    """Wrap ``module`` (images in [0, 1] -> [B, D]); results are labelled ``"custom: <description>"``."""
    for m, what in ((module, "module"), (logits_module, "logits_module")):
        if m is not None and not isinstance(m, nn.Module):
            raise GenrepError(f"custom_extractor: {what} must be a torch.nn.Module, got {type(m).__name__}; wrap "
                              f"a function in an nn.Module whose forward calls it")
    if not isinstance(description, str) or not description.strip():
        raise GenrepError(f"custom_extractor needs a non-empty description for its label, got {description!r}")
    return _CustomExtractor(module, " ".join(description.split()), logits_module)


# ----------------------------------------------------------------------------------------------- data set CNN
class _SmallCNN(nn.Module):
    """conv16-conv32-pool, [conv64-pool while > 4 px], conv128, global average: 128-d features, linear head."""

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        # narrow at full resolution, where convolutions cost the most
        layers: list[nn.Module] = [nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                   nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        width = 32
        side = -(-size // 2)
        while side > 4:  # the last conv sees a <= 4x4 map, so its receptive field covers the image at any size
            layers += [nn.Conv2d(width, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            side, width = -(-side // 2), 64
        layers += [nn.Conv2d(width, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(128, num_classes)


class _ClassifierExtractor(Extractor):
    def __init__(self, net: _SmallCNN, label: str, input_shape: tuple[int, int, int]) -> None:
        super().__init__(label, is_custom=True, has_logits=True, input_shape=input_shape)
        self.net = net

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.net.trunk(x * 2 - 1)
        return h, self.net.head(h)


def _batches(n: int, batch_size: int):
    return ((i, min(i + batch_size, n)) for i in range(0, n, batch_size))


@torch.no_grad()
def _accuracy(net: _SmallCNN, images: Tensor, labels: Tensor, device: torch.device) -> float:
    net.eval()
    correct = 0
    for a, b in _batches(len(images), 512):
        x = images[a:b].to(device).float().div_(255)
        correct += int((net.head(net.trunk(x * 2 - 1)).argmax(1).cpu() == labels[a:b]).sum())
    return correct / max(1, len(images))


def _train(net: _SmallCNN, images: Tensor, labels: Tensor, epochs: int, seed: int, device: torch.device,
           batch_size: int, lr: float, progress: bool) -> None:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)  # shuffling; the initialisation was seeded by the caller
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch", leave=False, disable=None if progress else True):
        perm = torch.randperm(len(images), generator=gen)
        for a, b in _batches(len(images), batch_size):
            idx = perm[a:b]
            x = images[idx].to(device).float().div_(255)
            loss = F.cross_entropy(net.head(net.trunk(x * 2 - 1)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()


def _load_cached(path: Path, net: _SmallCNN, key: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return False
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        net.load_state_dict(state, strict=True)
    except Exception:  # noqa: BLE001 - unreadable, truncated or mismatched: retrain rather than trust it
        return False
    return all(torch.isfinite(t).all() for t in state.values())


def dataset_classifier_extractor(train_set, test_set=None, *, cache_dir: str | os.PathLike, epochs: int = 10,
                                 seed: int = 0, device: str | torch.device = "cpu", batch_size: int = 64,
                                 lr: float = 4e-3, progress: bool = False) -> Extractor:
    """A small CNN trained on ``train_set`` (an ImageSet); penultimate layer as features, logits for IS.

    Adam (``lr``), ``epochs`` passes of seeded shuffles of ``batch_size`` images, seeded initialisation:
    deterministic on the CPU. The weights are cached in ``cache_dir`` under a name built from the data
    set's name, image size, channels, classes, epochs, seed and a digest of its images and labels, and
    loaded instead of retrained when the file is intact. The label reports the accuracy on ``test_set``
    (when given). 8x8 digits (1437 images, 10 epochs): about a second on 2 CPU cores, 97-98% test accuracy;
    16x16 digits ~2 s. On MNIST/CIFAR-sized sets prefer a GPU (``device``).
    """
    from ...data.imageset import ImageSet
    from ...devices import resolve_device

    for s, what in ((train_set, "train_set"), (test_set, "test_set")):
        if not (s is None and what == "test_set") and not isinstance(s, ImageSet):
            raise GenrepError(f"dataset_classifier_extractor: {what} must be an ImageSet, got {type(s).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise GenrepError(f"dataset_classifier_extractor: epochs must be a positive integer, got {epochs!r}")
    if train_set.num_classes < 2 or len(train_set) < 2:
        raise GenrepError(f"dataset_classifier_extractor needs at least 2 classes and 2 images, {train_set.name} "
                          f"has {train_set.num_classes} classes and {len(train_set)} images")
    shape = (train_set.channels, *train_set.image_shape)
    if test_set is not None and (test_set.channels, *test_set.image_shape) != shape:
        raise GenrepError(f"dataset_classifier_extractor: test_set images are {tuple(test_set.images.shape[1:])} "
                          f"but train_set images are {shape}; load both splits at the same image_size")
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    c, h, w = shape
    k = train_set.num_classes
    digest = content_digest(train_set.images, train_set.labels)
    key = f"v{_CNN_VERSION}|{train_set.name}|{h}x{w}|c{c}|k{k}|e{epochs}|s{seed}|b{batch_size}|lr{lr}|{digest}"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", train_set.name).strip("_")[-60:] or "data"
    path = Path(cache_dir) / f"{stem}-{h}x{w}-c{c}-k{k}-e{epochs}-s{seed}-{digest[:12]}.safetensors"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _SmallCNN(c, max(h, w), k)
    if not (path.is_file() and _load_cached(path, net, key)):
        t0 = time.perf_counter()
        net.to(dev)
        _train(net, train_set.images, train_set.labels, epochs, seed, dev, batch_size, lr, progress)
        atomic_save_safetensors(path, net.state_dict(), metadata={"key": key,
                                                                  "seconds": f"{time.perf_counter() - t0:.2f}"})
    net.to(dev).eval()
    base = re.sub(r"^(npz|folder):.*[\\/]", "", train_set.name).strip() or train_set.name
    if test_set is not None:
        acc = _accuracy(net, test_set.images, test_set.labels, dev)
        label = f"custom: {base}-cnn classifier ({epochs} epochs, test acc {100 * acc:.1f}%)"
    else:
        label = f"custom: {base}-cnn classifier ({epochs} epochs, no test split)"
    out = _ClassifierExtractor(net, label, shape)
    out.test_accuracy = acc if test_set is not None else None
    out.cache_path = path
    return out.eval()
