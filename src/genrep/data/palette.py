"""The colour tokenizer of iGPT and GCRL: a palette of K colours in [-1, 1], pixels as palette indices.

iGPT (and GCRL after it, section 3.2) shortens a 32x32x3 image from 3,072 values to 1,024 tokens by
replacing each pixel with the index of its nearest colour in a k-means palette of 512 RGB colours.

* :func:`fit_palette` fits one on uint8 training images: weighted k-means (k-means++ init, Lloyd
  iterations) on the distinct colours of the data, or of a seeded sample of ``max_pixels`` pixels when
  the data has more distinct colours than that; torch only, bit-identical on the CPU for the same
  images, k and seed. :func:`cached_palette` keeps fits on disk, keyed by the data's content.
* :func:`palette_from_file` reads a user's palette (iGPT's published ``kmeans_centers.npy``), checked.
* :func:`encode` / :func:`decode` map float images in [0, 1] to long tokens ``[B, H*W]`` (raster order)
  and back, on the images' device, without host syncs in :func:`encode` (it runs inside compiled losses).

A palette is float32 ``[K, C]`` in [-1, 1] (a uint8 colour v is v / 127.5 - 1), rows distinct. A fitted
palette's rows are in a canonical order (luminance, then lexicographic); a file's order is kept, since
pretrained token ids index it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import GenrepError
from ..io import atomic_save_safetensors

__all__ = ["DEFAULT_COLOURS", "DEFAULT_ITERS", "cached_palette", "decode", "distinct_colours", "encode",
           "fit_palette", "palette_from_file"]

DEFAULT_COLOURS = 512   # iGPT's K for RGB
DEFAULT_ITERS = 20      # Lloyd iterations at most: on CIFAR-10 (k = 512), 40 more lower the error by only 1%
_VERSION = "1"          # bump when the fit changes, so cached palettes of the old fit are not reused
_RANGE_TOL = 1e-4       # how far outside [-1, 1] a file's value may be (float rounding) before it is refused
_HIST_CHUNK = 1 << 25   # pixels per histogram step: 128 MB of codes, fewer steps cost more time than memory
# distance-matrix elements per chunk: on the CPU a chunk that stays in cache is ~2x faster than a large one
_CPU_CHUNK, _DEVICE_CHUNK = 1 << 20, 1 << 25
_LUMA = {1: (1.0,), 3: (0.299, 0.587, 0.114)}  # BT.601, for the canonical row order


# ----------------------------------------------------------------------------------------------- checks
def _describe(t) -> str:
    return f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"


def _check_images(images, who: str) -> torch.Tensor:
    if (not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4
            or images.shape[1] not in (1, 3)):
        raise GenrepError(f"{who} needs uint8 images [N, C, H, W] with C = 1 or 3, got "
                          f"{_describe(images)}")
    if images.numel() == 0:
        raise GenrepError(f"{who} got no pixels (images of shape {tuple(images.shape)}); give at least one "
                          f"image")
    return images.cpu()


def _check_int(value, name: str, who: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GenrepError(f"{who}: {name} must be an integer >= {low}, got {value!r}")
    return value


def _check_palette(palette, who: str) -> torch.Tensor:
    if (not isinstance(palette, torch.Tensor) or not palette.is_floating_point() or palette.dim() != 2
            or palette.shape[0] < 1):
        raise GenrepError(f"{who} needs a float palette [K, C], got {_describe(palette)}; fit one with "
                          f"fit_palette or read one with palette_from_file")
    return palette


# ----------------------------------------------------------------------------------------------- colours
def _pack(channels: list[torch.Tensor]) -> torch.Tensor:
    """uint8 channel values -> int32 codes c0 * 256^(C-1) + ... + c(C-1): sorting codes sorts colours
    lexicographically."""
    codes = channels[0].to(torch.int32)
    for values in channels[1:]:
        codes.mul_(256).add_(values)
    return codes.reshape(-1)


def _unpack(codes: torch.Tensor, channels: int) -> torch.Tensor:
    shifts = torch.arange(channels - 1, -1, -1, dtype=torch.int64) * 8
    return ((codes.to(torch.int64)[:, None] >> shifts) & 255).to(torch.uint8)


def _histogram(images: torch.Tensor) -> torch.Tensor:
    """Pixel counts of every colour code, [256^C]: a bincount over 16.7M codes (RGB) is ~4x faster than
    torch.unique's sort on CIFAR-10's 51M pixels. In steps of images, so the codes of a large set (ImageNet32:
    1.3G pixels) are never all held."""
    n, c, h, w = images.shape
    rows = max(1, _HIST_CHUNK // (h * w))
    counts = torch.zeros(256 ** c, dtype=torch.int64)
    for a in range(0, n, rows):
        chunk = images[a:a + rows]
        counts += torch.bincount(_pack([chunk[:, ch] for ch in range(c)]), minlength=len(counts))
    return counts


def _sample_codes(images: torch.Tensor, max_pixels: int, generator: torch.Generator) -> torch.Tensor:
    """The codes of ``max_pixels`` pixels drawn uniformly, with replacement."""
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w)
    drawn = torch.randint(n * h * w, (max_pixels,), generator=generator)
    image, pixel = drawn // (h * w), drawn % (h * w)
    return _pack([flat[image, ch, pixel] for ch in range(c)])


def _to_unit(colours: torch.Tensor) -> torch.Tensor:
    return colours.to(torch.float32) / 127.5 - 1


def distinct_colours(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> the distinct pixel colours, uint8 [M, C], sorted lexicographically.

    CIFAR-10's training set (51M pixels, 1.67M distinct colours): about a second on the CPU."""
    images = _check_images(images, "distinct_colours")
    return _unpack(_histogram(images).nonzero().squeeze(1), images.shape[1])


