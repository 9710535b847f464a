"""genrep.data.datasets: the registry, digits, npz (array and JPEG layouts), folder, torchvision sets.

The torchvision sets are exercised for real on tiny files written in their exact on-disk formats;
nothing here touches the network or the user's cache, and nothing depends on /work/shared/data
(the tests that read the real copies there are skipped when they are absent).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import genrep.data.datasets as datasets_module
from genrep.data.datasets import (
    ImageSet,
    dataset_names,
    default_data_root,
    describe_datasets,
    load_dataset,
)
from genrep.errors import GenrepError

SHARED_CIFAR = Path("/work/shared/data/cifar10-jpeg.npz")
SHARED_MNIST = Path("/work/shared/data/mnist.npz")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def rng_images(n, c, h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


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
    for n in ("digits", "mnist", "cifar10", "cifar100", "svhn", "stl10", "npz:PATH", "folder:PATH"):
        assert n in msg
    assert load_dataset("DIGITS", "test").name == "digits"   # names are case-insensitive


def test_dataset_names_and_describe(tmp_path, monkeypatch):
    names = dataset_names()
    assert names[:6] == ["digits", "mnist", "cifar10", "cifar100", "svhn", "stl10"]
    assert "npz:PATH" in names and "folder:PATH" in names
    rows = {r["name"]: r for r in describe_datasets(tmp_path)}
    assert list(rows) == names[:6]
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


# ----------------------------------------------------------------------------------------------- npz arrays
LAYOUTS = {
    "NHW": lambda x: x[:, 0],
    "NHWC-gray": lambda x: x.transpose(0, 2, 3, 1),
    "NHWC": lambda x: x.transpose(0, 2, 3, 1),
    "NCHW": lambda x: x,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_npz_array_layouts(tmp_path, layout):
    c = 1 if layout in ("NHW", "NHWC-gray") else 3
    xtr, xte = rng_images(7, c, 10, 10, 1), rng_images(4, c, 10, 10, 2)
    ytr, yte = np.array([0, 1, 2, 0, 1, 2, 0]), np.array([2, 1, 0, 2])
    p = tmp_path / f"{layout}.npz"
    np.savez(p, x_train=LAYOUTS[layout](xtr), y_train=ytr, x_test=LAYOUTS[layout](xte), y_test=yte,
             classes=np.array(["cat", "dog", "emu"]))
    tr, te = load_dataset(f"npz:{p}"), load_dataset(f"npz:{p}", "test")
    assert torch.equal(tr.images, torch.from_numpy(xtr)) and torch.equal(te.images, torch.from_numpy(xte))
    assert tr.labels.tolist() == ytr.tolist() and te.labels.dtype == torch.int64
    assert tr.classes == ["cat", "dog", "emu"] and tr.channels == c and tr.image_size == 10
    assert tr.name == f"npz:{p}"
    big = load_dataset(f"npz:{p}", image_size=16)
    assert big.images.shape == (7, c, 16, 16) and big.images.dtype == torch.uint8


def test_downsizing_is_antialiased(tmp_path):
    checker = ((np.indices((12, 12)).sum(0) % 2) * 255).astype(np.uint8)[None].repeat(2, 0)
    np.savez(tmp_path / "c.npz", x_train=checker, y_train=[0, 0], x_test=checker, y_test=[0, 0])
    small = load_dataset(f"npz:{tmp_path / 'c.npz'}", image_size=4).images.float()
    assert small.shape == (2, 1, 4, 4)
    # point-sampling a 3x shrink would give pure 0/255; the antialiased filter gives mid greys
    assert small.min() > 60 and small.max() < 195


def test_npz_without_classes_counts_labels_of_both_splits(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, x_train=rng_images(3, 1, 5, 5)[:, 0], y_train=np.array([0, 1, 1]),
             x_test=rng_images(2, 1, 5, 5)[:, 0], y_test=np.array([[4], [0]]))   # (N, 1) labels are fine
    assert load_dataset(f"npz:{p}").classes == ["0", "1", "2", "3", "4"]
    assert load_dataset(f"npz:{p}", "test").labels.tolist() == [4, 0]


def test_npz_errors_are_one_line(tmp_path):
    def err(name, split="train", match=None):
        with pytest.raises(GenrepError, match=match) as e:
            load_dataset(name, split)
        return one_line(e)

    assert str(tmp_path / "nope.npz") in err(f"npz:{tmp_path / 'nope.npz'}", match="no such file")
    x, y = rng_images(4, 1, 6, 6)[:, 0], np.arange(4) % 2
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y)
    assert "x_test" in err(f"npz:{tmp_path / 'a.npz'}", "test", match="lacks")
    np.savez(tmp_path / "b.npz", x_train=x, y_train=y[:3], x_test=x, y_test=y)
    err(f"npz:{tmp_path / 'b.npz'}", match="3 labels for 4 images")
    np.savez(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    err(f"npz:{tmp_path / 'c.npz'}", "test", match="empty")
    np.savez(tmp_path / "d.npz", x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y)
    err(f"npz:{tmp_path / 'd.npz'}", match="uint8")
    np.savez(tmp_path / "e.npz", x_train=np.zeros((4, 5, 6, 6), np.uint8), y_train=y, x_test=x, y_test=y)
    err(f"npz:{tmp_path / 'e.npz'}", match="shape")
    np.savez(tmp_path / "f.npz", x_train=x, y_train=y + 5, x_test=x, y_test=y, classes=np.array(["a", "b"]))
    err(f"npz:{tmp_path / 'f.npz'}", match="classes")
    (tmp_path / "g.npz").write_bytes(b"not a zip file")
    err(f"npz:{tmp_path / 'g.npz'}", match="cannot read")


# ----------------------------------------------------------------------------------------------- npz JPEG
def _encode(img_chw: np.ndarray, fmt: str = "JPEG") -> bytes:
    arr = img_chw[0] if img_chw.shape[0] == 1 else img_chw.transpose(1, 2, 0)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format=fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
    return out.getvalue()


def _smooth_images(n, c, size, seed):
    """Smooth images (JPEG-friendly), so the decoded copies stay close to the originals."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = [np.stack([127 + 100 * np.sin(2 * np.pi * (g.uniform(0.5, 2) * xx + g.uniform(0.5, 2) * yy
                                                        + g.uniform()))
                      for _ in range(c)]) for _ in range(n)]
    return np.rint(np.stack(imgs)).astype(np.uint8)


