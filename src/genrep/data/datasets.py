"""Image data sets by name: one uint8 tensor of images and one int64 tensor of labels per split.

Names (see ``docs/data.md``):

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images), always available offline. A fixed
  stratified split: 20 % test, ``sklearn.model_selection.train_test_split(random_state=0)``
  (1,437 train / 360 test). Served at 16x16 unless ``image_size`` says otherwise.
- ``mnist``, ``cifar10``, ``cifar100``, ``svhn``, ``stl10``: torchvision data sets kept under
  ``<root>/<name>`` (``root`` defaults to :func:`default_data_root`), downloaded on first use when
  ``download`` is true. STL-10 gives its labelled train/test splits.
- ``celeba`` (torchvision's CelebA: the aligned 178x218 faces, one class), ``tinyimagenet`` (its folder
  layout; val is the test split) and ``imagenet32`` (the published npz batches; val is the test split, never
  downloaded: it needs an ImageNet account), kept under ``<root>/<name>`` too.
- ``aircraft``, ``cars``, ``cub``, ``dogs``, ``flowers``, ``nabirds``: the diffusion-features paper's
  fine-grained transfer sets (its table 5 splits) from their published files under ``<root>/<name>``, never
  downloaded; served centre-cropped at 256 unless ``image_size`` / ``resize`` say otherwise.
- ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test`` (+ optional ``classes``), or the
  JPEG-bytes layout ``train_jpeg, train_offsets, y_train, test_jpeg, test_offsets, y_test``.
- ``folder:PATH``: ``PATH/<class>/<image>``, or ``PATH/train/<class>/...`` and ``PATH/test/...``;
  without train/ and test/ a seeded stratified 80/20 split per class.
- ``packed:PATH``: a folder ``genrep pack`` wrote (:mod:`genrep.data.packed`): read image by image, never whole.

Everything the user can get wrong is a one-line :class:`GenrepError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GenrepError
from .imageset import SPLITS, ImageSet, _finish, _resize
from .local_sets import _load_folder, _load_npz
from .packed import load_packed, parse_packed_name
from .resize import CENTER_CROP, RESIZES, SQUASH
from .torchvision_sets import _REGISTRY, _load_digits, _load_torchvision, _missing

__all__ = ["ImageSet", "dataset_names", "default_data_root", "describe_datasets", "load_dataset", "registered_spec"]

_FORMS = ("npz:PATH", "folder:PATH", "packed:PATH")


# ----------------------------------------------------------------------------------------------- public API
def default_data_root() -> Path:
    """``$GENREP_DATA`` if set, else ``~/.cache/genrep/data``."""
    env = os.environ.get("GENREP_DATA", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "genrep" / "data"


def dataset_names() -> list[str]:
    """Registered names, then the two path forms ``npz:PATH`` and ``folder:PATH``."""
    return list(_REGISTRY) + list(_FORMS)


def _valid_names_text() -> str:
    return f"{', '.join(_REGISTRY)}, npz:PATH (x_train/y_train/x_test/y_test arrays or the JPEG layout) or " \
           f"folder:PATH (one sub-folder per class) or packed:PATH (a folder genrep pack wrote)"


def load_dataset(name: str, split: str = "train", *, image_size: int | None = None,
                 root: str | os.PathLike | None = None, download: bool = True, resize: str | None = None) -> ImageSet:
    """Load one split of a data set as uint8 [N, C, H, W] images and int64 labels on the CPU.

    ``image_size`` resizes to ``image_size x image_size``; ``None`` keeps the native size (digits: 16, the
    fine-grained sets: 256). ``resize`` says how (:mod:`genrep.data.resize`): ``squash`` (the whole image,
    bilinear, antialiased when shrinking) or ``center_crop`` (guided-diffusion's); ``None``: the set's own, which
    is ``squash`` for every set but the fine-grained ones. ``root`` is the cache folder of the torchvision sets
    (default :func:`default_data_root`); ``download`` lets them be fetched when missing.
    """
    if not isinstance(name, str) or not name.strip():
        raise GenrepError(f"data set name must be a non-empty string, got {name!r}; valid: "
                          f"{_valid_names_text()}")
    if split not in SPLITS:
        raise GenrepError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise GenrepError(f"image_size must be a positive integer or None (native size), got {image_size!r}")
    if resize is not None and resize not in RESIZES:
        raise GenrepError(f"resize must be one of {', '.join(RESIZES)} or None (the data set's own), got {resize!r}")
    text = name.strip()
    kind, sep, rest = text.partition(":")
    how = resize or default_resize(text)
    if sep and kind.lower() == "npz":
        images, labels, classes, full = _load_npz(rest.strip(), split, image_size, how)
        return _finish(images, labels, classes, full, split)
    if sep and kind.lower() == "packed":
        return load_packed(parse_packed_name(text), split, image_size, how)
    if sep and kind.lower() == "folder":
        images, labels, classes, full = _load_folder(rest.strip(), split, image_size, how)
        return _finish(images, labels, classes, full, split)
    reg = _REGISTRY.get(text.lower())
    if reg is None:
        import difflib

        close = difflib.get_close_matches(text.lower(), list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise GenrepError(f"unknown data set {text!r}; {hint}valid: {_valid_names_text()}")
    size = image_size if image_size is not None else reg.default_size
    if reg.name == "digits":
        images, labels, classes = _load_digits(split)
    else:
        data_root = Path(root).expanduser() if root is not None else default_data_root()
        images, labels, classes = _load_torchvision(reg, split, data_root, download, size, how)
    return _finish(_resize(images, size, how, f"{reg.name} ({split})"), labels, classes, reg.name, split)


def default_resize(name: str) -> str:
    """How data set ``name`` reaches ``data.image_size`` when ``data.resize`` is not given: a packed set's centre
    crop, a registered set's own rule, else the whole image squashed."""
    kind, sep, _ = name.strip().partition(":")
    if sep and kind.lower() == "packed":
        return CENTER_CROP
    reg = _REGISTRY.get(name.strip().lower())
    return reg.resize if reg is not None else SQUASH


def registered_spec(name: str, image_size: int | None) -> tuple[int, int, int] | None:
    """(size, channels, classes) of registered data set ``name`` served at ``image_size``, as
    :func:`load_dataset` would give it, known without reading an image; None for the path forms, an unknown
    name, or a non-square native size."""
    reg = _REGISTRY.get(name.strip().lower()) if isinstance(name, str) else None
    if reg is None:
        return None
    size = image_size if image_size is not None else reg.default_size
    if size is None and reg.native_width not in (None, reg.native_size):
        return None
    return size or reg.native_size, reg.channels, reg.num_classes


def check_splits(train: ImageSet, test: ImageSet) -> None:
    """What training needs of both splits, checked when a run starts rather than found by the first probe: a
    test split with images, of the train split's shape, labelled within its classes."""
    if train.images.shape[1:] != test.images.shape[1:]:
        c1, s1, c2, s2 = train.channels, train.image_size, test.channels, test.image_size
        raise GenrepError(f"{train.name}: the train split has {c1}-channel {s1}x{s1} images but the test split "
                          f"{c2}-channel {s2}x{s2}; both splits must have the same channels and size")
    if len(test.labels) and int(test.labels.max()) >= train.num_classes:
        raise GenrepError(f"{test.name}: the test split has label {int(test.labels.max())} but the train split "
                          f"declares {train.num_classes} classes; labels must be 0..{train.num_classes - 1}")


def describe_datasets(root: str | os.PathLike | None = None) -> list[dict]:
    """One dict per registered data set, for ``genrep datasets``: ``name``, ``description``, ``splits``,
    ``native_size`` (int: the height), ``size`` (HxW, e.g. "32x32"), ``channels``, ``num_classes``, ``available``
    (usable offline right now: embedded, or every file present under ``where``; presence only, no
    checksum), ``where`` (the folder it looks in) and ``files`` (what it looks for there). The
    ``npz:PATH`` / ``folder:PATH`` forms read the user's own files and are not listed. ``native_size`` is None
    (``size`` "varies") for the sets of photographs of many sizes."""
    data_root = Path(root).expanduser() if root is not None else default_data_root()
    rows = []
    for reg in _REGISTRY.values():
        size = "varies" if reg.native_size is None else f"{reg.native_size}x{reg.native_width or reg.native_size}"
        row = {"name": reg.name, "description": reg.description, "splits": list(SPLITS),
               "native_size": reg.native_size, "size": size, "channels": reg.channels,
               "num_classes": reg.num_classes}
        if reg.files is None:
            row.update(available=True, where="embedded (scikit-learn)", files=[])
        else:
            folder = data_root / reg.name
            files = sorted({f for s in SPLITS for f in reg.files(s)})
            row.update(available=not _missing(folder, files), where=str(folder), files=files)
        rows.append(row)
    return rows
