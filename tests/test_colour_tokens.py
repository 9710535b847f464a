"""iGPT, SimCLR and GCRL: the autoregressive property, cached decoding, GCRL's schedule, what their configs refuse.

The registry-wide tests (contract, training, resume, compile, every protocol) cover them like every method;
this file tests what is specific to colour-token models.
"""

import math

import pytest
import torch
from conftest import tiny_config

from genrep.config import resolve_config
from genrep.data.batches import draw_random_inputs
from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method, get_method
from genrep.train.optim import phase_start, phased_lr_at

DATA = DataSpec(image_size=4, channels=3, num_classes=10)


def _model(name, **model):
    cfg = get_method(name).config_class(**{"dim": 16, "depth": 4, "num_heads": 2, "colours": 8, "drop": 0.0,
                                           **model})
    torch.manual_seed(0)
    return build_method(name, cfg, DATA).eval().double()


def _logits_from_embeddings(method, emb):
    net = method.net
    return net.logits(net.run(net.embed_vectors(emb, shift=True), causal=True))


@pytest.mark.parametrize("name", ["igpt", "gcrl"])
@pytest.mark.parametrize("attention", ["dense", "axial"])
def test_logits_for_token_k_depend_on_exactly_the_earlier_tokens(name, attention):
    method = _model(name, attention=attention)
    tokens = torch.randint(0, 8, (2, 16))
    emb = method.net.tok_embed(tokens).detach().requires_grad_(True)
    logits = _logits_from_embeddings(method, emb)
    for k in range(16):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), emb, retain_graph=True)
        per_token = grad.abs().sum(dim=(0, 2))
        assert torch.all(per_token[k:] == 0), f"token {k}'s logits see tokens {k} and later"
        # every earlier token reaches token k, through the axial block's row/column/shifted-row path too
        assert torch.all(per_token[:k] > 0), f"token {k}'s logits miss an earlier token: {per_token[:k]}"


def test_cached_decoding_gives_the_full_forward_logits():
    method = _model("igpt")
    tokens = torch.randint(0, 8, (3, 16))
    full = method.net.logits(method.net.run(method.net.embed(tokens, shift=True), causal=True))
    cache = method.net.new_cache()
    with torch.no_grad():
        stepped = torch.stack([method._cached_step(tokens, k, cache) for k in range(16)], dim=1)
    torch.testing.assert_close(stepped, full.detach().float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["dense", "axial"])
def test_completion_keeps_the_given_pixels_and_temperature_is_honoured(attention):
    method = _model("igpt", attention=attention).float()
    x = torch.rand(2, 3, 4, 4)
    keep = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    keep[:, :, :2] = True  # the top half
    out = method.complete(x, keep, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, :2], x[:, :, :2])
    again = method.complete(x, keep, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # the filled-in pixels are palette colours
    colours = (method.palette + 1) / 2
    filled = out[:, :, 2:].permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.cdist(filled, colours).min(dim=1).values.max() < 1e-6


def test_nll_is_bits_per_sub_pixel_of_the_quantized_image():
    method = _model("igpt").float()
    x = torch.rand(2, 3, 4, 4)
    tokens = method.tokens(x)
    h = method.net.run(method.net.embed(tokens, shift=True), causal=True)
    nats = torch.nn.functional.cross_entropy(method.net.logits(h).transpose(1, 2), tokens, reduction="none").sum(1)
    torch.testing.assert_close(method.nll(x), nats / math.log(2) / (16 * 3))
    assert "not pixel bits/dim" in method.capability_settings("nll")["unit"]


def test_score_is_the_gradient_with_respect_to_token_embeddings():
    method = _model("gcrl").float()
    x = torch.rand(2, 3, 4, 4)
    grad = method.grad_log_density(x)
    assert grad.shape == (2, 16, 16)
    assert torch.all(grad[:, -1] == 0)  # the last token is never an input (the sequence is shifted right)
    assert torch.all(grad[:, :-1].flatten(1).norm(dim=1) > 0)


def test_gcrl_trains_the_generative_loss_alone_for_its_first_part():
    method = _model("gcrl", generative_only=0.5).float().train()
    g = torch.Generator().manual_seed(0)
    batch = {"weak": torch.rand(4, 3, 4, 4, generator=g), "strong": torch.rand(4, 3, 4, 4, generator=g)}
    early = method.loss({**batch, "progress": torch.full((4,), 0.25)})
    torch.testing.assert_close(early["loss"], early["generative"])
    early["loss"].backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in method.contrastive.parameters())
    late = method.loss({**batch, "progress": torch.full((4,), 0.5)})
    torch.testing.assert_close(late["loss"], late["generative"] + late["contrastive"])


