"""The classifier's training augmentation of the HybViT code: flip, zero-padded crop, AutoAugment and random
erasing per image (``augment(x, "classifier")``), Mixup/CutMix on the batch with soft targets, and the loss on
them.

Each op is checked against torchvision's own, image by image: exactly (to float rounding) for given parameters,
and in distribution for the random draws. Where the paper's code differs from torchvision (its RandomErasing,
its rand_bbox, its mixup criterion), against a transcription of that code. Several checks are also run on a
deliberately wrong variant (black fill, a naive equalisation, torchvision's erasing sampler, unsigned ops, ...)
to show that they would catch it."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_line, tiny_config
from test_augment import _one_thread, _structured_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from genrep.config import resolve_config
from genrep.data import autoaugment as AA
from genrep.data import classifier_augment as CA
from genrep.data.augment import Augmentation, _draw, augment
from genrep.data.batches import draw_random_inputs
from genrep.data.mixing import cutmix_box, mix, pair_partners
from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method
from genrep.methods.classification import classification_loss

NEAREST = InterpolationMode.NEAREST
PAPER_FILL = 128 / 255  # the HybViT code's AutoAugment fills with (128, 128, 128)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov distance between 1-D samples."""
    a, b = a.double().flatten(), b.double().flatten()
    grid = torch.cat((a, b)).unique()
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# AutoAugment's ops, one at a time, against torchvision's functional ops


def _tv_op(name, img, m, fill):
    """What torchvision's AutoAugment does for op ``name`` at signed magnitude m (a transcription of
    transforms.v2.AutoAugment._apply_image_or_video_transform with public functional ops)."""
    fill = [fill] * img.shape[0]
    if name in ("ShearX", "ShearY"):
        angle = math.degrees(math.atan(m))
        shear = [angle, 0.0] if name == "ShearX" else [0.0, angle]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=NEAREST,
                         fill=fill, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(m), 0] if name == "TranslateX" else [0, int(m)]
        return TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST,
                         fill=fill)
    if name == "Rotate":
        return TF.rotate(img, angle=m, interpolation=NEAREST, fill=fill)
    colour = {"Brightness": lambda: TF.adjust_brightness(img, 1.0 + m),
              "Color": lambda: TF.adjust_saturation(img, 1.0 + m),
              "Contrast": lambda: TF.adjust_contrast(img, 1.0 + m),
              "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + m),
              "Posterize": lambda: TF.posterize(img, int(m)), "Solarize": lambda: TF.solarize(img, 1.0 * m),
              "AutoContrast": lambda: TF.autocontrast(img), "Equalize": lambda: TF.equalize(img),
              "Invert": lambda: TF.invert(img)}
    return colour[name]()


def _op_inputs(c, n=40, h=11, w=13):
    x = torch.rand(n, c, h, w, generator=_gen(2))
    x[:6] = x[:6].round()  # saturated pixels, and a flat image (autocontrast and equalize leave it)
    x[6] = 0.3
    return x


