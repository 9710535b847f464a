"""The colour tokenizer (genrep.data.palette): k-means palettes, palette files, encode/decode, the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import one_line, rng_images

from genrep.data import palette as pal_mod
from genrep.data.palette import (
    DEFAULT_COLOURS,
    cached_palette,
    decode,
    distinct_colours,
    encode,
    fit_palette,
    palette_from_file,
)
from genrep.errors import GenrepError


def _images_of(colours: np.ndarray, n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, C, size, size] whose pixels are drawn from ``colours`` (uint8 [M, C]), every colour used."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(colours), size=n * size * size)
    idx[:len(colours)] = np.arange(len(colours))
    x = colours[idx].reshape(n, size, size, -1).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def _luma_sorted(palette: torch.Tensor) -> bool:
    w = torch.tensor([0.299, 0.587, 0.114] if palette.shape[1] == 3 else [1.0], dtype=torch.float64)
    luma = palette.double() @ w
    return bool((luma[1:] >= luma[:-1]).all())


# ----------------------------------------------------------------------------------------------- colours
def test_distinct_colours_sorted_and_complete():
    x = torch.from_numpy(rng_images(6, 3, 5, 5, seed=1) // 64)  # few levels, so colours repeat
    want = np.unique(x.permute(0, 2, 3, 1).reshape(-1, 3).numpy(), axis=0)  # lexicographic rows
    got = distinct_colours(x)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), want)
    grey = torch.tensor([[[[7, 3], [7, 250]]]], dtype=torch.uint8)
    assert distinct_colours(grey).tolist() == [[3], [7], [250]]


# ----------------------------------------------------------------------------------------------- fit
def test_fit_is_reproducible_canonical_and_in_range():
    x = torch.from_numpy(rng_images(20, 3, 8, 8, seed=2))  # ~1280 distinct colours, more than max_pixels
    a = fit_palette(x, 16, seed=0, max_pixels=500, iters=5)
    b = fit_palette(x, 16, seed=0, max_pixels=500, iters=5)
    c = fit_palette(x, 16, seed=1, max_pixels=500, iters=5)
    assert a.dtype == torch.float32 and a.shape == (16, 3) and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert len(torch.unique(a, dim=0)) == 16
    assert _luma_sorted(a)


def test_fit_finds_well_separated_clusters():
    centres = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 255, 255],
                        [128, 128, 128], [0, 255, 255]], dtype=np.int64)
    rng = np.random.default_rng(3)
    noisy = np.clip(centres[:, None] + rng.integers(-6, 7, size=(8, 50, 3)), 0, 255).reshape(-1, 3)
    x = _images_of(noisy.astype(np.uint8), 30, 8)
    palette = fit_palette(x, 8, seed=0)
    truth = torch.from_numpy(centres).float() / 127.5 - 1
    # every true centre has a palette colour within the noise (6 levels = 0.05)
    assert torch.cdist(truth, palette).min(1).values.max() < 0.06


def test_k_above_distinct_colours_is_one_line_error():
    colours = np.array([[0, 0, 0], [10, 20, 30], [200, 0, 9], [255, 255, 255], [1, 2, 3]], dtype=np.uint8)
    x = _images_of(colours, 4, 6)
    with pytest.raises(GenrepError) as e:
        fit_palette(x, 6, seed=0)
    msg = one_line(e)
    assert "only 5 distinct colours" in msg and "k <= 5" in msg


def test_k_equal_to_distinct_gives_exactly_those_colours():
    colours = np.array([[0, 0, 0], [10, 20, 30], [200, 0, 9], [255, 255, 255], [1, 2, 3]], dtype=np.uint8)
    x = _images_of(colours, 4, 6)
    palette = fit_palette(x, 5, seed=0)
    want = torch.from_numpy(colours).float() / 127.5 - 1
    assert {tuple(r) for r in palette.tolist()} == {tuple(r) for r in want.tolist()}
    assert _luma_sorted(palette)
    assert torch.equal(palette, fit_palette(x.flip(0), 5, seed=9))  # canonical: data order, seed irrelevant


def test_grey_digits():
    from genrep.data.datasets import load_dataset

    x = load_dataset("digits", "train", image_size=8).images  # 0..16 scaled to uint8: 17 grey levels
    assert len(distinct_colours(x)) == 17
    with pytest.raises(GenrepError) as e:
        fit_palette(x, DEFAULT_COLOURS, seed=0)
    assert "only 17 distinct colours" in one_line(e)
    levels = fit_palette(x, 17, seed=0)
    assert levels.shape == (17, 1) and levels[0, 0] == -1 and levels[-1, 0] == 1
    palette = fit_palette(x, 6, seed=0)
    assert palette.shape == (6, 1) and bool((palette[1:] > palette[:-1]).all())
    tokens = encode(x.float() / 255, palette)
    assert tokens.shape == (len(x), 64) and tokens.min() >= 0 and tokens.max() < 6
    assert torch.equal(encode(decode(tokens, palette, 8), palette), tokens)


def test_sample_missing_colours_falls_back_to_all():
    colours = np.concatenate([np.zeros((1, 3)), np.arange(1, 11)[:, None].repeat(3, 1)]).astype(np.uint8)
    idx = np.zeros(4000, dtype=np.int64)
    idx[:10] = np.arange(1, 11)  # ten rare colours beside 3990 black pixels
    x = torch.from_numpy(np.ascontiguousarray(colours[idx].reshape(10, 20, 20, 3).transpose(0, 3, 1, 2)))
    palette = fit_palette(x, 6, seed=0, max_pixels=3)  # 3 sampled pixels hold fewer than 6 colours
    assert palette.shape == (6, 3) and len(torch.unique(palette, dim=0)) == 6


def test_empty_cluster_takes_the_farthest_point():
    points = torch.tensor([[-1.0], [-0.9], [0.8], [1.0]])
    weights = torch.ones(4, dtype=torch.float64)
    # two equal centres: ties go to the first, the second is left empty and re-seeded at the point farthest
    # from its centre (1.0, at 0.15 from 0.85)
    new = pal_mod._lloyd_step(points, weights, torch.tensor([[-0.95], [0.85], [0.85]]))
    assert new[:, 0].tolist() == pytest.approx([-0.95, 0.9, 1.0])


def test_fit_rejects_bad_arguments():
    x = torch.from_numpy(rng_images(2, 3, 4, 4))
    for call in (lambda: fit_palette(x.float(), 4, seed=0), lambda: fit_palette(x[:, :2], 4, seed=0),
                 lambda: fit_palette(x, 1, seed=0), lambda: fit_palette(x, 4, seed=-1),
                 lambda: fit_palette(x, 4, seed=0, iters=0), lambda: fit_palette(x[:0], 4, seed=0)):
        with pytest.raises(GenrepError) as e:
            call()
        one_line(e)


# ----------------------------------------------------------------------------------------------- tokens
def test_round_trip_on_palette_colours():
    colours = rng_images(1, 1, 40, 3, seed=4).reshape(40, 3)
    colours = np.unique(colours, axis=0)
    x = _images_of(colours, 5, 7, seed=5)
    palette = fit_palette(x, len(colours), seed=0)
    tokens = encode(x.float() / 255, palette)
    assert tokens.dtype == torch.long and tokens.shape == (5, 49)
    assert torch.equal((decode(tokens, palette, 7) * 255).round().to(torch.uint8), x)
    drawn = torch.randint(0, len(palette), (3, 49), generator=torch.Generator().manual_seed(0))
    assert torch.equal(encode(decode(drawn, palette, 7), palette), drawn)


def test_tokens_are_in_raster_order():
    palette = torch.tensor([[-1.0, -1, -1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1], [1, 1, -1]])
    want = torch.tensor([[0, 1, 2], [3, 4, 5]])  # [H=2, W=3]
    x = (palette[want].permute(2, 0, 1)[None] + 1) / 2
    assert encode(x, palette).tolist() == [[0, 1, 2, 3, 4, 5]]
    assert torch.equal(encode(x.contiguous(memory_format=torch.channels_last), palette), encode(x, palette))
    four = palette[:4]
    assert torch.equal(decode(torch.arange(4)[None], four, 2), (four.T.reshape(1, 3, 2, 2) + 1) / 2)


def test_encode_ties_go_to_the_lowest_index():
    grey = torch.full((1, 1, 1, 1), 0.5)  # 0 in [-1, 1]
    assert encode(grey, torch.tensor([[-0.5], [0.5]])).item() == 0
    assert encode(grey, torch.tensor([[0.5], [-0.5]])).item() == 0
    assert encode(grey, torch.tensor([[1.0], [0.5], [-0.5]])).item() == 1
    centre = torch.full((1, 3, 1, 1), 0.5)  # the origin, at distance 1 from every colour below
    axes = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, -1, 0], [0, 0, -1]])
    for perm in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]):
        assert encode(centre, axes[perm]).item() == 0
    repeated = torch.tensor([[0.9, 0.9, 0.9], [0.0, 0, 0.5], [0.0, 0, 0.5]])
    assert encode(centre, repeated).item() == 1


def test_big_batch_encode_matches_an_unchunked_reference():
    g = torch.Generator().manual_seed(0)
    palette = torch.rand(DEFAULT_COLOURS, 3, generator=g) * 2 - 1
    x = torch.rand(48, 3, 32, 32, generator=g)  # 49,152 pixels: 24 chunks of 2,048 on the CPU
    tokens = encode(x, palette)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).double() * 2 - 1
    d = torch.cdist(pixels, palette.double(), compute_mode="donot_use_mm_for_euclid_dist").square()
    ref = d.argmin(1)
    got = tokens.reshape(-1)
    two = d.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-5  # float32 cannot order colours closer than that
    assert clear.float().mean() > 0.999
    assert torch.equal(got[clear], ref[clear])
    assert (d.gather(1, got[:, None]).squeeze(1) - two[:, 0]).max() <= 1e-5


def test_encode_ignores_autocast():
    g = torch.Generator().manual_seed(1)
    palette = torch.rand(DEFAULT_COLOURS, 3, generator=g) * 2 - 1
    x = torch.rand(2, 3, 16, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the training loop's bf16 would on CUDA
        assert torch.mm(x[0, 0], x[0, 1]).dtype == torch.bfloat16
        tokens = encode(x, palette)
    assert torch.equal(tokens, encode(x, palette))


def test_encode_decode_reject_bad_input():
    palette = torch.tensor([[-1.0], [1.0]])
    bad_calls = (lambda: encode(torch.zeros(1, 3, 2, 2), palette),           # channels differ
                 lambda: encode(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), palette),
                 lambda: encode(torch.zeros(1, 1, 2, 2), torch.zeros(2, 1, 1)),
                 lambda: decode(torch.zeros(1, 5, dtype=torch.long), palette, 2),
                 lambda: decode(torch.tensor([[0, 1, 2, 1]]), palette, 2))
    for call in bad_calls:
        with pytest.raises(GenrepError) as e:
            call()
        one_line(e)


# ----------------------------------------------------------------------------------------------- files
def test_palette_file_accepted(tmp_path):
    g = np.random.default_rng(0)
    good = (g.random((DEFAULT_COLOURS, 3)) * 2 - 1).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", good)
    got = palette_from_file(tmp_path / "kmeans_centers.npy", 3)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), good)  # order kept
    edge = np.array([[-1.00001], [0.0], [1.00002]])  # float64 rounding just outside [-1, 1]: clamped
    np.save(tmp_path / "grey.npy", edge)
    assert palette_from_file(str(tmp_path / "grey.npy"), 1).tolist() == [[-1.0], [0.0], [1.0]]


@pytest.mark.parametrize("case, fragment", [
    ("1-d", "has shape (4,)"), ("3-d", "has shape (4, 3, 1)"), ("channels", "must be [K, 1]"),
    ("one colour", "has 1 colour"), ("nan", "NaN"), ("255", "looks like 0..255"), ("ints", "holds int64"),
    ("repeated", "rows 0 and 2 are equal"), ("pickled", "pickled"), ("text", "not a .npy file"),
    ("npz", "zip archive"), ("missing", "is not a file"), ("truncated", "cannot be read"),
])
def test_palette_file_rejected(tmp_path, case, fragment):
    path = tmp_path / f"{case}.npy"
    arrays = {"1-d": np.zeros(4), "3-d": np.zeros((4, 3, 1)), "channels": np.zeros((4, 3)),
              "one colour": np.zeros((1, 1)), "nan": np.array([[0.0], [np.nan]]),
              "255": np.array([[0.0], [255.0]]),
              "ints": np.array([[0], [1]]), "repeated": np.array([[0.5], [0.25], [0.5]])}
    channels = 1 if case not in ("3-d",) else 3
    if case in arrays:
        np.save(path, arrays[case])
    elif case == "pickled":
        np.save(path, np.array([[0.5], [object()]], dtype=object), allow_pickle=True)
    elif case == "text":
        path.write_text("0.5\n-0.5\n")
    elif case == "npz":
        np.savez(path.with_suffix(".npz"), a=np.zeros((2, 1)))
        os.replace(path.with_suffix(".npz"), path)
    elif case == "truncated":
        np.save(path, np.zeros((64, 1)))
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GenrepError) as e:
        palette_from_file(path, channels)
    msg = one_line(e)
    assert str(path) in msg and fragment in msg, msg


# ----------------------------------------------------------------------------------------------- cache
def test_cache_reuses_the_fit(tmp_path, monkeypatch):
    x = torch.from_numpy(rng_images(4, 3, 6, 6, seed=6))
    first = cached_palette(x, 8, seed=0, device="cpu", cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("palette-6x6-c3-k8-s0-")
    assert torch.equal(first, fit_palette(x, 8, seed=0))

    def refit(*args, **kwargs):
        raise AssertionError("the cached palette was refitted")

    monkeypatch.setattr(pal_mod, "fit_palette", refit)
    assert torch.equal(cached_palette(x.clone(), 8, seed=0, device="cpu", cache_dir=tmp_path), first)
    with pytest.raises(AssertionError):  # another seed is another fit
        cached_palette(x, 8, seed=1, device="cpu", cache_dir=tmp_path)


def test_cache_default_dir_is_under_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREP_DATA", str(tmp_path))
    x = torch.from_numpy(rng_images(2, 1, 4, 4, seed=7))
    cached_palette(x, 4, seed=0, device="cpu")
    assert [p.name[:20] for p in (tmp_path / "palettes").iterdir()] == ["palette-4x4-c1-k4-s0"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong shape", "other key", "out of range"])
def test_corrupt_cache_is_one_line_error_and_kept(tmp_path, damage):
    from genrep.io import atomic_save_safetensors

    x = torch.from_numpy(rng_images(3, 3, 5, 5, seed=8))
    cached_palette(x, 6, seed=0, device="cpu", cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    key = pal_mod._cache_key(x, 6, 0)[1]
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "wrong shape":
        atomic_save_safetensors(path, {"palette": torch.zeros(5, 3)}, metadata={"key": key})
    elif damage == "other key":
        atomic_save_safetensors(path, {"palette": fit_palette(x, 6, seed=0)}, metadata={"key": "v0|other"})
    else:
        wide = torch.linspace(-2, 2, 18).reshape(6, 3)
        atomic_save_safetensors(path, {"palette": wide}, metadata={"key": key})
    before = path.read_bytes()
    with pytest.raises(GenrepError) as e:
        cached_palette(x, 6, seed=0, device="cpu", cache_dir=tmp_path)
    msg = one_line(e)
    assert str(path) in msg and "remove it to refit" in msg
    assert path.read_bytes() == before
