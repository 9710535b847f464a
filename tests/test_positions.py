"""Positional encodings as one config key (the DARL paper's table 1) in the methods that take them (DARL and the
supervised ViT), and RoPE position interpolation: the two ways a ViT gets its RoPE positions agree."""

import pytest
import torch
from conftest import one_line, tiny_config

from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method
from genrep.methods.base import example_batch
from genrep.methods.positions import POSITIONS

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)
BIG = DataSpec(image_size=16, channels=1, num_classes=10)
TAKERS = ["darl", "supervised"]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _build(method, spec=SPEC, **model):
    torch.manual_seed(0)
    return build_method(method, tiny_config(method, **{f"model.{k}": v for k, v in model.items()}).model, spec)


@pytest.mark.parametrize("method", TAKERS)
@pytest.mark.parametrize("pos_embed", POSITIONS)
def test_every_encoding_trains_and_only_learned_positions_have_weights(method, pos_embed):
    model = _build(method, pos_embed=pos_embed).train()
    loss = model(example_batch(model, n=4))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    has_weights = any(k.endswith("pos_embed.pos") for k in model.state_dict())
    assert has_weights == (pos_embed == "learned")
    assert ({n for n in model.no_weight_decay() if n.endswith("pos_embed.pos")} != set()) == has_weights
    assert (model.encoder.rope is not None) == pos_embed.startswith("rope")


@pytest.mark.parametrize("rope", ["rope2d", "rope1d"])
@pytest.mark.parametrize("rope_grid", [0, 4])
def test_the_vit_and_darl_give_a_raster_sequence_the_same_positions(rope, rope_grid):
    """DARL computes positions per order; the plain ViT from its layout: for the raster order, with the start/CLS
    token first, they are the same, at the trained grid and interpolated from a larger one."""
    darl = _build("darl", BIG, pos_embed=rope, rope_grid=rope_grid)
    vit = _build("supervised", BIG, pos_embed=rope, rope_grid=rope_grid).encoder
    n = 1 + darl.T
    torch.testing.assert_close(darl._positions(darl.order, True).float(),
                               vit._rope_positions(n, 0, torch.device("cpu")).float())


def test_a_supervised_vit_reads_a_larger_grid_with_interpolated_positions():
    """Table 1's "evaluate with resolution 384": the classifier trained on a 4x4 patch grid reads an 8x8 one, its
    positions scaled into the trained range; the state dict is the same on any grid."""
    small = _build("supervised", pos_embed="rope2d")
    big = _build("supervised", BIG, pos_embed="rope2d", rope_grid=4)
    big.load_state_dict(small.state_dict())
    pos = big.encoder._rope_positions(1 + 64, 0, torch.device("cpu"))
    assert pos[0].tolist() == [0, 0] and pos[1].tolist() == [0.5, 0.5] and pos[-1].tolist() == [4.0, 4.0]
    assert big.eval().logits(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    assert type(big).size_options(small.cfg, 8, 16) == {"rope_grid": 4}
    with pytest.raises(GenrepError) as e:
        type(big).size_options(_build("supervised").cfg, 8, 16)
    assert "model.pos_embed learned gives absolute positions on the 4x4 patch grid" in one_line(e)


@pytest.mark.parametrize("method", TAKERS)
@pytest.mark.parametrize("rope", ["rope2d", "rope1d"])
def test_the_rope_base_is_a_key_of_every_taker(method, rope):
    assert _build(method, pos_embed=rope).encoder.rope.base == 10000.0  # the default: the runs before the key
    assert _build(method, pos_embed=rope, rope_base=100.0).encoder.rope.base == 100.0


@pytest.mark.parametrize("method", TAKERS)
@pytest.mark.parametrize("override,fragment", [
    ({"pos_embed": "rope2d", "dim": 24, "num_heads": 4}, "head width model.dim / model.num_heads = 6 must be "
                                                         "divisible by 4"),
    ({"pos_embed": "rope1d", "dim": 30, "num_heads": 10}, "head width model.dim / model.num_heads = 3 must be "
                                                          "divisible by 2"),
    ({"pos_embed": "learned", "rope_grid": 4}, "model.rope_grid interpolates RoPE positions; model.pos_embed learned "
                                               "has none"),
    ({"pos_embed": "alibi"}, "model.pos_embed 'alibi' is unknown"),
    ({"pos_embed": "sincos", "rope_base": 100.0}, "model.rope_base sets RoPE's frequencies; model.pos_embed sincos "
                                                  "has no RoPE: leave model.rope_base at 10000"),
    ({"pos_embed": "rope2d", "rope_base": 0.5}, "model.rope_base must be above 1 and at most 1e+12, got 0.5"),
])
def test_bad_positions_are_one_line_errors(method, override, fragment):
    with pytest.raises(GenrepError) as e:
        _build(method, **override)
    assert fragment in one_line(e)


@pytest.mark.slow
def test_a_supervised_rope_run_is_probed_at_another_size(tmp_path):
    """The classifier's accuracy at another size is in probe.json, beside the probes (table 1's last rows)."""
    from genrep.eval.evaluate import run_probes
    from genrep.train.loop import pretrain

    run = tmp_path / "sup"
    pretrain(tiny_config("supervised", **{"train.steps": 2, "model.pos_embed": "rope2d"}), run)
    at16 = run_probes(run, progress=False, image_size=16)
    assert (at16["image_size"], at16["trained_image_size"], at16["rope_grid"]) == (16, 8, 4)
    assert 0 <= at16["classifier_test_acc"] <= 1