def _check_op(name, c):
    """Our batched kernel, one sample per (magnitude bin, sign), against torchvision per image."""
    x = _op_inputs(c)
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    bins = AA.magnitude_bins(name, h, w)
    op_id = AA.OP_ID[name]
    magnitude = torch.zeros(n, dtype=torch.float64)
    if bins is not None:
        magnitude = bins[torch.arange(n) % AA.NUM_BINS].double()
        if op_id in AA.SIGNED:
            magnitude = torch.where((torch.arange(n) // AA.NUM_BINS) % 2 == 1, -magnitude, magnitude)
    on = torch.tensor([[True, False]]).expand(n, 2)  # the first slot only
    ours = AA.autoaugment(x, AA.op_params(torch.full((n, 2), op_id), on, magnitude[:, None].expand(n, 2), h, w))
    expected = torch.stack([_tv_op(name, x[i], float(magnitude[i]), PAPER_FILL) for i in range(n)])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", AA.OPS)
@pytest.mark.parametrize("c", [1, 3])
def test_each_autoaugment_op_matches_torchvision(name, c):
    _check_op(name, c)


def _rounding_posterize(x, bits):  # rounds to the nearest level instead of flooring
    levels = 2 ** bits.view(-1, 1, 1, 1)
    return (x * levels).round() / levels


def _naive_equalize(x, _=None):  # the textbook CDF map, not PIL's
    flat = (x * 255).round().long().flatten(2)
    hist = torch.zeros(*flat.shape[:2], 256).scatter_add_(2, flat, torch.ones_like(flat, dtype=torch.float))
    cdf = hist.cumsum(-1) / flat.shape[-1]
    return cdf.gather(-1, flat).view_as(x)


@pytest.mark.parametrize("name, bug", [
    ("Rotate", lambda mp: mp.setattr(AA, "FILL", 0.0)),  # torchvision's default black fill
    ("ShearX", lambda mp: mp.setattr(AA, "_inverse_affine",  # about the centre instead of the corner
                                     lambda cx, cy, *a, f=AA._inverse_affine: f(0 * cx, 0 * cy, *a))),
    ("Equalize", lambda mp: mp.setitem(AA._COLOUR_OPS, "Equalize", _naive_equalize)),
    ("Posterize", lambda mp: mp.setitem(AA._COLOUR_OPS, "Posterize", _rounding_posterize)),
    ("Sharpness", lambda mp: mp.setitem(AA._COLOUR_OPS, "Sharpness",
                                        lambda x, f: AA.adjust_sharpness(x, 2 - f))),  # blend the wrong way
])
def test_the_op_comparison_catches_a_wrong_kernel(monkeypatch, name, bug):
    bug(monkeypatch)
    with pytest.raises(AssertionError):
        _check_op(name, 3)


# ----------------------------------------------------------------------------------------------------
# AutoAugment's policies: parameters in distribution, whole sub-policies replayed exactly


def _replay_policy(img, tv, pick, on, u_signs, h, w):
    """torchvision's result of the sub-policy, and the pixels a nearest-neighbour tie may have decided."""
    ties = torch.zeros(h, w, dtype=torch.bool)
    for slot, (name, _, mag_idx) in enumerate(tv._policies[pick]):
        if not on[slot]:
            continue
        bins = AA.magnitude_bins(name, h, w)
        m = float(bins[mag_idx]) if bins is not None else 0.0
        if AA.OP_ID[name] in AA.SIGNED and u_signs[slot] < 0.5:
            m = -m
        img = _tv_op(name, img, m, PAPER_FILL)
        ties = _carry_ties(name, m, ties, h, w)
    return img, ties


_WHOLE_IMAGE = ("Contrast", "AutoContrast", "Equalize")  # each output pixel depends on every input pixel


def _carry_ties(name, m, ties, h, w):
    """Where ``ties`` stand after op ``name``, plus the op's own: an output pixel whose source coordinate lies on a
    half pixel. Which neighbour nearest sampling picks there is decided by the last bit of the map's float32
    arithmetic (torchvision's bmm, whose rounding depends on the BLAS kernel of the machine and of the release);
    both picks are the op's value, so the comparison is exact everywhere else."""
    if name in _WHOLE_IMAGE:
        return torch.full((h, w), bool(ties.any()))
    if name == "Sharpness":  # a 3x3 neighbourhood
        return F.max_pool2d(ties[None, None].float(), 3, 1, 1)[0, 0] > 0.5
    if AA.OP_ID[name] not in AA.GEOMETRIC:
        return ties
    moved = _tv_op(name, ties[None].float(), m, 0.0)[0] > 0.5
    theta = AA._geometric_theta(torch.tensor([AA.OP_ID[name]]), torch.tensor([m], dtype=torch.float64), h, w)[0]
    px = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    py = (torch.arange(h, dtype=torch.float64) - (h - 1) / 2)[:, None]
    src_x = px * theta[0, 0] + py * theta[0, 1] + theta[0, 2] + (w - 1) / 2
    src_y = px * theta[1, 0] + py * theta[1, 1] + theta[1, 2] + (h - 1) / 2

    def on_half(s):
        return ((s - s.floor()) - 0.5).abs() < 1e-4

    return moved | on_half(src_x) | on_half(src_y)


@pytest.mark.parametrize("policy", ["cifar10", "imagenet", "svhn"])
@pytest.mark.parametrize("c, h, w", [(3, 32, 32), (1, 12, 10)])
def test_each_samples_sub_policy_replays_torchvision(policy, c, h, w):
    n = 150
    x = torch.randint(0, 256, (n, c, h, w), generator=_gen(3)).float() / 255
    u = torch.rand(n, AA.COLUMNS, generator=_gen(4), dtype=torch.float64)
    p = AA.autoaugment_params(u, policy, h, w)
    ours = AA.autoaugment(x, p)
    tv = T.AutoAugment(T.AutoAugmentPolicy(policy), fill=[PAPER_FILL] * c)
    assert [tuple(s) for s in tv._policies] == [tuple(s) for s in AA.POLICIES[policy]]  # the same table
    compared = 0
    with _one_thread():
        for i in range(n):
            pick = int(u[i, 0] * len(tv._policies))
            expected, ties = _replay_policy(x[i], tv, pick, p.on[i].tolist(), u[i, [2, 4]].tolist(), h, w)
            keep = ~ties.expand_as(expected)
            torch.testing.assert_close(ours[i][keep], expected[keep], atol=1e-6, rtol=0)
            compared += int(keep.sum())
    assert compared >= 0.95 * x.numel()  # ties are rare: nearly every pixel is compared exactly


def test_policy_parameters_follow_the_table():
    n = 25000
    u = torch.rand(n, AA.COLUMNS, generator=_gen(5), dtype=torch.float64)
    p = AA.autoaugment_params(u, "cifar10", 32, 32)
    table = AA.POLICIES["cifar10"]
    pick = (u[:, 0] * 25).long()
    counts = torch.bincount(pick, minlength=25).double()
    assert ((counts - n / 25) ** 2 / (n / 25)).sum() < 60  # chi2, 24 dof: p < 1e-4
    ops = torch.tensor([[AA.OP_ID[s[0]] for s in sub] for sub in table])
    assert torch.equal(p.op, ops[pick])
    for k, sub in enumerate(table):
        for slot, (_, prob, _) in enumerate(sub):
            fired = p.on[pick == k, slot].double()
            assert abs(fired.mean() - prob) < 5 * math.sqrt(prob * (1 - prob) / len(fired)) + 1e-9, (k, slot)
    # signed ops: magnitude sign is a fair coin; translations by whole pixels of 150/331 of the side at most
    tx = p.theta[..., 0, 2][p.op == AA.OP_ID["TranslateX"]]
    assert abs((tx > 0).double().mean() - 0.5) < 0.03 and set(tx.abs().unique().tolist()) <= {12.0, 14.0}


def _aa_summaries(y):
    """Per-sample statistics that see the colour ops, the geometric ops and their directions."""
    h, w = y.shape[-2:]
    xs = torch.linspace(-1, 1, w)
    ys = torch.linspace(-1, 1, h)
    mass = y[:, 0] + 1e-6  # the red ramp rises to the right
    return {
        "mean_r": y[:, 0].mean((1, 2)), "mean_g": y[:, 1].mean((1, 2)), "mean_b": y[:, 2].mean((1, 2)),
        "std": y.std((1, 2, 3)), "chroma": (y.amax(1) - y.amin(1)).mean((1, 2)),
        "centre_x": (mass * xs).sum((1, 2)) / mass.sum((1, 2)),  # shifts and shears left or right
        "centre_y": (y[:, 1] * ys[:, None]).sum((1, 2)) / (y[:, 1].sum((1, 2)) + 1e-6),  # the green one
        "gray_fill": (y - PAPER_FILL).abs().amax(1).lt(1e-6).double().mean((1, 2)),  # pixels from outside
        "edges": (y[..., 1:] - y[..., :-1]).abs().mean((1, 2, 3)),  # sharpness, rotations
    }


def _ours_and_torchvision(n=3000, seed=6):
    img = _structured_image().float() / 255
    torch.manual_seed(seed)
    tv = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, fill=[PAPER_FILL] * 3)
    with _one_thread():
        theirs = torch.stack([tv(img) for _ in range(n)])
    u = torch.rand(n, AA.COLUMNS, generator=_gen(seed), dtype=torch.float64)
    return img, u, theirs


def _unsigned(u):  # ops never negated (the paper code's rotations are all counter-clockwise)
    u = u.clone()
    u[:, [2, 4]] = 0.9
    return u


def _rarer(u):  # every op fired 0.8 times as often as the policy says
    u = u.clone()
    u[:, [1, 3]] *= 1.25
    return u


def test_autoaugment_matches_torchvision_in_distribution(monkeypatch):
    img, u, theirs = _ours_and_torchvision()
    x = img.expand(len(u), *img.shape)
    b = _aa_summaries(theirs)

    def distance(draws):
        a = _aa_summaries(AA.autoaugment(x, AA.autoaugment_params(draws, "cifar10", 16, 16)))
        return {name: _ks(a[name], b[name]) for name in a}

    # two-sample KS with n = 3000: 1.95 * sqrt(2 / n) = 0.05 at p = 0.001
    assert max(distance(u).values()) < 0.06, distance(u)
    # the same comparison rejects a deliberately wrong AutoAugment (each is about 0.09 to 0.19 away)
    assert max(distance(_unsigned(u)).values()) > 0.08
    assert max(distance(_rarer(u)).values()) > 0.08
    monkeypatch.setattr(AA, "FILL", 0.0)  # torchvision's default black
    assert max(distance(u).values()) > 0.08


# ----------------------------------------------------------------------------------------------------
# flip and zero-padded crop, random erasing, the whole pipeline


def test_flip_and_zero_padded_crop_are_exact_and_uniform():
    n, pad = 6000, 4
    img = (16 * torch.arange(16)[:, None] + torch.arange(16) + 1).clamp(max=255).to(torch.uint8)  # no zeros
    x = img.expand(n, 1, 16, 16)
    u = _draw(_gen(7), n, 0, n, CA.COLUMNS)
    ours = CA._flip_crop(x, u[:, 0] < 0.5, (u[:, 1] * 9).floor().long(), (u[:, 2] * 9).floor().long(), pad)
    top, left = (u[:, 1] * 9).floor().long(), (u[:, 2] * 9).floor().long()
    for i in range(0, n, 61):
        ref = TF.horizontal_flip(x[i]) if u[i, 0] < 0.5 else x[i]
        ref = TF.crop(TF.pad(ref, [pad] * 4, fill=0), int(top[i]), int(left[i]), 16, 16)
        assert torch.equal(ours[i], ref)
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9).double()
        assert ((counts - n / 9) ** 2 / (n / 9)).sum() < 35  # chi2, 8 dof
    # zeros come only from the padding: an image shifted by k pixels shows k zero rows (reflect would show none)
    zero_rows = (ours[:, 0] == 0).all(-1).sum(-1)
    assert torch.equal(zero_rows, (top - pad).abs())


