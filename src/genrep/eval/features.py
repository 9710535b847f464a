"""Batched frozen-feature extraction, cached in the run folder, at a chosen precision.

Features are a pure function of (weights, data split, layer, pool, extraction precision), so they are cached
under ``RUN/cache/`` keyed by those: as float32 safetensors, or, when too large for memory, as a float16 file
written batch by batch and read back memory-mapped (``feature_store``). A cache entry records the weights'
checkpoint step and is ignored when the weights changed (a resumed run that trained further).

The network runs under autocast at the extraction precision (``eval.precision``, ``probe.precision``): ``fp32``
(no autocast), ``bf16``, ``fp16`` (CUDA only; the diffusion-features paper's authors run their U-Net in fp16), or
``auto`` (bf16 on CUDA, fp32 elsewhere: what genrep always did). The features come back float32 either way.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import GenrepError
from ..io import atomic_save_safetensors
from ..methods import Method
from .distributed import broadcast_from_main, gathered, is_main, my_batches
from .feature_store import FeatureSink, is_mapped, read_mapped

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(name: str, device: torch.device | str) -> str:
    """The extraction precision ``name`` on ``device`` as fp32, fp16 or bf16; one line for one it cannot run."""
    device = torch.device(device)
    if name not in PRECISIONS:
        raise GenrepError(f"extraction precision {name!r} is unknown; choose {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        # CPU autocast to float16 is missing or emulated for most kernels: nothing to gain and untested here
        raise GenrepError(f"extraction precision fp16 needs a CUDA device, and this evaluation runs on {device.type}; "
                          f"choose fp32, bf16 or auto")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GenrepError("extraction precision bf16 needs a GPU with bfloat16 (Ampere or newer); choose fp16 or fp32")
    return name


def precision_autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """Autocast of the network at a resolved precision (fp32: none)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=_DTYPES.get(precision, torch.bfloat16), enabled=precision in _DTYPES)


def image_batches(images: torch.Tensor, batch_size: int, device: torch.device | str, *, progress: bool = False,
                  desc: str = "batches", starts=None):
    """uint8 [N, C, H, W] images -> float batches in [0, 1] on ``device``, with a tqdm bar when ``progress``: every
    batch, or those starting at ``starts``. A packed set's batches are decoded in DataLoader workers, in order."""
    from ..data.packed import PackedImages, packed_batches

    starts = range(0, len(images), batch_size) if starts is None else starts
    batches = (packed_batches(images, starts, batch_size, torch.device(device)) if isinstance(images, PackedImages)
               else (images[i:i + batch_size] for i in starts))
    if progress:   # over the batches as they arrive (a packed set's loader takes all its starts at once)
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=len(starts), desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                       disable=None)
    for x in batches:
        yield x.to(device, non_blocking=True).float().div_(255)


def extract_features(method: Method, images: torch.Tensor, *, layer: int | None = None, pool: str | None = None,
                     batch_size: int = 512, device: torch.device | str = "cpu", bf16: bool = False,
                     precision: str | None = None, progress: bool = False, desc: str = "features") -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 [N, D] (or maps [N, C, h, w]) on the CPU, with the method in eval mode."""
    return extract_feature_sets(method, images, [(layer, pool)], batch_size=batch_size, device=device, bf16=bf16,
                                precision=precision, progress=progress, desc=desc)[0]


@torch.no_grad()
def extract_feature_sets(method: Method, images: torch.Tensor, reads: list[tuple[int | None, str | None]], *,
                         batch_size: int = 512, device: torch.device | str = "cpu", bf16: bool = False,
                         precision: str | None = None, progress: bool = False, desc: str = "features",
                         spill: list[Path | None] | None = None, record: dict | None = None) -> list[torch.Tensor]:
    """Several (layer, pool) read-outs of uint8 [N, C, H, W] images from one pass per batch
    (``Method.feature_sets``), each float32 [N, ...] on the CPU, or float16 mapped from a file when too large for
    memory (``feature_store``: written to ``spill[i]`` with ``record`` as the cache entry of read-out i, or to an
    anonymous file). ``precision`` (fp32, fp16, bf16; see :func:`resolve_precision`) wins over ``bf16``, which
    older callers pass (True: bf16 autocast)."""
    method.eval()
    device = torch.device(device)
    precision = resolve_precision(precision or ("bf16" if bf16 else "fp32"), device)
    n = len(images)
    mine = my_batches(n, batch_size)   # every batch, or this rank's share under torchrun

    def local():
        for x in image_batches(images, batch_size, device, progress=progress and is_main(), desc=desc, starts=mine):
            with precision_autocast(device, precision):
                outs = method.feature_sets(x, reads)
            yield [f.float().cpu() for f in outs]

    def shapes():   # a rank with no batch: the shapes of one image's read-outs
        one = images[:1].to(device).float().div_(255)
        return [(f.shape[1:], torch.float32) for f in method.feature_sets(one, reads)]

    sinks: list[FeatureSink] = []
    try:
        for start, outs in gathered(n, batch_size, local(), shapes):
            if not sinks:
                sinks = [FeatureSink(n, f.shape[1:], (spill or [None] * len(reads))[i],
                                     f"the features at layer {reads[i][0]}, pool {reads[i][1]}")
                         for i, f in enumerate(outs)]
            for sink, f in zip(sinks, outs):
                sink.put(start, f)
        return [sink.finish(record or {}) for sink in sinks]
    except BaseException:
        for sink in sinks:
            sink.discard()
        raise


def _small_path(run: Path, key: str) -> Path:
    return Path(run) / "cache" / f"{key}.safetensors"


def mapped_path(run: Path, key: str) -> Path:
    return Path(run) / "cache" / f"{key}.npy"


def read_cache(run: Path, key: str, version: str) -> torch.Tensor | None:
    """The cache entry ``key`` if it was made from weights ``version`` (None: absent, stale or damaged): float32
    from ``RUN/cache/<key>.safetensors``, or a float16 file of large features mapped (``feature_store``)."""
    path = _small_path(run, key)
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("version") == version:
                    return f.get_tensor("features")
        except (SafetensorError, OSError):
            pass  # a damaged cache is recomputed, never trusted
    return read_mapped(mapped_path(run, key), {"version": version})


def write_cache(run: Path, key: str, version: str, feats: torch.Tensor) -> None:
    if is_mapped(feats):
        return   # large features were written to their file as they were extracted
    atomic_save_safetensors(_small_path(run, key), {"features": feats.contiguous()}, {"version": version})


def cached_feature_sets(run: Path, keys: list[str], version: str, extract) -> list[torch.Tensor]:
    """The cache entries ``keys`` made from weights ``version``; those missing from ``extract(todo, spill,
    record)`` (the indices of the keys missing, where their large features go, the record to give them) and stored.
    Rank 0 reads the cache and sends what it found to the other ranks."""
    out = [broadcast_from_main(read_cache(run, key, version) if is_main() else None) for key in keys]
    todo = [i for i, f in enumerate(out) if f is None]
    if todo:
        feats = extract(todo, [mapped_path(run, keys[i]) for i in todo], {"version": version})
        for i, f in zip(todo, feats):
            write_cache(run, keys[i], version, f)
            out[i] = f
    return out
