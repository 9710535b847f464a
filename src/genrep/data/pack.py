"""``genrep pack SOURCE OUT``: a compressed, sharded copy of an image data set that never has to fit in memory.

SOURCE is a folder tree (``train/<class>/*`` beside ``val/<class>/*`` or ``test/<class>/*``, ImageNet's layout; or
``<class>/*`` alone, split 80/20 per class as ``folder:`` does) or a registered data set's name. Each split's files,
in class then file-name order, are cut into shards of ``shard_size`` records, each shard packed by a worker process:
decoded, checked and re-encoded as JPEG at ``quality`` where ``resize`` changes the pixels (``center_crop``:
guided-diffusion's, to ``image_size`` square; ``short_side``: the short side to ``image_size``, the aspect kept), or
kept byte for byte where ``resize`` is ``none`` and the file is a JPEG.

An image that cannot be decoded (unreadable, truncated) is skipped: the shard records it, the command prints how
many and the first names, and ``manifest.json`` lists them all. What can be known before any work is refused
before it: a source that is no folder tree or set, an empty class folder, an image the centre crop cannot take
(from its header), an OUT that holds anything genrep's pack did not write.

Resumable: the plan (the source's fingerprint: its files' names, sizes and modification times; the settings) is
kept in ``OUT/.pack/plan.json`` and each finished shard's record beside it, written after the shard (both
atomically). Run again, the same command keeps every shard whose file still has its recorded sha256 and packs the
rest; another source or other settings into the same OUT is refused. ``manifest.json`` is written last, and then
``.pack/`` removed: a folder without a manifest is never read as a data set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GenrepError
from ..io import atomic_write_bytes, atomic_write_json, check_can_write, writing
from .imageset import SPLITS, _GRAY_MODES, _one_line
from .local_sets import MAX_FOLDER_PIXELS
from .packed import BACKEND, FORMAT, MANIFEST, VERSION, file_sha256
from .resize import center_crop_pil, center_crop_refusal
from .shard_store import SHARD_SUFFIX, write_shard

PACK_RESIZES = ("center_crop", "short_side", "none")
DEFAULT_QUALITY, DEFAULT_SHARD_SIZE = 95, 1000
_PROGRESS = ".pack"
_SKIPPED_SHOWN = 3


@dataclass(frozen=True)
class PackSettings:
    image_size: int | None
    resize: str
    quality: int
    shard_size: int

    def check(self) -> None:
        if self.resize not in PACK_RESIZES:
            raise GenrepError(f"--resize must be one of {', '.join(PACK_RESIZES)}, got {self.resize!r}")
        if self.resize == "none" and self.image_size is not None:
            raise GenrepError(f"--resize none keeps each image's size, so --image-size {self.image_size} would be "
                              f"ignored; use --resize center_crop or short_side with it, or drop --image-size")
        if self.resize != "none" and self.image_size is None:
            raise GenrepError(f"--resize {self.resize} needs --image-size N (the square side, or the short side)")
        if self.image_size is not None and not 2 <= self.image_size <= 4096:
            raise GenrepError(f"--image-size must be 2..4096 pixels, got {self.image_size}")
        if not 1 <= self.quality <= 100:
            raise GenrepError(f"--quality must be a JPEG quality 1..100, got {self.quality}")
        if not 1 <= self.shard_size <= 1_000_000:
            raise GenrepError(f"--shard-size must be 1..1000000 images, got {self.shard_size}")


# ----------------------------------------------------------------------------------------------- the source
@dataclass
class Source:
    name: str                                   # what the manifest records
    classes: list[str]
    items: dict[str, list[tuple[object, int]]]  # split -> [(a file path, or an image's index in loaded), label]
    fingerprint: str
    loaded: dict | None = None                  # split -> uint8 [N, C, H, W] of a registered set


def read_source(source: str, settings: PackSettings) -> Source:
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_source(path, settings)
    if path.exists():
        raise GenrepError(f"SOURCE {source} is a file; give a folder tree (train/<class>/*, val/<class>/* or "
                          f"<class>/*) or a registered data set name (see genrep datasets)")
    from .datasets import load_dataset
    from .torchvision_sets import _REGISTRY

    if source.strip().lower() not in _REGISTRY:
        raise GenrepError(f"SOURCE {source} is neither a folder nor a registered data set; give a folder tree "
                          f"(train/<class>/*, val/<class>/* or <class>/*) or one of {', '.join(_REGISTRY)}")
    loaded = {s: load_dataset(source, s, download=False) for s in SPLITS}
    digest = hashlib.sha256()
    for s in SPLITS:
        digest.update(loaded[s].images.numpy().tobytes())
        digest.update(loaded[s].labels.numpy().tobytes())
    items = {s: [(i, int(y)) for i, y in enumerate(loaded[s].labels.tolist())] for s in SPLITS}
    return Source(source.strip().lower(), loaded["train"].classes, items, digest.hexdigest(),
                  {s: loaded[s].images for s in SPLITS})


def _folder_source(root: Path, settings: PackSettings) -> Source:
    from .local_sets import _class_files, _image_extensions, folder_splits

    name = f"SOURCE {root}"
    exts = _image_extensions()
    for base in ([root / "train", *(root / d for d in ("val", "test") if (root / d).is_dir())]
                 if (root / "train").is_dir() else [root]):
        for cls, files in _class_files(base, exts).items():
            if not files:
                raise GenrepError(f"{name}: class folder {base / cls} has no images; remove it, or add its images")
        loose = [p.name for p in base.iterdir() if p.is_file() and p.suffix.lower() in exts]
        if loose:
            raise GenrepError(f"{name}: {base} holds images outside class folders (e.g. {loose[0]}); put each "
                              f"image under {base}/<class>/ (ImageNet's val/ must be sorted into class folders)")
    if (root / "train").is_dir() and not any((root / d).is_dir() for d in ("val", "test")):
        raise GenrepError(f"{name}: has train/ but no val/ or test/; add the held-out split beside it, or pack a "
                          f"folder of class sub-folders (split 80/20 per class)")
    classes, files_of, _ = folder_splits(root, name, test_dirs=("val", "test"))
    digest = hashlib.sha256()
    for s in SPLITS:
        for f, y in files_of[s]:
            st = f.stat()
            digest.update(f"{s}|{f.relative_to(root)}|{y}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return Source(str(root.resolve()), classes, dict(files_of), digest.hexdigest())


def check_headers(source: Source, settings: PackSettings, pool: ProcessPoolExecutor | None, progress: bool) -> int:
    """Every file's header read before any work (in ``pool``'s processes, or this one): an image larger than genrep
    decodes or one the centre crop cannot take is refused here; the channels of the set (1 if every image is grey)
    returned."""
    if source.loaded is not None:
        return int(source.loaded["train"].shape[1])
    files = [str(f) for s in SPLITS for f, _ in source.items[s]]
    chunks = [files[i:i + 2048] for i in range(0, len(files), 2048)]
    job = _HeaderJob(settings.image_size if settings.resize == "center_crop" else None)
    grey = True
    for refusal, all_grey in _bar(pool.map(job, chunks) if pool else map(job, chunks), len(chunks), "headers",
                                  progress):
        if refusal:
            raise GenrepError(refusal)
        grey = grey and all_grey
    return 1 if grey else 3


@dataclass(frozen=True)
class _HeaderJob:
    crop_size: int | None

    def __call__(self, files: list[str]) -> tuple[str | None, bool]:
        from PIL import Image

        grey = True
        for f in files:
            try:
                with warnings.catch_warnings(), Image.open(f) as im:
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    (w, h), mode = im.size, im.mode
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue   # unreadable: skipped (and counted) when its shard is packed
            if w * h > MAX_FOLDER_PIXELS:
                return (f"{f} is {w}x{h} pixels, more than genrep decodes ({MAX_FOLDER_PIXELS:,}); shrink it, or "
                        f"remove it from the source"), grey
            if self.crop_size is not None and (why := center_crop_refusal(w, h, self.crop_size)):
                return f"{f} {why}", grey
            grey = grey and mode in _GRAY_MODES
        return None, grey


# ----------------------------------------------------------------------------------------------- one shard
@dataclass(frozen=True)
class _ShardJob:
    """Packs one shard: decode, check, resize and re-encode (or keep) each image; the shard written atomically."""

    settings: PackSettings
    channels: int

    def __call__(self, task: tuple[str, list[tuple[object, int, str]]]) -> dict:
        out, items = task
        records, labels, skipped = [], [], []
        for ref, label, what in items:
            try:
                data = self.encode(ref)
            except (OSError, ValueError, SyntaxError) as e:
                skipped.append(f"{what}: {_one_line(e, 120)}")
                continue
            records.append(data)
            labels.append(label)
        path = Path(out)
        with writing(path, "a shard of the packed set") as partial:
            tmp = path.with_name(f".{path.name}.tmp")
            partial.append(tmp)
            write_shard(tmp, records, labels)
            os.replace(tmp, path)
        return {"count": len(records), "bytes": path.stat().st_size, "sha256": file_sha256(path),
                "labels": labels, "skipped": skipped}

    def encode(self, ref: object) -> bytes:
        """A file's bytes kept, or its (or a loaded set's uint8 [C, H, W] image's) pixels resized and encoded."""
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        if not isinstance(ref, str):
            x = ref.permute(1, 2, 0).numpy()
            image = Image.fromarray(np.ascontiguousarray(x[..., 0] if x.shape[2] == 1 else x))
            return self._jpeg(self._resized(image.convert(mode)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = Path(ref).read_bytes()
            with Image.open(io.BytesIO(raw)) as im:
                im.load()   # a truncated or damaged file fails here, not when training reads it
                if self.settings.resize == "none" and im.format == "JPEG":
                    return raw
                return self._jpeg(self._resized(im.convert(mode)))

    def _resized(self, image):
        from PIL import Image

        size, how = self.settings.image_size, self.settings.resize
        if how == "center_crop":
            return center_crop_pil(image, size)
        if how == "short_side":
            scale = size / min(image.size)
            return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                resample=Image.BICUBIC)
        return image

    def _jpeg(self, image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=self.settings.quality)
        return buf.getvalue()


# ----------------------------------------------------------------------------------------------- the command
def _is_pack_folder(out: Path) -> bool | None:
    """check_can_write's rule for OUT: a new or empty folder, or one genrep's pack wrote (to resume or check)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return True
    if out.is_dir() and ((out / _PROGRESS / "plan.json").is_file() or (out / MANIFEST).is_file()):
        return True
    raise GenrepError(f"OUT {out} exists and holds files genrep pack did not write; choose a new or empty folder")


def pack(source: str, out: Path, settings: PackSettings, *, workers: int | None = None, progress: bool = True,
         say: Callable[[str], None] = print) -> dict:
    """Pack ``source`` into ``out`` (see the module doc); the manifest is returned."""
    settings.check()
    out = Path(out)
    check_can_write(out, "packed folder OUT", decide=_is_pack_folder)
    src = read_source(source, settings)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    plan = {"format": FORMAT, "version": VERSION, "backend": BACKEND, "source": src.name,
            "source_fingerprint": src.fingerprint, "settings": settings.__dict__,
            "source_counts": {s: len(src.items[s]) for s in SPLITS}}
    if (out / MANIFEST).is_file():
        done = _read_json(out / MANIFEST, out)
        if {k: done.get(k) for k in plan} == plan:
            say(f"{out} is already packed from {src.name} with these settings; nothing to do")
            return done
        raise GenrepError(f"OUT {out} already holds a pack of another source or other settings; choose a new folder")
    progress_dir = out / _PROGRESS
    if (progress_dir / "plan.json").is_file():
        before = _read_json(progress_dir / "plan.json", out)
        if before != plan:
            raise GenrepError(f"OUT {out} holds an unfinished pack of another source or other settings; finish it "
                              f"with its own command, or choose a new folder")
    # one pool for the headers and the shards: each spawned process imports genrep (and torch) once, not twice
    with _pool(workers) as pool:
        channels = check_headers(src, settings, pool, progress)
        atomic_write_json(progress_dir / "plan.json", plan, "the pack's plan")
        _pack_shards(out, src, settings, channels, pool, workers, progress, say)
    return _finish(out, src, settings, plan, channels, say)


def _pack_shards(out: Path, src: Source, settings: PackSettings, channels: int, pool: ProcessPoolExecutor | None,
                 workers: int, progress: bool, say: Callable[[str], None]) -> None:
    """Every shard not yet packed (a resumed pack keeps those whose file has its recorded sha256), each one's
    record written after it."""
    progress_dir = out / _PROGRESS
    tasks, names = [], []
    for s in SPLITS:
        items = src.items[s]
        for k, i in enumerate(range(0, len(items), settings.shard_size)):
            name = f"{s}/{s}-{k:05d}{SHARD_SUFFIX}"
            record = progress_dir / f"{s}-{k:05d}.json"
            if record.is_file() and _still_valid(out / name, record):
                continue
            chunk = [(src.loaded[s][ref], y, f"image {ref} of {s}") if src.loaded is not None else
                     (str(ref), y, str(ref)) for ref, y in items[i:i + settings.shard_size]]
            tasks.append((str(out / name), chunk))
            names.append((name, record))
    for s in SPLITS:
        (out / s).mkdir(parents=True, exist_ok=True)
    job = _ShardJob(settings, channels)
    total, parallel = sum(len(t[1]) for t in tasks), pool is not None and len(tasks) > 1
    if total:
        used = workers if parallel else 1
        say(f"packing {total:,} images into {len(tasks)} shards with {used} process{'es' if used > 1 else ''}")
    results = pool.map(job, tasks) if parallel else map(job, tasks)
    for (name, record), result in _bar(zip(names, results), len(tasks), "shards", progress):
        atomic_write_json(record, {"file": name, **result}, "a shard's record")


def _read_json(path: Path, out: Path) -> dict:
    """A manifest or plan of OUT, read back to compare with this command's: one line where it is damaged."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GenrepError(f"OUT {out}: cannot read {path.relative_to(out)} ({_one_line(e, 120)}); pack into a new "
                          f"folder") from None
    if not isinstance(d, dict):
        raise GenrepError(f"OUT {out}: {path.relative_to(out)} is not a JSON object; pack into a new folder")
    return d