def _paper_erasing_params(h, w, rng, p=0.25, sl=0.02, sh=0.4, r1=0.3):
    """Diffusion_ViT's utils/random_erasing.py (Zhong et al.), the draw only: None or (top, left, h, w)."""
    if rng.uniform(0, 1) > p:
        return None
    for _ in range(100):
        target_area = rng.uniform(sl, sh) * h * w
        aspect_ratio = rng.uniform(r1, 1 / r1)
        eh = int(round(math.sqrt(target_area * aspect_ratio)))
        ew = int(round(math.sqrt(target_area / aspect_ratio)))
        if ew < w and eh < h:
            return rng.randint(0, h - eh), rng.randint(0, w - ew), eh, ew
    return None


def _erase_stats(boxes, h, w):
    on = torch.tensor([b is not None for b in boxes], dtype=torch.float64)
    kept = torch.tensor([b for b in boxes if b is not None], dtype=torch.float64)
    return on, {"area": kept[:, 2] * kept[:, 3] / (h * w), "aspect": kept[:, 2] / kept[:, 3],
                "top": kept[:, 0] / (h - kept[:, 2] + 1), "left": kept[:, 1] / (w - kept[:, 3] + 1)}


@pytest.mark.parametrize("h, w", [(32, 32), (12, 20)])
def test_erasing_boxes_follow_the_paper_codes_sampler(h, w):
    n = 24000
    u = torch.rand(n, CA.COLUMNS - CA._ERASE, generator=_gen(8), dtype=torch.float64)
    on, top, left, bh, bw = CA.erase_params(u, h, w, 0.25)
    ours = [(int(t), int(l_), int(a), int(b)) if o else None for o, t, l_, a, b in zip(on, top, left, bh, bw)]
    rng = random.Random(9)
    theirs = [_paper_erasing_params(h, w, rng) for _ in range(n)]
    (on_a, a), (on_b, b) = _erase_stats(ours, h, w), _erase_stats(theirs, h, w)
    assert abs(on_a.mean() - on_b.mean()) < 0.02  # 0.25 each, two-sample sigma 0.004
    for name in a:
        assert _ks(a[name], b[name]) < 0.045, name  # n ~ 6000 each: 1.95 * sqrt(2 / n) = 0.036 at p = 0.001
    assert (top + bh <= h).all() and (left + bw <= w).all() and ((bh < h) & (bw < w))[on].all()
    # torchvision's RandomErasing samples another box (area up to 1/3, log-uniform ratio): the test sees it
    torch.manual_seed(10)
    tv = T.RandomErasing(p=1.0, value=0)
    img = torch.zeros(3, h, w)
    tv_boxes = []
    for _ in range(6000):
        prm = tv.make_params([img])
        tv_boxes.append((prm["i"], prm["j"], prm["h"], prm["w"]))
    _, c = _erase_stats(tv_boxes, h, w)
    assert max(_ks(c[k], b[k]) for k in ("area", "aspect")) > 0.06


