"""Selective prediction (issue 29, item 3): `genrep predict` and `Run.predict` classify, score and abstain by a
threshold fitted on one half of the test split and saved in the run; a method without logits predicts through the
classifier `genrep probe` saved; the threshold's arithmetic; bad input in one line."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, tiny_config
from PIL import Image

import genrep
from genrep.api import train
from genrep.cli import main
from genrep.data.datasets import load_dataset
from genrep.eval.metrics.probes import linear_probe
from genrep.eval.metrics.selective import risk_coverage, selective_summary
from genrep.predict import fit_threshold


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    made = {}
    for name in ("hybvit", "simclr"):   # logits of its own, and none
        made[name] = root / name
        train(tiny_config(name, **{"train.steps": 5}), made[name], resume=False, claimed=False)
    images = root / "images"
    images.mkdir()
    test = load_dataset("digits", "test")
    for i in range(6):
        Image.fromarray(test.images[i, 0].numpy()).save(images / f"digit{i}.png")
    noise = np.random.default_rng(0).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    for i, im in enumerate(noise):
        Image.fromarray(im).save(images / f"noise{i}.png")
    made["images"] = images
    return made


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_a_row_per_image_saves_its_threshold_and_reuses_it(runs, capsys):
    run, images = runs["hybvit"], runs["images"]
    broken = images.parent / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["predict", str(run), str(images), str(broken), "--coverage", "0.5"]) == 1   # one unreadable
    out, err = capsys.readouterr()
    assert "fitted on one half" in out and err.count("\n") == 1 and "broken.png" in err
    rows = _rows(run / "results" / "predictions.csv")
    assert [Path(r["image"]).name for r in rows] == [*(f"digit{i}.png" for i in range(6)), "noise0.png", "noise1.png"]
    record = json.loads((run / "results" / "predict.json").read_text())
    assert record["request"] == {"coverage": 0.5} and record["score"] == "msp" and record["fitted_on"]["split"] == "test"
    for r in rows:
        assert r["abstain"] == str(float(r["score"]) < record["threshold"]).lower()
        assert 0 < float(r["probability"]) <= 1 and r["class_name"] == r["class"]   # digits' classes are 0..9
    assert main(["predict", str(run), str(images), "--coverage", "0.5"]) == 0
    assert "reused from" in capsys.readouterr().out
    assert _rows(run / "results" / "predictions.csv") == rows
    # the API reads the same threshold and gives the same answers
    got = genrep.load(run).predict([Image.open(images / Path(r["image"]).name) for r in rows], coverage=0.5)
    assert [str(bool(a)).lower() for a in got["abstain"]] == [r["abstain"] for r in rows]
    assert got["classes"].tolist() == [int(r["class"]) for r in rows]


def test_a_method_without_logits_predicts_through_the_probe_genrep_probe_saved(runs, capsys):
    run = runs["simclr"]
    assert main(["predict", str(run), str(runs["images"])]) == 2
    assert "run genrep probe" in one_line_err(capsys)
    genrep.probe(run)
    assert main(["predict", str(run), "--data", "digits", "--max-risk", "0.5", "-o", str(run / "p.csv")]) == 0
    rows = _rows(run / "p.csv")
    assert len(rows) == 360 and rows[0]["image"] == "digits/test/0"
    record = json.loads((run / "results" / "predict.json").read_text())
    assert "probe" in record["classifier"] and record["request"] == {"max_risk": 0.5}


def one_line_err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("genrep: error: ")
    return err


@pytest.mark.parametrize("args, message", [
    (["--coverage", "0"], "coverage 0.0 must lie in (0, 1]"),
    (["--coverage", "1.5"], "coverage 1.5 must lie"),
    (["--max-risk", "1"], "max risk 1.0 must lie in (0, 1)"),
    (["--coverage", "0.9", "--max-risk", "0.1"], "not both"),
])
def test_a_bad_operating_point_is_one_line(runs, capsys, args, message):
    assert main(["predict", str(runs["hybvit"]), str(runs["images"]), *args]) == 2
    assert message in one_line_err(capsys)


def test_nothing_to_predict_and_a_file_that_is_not_ours_are_one_line(runs, capsys, tmp_path):
    assert main(["predict", str(runs["hybvit"])]) == 2
    assert "needs images" in one_line_err(capsys)
    theirs = tmp_path / "mine.csv"
    theirs.write_text("my,own\n")
    assert main(["predict", str(runs["hybvit"]), str(runs["images"]), "-o", str(theirs)]) == 2
    assert "not a predictions CSV genrep wrote" in one_line_err(capsys) and theirs.read_text() == "my,own\n"


def test_the_threshold_answers_the_asked_coverage_or_the_largest_within_the_risk():
    score = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], dtype=torch.float64)
    correct = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    assert fit_threshold(score, correct, {"coverage": 0.5}) == 0.5          # the 5 highest answered
    assert fit_threshold(score, correct, {"coverage": 1.0}) == 0.0
    # risks at k = 1..10: 0, 0, 1/3, 1/4, 1/5, 1/6, 2/7, 3/8, 3/9, 4/10
    assert fit_threshold(score, correct, {"max_risk": 0.2}) == 0.4          # k = 6: 1/6 <= 0.2, and no later one
    assert fit_threshold(score, torch.zeros(10, dtype=torch.bool), {"max_risk": 0.5}) == math.inf   # all wrong
    summary = selective_summary(score, correct, points=4)
    assert summary["coverage"] == [0.1, 0.4, 0.7, 1.0] and summary["error_rate"] == pytest.approx(0.4)
    coverage, risk, aurc = risk_coverage(score, correct)
    assert coverage[-1] == 1 and risk[2] == pytest.approx(1 / 3)
    assert aurc == pytest.approx(sum([0, 0, 1 / 3, 1 / 4, 1 / 5, 1 / 6, 2 / 7, 3 / 8, 3 / 9, 4 / 10]) / 10)


@pytest.mark.parametrize("solver", ["lbfgs", "adamw", "lars"])
def test_the_probes_saved_classifier_reads_raw_features_as_the_probe_read_standardised_ones(solver):
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(120, 6, generator=g) * 4 + 2, torch.randn(40, 6, generator=g) * 4 + 2
    y, yt = (x[:, 0] > 2).long(), (xt[:, 0] > 2).long()
    r = linear_probe(x, y, xt, yt, 2, solver=solver, epochs=3, batch_size=32, warmup_epochs=1,
                     return_test_probs=True)
    torch.testing.assert_close(torch.softmax(xt @ r.weight.t() + r.bias, 1), r.test_probs, rtol=1e-4, atol=1e-5)


def test_the_gaussian_score_is_fitted_on_the_training_split_saved_beside_the_threshold_and_reused(tmp_path, capsys):
    from genrep.eval.metrics.ood import GaussianOODScore
    from genrep.runs import load_split

    run = tmp_path / "run"
    train(tiny_config("hybvit", **{"train.steps": 2}), run, resume=False, claimed=False)
    genrep.evaluate(run, protocols="ood", ood={"n": 60, "sets": ["noise"], "scores": ["gaussian"]}, device="cpu")
    csv_path = tmp_path / "p.csv"
    assert main(["predict", str(run), "--data", "digits", "--coverage", "0.9", "-o", str(csv_path)]) == 0
    record = json.loads((run / "results" / "predict.json").read_text())
    assert record["score"] == "gaussian" and record["gaussian"]["file"] == "predict-gaussian.safetensors"
    # the scores are the OOD evaluation's: Gaussians fitted on the training split's features at its read-out
    loaded = genrep.load(run)
    ood = json.loads((run / "results" / "eval.json").read_text())["protocols"]["ood"]
    train_set, test = load_split(loaded.config, "train"), load_split(loaded.config, "test")
    g = GaussianOODScore().fit(loaded.features(train_set.images, ood["layer"], ood["pool"]), train_set.labels)
    expected = g.score(loaded.features(test.images, ood["layer"], ood["pool"]))
    rows = _rows(csv_path)
    torch.testing.assert_close(torch.tensor([float(r["score"]) for r in rows], dtype=torch.float64), expected,
                               rtol=1e-5, atol=1e-3)
    capsys.readouterr()
    assert main(["predict", str(run), "--data", "digits", "--coverage", "0.9", "-o", str(csv_path)]) == 0
    assert "reused from" in capsys.readouterr().out and _rows(csv_path) == rows
    got = loaded.predict(test.images[:8], coverage=0.9)   # the saved Gaussians, through the API
    assert [str(bool(a)).lower() for a in got["abstain"]] == [r["abstain"] for r in rows[:8]]
    (run / "results" / "predict-gaussian.safetensors").write_bytes(b"not safetensors")
    assert main(["predict", str(run), "--data", "digits", "--coverage", "0.9", "-o", str(csv_path)]) == 2
    assert "predict-gaussian.safetensors is damaged" in one_line_err(capsys)
