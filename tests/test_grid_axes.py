"""A grid axis that cannot change anything is refused before any training (issue 24, item 5): a key the method
does not read under the recipe (DARL's Beta keys with the MSE decoder), a capability's option, a single value;
repeats are refused alike by `genrep grid` and `genrep sweep`; a malformed .genrep-grid marker says so. Every
method's declared inert keys are checked to change nothing: not the weights, the random inputs, the loss nor the
features."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TINY_RUN, tiny_config

from genrep.cli import main
from genrep.config import save_config
from genrep.errors import GenrepError
from genrep.grid import GRID_MARKER, plan_grid
from genrep.methods import DataSpec, build_method, get_method
from genrep.methods.base import example_batch

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)
TINY = [a for k, v in {**TINY_RUN, "train.steps": 2}.items() for a in (f"--{k}", str(v))]


def _refused(capsys, tmp_path, *args: str) -> str:
    """`genrep grid ARGS` refused in one line, with nothing written; the line."""
    out = tmp_path / "g"
    assert main(["grid", *args, "--out", str(out), *TINY]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("genrep: error: "), err
    assert not out.exists()
    return err[0]


# ------------------------------------------------------------------------------------------ axes that change nothing

@pytest.mark.parametrize("args, fragments", [
    # the case: darl's MSE decoder draws no noise, so its cells would train bit-identical weights
    (["--recipe", "darl-mse-digits", "--axis", "model.beta_a", "0.3,1"],
     ["--axis model.beta_a changes nothing", "model.beta_a is read only with model.decoder diffusion, not mse"]),
    (["--recipe", "darl-digits", "--axis", "model.block", "2,4"],
     ["model.block is read only with model.order nested or round_robin, not raster"]),
    (["--recipe", "darl-digits", "--axis", "model.sample_steps", "10,20"],
     ["model.sample_steps is an option of darl's sample and complete", "genrep evaluate CELL --model.sample_steps"]),
    # both axes inert: the first is named
    (["--recipe", "darl-mse-digits", "--axis", "model.beta_a", "0.3,1", "--axis", "model.beta_b", "1,3"],
     ["--axis model.beta_a"]),
])
def test_an_axis_no_cell_reads_is_refused(capsys, tmp_path, args, fragments):
    line = _refused(capsys, tmp_path, *args)
    assert all(f in line for f in fragments), line


def test_an_axis_read_in_some_cells_is_kept():
    """beta_a against the decoder: the diffusion cells differ, so the grid is a real one."""
    plan = plan_grid("darl-mse-digits", [("model.decoder", "mse,diffusion"), ("model.beta_a", "0.3,1")], {})
    assert len(plan.cells) == 4
    assert len(plan_grid("darl-digits", [("model.beta_a", "0.3,1")], {}).cells) == 2
    # with FID during training, the sampler's options are read while training
    over = {"train.eval_every": 5, "train.eval_metrics": ["fid"]}
    assert len(plan_grid("darl-digits", [("model.sample_steps", "10,20")], over).cells) == 2


@pytest.mark.parametrize("axes", [["--axis", "train.seed", "0"], ["--axis", "model.dim", "16,32", "--axis",
                                                                  "optim.lr", "1e-3"]])
def test_a_one_value_axis_is_refused(capsys, tmp_path, axes):
    line = _refused(capsys, tmp_path, "--recipe", "supervised-digits", *axes)
    assert "has one value; a grid compares two or more" in line and "an override (--" in line


# ------------------------------------------------------------------------------------------ repeats: grid and sweep

@pytest.fixture
def config_only_run(tmp_path):
    """A marked folder holding a run's config.yaml: enough for the sweep to open it and read its settings (and refuse
    them)."""
    from genrep.runs import mark_run

    run = tmp_path / "run"
    run.mkdir()
    mark_run(run)
    save_config(tiny_config("supervised"), run / "config.yaml")
    return run


@pytest.mark.parametrize("flag, values, key", [("--blocks", "1,1", "eval.sweep.blocks"),
                                               ("--t", "0,0", "eval.sweep.t"),
                                               ("--head", "linear,linear", "eval.sweep.heads"),
                                               ("--pool", "mean,mean", "eval.sweep.pools"),
                                               ("--eval.sweep.weight_decay", "1e-3,0.001", "eval.sweep.weight_decay")])
def test_repeats_are_refused_by_the_sweep_as_by_the_grid(capsys, tmp_path, config_only_run, flag, values, key):
    line = _refused(capsys, tmp_path, "--recipe", "supervised-digits", "--axis", "train.seed", "1,1")
    assert "same value" in line and "give each value once" in line
    assert main(["sweep", str(config_only_run), "--device", "cpu", flag, values]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{key} repeats a value" in err[0] and "list each value once" in err[0], err
    assert sorted(p.name for p in config_only_run.iterdir()) == [".genrep-run", "config.yaml"]   # no lock taken


# ------------------------------------------------------------------------------------------ the marker

@pytest.mark.parametrize("content, fault", [(b"garbage", "not JSON"), (b"\xff\xfe", "not JSON"),
                                            (b"[1, 2]", "JSON list, not an object"),
                                            (b'{"format": "genrep-run-1"}', "format 'genrep-run-1'"),
                                            (None, "not a file")])
def test_a_malformed_grid_marker_says_it_is_malformed(capsys, tmp_path, content, fault):
    out = tmp_path / "g"
    out.mkdir()
    if content is None:
        (out / GRID_MARKER).mkdir()
    else:
        (out / GRID_MARKER).write_bytes(content)
    before = sorted(p.name for p in out.iterdir())
    assert main(["grid", "--recipe", "supervised-digits", "--axis", "train.seed", "0,1", "--out", str(out),
                 *TINY]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"has a malformed {GRID_MARKER} marker ({fault}" in err[0], err
    assert '"format": "genrep-grid-1"' in err[0] and "no .genrep-grid marker" not in err[0]
    assert sorted(p.name for p in out.iterdir()) == before
    if content is not None:
        assert (out / GRID_MARKER).read_bytes() == content


# ------------------------------------------------------------------------------------------ every method's inert keys

def _another(value, meta: dict) -> list:
    """Values other than ``value`` a key might take (the config's own check refuses what it does not)."""
    if isinstance(value, bool):
        return [not value]
    if "choices" in meta:
        return [c for c in meta["choices"] if c != value][:1]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float):
        return [v for v in (value * 2, value / 2, value + 0.5) if v != value]
    return []


