"""Feature caches too large for memory: float16 ``.npy`` files, memory-mapped, written batch by batch.

An ADM-256 read-out of ImageNet's train split is 1.28M x 4096 floats (21 GB as float32), a 1024x16x16 map 1 MB
per image: they cannot be held in memory, nor gathered there before being written. So a split's features at one
read-out whose float32 size passes ``LARGE_FEATURES`` are written, as they are extracted, into a float16 file in
numpy's ``.npy`` format (read back with ``numpy.load(mmap_mode=...)``, never unpickled), and what uses them reads
rows in chunks (``metrics.probes`` streams a half-precision CPU matrix; ``metrics.heads`` reads per batch). Smaller
features stay float32 in memory and in a safetensors cache, as they always were, so no small result changes.

A cached entry is ``RUN/cache/<key>.npy`` beside ``<key>.json`` (the weights' version, the shape and dtype),
written in that order: the record is removed before a new array takes the name and written after it, so an array
is never read under another's record. The array is filled in a temporary file in the same folder, its blocks
reserved up front (a full disk is one line before the extraction, not a bus error in the middle of it), then
renamed. A process that does not write (a non-main rank of a distributed evaluation) and extractions that are not
cached fill an anonymous temporary file instead, gone when the tensor is.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..errors import GenrepError

LARGE_FEATURES = 2 << 30  # bytes of one split's float32 features at one read-out above which they are float16 files
HALF_MAX = float(np.finfo(np.float16).max)
FORMAT = "genrep-features-1"


def is_large(n: int, row_shape) -> bool:
    return n * math.prod(row_shape) * 4 > LARGE_FEATURES


def record_path(array_path: Path) -> Path:
    return Path(array_path).with_suffix(".json")


def _reserve(f, nbytes: int) -> None:
    """Allocate a file's blocks now: writing through a map into a sparse file on a full disk is a SIGBUS."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(f.fileno(), 0, nbytes)


def anonymous_array(shape: tuple[int, ...]) -> torch.Tensor:
    """A float16 tensor of ``shape`` backed by an unlinked temporary file (TMPDIR), zero-filled."""
    nbytes = math.prod(shape) * 2
    with tempfile.TemporaryFile(prefix="genrep-features-") as f:   # unlinked at once; the map keeps its pages
        if nbytes:
            _reserve(f, nbytes)
            array = np.memmap(f, dtype=np.float16, mode="r+", shape=shape)
        else:
            array = np.zeros(shape, dtype=np.float16)
    return torch.from_numpy(array)


class MappedWriter:
    """Fills a float16 array of ``shape`` row block by row block; ``finish`` commits it as ``path`` (None, or a
    process that does not write: an anonymous file) and returns it as a tensor mapped from disk."""

    def __init__(self, path: Path | None, shape: tuple[int, ...]):
        self.path, self.shape, self.tmp = (Path(path) if path is not None else None), tuple(shape), None
        if self.path is None or not io.is_writer():
            self.tensor = anonymous_array(self.shape)
            return
        with io.writing(self.path, "feature cache") as partial:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            partial.append(Path(tmp))
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=self.shape)
            with open(tmp, "r+b") as f:
                _reserve(f, os.path.getsize(tmp))
            self.tmp, self.array, self.tensor = Path(tmp), array, torch.from_numpy(array)

    def put(self, start: int, rows: torch.Tensor, what: str) -> None:
        half = rows.to(torch.float16)
        if not bool(torch.isfinite(half).all()) and bool(torch.isfinite(rows).all()):
            self.discard()
            big = float(rows.abs().max())
            raise GenrepError(f"{what} reach {big:.4g}, beyond float16's {HALF_MAX:g}, and features this large "
                              f"({self.shape[0]} rows of {math.prod(self.shape[1:])}) are cached as float16; read a "
                              f"normalised layer, or a pooling that averages")
        self.tensor[start:start + len(half)] = half

    def finish(self, record: dict) -> torch.Tensor:
        if self.tmp is None:
            return self.tensor
        with io.writing(self.path, "feature cache") as partial:
            partial.append(self.tmp)
            self.array.flush()
            io.sync_as_written(self.tmp)
            with contextlib.suppress(FileNotFoundError):
                record_path(self.path).unlink()   # no old record may name the new array
            os.replace(self.tmp, self.path)
        io.atomic_write_json(record_path(self.path), {"format": FORMAT, **record, "shape": list(self.shape),
                                                      "dtype": "float16"}, "feature cache record")
        self.tmp, self.array, self.tensor = None, None, None   # unmapped: the cache is read back copy-on-write
        mapped = read_mapped(self.path, record)
        if mapped is None:
            raise GenrepError(f"{self.path} was written and does not read back as the features it holds; is something "
                              f"else writing to {self.path.parent}?")
        return mapped

    def discard(self) -> None:
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
            self.tmp = None


def read_mapped(path: Path, expect: dict) -> torch.Tensor | None:
    """The float16 array at ``path`` mapped copy-on-write (never written back), if its record holds every item of
    ``expect`` and the file is the array the record describes; None when absent, stale or damaged."""
    try:
        record = json.loads(record_path(path).read_text())
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or any(record.get(k) != v
                                                                               for k, v in expect.items()):
        return None
    if array.dtype != np.float16 or list(array.shape) != record.get("shape") or not array.flags.c_contiguous:
        return None
    return torch.from_numpy(array)


def is_mapped(t: torch.Tensor) -> bool:
    """Whether features came from (or went to) a float16 file rather than memory."""
    return t.dtype == torch.float16


class FeatureSink:
    """Where one read-out's ``n`` rows go as batches arrive: float32 in memory, or a float16 file when large."""

    def __init__(self, n: int, row_shape, path: Path | None, what: str):
        self.what = what
        self.writer = MappedWriter(path, (n, *row_shape)) if is_large(n, row_shape) else None
        self.out = None if self.writer else torch.empty((n, *row_shape))

    def put(self, start: int, rows: torch.Tensor) -> None:
        if self.writer is None:
            self.out[start:start + len(rows)] = rows
        else:
            self.writer.put(start, rows, self.what)

    def finish(self, record: dict) -> torch.Tensor:
        return self.out if self.writer is None else self.writer.finish(record)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.discard()