def test_erasing_fills_its_box_as_torchvision_erase_does():
    x = torch.rand(30, 3, 12, 10, generator=_gen(11))
    u = torch.rand(30, CA.COLUMNS - CA._ERASE, generator=_gen(12), dtype=torch.float64)
    on, top, left, bh, bw = CA.erase_params(u, 12, 10, 0.5)
    ours = CA.erase_boxes(x, on, top, left, bh, bw)
    for i in range(30):
        ref = TF.erase(x[i], int(top[i]), int(left[i]), int(bh[i]), int(bw[i]), torch.tensor(CA.ERASE_VALUE))
        torch.testing.assert_close(ours[i], ref if on[i] else x[i], atol=0, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_classifier_augmentation_replays_the_papers_order_with_torchvision_ops(c):
    n, h, w = 120, 16, 12
    x = torch.randint(0, 256, (n, c, h, w), generator=_gen(13), dtype=torch.uint8)
    ours = augment(x, "classifier", _gen(14))
    u = _draw(_gen(14), n, 0, n, CA.COLUMNS)
    aa = AA.autoaugment_params(u[:, CA._AA:CA._ERASE], "cifar10", h, w)
    on, etop, eleft, eh, ew = CA.erase_params(u[:, CA._ERASE:], h, w, 0.25)
    tv = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)
    compared = 0
    with _one_thread():
        for i in range(n):
            img = x[i].float() / 255
            img = TF.horizontal_flip(img) if u[i, 0] < 0.5 else img
            img = TF.crop(TF.pad(img, [4] * 4, fill=0), int(u[i, 1] * 9), int(u[i, 2] * 9), h, w)
            img, ties = _replay_policy(img, tv, int(u[i, CA._AA] * 25), aa.on[i].tolist(),
                                       u[i, [CA._AA + 2, CA._AA + 4]].tolist(), h, w)
            if on[i]:
                img = TF.erase(img, int(etop[i]), int(eleft[i]), int(eh[i]), int(ew[i]), torch.tensor(0.75))
            keep = ~ties.expand_as(img)
            torch.testing.assert_close(ours[i][keep], img[keep], atol=1e-6, rtol=0)
            compared += int(keep.sum())
    assert compared >= 0.95 * x.numel()