def _write_jpeg_npz(path, splits: dict, fmt="JPEG", classes=("a", "b", "c")):
    arrays = {}
    for split, (x, y) in splits.items():
        blobs = [_encode(img, fmt) for img in x]
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"y_{split}"] = np.asarray(y, dtype=np.int64)
    np.savez(path, classes=np.array(classes), **arrays)
    return arrays


@pytest.mark.parametrize("decoder", ["torchvision", "pillow"])
@pytest.mark.parametrize("channels", [3, 1])
def test_npz_jpeg_layout(tmp_path, monkeypatch, channels, decoder):
    if decoder == "pillow":   # torchvision.io's decoder is deprecated; the Pillow path must work alone
        monkeypatch.setattr(datasets_module, "_torchvision_decode_jpeg", lambda: None)
    xtr, xte = _smooth_images(9, channels, 16, 0), _smooth_images(5, channels, 16, 1)
    ytr, yte = np.arange(9) % 3, np.arange(5) % 3
    arrays = _write_jpeg_npz(tmp_path / "j.npz", {"train": (xtr, ytr), "test": (xte, yte)})
    tr, te = load_dataset(f"npz:{tmp_path / 'j.npz'}"), load_dataset(f"npz:{tmp_path / 'j.npz'}", "test")
    assert tr.images.shape == (9, channels, 16, 16) and te.images.shape == (5, channels, 16, 16)
    assert tr.labels.tolist() == ytr.tolist() and tr.classes == ["a", "b", "c"]
    # same pixels as Pillow's decoder (the README's reference recipe), and close to the originals
    buf, off = arrays["train_jpeg"], arrays["train_offsets"]
    mode = "RGB" if channels == 3 else "L"
    ref = np.stack([np.asarray(Image.open(io.BytesIO(buf[a:b].tobytes())).convert(mode)) for a, b in
                    zip(off[:-1], off[1:])])
    ref = ref[:, None] if channels == 1 else ref.transpose(0, 3, 1, 2)
    assert np.abs(tr.images.numpy().astype(int) - ref).max() <= 1
    assert np.abs(tr.images.numpy().astype(float) - xtr).mean() < 3
    assert load_dataset(f"npz:{tmp_path / 'j.npz'}", image_size=8).images.shape == (9, channels, 8, 8)