def _still_valid(shard: Path, record: Path) -> bool:
    try:
        r = json.loads(record.read_text())
        return shard.is_file() and shard.stat().st_size == r["bytes"] and file_sha256(shard) == r["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _finish(out: Path, src: Source, settings: PackSettings, plan: dict, channels: int,
            say: Callable[[str], None]) -> dict:
    splits, skipped_all = {}, []
    for s in SPLITS:
        shards, labels, skipped = [], [], []
        for record in sorted((out / _PROGRESS).glob(f"{s}-*.json")):
            r = json.loads(record.read_text())
            shards.append({"file": r["file"], "count": r["count"], "bytes": r["bytes"], "sha256": r["sha256"]})
            labels += r["labels"]
            skipped += r["skipped"]
        if not labels:
            raise GenrepError(f"SOURCE {src.name}: no image of the {s} split could be decoded ({len(skipped)} "
                              f"skipped, e.g. {skipped[0] if skipped else 'none'}); nothing was packed as a data set")
        buf = io.BytesIO()
        np.save(buf, np.asarray(labels, dtype=np.int64), allow_pickle=False)
        label_file = f"{s}/labels.npy"
        atomic_write_bytes(out / label_file, buf.getvalue(), "the packed labels")
        splits[s] = {"count": len(labels), "shards": shards, "skipped": skipped,
                     "labels": {"file": label_file, "sha256": file_sha256(out / label_file)}}
        skipped_all += skipped
    manifest = {**plan, "channels": channels, "classes": src.classes,
                "image_size": settings.image_size if settings.resize == "center_crop" else None, "splits": splits}
    atomic_write_json(out / MANIFEST, manifest, "the packed set's manifest")
    shutil.rmtree(out / _PROGRESS, ignore_errors=True)
    counts = ", ".join(f"{splits[s]['count']:,} {s}" for s in SPLITS)
    say(f"packed {counts} images of {len(src.classes)} classes into {out}; read it as --data.name packed:{out}")
    if skipped_all:
        shown = "; ".join(skipped_all[:_SKIPPED_SHOWN]) + ("; ..." if len(skipped_all) > _SKIPPED_SHOWN else "")
        say(f"skipped {len(skipped_all)} images that could not be decoded ({shown}); all are listed under 'skipped' "
            f"in {out / MANIFEST}")
    return manifest


def _pool(workers: int):
    import contextlib
    import multiprocessing

    if workers <= 1:
        return contextlib.nullcontext(None)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _bar(iterable, total: int, desc: str, progress: bool):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=desc.rstrip("s"), dynamic_ncols=True, disable=None)