def test_classifier_options_change_the_output_and_bad_ones_are_refused():
    x = torch.randint(0, 256, (64, 3, 16, 16), generator=_gen(15), dtype=torch.uint8)
    base = augment(x, "classifier", _gen(16))
    assert torch.equal(base, augment(x, Augmentation("classifier"), _gen(16)))  # the paper's defaults
    no_aa = augment(x, Augmentation("classifier", policy="none", erase_prob=0.0), _gen(16))
    assert not torch.equal(no_aa, base)
    assert set((no_aa * 255).round().unique().tolist()) <= set(x.unique().tolist()) | {0.0}  # crops and flips only
    erased = augment(x, Augmentation("classifier", policy="none", erase_prob=1.0), _gen(16))
    assert ((erased == CA.ERASE_VALUE).flatten(1).any(1)).all()
    for bad in (Augmentation("classifier", policy="cifar100"), Augmentation("classifier", erase_prob=1.5)):
        with pytest.raises(GenrepError) as e:
            augment(x, bad, _gen())
        assert "cifar100" in one_line(e) or "1.5" in one_line(e)


# ----------------------------------------------------------------------------------------------------
# Mixup and CutMix: against torchvision's MixUp and CutMix, pair by pair, and the paper's rand_bbox


class _Fixed:
    """A Beta distribution stub that returns one value (torchvision draws lambda from self._dist)."""

    def __init__(self, value):
        self.value = torch.tensor(value)

    def sample(self, shape=()):
        return self.value


