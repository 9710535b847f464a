"""The fine-grained transfer sets of the diffusion-features paper (table 5; figures 4, 5 and 7): ``aircraft``,
``cars``, ``cub``, ``dogs``, ``flowers`` and ``nabirds``, each read from its published files under
``<root>/<name>``. genrep never downloads them: torchvision's loaders find the files where it has one (FGVC
Aircraft, Stanford Cars, Flowers-102), the sets' own lists otherwise (CUB-200-2011 and NABirds share one layout;
Stanford Dogs has .mat lists). Each split is the one whose counts table 5 gives.

Labels follow what torchvision gives, or, for the list-only sets, the order of the class folders (the order
torchvision's ``ImageFolder`` gives them, as diffssl's loader reads a class-per-folder copy). Images are decoded
and resized as they are read (:func:`.file_sets.decode_files`), by default with guided-diffusion's centre crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GenrepError
from .file_sets import LabelledFiles

FGVC_SIZE = 256   # the paper's input size (guided-diffusion's 256x256 model): served at it unless image_size says


def _torchvision_files(ds) -> tuple[list[Path], list[int]]:
    # the set's own loader turned into the identity: each item is (the image's path, its label), nothing decoded
    items = [ds[i] for i in range(len(ds))]
    return [Path(p) for p, _ in items], [int(y) for _, y in items]


# ----------------------------------------------------------------------------------------------- FGVC Aircraft
AIRCRAFT_DIR = "fgvc-aircraft-2013b"
AIRCRAFT_URL = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"


def _aircraft_split(split: str) -> str:
    return "trainval" if split == "train" else "test"   # table 5: 6,667 = trainval (3,334 + 3,333)


def aircraft_files(split: str) -> list[str]:
    return [f"{AIRCRAFT_DIR}/data/variants.txt", f"{AIRCRAFT_DIR}/data/images_variant_{_aircraft_split(split)}.txt",
            f"{AIRCRAFT_DIR}/data/images/"]


def make_aircraft(folder: Path, split: str, download: bool) -> LabelledFiles:
    import torchvision.datasets as tvd

    ds = tvd.FGVCAircraft(str(folder), split=_aircraft_split(split), annotation_level="variant", loader=str)
    return LabelledFiles(*_torchvision_files(ds), list(ds.classes))


# ----------------------------------------------------------------------------------------------- Stanford Cars
CARS_DIR = "stanford_cars"


def cars_files(split: str) -> list[str]:
    if split == "train":
        return [f"{CARS_DIR}/devkit/cars_meta.mat", f"{CARS_DIR}/devkit/cars_train_annos.mat", f"{CARS_DIR}/cars_train/"]
    return [f"{CARS_DIR}/devkit/cars_meta.mat", f"{CARS_DIR}/cars_test_annos_withlabels.mat", f"{CARS_DIR}/cars_test/"]


def make_cars(folder: Path, split: str, download: bool) -> LabelledFiles:
    import torchvision.datasets as tvd

    ds = tvd.StanfordCars(str(folder), split=split, loader=str)
    return LabelledFiles(*_torchvision_files(ds), list(ds.classes))


# ----------------------------------------------------------------------------------------------- Flowers-102
FLOWERS_DIR = "flowers-102"
FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"


def flowers_files(split: str) -> list[str]:
    return [f"{FLOWERS_DIR}/imagelabels.mat", f"{FLOWERS_DIR}/setid.mat", f"{FLOWERS_DIR}/jpg/"]


def make_flowers(folder: Path, split: str, download: bool) -> LabelledFiles:
    import torchvision.datasets as tvd

    # table 5's 2,040 training images are the published train and val splits together (1,020 each)
    parts = [tvd.Flowers102(str(folder), split=s, loader=str) for s in (("train", "val") if split == "train"
                                                                          else ("test",))]
    paths, labels = [], []
    for ds in parts:
        p, y = _torchvision_files(ds)
        paths, labels = paths + p, labels + y
    return LabelledFiles(paths, labels, list(tvd.Flowers102.classes))


# ----------------------------------------------------------------------------------------------- CUB and NABirds
CUB_DIR = "CUB_200_2011"
CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
NABIRDS_DIR = "nabirds"
NABIRDS_URL = "https://dl.allaboutbirds.org/nabirds"
_LISTS = ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt")


def _listed_files(base: str) -> list[str]:
    return [f"{base}/{f}" for f in _LISTS] + [f"{base}/images/"]


def cub_files(split: str) -> list[str]:
    return _listed_files(CUB_DIR)


def nabirds_files(split: str) -> list[str]:
    return _listed_files(NABIRDS_DIR)


def _table(path: Path, what: str) -> dict[str, str]:
    """'<id> <value>' lines (the value may hold spaces: a class name) -> {id: value}."""
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        key, _, value = line.strip().partition(" ")
        if not key:
            continue
        if not value.strip():
            raise GenrepError(f"{what}: line {n} of {path} is not '<id> <value>' ({line[:80]!r}); the file is "
                              f"damaged: unpack the set's archive again")
        out[key] = value.strip()
    return out


def _class_id(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise GenrepError(f"{what}: {path} gives class {value[:40]!r}, not a class number; the file is damaged: "
                          f"unpack the set's archive again") from None


def _read_listed(base: Path, split: str, what: str) -> LabelledFiles:
    """CUB-200-2011's layout, which NABirds shares: images.txt (id, path under images/), train_test_split.txt (id,
    1 = train), image_class_labels.txt (id, class number), classes.txt (class number, name). The classes are the
    numbers images use, in numeric order: CUB's 1..200, and NABirds' 555 species among its 1,011 classes.txt entries
    (the others are the taxonomy's inner nodes, which label no image)."""
    images, is_train, labels, names = (_table(base / f, what) for f in _LISTS)
    wanted = "1" if split == "train" else "0"
    used = sorted({_class_id(c, base / "image_class_labels.txt", what) for c in labels.values()})
    unnamed = [c for c in used if str(c) not in names]
    if unnamed:
        raise GenrepError(f"{what}: class {unnamed[0]} of {base / 'image_class_labels.txt'} is not in "
                          f"{base / 'classes.txt'}; the lists do not belong together: unpack the set's archive again")
    index = {c: i for i, c in enumerate(used)}
    paths, ys = [], []
    for image_id, rel in images.items():
        if image_id not in is_train or image_id not in labels:
            lacking = "train_test_split.txt" if image_id not in is_train else "image_class_labels.txt"
            raise GenrepError(f"{what}: image {image_id} of {base / 'images.txt'} is not in {base / lacking}; the "
                              f"lists do not belong together: unpack the set's archive again")
        if is_train[image_id] == wanted:
            paths.append(base / "images" / rel)
            ys.append(index[int(labels[image_id])])
    return LabelledFiles(paths, ys, [names[str(c)] for c in used])


def make_cub(folder: Path, split: str, download: bool) -> LabelledFiles:
    return _read_listed(folder / CUB_DIR, split, "cub")


def make_nabirds(folder: Path, split: str, download: bool) -> LabelledFiles:
    return _read_listed(folder / NABIRDS_DIR, split, "nabirds")


# ----------------------------------------------------------------------------------------------- Stanford Dogs
DOGS_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"


def dogs_files(split: str) -> list[str]:
    return [f"{split}_list.mat", "Images/"]


def make_dogs(folder: Path, split: str, download: bool) -> LabelledFiles:
    """lists.tar's ``<split>_list.mat``: ``file_list`` (paths under Images/, '<wnid>-<breed>/<file>.jpg') and
    ``labels`` 1..120, numbered in the order of the breed folders, which is checked file by file."""
    from scipy.io import loadmat

    path = folder / f"{split}_list.mat"
    lists = loadmat(str(path))
    if not {"file_list", "labels"} <= set(lists):
        raise GenrepError(f"dogs: {path} holds no 'file_list' and 'labels'; it is not Stanford Dogs' list: unpack "
                          f"lists.tar from {DOGS_URL} again")
    files = [str(np.asarray(c).reshape(-1)[0]) for c in np.asarray(lists["file_list"]).reshape(-1)]
    y = np.asarray(lists["labels"]).reshape(-1)
    classes = sorted(d.name for d in (folder / "Images").iterdir() if d.is_dir())
    if len(y) != len(files) or not np.all(np.isin(y, np.arange(1, len(classes) + 1))):
        raise GenrepError(f"dogs: {path} must give one label 1..{len(classes)} (one per breed folder of "
                          f"{folder / 'Images'}) for each of its {len(files)} files; unpack images.tar and lists.tar "
                          f"from {DOGS_URL} again")
    labels = [int(v) - 1 for v in y]
    for f, label in zip(files, labels):
        if f.split("/")[0] != classes[label]:
            raise GenrepError(f"dogs: {path} labels {f} as {label + 1}, but breed folder {label + 1} of "
                              f"{folder / 'Images'} is {classes[label]}; unpack images.tar and lists.tar from "
                              f"{DOGS_URL} again")
    return LabelledFiles([folder / "Images" / f for f in files], labels, classes)
