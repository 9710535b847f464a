"""GCRL and its baselines as issue 25 reads the paper: the skipped contrastive branch in the generative-only
phase, table 7's no-split model, table 10's supervised encoder loss, the LN read-out and the palette record."""

import pytest
import torch
from conftest import tiny_config

from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method, get_method
from genrep.methods.base import count_flops_per_image

DATA = DataSpec(image_size=4, channels=3, num_classes=10)


def _model(name, **model):
    cfg = get_method(name).config_class(**{"dim": 16, "depth": 4, "num_heads": 2, "colours": 8, "drop": 0.0,
                                           **model})
    torch.manual_seed(0)
    return build_method(name, cfg, DATA).float()


def _batch(n=4, progress=0.25, labels=False):
    g = torch.Generator().manual_seed(0)
    b = {"weak": torch.rand(n, 3, 4, 4, generator=g), "strong": torch.rand(n, 3, 4, 4, generator=g),
         "progress": torch.full((n,), progress)}
    if labels:
        b["label"] = torch.randint(0, 10, (n,), generator=g)
    return b


@pytest.mark.parametrize("progress", [0.25, 0.75])
def test_skipping_the_off_branch_keeps_the_loss_and_gradients(progress):
    skip, full = _model("gcrl").train(), _model("gcrl", skip_off_branch=False).train()
    a, b = skip.loss(_batch(progress=progress)), full.loss(_batch(progress=progress))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["generative"], b["generative"])
    a["loss"].backward()
    b["loss"].backward()
    for (name, p), q in zip(skip.named_parameters(), full.parameters()):
        assert p.grad is not None, name  # zero, not None: AdamW decays and counts the head as before
        if progress >= 0.5:  # the hybrid step is the pre-skip step, op for op
            assert torch.equal(p.grad, q.grad), name
        else:  # the weight gradients sum B rows, not 2B of which B are exact zeros: another rounding order
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7, msg=name)
    if progress < 0.5:
        assert a["contrastive"] == 0 and all(torch.all(p.grad == 0) for p in skip.contrastive.parameters())


def test_a_short_run_with_and_without_the_skip_gives_the_same_weights(tmp_path):
    """Through both phases; equal to float rounding, since phase 1's weight gradients reduce over half the rows
    (bit-identity there would need the strong view run again)."""
    from safetensors.torch import load_file

    from genrep.train.loop import pretrain

    runs = {}
    for skip in (True, False):
        run = tmp_path / f"skip{skip}"
        pretrain(tiny_config("gcrl", **{"train.steps": 4, "model.skip_off_branch": skip}), run)
        runs[skip] = load_file(run / "model.safetensors")
    assert runs[True].keys() == runs[False].keys()
    for k in runs[True]:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_skipping_objective_compiles_to_one_graph():
    method = _model("gcrl").train()
    explanation = torch._dynamo.explain(method)(_batch())
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_flops_average_the_two_phases():
    method = _model("gcrl", generative_only=0.5).eval()
    counts = []
    for progress in (0.0, 1.0):
        method.random_inputs = lambda: {}  # example_batch draws progress 0; give each phase its own

        def at(batch, p=progress):
            return type(method).loss(method, {**batch, "progress": torch.full((len(batch["weak"]),), p)})
        method.loss = at
        counts.append(count_flops_per_image(method))
    assert method.flops_per_image() == pytest.approx(sum(counts) / 2, rel=0.01)


def test_no_split_puts_both_losses_on_the_final_block():
    method = _model("gcrl", encoder_depth=4).train()
    assert method.default_layer == 4
    out = method.loss(_batch(progress=0.75))
    assert torch.isfinite(out["loss"]) and out["contrastive"] > 0


def test_an_encoder_deeper_than_the_model_is_a_one_line_error():
    from genrep.config import resolve_config

    with pytest.raises(GenrepError, match="encoder_depth 7 is larger than model.depth 6") as e:
        resolve_config("gcrl-digits", {"model.depth": 6, "model.encoder_depth": 7})
    assert "\n" not in str(e.value)
    assert resolve_config("gcrl-digits", {"model.depth": 6, "model.encoder_depth": 6}).model.encoder_depth == 6


def test_the_supervised_encoder_loss_is_cross_entropy_on_labels():
    method = _model("gcrl", encoder_loss="supervised").train()
    assert method.needs_labels and "logits" in method.capabilities and not hasattr(method, "contrastive")
    batch = _batch(progress=0.75, labels=True)
    out = method.loss(batch)
    h = method.net.run(method.net.embed(method.tokens(batch["strong"]), shift=True), 0, 2, causal=True)
    ce = torch.nn.functional.cross_entropy(method.classifier(h.mean(1)), batch["label"])
    torch.testing.assert_close(out["supervised"], ce)
    torch.testing.assert_close(out["loss"], out["generative"] + out["supervised"])
    assert method.eval().logits(batch["strong"]).shape == (4, 10)
    early = method.train().loss(_batch(progress=0.25, labels=True))
    assert early["supervised"] == 0 and torch.equal(early["loss"], early["generative"])


def test_a_supervised_classifier_on_the_colour_token_network_trains(tmp_path):
    from genrep.train.loop import pretrain

    overrides = {"train.steps": 2, "model.encoder_loss": "supervised", "model.alpha": 0.0,
                 "model.generative_only": 0.0, "model.encoder_depth": 2}
    pretrain(tiny_config("gcrl", **overrides), tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["igpt", "simclr", "gcrl"])
def test_the_ln_read_out_is_the_default_and_the_raw_mean_stays(name):
    method = _model(name).eval()
    x = torch.rand(2, 3, 4, 4)
    layer = method.default_layer or method.num_layers
    h = method.hidden(x, layer)
    norm = method.net.norm(h).mean(1) if name == "igpt" else method.contrastive.norm(h.mean(1))
    assert method.default_pool == "ln" and set(method.feature_pools) == {"ln", "mean"}
    torch.testing.assert_close(method.features(x), norm)
    torch.testing.assert_close(method.features(x, pool="mean"), h.mean(1))


def test_the_palette_is_recorded(tmp_path):
    import hashlib

    import numpy as np

    assert "not comparable with the paper" in _model("igpt").capability_settings("nll")["palette"]
    path = tmp_path / "centers.npy"
    np.save(path, np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3))
    record = _model("gcrl", palette=str(path)).capability_settings("sample")["palette"]
    assert record == f"file {path} sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}"
