"""Tests for genrep.data.augment: the interface, determinism, exact agreement with torchvision's functional
ops for given parameters, and agreement in distribution with torchvision's random transforms per image."""

import contextlib

import pytest
import torch
import torchvision.transforms as T1
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from genrep.data import augment as A
from genrep.data import autoaugment as AA
from genrep.data.augment import AUGMENTATIONS, augment
from genrep.errors import GenrepError


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(b, c=3, h=12, w=10, seed=0):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=_gen(seed))


def _structured_image(h=16, w=16):
    """A left-right and top-bottom asymmetric colour image: flip, crop and colour bugs change its stats."""
    ys = torch.linspace(0, 1, h)[:, None].expand(h, w)
    xs = torch.linspace(0, 1, w)[None, :].expand(h, w)
    noise = torch.rand(h, w, generator=_gen(1))
    img = torch.stack((0.9 * xs**2 + 0.05, 0.2 + 0.6 * ys * (1 - xs), 0.3 * noise + 0.4 * (xs > 0.7)))
    return (img * 255).round().to(torch.uint8)


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov distance between 1-D samples."""
    grid = torch.cat((a, b)).unique()
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# interface


@pytest.mark.parametrize("kind", AUGMENTATIONS)
@pytest.mark.parametrize("c", [1, 3])
def test_shape_dtype_range_device(kind, c):
    x = _images(6, c=c, h=12, w=10)  # non-square catches swapped H and W
    y = augment(x, kind, _gen())
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1 and torch.isfinite(y).all()


def test_none_is_exact():
    x = _images(5)
    assert torch.equal(augment(x, "none", _gen()), x.float() / 255)


@pytest.mark.parametrize("kind", ["weak", "strong", "classifier", "crop"])
def test_random_kinds_change_images(kind):
    x = _images(16)
    y = augment(x, kind, _gen())
    changed = (y - x.float() / 255).flatten(1).abs().amax(1) > 0
    assert changed.float().mean() > 0.5


@pytest.mark.parametrize("kind", AUGMENTATIONS)
def test_same_seed_same_output_other_seed_differs(kind):
    x = _images(8)
    a, b = augment(x, kind, _gen(3)), augment(x, kind, _gen(3))
    assert torch.equal(a, b)
    if kind != "none":
        assert not torch.equal(a, augment(x, kind, _gen(4)))


@pytest.mark.parametrize("kind", AUGMENTATIONS)
@pytest.mark.parametrize("c", [1, 3])
def test_split_batch_matches_whole_batch(kind, c):
    x = _images(8, c=c)
    whole = augment(x, kind, _gen(7), total=8)
    parts = [augment(x[:4], kind, _gen(7), start=0, total=8), augment(x[4:], kind, _gen(7), start=4, total=8)]
    assert torch.equal(whole, torch.cat(parts))
    assert torch.equal(whole, augment(x, kind, _gen(7)))  # total defaults to B


def test_unknown_kind_raises():
    with pytest.raises(GenrepError, match="none, weak, strong"):
        augment(_images(2), "medium", _gen())


@pytest.mark.parametrize(
    "call",
    [
        lambda: augment(_images(2).float(), "weak", _gen()),  # not uint8
        lambda: augment(_images(2, c=4), "weak", _gen()),  # 4 channels
        lambda: augment(_images(2)[0], "weak", _gen()),  # no batch dim
        lambda: augment(_images(4), "weak", _gen(), start=2, total=5),  # rows past total
        lambda: augment(_images(4), "weak", _gen(), start=-1, total=8),
        lambda: augment(_images(2, h=4, w=4), "weak", _gen(), pad=4),  # reflect pad must be < size
        lambda: augment(_images(2), "strong", "seed"),
    ],
)
def test_bad_inputs_raise(call):
    with pytest.raises(GenrepError):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", AUGMENTATIONS)
def test_gpu_matches_cpu(kind):
    x = _images(64, h=32, w=32)
    cpu = augment(x, kind, _gen(5))
    gpu = augment(x.cuda(), kind, _gen(5))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# colour ops: exact agreement with torchvision.transforms.v2.functional for fixed factors


_OPS = [
    (A.adjust_brightness, TF.adjust_brightness, (0.0, 2.0)),
    (A.adjust_contrast, TF.adjust_contrast, (0.0, 2.0)),
    (A.adjust_saturation, TF.adjust_saturation, (0.0, 2.0)),
    (A.adjust_hue, TF.adjust_hue, (-0.5, 0.5)),
    (AA.adjust_sharpness, TF.adjust_sharpness, (0.0, 2.0)),  # AutoAugment's (tests/test_classifier_augment.py)
    (AA.solarize, TF.solarize, (0.0, 1.0)),
]


@pytest.mark.parametrize("ours,theirs,span", _OPS,
                         ids=["brightness", "contrast", "saturation", "hue", "sharpness", "solarize"])
@pytest.mark.parametrize("c", [1, 3])
def test_colour_op_matches_torchvision(ours, theirs, span, c):
    x = torch.rand(32, c, 7, 9, generator=_gen(2))
    x[:4] = x[:4].round()  # saturated pixels and, for hue, grays with max == min
    factor = span[0] + (span[1] - span[0]) * torch.rand(32, generator=_gen(3))
    expected = torch.stack([theirs(x[i], float(factor[i])) for i in range(32)])
    tol = 1e-5 if ours is not A.adjust_hue else 1e-4  # hue goes through HSV and back
    torch.testing.assert_close(ours(x, factor), expected, atol=tol, rtol=0)


def test_grayscale_matches_torchvision():
    x = torch.rand(8, 3, 5, 6, generator=_gen(4))
    torch.testing.assert_close(A.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_colour_jitter_applies_each_samples_order():
    x = torch.rand(24, 3, 6, 6, generator=_gen(5))
    lo, hi = torch.tensor([0.6, 0.6, 0.6, -0.1]), torch.tensor([1.4, 1.4, 1.4, 0.1])
    factors = lo + (hi - lo) * torch.rand(24, 4, generator=_gen(6))
    order = torch.stack([torch.randperm(4, generator=_gen(10 + i)) for i in range(24)])
    apply = torch.arange(24) % 5 != 0
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for i in range(24):
        img = x[i]
        for op in order[i].tolist() if apply[i] else []:
            img = fns[op](img, float(factors[i, op]))
        expected.append(img)
    ours = A._color_jitter(x, factors, order, apply)
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# strong: parameters against torchvision's samplers, replay with torchvision's functional ops


def test_resized_crop_matches_torchvision_resized_crop():
    h, w = 12, 10
    x = torch.rand(40, 3, h, w, generator=_gen(8))
    g = _gen(9)
    crop_h = torch.randint(1, h + 1, (40,), generator=g).double()
    crop_w = torch.randint(1, w + 1, (40,), generator=g).double()
    crop_h[:2], crop_w[:2] = h, w  # the whole image must come back unchanged
    top = (torch.rand(40, generator=g, dtype=torch.float64) * (h - crop_h + 1)).floor()
    left = (torch.rand(40, generator=g, dtype=torch.float64) * (w - crop_w + 1)).floor()
    flip = torch.arange(40) % 3 == 0
    expected = []
    for i in range(40):
        box = int(top[i]), int(left[i]), int(crop_h[i]), int(crop_w[i])
        img = TF.resized_crop(x[i], *box, [h, w], antialias=True)
        expected.append(TF.horizontal_flip(img) if flip[i] else img)
    ours = A._resized_crop(x, top, left, crop_h, crop_w, flip)
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], x[1], atol=1e-5, rtol=0)


def _boxes_like_torchvision(u, h, w, scale, seed):
    """Our strong crop boxes for the draws ``u`` and torchvision's RandomResizedCrop boxes (as many, from
    ``seed``), checked to have the same distribution of area, aspect and position."""
    ours = A._strong_params(u, h, w, scale)
    torch.manual_seed(seed)
    img = torch.zeros(1, h, w)
    boxes = [T1.RandomResizedCrop.get_params(img, [scale, 1.0], [3 / 4, 4 / 3]) for _ in range(len(u))]
    theirs = torch.tensor(boxes, dtype=torch.float64)
    for name, a, b in [
        ("area", ours.crop_h * ours.crop_w, theirs[:, 2] * theirs[:, 3]),
        ("aspect", ours.crop_w / ours.crop_h, theirs[:, 3] / theirs[:, 2]),
        ("top", ours.top, theirs[:, 0]),
        ("left", ours.left, theirs[:, 1]),
    ]:
        # KS 5-sigma-ish bound for two samples of 6000: 2.3 * sqrt(2 / n) = 0.042. Scale (0.08, 1) gives ~0.2.
        assert _ks(a, b) < 0.045, name
    return ours, theirs


@pytest.mark.parametrize("h,w", [(32, 32), (24, 40)])
def test_crop_box_distribution_matches_torchvision(h, w):
    u = torch.rand(6000, A.STRONG_COLUMNS, generator=_gen(11), dtype=torch.float64)
    ours, _ = _boxes_like_torchvision(u, h, w, 0.2, seed=12)
    assert (ours.top >= 0).all() and (ours.top + ours.crop_h <= h).all()
    assert (ours.left >= 0).all() and (ours.left + ours.crop_w <= w).all()


@pytest.mark.parametrize("h,w", [(4, 64), (64, 4)])
def test_crop_fallback_matches_torchvision(h, w):
    # No box with area >= 20% of the image and aspect in [3/4, 4/3] fits, so every try fails.
    u = torch.rand(50, A.STRONG_COLUMNS, generator=_gen(13), dtype=torch.float64)
    p = A._strong_params(u, h, w)
    expected = T1.RandomResizedCrop.get_params(torch.zeros(1, h, w), [0.2, 1.0], [3 / 4, 4 / 3])
    for got in zip(p.top, p.left, p.crop_h, p.crop_w):
        assert tuple(int(v) for v in got) == expected


def test_jitter_and_flip_parameter_distributions():
    n = 20000
    p = A._strong_params(torch.rand(n, A.STRONG_COLUMNS, generator=_gen(14), dtype=torch.float64), 32, 32)
    # Rates within ~5 binomial sigmas (sigma <= 0.0036).
    assert abs(p.flip.double().mean() - 0.5) < 0.018
    assert abs(p.jitter_on.double().mean() - 0.8) < 0.015
    assert abs(p.gray_on.double().mean() - 0.2) < 0.015
    for k, (lo, hi) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
        f = p.factors[:, k]
        assert lo <= f.min() < lo + 0.01 and hi - 0.01 < f.max() <= hi
        assert abs(f.mean() - (lo + hi) / 2) < 0.01 * (hi - lo)
    perms = (p.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(perms, minlength=256)[perms.unique()]
    assert len(counts) == 24  # every op order occurs, each about 1/24 of the time
    assert ((counts / n - 1 / 24).abs() < 0.01).all()


@pytest.mark.parametrize("c", [1, 3])
def test_strong_replays_torchvision_ops_with_its_parameters(c):
    x = _images(48, c=c, h=12, w=10, seed=15)
    ours = augment(x, "strong", _gen(16))
    p = A._strong_params(A._draw(_gen(16), 48, 0, 48, A.STRONG_COLUMNS), 12, 10)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(48):
        box = int(p.top[i]), int(p.left[i]), int(p.crop_h[i]), int(p.crop_w[i])
        img = TF.resized_crop(x[i].float() / 255, *box, [12, 10])
        img = TF.horizontal_flip(img) if p.flip[i] else img
        for op in p.order[i].tolist() if p.jitter_on[i] else []:
            img = fns[op](img, float(p.factors[i, op]))
        img = TF.rgb_to_grayscale(img, num_output_channels=c) if p.gray_on[i] else img
        torch.testing.assert_close(ours[i], img, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# crop (MAE's): strong's crop box and flip, resized bicubically, and nothing else


def test_bicubic_resized_crop_matches_torchvision_resized_crop():
    h, w = 12, 10
    x = torch.rand(60, 3, h, w, generator=_gen(30))
    g = _gen(31)
    crop_h = torch.randint(1, h + 1, (60,), generator=g).double()
    crop_w = torch.randint(1, w + 1, (60,), generator=g).double()
    crop_h[:2], crop_w[:2] = h, w  # the whole image must come back unchanged
    crop_h[2:4], crop_w[2:4] = 1, 1  # one pixel: every tap but one is outside the box
    top = (torch.rand(60, generator=g, dtype=torch.float64) * (h - crop_h + 1)).floor()
    left = (torch.rand(60, generator=g, dtype=torch.float64) * (w - crop_w + 1)).floor()
    flip = torch.arange(60) % 3 == 0
    expected = []
    for i in range(60):
        box = int(top[i]), int(left[i]), int(crop_h[i]), int(crop_w[i])
        img = TF.resized_crop(x[i], *box, [h, w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        img = img.clamp(0, 1)  # the cubic overshoots; torchvision leaves float images unclamped
        expected.append(TF.horizontal_flip(img) if flip[i] else img)
    ours = A._resized_crop(x, top, left, crop_h, crop_w, flip, interpolation="bicubic")
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], x[1], atol=1e-5, rtol=0)
    # The test can tell: bilinear, or torch's bicubic without antialias (a = -0.75, the box's edge pixels
    # repeated instead of the taps outside it dropped), differ from it by far more than the tolerance.
    boxes = [(int(top[i]), int(left[i]), int(crop_h[i]), int(crop_w[i])) for i in range(60)]
    a75 = torch.stack([TF.resized_crop(x[i], *boxes[i], [h, w], interpolation=TF.InterpolationMode.BICUBIC,
                                       antialias=False) for i in range(60)]).clamp(0, 1)
    a75 = torch.where(flip.view(-1, 1, 1, 1), a75.flip(3), a75)
    for other in (a75, A._resized_crop(x, top, left, crop_h, crop_w, flip)):
        assert ((other - ours).flatten(1).abs().amax(1)[4:] > 1e-2).double().mean() > 0.9


@pytest.mark.parametrize("h,w", [(32, 32), (24, 40), (4, 64)])
def test_crop_params_are_the_strong_crop_params(h, w):
    # So the strong tests of the box distribution, the fallback and the flip rate against torchvision
    # cover crop too.
    u = torch.rand(500, A.STRONG_COLUMNS, generator=_gen(32), dtype=torch.float64)
    strong = A._strong_params(u, h, w)
    for got in (A._crop_params(u, h, w), A._crop_params(u[:, : A.CROP_COLUMNS], h, w)):
        for name, a in got._asdict().items():
            assert torch.equal(a, getattr(strong, name)), name


@pytest.mark.parametrize("c", [1, 3])
def test_crop_replays_torchvision_ops_with_its_parameters(c):
    x = _images(48, c=c, h=12, w=10, seed=33)
    ours = augment(x, "crop", _gen(34))
    p = A._crop_params(A._draw(_gen(34), 48, 0, 48, A.CROP_COLUMNS), 12, 10)
    assert 0 < p.flip.sum() < 48 and (p.crop_h * p.crop_w < 120).sum() > 40
    for i in range(48):
        box = int(p.top[i]), int(p.left[i]), int(p.crop_h[i]), int(p.crop_w[i])
        img = TF.resized_crop(x[i].float() / 255, *box, [12, 10], interpolation=TF.InterpolationMode.BICUBIC,
                              antialias=True).clamp(0, 1)
        img = TF.horizontal_flip(img) if p.flip[i] else img
        torch.testing.assert_close(ours[i], img, atol=1e-5, rtol=0)


def test_crop_agrees_with_maes_pil_pipeline():
    # MAE crops and resizes uint8 PIL images (interpolation=3), which PIL rounds and clips to 0..255 after
    # each of its two 1-D passes; torchvision's antialiased bicubic uses PIL's filter, so only that differs.
    from PIL import Image

    x = _images(64, h=16, w=16, seed=35)
    ours = augment(x, "crop", _gen(36))
    p = A._crop_params(A._draw(_gen(36), 64, 0, 64, A.CROP_COLUMNS), 16, 16)
    diffs = []
    for i in range(64):
        box = int(p.top[i]), int(p.left[i]), int(p.crop_h[i]), int(p.crop_w[i])
        img = T1.functional.resized_crop(Image.fromarray(x[i].permute(1, 2, 0).numpy()), *box, [16, 16],
                                         interpolation=T1.InterpolationMode.BICUBIC)
        img = T1.functional.hflip(img) if p.flip[i] else img
        diffs.append((T1.functional.pil_to_tensor(img).float() - ours[i] * 255).abs())
    diffs = torch.stack(diffs)
    # Rounding alone gives a mean of ~0.25 (0..255 scale); the intermediate clipping matters at few pixels of
    # this noise image. Bilinear instead of bicubic, or a = -0.75, gives a mean of several units.
    assert diffs.mean() < 0.5 and (diffs > 1).double().mean() < 0.05


def test_crop_changes_no_colour():
    # Flat colour: a crop of it is the same colour, and there is no jitter or grayscale to change it.
    colour = torch.tensor([180, 100, 50], dtype=torch.uint8)
    flat = colour.view(1, 3, 1, 1).expand(500, 3, 12, 10)
    out = augment(flat, "crop", _gen(37))
    torch.testing.assert_close(out, (colour.float() / 255).view(1, 3, 1, 1).expand_as(out), atol=1e-6, rtol=0)
    # Each channel is cropped on its own, with the same box and flip: no colour mixing.
    x = _images(40, seed=38)
    out = augment(x, "crop", _gen(39))
    for k in range(3):
        assert torch.equal(out[:, k : k + 1], augment(x[:, k : k + 1].contiguous(), "crop", _gen(39)))


# ----------------------------------------------------------------------------------------------------
# weak: exact crops, uniform offsets, fair flips


def test_weak_offsets_uniform_flips_fair_and_crops_exact():
    n, pad = 9000, 4
    # Pixel (y, x) of a 16 x 16 image holds 16 y + x, so each output pixel says where it came from.
    img = (16 * torch.arange(16)[:, None] + torch.arange(16)).to(torch.uint8)
    out = (augment(img.expand(n, 1, 16, 16), "weak", _gen(17), pad=pad) * 255).round().long()[:, 0]
    src_row, src_col, next_col = out[:, 8, 8] // 16, out[:, 8, 8] % 16, out[:, 8, 9] % 16
    flip = next_col < src_col
    top = src_row - 8 + pad  # the centre pixel never reaches the reflected border, so no ambiguity
    left = torch.where(flip, src_col - 7 + pad, src_col - 8 + pad)

    assert abs(flip.double().mean() - 0.5) < 0.025  # ~4.7 sigma
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=2 * pad + 1).double()
        assert len(counts) == 2 * pad + 1 and (counts > 0).all()
        chi2 = ((counts - n / counts.numel()) ** 2 / (n / counts.numel())).sum()
        assert chi2 < 35  # 8 dof: p < 1e-4; a 7-position crop gives chi2 ~ 2000

    padded = TF.pad(img[None].float(), [pad] * 4, padding_mode="reflect")
    for i in range(0, n, 97):
        expected = TF.crop(padded, int(top[i]), int(left[i]), 16, 16)
        expected = TF.horizontal_flip(expected) if flip[i] else expected
        assert torch.equal(out[i].float(), expected[0])


# ----------------------------------------------------------------------------------------------------
# whole pipelines against torchvision's random transforms, one image at a time


def _torchvision_weak(size, pad):
    return T.Compose([T.RandomCrop(size, padding=pad, padding_mode="reflect"), T.RandomHorizontalFlip(0.5)])


def _torchvision_strong(size):
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            T.RandomHorizontalFlip(0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
        ]
    )


def _torchvision_crop(size):
    # MAE's main_pretrain.py: RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=3) (3 is bicubic),
    # RandomHorizontalFlip()
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                                interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.RandomHorizontalFlip(0.5),
            T.Lambda(lambda img: img.clamp(0, 1)),  # as PIL's uint8 and ours; torchvision's float is not
        ]
    )


@contextlib.contextmanager
def _one_thread():
    # Small-tensor ops (above all torchvision's per-image ones) run up to 20x slower on 2 threads than on 1
    # when the 2 cores are busy with anything else.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _both(kind, transform, img, n, seed):
    """n augmentations of one uint8 image [C, H, W]: ours batched, and torchvision's one call per image."""
    torch.manual_seed(seed)
    with _one_thread():
        ours = augment(img.expand(n, *img.shape), kind, _gen(seed))
        theirs = torch.stack([transform(img.float() / 255) for _ in range(n)])
    return ours, theirs