def _batch(n=8, c=3, h=10, w=12, k=5, seed=17):
    g = _gen(seed)
    return torch.rand(n, c, h, w, generator=g), torch.randint(0, k, (n,), generator=g), k


def _u(mixed=True, cutmix=False, cy=0.5, cx=0.5):
    return torch.tensor([0.1 if mixed else 0.9, 0.1 if cutmix else 0.9, cy, cx])


def test_mixup_matches_torchvision_mixup_on_each_pair():
    x, y, k = _batch()
    lam = torch.tensor(0.3)
    images, target = mix(x, y, k, _u(), lam, torch.tensor(0.5), mix_prob=0.5, cutmix_share=0.5)
    tv = T.MixUp(num_classes=k)
    tv._dist = _Fixed(float(lam))
    for p in range(0, len(x), 2):
        ti, tt = tv(x[p:p + 2], y[p:p + 2])  # on two images, torchvision's roll(1) is our pairing
        assert torch.equal(images[p:p + 2], ti) and torch.equal(target[p:p + 2], tt)
    # label mass: lambda on the own label, the rest on the partner's (all of it where the two labels agree)
    own = target.gather(1, y[:, None]).squeeze(1)
    same = y == y[pair_partners(len(y), x.device)]
    torch.testing.assert_close(own, torch.where(same, 1.0, lam))
    torch.testing.assert_close(images, lam * x + (1 - lam) * x[pair_partners(len(y), x.device)])


def test_cutmix_matches_torchvision_cutmix_on_each_pair():
    x, y, k = _batch(n=2, h=10, w=12)
    tv = T.CutMix(num_classes=k)
    for trial in range(60):
        lam = float(torch.rand((), generator=_gen(100 + trial)))
        tv._dist = _Fixed(lam)
        torch.manual_seed(trial)
        params = tv.make_params([x])
        torch.manual_seed(trial)  # the same draws again: the box centre torchvision used
        r_x, r_y = int(torch.randint(12, (1,))), int(torch.randint(10, (1,)))
        u = _u(cutmix=True, cy=(r_y + 0.5) / 10, cx=(r_x + 0.5) / 12)
        images, target = mix(x, y, k, u, torch.tensor(0.5), torch.tensor(lam), mix_prob=0.5, cutmix_share=0.5)
        params = {**params, "labels": y, "batch_size": 2}
        assert torch.equal(images, tv.transform(x, params)), trial
        torch.testing.assert_close(target, tv.transform(y, params), atol=1e-6, rtol=0)


def test_cutmix_label_mass_equals_the_pasted_area():
    n, h, w, k = 16, 9, 11, 16
    x = (torch.arange(n, dtype=torch.float32) / n).view(n, 1, 1, 1).expand(n, 3, h, w)  # image i is all i/n
    y = torch.arange(n)  # every image its own class
    for trial in range(40):
        g = _gen(200 + trial)
        u = _u(cutmix=True, cy=float(torch.rand((), generator=g)), cx=float(torch.rand((), generator=g)))
        images, target = mix(x, y, k, u, torch.tensor(0.5), torch.rand((), generator=g), mix_prob=0.5,
                             cutmix_share=0.5)
        own_area = (images == x).all(1).double().mean((1, 2))
        torch.testing.assert_close(target.gather(1, y[:, None]).squeeze(1).double(), own_area, atol=1e-6, rtol=0)
        torch.testing.assert_close(target.sum(1), torch.ones(n))