def _trace(name: str, overrides: dict) -> dict:
    """What a key could change: the initial weights, the batch's random inputs, the loss and the features."""
    cfg = tiny_config(name, **overrides)
    torch.manual_seed(0)
    method = build_method(name, cfg.model, SPEC)
    batch = example_batch(method, 4)
    torch.manual_seed(1)
    loss = {k: v.detach() for k, v in method.train()(batch).items()}
    torch.manual_seed(2)
    features = method.eval().features(batch[next(iter(method.views()))])
    return {"weights": method.state_dict(), "batch": batch, "loss": loss, "features": {"": features}}


def _same(a: dict, b: dict) -> bool:
    return all(a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
               for part in a)


def _unread_keys(cls) -> list[tuple[str, dict]]:
    """(key, overrides under which the method does not read it): each declared ``only_if`` with its condition
    false, and each capability's option."""
    out = []
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    for f in fields.values():
        for other, values in f.metadata.get("only_if", {}).items():
            assert other in fields, (f.name, other)
            choices = fields[other].metadata.get("choices") or (True, False)
            assert set(values) <= set(choices), (f.name, other, values)
            off = next(c for c in choices if c not in values)
            out.append((f.name, {f"model.{other}": off}))
    options = dict.fromkeys(k for keys in cls.capability_options.values() for k in keys)
    return out + [(k, {}) for k in options if k not in cls.feature_options]


def test_every_methods_inert_keys_change_nothing(method_name, one_torch_thread):
    cls = get_method(method_name)
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    answer = cls.inert_keys(tiny_config(method_name).model)
    assert isinstance(answer, dict) and set(answer) <= set(fields)
    assert all(isinstance(why, str) and why and "\n" not in why for why in answer.values())
    for key, off in _unread_keys(cls):
        try:
            base = tiny_config(method_name, **off)
        except GenrepError:
            continue  # the condition's other value needs more settings (a tokenizer): nothing to vary here
        if off:
            assert key in cls.inert_keys(base.model), (key, off)
        trace = None
        for value in _another(getattr(base.model, key), fields[key].metadata):
            try:
                tiny_config(method_name, **off, **{f"model.{key}": value})
            except GenrepError:
                continue  # refused by the config: the grid cannot vary it either
            trace = trace or _trace(method_name, off)
            assert _same(trace, _trace(method_name, {**off, f"model.{key}": value})), (key, value, off)
            break


def test_darl_declares_its_decoder_and_order_keys():
    cfg = tiny_config("darl", **{"model.decoder": "mse"}).model
    assert set(get_method("darl").inert_keys(cfg)) == {"prediction", "beta_a", "beta_b", "gamma_conditioning",
                                                       "decoder_net", "decoder_depth", "block"}
    cfg = tiny_config("darl", **{"model.decoder": "diffusion", "model.order": "nested"}).model
    assert get_method("darl").inert_keys(cfg) == {"norm_pix": "model.norm_pix is read only with model.decoder mse, "
                                                                "not diffusion"}
    assert json.dumps(get_method("supervised").inert_keys(tiny_config("supervised").model)) == "{}"