def test_weak_statistics_match_torchvision():
    ours, theirs = _both("weak", _torchvision_weak((16, 16), 4), _structured_image(), 2000, 18)
    # Per-pixel mean and std images; pixel std is <= 0.45, so the difference of two means has sigma <= 0.015.
    assert (ours.mean(0) - theirs.mean(0)).abs().max() < 0.06
    assert (ours.std(0) - theirs.std(0)).abs().max() < 0.06
    # Mean horizontal gradient of the red ramp: its sign is the flip, so it measures the flip rate.
    grad = lambda y: (y[:, 0, :, 9:].mean((1, 2)) - y[:, 0, :, :7].mean((1, 2))).sign().mean()
    assert abs(grad(ours) - grad(theirs)) < 0.1


def _summaries(y):
    """Per-sample statistics that respond to crop scale and ratio, flip, each colour op, and grayscale."""
    h, s, v = A._rgb_to_hsv(y.mean((2, 3), keepdim=True))  # the sample's mean colour
    luma = A.rgb_to_grayscale(y)
    stats = {
        "hue": h.flatten(),  # hue jitter; brightness, contrast and saturation keep hue
        "saturation": s.flatten(),
        "value": v.flatten(),
        "luma_std": luma.std((1, 2, 3)),  # contrast
        "chroma": (y.amax(1) - y.amin(1)).mean((1, 2)),
        "left_right": y[:, 0, :, 8:].mean((1, 2)) - y[:, 0, :, :8].mean((1, 2)),  # the red ramp: flips
        "edges_x": (y[..., 1:] - y[..., :-1]).abs().mean((1, 2, 3)),  # small crops are blown up: smoother
        "edges_y": (y[..., 1:, :] - y[..., :-1, :]).abs().mean((1, 2, 3)),  # with edges_x: aspect ratio
    }
    for c in range(3):
        stats[f"mean{c}"], stats[f"std{c}"] = y[:, c].mean((1, 2)), y[:, c].std((1, 2))
    return stats


