"""A run folder written before configs carried a version (tests/fixtures/run-v1) still loads, migrates,
evaluates, probes and reports; a config of an unknown version is a one-line error."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error, one_line, run_cli
from eval_helpers import FAST

from genrep.config import CONFIG_VERSION, load_config_file
from genrep.errors import GenrepError
from genrep.eval.evaluate import evaluate_run, read_results
from genrep.eval.report.report import write_report
from genrep.eval.report.summary import evaluation_summary
from genrep.runs import read_run_config

FIXTURE = Path(__file__).parent / "fixtures" / "run-v1"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "run-v1"
    shutil.copytree(FIXTURE, run)
    return run


def test_the_fixture_is_version_1():
    d = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    assert "config_version" not in d and "ood_n" in d["eval"] and "sample_steps" in d["eval"]


def test_a_version_1_config_migrates():
    old = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    cfg = read_run_config(FIXTURE)
    assert cfg.config_version == CONFIG_VERSION
    ev = cfg.eval
    assert (ev.ood.n, ev.likelihood.n, ev.generation.samples) == (old["eval"]["ood_n"], old["eval"]["bpd_n"],
                                                                 old["eval"]["fid_samples"])
    assert ev.generation.extractor == old["eval"]["fid_extractor"] == "classifier"
    assert ev.calibration.bins == old["eval"]["ece_bins"] and ev.robustness.steps == old["eval"]["pgd_steps"]
    assert ev.finetune.epochs == old["eval"]["finetune_epochs"] and ev.lowshot.seeds == old["eval"]["lowshot_seeds"]
    # sampling and likelihood options became the method's
    assert cfg.model.sample_steps == old["eval"]["sample_steps"] and cfg.model.nll_terms == old["eval"]["bpd_terms"]
    # version 1's evaluation probes read the probe section: the migrated settings keep doing what they did
    assert ev.probes.knn_k == old["probe"]["knn_k"] and ev.probes.epochs == old["probe"]["epochs"]
    assert ev.probes.sweep_weight_decay == old["probe"]["weight_decay"]


def test_options_a_method_lacks_are_dropped(tmp_path):
    d = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    d["method"] = "supervised"
    d["model"] = {"dim": 16, "depth": 2, "num_heads": 2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
    cfg = load_config_file(tmp_path / "config.yaml")
    assert not hasattr(cfg.model, "sample_steps") and cfg.eval.ood.n == d["eval"]["ood_n"]


@pytest.mark.parametrize("version", [4, 0, "two"])
def test_an_unknown_config_version_is_one_line(tmp_path, version):
    d = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    d["config_version"] = version
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(GenrepError) as e:
        load_config_file(tmp_path / "config.yaml")
    assert f"config_version {version!r}" in one_line(e) and "reads config versions 1 to 3" in one_line(e)
    assert_one_line_error(run_cli("evaluate", str(tmp_path)), "config versions 1 to 3")


def test_an_old_eval_json_still_reports(old_run, tmp_path):
    old = read_results(old_run)
    assert isinstance(old["params"], int) and "sweep_layers" in old["protocols"]["probes"]["settings"]
    page = write_report([old_run], tmp_path / "old.html").read_text()
    assert "Generation" in page and f"{old['params'] / 1e6:.2f}M" in page and "ddim, 5 steps" in page
    assert "likelihood" in evaluation_summary(old)


@pytest.mark.slow
def test_an_old_run_evaluates_probes_and_reports(old_run, tmp_path):
    ev = replace(FAST, protocols=["probes", "calibration", "likelihood", "generation"])
    results = evaluate_run(old_run, ev, options={"sample_steps": 2}, progress=False, say=lambda m: None)
    p = results["protocols"]
    assert set(results["params"]) == {"trainable", "total"}
    assert p["generation"]["sample"]["steps"] == 2 and p["likelihood"]["n"] == 8
    assert "probes" in p and "calibration" in p
    # protocols not asked for this time are kept from the old file: the weights did not change
    assert "robustness" in read_results(old_run)["protocols"]
    probe = run_cli("probe", str(old_run), "--probe.epochs", "5", "--probe.knn_k", "5")
    assert probe.returncode == 0, probe.stderr
    assert json.loads((old_run / "results" / "probe.json").read_text())["knn"].keys() == {"5"}
    report = run_cli("report", str(old_run), "-o", str(tmp_path / "r.html"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "r.html").read_text().count("<table>") >= 5


def test_an_old_run_resumes_and_trains_on(old_run):
    """`genrep pretrain --resume` on a run written before versions: the migrated config is the same run, and
    its config.yaml is rewritten in the current version."""
    proc = run_cli("pretrain", "--resume", str(old_run), "--train.steps", "30", "--train.progress", "false")
    assert proc.returncode == 0, proc.stderr
    assert (old_run / "checkpoints" / "step_00000030").is_dir()
    assert yaml.safe_load((old_run / "config.yaml").read_text())["config_version"] == CONFIG_VERSION
    assert read_run_config(old_run).model.nll_terms == 10  # eval.bpd_terms of version 1, kept
