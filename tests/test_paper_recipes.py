"""The HybViT paper's recipes train and evaluate as its public code (sndnyang/Diffusion_ViT) ran them."""

from __future__ import annotations

import pytest

from genrep.config import resolve_config
from genrep.train.loop import schedule

PAPER = ("hybvit-cifar10", "genvit-cifar10", "supervised-cifar10")
# gevit_main.py: RASampler(50,000 images, batch 128, len_factor ra=3, drop_last) gives 150,000 // 128 = 1,171
# iterations an "epoch"; 500 epochs, 10 of them warm-up
CODE_EPOCH = 150_000 // 128


@pytest.mark.parametrize("recipe", PAPER)
def test_the_budget_is_the_codes_500_epochs_in_steps(recipe):
    cfg = resolve_config(recipe)
    assert cfg.train.batch_size == 128
    assert cfg.train.steps == 500 * CODE_EPOCH == 585_500
    assert cfg.optim.warmup_steps == 10 * CODE_EPOCH == 11_710
    for steps_per_epoch in (390, 781):  # the schedule does not depend on genrep's own epoch
        assert schedule(cfg, steps_per_epoch) == (585_500, 11_710)


@pytest.mark.parametrize("recipe", PAPER)
def test_the_optimizer_and_ema_are_the_codes(recipe):
    cfg = resolve_config(recipe)
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.min_lr, o.weight_decay, o.clip_grad) == (1e-3, 1e-6, 0.05, 1.0)
    assert o.decay_exclusions is False  # AdamW(diffusion_model.parameters()): every parameter decays
    assert (t.ema_decay, t.ema_warmup) == (0.999, False)


@pytest.mark.parametrize("recipe", ["hybvit-cifar10", "supervised-cifar10"])
def test_the_classifier_trains_with_label_smoothing(recipe):
    assert resolve_config(recipe).model.label_smoothing == 0.1


@pytest.mark.parametrize("recipe", ["hybvit-cifar10", "genvit-cifar10"])
def test_generation_samples_with_1000_step_ddpm(recipe):
    m = resolve_config(recipe).model
    assert m.sampler == "ddpm" and m.timesteps == 1000


def test_the_generation_protocol_samples_with_the_recipes_sampler_and_records_it(tmp_path, monkeypatch):
    """A run whose recipe says DDPM is evaluated with DDPM (all T steps), and eval.json says so; a read option
    changes it for one evaluation only."""
    from conftest import tiny_config

    from genrep.config import EvalConfig
    from genrep.eval.evaluate import evaluate_run
    from genrep.methods import diffusion_model
    from genrep.train.loop import pretrain

    cfg = tiny_config("genvit", **{"model.timesteps": 20, "model.sampler": "ddpm", "model.sample_precision": "fp32"})
    pretrain(cfg, tmp_path)
    calls = []
    real = diffusion_model.sample

    def recording(*args, **kwargs):
        calls.append((kwargs["sampler"], kwargs["steps"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion_model, "sample", recording)
    from dataclasses import replace

    ev = replace(EvalConfig(), protocols=["generation"], device="cpu", batch_size=64)
    ev = replace(ev, generation=replace(ev.generation, samples=8, extractor="classifier"))
    r = evaluate_run(tmp_path, ev, progress=False, say=lambda m: None)["protocols"]["generation"]
    assert r["sample"] == {"sampler": "ddpm", "steps": 20, "precision": "fp32"}
    assert calls == [("ddpm", None)]  # DDPM: every one of the T steps
    calls.clear()
    r = evaluate_run(tmp_path, ev, options={"sampler": "ddim", "sample_steps": 5}, progress=False,
                     say=lambda m: None)["protocols"]["generation"]
    assert r["sample"] == {"sampler": "ddim", "steps": 5, "eta": 0.0, "precision": "fp32"} and calls == [("ddim", 5)]


def test_an_epoch_override_of_a_recipe_counting_steps_is_refused_not_ignored(tmp_path):
    from conftest import assert_one_line_error, run_cli

    proc = run_cli("pretrain", "--recipe", "hybvit-cifar10", "--out", str(tmp_path / "run"), "--train.epochs", "10")
    assert_one_line_error(proc, "counts its budget in steps (train.steps 585500)", "--train.steps 0")
    cfg = resolve_config("hybvit-cifar10", {"train.steps": 0, "train.epochs": 10.0})
    assert (cfg.train.steps, cfg.train.epochs) == (0, 10.0)
    assert resolve_config("hybvit-cifar10").train.epochs is None  # one unit in the saved config


def test_a_warmup_epochs_override_of_a_recipe_counting_warmup_steps_is_refused():
    from genrep.errors import GenrepError

    with pytest.raises(GenrepError, match=r"counts its warm-up in steps \(optim.warmup_steps 11710\)"):
        resolve_config("supervised-cifar10", {"optim.warmup_epochs": 0.2})
    cfg = resolve_config("supervised-cifar10", {"optim.warmup_steps": 0, "optim.warmup_epochs": 0.2})
    assert cfg.optim.warmup_epochs == 0.2 and cfg.optim.warmup_steps == 0


TOKEN_PAPER = [f"{m}-{d}" for m in ("gcrl", "igpt", "simclr") for d in ("cifar10", "cifar100", "imagenet32")]


@pytest.mark.parametrize("recipe", TOKEN_PAPER)
def test_the_colour_token_paper_recipes_are_axial_and_say_their_readings(recipe):
    from importlib import resources

    cfg = resolve_config(recipe)
    text = resources.files("genrep.recipes").joinpath(f"{recipe}.yaml").read_text()
    assert cfg.model.attention == "axial" and "--model.attention dense" in text
    assert "NOT comparable with the paper" in text and "Open readings" in text
    if cfg.method != "igpt":
        assert cfg.model.tau == (0.1 if recipe.endswith("imagenet32") else 0.5)
    if cfg.method == "simclr":
        assert cfg.model.causal is True and "--model.causal false" in text
    assert resolve_config(recipe, {"model.attention": "dense", **({"model.causal": False} if cfg.method == "simclr"
                                                                  else {})}).model.attention == "dense"
    if cfg.method == "gcrl":
        assert resolve_config(recipe, {"model.encoder_depth": 12}).model.encoder_depth == 12  # table 7
