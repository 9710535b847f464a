"""``packed:PATH``: a data set written by ``genrep pack``, read image by image, never whole.

A packed folder holds, per split, shards of (encoded image, label) records, the split's labels as an int64 ``.npy``,
and ``manifest.json`` (written last: a folder without it is a pack in progress, never a data set). The manifest
names each shard with its record count, byte size and sha256, the labels file's sha256, the classes, the channels
and the source's fingerprint. Opening a split checks what is cheap to check every time (the manifest's format and
version, every shard present at its size, the labels' sha256), and every shard's sha256 once per (file, size,
modification time): a verified shard is remembered under the genrep cache, so a later run re-reads nothing unless a
file changed, and a shard whose bytes no longer match the manifest is a one-line error before any image is used.

:class:`PackedImages` stands where an in-memory set's uint8 tensor stands (``ImageSet.images``): it has a
``shape`` and a length, and indexing it (an int, a slice, a list or an index tensor) decodes those images to uint8
``[n, C, S, S]`` at the read size, ``data.resize`` deciding how (the centre crop by default). It holds the labels
and the shards' offsets, not the images, so memory does not grow with the set; it reopens its shards in each
process, so DataLoader workers decode in parallel.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import GenrepError
from .imageset import SPLITS, _check_labels, _one_line, _pil_decode, _resize
from .resize import CENTER_CROP, center_crop_tensor, check_center_crop
from .shard_store import BACKEND, ShardReader

MANIFEST = "manifest.json"
DECODE_PLACES = ("auto", "workers", "device")
FORMAT, VERSION = "genrep-packed", 1
PREFIX = "packed:"
_HASH_CHUNK = 1 << 22


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST


def _fail(root: Path, why: str) -> GenrepError:
    return GenrepError(f"packed:{root}: {why}")


def read_manifest(root: Path) -> dict:
    """The manifest of packed folder ``root``, checked for shape and version; one line for anything else."""
    root = Path(root)
    path = manifest_path(root)
    if not root.is_dir():
        raise _fail(root, "no such folder; make one with genrep pack SOURCE OUT and read it as packed:OUT")
    if not path.is_file():
        partial = (root / ".pack").is_dir()
        raise _fail(root, "the pack did not finish (no manifest.json); run the same genrep pack command again to "
                          "complete it" if partial else "no manifest.json; this is not a folder genrep pack wrote")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(root, f"cannot read {MANIFEST} ({_one_line(e)}); pack the source again into a new folder")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _fail(root, f"{MANIFEST} is not a genrep pack manifest (format {FORMAT!r})")
    version = m.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise _fail(root, f"{MANIFEST} has format version {version!r}, newer than this genrep reads ({VERSION}); "
                          f"upgrade genrep")
    if m.get("backend") != BACKEND:
        raise _fail(root, f"{MANIFEST} names shard backend {m.get('backend')!r}; this genrep reads {BACKEND!r}")
    try:
        classes = [str(c) for c in m["classes"]]
        channels = int(m["channels"])
        splits = {s: m["splits"][s] for s in SPLITS}
        for s, entry in splits.items():
            if not isinstance(entry["shards"], list) or int(entry["count"]) != sum(int(sh["count"])
                                                                                   for sh in entry["shards"]):
                raise ValueError(f"the {s} split's count is not the sum of its shards'")
            for sh in entry["shards"]:
                _relative(root, sh["file"]), int(sh["bytes"]), str(sh["sha256"])
            _relative(root, entry["labels"]["file"]), str(entry["labels"]["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(root, f"{MANIFEST} is malformed ({_one_line(e)}); pack the source again into a new folder")
    if channels not in (1, 3) or not classes:
        raise _fail(root, f"{MANIFEST} declares {channels} channels and {len(classes)} classes; expected 1 or 3 "
                          f"channels and at least one class")
    return m


def _relative(root: Path, name: str) -> Path:
    """A file the manifest names, which must stay inside the packed folder."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"file {name!r} is not inside the packed folder")
    return root / p


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verified_cache() -> Path:
    from .datasets import default_data_root

    return default_data_root().parent / "packed-verified"


def _stamp(path: Path, sha: str) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sha}".encode()).hexdigest()