def test_strong_statistics_match_torchvision():
    n = 3000
    ours, theirs = _both("strong", _torchvision_strong((16, 16)), _structured_image(), n, 19)
    assert (ours.mean(0) - theirs.mean(0)).abs().max() < 0.04
    assert (ours.std(0) - theirs.std(0)).abs().max() < 0.04
    gray = lambda y: (y.amax(1) == y.amin(1)).flatten(1).all(1).double().mean()
    assert abs(gray(ours) - gray(theirs)) < 0.04  # ~0.2 each, two-sample sigma 0.01
    a, b = _summaries(ours), _summaries(theirs)
    for name in a:
        # Two-sample KS with n = 3000: sigma-free bound 1.95 * sqrt(2 / n) = 0.05 at p = 0.001.
        assert _ks(a[name], b[name]) < 0.06, name


def test_crop_statistics_match_torchvision():
    n = 3000
    ours, theirs = _both("crop", _torchvision_crop((16, 16)), _structured_image(), n, 40)
    assert (ours.mean(0) - theirs.mean(0)).abs().max() < 0.04
    assert (ours.std(0) - theirs.std(0)).abs().max() < 0.04
    a, b = _summaries(ours), _summaries(theirs)
    for name in a:
        assert _ks(a[name], b[name]) < 0.06, name  # as for strong: 0.05 at p = 0.001