def _paper_rand_bbox(size, lam, cx, cy):
    """Diffusion_ViT's utils/mix.py rand_bbox with its centre given (it draws np.random.randint(W), (H))."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    return (np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H),
            np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H))


def test_cutmix_box_is_the_paper_codes_box():
    size = (4, 3, 32, 32)
    g = _gen(18)
    for _ in range(500):
        lam = float(torch.rand((), generator=g, dtype=torch.float64))
        cx, cy = (int(v) for v in torch.randint(0, 32, (2,), generator=g))
        # the paper's box slices dims 2 and 3 with (bbx, bby): its "x" is our row
        bbx1, bby1, bbx2, bby2 = _paper_rand_bbox(size, lam, cx, cy)
        y1, y2, x1, x2, kept = cutmix_box(torch.tensor(lam, dtype=torch.float64), torch.tensor(float(cx)),
                                          torch.tensor(float(cy)), 32, 32)
        assert (int(y1), int(y2), int(x1), int(x2)) == (bbx1, bbx2, bby1, bby2)
        assert float(kept) == pytest.approx(1 - (bbx2 - bbx1) * (bby2 - bby1) / (32 * 32))


def test_unmixed_batches_and_odd_last_images_are_left_alone_and_any_even_split_agrees():
    x, y, k = _batch(n=9)
    images, target = mix(x, y, k, _u(mixed=False), torch.tensor(0.3), torch.tensor(0.3), mix_prob=0.5,
                         cutmix_share=0.5)
    assert torch.equal(images, x) and torch.equal(target, F.one_hot(y, k).float())
    for cut in (False, True):
        u = _u(cutmix=cut, cy=0.3, cx=0.6)
        whole, t_whole = mix(x, y, k, u, torch.tensor(0.3), torch.tensor(0.4), mix_prob=0.5, cutmix_share=0.5)
        torch.testing.assert_close(whole[8], x[8])  # mixed with itself: itself, to float rounding
        torch.testing.assert_close(t_whole[8], F.one_hot(y[8], k).float())
        parts = [mix(x[a:b], y[a:b], k, u, torch.tensor(0.3), torch.tensor(0.4), mix_prob=0.5, cutmix_share=0.5)
                 for a, b in ((0, 4), (4, 6), (6, 9))]
        assert torch.equal(whole, torch.cat([p[0] for p in parts]))
        assert torch.equal(t_whole, torch.cat([p[1] for p in parts]))


def test_the_batch_decisions_follow_the_probabilities_and_are_shared_by_every_row():
    method = build_method("supervised", tiny_config(**{"model.mix_prob": 0.5, "model.cutmix_share": 0.5}).model,
                          DataSpec(8, 1, 10))
    spec = method.random_inputs()
    views = {"image": torch.zeros(16, 1, 8, 8)}
    mixed, cut, lams = [], [], []
    for step in range(1000):
        draw = draw_random_inputs(spec, views, 0, step, 0, 16)
        assert all((v == v[:1]).all() for v in draw.values())  # one value per batch
        half = draw_random_inputs(spec, {"image": views["image"][:8]}, 0, step, 8, 16)
        assert all(torch.equal(half[key], draw[key][8:]) for key in draw)  # any split of the batch agrees
        u = draw["mix_u"][0]
        mixed.append(bool(u[0] < 0.5))
        cut.append(bool(u[1] < 0.5))
        lams.append(float(draw["mixup_lam"][0]))
    assert abs(np.mean(mixed) - 0.5) < 0.08 and abs(np.mean(cut) - 0.5) < 0.08  # 5 sigma
    assert _ks(torch.tensor(lams), torch.rand(4000, generator=_gen(19))) < 0.08  # Beta(1, 1) is uniform


# ----------------------------------------------------------------------------------------------------
# the loss on soft targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_soft_target_ce_is_the_hard_ce_on_one_hot_targets(smoothing):
    logits = torch.randn(12, 7, generator=_gen(20), requires_grad=True)
    y = torch.randint(0, 7, (12,), generator=_gen(21))
    soft = classification_loss(logits, F.one_hot(y, 7).float(), smoothing)
    hard = F.cross_entropy(logits, y, label_smoothing=smoothing)
    torch.testing.assert_close(soft, hard)
    g_soft, = torch.autograd.grad(soft, logits)
    g_hard, = torch.autograd.grad(hard, logits)
    torch.testing.assert_close(g_soft, g_hard)


def _paper_label_smoothing_ce(x, target, smoothing=0.1):
    """Diffusion_ViT's utils/losses.py LabelSmoothingCrossEntropy."""
    log_prob = F.log_softmax(x, dim=-1)
    nll = -log_prob.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    return ((1 - smoothing) * nll + smoothing * -log_prob.mean(dim=-1)).mean()


