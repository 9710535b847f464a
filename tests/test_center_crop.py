"""data.resize center_crop: guided-diffusion's centre crop (the diffusion-features paper's input pipeline), pixel for
pixel against a transcription of ``center_crop_arr`` (tests/center_crop_reference.py), through the folder: and npz:
paths (the registered fine-grained sets: test_fgvc_sets.py); the images it refuses, before any decoding; the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from center_crop_reference import crop_file, guided_diffusion_center_crop_arr
from conftest import one_line, rng_images
from PIL import Image

from genrep.config import resolve_config
from genrep.data import local_sets
from genrep.data.datasets import load_dataset
from genrep.data.resize import MAX_CROP_SOURCE_PIXELS, center_crop_pil, plan_center_crop
from genrep.errors import GenrepError


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """An RGB uint8 [h, w, 3] image with structure at every scale (gradients plus noise), so a wrong filter, size
    or offset changes pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 11.0)], -1) * 90 + 128
    noise = np.random.default_rng(seed).normal(0, 25, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# (width, height, target): landscape and portrait, BOX halvings (none, one, three), an upsampled short side, a
# square at the target (no change), odd sizes whose scaled long side rounds half to even (75 * 32/50 = 48 exactly;
# 45 * 16/6 = 120; 35 * 12/8 = 52.5 -> 52)
CASES = [(300, 200, 64), (96, 410, 48), (517, 1029, 64), (1000, 37, 32), (20, 13, 48), (64, 64, 64),
         (75, 50, 32), (6, 45, 16), (35, 8, 12), (9, 9, 256)]


@pytest.mark.parametrize("w, h, size", CASES)
def test_the_crop_is_guided_diffusions_pixel_for_pixel(w, h, size):
    im = Image.fromarray(_photo(w, h, seed=w * h))
    ref = guided_diffusion_center_crop_arr(im, size)
    ours = np.asarray(center_crop_pil(im, size))
    assert ref.shape == ours.shape == (size, size, 3)
    assert np.array_equal(ours, ref)


def test_the_plan_halves_while_the_short_side_is_twice_the_target():
    assert plan_center_crop(517, 1029, 64).halvings == 3          # 517 -> 258 -> 129 -> 64
    assert plan_center_crop(300, 200, 64).scaled == (96, 64)      # one halving: 150x100, then x0.64
    assert plan_center_crop(35, 8, 12).scaled == (52, 12)         # 52.5 rounds half to even
    assert plan_center_crop(20, 13, 48).box == (13, 0, 61, 48)    # upsampled to 74x48, the centred 48


def _png(path: Path, hwc: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(hwc).save(path)


def test_a_folder_set_of_many_sizes_is_centre_cropped_as_guided_diffusion_reads_it(tmp_path):
    files = {}
    for k, (w, h, _) in enumerate(CASES[:6]):
        split = "test" if k % 3 == 2 else "train"
        path = tmp_path / split / f"c{k % 2}" / f"{k}.png"
        _png(path, _photo(w, h, seed=k))
        files.setdefault(split, []).append(path)
    name = f"folder:{tmp_path}"
    for split, paths in files.items():
        s = load_dataset(name, split, image_size=40, resize="center_crop")
        assert s.images.shape == (len(paths), 3, 40, 40)
        by_class = sorted(paths, key=lambda p: (p.parent.name, p.name))   # the loader's order: class, then file
        for got, path in zip(s.images, by_class):
            assert np.array_equal(got.permute(1, 2, 0).numpy(), crop_file(path, 40)), path
    # the default is still today's squash, and differs
    assert torch.equal(load_dataset(name, image_size=40).images, load_dataset(name, image_size=40, resize="squash").images)
    assert not torch.equal(load_dataset(name, image_size=40).images, load_dataset(name, image_size=40,
                                                                                 resize="center_crop").images)


def test_a_grey_folder_set_is_cropped_like_each_band_of_its_rgb_copy(tmp_path):
    grey = _photo(70, 30, seed=1)[..., 0]
    sources = [grey, grey[::-1].copy(), grey.T.copy()]           # a/0, a/1, b/0: all three in train
    for path, img in zip(("a/0.png", "a/1.png", "b/0.png"), sources):
        _png(tmp_path / path, img)
    s = load_dataset(f"folder:{tmp_path}", image_size=24, resize="center_crop")
    assert s.channels == 1 and len(s) == 3
    for got, img in zip(s.images, sources):
        ref = guided_diffusion_center_crop_arr(Image.fromarray(img).convert("RGB"), 24)
        assert np.array_equal(got[0].numpy(), ref[..., 0]) and np.array_equal(ref[..., 0], ref[..., 2])


def test_npz_arrays_and_jpeg_bytes_are_centre_cropped_too(tmp_path):
    import io

    x = rng_images(4, 3, 30, 50, seed=2)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=np.arange(4) % 2, x_test=x[:2], y_test=np.arange(2))
    s = load_dataset(f"npz:{tmp_path / 'a.npz'}", image_size=20, resize="center_crop")
    for got, src in zip(s.images, x):
        ref = guided_diffusion_center_crop_arr(Image.fromarray(src.transpose(1, 2, 0)), 20)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), ref)
    pngs = []
    for w, h in ((33, 21), (18, 40)):                      # two sizes: cropped as they are stacked
        buf = io.BytesIO()
        Image.fromarray(_photo(w, h, seed=w)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    offsets = np.cumsum([0] + [len(b) for b in pngs])
    blob = np.frombuffer(b"".join(pngs), np.uint8)
    np.savez(tmp_path / "b.npz", train_jpeg=blob, train_offsets=offsets, y_train=np.array([0, 1]),
             test_jpeg=blob, test_offsets=offsets, y_test=np.array([0, 1]))
    s = load_dataset(f"npz:{tmp_path / 'b.npz'}", image_size=16, resize="center_crop")
    for got, (w, h) in zip(s.images, ((33, 21), (18, 40))):
        ref = guided_diffusion_center_crop_arr(Image.fromarray(_photo(w, h, seed=w)), 16)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), ref)