def test_npz_jpeg_layout_falls_back_to_pillow_for_other_formats(tmp_path):
    x = _smooth_images(4, 3, 12, 2)
    _write_jpeg_npz(tmp_path / "p.npz", {"train": (x, [0, 1, 2, 0]), "test": (x[:2], [1, 2])}, fmt="PNG")
    got = load_dataset(f"npz:{tmp_path / 'p.npz'}")
    assert torch.equal(got.images, torch.from_numpy(x))   # PNG is lossless


def test_npz_jpeg_layout_errors(tmp_path):
    x = _smooth_images(3, 3, 8, 3)
    arrays = _write_jpeg_npz(tmp_path / "ok.npz", {"train": (x, [0, 1, 2]), "test": (x, [0, 1, 2])})
    np.savez(tmp_path / "short.npz", **{**arrays, "y_train": np.array([0, 1])})
    with pytest.raises(GenrepError, match="2 labels for 3 images") as e:
        load_dataset(f"npz:{tmp_path / 'short.npz'}")
    one_line(e)
    bad = arrays["train_offsets"].copy()
    bad[-1] += 10_000
    np.savez(tmp_path / "off.npz", **{**arrays, "train_offsets": bad})
    with pytest.raises(GenrepError, match="offsets"):
        load_dataset(f"npz:{tmp_path / 'off.npz'}")
    np.savez(tmp_path / "nolabels.npz", **{k: v for k, v in arrays.items() if k != "y_test"})
    with pytest.raises(GenrepError, match="y_test"):
        load_dataset(f"npz:{tmp_path / 'nolabels.npz'}", "test")
    garbage = arrays["train_jpeg"].copy()
    garbage[:] = 7
    np.savez(tmp_path / "garbage.npz", **{**arrays, "train_jpeg": garbage})
    with pytest.raises(GenrepError, match="cannot decode image 0"):
        load_dataset(f"npz:{tmp_path / 'garbage.npz'}")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="the real CIFAR-10 JPEG copy is not on this machine")
def test_real_cifar10_jpeg_npz():
    t = time.perf_counter()
    tr = load_dataset(f"npz:{SHARED_CIFAR}")
    te = load_dataset(f"npz:{SHARED_CIFAR}", "test")
    elapsed = time.perf_counter() - t
    assert (len(tr), len(te)) == (50000, 10000)
    assert tr.images.shape[1:] == (3, 32, 32) and tr.num_classes == 10 and tr.classes[0] == "airplane"
    assert np.bincount(tr.labels.numpy()).tolist() == [5000] * 10
    mean = tr.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=0.002), mean
    assert elapsed < 60


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MNIST.is_file(), reason="the MNIST npz copy is not on this machine")
def test_real_mnist_npz():
    tr = load_dataset(f"npz:{SHARED_MNIST}")
    assert tr.images.shape == (60000, 1, 28, 28) and len(load_dataset(f"npz:{SHARED_MNIST}", "test")) == 10000
    assert abs(float(tr.images.float().mean()) / 255 - 0.1307) < 0.001


# ----------------------------------------------------------------------------------------------- folder
def _png(path: Path, arr_chw: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(arr_chw, "PNG"))


