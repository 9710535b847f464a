"""The supervised ViT's causal mode: the DARL paper's table 1 "Supervised + Causal" column (issue 27, item 11)."""

from __future__ import annotations

import pytest
import torch
from conftest import one_line, tiny_config

from genrep.errors import GenrepError
from genrep.methods import DataSpec, get_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAUSAL = {"model.causal": True, "model.head_pool": "mean"}


def _model(**overrides):
    return get_method("supervised")(tiny_config("supervised", **overrides).model, DataSpec(8, 1, 10)).eval()


def test_a_causal_token_sees_itself_and_the_tokens_before_it():
    model = _model(**CAUSAL)
    grid = model.encoder.patch_embed.grid
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    last, first = x.clone(), x.clone()
    last[..., -2:, -2:] = 1 - last[..., -2:, -2:]     # the last patch of the raster order
    first[..., :2, :2] = 1 - first[..., :2, :2]       # the first

    def tokens(images):  # the patch tokens of the last block, in raster order
        with torch.no_grad():
            return model.features(images, pool="map").flatten(2)

    base, moved = tokens(x), tokens(last)
    torch.testing.assert_close(moved[..., :-1], base[..., :-1], rtol=0, atol=1e-6)
    assert (moved[..., -1] - base[..., -1]).abs().max() > 1e-3
    assert ((tokens(first) - base).abs().amax(dim=1) > 1e-4).all()  # every token reads the first patch
    assert grid ** 2 == base.shape[-1] and model.logits(last).shape == (2, 10)
    # the read-outs' switch: without the mask the earlier tokens read the last patch too
    model.causal_mask = False
    assert ((tokens(last) - tokens(x)).abs().amax(dim=1) > 1e-4).all()
    plain = _model()
    assert not plain.causal_readout and not plain.causal_mask and plain.default_pool == "cls"


def test_the_classifier_reads_the_mean_or_the_last_patch_and_cls_is_refused():
    model = _model(**CAUSAL)
    assert model.causal_readout and model.causal_mask
    assert model.default_pool == "mean" and set(model.feature_pools) == {"mean", "last"}
    assert _model(**{**CAUSAL, "model.head_pool": "last"}).default_pool == "last"
    with pytest.raises(GenrepError) as e:
        model.check_feature_args(None, "cls")
    assert "pooling 'cls' is not offered by supervised; choose one of mean, last" in one_line(e)
    with pytest.raises(GenrepError) as e:
        tiny_config("supervised", **{"model.causal": True})
    assert ("model.head_pool cls reads the CLS token, which under model.causal sees only itself: set model.head_pool "
            "mean") in one_line(e)


def test_a_causal_run_trains_and_its_probes_switch_the_mask(tmp_path):
    from dataclasses import replace

    from eval_helpers import FAST

    from genrep.eval.evaluate import evaluate_run
    from genrep.eval.protocols.probes import ProbesSettings
    from genrep.train.loop import pretrain

    run = tmp_path / "sup-causal"
    pretrain(tiny_config("supervised", **{**CAUSAL, "train.steps": 2}), run)
    for causal in (None, False):
        ev = replace(FAST, protocols=["probes"], probes=ProbesSettings(epochs=2, sweep=False, causal=causal))
        out = evaluate_run(run, ev, progress=False, say=lambda m: None)["protocols"]["probes"]
        assert out["causal"] is (causal is None) and out["pool"] == "mean"  # as trained: causal
    cached = sorted(p.name for p in (run / "cache").iterdir() if "-train-" in p.name)
    assert any("causal1" in n for n in cached) and any("causal0" in n for n in cached)
