"""genrep pretrain --init RUN: continued pretraining from another run's weights and fitted state (GCRL section 4.2:
the 76M models pretrained on ImageNet32 continue 15 epochs on CIFAR with the pretraining objective), and the strong
view's crop scale (table 9's weak augmentation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY_RUN, assert_one_line_error, one_line, rng_images, run_cli, tiny_config
from genrep.config import resolve_config
from genrep.errors import GenrepError
from genrep.run import load_trained
from genrep.runs import INIT_FILE, PREPARED_FILE, check_init_source
from genrep.train import loop
from genrep.train.loop import Trainer, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = {"train.steps": 4, "train.ckpt_every": 4, "train.log_every": 2}


def _npz(tmp_path, seed=1):
    """8x8 grey images that are not digits: the continuation's data set differs from the source's, as CIFAR from
    ImageNet32."""
    path = tmp_path / "other.npz"
    x = rng_images(96, 1, 8, 8, seed)[:, 0]
    np.savez(path, x_train=x[:64], y_train=np.arange(64) % 4, x_test=x[64:], y_test=np.arange(32) % 4)
    return f"npz:{path}"


@pytest.fixture(scope="module")
def source(tmp_path_factory, one_thread):
    """A tiny GCRL run on digits, trained 4 steps."""
    run = tmp_path_factory.mktemp("init") / "source"
    pretrain(tiny_config("gcrl", **STEPS), run)
    return run


def _palette(run):
    with safe_open(str(run / PREPARED_FILE), "pt") as f:
        return f.get_tensor("palette"), f.metadata()


def test_init_starts_from_the_sources_weights_and_palette(source, tmp_path, monkeypatch):
    def refit(*a, **k):
        raise AssertionError("an --init run must not refit the palette")

    monkeypatch.setattr(loop, "fit_prepared", refit)
    cfg = tiny_config("gcrl", **STEPS, **{"data.name": _npz(tmp_path), "train.seed": 7, "optim.lr": 1e-3})
    trainer = Trainer(cfg, tmp_path / "next", init=source)
    try:
        want = load_file(str(source / "model.safetensors"))
        for sd in (trainer.method.state_dict(), trainer.ema.model.state_dict()):  # step 0 is the source's weights
            assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)
        assert torch.equal(trainer.method.palette, _palette(source)[0])
        assert trainer.start_step == 0 and not trainer.optimizer.state  # a fresh optimizer and schedule
        trainer.fit()
    finally:
        trainer.close()
    run = tmp_path / "next"
    palette, meta = _palette(run)
    src_palette, src_meta = _palette(source)
    assert torch.equal(palette, src_palette)
    # the new run's fingerprint is its own data (resume and evaluation check it); the fitted-on data is the source's
    assert meta["data"].startswith("npz:") and meta["fitted_data"] == src_meta["data"] == "digits"
    assert meta["inherited_from"] == str(source.resolve())
    # results record the source's palette, not one "fitted on the training set" of this run
    assert src_meta["origin"].startswith("k-means fitted on its run's training set") and "origin" not in meta
    assert meta["fitted_origin"] == src_meta["origin"]
    assert trainer.method.palette_record() == (f"inherited from run {source.resolve()} (trained on digits): "
                                               f"{src_meta['origin']}")
    reloaded = load_trained(run)[1]
    assert reloaded.palette_record() == trainer.method.palette_record()
    record = json.loads((run / INIT_FILE).read_text())
    import hashlib
    assert record["sha256"] == hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    assert record["run"] == str(source.resolve()) and record["step"] == 4 and record["method"] == "gcrl"

    # resumed on its own data: the inherited palette is read back, never refit; on the source's data: refused
    monkeypatch.undo()
    pretrain(tiny_config("gcrl", **{**STEPS, "train.steps": 6}, **{"data.name": _npz(tmp_path), "train.seed": 7,
                                                                     "optim.lr": 1e-3}), run, resume=True)
    assert torch.equal(_palette(run)[0], src_palette)
    with pytest.raises(GenrepError) as e:
        pretrain(tiny_config("gcrl", **{**STEPS, "train.steps": 8}), run, resume=True)
    assert "fitted on npz:" in one_line(e)


@pytest.mark.parametrize("overrides,fragments", [
    ({"model.dim": 48}, ["another architecture", "(32 there, 48 here)"]),
    ({"model.depth": 3, "model.encoder_depth": 1}, ["another architecture", "net.blocks.2", "and "]),
    ({"model.colours": 6}, ["palette of 8 colours", "model.colours is 6"]),
])
def test_init_refuses_another_architecture_or_palette(source, overrides, fragments):
    with pytest.raises(GenrepError) as e:
        check_init_source(source, tiny_config("gcrl", **overrides))
    msg = one_line(e)
    for f in fragments:
        assert f in msg, msg


def test_init_refuses_another_method_a_missing_run_and_a_folder_that_is_no_run(source, tmp_path):
    with pytest.raises(GenrepError) as e:
        check_init_source(source, tiny_config("igpt"))
    assert "is a gcrl run but this config trains igpt" in one_line(e)
    with pytest.raises(GenrepError) as e:
        check_init_source(tmp_path / "nowhere", tiny_config("gcrl"))
    assert "is not a folder" in one_line(e)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.yaml").write_text("method: gcrl\n")
    with pytest.raises(GenrepError) as e:
        check_init_source(tmp_path / "plain", tiny_config("gcrl"))
    assert "is not a genrep run" in one_line(e)
    with pytest.raises(GenrepError) as e:
        Trainer(tiny_config("gcrl"), source, resume=True, init=source)
    assert "drop --init" in one_line(e)


def test_cli_init_refusals_are_one_line(source, tmp_path):
    tiny = [f"--{k}={v}" for k, v in {**TINY_RUN, **STEPS}.items()] + \
        ["--model.dim=32", "--model.depth=2", "--model.num_heads=2", "--model.colours=8", "--model.drop=0"]
    gcrl = ["--model.encoder_depth=1", "--model.proj_hidden=32", "--model.proj_dim=16"]
    for args, fragments in [
        (["--init", str(tmp_path / "missing")], ["--init", "is not a folder"]),
        (["--init", str(source), "--model.dim=64"], ["another architecture", "(32 there, 64 here)"]),
        (["--init", str(source), "--model.colours=16"], ["palette of 8 colours"]),
        (["--init", str(source), "--resume", str(source)], ["--init", "--resume"]),
    ]:
        proc = run_cli("pretrain", "--recipe", "gcrl-digits", "--out", str(tmp_path / "new"), *tiny, *gcrl, *args)
        assert_one_line_error(proc, *fragments)
        assert not (tmp_path / "new").exists()
    proc = run_cli("pretrain", "--recipe", "igpt-digits", "--out", str(tmp_path / "new"), *tiny, "--init", str(source))
    assert_one_line_error(proc, "is a gcrl run", "trains igpt")


def test_crop_scale_is_a_model_key_of_the_strong_views():
    from genrep.data.augment import Augmentation
    from genrep.methods import build_method
    from genrep.methods.base import DataSpec

    for name in ("simclr", "gcrl"):
        cfg = tiny_config(name, **{"model.crop_scale": 0.8, "model.contrastive_augment": "strong"})
        views = build_method(name, cfg.model, DataSpec(8, 1, 10)).views()
        strong = [v for v in views.values() if isinstance(v, Augmentation) and v.kind == "strong"]
        assert strong and all(v.crop_scale == 0.8 for v in strong)
        for bad in (0, 1.5, -0.2):
            with pytest.raises(GenrepError) as e:
                resolve_config(f"{name}-digits", {"model.crop_scale": bad})
            assert "crop_scale" in one_line(e)


def test_cli_continues_a_run_and_the_evaluation_shows_its_source(source, tmp_path):
    tiny = [f"--{k}={v}" for k, v in {**TINY_RUN, **STEPS}.items()] + [
        "--model.dim=32", "--model.depth=2", "--model.num_heads=2", "--model.colours=8", "--model.drop=0",
        "--model.encoder_depth=1", "--model.proj_hidden=32", "--model.proj_dim=16", "--model.augment=none",
        "--model.skip_off_branch=false"]
    run = tmp_path / "next"
    proc = run_cli("pretrain", "--recipe", "gcrl-digits", "--out", str(run), *tiny, "--init", str(source))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / INIT_FILE).read_text())["run"] == str(source.resolve())
    proc = run_cli("evaluate", str(run), "--eval.protocols", "probes", "--eval.probes.solver", "lbfgs",
                   "--eval.probes.sweep", "false")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run / "results" / "eval.json").read_text())
    assert results["init"]["run"] == str(source.resolve()) and len(results["init"]["sha256"]) == 64


def test_the_76m_recipes_and_their_cifar_continuations():
    from genrep.methods import build_method
    from genrep.methods.base import DataSpec

    lrs = {"igpt": 3.2e-3, "simclr": 9.6e-4, "gcrl": 9.6e-4}  # table 3's CIFAR column
    for m in ("igpt", "simclr", "gcrl"):
        src, cont = resolve_config(f"{m}-imagenet32-76m"), resolve_config(f"{m}-cifar10-from-imagenet32")
        assert (src.model.dim, src.model.depth) == (512, 24) and src.model.attention == "axial"
        assert (cont.train.epochs, cont.train.batch_size, cont.optim.lr) == (15, 384, lrs[m])
        if m == "gcrl":
            assert src.model.encoder_depth == cont.model.encoder_depth == 12 and cont.model.generative_only == 0
        with torch.device("meta"):  # the continuation takes the ImageNet32 run's weights as they are
            a = build_method(m, src.model, DataSpec(32, 3, 1000)).state_dict()
            b = build_method(m, cont.model, DataSpec(32, 3, 10)).state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        n = sum(v.numel() for k, v in a.items() if k.startswith("net.blocks"))
        assert 70e6 < n < 80e6, n  # table 1's 76M (GCRL: 38 + 38)
    for m in ("gcrl", "simclr"):
        weak = resolve_config(f"{m}-cifar10-table9-weak")
        assert weak.model.crop_scale == 0.8
        # table 9's curve: the 5-NN test loss every 20 epochs of CIFAR-10 at batch 512
        assert "knn5_loss" in weak.train.eval_metrics and weak.train.eval_every == 20 * (50_000 // 512)
        assert resolve_config(f"{m}-cifar10").model.crop_scale == 0.2