def test_folder_automatic_split(tmp_path):
    imgs = {}
    for ci, cls in enumerate(["zebra", "ant", "moth"]):          # classes are the sorted folder names
        for i in range(5):
            img = rng_images(1, 3, 6, 6, seed=10 * ci + i)[0]
            imgs[(cls, i)] = img
            _png(tmp_path / "data" / cls / f"{i:02d}.png", img)
    (tmp_path / "data" / "ant" / "notes.txt").write_text("not an image")
    name = f"folder:{tmp_path / 'data'}"
    tr, te = load_dataset(name), load_dataset(name, "test")
    assert tr.classes == ["ant", "moth", "zebra"] and tr.name == name
    assert (len(tr), len(te)) == (12, 3)                          # 4/1 of each class of 5
    assert np.bincount(te.labels.numpy()).tolist() == [1, 1, 1]
    assert tr.images.shape[1:] == (3, 6, 6) and tr.images.dtype == torch.uint8
    # every image lands in exactly one split, with its own label and exact pixels
    lookup = {img.tobytes(): cls for (cls, _), img in imgs.items()}
    seen = [(x.numpy().tobytes(), tr.classes[y]) for s in (tr, te) for x, y in zip(s.images, s.labels)]
    assert sorted(seen) == sorted(lookup.items())
    again = load_dataset(name, "test")
    assert torch.equal(again.images, te.images) and torch.equal(again.labels, te.labels)


def test_folder_train_test_subfolders_grayscale_and_sizes(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", rng_images(1, 1, 7, 7, seed=i)[0])
    tr, te = load_dataset(f"folder:{tmp_path}"), load_dataset(f"folder:{tmp_path}", "test")
    assert (len(tr), len(te)) == (6, 4) and tr.channels == 1 and tr.classes == ["a", "b"]
    assert te.labels.tolist() == [0, 0, 1, 1]
    # one colour image makes the whole set RGB; a second size needs image_size
    _png(tmp_path / "test" / "b" / "big.png", rng_images(1, 3, 9, 9)[0])
    with pytest.raises(GenrepError, match="image_size") as e:
        load_dataset(f"folder:{tmp_path}")
    one_line(e)
    tr = load_dataset(f"folder:{tmp_path}", image_size=8)
    te = load_dataset(f"folder:{tmp_path}", "test", image_size=8)
    assert tr.images.shape == (6, 3, 8, 8) and te.images.shape == (5, 3, 8, 8)


def test_folder_errors(tmp_path):
    def err(path, match, split="train"):
        with pytest.raises(GenrepError, match=match) as e:
            load_dataset(f"folder:{path}", split)
        return one_line(e)

    err(tmp_path / "missing", "no such directory")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png", rng_images(1, 3, 4, 4)[0])
    err(tmp_path / "flat", "no class sub-folders")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    err(tmp_path / "noimg", "no image files")
    _png(tmp_path / "tiny" / "a" / "1.png", rng_images(1, 3, 4, 4)[0])
    _png(tmp_path / "tiny" / "b" / "1.png", rng_images(1, 3, 4, 4)[0])
    err(tmp_path / "tiny", "test split is empty", "test")
    (tmp_path / "tiny" / "b" / "2.png").write_bytes(b"garbage")
    err(tmp_path / "tiny", "cannot read")


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


def test_torchvision_cifar100_fine_labels(tmp_path, no_md5):
    base = tmp_path / "cifar100" / "cifar-100-python"
    x = rng_images(3, 3, 32, 32)
    for name in ("train", "test"):
        _pickle(base / name, {"data": x.reshape(3, -1), "fine_labels": [0, 99, 42],
                              "coarse_labels": [0, 1, 2]})
    _pickle(base / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    tr = load_dataset("cifar100", root=tmp_path, download=False, image_size=16)
    assert tr.images.shape == (3, 3, 16, 16) and tr.labels.tolist() == [0, 99, 42] and tr.num_classes == 100


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
