"""genrep.data.local_sets through load_dataset: npz:PATH (array and JPEG layouts) and folder:PATH.

Everything is written to tmp_path; nothing depends on the shared data folder (the tests that read the
real copies there are skipped when they are absent).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, one_line, rng_images
from PIL import Image

from genrep.data import local_sets
from genrep.data.datasets import load_dataset
from genrep.errors import GenrepError

SHARED_CIFAR = SHARED_DATA / "cifar10-jpeg.npz"
SHARED_MNIST = SHARED_DATA / "mnist.npz"




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
    np.savez(p, x_train=rng_images(3, 1, 5, 5)[:, 0], y_train=np.array([0, 1, 2]),
             x_test=rng_images(2, 1, 5, 5)[:, 0], y_test=np.array([[3], [0]]))   # (N, 1) labels are fine
    assert load_dataset(f"npz:{p}").classes == ["0", "1", "2", "3"]
    assert load_dataset(f"npz:{p}", "test").labels.tolist() == [3, 0]


def test_npz_labels_that_skip_classes_are_refused_unless_declared(tmp_path):
    """One stray label of 100000 would silently build a 100,001-class head."""
    p = tmp_path / "x.npz"
    x = rng_images(3, 1, 5, 5)[:, 0]
    np.savez(p, x_train=x, y_train=np.array([0, 1, 100000]), x_test=x[:2], y_test=np.array([1, 0]))
    with pytest.raises(GenrepError) as e:
        load_dataset(f"npz:{p}")
    assert "labels run to 100000 but only 3 of the classes" in one_line(e) and "'classes'" in one_line(e)
    np.savez(p, x_train=x, y_train=np.array([0, 1, 4]), x_test=x[:2], y_test=np.array([1, 0]),
             classes=np.array(["a", "b", "c", "d", "e"]))
    assert len(load_dataset(f"npz:{p}").classes) == 5
    np.savez(p, x_train=x, y_train=np.array([0, 1, 2 ** 64 - 1], dtype=np.uint64), x_test=x[:2],
             y_test=np.array([1, 0]))
    with pytest.raises(GenrepError) as e:
        load_dataset(f"npz:{p}")
    assert f"has label {2 ** 64 - 1}, not a class index" in one_line(e)


def test_a_zero_byte_npz_is_one_line(tmp_path):
    p = tmp_path / "empty.npz"
    p.write_bytes(b"")
    with pytest.raises(GenrepError) as e:
        load_dataset(f"npz:{p}")
    assert "cannot read" in one_line(e) and str(p) in one_line(e)


def test_a_huge_image_in_a_folder_set_is_refused_from_its_header(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (8, 8)).save(tmp_path / cls / f"{i}.png")
    for side, fragment in ((15000, "bomb.png"), (10000, "bomb.png is 10000x10000 pixels")):
        Image.new("1", (side, side)).save(tmp_path / "a" / "bomb.png")  # 1-bit: a small file, 100M+ pixels
        with pytest.raises(GenrepError) as e:
            load_dataset(f"folder:{tmp_path}", image_size=8)
        assert fragment in one_line(e)


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
        monkeypatch.setattr(local_sets, "_torchvision_decode_jpeg", lambda: None)
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


def test_splits_that_disagree_are_refused_before_training(tmp_path):
    """1-channel train and 3-channel test arrays used to train, then crash at the first probe."""
    from genrep.data.datasets import check_splits
    from genrep.train.loop import pretrain

    p = tmp_path / "mixed.npz"
    np.savez(p, x_train=rng_images(64, 1, 8, 8)[:, 0], y_train=np.arange(64) % 2,
             x_test=rng_images(8, 3, 8, 8).transpose(0, 2, 3, 1), y_test=np.arange(8) % 2)
    with pytest.raises(GenrepError) as e:
        check_splits(load_dataset(f"npz:{p}"), load_dataset(f"npz:{p}", "test"))
    assert "1-channel 8x8 images but the test split 3-channel 8x8" in one_line(e)
    from conftest import tiny_config

    with pytest.raises(GenrepError) as e:
        pretrain(tiny_config(**{"data.name": f"npz:{p}", "data.image_size": None}), tmp_path / "run")
    assert "both splits must have the same channels and size" in one_line(e)
    assert not (tmp_path / "run").exists()
