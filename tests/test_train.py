import math
import shutil

import pytest
import torch
from conftest import assert_close_weights, tiny_config
from safetensors.torch import load_file

from genrep.errors import GenrepError
from genrep.methods import get_method
from genrep.methods.supervised import SupervisedViT
from genrep.runs import mark_run
from genrep.train.checkpoint import checkpoint_dirs, load_checkpoint, load_state
from genrep.train.ema import EMA
from genrep.train.logger import read_log
from genrep.train.loop import pretrain
from genrep.train.optim import lr_at

# tiny models: one intra-op thread trains them several times faster on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(run, name="model"):
    return load_file(run / f"{name}.safetensors")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k



def test_lr_schedule_warms_up_then_follows_a_cosine():
    lrs = [lr_at(s, 100, 10, 1.0, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10]))
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.1)


def test_ema_is_a_moving_average():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.9, warmup=False)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(step=0)
    torch.testing.assert_close(ema.model.weight, 0.9 * before + 0.1 * model.weight)


def test_ema_warmup_follows_the_update_count():
    ema = EMA(torch.nn.Linear(2, 1), 0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(10 ** 6) == 0.999
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.copy_(torch.ones_like(model.weight))
    before = ema.model.weight.clone()
    ema.update(step=0)  # the first update mostly takes the trained weights
    torch.testing.assert_close(ema.model.weight, 0.1 * before + 0.9 * model.weight)


def test_a_run_folder_has_everything(tmp_path):
    result = pretrain(tiny_config(), tmp_path)
    assert result.steps == 20 and result.start_step == 0
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["step_00000010", "step_00000020"]
    model, ema, state = load_checkpoint(checkpoint_dirs(tmp_path)[-1])
    _assert_same_weights(model, _weights(tmp_path))
    _assert_same_weights(ema, _weights(tmp_path, "ema"))
    assert state["step"] == 20 and "optimizer" in state
    torch.load(checkpoint_dirs(tmp_path)[-1] / "state.pt", weights_only=True)  # nothing beyond plain data
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert {"loss", "ce", "lr", "grad_norm", "images_per_s", "epoch"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_runs_are_reproducible(tmp_path):
    pretrain(tiny_config(**{"train.steps": 6, "model.drop": 0.1}), tmp_path / "a")
    pretrain(tiny_config(**{"train.steps": 6, "model.drop": 0.1}), tmp_path / "b")
    _assert_same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_resume_from_an_earlier_checkpoint_is_bit_identical(tmp_path, method_name):
    """A run stopped right after its step-10 checkpoint, then resumed, ends exactly where an uninterrupted
    one does (dropout, augmentation and the diffusion steps and noise included)."""
    model = tiny_config(method_name).model
    # the method's dropout key: ViTs' drop, ADM's dropout (guided-diffusion's name)
    extra = {f"model.{next(k for k in ('drop', 'dropout') if hasattr(model, k))}": 0.1}
    if hasattr(model, "augment"):
        extra["model.augment"] = "strong"
    cfg = tiny_config(method_name, **extra)
    full, cut = tmp_path / "full", tmp_path / "cut"
    pretrain(cfg, full)
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000020")  # as if killed before the final checkpoint
    result = pretrain(cfg, cut, resume=True)
    assert result.start_step == 10
    for name in ("model", "ema"):
        _assert_same_weights(_weights(full, name), _weights(cut, name))
    assert [r["step"] for r in read_log(cut)] == [5, 10, 15, 20]  # the log is not duplicated


def test_gradient_accumulation_matches_one_big_batch(tmp_path, method_name):
    if get_method(method_name).batch_coupled:  # NT-Xent's negatives: micro-batches would change the objective
        with pytest.raises(GenrepError, match="couples the samples of a batch.*accum_steps 1"):
            pretrain(tiny_config(method_name, **{"train.steps": 4, "train.accum_steps": 4}), tmp_path / "four")
        assert not (tmp_path / "four").exists()
        return
    pretrain(tiny_config(method_name, **{"train.steps": 4}), tmp_path / "one")
    pretrain(tiny_config(method_name, **{"train.steps": 4, "train.accum_steps": 4}), tmp_path / "four")
    assert_close_weights(_weights(tmp_path / "one"), _weights(tmp_path / "four"))


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = SupervisedViT.loss

    def loss_going_nan(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] > 12:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SupervisedViT, "loss", loss_going_nan)
    with pytest.raises(GenrepError) as e:
        pretrain(tiny_config(), tmp_path)
    msg = str(e.value)
    assert "NaN/inf by step 15" in msg and "step 10" in msg and "\n" not in msg
    assert f"--resume {tmp_path} --optim.lr 0.0005" in msg  # the recipe's 1e-3, halved
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["step_00000010"]
    model, _, state = load_checkpoint(checkpoint_dirs(tmp_path)[0])
    assert state["step"] == 10 and all(torch.isfinite(v).all() for v in model.values())
    _assert_same_weights(model, _weights(tmp_path))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    pretrain(tiny_config(**{"train.steps": 10}), tmp_path)
    last = checkpoint_dirs(tmp_path)[-1]
    data = (last / "model.safetensors").read_bytes()
    (last / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GenrepError, match="corrupt or truncated"):
        pretrain(tiny_config(**{"train.steps": 10}), tmp_path, resume=True)
    (last / "state.pt").write_bytes(b"not a zip file")
    with pytest.raises(GenrepError, match="corrupt"):
        load_state(last / "state.pt")


def test_resume_with_another_architecture_is_refused(tmp_path):
    pretrain(tiny_config(**{"train.steps": 10}), tmp_path)
    with pytest.raises(GenrepError, match="does not fit the model"):
        pretrain(tiny_config(**{"train.steps": 10, "model.dim": 64}), tmp_path, resume=True)


def test_bf16_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(GenrepError, match="bf16 needs a CUDA device"):
        pretrain(tiny_config(**{"train.precision": "bf16"}), tmp_path)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, method_name):
    """torch.compile (the CUDA fast path's compiler, here on the CPU) trains the same model."""
    pretrain(tiny_config(method_name, **{"train.steps": 4}), tmp_path / "eager")
    pretrain(tiny_config(method_name, **{"train.steps": 4, "train.compile": True}), tmp_path / "compiled")
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert a.keys() == b.keys()  # checkpoints hold the plain module's names, not the compiled wrapper's
    assert_close_weights(a, b)


