"""genrep.data.datasets: the registry, digits and the torchvision sets (the npz and folder forms are in
test_local_sets.py; celeba, tinyimagenet and imagenet32 in test_file_sets.py).

The torchvision sets are exercised for real on tiny files written in their exact on-disk formats;
nothing here touches the network or the user's cache.
"""

from __future__ import annotations

import collections
import os
import pickle
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, rng_images

from genrep.data.datasets import (
    ImageSet,
    dataset_names,
    default_data_root,
    describe_datasets,
    load_dataset,
    registered_spec,
)
from genrep.errors import GenrepError


# ----------------------------------------------------------------------------------------------- digits
def test_digits_shapes_dtype_classes():
    tr, te = load_dataset("digits"), load_dataset("digits", "test")
    assert (len(tr), len(te)) == (1437, 360)
    for d in (tr, te):
        assert isinstance(d, ImageSet) and d.name == "digits"
        assert d.images.dtype == torch.uint8 and d.images.shape[1:] == (1, 16, 16)
        assert d.labels.dtype == torch.int64 and d.labels.shape == (len(d),)
        assert d.classes == [str(i) for i in range(10)] and d.num_classes == 10
        assert d.channels == 1 and d.image_size == 16 and d.image_shape == (16, 16)
        assert d.images.device.type == "cpu" and d.images.is_contiguous()
        assert int(d.images.max()) == 255 and int(d.images.min()) == 0
        assert set(d.labels.tolist()) == set(range(10))
    assert "digits" in repr(tr) and "1437" in repr(tr)


def test_digits_split_is_fixed_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    a, b = load_dataset("digits", image_size=8), load_dataset("digits", image_size=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    te = load_dataset("digits", "test", image_size=8)
    # native size = sklearn's values scaled 0..16 -> 0..255; train + test is exactly the full set
    d = load_digits()
    full = np.rint(d.images * 255 / 16).astype(np.uint8)
    key = lambda img, y: (img.tobytes(), int(y))
    whole = collections.Counter(key(x, y) for x, y in zip(full, d.target))
    parts = collections.Counter(key(x[0].numpy(), y) for s in (a, te) for x, y in zip(s.images, s.labels))
    assert parts == whole
    # stratified: every class has 20 % (rounded) of its images in test
    total = np.bincount(d.target, minlength=10)
    in_test = np.bincount(te.labels.numpy(), minlength=10)
    assert np.all(np.abs(in_test - 0.2 * total) <= 1)


def test_digits_image_size_option():
    up = load_dataset("digits", "test", image_size=32)
    down = load_dataset("digits", "test", image_size=4)
    native = load_dataset("digits", "test", image_size=8)
    assert up.images.shape == (360, 1, 32, 32) and up.image_size == 32
    assert down.images.shape == (360, 1, 4, 4)
    assert up.images.dtype == down.images.dtype == torch.uint8
    # bilinear resizing keeps the mean brightness (within a few levels: the border weights renormalise)
    m = native.images.float().mean()
    assert abs(up.images.float().mean() - m) < 1 and abs(down.images.float().mean() - m) < 4
    assert torch.equal(native.labels, up.labels)


def _spec(images):
    return images.image_size, images.channels, images.num_classes


def test_registered_spec_is_what_loading_gives_without_loading():
    """A frozen part's data shape is read from the registry (runs.load_frozen_run), not from its images."""
    for size in (None, 8, 12):
        assert registered_spec("digits", size) == _spec(load_dataset("digits", "test", image_size=size))
    assert registered_spec(" CIFAR10 ", None) == (32, 3, 10) and registered_spec("stl10", 32) == (32, 3, 10)
    assert registered_spec("celeba", None) is None and registered_spec("celeba", 64) == (64, 3, 1)
    assert registered_spec("npz:/x.npz", None) is None and registered_spec("nope", 8) is None


def test_bad_split_and_image_size():
    with pytest.raises(GenrepError, match="split") as e:
        load_dataset("digits", "val")
    one_line(e)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(GenrepError, match="image_size"):
            load_dataset("digits", image_size=bad)


# ----------------------------------------------------------------------------------------------- names
def test_unknown_name_lists_valid_names_and_forms():
    with pytest.raises(GenrepError) as e:
        load_dataset("cifar-ten")
    msg = one_line(e)
    for n in ("digits", "mnist", "cifar10", "cifar100", "svhn", "stl10", "celeba", "tinyimagenet", "imagenet32",
              "npz:PATH", "folder:PATH"):
        assert n in msg
    assert load_dataset("DIGITS", "test").name == "digits"   # names are case-insensitive


def test_dataset_names_and_describe(tmp_path, monkeypatch):
    names = dataset_names()
    registered = ["digits", "mnist", "cifar10", "cifar100", "svhn", "stl10", "celeba", "tinyimagenet", "imagenet32",
                  "aircraft", "cars", "cub", "dogs", "flowers", "nabirds"]
    assert names == registered + ["npz:PATH", "folder:PATH", "packed:PATH"]
    rows = {r["name"]: r for r in describe_datasets(tmp_path)}
    assert list(rows) == registered
    for r in rows.values():
        keys = {"name", "description", "splits", "native_size", "size", "channels", "available", "where"}
        assert keys <= set(r)
        assert r["splits"] == ["train", "test"]
    assert rows["digits"]["available"] is True and rows["digits"]["native_size"] == 8
    assert rows["cifar10"]["available"] is False and rows["cifar10"]["where"] == str(tmp_path / "cifar10")
    assert "cifar-10-batches-py/data_batch_1" in rows["cifar10"]["files"]
    assert rows["cifar10"]["size"] == "32x32"
    assert rows["stl10"]["native_size"] == 96 and rows["cifar100"]["channels"] == 3
    _write_mnist(tmp_path / "mnist", rng_images(3, 1, 28, 28)[:, 0], np.arange(3),
                 rng_images(2, 1, 28, 28)[:, 0], np.arange(2))
    assert {r["name"]: r for r in describe_datasets(tmp_path)}["mnist"]["available"] is True
    # default root: $GENREP_DATA, else ~/.cache/genrep/data
    monkeypatch.setenv("GENREP_DATA", str(tmp_path / "elsewhere"))
    assert default_data_root() == tmp_path / "elsewhere"
    assert describe_datasets()[1]["where"] == str(tmp_path / "elsewhere" / "mnist")
    monkeypatch.delenv("GENREP_DATA")
    assert default_data_root() == Path.home() / ".cache" / "genrep" / "data"


def test_imageset_non_square_image_size_is_a_clear_error():
    s = ImageSet(torch.zeros(2, 3, 4, 6, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ["a"], "x")
    assert s.image_shape == (4, 6) and len(s) == 2 and s.channels == 3
    with pytest.raises(GenrepError, match="image_size") as e:
        _ = s.image_size
    one_line(e)
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), ["a"], "x")