def test_strong_colour_statistics_match_torchvision():
    # A flat image makes the crop irrelevant, so the output colour shows the colour ops alone.
    colour = torch.tensor([180, 100, 50], dtype=torch.uint8)
    flat = colour.view(3, 1, 1).expand(3, 4, 4)
    ours, theirs = _both("strong", _torchvision_strong((4, 4)), flat, 4000, 21)
    ours, theirs = ours[:, :, 0, 0], theirs[:, :, 0, 0]

    unchanged = lambda y: ((y - colour / 255).abs().amax(1) < 1e-6).double().mean()
    gray = lambda y: (y.amax(1) == y.amin(1)).double().mean()
    # Expected 0.2 * 0.8 = 0.16 unchanged (jitter off, grayscale off) and 0.2 gray; two-sample sigma <= 0.009.
    assert abs(unchanged(ours) - unchanged(theirs)) < 0.04
    assert abs(gray(ours) - gray(theirs)) < 0.04

    # Among jittered colour outputs, compare r, g, b, h, s, v: hue jitter moves h, brightness v, contrast and
    # saturation (both blends towards the same gray on a flat image) s.
    def channels(y):
        y = y[((y - colour / 255).abs().amax(1) > 1e-6) & (y.amax(1) > y.amin(1))]
        return torch.cat((y, torch.cat(A._rgb_to_hsv(y[:, :, None, None]), 1).flatten(1)), 1).T

    for name, a, b in zip("rgbhsv", channels(ours), channels(theirs)):
        assert _ks(a, b) < 0.06, name  # n ~ 2500 each: 1.95 * sqrt(2 / n) = 0.055 at p = 0.001
        # Spread, about 2% noise: a contrast or saturation range of 0.3 instead of 0.4 moves s's by ~10%.
        assert abs(a.std() / b.std() - 1) < 0.08, name


