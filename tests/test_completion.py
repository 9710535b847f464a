"""The completion protocol: masks, the error on the filled-in pixels against a hand computation, the figure,
and bad settings refused in one line before any work."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, one_line, run_cli, tiny_config
from eval_helpers import FAST
from PIL import Image

from genrep.config import EvalConfig, build_dataclass
from genrep.data.imageset import ImageSet
from genrep.errors import GenrepError
from genrep.eval.evaluate import evaluate_run, read_results
from genrep.eval.protocols import completion
from genrep.eval.protocols.completion import CompletionSettings, check_mask, make_keep
from genrep.eval.protocols.context import EvalContext
from genrep.eval.report.report import write_report
from genrep.eval.report.summary import evaluation_summary
from genrep.train.loop import pretrain

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ masks
def test_top_half_gives_the_top_rows():
    keep = make_keep(5, 8, 8, CompletionSettings(), torch.Generator().manual_seed(0))
    assert keep.shape == (5, 1, 8, 8) and keep.dtype == torch.bool
    assert keep[:, :, :4].all() and not keep[:, :, 4:].any()
    odd = make_keep(2, 7, 7, CompletionSettings(), torch.Generator())
    assert odd[:, :, :3].all() and not odd[:, :, 3:].any()  # 3 of 7 rows given


@pytest.mark.parametrize("size,patch,ratio", [(8, 4, 0.75), (8, 2, 0.75), (16, 4, 0.5), (32, 4, 0.75), (8, 1, 0.3)])
def test_random_patches_hide_a_ratio_of_whole_blocks(size, patch, ratio):
    s = CompletionSettings(mask="random_patches", patch=patch, ratio=ratio)
    keep = make_keep(64, size, size, s, torch.Generator().manual_seed(3))
    assert keep.shape == (64, 1, size, size) and keep.dtype == torch.bool
    side = size // patch
    blocks = keep.view(64, side, patch, side, patch)
    # each block is all given or all hidden
    assert (blocks.all(dim=(2, 4)) == blocks.any(dim=(2, 4))).all()
    hidden = (~blocks.all(dim=(2, 4))).flatten(1).sum(1)
    assert (hidden == round(ratio * side * side)).all()  # exactly the ratio, in every image
    assert abs(float((~keep).double().mean()) - round(ratio * side * side) / side ** 2) < 1e-12
    # seeded, and drawn per image
    again = make_keep(64, size, size, s, torch.Generator().manual_seed(3))
    assert torch.equal(keep, again)
    assert len({tuple(k.flatten().tolist()) for k in keep}) > 1
    assert not torch.equal(keep, make_keep(64, size, size, s, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("s,h,w,fragment", [
    (CompletionSettings(mask="random_patches", patch=3), 8, 8, "eval.completion.patch 3 does not divide the 8x8"),
    (CompletionSettings(mask="random_patches", patch=16), 8, 8, "choose one of 1, 2, 4"),
    (CompletionSettings(mask="random_patches", patch=8), 8, 8, "hides all"),        # 1 block, 0.75 of it
    (CompletionSettings(mask="random_patches", patch=4, ratio=0.1), 8, 8, "hides none"),  # 4 blocks, 0.4 of one
    (CompletionSettings(mask="random_patches", patch=4), 8, 12, "square"),
    (CompletionSettings(), 1, 1, "at least 2 pixels tall"),
])
def test_what_the_image_size_decides_is_one_line(s, h, w, fragment):
    with pytest.raises(GenrepError) as e:
        check_mask(s, h, w)
    assert fragment in one_line(e)


def test_settings_are_checked_where_the_config_is_built():
    for key, value, fragment in [("mask", "bottom_half", "choose top_half, random_patches"),
                                 ("ratio", 1.0, "eval.completion.ratio must be above 0 and below 1, got 1.0"),
                                 ("ratio", 0, "eval.completion.ratio must be above 0"),
                                 ("patch", 0, "eval.completion.patch must be at least 1, got 0"),
                                 ("n", 0, "eval.completion.n must be at least 1, got 0"),
                                 ("samples", 0, "eval.completion.samples must be at least 1, got 0")]:
        with pytest.raises(GenrepError) as e:
            build_dataclass(EvalConfig, {"completion": {key: value}}, "eval")
        assert fragment in one_line(e), (key, value)
    assert build_dataclass(EvalConfig, {}, "eval").completion == CompletionSettings(16, 3, "top_half", 0.75, 4)


# -------------------------------------------------------------------- the numbers, against a hand computation
class FakeCompleter:
    """A method whose completion is known: hidden pixels become ``fill`` (or, with ``echo``, whatever the
    protocol gave it there); with ``nudge`` it also moves the given pixels, which the contract forbids."""

    capabilities = frozenset({"complete"})

    def __init__(self, fill=0.25, echo=False, nudge=0.0):
        self.fill, self.echo, self.nudge, self.calls, self.seen = fill, echo, nudge, 0, []

    def eval(self):
        return self

    def capability_settings(self, cap):
        return {"fill": self.fill}

    def complete(self, x, keep, *, generator=None, progress=False):
        self.calls += 1
        self.seen.append(x.clone())
        k = keep.expand_as(x)
        out = x.clone() if self.echo else torch.where(k, x, torch.full_like(x, self.fill))
        return torch.where(k, (out + self.nudge).clamp(0, 1), out)


def _ctx(tmp_path: Path, method, s: CompletionSettings, images: torch.Tensor, batch_size=5) -> EvalContext:
    labels = torch.zeros(len(images), dtype=torch.int64)
    data = ImageSet(images, labels, ["a"], "fake")
    ev = replace(EvalConfig(), device="cpu", batch_size=batch_size, seed=0, completion=s)
    return EvalContext(run=tmp_path, cfg=None, ev=ev, method=method, train=data, test=data,
                       device=torch.device("cpu"), version="ema@0", progress=False)


def _images(n=6, c=3, size=8, seed=0):
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("s", [CompletionSettings(n=6, samples=2),
                               CompletionSettings(n=6, samples=3, mask="random_patches", patch=2, ratio=0.75)])
def test_mse_and_psnr_match_a_hand_computation(tmp_path, s):
    images = _images()
    fake = FakeCompleter(fill=0.25)
    r = completion.run(_ctx(tmp_path, fake, s, images))
    keep = make_keep(6, 8, 8, s, torch.Generator().manual_seed(0))  # the protocol's masks: eval.seed's first draws
    mses, psnrs = [], []
    for i in range(6):
        x = images[i].double() / 255
        hidden = [float(v) for v, k in zip(x.flatten(), keep[i].expand_as(x).flatten()) if not k]
        mse = sum((0.25 - v) ** 2 for v in hidden) / len(hidden)
        mses += [mse] * s.samples  # the fake fills every completion the same way
        psnrs += [10 * math.log10(1 / mse)] * s.samples
    assert r["mse"] == pytest.approx(sum(mses) / len(mses), rel=1e-6)
    assert r["psnr"] == pytest.approx(sum(psnrs) / len(psnrs), rel=1e-6)
    assert r["best_of_samples"]["mse"] == pytest.approx(r["mse"], rel=1e-6)
    assert r["mse_sem"] > 0 and r["psnr_sem"] > 0
    assert (r["n"], r["samples"], r["completions"], r["mask"]) == (6, s.samples, 6 * s.samples, s.mask)
    assert r["hidden_fraction"] == pytest.approx(1 - float(keep.double().mean()))
    assert r["complete"] == {"fill": 0.25} and r["given_pixels_max_change"] == 0.0
    # batches of eval.batch_size (5) over n * samples completions
    assert fake.calls == math.ceil(6 * s.samples / 5)


def test_the_method_never_sees_the_hidden_pixels(tmp_path):
    images = _images()
    fake = FakeCompleter(echo=True)  # returns its input: scores what it was shown
    r = completion.run(_ctx(tmp_path, fake, CompletionSettings(n=6, samples=1), images))
    x = images.double() / 255
    assert all(torch.equal(seen[:, :, 4:], torch.zeros_like(seen[:, :, 4:])) for seen in fake.seen)
    assert r["mse"] == pytest.approx(float((x[:, :, 4:] ** 2).mean(dim=(1, 2, 3)).mean()), rel=1e-6)


def test_given_pixels_are_unchanged_in_what_is_recorded(tmp_path):
    images = _images()
    s = CompletionSettings(n=6, samples=2, mask="random_patches", patch=2)
    fake = FakeCompleter(nudge=0.1)  # breaks the contract on the given pixels
    x, keep, completed, moved = completion.completions(_ctx(tmp_path, fake, s, images))
    assert torch.equal(x, images.float() / 255) and completed.shape == (12, 3, 8, 8)
    k = keep.repeat_interleave(2, 0).expand_as(completed)
    assert torch.equal(completed[k], x.repeat_interleave(2, 0)[k])  # pasted back
    assert torch.all(completed[~k] == 0.25)
    assert moved == pytest.approx(0.1, abs=1e-6)  # and how far the method moved them is on record
    r = completion.run(_ctx(tmp_path, fake, s, images))
    assert r["given_pixels_max_change"] == pytest.approx(0.1, abs=1e-6)


def test_an_exact_completion_is_100_db_not_inf(tmp_path):
    images = torch.full((3, 1, 8, 8), 255, dtype=torch.uint8)
    r = completion.run(_ctx(tmp_path, FakeCompleter(fill=1.0), CompletionSettings(n=3, samples=1), images))
    assert r["mse"] == 0 and r["psnr"] == pytest.approx(100.0)


def test_the_figure_is_a_png_of_given_completions_and_original(tmp_path):
    images = _images(n=4, c=1)
    s = CompletionSettings(n=4, samples=3)
    r = completion.run(_ctx(tmp_path, FakeCompleter(fill=0.0), s, images))
    (rel,) = r["figures"].values()
    data = (tmp_path / rel).read_bytes()
    assert data[:8] == PNG and rel == str(Path("figures") / "eval" / "completion.png")
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    img = torch.from_numpy(np.array(Image.open(tmp_path / rel).convert("L"))).float() / 255
    scale, gap, cell = 8, 2, 8  # 8x8 images are shown 8 times larger; cells 2 pixels apart
    assert img.shape == (scale * (4 * (cell + gap) + gap), scale * (5 * (cell + gap) + gap))

    def cell_at(row, col):
        y, x = scale * (gap + row * (cell + gap)), scale * (gap + col * (cell + gap))
        return img[y:y + scale * cell:scale, x:x + scale * cell:scale]

    for i in range(4):
        original = images[i, 0].float() / 255
        assert torch.allclose(cell_at(i, 4), original, atol=1e-6)                  # the original, last
        given = cell_at(i, 0)
        assert torch.allclose(given[:4], original[:4], atol=1e-6)                 # the top half given
        assert torch.allclose(given[4:], torch.full((4, 8), 128 / 255), atol=1e-6)  # the bottom grey
        for j in (1, 2, 3):                                                       # the completions
            assert torch.allclose(cell_at(i, j)[:4], original[:4], atol=1e-6) and (cell_at(i, j)[4:] == 0).all()


# ------------------------------------------------------------------------------ on a trained run, end to end
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("completion") / "toy"
    pretrain(tiny_config("toy", **{"train.steps": 2}), run)
    return run


def test_a_bad_patch_is_one_line_before_any_work(toy_run):
    proc = run_cli("evaluate", str(toy_run), "--eval.device", "cpu", "--eval.protocols", "[completion]",
                   "--eval.completion.mask", "random_patches", "--eval.completion.patch", "3")
    assert_one_line_error(proc, "eval.completion.patch 3 does not divide the 8x8 images", "choose one of 1, 2, 4")
    assert not (toy_run / "results" / "eval.json").exists()  # nothing written: refused in the preflight


def test_random_patches_on_a_toy_run_with_summary_and_report(toy_run, tmp_path):
    from genrep.run import load_trained

    s = CompletionSettings(n=5, samples=2, mask="random_patches", patch=2, ratio=0.75)
    results = evaluate_run(toy_run, replace(FAST, protocols=["completion"], completion=s), progress=False,
                           say=lambda m: None)
    r = results["protocols"]["completion"]
    assert r["settings"] == {"seed": 0, "weights": "ema", "n": 5, "samples": 2, "mask": "random_patches",
                             "ratio": 0.75, "patch": 2}
    assert r["mask_text"] == "12 of 16 blocks of 2x2 hidden" and r["hidden_fraction"] == 0.75
    assert r["given_pixels_max_change"] == 0.0  # the toy keeps the contract
    _, method, _ = load_trained(toy_run, "ema")
    assert r["complete"] == method.capability_settings("complete") == {"temperature": 0.1}
    assert 0 <= r["mse"] <= 1 and r["psnr"] >= 0 and r["best_of_samples"]["mse"] <= r["mse"]
    for rel in r["figures"].values():
        assert (toy_run / rel).read_bytes()[:8] == PNG
    assert read_results(toy_run)["protocols"]["completion"] == r
    line = evaluation_summary(results)
    assert f"completion   PSNR {r['psnr']:.2f} dB, MSE {r['mse']:.4f} on the filled-in pixels" in line
    assert "12 of 16 blocks of 2x2 hidden; 5 images x 2 samples" in line
    page = write_report([toy_run], tmp_path / "r.html").read_text()
    assert "<h2 id='completion'>Image completion</h2>" in page and f"{r['psnr']:.2f} ± " in page
    assert "Image completion: given, completions, original" in page and "temperature 0.1" in page
