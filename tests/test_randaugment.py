"""Tests for genrep.data.randaugment: every op against torchvision's RandAugment op of the same name, image by
image; the magnitude scale against torchvision's bins and timm's level formulas; the per-sample draws; a whole
two-op RandAugment replayed with torchvision's ops; one-line errors."""

import math

import pytest
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from genrep.data import randaugment as R
from genrep.errors import GenrepError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 11, 13  # odd and unequal: a swapped side or a centre off by half a pixel shows
NEAREST = T.InterpolationMode.NEAREST


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(n, c, seed=0):
    # on the 1/255 grid, as decoded images are; a few saturated and one flat image for autocontrast and equalize
    x = torch.randint(0, 256, (n, c, H, W), generator=_gen(seed)).float() / 255
    x[0] = x[0].round()
    x[1] = 77 / 255
    return x


def _draws(n, ops, op_index, n_choices, fires=True, negate=None):
    """Uniforms that pick op ``op_index`` in every slot, fire it, and negate it in every other row (or as told)."""
    u = torch.rand(n, ops, R.COLUMNS_PER_OP, generator=_gen(1), dtype=torch.float64)
    u[..., 0] = (op_index + 0.5) / n_choices
    u[..., 1] = 0.0 if fires else 0.99
    neg = (torch.arange(n) % 2 == 1) if negate is None else negate
    u[..., 2] = torch.where(neg, 0.25, 0.75)[:, None]
    return u.view(n, -1)


def _ours(x, u, ops, magnitude, policy, mstd=0.0):
    p = R.randaugment_params(u, ops, magnitude, mstd, policy, H, W)
    fill = torch.zeros(x.shape[1]) if policy == "torchvision" else torch.tensor(R.TIMM_FILL)
    return R.apply(x, p, fill if x.shape[1] == 3 else fill.mean(0, keepdim=True))


# ----------------------------------------------------------------------------------------------------
# torchvision's policy: its bins, and each op against its own RandAugment op


def test_the_torchvision_bins_are_torchvisions():
    space = T.RandAugment._AUGMENTATION_SPACE
    m = torch.arange(31, dtype=torch.float64)
    for name, (kernel, _) in R.OPS["torchvision"].items():
        theirs = space[name][0](31, H, W)
        if kernel is None or theirs is None or theirs.ndim == 0:
            assert kernel in (None, "AutoContrast", "Equalize"), name
            continue
        ours = R.op_argument(kernel, "torchvision", m, H, W)
        assert torch.equal(ours, theirs.double()), name  # the very numbers, so a bin's threshold or shift agrees
        assert space[name][1] == R.OPS["torchvision"][name][1], name  # signed alike
    assert list(space) == list(R.OPS["torchvision"])  # the same ops, so a uniform pick is the same distribution


@pytest.mark.parametrize("name", [n for n in R.OPS["torchvision"] if n != "Identity"])
@pytest.mark.parametrize("c", [1, 3])
def test_each_torchvision_op_matches_torchvisions_randaugment_op(name, c):
    x = _images(8, c)
    ra = T.RandAugment(interpolation=NEAREST)
    names = list(R.OPS["torchvision"])
    for m in (0, 5, 9, 22, 30):
        ours = _ours(x, _draws(8, 1, names.index(name), len(names)), 1, float(m), "torchvision")
        bins = ra._AUGMENTATION_SPACE[name][0](31, H, W)
        value = float(bins[m]) if bins is not None and bins.ndim > 0 else 0.0
        signed = ra._AUGMENTATION_SPACE[name][1]
        for i in range(8):
            v = -value if signed and i % 2 == 1 else value
            expected = ra._apply_image_or_video_transform(x[i], name, v, interpolation=NEAREST, fill=ra._fill)
            torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=0, msg=f"{name} m={m} image {i}")


def test_the_op_comparison_catches_a_wrong_op():
    x = _images(8, 3)
    names = list(R.OPS["torchvision"])
    ra = T.RandAugment(interpolation=NEAREST)
    # Contrast's kernel asked for Brightness's op: the same factor, another image
    ours = _ours(x, _draws(8, 1, names.index("Brightness"), len(names)), 1, 9.0, "torchvision")
    value = float(ra._AUGMENTATION_SPACE["Contrast"][0](31, H, W)[9])
    other = torch.stack([ra._apply_image_or_video_transform(x[i], "Contrast", value * (-1) ** i,
                                                            interpolation=NEAREST, fill=ra._fill) for i in range(8)])
    assert (ours[2:] - other[2:]).abs().amax() > 1e-2


