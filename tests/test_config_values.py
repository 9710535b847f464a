"""Every config value is checked against the valid values its field declares, once, when the config is built:
the bad values users tried (issue 10) and, for every numeric key of every shipped recipe, the values no key
accepts (inf, NaN, integers past int64)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import TINY, assert_one_line_error, one_line, run_cli

from genrep.config import parse_overrides, recipe_names, resolve_config
from genrep.errors import GenrepError

BIG = 2 ** 70


@pytest.mark.parametrize("key, value, fragment", [
    ("model.patch_size", 0, "model.patch_size must be at least 1, got 0"),
    ("model.patch_size", -2, "model.patch_size must be at least 1, got -2"),
    ("model.num_heads", 0, "model.num_heads must be at least 1, got 0"),
    ("model.dim", 0, "model.dim must be at least 1"),
    ("model.dim", -128, "model.dim must be at least 1 and at most 65536, got -128"),
    ("model.depth", 0, "model.depth must be at least 1 and at most 1024, got 0"),
    ("model.depth", -1, "model.depth must be at least 1"),
    ("model.mlp_ratio", -2, "model.mlp_ratio must be above 0"),
    ("model.drop", 2.0, "model.drop must be at least 0 and below 1, got 2.0"),
    ("model.label_smoothing", 2, "model.label_smoothing must be at least 0 and at most 1, got 2.0"),
    ("model.label_smoothing", -0.5, "model.label_smoothing must be at least 0"),
    ("model.pos_embed", "rotary", "model.pos_embed 'rotary' is unknown; choose learned, sincos"),
    ("model.dim", 30, "model.dim 30 is not divisible by model.num_heads"),
    ("optim.eps", -1, "optim.eps must be above 0"),
    ("optim.warmup_epochs", "inf", "optim.warmup_epochs must be a finite number, got inf"),
    ("optim.lr", "inf", "optim.lr must be a finite number"),
    ("optim.min_lr", "inf", "optim.min_lr must be a finite number"),
    ("optim.betas", [0.9, 1.0], "optim.betas[1] must be at least 0 and below 1, got 1.0"),
    ("optim.betas", [0.9], "optim.betas must be two numbers"),
    ("train.epochs", "inf", "train.epochs must be a finite number"),
    ("train.epochs", "nan", "train.epochs must be a finite number, got nan"),
    ("train.seed", BIG, f"train.seed must be an integer from -2**63 to 2**63-1, got {BIG}"),
    ("train.seed", -1, "train.seed must be at least 0"),
    ("eval.seed", BIG, "eval.seed must be an integer from -2**63 to 2**63-1"),
    ("train.ema_decay", 1.0, "train.ema_decay must be at least 0 and below 1"),
    ("data.image_size", 100000, "data.image_size must be at least 1 and at most 1024, got 100000"),
    ("data.num_workers", -1, "data.num_workers must be at least 0"),
    ("model.timesteps", 1, "model.timesteps must be at least 2"),
    ("model.feature_t", 1000, "model.feature_t 1000 is not a diffusion step; choose 0..999"),
    ("model.feature_layer", 9, "model.feature_layer 9 does not exist; choose 1..4"),
    ("model.sampler", "euler", "model.sampler 'euler' is unknown"),
    ("model.augment", "heavy", "model.augment 'heavy' is unknown; choose none, weak, strong"),
])
def test_bad_values_are_one_line_at_build(key, value, fragment):
    with pytest.raises(GenrepError) as e:
        resolve_config("hybvit-digits", {key: value})
    assert fragment in one_line(e)


def _numeric_keys(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numeric_keys(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, type(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in value):
            yield key, list


@pytest.mark.parametrize("recipe", recipe_names())
def test_no_numeric_key_of_any_recipe_takes_inf_nan_or_huge_integers(recipe):
    keys = list(_numeric_keys(resolve_config(recipe)))
    assert len(keys) > 40
    for key, kind in keys:
        bad = (["inf", "-inf", "nan"] if kind is float else [BIG, -BIG]) if kind is not list else [["nan"]]
        for value in bad:
            with pytest.raises(GenrepError) as e:
                resolve_config(recipe, {key: value})
            assert key in one_line(e), (key, value)


def test_every_shipped_recipe_is_valid():
    for recipe in recipe_names():
        resolve_config(recipe)


def test_a_bad_value_on_the_command_line_leaves_no_run_folder(tmp_path):
    out = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in TINY.items()]
    proc = run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(out), *args, "--model.depth", "0")
    assert_one_line_error(proc, "model.depth must be at least 1 and at most 1024, got 0")
    assert not out.exists()


@pytest.mark.parametrize("content, fault", [
    (b"[1, 2]", "got list"), (b"null", "got NoneType"), (b'{"run": "x"}', "without 'protocols' and 'method'"), (b'{"protocols": {}}', "without 'protocols' and 'method'"),
    (b'{"protocols": ', "is not valid JSON"), (b"\xff\xfe\x00garbage", "is not valid JSON"),
])
def test_a_results_file_that_is_not_genreps_is_one_line_and_kept(tmp_path, content, fault):
    from genrep.eval.evaluate import read_results

    (tmp_path / "results").mkdir()
    path = tmp_path / "results" / "eval.json"
    path.write_bytes(content)
    with pytest.raises(GenrepError) as e:
        read_results(tmp_path)
    assert fault in one_line(e) and str(path) in one_line(e) and "move it away" in one_line(e)
    assert path.read_bytes() == content


def test_ood_scores_that_do_not_apply_fail_before_any_work(tmp_path):
    from dataclasses import replace

    from conftest import tiny_config
    from eval_helpers import FAST

    from genrep.eval.evaluate import evaluate_run
    from genrep.eval.protocols.ood import OODSettings
    from genrep.train.loop import pretrain

    run = tmp_path / "sup"
    pretrain(tiny_config("supervised", **{"train.steps": 2}), run)
    ev = replace(FAST, protocols=["ood"], ood=OODSettings(scores=["bpd"], n=8))
    with pytest.raises(GenrepError) as e:
        evaluate_run(run, ev, progress=False, say=lambda m: None)
    assert "eval.ood.scores asks only for scores supervised does not offer (bpd needs a likelihood" in one_line(e)
    assert "choose among gaussian, msp, energy" in one_line(e)
    assert not (run / "results" / "eval.json").exists()


def test_a_data_name_with_a_colon_is_read_as_text():
    """`--data.name npz:` is YAML for {'npz': None}; it must reach the data layer as the text it is."""
    from genrep.data.datasets import load_dataset

    cfg = resolve_config("supervised-digits", parse_overrides(["--data.name", "npz:"]))
    assert cfg.data.name == "npz:"
    with pytest.raises(GenrepError) as e:
        load_dataset(cfg.data.name)
    assert "npz: needs a file path" in one_line(e)


@pytest.mark.parametrize("step, fault", [("20", "has step '20'"), (-5, "has step -5"), (10 ** 12, "has step"),
                                         (10, "says step 10 but its folder is step_00000020")])
def test_a_training_state_with_a_bad_step_is_one_line(tmp_path, step, fault):
    import torch
    from conftest import tiny_config

    from genrep.train.checkpoint import checkpoint_dirs, load_state
    from genrep.train.loop import pretrain

    pretrain(tiny_config(**{"train.steps": 20}), tmp_path / "run")
    path = checkpoint_dirs(tmp_path / "run")[-1] / "state.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "step": step}, path)
    with pytest.raises(GenrepError) as e:
        load_state(path)
    assert fault in one_line(e) and str(path) in one_line(e)
    with pytest.raises(GenrepError):
        pretrain(tiny_config(**{"train.steps": 30}), tmp_path / "run", resume=True)


def test_the_same_tensors_give_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders metadata by a per-process hash; genrep sorts it so runs compare by sha256."""
    import hashlib
    import subprocess
    import sys

    code = ("import sys, torch; from genrep.io import atomic_save_safetensors; "
            "atomic_save_safetensors(sys.argv[1], {'w': torch.arange(6.).view(2, 3), 'b': torch.ones(2)}, "
            "{'step': '20', 'method': 'toy', 'recipe': 'r', 'zeta': 'z', 'alpha': 'a'})")
    digests = set()
    for i in range(4):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "20"
        assert f.get_tensor("w").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_sample_flags_out_of_range_are_one_line(tmp_path):
    from genrep.eval.report.samples import run_sampling

    with pytest.raises(GenrepError) as e:
        run_sampling(tmp_path, seed=2 ** 70)
    assert f"--seed must be an integer from 0 to 2**63-1, got {2 ** 70}" in one_line(e)