@pytest.mark.parametrize("override, fragment", [
    ({"train.batch_size": 0}, "train.batch_size must be at least 1"),
    ({"optim.lr": -1.0}, "optim.lr must be above 0, got -1.0"),
    ({"optim.betas": [0.9]}, "optim.betas must be two numbers"),
    ({"train.accum_steps": 3}, "divisible by processes x accum_steps"),
    ({"train.ema_decay": 1.0}, "train.ema_decay must be at least 0 and below 1, got 1.0"),
    ({"train.precision": "fp8"}, "train.precision 'fp8' is unknown"),
    ({"train.device": "tpu"}, "device 'tpu' is unknown"),
])
def test_bad_training_settings_are_clear_errors(tmp_path, override, fragment):
    with pytest.raises(GenrepError) as e:
        pretrain(tiny_config(**override), tmp_path)
    assert fragment in str(e.value)
    assert not (tmp_path / "checkpoints").exists()


def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    mark_run(tmp_path)  # the first thing a new run writes
    (tmp_path / "log.jsonl").write_text('{"step": 5, "loss": 9.0}\n{"step": 6, "lo')  # cut mid-line
    result = pretrain(tiny_config(**{"train.steps": 5}), tmp_path, resume=True)
    assert result.start_step == 0
    assert [r["step"] for r in read_log(tmp_path)] == [5] and read_log(tmp_path)[0]["loss"] != 9.0