# ----------------------------------------------------------------------------------------------------
# timm's "inc" policy: its level formulas at MAE's m9, applied with torchvision's functional ops


def _timm_level_args(level):
    """timm auto_augment.py's *_level_to_arg for the increasing ops, transcribed, level on its 0..10 scale."""
    f = level / 10
    return {"Rotate": f * 30, "ShearX": f * 0.3, "ShearY": f * 0.3, "TranslateXRel": f * 0.45,
            "TranslateYRel": f * 0.45, "PosterizeIncreasing": 4 - int(f * 4),
            "SolarizeIncreasing": 256 - int(f * 256), "SolarizeAdd": int(f * 110),
            **{f"{k}Increasing": 1 + f * 0.9 for k in ("Color", "Contrast", "Brightness", "Sharpness")}}


def _timm_op(name, img, arg, negate):
    fill = list(R.TIMM_FILL) if img.shape[0] == 3 else [sum(R.TIMM_FILL) / 3]
    sign = -1 if negate else 1
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(sign * arg))
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0], interpolation=NEAREST,
                         shear=[shear, 0.0] if name == "ShearX" else [0.0, shear], fill=fill)
    if name in ("TranslateXRel", "TranslateYRel"):
        px = int(sign * arg * (W if name == "TranslateXRel" else H))
        return TF.affine(img, angle=0.0, translate=[px, 0] if name == "TranslateXRel" else [0, px], scale=1.0,
                         shear=[0.0, 0.0], interpolation=NEAREST, fill=fill)
    if name == "Rotate":
        return TF.rotate(img, angle=sign * arg, interpolation=NEAREST, fill=fill)
    if name == "SolarizeAdd":  # timm's lut: i < 128 -> min(255, i + add), on the 0..255 levels
        levels = (img * 255).round()
        return torch.where(levels < 128, (levels + arg).clamp(max=255), levels) / 255
    factor = 1 + sign * (arg - 1)
    ops = {"AutoContrast": lambda: TF.autocontrast(img), "Equalize": lambda: TF.equalize(img),
           "Invert": lambda: TF.invert(img), "PosterizeIncreasing": lambda: TF.posterize(img, arg),
           "SolarizeIncreasing": lambda: TF.solarize(img, arg / 255),
           "ColorIncreasing": lambda: TF.adjust_saturation(img, factor),
           "ContrastIncreasing": lambda: TF.adjust_contrast(img, factor),
           "BrightnessIncreasing": lambda: TF.adjust_brightness(img, factor),
           "SharpnessIncreasing": lambda: TF.adjust_sharpness(img, factor)}
    return ops[name]()


@pytest.mark.parametrize("name", list(R.OPS["timm"]))
@pytest.mark.parametrize("c", [1, 3])
def test_each_timm_op_at_maes_m9_matches_timms_arguments(name, c):
    x = _images(8, c)
    names = list(R.OPS["timm"])
    args = _timm_level_args(9)  # MAE's rand-m9: level 9 of 10, magnitude 27 of 30 here
    ours = _ours(x, _draws(8, 1, names.index(name), len(names)), 1, 27.0, "timm")
    for i in range(8):
        expected = _timm_op(name, x[i], args.get(name, 0), R.OPS["timm"][name][1] and i % 2 == 1)
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=0, msg=f"{name} image {i}")


def test_an_op_that_does_not_fire_leaves_the_image():
    x = _images(6, 3)
    for policy in R.POLICIES:
        u = _draws(6, 2, 1, len(R.OPS[policy]), fires=False)
        expected = x if policy == "timm" else None
        out = _ours(x, u, 2, 27.0, policy)
        if expected is not None:
            assert torch.equal(out, expected)  # timm: both slots drawn not to fire
        else:
            assert not torch.equal(out, x)  # torchvision applies every drawn op


# ----------------------------------------------------------------------------------------------------
# the draws