def _canonical(palette: torch.Tensor) -> torch.Tensor:
    """Rows ordered by luminance, then lexicographically: one order for one set of colours, whatever the
    order the fit produced them in."""
    weights = torch.tensor(_LUMA[palette.shape[1]], dtype=torch.float64)
    luma = palette.to(torch.float64) @ weights
    order = torch.arange(len(palette))
    # stable sorts from the last key to the first give the lexicographic order of (luma, c0, c1, ...)
    for key in [palette[:, c] for c in reversed(range(palette.shape[1]))] + [luma]:
        order = order[torch.sort(key[order], stable=True).indices]
    return palette[order].contiguous()


# ----------------------------------------------------------------------------------------------- k-means
def _fit_points(images: torch.Tensor, counts: torch.Tensor, present: torch.Tensor, k: int, max_pixels: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour codes k-means sees and their pixel counts: every distinct colour of the data when there are
    at most ``max_pixels`` of them (exact, and cheap: the cost is per distinct colour, not per pixel), else
    the distinct colours of ``max_pixels`` pixels drawn with replacement."""
    if len(present) > max_pixels:
        sample = _sample_codes(images, max_pixels, generator)
        sample_counts = torch.bincount(sample, minlength=len(counts))
        sample_present = sample_counts.nonzero().squeeze(1)
        # a sample can miss colours; with fewer than k left (data dominated by a few colours) use them all
        if len(sample_present) >= k:
            return sample_present, sample_counts[sample_present]
    return present, counts[present]


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """An index drawn with probability proportional to ``weights`` (float64, >= 0), given u ~ U[0, 1)."""
    cdf = weights.cumsum(0)
    target = (u * cdf[-1]).clamp_max(torch.nextafter(cdf[-1], cdf.new_zeros(())))
    return torch.searchsorted(cdf, target[None], right=True)[0]


def _kmeans_pp(points: torch.Tensor, weights: torch.Tensor, k: int, generator: torch.Generator
               ) -> torch.Tensor:
    """k-means++ seeding, each point weighted by its pixel count; k distinct points, since a chosen point's
    distance is set to 0 and it cannot be drawn again. float64, so the cumulative sums are exact enough that
    a point of tiny weight is still drawn with its share of the probability."""
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64).to(points.device)
    x = points.to(torch.float64)
    sq = x.square().sum(1)
    chosen = [_draw(weights, uniforms[0])]
    nearest = torch.full_like(sq, float("inf"))
    for j in range(1, k):
        centre = x[chosen[-1]]
        d2 = torch.addmv(sq, x, centre, alpha=-2).add_(centre.square().sum()).clamp_min_(0)
        torch.minimum(nearest, d2, out=nearest)
        nearest[chosen[-1]] = 0
        chosen.append(_draw(weights * nearest, uniforms[j]))
    return points[torch.stack(chosen)].clone()


def _chunk_rows(k: int, device: torch.device) -> int:
    return max(1, (_CPU_CHUNK if device.type == "cpu" else _DEVICE_CHUNK) // max(k, 1))


def _nearest(points: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, squared distance) of each point's nearest centre, ties to the lowest index. ||x - c||^2 is
    ||c||^2 - 2 x.c + ||x||^2, one matmul per chunk: with C <= 3 an elementwise difference is 3x slower."""
    sq = centres.square().sum(1)
    rows = _chunk_rows(len(centres), points.device)
    # filled in place: a list of small per-chunk results between the large distance blocks fragments the
    # heap (2-4 MB of resident memory per chunk, gigabytes over CIFAR-10)
    index = torch.empty(len(points), dtype=torch.long, device=points.device)
    dist = torch.empty(len(points), device=points.device)
    with torch.autocast(points.device.type, enabled=False):  # float32, whatever autocast the caller set
        for a in range(0, len(points), rows):
            x = points[a:a + rows]
            torch.min(torch.addmm(sq, x, centres.T, alpha=-2), 1, out=(dist[a:a + rows], index[a:a + rows]))
            dist[a:a + rows] += x.square().sum(1)
    return index, dist


def _lloyd_step(points: torch.Tensor, weights: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """One assignment and weighted mean update; an empty cluster takes the point farthest from its centre
    (a deterministic choice: stable sort, so equal distances go to the lowest index)."""
    k, channels = centres.shape
    labels, dist = _nearest(points, centres)
    mass = torch.bincount(labels, weights=weights, minlength=k)
    # float64 sums in bincount (sequential on the CPU): the same bits on every run and thread count
    sums = torch.stack([torch.bincount(labels, weights=weights * points[:, c].double(), minlength=k)
                        for c in range(channels)], 1)
    new = torch.where(mass[:, None] > 0, sums / mass.clamp_min(1e-300)[:, None], centres.double()).float()
    empty = (mass == 0).nonzero().squeeze(1)
    if len(empty):
        far = torch.sort(dist, descending=True, stable=True).indices[:len(empty)]
        new[empty] = points[far]
    return new


def _distinct_rows(palette: torch.Tensor) -> bool:
    return len(torch.unique(palette, dim=0)) == len(palette)


def _kmeans(points: torch.Tensor, weights: torch.Tensor, k: int, iters: int, generator: torch.Generator
            ) -> torch.Tensor:
    centres = _kmeans_pp(points, weights, k, generator)
    for _ in range(iters):
        new = _lloyd_step(points, weights, centres)
        if torch.equal(new, centres):
            break
        centres = new
    # two clusters can land on one mean; the next step leaves the second empty and re-seeds it
    for _ in range(iters):
        if _distinct_rows(centres):
            break
        centres = _lloyd_step(points, weights, centres)
    return centres


def fit_palette(images: torch.Tensor, k: int, *, seed: int, device: torch.device | str = "cpu",
                max_pixels: int = 1_000_000, iters: int = DEFAULT_ITERS) -> torch.Tensor:
    """uint8 training images [N, C, H, W] (C = 1 or 3) -> float32 palette [k, C] in [-1, 1] on the CPU.

    A k-means fit on the pixel colours (v / 127.5 - 1): weighted by pixel counts, on every distinct colour
    when the data has at most ``max_pixels`` of them, else on ``max_pixels`` pixels drawn with a generator
    seeded by ``seed``; k-means++ seeding, at most ``iters`` Lloyd iterations (stopping early when the
    centres stop moving), empty clusters re-seeded with the farthest point. Same images, k and seed:
    bit-identical palette on the CPU (``device`` may be a GPU for speed, where sums are not ordered).
    k above the number of distinct colours is an error; k equal to it gives exactly those colours.
    Rows are sorted by luminance, then lexicographically. CIFAR-10 train (51M pixels, 1.67M distinct
    colours), k = 512: about 11 s on one CPU thread (AMD EPYC), mean quantisation error 3.8/255.
    """
    images = _check_images(images, "fit_palette")
    k = _check_int(k, "k (the number of colours)", "fit_palette", 2)
    _check_int(seed, "seed", "fit_palette", 0)
    max_pixels = _check_int(max_pixels, "max_pixels", "fit_palette", 1)
    iters = _check_int(iters, "iters", "fit_palette", 1)
    channels = images.shape[1]
    counts = _histogram(images)
    present = counts.nonzero().squeeze(1)
    if k > len(present):
        raise GenrepError(f"a palette of {k} colours cannot be fitted: the training images have only "
                          f"{len(present)} distinct colours; choose k <= {len(present)}")
    if k == len(present):
        return _canonical(_to_unit(_unpack(present, channels)))
    generator = torch.Generator().manual_seed(seed)
    colours, weights = _fit_points(images, counts, present, k, max_pixels, generator)
    del counts
    dev = torch.device(device)
    points = _to_unit(_unpack(colours, channels)).to(dev)
    centres = _kmeans(points, weights.to(dev, torch.float64), k, iters, generator)
    return _canonical(centres.cpu().clamp_(-1, 1))


# ----------------------------------------------------------------------------------------------- files
def _npy_error(path: Path, why: str) -> GenrepError:
    return GenrepError(f"palette file {path} {why}")


def _load_npy(path: Path) -> np.ndarray:
    want = "a .npy array [K, C] of floats in [-1, 1] (np.save), such as iGPT's kmeans_centers.npy"
    if not path.is_file():
        raise _npy_error(path, f"is not a file; give {want}")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic.startswith(b"PK"):
            raise _npy_error(path, f"is a zip archive (.npz?), not one array; give {want}")
        if magic != b"\x93NUMPY":
            raise _npy_error(path, f"is not a .npy file (no NumPy header); give {want}")
        array = np.load(path, allow_pickle=False)
    except GenrepError:
        raise
    except ValueError as e:
        if "pickle" in str(e):
            raise _npy_error(path, f"holds Python objects (pickled), which genrep never loads; give {want}"
                             ) from None
        raise _npy_error(path, f"cannot be read ({' '.join(str(e).split())[:160]}); give {want}") from None
    except Exception as e:  # noqa: BLE001 - truncated data, unreadable file, ...
        raise _npy_error(path, f"cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                               f"give {want}") from None
    return array


def palette_from_file(path: str | Path, channels: int) -> torch.Tensor:
    """A user's palette: a .npy array [K, channels] of floats in [-1, 1] with K >= 2 distinct rows, such as
    iGPT's published ``kmeans_centers.npy`` (512 x 3). Read with ``allow_pickle=False`` and checked; values
    within 1e-4 outside [-1, 1] (float rounding) are clamped. The file's row order is kept. Each failure
    is a one-line :class:`GenrepError` naming the file. Returns float32 [K, channels] on the CPU."""
    if channels not in (1, 3):
        raise GenrepError(f"palette_from_file: channels must be 1 or 3 (the data's channels), got "
                          f"{channels!r}")
    path = Path(path)
    a = _load_npy(path)
    if a.dtype.kind != "f":
        raise _npy_error(path, f"holds {a.dtype} values; a palette is floats in [-1, 1] (a uint8 colour v is "
                               f"v / 127.5 - 1)")
    if a.ndim != 2 or a.shape[1] != channels:
        raise _npy_error(path, f"has shape {tuple(a.shape)}; the data has {channels} channel"
                               f"{'s' if channels > 1 else ''}, so the palette must be [K, {channels}]")
    if a.shape[0] < 2:
        raise _npy_error(path, f"has {a.shape[0]} colour{'s' if a.shape[0] != 1 else ''}; a palette needs at "
                               f"least 2")
    bad = int((~np.isfinite(a)).any(axis=1).sum())
    if bad:
        raise _npy_error(path, f"has {bad} colour{'s' if bad > 1 else ''} with NaN or infinite values; every "
                               f"value must be finite, in [-1, 1]")
    low, high = float(a.min()), float(a.max())
    if low < -1 - _RANGE_TOL or high > 1 + _RANGE_TOL:
        hint = "; it looks like 0..255 colours: save v / 127.5 - 1" if low >= 0 and high <= 255 else ""
        raise _npy_error(path, f"has values in [{low:.4g}, {high:.4g}]; a palette's values must lie in "
                               f"[-1, 1]{hint}")
    palette = np.clip(a, -1, 1).astype(np.float32)
    unique, first, counts = np.unique(palette, axis=0, return_index=True, return_counts=True)
    if len(unique) != len(palette):
        dup = int(np.sort(first[counts > 1])[0])
        rows = np.flatnonzero((palette == palette[dup]).all(axis=1))
        repeats = len(palette) - len(unique)
        raise _npy_error(path, f"has {repeats} repeated colour{'s' if repeats > 1 else ''} (rows {rows[0]} "
                               f"and {rows[1]} are equal in float32); every colour must be distinct")
    return torch.from_numpy(np.ascontiguousarray(palette))


# ----------------------------------------------------------------------------------------------- tokens
def encode(x: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """float images [B, C, H, W] in [0, 1] -> long tokens [B, H*W] in raster order, on the images' device.

    Each pixel's token is the index of its nearest palette colour (squared distance in [-1, 1] space, as
    ||c||^2 - 2 x.c in float32; equal distances go to the lowest index). Chunked, so the [pixels, K]
    distance matrix never exceeds ~4 MB on the CPU (cache-sized) or ~128 MB on a GPU; no host sync, so it
    can run inside a compiled loss."""
    palette = _check_palette(palette, "encode")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise GenrepError(f"encode needs float images [B, C, H, W] in [0, 1], got {_describe(x)}")
    b, c, h, w = x.shape
    if c != palette.shape[1]:
        raise GenrepError(f"encode: the images have {c} channels but the palette's colours have "
                          f"{palette.shape[1]}; use a palette fitted on (or made for) this data")
    pal = palette.to(device=x.device, dtype=torch.float32)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, c)
    sq = pal.square().sum(1)
    rows = _chunk_rows(len(pal), x.device)
    tokens = torch.empty(len(pixels), dtype=torch.long, device=x.device)  # in place: see _nearest
    # the training loop's bf16 autocast would run the matmul with 8-bit mantissas: nearest colours ~1e-2 apart
    # would swap
    with torch.autocast(x.device.type, enabled=False):
        for a in range(0, len(pixels), rows):
            d = torch.addmm(sq, pixels[a:a + rows].float() * 2 - 1, pal.T, alpha=-2)
            tokens[a:a + rows] = d.argmin(1)
    return tokens.view(b, h * w)


def decode(tokens: torch.Tensor, palette: torch.Tensor, image_size: int) -> torch.Tensor:
    """long tokens [B, H*W] (H = W = ``image_size``) -> float images [B, C, H, W] in [0, 1] on the tokens'
    device: each token's palette colour, (colour + 1) / 2."""
    palette = _check_palette(palette, "decode")
    image_size = _check_int(image_size, "image_size", "decode", 1)
    if (not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32)
            or tokens.dim() != 2 or tokens.shape[1] != image_size * image_size):
        raise GenrepError(f"decode needs integer tokens [B, {image_size * image_size}] for {image_size}x"
                          f"{image_size} images, got {_describe(tokens)}")
    k = len(palette)
    low, high = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
    if low < 0 or high >= k:
        raise GenrepError(f"decode: tokens range over [{low}, {high}] but the palette has {k} colours; "
                          f"tokens must lie in [0, {k - 1}]")
    colours = (palette.to(device=tokens.device, dtype=torch.float32) + 1) / 2
    b = tokens.shape[0]
    return colours[tokens.long()].view(b, image_size, image_size, -1).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------- cache
def _cache_key(images: torch.Tensor, k: int, seed: int) -> tuple[str, str]:
    """(file name, full key) of a fit: the data by content (sha256 of its pixels), its size, k and seed."""
    _, c, h, w = images.shape
    sha = hashlib.sha256(images.contiguous().numpy()).hexdigest()  # the buffer itself, no copy
    key = f"v{_VERSION}|{h}x{w}|c{c}|k{k}|s{seed}|{sha}"
    return f"palette-{h}x{w}-c{c}-k{k}-s{seed}-{sha[:12]}.safetensors", key


def _read_cached(path: Path, key: str, k: int, channels: int) -> torch.Tensor:
    from safetensors import safe_open

    def bad(why: str) -> GenrepError:
        return GenrepError(f"the cached palette {path} is not a valid palette for this data ({why}); remove "
                           f"it to refit")

    try:
        with safe_open(str(path), "pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
            palette = f.get_tensor("palette") if names == ["palette"] else None
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, unreadable
        raise bad(f"unreadable: {' '.join(str(e).split())[:120]}") from None
    if palette is None:
        raise bad(f"it holds {names}, not one tensor 'palette'")
    if meta.get("key") != key:
        raise bad(f"its key {str(meta.get('key'))[:60]!r} is not this fit's {key[:60]!r}")
    if palette.dtype != torch.float32 or tuple(palette.shape) != (k, channels):
        raise bad(f"{palette.dtype} {tuple(palette.shape)}, expected float32 ({k}, {channels})")
    if not torch.isfinite(palette).all() or palette.abs().max() > 1:
        raise bad("values not finite or outside [-1, 1]")
    if not _distinct_rows(palette):
        raise bad("repeated colours")
    return palette


def cached_palette(images: torch.Tensor, k: int, *, seed: int, device, cache_dir: Path | None = None
                   ) -> torch.Tensor:
    """:func:`fit_palette` (default ``max_pixels`` and ``iters``) through an on-disk cache.

    The file ``palette-HxW-cC-kK-sSEED-<sha256[:12]>.safetensors`` in ``cache_dir`` (default
    ``default_data_root() / "palettes"``) holds the palette under the full key (fit version, size, channels,
    k, seed, sha256 of the images' bytes), so the same data set, size, k and seed reuse one fit. Written
    atomically; read back checked, and a file that fails the check is a one-line error naming it, left in
    place (it may not be genrep's to delete)."""
    images = _check_images(images, "cached_palette")
    k = _check_int(k, "k (the number of colours)", "cached_palette", 2)
    _check_int(seed, "seed", "cached_palette", 0)
    if cache_dir is None:
        from .datasets import default_data_root

        cache_dir = default_data_root() / "palettes"
    name, key = _cache_key(images, k, seed)
    path = Path(cache_dir) / name
    if path.exists():
        return _read_cached(path, key, k, images.shape[1])
    t0 = time.perf_counter()
    palette = fit_palette(images, k, seed=seed, device=device)
    seconds = f"{time.perf_counter() - t0:.2f}"
    atomic_save_safetensors(path, {"palette": palette}, metadata={"key": key, "seconds": seconds})
    return palette