def verify_split(root: Path, m: dict, split: str, *, workers: int | None = None) -> None:
    """Every shard of ``split`` present at its size (always), and its sha256 equal to the manifest's (once per
    file state: remembered under the genrep cache); one line naming the first shard that is not."""
    entry = m["splits"][split]
    shards = entry["shards"]
    for sh in shards:
        path = _relative(root, sh["file"])
        if not path.is_file():
            raise _fail(root, f"shard {sh['file']} is missing; the packed set is incomplete: pack the source again "
                              f"(genrep pack resumes into a new folder) or restore the file")
        size = path.stat().st_size
        if size != int(sh["bytes"]):
            raise _fail(root, f"shard {sh['file']} is {size:,} bytes but the manifest says {int(sh['bytes']):,} "
                              f"(truncated or replaced); pack the source again or restore the file")
    labels = _relative(root, entry["labels"]["file"])
    if not labels.is_file() or file_sha256(labels) != entry["labels"]["sha256"]:
        raise _fail(root, f"{entry['labels']['file']} is missing or no longer matches its sha256 in the manifest; "
                          f"pack the source again")
    cache = _verified_cache()

    def unverified() -> list[dict]:
        return [sh for sh in shards if not (cache / _stamp(_relative(root, sh["file"]), sh["sha256"])).exists()]

    if not unverified():
        return
    # the processes of a machine (torchrun's ranks) verify one at a time: the first hashes, the others find its stamps
    with _one_verifier(cache):
        todo = unverified()
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:  # hashlib frees the GIL
            digests = list(pool.map(lambda sh: file_sha256(_relative(root, sh["file"])), todo))
        for sh, digest in zip(todo, digests):
            if digest != sh["sha256"]:
                raise _fail(root, f"shard {sh['file']} no longer matches its sha256 in the manifest (its bytes "
                                  f"changed); pack the source again or restore the file")
        try:   # a cache, not a record: a read-only home only means verifying again next time
            for sh in todo:
                (cache / _stamp(_relative(root, sh["file"]), sh["sha256"])).touch()
        except OSError:
            pass


@contextlib.contextmanager
def _one_verifier(cache: Path):
    """An exclusive flock on the verification cache's lock file while this process verifies (released when it
    ends, however); where the cache cannot be made (a read-only home), no lock: each process verifies alone."""
    import fcntl

    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing the descriptor drops the flock


def read_labels(root: Path, m: dict, split: str) -> torch.Tensor:
    entry = m["splits"][split]
    path = _relative(root, entry["labels"]["file"])
    try:
        y = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise _fail(root, f"cannot read {entry['labels']['file']} ({_one_line(e)}); pack the source again")
    return _check_labels(y, int(entry["count"]), f"packed:{root}", entry["labels"]["file"])


