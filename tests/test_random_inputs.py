"""The per-sample random kinds the loop draws for a method: distributions, shapes, and the split property."""

import pytest
import torch
from scipy import stats

from genrep.data.batches import draw_random_inputs
from genrep.data.random_inputs import RANDOM_KINDS, check_random_spec, random_kind, sample_gamma

SPEC = {"noise": ("normal", "v"), "t": ("steps", 1000), "u": ("uniform", (3,)), "level": ("beta", (0.5, 3.0, ())),
        "patch_level": ("beta", (2.0, 2.0, (4,))), "order": ("permutation", 16), "cuts": ("boundaries", (16, 5))}


def _views(n=8):
    return {"v": torch.zeros(n, 1, 4, 4)}


def test_every_kind_has_its_shape_and_dtype():
    out = draw_random_inputs(SPEC, _views(), seed=0, step=3, start=0, total=8)
    assert out["noise"].shape == (8, 1, 4, 4) and out["noise"].dtype == torch.float32
    assert out["t"].shape == (8,) and out["t"].dtype == torch.long and 0 <= out["t"].min() and out["t"].max() < 1000
    assert out["u"].shape == (8, 3) and ((0 <= out["u"]) & (out["u"] < 1)).all()
    assert out["level"].shape == (8,) and out["patch_level"].shape == (8, 4)
    assert ((out["level"] > 0) & (out["level"] < 1)).all()
    assert out["order"].shape == (8, 16)
    assert torch.equal(out["order"].sort(dim=1).values, torch.arange(16).expand(8, 16))
    cuts = out["cuts"]
    assert cuts.shape == (8, 5) and (cuts >= 1).all() and (cuts <= 15).all()
    assert (cuts[:, 1:] > cuts[:, :-1]).all()  # sorted and distinct


def test_a_split_batch_draws_what_the_whole_batch_draws():
    whole = draw_random_inputs(SPEC, _views(8), seed=1, step=7, start=0, total=8)
    for start in (0, 4):
        half = draw_random_inputs(SPEC, _views(4), seed=1, step=7, start=start, total=8)
        for k in SPEC:
            assert torch.equal(half[k], whole[k][start:start + 4]), k
    other = draw_random_inputs(SPEC, _views(8), seed=1, step=8, start=0, total=8)
    assert not torch.equal(other["order"], whole["order"])


@pytest.mark.parametrize("a, b", [(0.1, 10.0), (0.5, 0.5), (1.0, 1.0), (3.0, 10.0), (2.0, 0.3)])
def test_beta_draws_follow_the_beta_distribution(a, b):
    x = RANDOM_KINDS["beta"]((a, b, (20000,)), 1, torch.zeros(1), torch.Generator().manual_seed(0))[0]
    assert stats.kstest(x.double().numpy(), stats.beta(a, b).cdf).pvalue > 1e-3


@pytest.mark.parametrize("shape", [0.2, 1.0, 4.5])
def test_gamma_draws_follow_the_gamma_distribution(shape):
    x = sample_gamma(shape, (20000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert stats.kstest(x.numpy(), stats.gamma(shape).cdf).pvalue > 1e-3


def test_permutations_are_uniform():
    orders = RANDOM_KINDS["permutation"](4, 24000, torch.zeros(1), torch.Generator().manual_seed(0))
    codes = (orders * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24  # every one of the 4! orders occurs
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_boundaries_are_uniform_subsets_as_gvp_draws_them():
    cuts = RANDOM_KINDS["boundaries"]((5, 2), 12000, torch.zeros(1), torch.Generator().manual_seed(0))
    pairs = cuts[:, 0] * 10 + cuts[:, 1]
    counts = torch.bincount(pairs)[pairs.unique()]
    assert len(counts) == 6  # C(4, 2) subsets of 1..4
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


def test_a_new_kind_is_one_registered_function():
    @random_kind("test_sign")
    def _sign(arg, total, like, g):
        return torch.randint(0, 2, (total,), generator=g, device=like.device) * 2 - 1

    try:
        out = draw_random_inputs({"s": ("test_sign", None)}, _views(), 0, 0, 0, 8)
        assert set(out["s"].tolist()) <= {-1, 1}
        with pytest.raises(ValueError, match="registered twice"):
            random_kind("test_sign")(_sign)
    finally:
        del RANDOM_KINDS["test_sign"]


def test_bad_declarations_are_clear_errors():
    with pytest.raises(ValueError, match="unknown kind 'gumbel'"):
        check_random_spec({"g": ("gumbel", 1)}, ["v"])
    with pytest.raises(ValueError, match="which the method does not ask for"):
        check_random_spec({"n": ("normal", "other")}, ["v"])
    with pytest.raises(ValueError, match="non-empty groups"):
        draw_random_inputs({"c": ("boundaries", (4, 4))}, _views(), 0, 0, 0, 8)