# ----------------------------------------------------------------------------------------------- torchvision
def _idx(arr: np.ndarray) -> bytes:
    """The big-endian idx format of the MNIST raw files (uint8 payload)."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, xtr, ytr, xte, yte):
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, arr in (("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                      ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", yte)):
        (raw / name).write_bytes(_idx(np.asarray(arr)))


def test_torchvision_mnist_from_raw_files(tmp_path):
    xtr, xte = rng_images(5, 1, 28, 28, 1)[:, 0], rng_images(3, 1, 28, 28, 2)[:, 0]
    ytr, yte = np.array([3, 1, 4, 1, 5]), np.array([9, 2, 6])
    _write_mnist(tmp_path / "mnist", xtr, ytr, xte, yte)
    tr = load_dataset("mnist", root=tmp_path, download=False)
    te = load_dataset("mnist", "test", root=str(tmp_path), download=False)
    assert tr.name == "mnist" and tr.images.shape == (5, 1, 28, 28) and tr.images.dtype == torch.uint8
    assert torch.equal(tr.images[:, 0], torch.from_numpy(xtr)) and tr.labels.tolist() == ytr.tolist()
    assert torch.equal(te.images[:, 0], torch.from_numpy(xte)) and te.labels.dtype == torch.int64
    assert tr.num_classes == 10
    assert load_dataset("mnist", root=tmp_path, download=False, image_size=32).images.shape == (5, 1, 32, 32)
    assert registered_spec("mnist", None) == _spec(tr)


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks the md5 of the real CIFAR/SVHN/STL-10 files; tiny fakes must pass on presence."""
    from torchvision.datasets import cifar, stl10, svhn

    for mod in (cifar, svhn, stl10):
        monkeypatch.setattr(mod, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _pickle(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_torchvision_cifar10_from_python_batches(tmp_path, no_md5):
    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    xs = [rng_images(2, 3, 32, 32, seed=i) for i in range(6)]
    ys = [[i % 10, (i + 3) % 10] for i in range(6)]
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        _pickle(base / name, {"data": xs[i].reshape(2, -1), "labels": ys[i]})   # rows are CHW-flattened
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(base / "batches.meta", {"label_names": names})
    tr = load_dataset("cifar10", root=tmp_path, download=False)
    te = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert tr.images.shape == (10, 3, 32, 32)
    assert torch.equal(tr.images, torch.from_numpy(np.concatenate(xs[:5])))
    assert tr.labels.tolist() == [y for part in ys[:5] for y in part] and tr.classes == names
    assert torch.equal(te.images, torch.from_numpy(xs[5])) and te.labels.tolist() == ys[5]
    assert registered_spec("cifar10", None) == _spec(tr)


def test_torchvision_cifar100_fine_labels(tmp_path, no_md5):
    base = tmp_path / "cifar100" / "cifar-100-python"
    x = rng_images(3, 3, 32, 32)
    for name in ("train", "test"):
        _pickle(base / name, {"data": x.reshape(3, -1), "fine_labels": [0, 99, 42],
                              "coarse_labels": [0, 1, 2]})
    _pickle(base / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    tr = load_dataset("cifar100", root=tmp_path, download=False, image_size=16)
    assert tr.images.shape == (3, 3, 16, 16) and tr.labels.tolist() == [0, 99, 42] and tr.num_classes == 100
    assert registered_spec("cifar100", 16) == _spec(tr)


def test_torchvision_svhn_from_mat(tmp_path, no_md5):
    from scipy.io import savemat

    x = rng_images(4, 3, 32, 32)
    (tmp_path / "svhn").mkdir()
    # the .mat holds X as [H, W, C, N] and labels 1..10, 10 meaning the digit 0
    savemat(tmp_path / "svhn" / "test_32x32.mat",
            {"X": x.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [5], [9]])})
    te = load_dataset("svhn", "test", root=tmp_path, download=False)
    assert torch.equal(te.images, torch.from_numpy(x)) and te.labels.tolist() == [0, 1, 5, 9]
    with pytest.raises(GenrepError, match="train_32x32.mat"):   # only the test file is there
        load_dataset("svhn", "train", root=tmp_path, download=False)


def test_torchvision_stl10_from_binaries(tmp_path, no_md5):
    base = tmp_path / "stl10" / "stl10_binary"
    base.mkdir(parents=True)
    x = rng_images(2, 3, 96, 96)
    for split in ("train", "test"):
        (base / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())   # column-major images
        (base / f"{split}_y.bin").write_bytes(bytes([1, 10]))                      # labels 1..10
    (base / "unlabeled_X.bin").write_bytes(b"")
    tr = load_dataset("stl10", root=tmp_path, download=False)
    assert torch.equal(tr.images, torch.from_numpy(x)) and tr.labels.tolist() == [0, 9]
    assert tr.classes[0] == "airplane" and tr.num_classes == 10 and tr.image_size == 96
    assert registered_spec("stl10", None) == _spec(tr)


def test_torchvision_corrupted_files_are_a_clear_error(tmp_path, no_md5):
    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch", "batches.meta"]:
        (base / name).write_bytes(b"truncated")
    with pytest.raises(GenrepError, match="corrupted") as e:
        load_dataset("cifar10", root=tmp_path, download=False)
    assert str(tmp_path / "cifar10") in one_line(e)


def test_offline_missing_files_error_names_folder_and_files(tmp_path):
    with pytest.raises(GenrepError) as e:
        load_dataset("cifar10", root=tmp_path, download=False)
    msg = one_line(e)
    assert str(tmp_path / "cifar10") in msg and "data_batch_1" in msg and "npz:PATH" in msg


def test_failed_download_is_fast_and_one_line(tmp_path, monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    t = time.perf_counter()
    with pytest.raises(GenrepError, match="download") as e:
        load_dataset("mnist", root=tmp_path, download=True)
    assert time.perf_counter() - t < 10 and calls
    msg = one_line(e)
    assert str(tmp_path / "mnist") in msg and "train-images-idx3-ubyte" in msg


def test_train_images_takes_an_equal_share_of_each_class_in_the_splits_order():
    from genrep.config import resolve_config
    from genrep.runs import load_split, load_splits

    whole = load_split(resolve_config("supervised-digits", {}), "train")
    cfg = resolve_config("supervised-digits", {"data.train_images": 25})
    head, test = load_splits(cfg)
    counts = collections.Counter(head.labels.tolist())
    assert len(head.labels) == 25 and sorted(counts.values()) == [2] * 5 + [3] * 5   # 25 over 10 classes
    assert all(counts[c] == 3 for c in range(5))                                   # the first classes take one more
    idx = [int(((whole.images == x).flatten(1).all(1)).nonzero()[0]) for x in head.images]
    assert idx == sorted(idx)                                                      # in the split's order
    assert len(test.labels) == len(load_split(resolve_config("supervised-digits", {}), "test").labels)  # test whole
    assert len(load_split(resolve_config("supervised-digits", {"data.train_images": 10**6}), "train").labels) == len(
        whole.labels)
    with pytest.raises(GenrepError) as e:
        load_split(resolve_config("supervised-digits", {"data.train_images": 9}), "train")
    assert "data.train_images 9 is below the 10 classes of digits; give at least 10" in one_line(e)
    with pytest.raises(GenrepError) as e:
        resolve_config("supervised-digits", {"data.train_images": 0})
    assert "data.train_images" in one_line(e)
