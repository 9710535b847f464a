"""The parts of the method contract the next systems need, exercised through the tests' own ``toy`` method:
data-fitted state, frozen parts, method registration. (Capabilities, random inputs and FLOPs are covered for
every method, toy included, in test_methods.py.)"""

from __future__ import annotations

import importlib
import pkgutil
import shutil

import numpy as np
import pytest
import torch
import toy_method
from conftest import assert_one_line_error, one_line, rng_images, run_cli, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import genrep.methods
from genrep.errors import GenrepError
from genrep.methods import get_method, method_names
from genrep.methods.registry import HELPER_MODULES
from genrep.run import load_trained
from genrep.runs import FROZEN_FILE, PREPARED_FILE
from genrep.train.checkpoint import checkpoint_dirs, load_checkpoint
from genrep.train.loop import Trainer, pretrain


@pytest.fixture
def prepare_calls(monkeypatch):
    calls = []
    original = toy_method.ToyAR.prepare

    def counting(self, images, **kw):
        calls.append(len(images))
        return original(self, images, **kw)

    monkeypatch.setattr(toy_method.ToyAR, "prepare", counting)
    return calls


def _toy(**overrides):
    return tiny_config("toy", **{"train.steps": 10, "train.ckpt_every": 5, **overrides})


def test_prepared_state_is_fitted_once_saved_and_restored_never_refitted(tmp_path, prepare_calls):
    run = tmp_path / "run"
    pretrain(_toy(), run)
    assert prepare_calls == [1437]  # once, on the digits training split
    state = load_file(run / PREPARED_FILE)
    assert set(state) == {"pixel_mean", "pixel_std"} and 0 < float(state["pixel_mean"]) < 1
    with safe_open(str(run / PREPARED_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["method"] == "toy" and meta["data"] == "digits" and meta["images"] == "1437"
    assert not any("pixel_" in k for k in load_file(run / "model.safetensors"))  # referenced, not copied

    _, method, _ = load_trained(run)
    torch.testing.assert_close(method.pixel_mean, state["pixel_mean"], rtol=0, atol=0)
    pretrain(_toy(**{"train.steps": 15}), run, resume=True)
    assert prepare_calls == [1437]  # neither loading nor resuming refits


def test_prepared_state_that_does_not_match_the_data_is_refused(tmp_path):
    data = tmp_path / "set.npz"
    x, y = rng_images(64, 1, 8, 8, seed=1), np.arange(64) % 4
    np.savez(data, x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
    run = tmp_path / "run"
    cfg = _toy(**{"data.name": f"npz:{data}", "train.batch_size": 16})
    pretrain(cfg, run)
    np.savez(data, x_train=rng_images(64, 1, 8, 8, seed=2), y_train=y, x_test=x[:16], y_test=y[:16])
    for attempt in (lambda: pretrain(cfg, run, resume=True), lambda: load_trained(run)):
        with pytest.raises(GenrepError) as e:
            attempt()
        msg = one_line(e)
        assert "prepared.safetensors was fitted on" in msg and "64 images" in msg and "start a new run" in msg
    (run / PREPARED_FILE).unlink()
    with pytest.raises(GenrepError, match="has no prepared.safetensors"):
        load_trained(run)


def test_frozen_parts_stay_out_of_training_state_and_are_referenced(tmp_path):
    tokenizer = tmp_path / "tokenizer.safetensors"
    shutil.copyfile(toy_method.default_tokenizer(4), tokenizer)
    run = tmp_path / "run"
    trainer = Trainer(_toy(**{"model.tokenizer": str(tokenizer)}), run)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    frozen = {id(p) for p in trainer.method.tokenizer.parameters()}
    assert optimized and not optimized & frozen
    assert trainer.ema.model.tokenizer is trainer.method.tokenizer  # shared, not copied
    counts = trainer.method.param_counts()
    assert counts["total"] - counts["trainable"] == 16
    before = trainer.method.tokenizer.weight.clone()
    trainer.fit()
    trainer.close()
    assert torch.equal(trainer.method.tokenizer.weight, before)
    model, ema, state = load_checkpoint(checkpoint_dirs(run)[-1])
    for weights in (model, ema, load_file(run / "model.safetensors")):
        assert weights and not any(k.startswith("tokenizer.") for k in weights)
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(trainer.method.trainable_parameters())
    recorded = (run / FROZEN_FILE).read_text()
    assert str(tokenizer.resolve()) in recorded

    _, method, _ = load_trained(run)
    torch.testing.assert_close(method.tokenizer.weight, before)
    save_file({"weight": torch.eye(4)}, str(tokenizer))  # the user's file changed since training
    for attempt in (lambda: load_trained(run), lambda: pretrain(_toy(**{"model.tokenizer": str(tokenizer),
                                                                        "train.steps": 15}), run, resume=True)):
        with pytest.raises(GenrepError) as e:
            attempt()
        msg = one_line(e)
        assert "frozen part 'tokenizer'" in msg and "the file changed since training" in msg


def test_every_module_of_the_methods_package_registers_itself():
    """A new method is one file: nothing lists the modules of genrep.methods."""
    names = set(method_names())
    for info in pkgutil.iter_modules(genrep.methods.__path__):
        if info.name in HELPER_MODULES:
            continue
        module = importlib.import_module(f"genrep.methods.{info.name}")
        registered = {cls.name for cls in vars(module).values() if isinstance(cls, type)
                      and issubclass(cls, genrep.methods.Method) and cls.__module__ == module.__name__}
        assert registered and registered <= names, info.name
    assert get_method("toy") is toy_method.ToyAR


def test_methods_outside_the_package_register_through_the_environment(tmp_path):
    listed = run_cli("methods")
    assert listed.returncode == 0 and "toy" in listed.stdout  # conftest sets GENREP_METHODS=toy_method
    bad = run_cli("methods", env={"GENREP_METHODS": "no_such_module_here"})
    assert_one_line_error(bad, "GENREP_METHODS names module 'no_such_module_here'")


def test_the_causal_read_out_is_declared_and_switches_attention():
    method = get_method("toy")(tiny_config("toy").model, genrep.methods.DataSpec(8, 1, 10)).eval()
    assert method.causal_readout and method.causal_mask
    x = torch.rand(2, 1, 8, 8)
    causal = method.features(x, pool="last")
    method.causal_mask = False
    assert not torch.allclose(method.features(x, pool="last"), causal)
    assert not get_method("supervised").causal_readout


def test_probes_switch_the_causal_mask_and_cache_each_state_apart(tmp_path):
    from dataclasses import replace

    from eval_helpers import FAST

    from genrep.eval.evaluate import evaluate_run
    from genrep.eval.protocols.probes import ProbesSettings

    run = tmp_path / "toy"
    pretrain(_toy(), run)
    for causal in (None, False):
        ev = replace(FAST, protocols=["probes"], probes=ProbesSettings(epochs=2, sweep=False, causal=causal))
        out = evaluate_run(run, ev, progress=False, say=lambda m: None)["protocols"]["probes"]
        assert out["causal"] is (causal is None)  # as trained: causal
    cached = sorted(p.name for p in (run / "cache").iterdir() if "-train-" in p.name)
    assert any("causal1" in n for n in cached) and any("causal0" in n for n in cached)
    sup = tmp_path / "sup"
    pretrain(tiny_config("supervised", **{"train.steps": 2}), sup)
    ev = replace(FAST, protocols=["probes"], probes=ProbesSettings(causal=True))
    with pytest.raises(GenrepError) as e:
        evaluate_run(sup, ev, progress=False, say=lambda m: None)
    assert "supervised has no causal mask to switch on" in one_line(e) and "toy" in one_line(e)
