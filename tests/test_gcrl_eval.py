"""GCRL's evaluation as the paper ran it (issue 25): the likelihood in bits per token (its bpd) labelled beside
bits per sub-pixel, section 4.2's linear probe and its ECE, the Gaussian score's fallbacks on record; and an
older eval.json, whose ``bpd`` meant either unit, still read with the right label."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import tiny_config

from genrep.config import resolve_config
from genrep.eval.protocols.likelihood import UNITS, likelihood_figures
from genrep.eval.protocols.ood import OODSettings
from genrep.eval.protocols.probes import ProbesSettings
from genrep.eval.report.summary import headline, probe_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("method", ["gcrl", "igpt", "simclr"])
def test_paper_recipes_probe_as_section_4_2_and_other_recipes_keep_their_defaults(method):
    for data in ("cifar10", "cifar100", "imagenet32", "digits"):
        p = resolve_config(f"{method}-{data}").eval.probes
        assert (p.solver, p.epochs, p.batch_size, p.weight_decay, p.standardize, p.lr_schedule) == \
            ("adamw", 100, 512, [1e-4], False, "constant")
    for data in ("cifar10", "cifar100", "imagenet32"):
        p = resolve_config(f"{method}-{data}").probe
        assert (p.solver, p.standardize, p.lr_schedule) == ("adamw", False, "constant")
    other = resolve_config("genvit-digits")
    assert (other.eval.probes.standardize, other.eval.probes.lr_schedule) == (True, "cosine")
    assert (other.probe.standardize, other.probe.lr_schedule) == (True, "cosine")


def test_token_model_reports_bits_per_token_first_and_the_summary_and_report_label_both(tmp_path):
    from genrep.config import EvalConfig
    from genrep.eval.evaluate import evaluate_run
    from genrep.eval.protocols.likelihood import LikelihoodSettings
    from genrep.eval.report.report import load_runs, render
    from genrep.train.loop import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config("gcrl", **{"train.steps": 2}), run)
    ev = EvalConfig(device="cpu", batch_size=64, protocols=["likelihood", "probes", "ood"],
                    likelihood=LikelihoodSettings(n=8), probes=ProbesSettings(epochs=2, sweep=False, knn_k=[5],
                                                                               standardize=False, lr_schedule="constant"),
                    ood=OODSettings(n=16, sets=["noise"], scores=["gaussian"], gaussian_covariance="class"))
    out = evaluate_run(run, ev, progress=False, say=lambda m: None)["protocols"]
    lk = out["likelihood"]
    assert lk["headline"] == "bits_per_token" and "bpd" not in lk
    assert lk["bits_per_token"] == pytest.approx(lk["bits_per_subpixel"])  # digits: one grey channel
    line = headline("likelihood", lk)
    assert line.startswith(f"{lk['bits_per_token']:.3f} {UNITS['bits_per_token']}; ")
    assert f"{lk['bits_per_subpixel']:.3f} {UNITS['bits_per_subpixel']}" in line

    pr = out["probes"]
    assert 0 <= pr["linear_ece"] <= 1 and pr["linear_probe"]["test_ece"] == pr["linear_ece"]
    assert pr["linear"]["standardize"] is False and pr["linear"]["lr_schedule"] == "constant"
    assert f"(ECE {100 * pr['linear_ece']:.2f}%)" in headline("probes", pr)

    g = out["ood"]["gaussian"]
    assert g["covariance"] == "class" and isinstance(g["fallback_classes"], list) and g["ridge"]["relative"] == 1e-4
    assert "ridge 0.0001 x mean variance" in headline("ood", out["ood"])

    # the Gaussian score on another read-out (the raw mean): recorded, and a different score
    ev_mean = EvalConfig(device="cpu", batch_size=64, protocols=["ood"],
                         ood=OODSettings(n=16, sets=["noise"], scores=["gaussian"], pool="mean"))
    raw = evaluate_run(run, ev_mean, progress=False, say=lambda m: None)["protocols"]["ood"]
    assert (out["ood"]["pool"], raw["pool"]) == ("ln", "mean") and raw["layer"] == out["ood"]["layer"]

    html = render(load_runs([run]))
    assert "bits per token of the colour-quantized image (the GCRL paper&#x27;s bpd)" in html
    assert "bits per sub-pixel" in html and "linear ECE" in html and "The Gaussian score's fit" in html


def test_bits_per_token_are_the_method_factor_times_its_nll():
    """An RGB token model: its nll (bits per sub-pixel) times its declared factor, 3, in the first row."""
    from types import SimpleNamespace

    import torch

    from genrep.eval.protocols import likelihood

    per_subpixel = torch.tensor([1.0, 2.0, 3.0, 6.0])

    class Stub:
        def eval(self):
            return self

        def nll(self, x, generator=None):
            return per_subpixel[: len(x)]

        def capability_settings(self, cap):
            return {"unit": "bits per sub-pixel", "bits_per_token_factor": 3}

    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    ctx = SimpleNamespace(method=Stub(), test_subset=lambda n: (images[:n], None), device=torch.device("cpu"),
                          progress=False, ev=SimpleNamespace(seed=0, batch_size=8, likelihood=SimpleNamespace(n=4)))
    r = likelihood.run(ctx)
    assert (r["bits_per_token"], r["bits_per_subpixel"], r["headline"]) == (9.0, 3.0, "bits_per_token")
    assert r["bits_per_token_sem"] == pytest.approx(3 * r["bits_per_subpixel_sem"])
    assert [u for u, _, _ in likelihood_figures(r)] == [UNITS["bits_per_token"], UNITS["bits_per_subpixel"]]


def test_older_likelihood_results_keep_their_units():
    """Before issue 25 ``bpd`` was bits/dim for a diffusion model and, beside ``bits_per_token``, bits per
    sub-pixel for a token model."""
    diffusion = {"bpd": 3.5, "bpd_sem": 0.1, "n": 8, "terms": 4}
    assert likelihood_figures(diffusion) == [("bits/dim", 3.5, 0.1)]
    assert headline("likelihood", diffusion) == "3.500 bits/dim (8 images, 4 terms)"
    token = {"bpd": 1.0, "bpd_sem": 0.01, "bits_per_token": 3.0, "n": 8, "terms": "all"}
    (u1, m1, s1), (u2, m2, s2) = likelihood_figures(token)
    assert (u1, m1, u2, m2) == (UNITS["bits_per_token"], 3.0, UNITS["bits_per_subpixel"], 1.0)
    assert s1 == pytest.approx(0.03) and s2 == 0.01


def test_probe_table_names_the_protocol_and_the_ece():
    r = {"method": "gcrl", "data": "cifar10", "n_train": 10, "n_test": 10, "layer": 6, "pool": "ln",
         "feature_dim": 8, "weights": "ema@1", "num_classes": 10, "knn": {"20": 0.5},
         "linear_probe": {"solver": "adamw", "weight_decay": 1e-4, "test_acc": 0.6, "test_ece": 0.031,
                          "ece_bins": 15, "standardize": False, "lr_schedule": "constant"}}
    text = probe_table(r)
    assert "linear probe (adamw, wd 0.0001, raw features, constant lr)" in text
    assert "linear probe ECE 3.10% (15 bins)" in text
    old = replace_lp(r, {"solver": "lbfgs", "weight_decay": 1e-4, "test_acc": 0.6})  # a probe.json before issue 25
    assert "linear probe (lbfgs, wd 0.0001)" in probe_table(old) and "ECE" not in probe_table(old)


def replace_lp(r: dict, lp: dict) -> dict:
    return {**r, "linear_probe": lp}