def test_progress_input_is_the_fraction_of_training_done():
    views = {"image": torch.zeros(6, 1, 2, 2)}
    out = draw_random_inputs({"p": ("progress", None)}, views, seed=0, step=3, start=0, total=6, progress=0.375)
    assert torch.equal(out["p"], torch.full((6,), 0.375))


def test_two_phase_schedule_restarts_at_the_second_peak():
    start = phase_start(100, 0.5)
    lrs = [phased_lr_at(s, 100, 5, 1.6e-3, 0.0, start, 4.8e-4) for s in range(100)]
    assert start == 50
    assert max(lrs[:50]) == pytest.approx(1.6e-3) and lrs[49] < 1e-5
    assert max(lrs[50:]) == pytest.approx(4.8e-4) and lrs[50] == pytest.approx(4.8e-4 / 5)


@pytest.mark.parametrize("overrides, message", [
    ({"model.encoder_depth": 5}, r"encoder_depth 5 is larger than model.depth 4; choose 1..4"),
    ({"model.temperature": 0.0}, "model.temperature"),
    ({"model.temperature": -1.0}, "model.temperature"),
])
def test_bad_gcrl_settings_are_one_line_errors(overrides, message):
    with pytest.raises(GenrepError, match=message) as e:
        resolve_config("gcrl-digits", {"model.depth": 4, **overrides})
    assert "\n" not in str(e.value)


def test_a_second_phase_needs_its_peak():
    with pytest.raises(GenrepError, match="go together") as e:
        resolve_config("igpt-digits", {"optim.second_phase_at": 0.5})
    assert "\n" not in str(e.value)


def test_simclr_refuses_unmasked_axial_attention():
    with pytest.raises(GenrepError, match="causal by construction"):
        resolve_config("simclr-digits", {"model.attention": "axial"})


def test_more_colours_than_the_data_has_is_a_one_line_error(tmp_path):
    from genrep.train.loop import pretrain
    cfg = tiny_config("igpt", **{"model.colours": 40})  # digits has 17 grey levels
    with pytest.raises(GenrepError, match="17 distinct") as e:
        pretrain(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("other", [{"data.image_size": 4}, {"data.name": "mnist-like"}])
def test_a_palette_fitted_on_other_data_is_refused_on_evaluation_and_resume(tmp_path, other):
    """The palette is the run's fitted state: one from another data set, size or channel count is a one-line
    error, and nothing is written."""
    import shutil

    from genrep.data.datasets import ImageSet
    from genrep.run import load_trained
    from genrep.runs import PREPARED_FILE
    from genrep.train.loop import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config("igpt", **{"train.steps": 2}), run)
    donor = tmp_path / "donor"
    if "data.image_size" in other:
        pretrain(tiny_config("igpt", **{"train.steps": 2, **other}), donor)
    else:  # RGB images: another data set and channel count
        g = torch.Generator().manual_seed(0)
        rgb = ImageSet(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g),
                       torch.randint(0, 10, (64,), generator=g), [str(i) for i in range(10)], "rgb")
        from genrep.train.loop import Trainer
        trainer = Trainer(tiny_config("igpt", **{"train.steps": 2}), donor, train_set=rgb)
        try:
            trainer.fit()
        finally:
            trainer.close()
    shutil.copyfile(donor / PREPARED_FILE, run / PREPARED_FILE)
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(GenrepError, match="was fitted on") as e:
        load_trained(run)
    assert "\n" not in str(e.value)
    with pytest.raises(GenrepError, match="was fitted on"):
        pretrain(tiny_config("igpt", **{"train.steps": 4}), run, resume=True)
    assert sorted(p.name for p in run.rglob("*")) == before


