"""Stochastic depth (``model.drop_path``) as the HybViT paper's code runs it for its supervised ViT baseline:
one rate in every block, on the attention and the MLP branch, per sample, kept samples scaled by 1 / keep_prob;
nothing at all in eval mode or at rate 0."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY, tiny_config
from safetensors.torch import load_file
from test_nn import _old_vit

from genrep.cli import main
from genrep.methods import DataSpec, build_method
from genrep.nn.denoiser import DenoiserViT
from genrep.nn.transformer import DropPath
from genrep.nn.vit import ViT, drop_path_rates
from genrep.train.loop import pretrain

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)


def _vit(drop_path: float, **kw) -> ViT:
    torch.manual_seed(0)  # DropPath draws nothing at init: the same weights at any rate
    return ViT(8, 2, 3, 16, 3, 2, 2.0, drop_path=drop_path, **kw)


def _record_keeps(vit: ViT) -> list[list[torch.Tensor]]:
    """Per block, the per-sample keep flags of each DropPath call (attention, then MLP), read off the output."""
    keeps: list[list[torch.Tensor]] = [[] for _ in vit.blocks]
    for i, block in enumerate(vit.blocks):
        block.drop_path.register_forward_hook(
            lambda m, inp, out, i=i: keeps[i].append(out.flatten(1).abs().sum(1) != 0))
    return keeps


@torch.no_grad()
def test_identity_in_eval_mode_and_at_rate_zero():
    x = torch.randn(5, 3, 8, 8)
    plain, dropped = _vit(0.0), _vit(0.5)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()))
    assert torch.equal(dropped.eval()(x), plain.eval()(x))
    # rate 0 in training: the computation from before drop path existed, and no random number drawn, so the
    # dropout masks of a run are those it had without the key
    plain.train()
    state = torch.get_rng_state()
    assert torch.equal(plain(x), _old_vit(plain, x, plain.depth))
    assert torch.equal(torch.get_rng_state(), state)


@torch.no_grad()
def test_survivors_are_scaled_by_one_over_keep_prob_and_the_mean_is_kept():
    drop = DropPath(0.25).train()
    x = torch.randn(1, 7, 5).expand(40000, -1, -1)
    torch.manual_seed(1)
    out = drop(x)
    kept = out.flatten(1).abs().sum(1) != 0
    assert torch.equal(out[kept], x[kept] / 0.75)
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 4.6 standard deviations at n = 40000
    torch.testing.assert_close(out.mean(0), x[0], atol=0.03, rtol=0.02)  # E[out] = x


@torch.no_grad()
def test_each_block_drops_its_branches_at_the_schedules_rate():
    assert drop_path_rates(0.1, 9) == [0.1] * 9  # the paper's code: one DropPath(sd) for every block, no ramp
    vit = _vit(0.3).train()
    assert [b.drop_path.rate for b in vit.blocks] == [0.3] * 3
    keeps = _record_keeps(vit)
    torch.manual_seed(2)
    vit(torch.randn(6000, 3, 8, 8))
    for attn_keep, mlp_keep in keeps:  # two draws per block: the attention branch, then the MLP branch
        for keep in (attn_keep, mlp_keep):
            assert abs(1 - keep.float().mean().item() - 0.3) < 0.025  # 4.2 standard deviations at n = 6000
        assert not torch.equal(attn_keep, mlp_keep)  # independent draws
    assert len({tuple(k[0].tolist()) for k in keeps}) == 3  # and independent across blocks


def test_a_training_step_is_a_function_of_the_global_seed():
    vit, x = _vit(0.5).train(), torch.randn(8, 3, 8, 8)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(vit(x))
    assert torch.equal(*outs)
    assert not torch.equal(vit(x), outs[0])


def test_compiles_to_one_graph_and_matches_eager():
    vit, x = _vit(0.5).train(), torch.randn(4, 3, 8, 8)
    compiled = torch.compile(vit, backend="aot_eager", fullgraph=True)  # a graph break would raise
    torch.manual_seed(4)
    expected = vit(x)
    torch.manual_seed(4)
    torch.testing.assert_close(compiled(x), expected)


def test_methods_take_the_key_and_the_denoiser_keeps_its_keys():
    sup = build_method("supervised", tiny_config(**{"model.drop_path": 0.1}).model, SPEC)
    assert [b.drop_path.rate for b in sup.encoder.blocks] == [0.1] * sup.cfg.depth
    hyb = build_method("hybvit", tiny_config("hybvit").model, SPEC)
    assert [b.drop_path.rate for b in hyb.net.blocks] == [0.0] * hyb.cfg.depth  # the paper's difvit: 0
    hyb = build_method("hybvit", tiny_config("hybvit", **{"model.drop_path": 0.2}).model, SPEC)
    assert [b.drop_path.rate for b in hyb.net.blocks] == [0.2] * hyb.cfg.depth  # taken, not ignored
    keys = list(DenoiserViT(4, 2, 1, 16, 2, 2, 2.0).state_dict())
    assert list(DenoiserViT(4, 2, 1, 16, 2, 2, 2.0, drop_path=0.2).state_dict()) == keys


@pytest.mark.parametrize("value, got", [("1", "got 1.0"), ("-0.1", "got -0.1")])
def test_a_rate_outside_0_1_is_a_one_line_error(tmp_path, capsys, value, got):
    out = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in TINY.items()]
    assert main(["pretrain", "--recipe", "supervised-digits", "--out", str(out), *args,
                 "--model.drop_path", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("genrep: error: model.drop_path must be at least 0 and below 1, ")
    assert got in err
    assert not out.exists()


@pytest.mark.slow
def test_a_killed_run_with_drop_path_resumes_bit_identical(tmp_path):
    cfg = tiny_config(**{"model.drop_path": 0.3})
    full, cut = tmp_path / "full", tmp_path / "cut"
    pretrain(cfg, full)
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000020")  # as if killed before the final checkpoint
    assert pretrain(cfg, cut, resume=True).start_step == 10
    for name in ("model", "ema"):
        a, b = load_file(full / f"{name}.safetensors"), load_file(cut / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
