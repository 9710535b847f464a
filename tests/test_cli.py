"""The command line as a user meets it: listings, the main job, resume, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import TINY, assert_one_line_error, run_cli

from genrep.train.checkpoint import checkpoint_dirs

TINY_ARGS = [f"--{k}={v}" for k, v in TINY.items()]


def test_listings():
    recipes = run_cli("recipes")
    assert recipes.returncode == 0 and "supervised-digits" in recipes.stdout and "supervised-cifar10" in recipes.stdout
    methods = run_cli("methods")
    assert methods.returncode == 0 and "supervised" in methods.stdout and "logits" in methods.stdout
    datasets = run_cli("datasets")
    assert datasets.returncode == 0
    digits = next(line for line in datasets.stdout.splitlines() if line.startswith("digits"))
    assert "yes" in digits
    assert "npz:PATH" in datasets.stdout and "folder:PATH" in datasets.stdout


# the recipe's evaluation sizes are for a result; the folder's completeness is the same at a tenth of them, and
# with the linear probes' weight decays chosen from two (L-BFGS at 1e-5 takes several times the iterations)
SMALL_EVALUATION = ["--model.sample_steps=10", "--model.nll_terms=10", "--eval.generation.samples=100",
                    "--eval.energy.n=100", "--eval.likelihood.n=64", "--eval.ood.n=64", "--eval.robustness.n=64",
                    "--eval.similarity.cka_n=64", "--eval.similarity.tsne_n=64", "--probe.weight_decay=[1e-3,1e-2]",
                    "--eval.probes.sweep_weight_decay=[1e-3,1e-2]", "--eval.sweep.weight_decay=[1e-3,1e-2]"]


@pytest.mark.slow
def test_run_writes_a_complete_run_folder(tmp_path):
    proc = run_cli("run", "--out", str(tmp_path / "run"), *TINY_ARGS, "--train.steps=40", *SMALL_EVALUATION)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    for name in ("config.yaml", "model.safetensors", "ema.safetensors", "log.jsonl", "results/probe.json",
                 "figures/summary.png", "figures/samples.png", "figures/samples-by-energy.png"):
        assert (run / name).is_file(), name
        if name.endswith(".png"):
            assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run / "results/probe.json").read_text())
    assert results["method"] == "hybvit" and results["n_test"] == 360  # the hybrid is the default
    for line in ("classifier head", "linear probe", "kNN k=20", "kNN k=200", "chance"):
        assert line in proc.stdout
    # probing again with other settings reuses nothing stale and rewrites the results
    again = run_cli("probe", str(run), "--probe.layer", "1", "--probe.pool", "mean", "--probe.knn_k", "5")
    assert again.returncode == 0, again.stderr
    results = json.loads((run / "results/probe.json").read_text())
    assert results["layer"] == 1 and results["pool"] == "mean" and list(results["knn"]) == ["5"]


def test_new_runs_never_overwrite_old_ones(tmp_path):
    args = ["pretrain", "--recipe", "supervised-digits", "--runs-dir", str(tmp_path), *TINY_ARGS, "--train.steps=2"]
    assert run_cli(*args).returncode == 0
    assert run_cli(*args).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supervised-digits", "supervised-digits-2"]


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tmp_path):
    """SIGKILL mid-training (possibly mid-checkpoint), resume, and compare with an uninterrupted run."""
    # killed at its second checkpoint (step 40): 200 steps leave 160 for the kill to land before the end, and
    # half of 400's steps in each of the two runs (the test's time was mostly those steps)
    args = [*TINY_ARGS, "--train.steps=200", "--train.ckpt_every=20", "--model.dim=64", "--model.drop=0.1"]
    full = run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(tmp_path / "full"), *args)
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "genrep.cli", "pretrain", "--recipe", "supervised-digits",
                             "--out", str(cut), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # run_cli's one thread: the same sums
    deadline = time.time() + 300
    while time.time() < deadline and len(checkpoint_dirs(cut)) < 2 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = [int(p.name.split("_")[1]) for p in checkpoint_dirs(cut)]
    assert steps and max(steps) < 200, steps  # it really died mid-run
    resumed = run_cli("pretrain", "--resume", str(cut), "--train.progress=false")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    from safetensors.torch import load_file
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(cut / name)
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), name


# ------------------------------------------------------------------ bad input: one line, no traceback

def test_unknown_recipe():
    assert_one_line_error(run_cli("pretrain", "--recipe", "nope"), "unknown recipe 'nope'", "supervised-digits")


def test_unknown_method(tmp_path):
    (tmp_path / "r.yaml").write_text("method: gpt5\n")
    assert_one_line_error(run_cli("pretrain", "--recipe", str(tmp_path / "r.yaml")), "unknown method 'gpt5'",
                          "registered methods:", "supervised")


def test_unknown_config_key():
    assert_one_line_error(run_cli("pretrain", "--recipe", "supervised-digits", "--optim.lrr", "1"),
                          "unknown config key 'optim.lrr'", "did you mean 'lr'")


def test_unknown_dataset(tmp_path):
    assert_one_line_error(run_cli("pretrain", "--recipe", "supervised-digits", "--data.name", "imagenet9",
                                  "--runs-dir", str(tmp_path)), "imagenet9", "digits")
    assert list(tmp_path.iterdir()) == []  # bad input leaves no half-made run folder behind


def test_dataset_missing_offline(tmp_path):
    proc = run_cli("pretrain", "--recipe", "supervised-cifar10", "--data.root", str(tmp_path / "cache"),
                   "--data.download", "false", "--runs-dir", str(tmp_path))
    assert_one_line_error(proc, str(tmp_path / "cache"))
    assert not any(p.name.startswith("supervised") for p in tmp_path.iterdir())


def test_truncated_checkpoint_on_resume(tmp_path):
    run = tmp_path / "run"
    assert run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(run), *TINY_ARGS,
                   "--train.steps=10").returncode == 0
    weights = checkpoint_dirs(run)[-1] / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = (run / "model.safetensors").read_bytes()
    assert_one_line_error(run_cli("pretrain", "--resume", str(run)), "corrupt or truncated", "ema.safetensors")
    assert (run / "model.safetensors").read_bytes() == before  # nothing already written is damaged


def test_resume_with_another_recipe_or_a_changed_model(tmp_path):
    run = tmp_path / "run"
    assert run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(run), *TINY_ARGS,
                   "--train.steps=4").returncode == 0
    config_before = (run / "config.yaml").read_text()
    assert_one_line_error(run_cli("pretrain", "--resume", str(run), "--recipe", "supervised-cifar10"),
                          "was made by recipe 'supervised-digits', not 'supervised-cifar10'")
    assert_one_line_error(run_cli("pretrain", "--resume", str(run), "--model.dim", "64"),
                          "cannot change model.dim when resuming")
    assert (run / "config.yaml").read_text() == config_before


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    assert_one_line_error(run_cli("pretrain", "--resume", str(tmp_path)), "is not a genrep run folder")


def test_resume_of_another_recipes_folder_with_its_weights(tmp_path):
    """A config edited by hand to another architecture: the checkpoint no longer fits."""
    run = tmp_path / "run"
    assert run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(run), *TINY_ARGS,
                   "--train.steps=4").returncode == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["depth"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_one_line_error(run_cli("pretrain", "--resume", str(run)), "does not fit the model")


def test_probe_takes_only_probe_overrides(tmp_path):
    run = tmp_path / "run"
    assert run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(run), *TINY_ARGS,
                   "--train.steps=2").returncode == 0
    assert_one_line_error(run_cli("probe", str(run), "--optim.lr", "1"), "takes probe.* overrides")
    assert_one_line_error(run_cli("probe", str(run), "--probe.layer", "9"), "layer 9 does not exist")


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    proc = run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(tmp_path / "r"), *TINY_ARGS,
                   "--train.tensorboard", "true")
    assert_one_line_error(proc, "pip install 'genrep[tensorboard]'")


@pytest.mark.slow
def test_pretrain_on_a_local_colour_npz_with_strong_augmentation(tmp_path):
    """A 3-channel 32x32 data set from npz:PATH goes through the same loop and probes."""
    rng = np.random.default_rng(0)
    means = rng.integers(40, 215, size=(3, 3))  # three classes of differently coloured noise
    def split(n):
        y = np.arange(n) % 3
        x = np.clip(means[y][:, None, None, :] + rng.normal(0, 30, size=(n, 32, 32, 3)), 0, 255)
        return x.astype(np.uint8), y
    x_tr, y_tr = split(96)
    x_te, y_te = split(30)
    path = tmp_path / "colours.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, classes=np.array(["a", "b", "c"]))
    proc = run_cli("run", "--out", str(tmp_path / "run"), "--data.name", f"npz:{path}", *TINY_ARGS,
                   "--data.image_size=null", "--model.patch_size=8", "--model.augment=strong",
                   "--train.steps=30", "--probe.knn_k=5")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "run" / "results" / "probe.json").read_text())
    assert results["n_train"] == 96 and results["num_classes"] == 3 and results["feature_dim"] == 32
    assert results["linear_probe"]["test_acc"] > 0.9  # colour is trivially separable


def test_resume_with_a_lower_learning_rate_after_a_nan(tmp_path):
    run = tmp_path / "run"
    assert run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(run), *TINY_ARGS,
                   "--train.steps=10").returncode == 0
    proc = run_cli("pretrain", "--resume", str(run), "--train.steps", "20", "--optim.lr", "5e-4")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 5e-4 and cfg["train"]["steps"] == 20