class PackedImages:
    """One split of a packed set as a lazy uint8 ``[N, C, S, S]``: indexing decodes the images asked for."""

    dtype = torch.uint8

    def __init__(self, root: Path, m: dict, split: str, size: int, resize: str):
        entry = m["splits"][split]
        self.root, self.split, self.size, self.resize = Path(root), split, size, resize
        self.packed_size = m.get("image_size")   # the side of a square pack (center_crop), else None
        self.channels = int(m["channels"])
        self.files = [_relative(self.root, sh["file"]) for sh in entry["shards"]]
        self.ends = np.cumsum([int(sh["count"]) for sh in entry["shards"]])
        self.shape = torch.Size((int(entry["count"]), self.channels, size, size))
        digest = hashlib.sha256(json.dumps([sh["sha256"] for sh in entry["shards"]]).encode())
        digest.update(f"|{size}|{resize}|{self.channels}".encode())
        self.digest = digest.hexdigest()   # what the decoded pixels are a function of
        self._readers: dict[int, ShardReader] = {}
        self._pid = -1

    def __len__(self) -> int:
        return int(self.shape[0])

    def dim(self) -> int:
        return 4

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def element_size(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"PackedImages(packed:{self.root}, {self.split}, {tuple(self.shape)})"

    def _reader(self, shard: int) -> ShardReader:
        if self._pid != os.getpid():   # a forked DataLoader worker opens its own files
            self._readers, self._pid = {}, os.getpid()
        if shard not in self._readers:
            self._readers[shard] = ShardReader(self.files[shard])
        return self._readers[shard]

    def record(self, i: int) -> bytes:
        """The encoded bytes of image ``i``."""
        shard = int(np.searchsorted(self.ends, i, side="right"))
        start = int(self.ends[shard - 1]) if shard else 0
        return self._reader(shard).read(i - start)

    def decode(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 [C, S, S]."""
        data = self.record(i)
        what = f"image {i} of packed:{self.root} ({self.split})"
        image = decode_image_bytes(data, self.channels, what)
        if tuple(image.shape[1:]) == (self.size, self.size):
            return image
        if self.resize == CENTER_CROP:
            check_center_crop(image.shape[2], image.shape[1], self.size, what)
            return center_crop_tensor(image[None], self.size, what)[0]
        return _resize(image[None], self.size)[0]

    def __getitem__(self, idx) -> torch.Tensor:
        n = len(self)
        if isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.dim() == 0):
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} images")
            return self.decode(i % n)
        if isinstance(idx, slice):
            order = range(n)[idx]
        else:   # a list, an array or a tensor: a bool mask (torch or NumPy) or integer positions
            idx = torch.as_tensor(idx).cpu()
            if idx.dtype == torch.bool:
                if idx.shape != (n,):
                    raise IndexError(f"a mask of shape {tuple(idx.shape)} does not fit {n} images")
                idx = torch.nonzero(idx).flatten()
            elif idx.is_floating_point() or idx.is_complex():
                raise IndexError(f"images are indexed by integers or a bool mask, got {idx.dtype}")
            order = idx.flatten().tolist()
        out = torch.empty((len(order), self.channels, self.size, self.size), dtype=torch.uint8)
        for k, i in enumerate(order):
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} images")
            out[k] = self.decode(i % n)
        return out


def decode_image_bytes(data: bytes, channels: int, what: str) -> torch.Tensor:
    """Encoded bytes -> uint8 [channels, H, W]: torchvision's libjpeg-turbo decoder for JPEG, Pillow otherwise."""
    import warnings

    if data[:3] == b"\xff\xd8\xff":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torchvision.io import ImageReadMode, decode_jpeg

                mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        except (ImportError, RuntimeError, ValueError):
            pass   # Pillow says what is wrong, or reads what libjpeg refused
    return _pil_decode(data, "RGB" if channels == 3 else "L", what)


def parse_packed_name(name: str) -> Path | None:
    """The folder of a ``packed:PATH`` data set name, or None for another name."""
    kind, sep, rest = name.strip().partition(":")
    if not sep or kind.lower() != "packed":
        return None
    if not rest.strip():
        raise GenrepError("packed: needs a folder written by genrep pack, e.g. packed:/data/imagenet-256")
    return Path(rest.strip()).expanduser()


def load_packed(root: Path, split: str, image_size: int | None, resize: str):
    """One split of a packed folder as an :class:`~genrep.data.imageset.ImageSet` over :class:`PackedImages`."""
    from .imageset import ImageSet

    m = read_manifest(root)
    size = image_size if image_size is not None else m.get("image_size")
    if size is None:
        raise _fail(root, "its images come in several sizes (packed with --resize none or short_side); read it at "
                          "one size with data.image_size=N")
    verify_split(root, m, split)
    labels = read_labels(root, m, split)
    if len(labels) == 0:
        raise _fail(root, f"the {split} split is empty; a data set needs at least one image per split")
    images = PackedImages(root, m, split, int(size), resize)
    return ImageSet(images=images, labels=labels, classes=m["classes"], name=f"{PREFIX}{os.path.abspath(root)}")


def is_uint8_images(x) -> bool:
    """uint8 [N, C, H, W] images: a tensor, or a packed split's lazy stand-in."""
    return isinstance(x, PackedImages) or (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, images: PackedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, idx: list[int]) -> torch.Tensor:   # one call per batch
        return self.images[idx]


def _as_is(batch):
    return batch


def decode_workers() -> int:
    """DataLoader workers that decode a packed set for evaluation: the cores, at most 8 (0 on one core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 1 else min(8, cores)


def packed_batches(images: PackedImages, starts, batch_size: int, device: torch.device):
    """uint8 batches [images[i:i + batch_size] for i in starts], decoded in DataLoader workers, in order."""
    from torch.utils.data import DataLoader

    workers = decode_workers()
    sampler = ([*range(i, min(i + batch_size, len(images)))] for i in starts)
    loader = DataLoader(_Batches(images), batch_sampler=list(sampler), collate_fn=_as_is,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=2 if workers else None)
    for batch in loader:
        yield batch
        release_freed_memory()


def release_freed_memory() -> None:
    """Give the pages of freed batches back to the system (glibc's malloc_trim; nothing elsewhere). glibc raises its
    mmap threshold as large blocks are freed, so later batches are carved from the heap, whose freed middle it keeps:
    a probe of 20,000 images at 256 px peaked at 2.9 GB without this and 1.9 GB with it (measured, docs/benchmarks.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to trim
        return None


class _Records(torch.utils.data.Dataset):
    """A batch's encoded images (uint8 byte tensors) and labels: what workers hand over for decoding on the device."""

    def __init__(self, images: PackedImages, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, idx: list[int]):
        return [torch.frombuffer(bytearray(self.images.record(i)), dtype=torch.uint8) for i in idx], self.labels[idx]


def decode_on_device(images: PackedImages, place: str, device: torch.device) -> bool:
    """Whether training decodes this packed set's batches on ``device`` (``data.decode``): ``device`` always
    (a colour pack, square at the read size, one-line refusal otherwise), ``auto`` where that holds on CUDA."""
    why = None
    if images.channels != 3:
        why = "it is grey (the batched decoder gives colour)"
    elif images.packed_size != images.size:
        why = (f"its images are not {images.size}x{images.size} squares as packed (packed "
               f"{'at ' + str(images.packed_size) if images.packed_size else 'in several sizes'}): they are resized "
               f"per image in the workers")
    if place == "device" and why:
        raise GenrepError(f"data.decode device cannot decode packed:{images.root} on the device: {why}; use "
                          f"data.decode workers (or auto)")
    return place == "device" or (place == "auto" and why is None and device.type == "cuda")


def decode_batch(records: list[torch.Tensor], images: PackedImages, device: torch.device) -> torch.Tensor:
    """A batch of JPEG records -> uint8 [n, 3, S, S] on ``device`` in one torchvision call (nvjpeg on CUDA)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = decode_jpeg(records, mode=ImageReadMode.RGB, device=device)
    want = (3, images.size, images.size)
    for x in out:
        if tuple(x.shape) != want:
            raise GenrepError(f"packed:{images.root}: an image of a batch decoded to {tuple(x.shape)}, not the pack's "
                              f"{want}; the shard does not match its manifest: pack the source again")
    return torch.stack(out)