def test_ops_signs_firing_and_magnitude_noise_follow_the_policy():
    n = 6000
    for policy in R.POLICIES:
        u = torch.rand(n, 2 * R.COLUMNS_PER_OP, generator=_gen(5), dtype=torch.float64)
        p = R.randaugment_params(u, 2, 27.0, 1.5, policy, 32, 32)
        pick = (u.view(n, 2, -1)[..., 0] * len(R.OPS[policy])).floor()
        counts = torch.bincount(pick.flatten().long(), minlength=len(R.OPS[policy])).double()
        expected = 2 * n / len(R.OPS[policy])
        assert ((counts - expected) ** 2 / expected).sum() < 45  # 13-14 dof, p < 1e-4
        fired = (p.kernel != R.NONE).double().mean()
        identity = 1 / 14 if policy == "torchvision" else 0.0
        assert abs(fired - R.APPLY_PROB[policy] * (1 - identity)) < 0.02
        m = p.magnitude.flatten()
        assert m.min() >= 0 and m.max() == 30 and abs((m == 30).double().mean() - 0.0228) < 0.006  # P(z > 2)
        assert abs(m[m < 30].mean() - 26.9) < 0.1 and abs(m.std() - 1.4) < 0.1  # N(27, 1.5) clipped at 30
    rotate = p.kernel == R.KERNEL_ID["Rotate"]
    angles = torch.rad2deg(torch.atan2(p.theta[..., 0, 1], p.theta[..., 0, 0]))[rotate]
    assert abs((angles > 0).double().mean() - 0.5) < 0.05  # signed ops: either sign, evenly
    assert torch.equal(R.randaugment_params(u, 2, 9.0, 0.0, "timm", 32, 32).magnitude,
                       torch.full((n, 2), 9.0, dtype=torch.float64))  # mstd 0: the magnitude itself


@pytest.mark.parametrize("c", [1, 3])
def test_randaugment_replays_torchvisions_ops_with_its_draws(c):
    """Two ops per image at magnitude 9, drawn from the generator and replayed with torchvision's own ops."""
    n = 40
    x = _images(n, c, seed=3)
    ours = R.randaugment(x, _gen(7), ops=2, magnitude=9)
    u = torch.rand(n, 2, R.COLUMNS_PER_OP, generator=_gen(7), dtype=torch.float64)
    ra = T.RandAugment(interpolation=NEAREST)
    names = list(ra._AUGMENTATION_SPACE)
    seen = set()
    for i in range(n):
        img = x[i]
        for slot in range(2):
            name = names[int(u[i, slot, 0] * len(names))]
            seen.add(name)
            bins, signed = ra._AUGMENTATION_SPACE[name]
            mags = bins(31, H, W)
            v = float(mags[9]) if mags is not None and mags.ndim > 0 else 0.0
            v = -v if signed and u[i, slot, 2] < 0.5 else v
            img = ra._apply_image_or_video_transform(img, name, v, interpolation=NEAREST, fill=ra._fill)
        torch.testing.assert_close(ours[i], img, atol=1e-5, rtol=0, msg=f"image {i}")
    assert len(seen) >= 12


# ----------------------------------------------------------------------------------------------------
# interface


def test_deterministic_zero_ops_is_identity_and_the_device_is_kept():
    x = _images(8, 3)
    a = R.randaugment(x, _gen(2), ops=2, magnitude=27, mstd=1.5, policy="timm")
    assert torch.equal(a, R.randaugment(x, _gen(2), ops=2, magnitude=27, mstd=1.5, policy="timm"))
    assert not torch.equal(a, R.randaugment(x, _gen(3), ops=2, magnitude=27, mstd=1.5, policy="timm"))
    g = _gen(4)
    assert R.randaugment(x, g, ops=0) is x and torch.equal(g.get_state(), _gen(4).get_state())
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(magnitude=31), "RandAugment magnitude must be in 0..30"),
    (dict(magnitude=-1), "RandAugment magnitude must be in 0..30"),
    (dict(magnitude=float("nan")), "RandAugment magnitude must be in 0..30"),
    (dict(ops=-1), "RandAugment ops must be an integer >= 0"),
    (dict(mstd=-0.5), "RandAugment mstd must be a finite number >= 0"),
    (dict(policy="tf"), "unknown RandAugment policy 'tf'; choose one of torchvision, timm"),
])
def test_bad_options_are_one_line(kwargs, fragment):
    with pytest.raises(GenrepError) as e:
        R.randaugment(_images(2, 3), _gen(), **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu():
    x = torch.rand(64, 3, 32, 32, generator=_gen(9))
    for policy in R.POLICIES:
        cpu = R.randaugment(x, _gen(5), ops=2, magnitude=27, mstd=1.5, policy=policy)
        gpu = R.randaugment(x.cuda(), _gen(5), ops=2, magnitude=27, mstd=1.5, policy=policy)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
