"""Rotary position embeddings against explicit rotations, and the property they exist for."""

import pytest
import torch

from genrep.nn.rope import RoPE1D, RoPE2D, make_rope


def _complex_reference(x, positions, base=10000.0):
    """Rotate-half RoPE as complex multiplication, in float64: (x_i + j x_{i+d/2}) * exp(j pos theta_i)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    z = z * torch.polar(torch.ones_like(theta), positions.double()[..., None] * theta)
    return torch.cat([z.real, z.imag], dim=-1)


def _pair_rotation_reference(x, angle_per_pair):
    """The same map as explicit 2x2 rotation matrices acting on the pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(half):
        a = angle_per_pair[..., i]
        c, s = a.cos(), a.sin()
        x1, x2 = x[..., i].double(), x[..., half + i].double()
        out[..., i], out[..., half + i] = c * x1 - s * x2, s * x1 + c * x2
    return out


def test_rope_1d_is_a_complex_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    pos = torch.tensor([0, 1, 4, 7, 30])
    rope = RoPE1D(8)
    torch.testing.assert_close(rope(x, pos).double(), _complex_reference(x, pos), rtol=1e-5, atol=1e-5)
    per_batch = torch.stack([pos, pos.flip(0)])  # [B, N]: each image its own positions
    expected = torch.stack([_complex_reference(x[b], per_batch[b]) for b in range(2)])
    torch.testing.assert_close(rope(x, per_batch).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(RoPE1D(8, base=100.0)(x, pos).double(), _complex_reference(x, pos, 100.0),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(rope(x, torch.zeros(5)), x)  # position 0 is the identity


def test_rope_2d_rotates_rows_and_columns_by_halves():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 8)
    pos = torch.tensor([[0, 0], [1, 1], [1, 2], [3, 1], [2, 5], [9, 4]])
    theta = 10000.0 ** (-torch.arange(0, 4, 2, dtype=torch.float64) / 4)  # each half is a 1D RoPE of width 4
    rows = _pair_rotation_reference(x[..., :4], pos[:, 0, None].double() * theta)
    cols = _pair_rotation_reference(x[..., 4:], pos[:, 1, None].double() * theta)
    out = RoPE2D(8)(x, pos)
    torch.testing.assert_close(out.double(), torch.cat([rows, cols], -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(RoPE2D(8)(x, pos.expand(2, 6, 2)), out)


@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_the_base_sets_every_axis_frequencies(base):
    """RoPE2D(base) is a 1D RoPE of that base per half; make_rope and the ViT pass it on (model.rope_base)."""
    from genrep.nn.vit import ViT

    torch.manual_seed(0)
    x, pos = torch.randn(1, 2, 4, 8), torch.tensor([[0, 0], [1, 3], [4, 2], [7, 7]])
    expected = torch.cat([_complex_reference(x[..., :4], pos[:, 0], base),
                          _complex_reference(x[..., 4:], pos[:, 1], base)], -1)
    for rope in (RoPE2D(8, base), make_rope("2d", 8, base)):
        torch.testing.assert_close(rope(x, pos).double(), expected, rtol=1e-5, atol=1e-5)
    assert make_rope("1d", 8, base).base == ViT(8, 2, 1, 16, 1, 2, rope="2d", rope_base=base).rope.base == base


def test_a_small_base_turns_every_frequency_across_a_vit_l16_grid():
    """Issue 27's arithmetic: a 64-wide head's axis half (16 frequencies) across the 14 patches of a 224-px image
    turns 9 of its frequencies by less than 0.25 rad with base 10000, 2 with rope-vit's axial 100."""
    from genrep.nn.rope import _frequencies

    def slow(base):
        return int((14 * _frequencies(32, base, torch.device("cpu")) < 0.25).sum())

    assert (slow(10000.0), slow(100.0)) == (9, 2)


def _scores(rope, q, k, pq, pk):
    return rope(q, pq) @ rope(k, pk).transpose(-1, -2)


def test_scores_depend_only_on_the_position_difference():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16)
    pq, pk = torch.randint(0, 20, (5,)), torch.randint(0, 20, (7,))
    rope = RoPE1D(16)
    ref = _scores(rope, q, k, pq, pk)
    torch.testing.assert_close(_scores(rope, q, k, pq + 13, pk + 13), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_scores(rope, q, k, pq + 1, pk), ref, atol=1e-2)

    rope = RoPE2D(16)
    pq, pk = torch.randint(0, 8, (5, 2)), torch.randint(0, 8, (7, 2))
    ref = _scores(rope, q, k, pq, pk)
    for shift in ([5, 0], [0, 3], [2, 7]):  # rows, columns, both
        s = torch.tensor(shift)
        torch.testing.assert_close(_scores(rope, q, k, pq + s, pk + s), ref, rtol=1e-4, atol=1e-4)
    for shift in ([1, 0], [0, 1]):  # moving only the queries changes the scores, on either axis
        assert not torch.allclose(_scores(rope, q, k, pq + torch.tensor(shift), pk), ref, atol=1e-2)


def test_rope_preserves_norms_and_dtype():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 8)
    for rope, pos in ((RoPE1D(8), torch.arange(6) * 3), (RoPE2D(8), torch.randint(0, 9, (6, 2)))):
        torch.testing.assert_close(rope(x, pos).norm(dim=-1), x.norm(dim=-1))
        low = rope(x.bfloat16(), pos)
        assert low.dtype == torch.bfloat16  # computed in float32, cast back
        torch.testing.assert_close(low.float(), rope(x.bfloat16().float(), pos), rtol=1e-2, atol=1e-2)
    assert not list(RoPE2D(8).state_dict())  # nothing enters a checkpoint


def test_token_layout_of_a_vit():
    assert torch.equal(RoPE1D.token_positions(2, 1), torch.arange(5))
    pos = RoPE2D.token_positions(3, 1)
    assert pos.shape == (10, 2) and pos[0].tolist() == [0, 0]  # CLS: the identity rotation
    assert pos[1].tolist() == [1, 1] and pos[3].tolist() == [1, 3] and pos[4].tolist() == [2, 1]


def test_bad_rope_inputs_say_what_is_expected():
    with pytest.raises(ValueError, match="head dim must be even"):
        RoPE1D(7)
    with pytest.raises(ValueError, match="divisible by 4"):
        RoPE2D(6)
    with pytest.raises(ValueError, match="unknown RoPE"):
        make_rope("3d", 8)
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"positions must be \[N\] or \[B, N\] with N=4"):
        RoPE1D(8)(x, torch.arange(5))
    with pytest.raises(ValueError, match=r"positions must be \[N, 2\] or \[B, N, 2\]"):
        RoPE2D(8)(x, torch.arange(4))
    with pytest.raises(ValueError, match=r"\[B, heads, N, 8\]"):
        RoPE1D(8)(torch.randn(2, 4, 6), torch.arange(4))
    with pytest.raises(ValueError, match="needs \\(row, col\\) positions"):
        RoPE2D(8).default_positions(4, 0, x.device)
