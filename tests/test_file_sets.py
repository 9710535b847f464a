"""genrep.data.file_sets through load_dataset: celeba, tinyimagenet and imagenet32 on tiny fakes written in their
published layouts under tmp_path. Nothing here touches the network or the real data sets."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, rng_images
from PIL import Image

from genrep.data.datasets import describe_datasets, load_dataset
from genrep.errors import GenrepError


def _smooth(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """RGB uint8 [n, h, w, 3] gradients plus a little noise: JPEG keeps them close, as it does photographs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([yy, xx, (yy + xx) / 2], -1)[None] * rng.uniform(80, 200, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 8, (n, h, w, 3)) + 30, 0, 255).astype(np.uint8)


def _jpeg(path: Path, hwc: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(hwc)
    (im.convert("L") if mode == "L" else im).save(path, "JPEG", quality=95)


def _pil_read(path: Path, size: int | None = None) -> torch.Tensor:
    """The reference: PIL decode, RGB, bilinear resize (what torchvision's Resize does to a PIL image)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def _offline_urlopen(monkeypatch) -> list:
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return calls


# ----------------------------------------------------------------------------------------------- CelebA
# the published split sizes are 162,770 / 19,867 / 19,962; the fake keeps the three partitions, tiny
CELEBA_PARTITION = [0, 0, 0, 1, 2, 2, 0, 2]     # train, valid (unused), test


def _write_celeba(root: Path) -> Path:
    base = root / "celeba" / "celeba"
    names = [f"{i + 1:06d}.jpg" for i in range(len(CELEBA_PARTITION))]
    for name, img in zip(names, _smooth(len(names), 218, 178, seed=3)):
        _jpeg(base / "img_align_celeba" / name, img)

    def table(file, rows, header=None):
        lines = [str(len(rows))] + ([" ".join(header)] if header else [])
        (base / file).write_text("\n".join(lines + [f"{n} {' '.join(map(str, r))}" for n, r in zip(names, rows)])
                                 + "\n")

    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, CELEBA_PARTITION)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {i + 7}\n" for i, n in enumerate(names)))
    table("list_attr_celeba.txt", [[1, -1] * 20] * len(names), [f"attr{i}" for i in range(40)])
    table("list_bbox_celeba.txt", [[1, 2, 3, 4]] * len(names), ["image_id", "x_1", "y_1", "width", "height"])
    table("list_landmarks_align_celeba.txt", [list(range(10))] * len(names), [f"l{i}" for i in range(10)])
    return base


@pytest.fixture
def no_celeba_md5(monkeypatch):
    """torchvision checks the md5 of the real CelebA lists; the fakes must pass on presence."""
    from torchvision.datasets import celeba

    monkeypatch.setattr(celeba, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_celeba_test_split_at_32_is_the_hybvit_codes_resize(tmp_path, no_celeba_md5):
    import torchvision.datasets as tvd
    import torchvision.transforms as tr

    base = _write_celeba(tmp_path)
    te = load_dataset("celeba", "test", image_size=32, root=tmp_path, download=False)
    assert te.name == "celeba" and te.images.shape == (3, 3, 32, 32) and te.images.dtype == torch.uint8
    assert te.labels.tolist() == [0, 0, 0] and te.classes == ["face"]
    # the paper code's pipeline (Task/eval_tasks.py): CelebA(split="test") with Resize(size=(32, 32)), no crop
    ref = tvd.CelebA(str(base.parent), split="test", target_type=[],
                     transform=tr.Compose([tr.Resize(size=(32, 32)), tr.PILToTensor()]))
    assert torch.equal(te.images, torch.stack([ref[i][0] for i in range(len(ref))]))
    tests = [n for n, p in zip(sorted(os.listdir(base / "img_align_celeba")), CELEBA_PARTITION) if p == 2]
    assert torch.equal(te.images[0], _pil_read(base / "img_align_celeba" / tests[0], 32))


def test_celeba_native_faces_and_train_split(tmp_path, no_celeba_md5):
    _write_celeba(tmp_path)
    tr = load_dataset("celeba", root=tmp_path, download=False)
    assert tr.images.shape == (4, 3, 218, 178) and tr.image_shape == (218, 178)
    with pytest.raises(GenrepError, match="image_size") as e:   # non-square: a run must resize it
        _ = tr.image_size
    one_line(e)


def test_celeba_missing_offline_names_folder_files_and_how_to_get_them(tmp_path):
    with pytest.raises(GenrepError) as e:
        load_dataset("celeba", "test", root=tmp_path, download=False)
    msg = one_line(e)
    assert str(tmp_path / "celeba") in msg and "celeba/list_eval_partition.txt" in msg
    assert "celeba/img_align_celeba/" in msg and "gdown" in msg and "download=True" in msg


# ----------------------------------------------------------------------------------------------- Tiny-ImageNet
WNIDS = ["n02", "n01", "n03"]   # wnids.txt is not sorted; the labels follow the sorted names (ImageFolder's)


def _write_tiny(root: Path) -> Path:
    base = root / "tinyimagenet" / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    imgs = _smooth(10, 64, 64, seed=5)
    for k, w in enumerate(WNIDS):
        for i in range(2):
            _jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", imgs[2 * k + i], "L" if (k, i) == (1, 0) else "RGB")
        (base / "train" / w / f"{w}_boxes.txt").write_text("ignored\n")
    val = [("val_0.JPEG", "n03"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02"), ("val_3.JPEG", "n01")]
    for i, (name, _) in enumerate(val):
        _jpeg(base / "val" / "images" / name, imgs[6 + i])
    (base / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in val))
    return base


def test_tinyimagenet_train_and_val_as_test(tmp_path):
    base = _write_tiny(tmp_path)
    tr = load_dataset("tinyimagenet", root=tmp_path, download=False)
    te = load_dataset("tinyimagenet", "test", root=tmp_path, download=False)
    assert tr.classes == te.classes == ["n01", "n02", "n03"]
    assert tr.labels.tolist() == [0, 0, 1, 1, 2, 2] and te.labels.tolist() == [2, 0, 1, 0]
    assert tr.images.shape == (6, 3, 64, 64) and te.images.shape == (4, 3, 64, 64)
    first = base / "train" / "n01" / "images" / "n01_0.JPEG"   # the grey one: read as RGB
    assert torch.equal(tr.images[0], _pil_read(first)) and (tr.images[0][0] == tr.images[0][1]).all()
    assert torch.equal(te.images[1], _pil_read(base / "val" / "images" / "val_1.JPEG"))
    small = load_dataset("tinyimagenet", "test", image_size=32, root=tmp_path, download=False)
    assert torch.equal(small.images[0], _pil_read(base / "val" / "images" / "val_0.JPEG", 32))


def test_tinyimagenet_damaged_layouts_are_one_line(tmp_path):
    base = _write_tiny(tmp_path)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(GenrepError, match="line 1") as e:
        load_dataset("tinyimagenet", "test", root=tmp_path, download=False)
    one_line(e)
    for f in (base / "train" / "n02" / "images").iterdir():
        f.unlink()
    with pytest.raises(GenrepError, match="n02") as e:
        load_dataset("tinyimagenet", root=tmp_path, download=False)
    one_line(e)
    (base / "train" / "n01" / "images" / "n01_1.JPEG").write_bytes(b"not a jpeg")
    (base / "train" / "n02" / "images" / "n02_0.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(GenrepError, match="corrupted or incomplete") as e:
        load_dataset("tinyimagenet", root=tmp_path, download=False)
    one_line(e)


def test_tinyimagenet_missing_offline_and_failed_download(tmp_path, monkeypatch):
    with pytest.raises(GenrepError) as e:
        load_dataset("tinyimagenet", "test", root=tmp_path, download=False)
    msg = one_line(e)
    assert "tiny-imagenet-200/val/val_annotations.txt" in msg and "tiny-imagenet-200.zip" in msg
    calls = _offline_urlopen(monkeypatch)
    t = time.perf_counter()
    with pytest.raises(GenrepError, match="downloading it") as e:
        load_dataset("tinyimagenet", root=tmp_path, download=True)
    assert calls and time.perf_counter() - t < 10
    assert str(tmp_path / "tinyimagenet") in one_line(e)


# ----------------------------------------------------------------------------------------------- ImageNet32
def _write_imagenet32(root: Path, per_batch: int = 2, n_val: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The published layout: data uint8 [N, 3072] (R, G, B planes), labels 1..1000 (train batches carry 'mean')."""
    out = {}
    files = [f"Imagenet32_train_npz/train_data_batch_{i}.npz" for i in range(1, 11)] + ["Imagenet32_val_npz/val_data.npz"]
    for k, f in enumerate(files):
        n = n_val if "val" in f else per_batch
        x = rng_images(n, 3, 32, 32, seed=k).reshape(n, -1)
        y = np.array([1, 1000, 500][:n] if "val" in f else [k + 1, 1000 - k][:n])
        path = root / "imagenet32" / f
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if "val" in f else {"mean": x.mean(0)}
        np.savez(path, data=x, labels=y, **extra)
        out[f] = (x, y)
    return out


def test_imagenet32_from_the_published_npz_batches(tmp_path):
    arrays = _write_imagenet32(tmp_path)
    tr = load_dataset("imagenet32", root=tmp_path, download=False)
    te = load_dataset("imagenet32", "test", root=tmp_path, download=False)
    xs = [arrays[f"Imagenet32_train_npz/train_data_batch_{i}.npz"] for i in range(1, 11)]
    assert tr.images.shape == (20, 3, 32, 32) and tr.num_classes == 1000 and tr.classes[999] == "999"
    assert torch.equal(tr.images, torch.from_numpy(np.concatenate([x for x, _ in xs]).reshape(-1, 3, 32, 32)))
    assert tr.labels.tolist() == [v - 1 for _, y in xs for v in y.tolist()]
    x_val, y_val = arrays["Imagenet32_val_npz/val_data.npz"]
    # row layout: the first 1024 bytes are the red plane, row by row
    assert torch.equal(te.images[:, 0].reshape(3, -1), torch.from_numpy(x_val[:, :1024]))
    assert te.labels.tolist() == [0, 999, 499]
    assert load_dataset("imagenet32", "test", image_size=16, root=tmp_path, download=False).images.shape == (3, 3, 16, 16)


def test_imagenet32_is_never_downloaded_and_says_where_to_get_it(tmp_path, monkeypatch):
    calls = _offline_urlopen(monkeypatch)
    with pytest.raises(GenrepError) as e:
        load_dataset("imagenet32", "test", root=tmp_path, download=True)
    msg = one_line(e)
    assert not calls and "cannot download" in msg and "image-net.org" in msg
    assert "Imagenet32_val_npz/val_data.npz" in msg and str(tmp_path / "imagenet32") in msg
    # the test split needs only the val file
    _write_imagenet32(tmp_path)
    for i in range(1, 11):
        (tmp_path / "imagenet32" / f"Imagenet32_train_npz/train_data_batch_{i}.npz").unlink()
    assert len(load_dataset("imagenet32", "test", root=tmp_path, download=False)) == 3


@pytest.mark.parametrize("bad, fragment", [
    (dict(data=np.zeros((2, 3072), np.uint8), labels=np.array([0, 5])), "1..1000"),
    (dict(data=np.zeros((2, 3072), np.uint8), labels=np.array([1, 1001])), "1..1000"),
    (dict(data=np.zeros((2, 1024), np.uint8), labels=np.array([1, 2])), "uint8 [2, 3072]"),
    (dict(data=np.zeros((2, 3072), np.float32), labels=np.array([1, 2])), "float32"),
    (dict(x=np.zeros(3)), "not 'data' and 'labels'"),
])
def test_imagenet32_malformed_batches_are_one_line(tmp_path, bad, fragment):
    _write_imagenet32(tmp_path)
    np.savez(tmp_path / "imagenet32" / "Imagenet32_val_npz" / "val_data.npz", **bad)
    with pytest.raises(GenrepError) as e:
        load_dataset("imagenet32", "test", root=tmp_path, download=False)
    assert fragment in one_line(e)
    (tmp_path / "imagenet32" / "Imagenet32_val_npz" / "val_data.npz").write_bytes(b"truncated")
    with pytest.raises(GenrepError, match="corrupted or incomplete") as e:
        load_dataset("imagenet32", "test", root=tmp_path, download=False)
    assert "image-net.org" in one_line(e)


# ----------------------------------------------------------------------------------------------- listing
def test_describe_lists_the_file_sets(tmp_path):
    rows = {r["name"]: r for r in describe_datasets(tmp_path)}
    assert rows["celeba"]["size"] == "218x178" and rows["celeba"]["num_classes"] == 1
    assert rows["tinyimagenet"]["num_classes"] == 200 and rows["imagenet32"]["num_classes"] == 1000
    assert not any(rows[n]["available"] for n in ("celeba", "tinyimagenet", "imagenet32"))
    assert "celeba/img_align_celeba/" in rows["celeba"]["files"]
    _write_imagenet32(tmp_path)
    _write_tiny(tmp_path)
    rows = {r["name"]: r for r in describe_datasets(tmp_path)}
    assert rows["imagenet32"]["available"] and rows["tinyimagenet"]["available"]
