"""Tests for genrep.eval.calibration: ECE against torchmetrics, its edge cases, the reliability diagram and
predict_probs."""

from __future__ import annotations

import pytest
import torch
from conftest import one_line, tiny_config
from torchmetrics.classification import MulticlassCalibrationError

from genrep.data.datasets import load_dataset
from genrep.errors import GenrepError
from genrep.eval.metrics.calibration import calibration_bins, expected_calibration_error
from genrep.eval.protocols.calibration import predict_probs
from genrep.eval.report.figures import reliability_diagram
from genrep.runs import build_for_data

# tiny problems: on a shared 2-core machine intra-op threads mostly wait on each other
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_probs(n: int, k: int, seed: int, sharpness: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * sharpness, dim=1)
    # labels agree with the prediction part of the time, so accuracy varies across bins
    labels = torch.where(torch.rand(n, generator=g) < 0.6, probs.argmax(1), torch.randint(0, k, (n,), generator=g))
    return probs, labels


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", "train", image_size=8)


# ----------------------------------------------------------------------------------------------- ECE
@pytest.mark.parametrize("n_bins", [15, 20, 1, 100])
@pytest.mark.parametrize("n,k", [(50, 3), (1000, 10), (4000, 100)])
def test_ece_matches_torchmetrics(n_bins, n, k):
    probs, labels = random_probs(n, k, seed=n_bins * 7 + k)
    ours = expected_calibration_error(probs, labels, n_bins=n_bins)
    ref = MulticlassCalibrationError(num_classes=k, n_bins=n_bins, norm="l1")(probs.float(), labels)
    assert ours == pytest.approx(float(ref), abs=2e-6)


def test_confidence_exactly_one_lands_in_the_last_bin():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 2, 2])
    b = calibration_bins(probs, labels, n_bins=10)
    assert b["count"].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 2]       # not a phantom 11th bin
    assert b["confidence"][-1] == 1.0 and b["accuracy"][-1] == 0.5
    # last bin: |0.5 - 1| * 2/3; bin 4 (0.5 in (0.4, 0.5]): |1 - 0.5| * 1/3
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.5)


def test_empty_bins_contribute_nothing():
    # confidences 0.55 (two predictions, one right) and 0.95 (two, both right); 13 of 15 bins are empty
    probs = torch.tensor([[0.55, 0.45], [0.45, 0.55], [0.95, 0.05], [0.05, 0.95]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    b = calibration_bins(probs, labels, n_bins=15)
    assert int((b["count"] == 0).sum()) == 13
    assert (b["accuracy"][b["count"] == 0] == 0).all()
    expected = 0.5 * abs(0.5 - 0.55) + 0.5 * abs(1.0 - 0.95)
    assert expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(expected)


def test_all_correct_with_confidence_one_is_perfectly_calibrated():
    labels = torch.tensor([0, 1, 2, 1, 0])
    probs = torch.nn.functional.one_hot(labels, 3).double()
    assert expected_calibration_error(probs, labels) == 0.0


@pytest.mark.parametrize("probs,labels,n_bins,fragment", [
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 15, "empty"),
    (torch.full((4, 3), 1 / 3), torch.zeros(4, dtype=torch.long), 0, "positive integer"),
    (torch.full((4, 3), 1 / 3), torch.zeros(5, dtype=torch.long), 15, "[N, K]"),
    (torch.full((4,), 1 / 3), torch.zeros(4, dtype=torch.long), 15, "[N, K]"),
    (torch.tensor([[0.5, float("nan")]]), torch.zeros(1, dtype=torch.long), 15, "non-finite"),
])
def test_bad_input_is_a_one_line_error(probs, labels, n_bins, fragment):
    with pytest.raises(GenrepError) as e:
        expected_calibration_error(probs, labels, n_bins=n_bins)
    assert fragment in one_line(e)


# ----------------------------------------------------------------------------------------------- diagram
def test_reliability_diagram_writes_a_png(tmp_path):
    from PIL import Image

    probs, labels = random_probs(500, 10, seed=0)
    path = reliability_diagram(probs, labels, tmp_path / "sub" / "reliability.png", n_bins=15, title="digits")
    assert path == tmp_path / "sub" / "reliability.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    assert not list(path.parent.glob(".*.tmp"))                       # written atomically


def test_reliability_diagram_rejects_bad_input(tmp_path):
    with pytest.raises(GenrepError) as e:
        reliability_diagram(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), tmp_path / "r.png")
    one_line(e)
    assert not (tmp_path / "r.png").exists()


# ----------------------------------------------------------------------------------------------- probabilities
def test_predict_probs_is_the_softmax_of_the_logits(digits8):
    method = build_for_data(tiny_config("supervised"), digits8).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(method.head.weight, std=1.0)                # a zero head gives uniform probabilities
    images = digits8.images[:37]
    probs = predict_probs(method, images, device="cpu", batch_size=16)
    assert probs.shape == (37, 10) and probs.dtype == torch.float32 and probs.device.type == "cpu"
    with torch.no_grad():
        ref = torch.softmax(method.logits(images.float() / 255).float(), dim=1)
    torch.testing.assert_close(probs, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(37))
    assert probs.max(1).values.std() > 0                              # non-trivial confidences


def test_predict_probs_needs_a_classifier_head(digits8):
    method = build_for_data(tiny_config("genvit"), digits8)
    with pytest.raises(GenrepError) as e:
        predict_probs(method, digits8.images[:4], device="cpu")
    msg = one_line(e)
    assert "genvit" in msg and "logits" in msg and "supervised" in msg