# ----------------------------------------------------------------------------------------------------
# the strong view's crop scale (GCRL's table 9: "weak augmentation" is table 2's pipeline with scale 0.8)


@pytest.mark.parametrize("h,w", [(32, 32), (24, 40)])
def test_crop_scale_box_distribution_matches_torchvision(h, w):
    u = torch.rand(6000, A.STRONG_COLUMNS, generator=_gen(41), dtype=torch.float64)
    ours, theirs = _boxes_like_torchvision(u, h, w, 0.8, seed=42)
    # never below 0.8 of the area: each side is the rounding of a box of area >= 0.8 h w (so within half a pixel
    # of it), or the fallback, the largest box of an allowed aspect (0.8 of a 24x40 image); torchvision alike
    for box_h, box_w in ((ours.crop_h, ours.crop_w), (theirs[:, 2], theirs[:, 3])):
        assert ((box_h + 0.5) * (box_w + 0.5) >= 0.8 * h * w).all()
    assert (ours.crop_h * ours.crop_w).min() >= 0.75 * h * w  # the whole draw sits far above table 2's 0.2
    assert (ours.top >= 0).all() and (ours.top + ours.crop_h <= h).all()
    assert (ours.left >= 0).all() and (ours.left + ours.crop_w <= w).all()
    # the crop kind draws the same boxes
    crop = A._crop_params(u, h, w, 0.8)
    assert torch.equal(crop.crop_h, ours.crop_h) and torch.equal(crop.top, ours.top)


