"""Evaluation during training (train.eval_every): rows in log.jsonl, the same after a kill and resume, and bad
settings refused before the run folder exists."""

from __future__ import annotations

import shutil

import pytest
from conftest import TINY, assert_one_line_error, run_cli, tiny_config

from genrep.train.logger import read_log
from genrep.train.loop import pretrain

EVERY = {"train.eval_every": 5, "train.eval_n": 64}


def _eval_rows(run):
    return [r for r in read_log(run) if "eval_seconds" in r]


def test_every_method_logs_knn_accuracy_on_its_schedule(tmp_path, method_name):
    pretrain(tiny_config(method_name, **EVERY), tmp_path)
    rows = _eval_rows(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(0.0 <= r["eval_knn"] <= 1.0 for r in rows)
    train_rows = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]  # the training rows are as without evaluation


def test_hybvit_logs_accuracy_and_fid_and_they_survive_kill_and_resume(tmp_path, monkeypatch):
    """Killed after the step-10 checkpoint and resumed, a run logs exactly the rows of one never stopped:
    the metrics are functions of the weights and (seed, step), and the rows after the checkpoint are dropped.
    The FID extractor (the data set's CNN) is trained inside the first evaluation: no cache from other tests."""
    monkeypatch.setenv("GENREP_DATA", str(tmp_path / "data"))
    cfg = tiny_config("hybvit", **EVERY, **{"train.eval_metrics": ["knn", "accuracy", "fid"],
                                            "train.eval_samples": 40, "eval.generation.extractor": "classifier"})
    full, cut = tmp_path / "full", tmp_path / "cut"
    pretrain(cfg, full)
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000020")  # as if killed before the final checkpoint
    pretrain(cfg, cut, resume=True)
    a, b = _eval_rows(full), _eval_rows(cut)
    assert [r["step"] for r in b] == [5, 10, 15, 20]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "eval_seconds"} == \
            {k: v for k, v in rb.items() if k != "eval_seconds"}
    assert all(r["eval_fid"] >= 0 and 0 <= r["eval_accuracy"] <= 1 for r in a)


@pytest.mark.parametrize("override, fragment", [
    (("--train.eval_every", "0"), "train.eval_every must be at least 1, got 0"),
    (("--train.eval_metrics", "[knn, bpd]"), "train.eval_metrics"),
    (("--train.eval_every", "5", "--train.eval_metrics", "[fid]"), "'fid' needs the sample capability"),
])
def test_bad_periodic_settings_are_one_line_before_the_run_folder(tmp_path, override, fragment):
    out = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in TINY.items()]
    proc = run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(out), *args, *override)
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_the_summary_figure_plots_the_evaluations(tmp_path):
    from PIL import Image

    from genrep.eval.evaluate import run_probes
    from genrep.eval.report.figures import summary_figure

    widths = {}
    for name, extra in (("plain", {}), ("evaluated", {**EVERY, "train.eval_metrics": ["knn", "accuracy"]})):
        run = tmp_path / name
        pretrain(tiny_config("supervised", **extra), run)
        probe = run_probes(run, progress=False)
        widths[name] = Image.open(summary_figure(run, probe, run / "summary.png")).size[0]
    assert widths["evaluated"] > 1.3 * widths["plain"]  # a third panel: the curves of the evaluations


def test_knn5_loss_is_the_5nn_error_and_the_summary_figure_plots_it(tmp_path):
    """GCRL's table 9 curve: the 0-1 loss of the 5-NN vote, 1 - its accuracy on the same images, logged beside
    kNN accuracy and drawn on its own axis of the summary figure."""
    from genrep.eval.report.figures import summary_figure

    cfg = tiny_config("simclr", **EVERY, **{"train.eval_metrics": ["knn", "knn5_loss"], "probe.knn_k": [5]})
    pretrain(cfg, tmp_path)
    rows = _eval_rows(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(r["eval_knn5_loss"] == pytest.approx(1 - r["eval_knn"], abs=2e-6) for r in rows)
    probe = {"method": "simclr", "data": "digits", "layer": 1, "pool": "mean", "num_classes": 10,
             "linear_probe": {"test_acc": 0.5}, "knn": {"5": 0.5}}
    assert summary_figure(tmp_path, probe, tmp_path / "summary.png").stat().st_size > 0
