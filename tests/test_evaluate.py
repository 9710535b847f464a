"""`genrep evaluate` and `genrep report`: every protocol on tiny trained runs of every method, and the
HTML report rendered in a real headless browser."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from types import SimpleNamespace

from conftest import assert_one_line_error, one_line, run_cli, tiny_config
from eval_helpers import FAST, fast_options
from PIL import Image

from genrep.config import PROTOCOLS as CONFIG_PROTOCOLS
from genrep.config import EvalConfig, build_dataclass
from genrep.errors import GenrepError
from genrep.eval.evaluate import evaluate_run, plan, read_results
from genrep.eval.protocols import PROTOCOLS
from genrep.eval.protocols import probes as probes_protocol
from genrep.eval.protocols.calibration import CalibrationSettings
from genrep.eval.protocols.probes import ProbesSettings, sweep_layers
from genrep.eval.report.report import write_report
from genrep.methods import get_method, method_names
from genrep.train.loop import pretrain


# tiny tensors: one intra-op thread (the whole module's runs and evaluations; with two on a loaded machine the
# tiny ADM's evaluation alone took minutes)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, one_thread) -> dict[str, Path]:
    """One tiny trained run per registered method: 10 steps, one checkpoint (the protocols need trained weights,
    not good ones; 30 steps were a third of the time of training every method's run)."""
    base = tmp_path_factory.mktemp("runs")
    runs = {}
    for name in method_names():
        run = base / name
        options = {f"model.{k}": v for k, v in fast_options(name).items()}
        pretrain(tiny_config(name, **{"train.steps": 10, **options}), run)
        runs[name] = run
    return runs


@pytest.fixture(scope="module")
def evaluated(trained_runs, tmp_path_factory) -> dict[str, dict]:
    # the digits CNN extractor is trained once, into a data root the tests own
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENREP_DATA", str(tmp_path_factory.mktemp("data")))
        yield {name: evaluate_run(run, FAST, progress=False, say=lambda m: None)
               for name, run in trained_runs.items()}


def test_config_and_protocol_tables_agree():
    assert tuple(PROTOCOLS) == CONFIG_PROTOCOLS
    # each protocol's settings are the eval section of its name
    assert all(type(getattr(EvalConfig(), name)) is p.settings for name, p in PROTOCOLS.items())


@pytest.mark.slow
def test_every_applicable_protocol_runs_and_the_others_say_why(evaluated, trained_runs, method_name):
    results = evaluated[method_name]
    method = get_method(method_name)
    for name, p in PROTOCOLS.items():
        missing = [c for c in p.needs if c not in method.capabilities]
        r = results["protocols"][name]
        if not missing:
            assert "skipped" not in r, (name, r)
            assert r["seconds"] >= 0 and r["settings"]["seed"] == 0
            for rel in r.get("figures", {}).values():
                assert (trained_runs[method_name] / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert all(c in r["skipped"] for c in missing) and method_name in r["skipped"]
    on_disk = read_results(trained_runs[method_name])
    assert on_disk["protocols"].keys() == results["protocols"].keys()
    probes = results["protocols"]["probes"]
    sel = probes["linear_selective"]   # the probe as a selective classifier: answering every image is its error
    assert sel["coverage"][-1] == 1 and sel["risk"][-1] == pytest.approx(1 - probes["linear_acc"])
    assert 0 <= sel["aurc"] <= 1
    assert {(r["layer"], r["pool"]) for r in probes["sweep"]} >= {(probes["layer"], probes["pool"])}
    assert all(0 <= r["linear_acc"] <= 1 for r in probes["sweep"])
    ood = results["protocols"]["ood"]
    assert set(ood["sets"]) == {"noise", "constant", "interp"}
    for per_set in ood["scores"].values():
        for m in per_set.values():
            assert 0 <= m["auroc"] <= 1 and 0 <= m["fpr95"] <= 1
    if "logits" in method.capabilities:
        rob = results["protocols"]["robustness"]["accuracy"]
        clean = results["protocols"]["calibration"]["accuracy"]
        assert results["protocols"]["calibration"]["selective"]["error_rate"] == pytest.approx(1 - clean)
        assert rob["linf"]["0.0"] >= rob["linf"][str(8 / 255)]
        assert 0 <= clean <= 1
        attack = results["protocols"]["robustness"]
        assert (attack["steps"], attack["step_size"], attack["start"], attack["criterion"]) == (
            2, "2.5*eps/steps", "uniform", "final")
    if "sample" in method.capabilities:
        gen = results["protocols"]["generation"]
        assert gen["custom_extractor"] and gen["extractor"].startswith("custom:") and gen["fid"] >= 0
        assert isinstance(gen["sample"], dict)  # the method's own sample settings, recorded
        assert set(gen["settings"]) == {"seed", "weights", "samples", "extractor", "inception_weights"}
    if "nll" in method.capabilities:
        assert isinstance(results["protocols"]["likelihood"]["nll"], dict)
    params = results["params"]
    assert 0 < params["trainable"] <= params["total"]


@pytest.mark.slow
def test_a_later_call_adds_protocols_and_keeps_the_others(evaluated, trained_runs):
    run = trained_runs["supervised"]
    before = read_results(run)["protocols"]["calibration"]
    evaluate_run(run, replace(FAST, protocols=["calibration"], calibration=CalibrationSettings(bins=5)), progress=False,
                 say=lambda m: None)
    after = read_results(run)["protocols"]
    assert after["calibration"]["bins"] == 5 and before["bins"] == 15
    assert after["probes"] == evaluated["supervised"]["protocols"]["probes"]  # kept, same weights


@pytest.mark.slow
def test_cka_between_two_runs(evaluated, trained_runs):
    run, other = trained_runs["supervised"], trained_runs["hybvit"]
    r = evaluate_run(run, replace(FAST, protocols=["similarity"], similarity=replace(FAST.similarity, cka_runs=[str(other)])),
                     progress=False,
                     say=lambda m: None)["protocols"]["similarity"]
    cross = r["between_models"][str(other)]
    assert cross["method"] == "hybvit" and 0 <= cross["max"] <= 1
    assert len(cross["matrix"]) == 2 and len(cross["matrix"][0]) == 2  # tiny models: depth 2 each
    assert all(abs(r["cka"][i][i] - 1) < 1e-9 for i in range(2))
    assert (run / r["figures"]["CKA vs hybvit"]).is_file()


def test_plan_skips_with_reasons_and_rejects_unknown_protocols():
    cfg = tiny_config("genvit")
    from genrep.data.datasets import load_dataset
    from genrep.runs import build_for_data
    method = build_for_data(cfg, load_dataset("digits", "train", image_size=8))
    run, skipped = plan(method, EvalConfig())
    assert "generation" in run and "likelihood" in run
    assert set(skipped) == {"calibration", "completion", "energy", "robustness"}
    assert "classifier head" in skipped["calibration"] and "completion" in skipped["completion"]
    assert "classifier head" in skipped["energy"] and "sampler" not in skipped["energy"]
    # the protocol list is checked where the config is built, once
    with pytest.raises(GenrepError) as e:
        build_dataclass(EvalConfig, {"protocols": ["calibraton"]}, "eval")
    assert "eval.protocols[0] 'calibraton' is unknown" in one_line(e) and "calibration" in one_line(e)
    with pytest.raises(GenrepError) as e:
        build_dataclass(EvalConfig, {"protocols": []}, "eval")
    assert "eval.protocols is empty" in one_line(e)


def test_sweep_layers_covers_half_last_and_every_kth():
    cfg = tiny_config("supervised", **{"model.depth": 9})
    from genrep.data.datasets import load_dataset
    from genrep.runs import build_for_data
    method = build_for_data(cfg, load_dataset("digits", "train", image_size=8))
    assert sweep_layers(method, []) == [2, 4, 5, 6, 8, 9]
    assert sweep_layers(method, [3, 1, 3]) == [1, 3]
    # a layer the method lacks fails in the preflight, a layer below 1 where the config is built
    ctx = SimpleNamespace(method=method, ev=SimpleNamespace(probes=ProbesSettings(sweep_layers=[10])))
    with pytest.raises(GenrepError) as e:
        probes_protocol.check(ctx)
    assert "layer 10 does not exist" in one_line(e)
    with pytest.raises(GenrepError) as e:
        build_dataclass(EvalConfig, {"probes": {"sweep_layers": [0]}}, "eval")
    assert "eval.probes.sweep_layers[0] must be at least 1, got 0" in one_line(e)


def _in_process(argv: list[str]) -> SimpleNamespace:
    """``genrep ARGV`` through the CLI's main() in this interpreter, read like a finished process."""
    from genrep.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.slow
def test_bad_input_is_one_line_before_any_work(evaluated, trained_runs, tmp_path, monkeypatch):
    run = trained_runs["hybvit"]
    monkeypatch.delenv("GENREP_INCEPTION_WEIGHTS", raising=False)
    cases = [
        (["--eval.protocols", "[generation]", "--eval.generation.extractor", "inception"], "GENREP_INCEPTION_WEIGHTS"),
        (["--eval.protocols", "[ood]", "--eval.ood.sets", "[nosuchset]"], "nosuchset"),
        (["--eval.protocols", "[ood]", "--eval.ood.scores", "[energyy]"], "eval.ood.scores[0] 'energyy' is unknown"),
        (["--eval.protocols", "[calibration]", "--eval.calibration.bins", "0"], "eval.calibration.bins must be at least 1, got 0"),
        (["--eval.protocols", "[robustness]", "--eval.robustness.criterion", "best"], "choose final, every_iterate"),
        (["--eval.protocols", "[robustness]", "--eval.robustness.step_size", "0"], "eval.robustness.step_size must be above 0"),
        (["--eval.protocols", "[energy]", "--eval.energy.n", "0"], "eval.energy.n must be at least 1, got 0"),
        (["--eval.protocols", "[lowshot]", "--eval.lowshot.fractions", "[0]"], "fraction"),
        (["--eval.protocols", "[ood]", "--eval.ood.n", "0"], "eval.ood.n must be at least 1, got 0"),
        (["--eval.protocols", "[ood]", "--eval.ood.gaussian_covariance", "full"], "choose shared, class"),
        (["--eval.protocols", "[finetune]", "--eval.finetune.causal", "true"], "eval.finetune.causal"),
        (["--eval.protocols", "[probes]", "--eval.probes.layer", "9"], "layer 9 does not exist"),
        (["--eval.protocols", "[ood]", "--eval.ood.layer", "9"], "layer 9 does not exist"),
        (["--eval.ood_n", "32"], "'eval.ood_n' is now 'eval.ood.n'"),
        (["--eval.protoclos", "[ood]"], "protocols"),
        (["--model.dim", "64"], "cannot change model.dim"),
        (["--train.steps", "3"], "eval."),
    ]
    mtime = (run / "results" / "eval.json").stat().st_mtime_ns
    # the first case as a user meets it, in a fresh interpreter; the others through the same main() in this one (a
    # fresh interpreter per case was most of the test's time)
    monkeypatch.setenv("GENREP_INCEPTION_WEIGHTS", "")
    for i, (args, fragment) in enumerate(cases):
        argv = ["evaluate", str(run), "--eval.device", "cpu", *args]
        assert_one_line_error(run_cli(*argv) if i == 0 else _in_process(argv), fragment)
    assert (run / "results" / "eval.json").stat().st_mtime_ns == mtime  # nothing half-written
    # these too through main() in this interpreter: three fresh interpreters were seconds of imports each
    assert_one_line_error(_in_process(["evaluate", str(tmp_path)]), "not a genrep run")
    assert_one_line_error(_in_process(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]), "genrep evaluate")
    assert_one_line_error(_in_process(["report", str(run), "-o", str(tmp_path / "r.txt")]), ".html")


def test_a_classifier_protocol_on_a_run_without_one_is_a_skip_not_a_number(tmp_path):
    run = tmp_path / "genvit"
    pretrain(tiny_config("genvit", **{"train.steps": 2}), run)
    results = evaluate_run(run, replace(FAST, protocols=["calibration", "robustness"]), progress=False,
                           say=lambda m: None)
    for name in ("calibration", "robustness"):
        assert set(results["protocols"][name]) == {"skipped"}


def test_energy_runs_where_a_method_samples_and_classifies_and_is_skipped_elsewhere(method_name, tmp_path):
    run = tmp_path / method_name
    options = {f"model.{k}": v for k, v in fast_options(method_name).items()}
    pretrain(tiny_config(method_name, **{"train.steps": 2, **options}), run)
    r = evaluate_run(run, replace(FAST, protocols=["energy"]), progress=False, say=lambda m: None)["protocols"]["energy"]
    caps = get_method(method_name).capabilities
    if not {"sample", "logits"} <= caps:
        assert set(r) == {"skipped"} and method_name in r["skipped"]
        assert ("sampler" in r["skipped"]) == ("sample" not in caps)
        assert ("classifier head" in r["skipped"]) == ("logits" not in caps)
        return
    s = FAST.energy
    assert r["n"] == s.n and sum(c["count"] for c in r["per_class"].values()) == s.n
    for name, c in r["per_class"].items():
        assert sum(r["histogram"]["counts"][name]) == c["count"]
        assert len(r["histogram"]["counts"][name]) == s.bins
        if c["count"]:
            assert r["energy"]["min"] - 1e-9 <= c["energy_mean"] <= r["energy"]["max"] + 1e-9
            assert c["energy_std"] >= 0 and 0 < c["confidence_mean"] <= 1
    assert r["settings"] == {"seed": 0, "weights": "ema", "n": s.n, "bins": s.bins, "classes_shown": s.classes_shown,
                             "per_class": s.per_class}
    assert set(r["figures"]) == {"energy by class", "best and worst samples by energy"}
    for rel in r["figures"].values():
        assert (run / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the numbers are E(x) = logsumexp(logits) of the method's own sample(), drawn from the evaluation's seed by
    # batch (the generation protocol's draws)
    import torch

    from genrep.eval.distributed import batch_generator
    from genrep.run import load_trained

    _, method, _ = load_trained(run, "ema")
    assert r["sample"] == method.capability_settings("sample")
    with torch.no_grad():
        x = method.sample(s.n, generator=batch_generator(0, 0, s.n))  # one batch: n <= eval.batch_size
        energy = torch.logsumexp(method.logits(x).double(), dim=1)
    assert abs(float(energy.mean()) - r["energy"]["mean"]) < 1e-5


def test_energy_statistics_match_an_independent_count(tmp_path):
    import torch
    from scipy.special import logsumexp, softmax

    from genrep.eval.protocols.energy import class_statistics
    from genrep.eval.report.figures import energy_histograms

    logits = torch.randn(500, 4, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 3] -= 20  # a class no sample is assigned to
    classes = ["a", "b", "c", "d"]
    stats = class_statistics(logits, classes, bins=7)
    ref = logsumexp(logits.double().numpy(), axis=1)
    pred = logits.argmax(1).numpy()
    edges = np.linspace(ref.min(), ref.max(), 8)
    assert np.allclose(stats["histogram"]["edges"], edges)
    for y, name in enumerate(classes):
        c = stats["per_class"][name]
        assert c["count"] == int((pred == y).sum())
        assert stats["histogram"]["counts"][name] == np.histogram(ref[pred == y], bins=edges)[0].tolist()
        if c["count"]:
            assert abs(c["energy_mean"] - ref[pred == y].mean()) < 1e-9
            assert abs(c["energy_std"] - ref[pred == y].std()) < 1e-9
            assert abs(c["confidence_mean"] - softmax(logits.double().numpy(), axis=1).max(1)[pred == y].mean()) < 1e-9
    assert stats["per_class"]["d"] == {"count": 0, "energy_mean": None, "energy_std": None, "confidence_mean": None}
    assert abs(stats["energy"]["mean"] - ref.mean()) < 1e-9
    path = energy_histograms(stats["histogram"], tmp_path / "e.png", classes=classes, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(GenrepError) as e:
        energy_histograms(stats["histogram"], tmp_path / "bad.png", classes=["a", "zebra"])
    assert "zebra" in one_line(e)


@pytest.mark.slow
def test_finetune_and_lowshot_transfer_to_another_data_set(trained_runs, evaluated, tmp_path):
    """GCRL's protocol: models pretrained on one set fine-tuned / low-shot on another, here 3 classes of
    16x16 RGB images, loaded at the run's 8x8 grey."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (90, 16, 16, 3), dtype=np.uint8)
    y = np.arange(90) % 3
    x[y == 1] //= 4  # learnable: one class dark, one bright
    x[y == 2] = 255 - x[y == 2] // 4
    path = tmp_path / "t.npz"
    np.savez(path, x_train=x[:60], y_train=y[:60], x_test=x[60:], y_test=y[60:])
    ev = replace(FAST, protocols=["finetune", "lowshot"], transfer_data=f"npz:{path}",
                 lowshot=replace(FAST.lowshot, fractions=[0.1, 1.0]))
    results = evaluate_run(trained_runs["hybvit"], ev, progress=False, say=lambda m: None)["protocols"]
    ft, lo = results["finetune"], results["lowshot"]
    assert ft["data"] == lo["data"] == f"npz:{path}" and ft["num_classes"] == 3 and ft["n_test"] == 30
    assert lo["fractions"]["1.0"]["acc_mean"] > 0.9  # linear read-out of bright vs dark vs mid
    assert ft["settings"]["transfer_data"] == f"npz:{path}"
    bad = replace(FAST, protocols=["lowshot"], transfer_data="npz:/no/such.npz")
    with pytest.raises(GenrepError) as e:
        evaluate_run(trained_runs["hybvit"], bad, progress=False, say=lambda m: None)
    assert "no/such.npz" in one_line(e)


def test_an_empty_test_split_is_a_one_line_error(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
             y_train=np.arange(40) % 2, x_test=np.zeros((0, 8, 8, 1), np.uint8), y_test=np.zeros(0, np.int64))
    run = tmp_path / "run"
    # found when training starts (issue 10), not after training at the first evaluation
    with pytest.raises(GenrepError) as e:
        pretrain(tiny_config("supervised", **{"data.name": f"npz:{tmp_path / 'd.npz'}", "train.steps": 2}), run)
    assert "the test split of" in one_line(e) and "is empty" in one_line(e)
    assert not run.exists()


# ------------------------------------------------------------------------------------------- the report
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# CI installs Debian's chromium (make test does) and sets GENREP_REQUIRE_BROWSER=1, so there this test
# can only pass by really rendering the page; elsewhere it is skipped when no browser is installed.
requires_browser = pytest.mark.skipif(not _chromium() and os.environ.get("GENREP_REQUIRE_BROWSER") != "1",
                                      reason="no chromium installed (make test installs Debian's)")

PROBE_SCRIPT = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.filter(i => i.complete && i.naturalWidth > 0).length + '/' + imgs.length;
  document.body.dataset.tables = document.querySelectorAll('table').length;
  document.body.dataset.height = document.body.scrollHeight;
});</script></body>"""


def _browser(*args: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    assert exe, "chromium is not installed: apt-get install chromium (make test installs it)"
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@requires_browser
def test_report_renders_every_table_and_image_in_a_real_browser(evaluated, trained_runs, tmp_path):
    runs = [trained_runs["supervised"], trained_runs["hybvit"]]
    out = write_report(runs, tmp_path / "report.html")
    page = out.read_text()
    assert "src='runs" not in page and "file://" not in page  # self-contained: images are data URIs
    for title in ("Representation probes", "Calibration", "Out-of-distribution detection", "Generation",
                  "Adversarial robustness", "Low-shot transfer", "custom:"):
        assert title in page
    assert "not applicable: needs a sampler" in page  # the supervised run's generation row
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE_SCRIPT))
    dom = _browser("--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded, total = (int(v) for v in dom.stdout.split('data-images="')[1].split('"')[0].split("/"))
    assert total >= 10 and loaded == total  # every inline PNG decoded
    assert int(dom.stdout.split('data-tables="')[1].split('"')[0]) >= 8
    shot = tmp_path / "report.png"
    proc = _browser(f"--screenshot={shot}", "--window-size=1280,2400", out.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text, table borders and figures drew


@pytest.mark.slow
def test_cli_evaluate_and_report(trained_runs, evaluated, tmp_path):
    run = trained_runs["supervised"]
    proc = run_cli("evaluate", str(run), "--eval.device", "cpu", "--eval.protocols", "[calibration,ood]",
                   "--eval.ood.n", "32", "--eval.ood.sets", "noise")
    assert proc.returncode == 0, proc.stderr
    assert "calibration" in proc.stdout and "ECE" in proc.stdout and "AUROC on noise" in proc.stdout
    assert "results/eval.json" in proc.stdout
    report = run_cli("report", str(run), str(trained_runs["genvit"]), "-o", str(tmp_path / "r.html"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "r.html").read_text().count("<table>") >= 8
