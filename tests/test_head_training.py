"""The diffusion-features paper's heads as `genrep probe` trains them (issue 26): a new noise draw and flip every
epoch on features read on the fly, the authors' schedule as a preset, the headline, and the extraction precision
in the results and the feature-cache key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import one_line, tiny_config
from eval_helpers import no_extraction

from genrep.cli import main
from genrep.config import EvalConfig, ProbeConfig, build_dataclass, recipe_names, resolve_config
from genrep.data.augment import Augmentation, augment
from genrep.errors import GenrepError
from genrep.eval.evaluate import run_probes
from genrep.eval.protocols.context import EvalContext, reads_noised
from genrep.eval.protocols.head_online import augment_batch, fit_head_streamed
from genrep.eval.protocols.head_training import HeadSettings, fit_head
from genrep.eval.report.summary import headline, probe_table
from genrep.methods import DataSpec, build_method, get_method, method_names
from genrep.run import Run
from genrep.train.loop import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--device", "cpu", "--probe.weight_decay", "1e-3", "--probe.knn_k", "5"]
NOISED = [n for n in method_names() if reads_noised(get_method(n))]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> Path:
    """A tiny adm run; its recipe (adm-digits) trains the heads on fresh noise and flips, with raw inputs."""
    out = tmp_path_factory.mktemp("heads") / "run"
    pretrain(tiny_config("adm", **{"train.steps": 2}), out)
    return out


def _probe(run: Path, capsys, *args: str) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["probe", str(run), *ARGS, *args]) == 0
    return json.loads((run / "results" / "probe.json").read_text()), capsys.readouterr().out


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("genrep: error: "), (rc, lines)
    return lines[0]


def test_the_adm_recipes_train_the_heads_as_the_paper():
    recipes = [r for r in recipe_names() if r.startswith("adm-")]
    assert {"adm-digits", "adm-cifar10", "adm-imagenet256"} <= set(recipes)
    for recipe in recipes:
        cfg = resolve_config(recipe)
        for head in (cfg.probe.head, cfg.eval.probes.head):
            assert (head.noise, head.augment, head.standardize) == ("fresh", "flip", False), recipe
    paper = resolve_config("adm-imagenet256").probe
    assert paper.headline == "linear" and "linear" in paper.heads and paper.precision == "fp16"


def test_probe_heads_read_fresh_noise_and_flips_every_epoch_and_record_it(run, capsys):
    probe, out = _probe(run, capsys, "--probe.heads", "linear,attention", "--probe.head.epochs", "1",
                        "--model.feature_t", "50")
    assert probe["precision"] == "fp32" and probe["feature_t"] == 50
    for kind, h in probe["heads"].items():
        assert h["features"] == "extracted every epoch" and h["train_noise"] == "fresh" and h["test_noise"] == "fixed"
        assert h["augment"] == "flip" and h["epochs"] == 1 and h["optimizer"] == "adam" and h["preset"] == "custom"
        assert h["standardize"] is False and h["precision"] == "fp32" and 0 <= h["test_acc"] <= 1
        assert f"{kind} head ({h['pool']} pool, {h['params']:,} parameters): adam lr 0.001, fresh noise, augment " \
               f"flip" in out
    # nothing read per epoch is cached: the map the attention head trained on is not in the cache
    assert not any("-map-" in p.name for p in (run / "cache").iterdir())


def test_each_epoch_reads_a_new_noise_draw_and_new_flips(run):
    ctx = EvalContext.open(Run.open(run), EvalConfig(device="cpu", batch_size=500), options={"feature_t": 50}, progress=False)
    method, seen = ctx.method, []
    real = method.feature_sets
    method.feature_sets = lambda x, reads: seen.append((x.clone(), method._noise_draw)) or real(x, reads)
    n = len(ctx.train)
    s = HeadSettings(epochs=2, batch_size=n, noise="fresh", augment="flip", standardize=False)  # one batch an epoch
    fit_head_streamed(ctx, "linear", s, 9, "1", fresh=True)
    shape_probe, epochs, tests = seen[0], seen[1:3], seen[3:]
    assert shape_probe[1] is None and [draw for _, draw in epochs] == [0, 1]
    gen = torch.Generator().manual_seed(ctx.ev.seed)  # the head's shuffle: one permutation per epoch
    images = ctx.train.images.float() / 255
    flipped = []
    for x, _ in epochs:
        order = images[torch.randperm(n, generator=gen)]
        mirror = (x == order.flip(-1)).flatten(1).all(1)
        same = (x == order).flatten(1).all(1)
        assert (mirror | same).all()  # every image is itself or its mirror
        flipped.append(mirror & ~same)
    assert 0.4 < flipped[0].float().mean() < 0.6 and not torch.equal(flipped[0], flipped[1])
    # the test images are read once, unaugmented, with the read-out's own noise
    assert all(draw is None for _, draw in tests)
    torch.testing.assert_close(torch.cat([x for x, _ in tests]), ctx.test.images.float() / 255)


@pytest.mark.parametrize("name", NOISED)
def test_fresh_noise_draws_are_new_per_draw_repeatable_and_apart_from_the_read_out(name):
    cfg = tiny_config(name, **{"model.feature_t": 50}).model
    torch.manual_seed(0)
    method = build_method(name, cfg, DataSpec(8, 1, 10)).eval()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        own = method.features(x)
        with method.fresh_noise(0):
            a, again, part = method.features(x), method.features(x), method.features(x[:2])
        with method.fresh_noise(1):
            b = method.features(x)
        after = method.features(x)
    torch.testing.assert_close(a, again, rtol=0, atol=0)
    torch.testing.assert_close(part, a[:2])  # a function of the image, not of its batch
    assert not torch.allclose(a, b) and not torch.allclose(a, own)
    torch.testing.assert_close(after, own, rtol=0, atol=0)  # the read-out's own noise again after the block


def test_a_clean_read_out_with_fresh_noise_and_no_augmentation_trains_on_the_cache(run, capsys):
    probe, _ = _probe(run, capsys, "--probe.heads", "linear", "--probe.head.epochs", "1", "--probe.head.augment",
                      "none")
    h = probe["heads"]["linear"]
    assert probe["feature_t"] is None
    assert (h["features"], h["train_noise"], h["test_noise"], h["train_acc_on"]) == ("cached", "none", "none",
                                                                                      "train split")


def test_crop_flip_is_the_crop_augmentation_at_the_chosen_scale(run, capsys):
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    ours = augment_batch(x, "crop_flip", 0.3, torch.Generator().manual_seed(4))
    ref = augment(x, Augmentation("crop", crop_scale=0.3), torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    probe, _ = _probe(run, capsys, "--probe.heads", "cnn", "--probe.head.epochs", "1", "--probe.head.augment",
                      "crop_flip", "--probe.head.crop_scale", "0.3", "--probe.head.cnn_channels", "8,8")
    assert probe["heads"]["cnn"]["augment"] == "crop_flip" and probe["heads"]["cnn"]["crop_scale"] == 0.3


def test_the_diffssl_preset_is_the_authors_schedule(run, capsys):
    s = HeadSettings(preset="diffssl")
    common = {"epochs": 28, "optimizer": "sgd", "momentum": 0.0, "step_every": 7, "gamma": 0.1, "batch_size": 128,
              "weight_decay": 0.0}
    assert s.schedule("linear") == {**common, "lr": 1e-2} and s.schedule("attention") == {**common, "lr": 5e-2}
    probe, out = _probe(run, capsys, "--probe.heads", "linear", "--probe.head.epochs", "1", "--probe.head.preset",
                        "diffssl")
    h = probe["heads"]["linear"]
    assert (h["optimizer"], h["lr"], h["batch_size"], h["step_every"], h["preset"]) == ("sgd", 0.01, 128, 7,
                                                                                        "diffssl")
    with pytest.raises(GenrepError) as e:
        resolve_config("adm-digits", {"probe.head.preset": "diffssl", "probe.head.lr": 0.1})
    assert "probe.head.preset diffssl fixes the schedule" in one_line(e) and "probe.head.lr would be ignored" in \
        one_line(e) and "set probe.head.preset custom" in one_line(e)


def test_the_headline_head_is_reported_first(run, capsys):
    probe, out = _probe(run, capsys, "--probe.heads", "linear", "--probe.head.epochs", "1", "--probe.headline",
                        "linear")
    assert probe["headline"] == {"name": "linear head", "test_acc": probe["heads"]["linear"]["test_acc"]}
    assert out.splitlines()[3].startswith("linear head (")  # the first row under the table's header
    assert probe_table({**probe, "headline": {"name": "linear probe", "test_acc": 0.5}}).splitlines()[3].startswith(
        "linear probe (")
    r = {"linear_acc": 0.5, "knn": {"5": 0.4}, "headline": {"name": "attention head", "test_acc": 0.75}}
    assert headline("probes", r).startswith("attention head 75.00%, linear 50.00%")
    # a headline head is trained even when a command line's heads leave it out
    probe, _ = _probe(run, capsys, "--probe.heads", "[]", "--probe.head.epochs", "1", "--probe.headline", "linear")
    assert list(probe["heads"]) == ["linear"] and probe["headline"]["name"] == "linear head"


def test_a_precision_the_device_cannot_run_is_refused_before_any_work(run, capsys, monkeypatch):
    work = no_extraction(monkeypatch)
    before = (run / "results" / "probe.json").read_bytes() if (run / "results" / "probe.json").exists() else None
    line = _cli_error(capsys, ["probe", str(run), *ARGS, "--probe.precision", "fp16"])
    assert "extraction precision fp16 needs a CUDA device" in line and "choose fp32, bf16 or auto" in line
    with pytest.raises(GenrepError, match="fp16 needs a CUDA device"):
        EvalContext.open(Run.open(run), EvalConfig(device="cpu", precision="fp16"), progress=False)
    assert work == [] and ((run / "results" / "probe.json").read_bytes() if before is not None else None) == before


def test_the_cache_keeps_each_precision_apart_and_results_record_it(run):
    probe = build_dataclass(ProbeConfig, {"knn_k": [5], "weight_decay": [1e-3], "precision": "bf16"}, "probe")
    r = run_probes(run, probe, device="cpu", progress=False)
    assert r["precision"] == "bf16"
    feats = {}
    for precision in ("bf16", "fp32"):
        ctx = EvalContext.open(Run.open(run), EvalConfig(device="cpu", precision=precision), progress=False)
        feats[precision] = ctx.features("train", 9, "1")
        assert ctx.feature_key("train", 9, "1").endswith(f"-{precision}-ema")
    names = [p.name for p in (run / "cache").iterdir() if "-train-layer9-1-feature_tNone" in p.name]
    assert sorted(n.split("-")[-2] for n in names) == ["bf16", "fp32"]
    assert not torch.equal(feats["bf16"], feats["fp32"])
    with torch.no_grad():
        torch.testing.assert_close(feats["fp32"], ctx.method.features(ctx.train.images.float() / 255, 9, "1"))


def test_the_cached_path_refuses_settings_that_draw_per_epoch(run):
    ctx = EvalContext.open(Run.open(run), EvalConfig(device="cpu"), progress=False)
    x = torch.zeros(len(ctx.train), 4)
    with pytest.raises(GenrepError) as e:
        fit_head(ctx, "linear", HeadSettings(augment="flip"), x, torch.zeros(len(ctx.test), 4))
    assert "read new features every epoch" in one_line(e) and "head.augment none" in one_line(e)


def test_the_head_noise_benchmark_trains_a_tiny_u_net_and_runs(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "head_noise.py"
    spec = importlib.util.spec_from_file_location("head_noise", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = [f"--model.{k}={v}" for k, v in get_method("adm").tiny_config.items() if not isinstance(v, list)]
    tiny += ["--model.channel_mult=1,2", "--model.attention_resolutions=4", "--data.image_size=8"]
    out = tmp_path / "rows.json"
    assert bench.main(["--train-steps", "2", "--epochs", "1", "--heads", "linear", "--modes", "fixed,fresh-flip",
                       "--device", "cpu", "--peak-tflops", "1", "--out", str(tmp_path / "run"), "--json", str(out),
                       *tiny]) == 0
    rows = json.loads(out.read_text())
    assert [(r["head"], r["mode"], r["features"]) for r in rows] == [("linear", "fixed", "cached"),
                                                                     ("linear", "fresh-flip", "extracted every epoch")]
    assert rows[0]["extract_s"] > 0 and rows[1]["train_noise"] == "fresh" and rows[1]["mfu"] > 0
    assert all(r["images_per_s"] > 0 and 0 <= r["test_acc"] <= 1 for r in rows)
    assert "images/s" in capsys.readouterr().out
    assert bench.main(["--run", str(tmp_path / "run"), "--heads", "svm"]) == 2
    assert "unknown head in --heads svm" in capsys.readouterr().err