@pytest.mark.parametrize("kind", ["strong", "crop"])
def test_crop_scale_default_is_todays_augmentation(kind):
    x = _images(16, 3, 16, 16)
    today = augment(x, kind, _gen(5))  # a bare kind: the pipeline before the key existed
    assert A.Augmentation(kind).crop_scale == 0.2 == A.CROP_SCALE[0]
    assert torch.equal(augment(x, A.Augmentation(kind, crop_scale=0.2), _gen(5)), today)
    u = torch.rand(64, A.STRONG_COLUMNS, generator=_gen(6), dtype=torch.float64)
    for name, a in A._strong_params(u, 16, 16)._asdict().items():
        assert torch.equal(a, getattr(A._strong_params(u, 16, 16, 0.2), name)), name
    assert not torch.equal(augment(x, A.Augmentation(kind, crop_scale=0.8), _gen(5)), today)


@pytest.mark.parametrize("scale", [0.0, -0.1, 1.5, float("nan"), True])
def test_crop_scale_outside_0_1_is_refused(scale):
    with pytest.raises(GenrepError, match="crop_scale"):
        augment(_images(2), A.Augmentation("strong", crop_scale=scale), _gen())
    augment(_images(2), A.Augmentation("strong", crop_scale=1.0), _gen())  # the whole image is allowed