@pytest.mark.parametrize("w, h, fragment", [
    (1, 1, "is 1x1 pixels; data.resize center_crop needs at least 2 pixels a side"),
    (1, 40, "is 1x40 pixels; data.resize center_crop needs at least 2 pixels a side"),
    (2, 5000, "would scale its short side to 256 px and crop from a 256x640000 image"),
])
def test_an_image_it_cannot_crop_is_one_line_naming_the_file_before_any_decoding(tmp_path, monkeypatch, w, h,
                                                                                   fragment):
    for i in range(3):
        _png(tmp_path / "a" / f"{i}.png", _photo(12, 10, seed=i))
    bad = tmp_path / "a" / "odd.png"
    _png(bad, _photo(w, h, seed=9))

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded before the refusal")

    monkeypatch.setattr(local_sets, "_pil_decode", no_decoding)
    with pytest.raises(GenrepError) as e:
        load_dataset(f"folder:{tmp_path}", image_size=256, resize="center_crop")
    msg = one_line(e)
    assert str(bad) in msg and fragment in msg and ("remove" in msg or "replace" in msg)
    if w == 2:
        assert f"at most {MAX_CROP_SOURCE_PIXELS // 256 ** 2}:1" in msg and "data.resize squash" in msg
    monkeypatch.undo()
    if w * h > 1:   # squashed, the same image loads: the refusal is the centre crop's own
        assert len(load_dataset(f"folder:{tmp_path}", image_size=8)) == 3


def test_the_config_key_declares_its_values_and_the_imagenet_recipe_centre_crops():
    assert resolve_config("adm-digits").data.resize is None
    cfg = resolve_config("adm-imagenet256")
    assert (cfg.data.resize, cfg.data.image_size) == ("center_crop", 256)
    with pytest.raises(GenrepError) as e:
        resolve_config("adm-digits", {"data.resize": "crop"})
    assert one_line(e) == "data.resize 'crop' is unknown; choose squash, center_crop"
    with pytest.raises(GenrepError, match="resize must be one of squash, center_crop") as e:
        load_dataset("digits", resize="crop")
    one_line(e)


def test_the_run_reads_its_data_with_the_configs_resize(tmp_path):
    """runs.load_split is the one reader of a config's data: data.resize reaches the loader."""
    from genrep.runs import load_split

    for k, (w, h) in enumerate([(30, 12), (12, 30), (20, 20), (25, 14), (14, 25)]):
        _png(tmp_path / "d" / f"c{k % 2}" / f"{k}.png", _photo(w, h, seed=k))
    name = f"folder:{tmp_path / 'd'}"
    cfg = resolve_config("adm-digits", {"data.name": name, "data.image_size": 8, "data.resize": "center_crop"})
    assert torch.equal(load_split(cfg, "train").images,
                       load_dataset(name, image_size=8, resize="center_crop").images)