@pytest.mark.parametrize("method", ["supervised", "hybvit"])
def test_a_model_too_big_for_memory_is_refused_before_it_is_allocated(tmp_path, method):
    """Each key valid, together far past this machine's memory: refused from the meta-device parameter count,
    in about a second, before a byte of the model (or the run folder) exists."""
    import time

    out = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in TINY.items()]
    t0 = time.perf_counter()
    proc = run_cli("pretrain", "--recipe", f"{method}-digits", "--out", str(out), *args, "--model.dim", "65536",
                   "--model.depth", "1024", "--model.num_heads", "1")
    assert_one_line_error(proc, "parameters and needs about", "GiB to train on cpu", "choose smaller model sizes")
    assert time.perf_counter() - t0 < 60 and not out.exists()


def test_the_memory_check_leaves_the_initial_weights_as_they_were():
    """Building on the meta device first must not consume the seeded generator: the weights stay bit-identical."""
    import torch
    from conftest import tiny_config

    from genrep.data.datasets import load_dataset
    from genrep.methods import build_method, method_names
    from genrep.runs import build_for_data, data_spec

    train = load_dataset("digits", "train", image_size=8)
    for name in method_names():
        cfg = tiny_config(name)
        torch.manual_seed(0)
        plain = build_method(cfg.method, cfg.model, data_spec(train)).state_dict()
        torch.manual_seed(0)
        checked = build_for_data(cfg, train, "cpu", training=True).state_dict()
        assert plain.keys() == checked.keys(), name
        assert all(torch.equal(plain[k], checked[k]) for k in plain), name