def test_soft_target_ce_is_the_paper_codes_mixup_criterion():
    logits = torch.randn(10, 6, generator=_gen(22))
    y_a = torch.randint(0, 6, (10,), generator=_gen(23))
    y_b = torch.randint(0, 6, (10,), generator=_gen(24))
    for lam in (0.0, 0.27, 0.5, 1.0):
        paper = lam * _paper_label_smoothing_ce(logits, y_a) + (1 - lam) * _paper_label_smoothing_ce(logits, y_b)
        target = lam * F.one_hot(y_a, 6).float() + (1 - lam) * F.one_hot(y_b, 6).float()
        torch.testing.assert_close(classification_loss(logits, target, 0.1), paper)
    wrong = classification_loss(logits, 0.5 * F.one_hot(y_a, 6).float() + 0.5 * F.one_hot(y_b, 6).float(), 0.0)
    assert not torch.isclose(wrong, 0.5 * _paper_label_smoothing_ce(logits, y_a)
                             + 0.5 * _paper_label_smoothing_ce(logits, y_b))  # smoothing matters


@pytest.mark.parametrize("method_name", ["supervised", "hybvit"])
def test_methods_train_on_the_mixed_images_and_soft_targets(method_name):
    from genrep.methods.base import example_batch
    from genrep.methods.classification import classification_inputs

    cfg = tiny_config(method_name, **{"model.augment": "classifier", "model.mix_prob": 1.0,
                                      "model.label_smoothing": 0.1})
    torch.manual_seed(0)
    method = build_method(method_name, cfg.model, DataSpec(8, 1, 10)).train()
    torch.nn.init.normal_(method.head.weight)  # the zero-initialised head would give log(10) whatever the target
    assert method.views()["image"] == Augmentation("classifier", "cifar10", 0.25)
    batch = example_batch(method, 6, seed=3)
    images, target = classification_inputs(batch, method.cfg, 10)
    assert target.shape == (6, 10) and not torch.equal(images, batch["image"])
    out = method(batch)
    logits = method.logits(images)
    # HybViT's CE comes from the joint forward with the diffusion half: the same up to float rounding
    torch.testing.assert_close(out["ce"], classification_loss(logits, target, 0.1), rtol=1e-4, atol=1e-5)
    assert not torch.isclose(out["ce"], classification_loss(method.logits(batch["image"]), batch["label"], 0.1))
    torch.testing.assert_close(out["acc"], (logits.argmax(-1) == batch["label"]).float().mean())  # hard labels
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("method_name", ["supervised", "hybvit"])
def test_mixed_training_does_not_depend_on_gradient_accumulation(tmp_path, method_name):
    from safetensors.torch import load_file

    from genrep.train.loop import pretrain

    ov = {"model.augment": "classifier", "model.mix_prob": 1.0, "train.steps": 3}
    pretrain(tiny_config(method_name, **ov), tmp_path / "one")
    pretrain(tiny_config(method_name, **ov, **{"train.accum_steps": 4}), tmp_path / "four")
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "four" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# config keys: one line, before any work


@pytest.mark.parametrize("recipe", ["hybvit-digits", "supervised-digits"])
@pytest.mark.parametrize("key, value, fragment", [
    ("model.mix_prob", 1.5, "model.mix_prob must be at least 0 and at most 1, got 1.5"),
    ("model.mix_prob", -0.1, "model.mix_prob must be at least 0 and at most 1, got -0.1"),
    ("model.cutmix_share", 2, "model.cutmix_share must be at least 0 and at most 1, got 2.0"),
    ("model.erase_prob", 1.01, "model.erase_prob must be at least 0 and at most 1, got 1.01"),
    ("model.mixup_alpha", 0, "model.mixup_alpha must be above 0 and at most 1000, got 0.0"),
    ("model.cutmix_alpha", -1, "model.cutmix_alpha must be above 0"),
    ("model.autoaugment", "cifar100", "model.autoaugment 'cifar100' is unknown; choose cifar10, imagenet, svhn, none"),
    ("model.augment", "autoaugment", "model.augment 'autoaugment' is unknown; choose none, weak, strong, classifier"),
])
def test_bad_classifier_settings_are_one_line_at_build(recipe, key, value, fragment):
    with pytest.raises(GenrepError) as e:
        resolve_config(recipe, {key: value})
    assert fragment in one_line(e)


@pytest.mark.parametrize("args, fragment", [
    (["--model.mix_prob", "1.5"], "model.mix_prob must be at least 0 and at most 1, got 1.5"),
    (["--model.autoaugment", "cifar"], "model.autoaugment 'cifar' is unknown"),
])
def test_bad_classifier_settings_on_the_command_line_are_one_line(tmp_path, capsys, args, fragment):
    from genrep.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--recipe", "hybvit-digits", "--out", str(out), *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("genrep: error: ") and fragment in lines[0], lines
    assert not out.exists()