# ----------------------------------------------------------------------------------------------------
# random erasing as MAE fine-tunes (timm's mode 'pixel'): torchvision's RandomErasing box, noise fill


def test_erase_boxes_follow_torchvisions_random_erasing():
    n, h, w = 4000, 32, 24
    u = torch.rand(n, A.ERASE_COLUMNS, generator=_gen(50), dtype=torch.float64)
    on, top, left, box_h, box_w = A.erase_box_params(u, h, w, 1.0)
    torch.manual_seed(51)
    img = torch.zeros(3, h, w)
    theirs = torch.tensor([T1.RandomErasing.get_params(img, scale=A.ERASE_SCALE, ratio=A.ERASE_RATIO, value=[0])[:4]
                           for _ in range(n)], dtype=torch.float64)
    assert on.all() and (theirs[:, 2] < h).all()  # 32x24 always fits within 10 tries
    for name, a, b in [("area", box_h * box_w, theirs[:, 2] * theirs[:, 3]), ("aspect", box_h / box_w,
                       theirs[:, 2] / theirs[:, 3]), ("top", top, theirs[:, 0]), ("left", left, theirs[:, 1])]:
        assert _ks(a, b) < 0.05, name  # 2.2 * sqrt(2 / 4000); a uniform aspect or area 0.4 gives > 0.08
    assert ((top + box_h <= h) & (left + box_w <= w)).all()