def test_axial_models_refuse_an_unmasked_read_out_before_any_work():
    from genrep.eval.protocols.context import check_causal

    method = _model("igpt", attention="axial")
    check_causal(method, True, "eval.probes.causal")
    with pytest.raises(GenrepError, match="eval.probes.causal=False: igpt with axial attention has no unmasked"):
        check_causal(method, False, "eval.probes.causal")
    check_causal(_model("igpt"), False, "eval.probes.causal")  # dense attention reads either way


@pytest.mark.parametrize("name", ["igpt", "simclr", "gcrl"])
@pytest.mark.parametrize("attention", ["dense", "axial"])
def test_analytic_flops_match_the_counter(name, attention):
    from genrep.methods.base import count_flops_per_image

    extra = {"causal": True} if name == "simclr" and attention == "axial" else {}
    extra.update({"skip_off_branch": False} if name == "gcrl" else {})  # tests/test_gcrl.py counts the skip
    method = _model(name, attention=attention, **extra).float()
    assert count_flops_per_image(method) == pytest.approx(method.flops_per_image(), rel=0.01)


def test_likelihood_and_score_norm_results_say_what_they_measure(tmp_path):
    """Bits per sub-pixel of the quantized image and a gradient by the token embeddings are not pixel bits/dim
    and a pixel score: the results say so."""
    from genrep.config import EvalConfig
    from genrep.eval.evaluate import evaluate_run
    from genrep.eval.protocols.likelihood import LikelihoodSettings
    from genrep.eval.protocols.ood import OODSettings
    from genrep.train.loop import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config("gcrl", **{"train.steps": 2}), run)
    ev = EvalConfig(device="cpu", protocols=["likelihood", "ood"], likelihood=LikelihoodSettings(n=8),
                    ood=OODSettings(n=16, sets=["noise"], scores=["score_norm"]))
    out = evaluate_run(run, ev, progress=False, say=lambda m: None)["protocols"]
    assert "not pixel bits/dim" in out["likelihood"]["unit"]
    assert out["likelihood"]["bits_per_token"] == pytest.approx(out["likelihood"]["bits_per_subpixel"])  # one grey channel
    assert out["ood"]["score_wrt"] == "token embeddings"
    assert 0 <= out["ood"]["scores"]["score_norm"]["noise"]["auroc"] <= 1


def test_sampling_a_token_run_takes_its_temperature_and_refuses_diffusion_flags(tmp_path):
    from genrep.eval.report.samples import run_sampling
    from genrep.train.loop import pretrain

    run = tmp_path / "run"
    pretrain(tiny_config("igpt", **{"train.steps": 2}), run)
    r = run_sampling(run, n=4, temperature=0.98, device="cpu", progress=False)
    assert r["sample"]["temperature"] == 0.98 and r["grid"].endswith("temperature0.98-n4-seed0.png")
    for flags in ({"steps": 10}, {"sampler": "ddim", "eta": 0.5}):
        with pytest.raises(GenrepError, match="do not apply to igpt runs; their sampling flags: --temperature"):
            run_sampling(run, n=4, device="cpu", progress=False, **flags)
    with pytest.raises(GenrepError, match="model.temperature"):
        run_sampling(run, n=4, temperature=0.0, device="cpu", progress=False)