def test_erasing_fills_its_box_with_normalised_noise_and_keeps_the_rest():
    x = torch.rand(400, 3, 16, 16, generator=_gen(52))
    g = _gen(53)
    out = A.random_erase(x, 0.25, g)
    u = torch.rand(400, A.ERASE_COLUMNS, generator=_gen(53), dtype=torch.float64)
    on, top, left, box_h, box_w = A.erase_box_params(u, 16, 16, 0.25)
    assert abs(on.double().mean() - 0.25) < 0.09  # 4 sigma at n = 400
    inside = torch.zeros(400, 16, 16, dtype=torch.bool)
    for i in range(400):
        if on[i]:
            inside[i, int(top[i]):int(top[i] + box_h[i]), int(left[i]):int(left[i] + box_w[i])] = True
    keep = ~inside[:, None].expand_as(x)
    assert torch.equal(out[keep], x[keep])
    fill = out.permute(1, 0, 2, 3)[inside[None].expand(3, -1, -1, -1)].view(3, -1)
    mean, std = torch.tensor(A.IMAGENET_MEAN), torch.tensor(A.IMAGENET_STD)
    assert ((fill.mean(1) - mean).abs() < 0.01).all() and ((fill.std(1) / std - 1).abs() < 0.03).all()
    assert fill.min() < 0  # timm leaves the noise unclipped
    assert torch.equal(out, A.random_erase(x, 0.25, _gen(53)))
    assert A.random_erase(x, 0.0, _gen(53)) is x
    with pytest.raises(GenrepError, match="random erasing probability must be in"):
        A.random_erase(x, 1.5, _gen())
