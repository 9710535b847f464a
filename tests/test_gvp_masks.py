"""GVP's causal masks against the paper's worked examples (appendix A) and a literal reading of eq. 11 and 12,
their structure for every segmentation, the factorisation-order identity, and appendix B's samplers."""

import pytest
import torch

from genrep.data.random_inputs import RANDOM_KINDS
from genrep.errors import GenrepError
from genrep.nn.gvp_masks import (
    boundaries_from_cuts,
    check_boundaries,
    check_order,
    factorisation_masks,
    fixed_length_boundaries,
    gvp_masks,
    gvp_masks_batched,
    inverse_order,
    mixed_length_boundaries,
    mixed_length_from_uniform,
    permute_tokens,
    random_length_boundaries,
    unpermute_tokens,
)


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


# --------------------------------------------------------------------------- a literal reading of eq. 11, 12

def _eq11_reference(S, T, z1, bounds):
    """Eq. 11 entry by entry, 1-based as printed, then eq. 12's relabelling; z1 is the paper's 1-based z."""
    n0 = bounds[0]  # = m - 1

    def f(t):  # the group of the t-th token of the factorisation; 0 for non-positive t and for G_0
        return 0 if t <= n0 else next(k for k, n in enumerate(bounds) if t <= n)

    N, lim = S + T, S + n0  # lim = S + m - 1
    M_h = [[None] * (N + 1) for _ in range(N + 1)]
    M_g = [[None] * (N + 1) for _ in range(N + 1)]
    for i in range(1, N + 1):
        for j in range(1, N + 1):
            if j <= lim:
                M_h[i][j] = M_g[i][j] = True
            elif i <= lim:  # j > S + m - 1 >= i
                M_h[i][j] = M_g[i][j] = False
            else:
                fi, fj = f(i - S), f(j - S)
                assert fi > 0 and fj > 0  # the four cases of eq. 11 are exhaustive
                M_h[i][j] = fi >= fj
                M_g[i][j] = fi > fj
    zp = {i: i for i in range(1, S + 1)}  # z'(i) = i for i <= S, z'(z_i + S) = i + S
    zp.update({z1[i - 1] + S: i + S for i in range(1, T + 1)})
    return tuple(_m([[M[zp[i]][zp[j]] for j in range(1, N + 1)] for i in range(1, N + 1)]) for M in (M_h, M_g))


# ------------------------------------------------------------------------------------- appendix A, entry by entry
# Transcribed from the printed matrices, 1 for 0 (may attend) and 0 for -inf. The text extraction dropped one row
# of M_h in eq. 14 and one row of each matrix in eq. 16 and 17 (eq. 14's M_g and eq. 19 are printed whole); the
# rows marked "derived" are not printed but follow from eq. 9/11, and each is placed where the printed rows
# leave the gap (in eq. 16's M_g and eq. 17 the missing row equals a neighbour, so its place is not ambiguous).

EQ14_H = _m([[1, 1, 0, 0, 0, 0, 0],
             [1, 1, 0, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 1, 0, 0, 0],
             [1, 1, 1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1, 1, 0],
             [1, 1, 1, 1, 1, 1, 1]])  # derived: x_5 attends to y and x_1..x_5 (eq. 9, i >= j > S)
EQ14_G = _m([[1, 1, 0, 0, 0, 0, 0],
             [1, 1, 0, 0, 0, 0, 0],
             [1, 1, 0, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 1, 0, 0, 0],
             [1, 1, 1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1, 1, 0]])
EQ16_H = _m([[1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 1, 0, 0, 0],  # derived: x_2 (group 1) attends to y, x_1 and itself
             [1, 1, 1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1, 1, 0],
             [1, 1, 1, 1, 1, 1, 1]])
EQ16_G = _m([[1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],  # derived: x_2 (group 1) attends to y and x_1 only (f(i) > f(j) fails for j = i)
             [1, 1, 1, 1, 0, 0, 0],
             [1, 1, 1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1, 1, 0]])
EQ17_H = _m([[1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1, 1, 1],  # derived: x_4 and x_5 (group 2) both attend to everything
             [1, 1, 1, 1, 1, 1, 1]])
EQ17_G = _m([[1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0, 0],
             [1, 1, 1, 1, 1, 0, 0],  # derived: x_4 and x_5 (group 2) attend to y, x_1 and group 1 (x_2, x_3)
             [1, 1, 1, 1, 1, 0, 0]])
EQ19_H = _m([[1, 1, 0, 1, 0, 0, 0],
             [1, 1, 0, 1, 0, 0, 0],
             [1, 1, 1, 1, 1, 1, 1],
             [1, 1, 0, 1, 0, 0, 0],
             [1, 1, 0, 1, 1, 1, 0],
             [1, 1, 0, 1, 1, 1, 0],
             [1, 1, 1, 1, 1, 1, 1]])
EQ19_G = _m([[1, 1, 0, 1, 0, 0, 0],
             [1, 1, 0, 1, 0, 0, 0],
             [1, 1, 0, 1, 1, 1, 0],
             [1, 1, 0, 1, 0, 0, 0],
             [1, 1, 0, 1, 0, 0, 0],
             [1, 1, 0, 1, 0, 0, 0],
             [1, 1, 0, 1, 1, 1, 0]])

# (paper's 1-based z, n_0 < ... < n_K, printed M_h, printed M_g); S = 2, T = 5 throughout
EXAMPLES = {
    "eq14": ([1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], EQ14_H, EQ14_G),  # m = 1, one token per group
    "eq16": ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], EQ16_H, EQ16_G),  # m = 2: x_1 in the condition
    "eq17": ([1, 2, 3, 4, 5], [1, 3, 5], EQ17_H, EQ17_G),  # G_0 = [1], G_1 = [2, 3], G_2 = [4, 5]
    "eq19": ([2, 3, 4, 5, 1], [1, 3, 5], EQ19_H, EQ19_G),  # eq. 17's groups along z = [2, 3, 4, 5, 1]
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_the_worked_examples_of_appendix_a(name):
    z1, bounds, want_h, want_g = EXAMPLES[name]
    order = [t - 1 for t in z1]  # the paper's z is 1-based; orders here are 0-based
    M_h, M_g = gvp_masks(2, 5, order, bounds)
    assert M_h.dtype == torch.bool and M_h.shape == M_g.shape == (7, 7)
    assert torch.equal(M_h, want_h), f"{name} M_h:\n{M_h.int()}"
    assert torch.equal(M_g, want_g), f"{name} M_g:\n{M_g.int()}"
    ref_h, ref_g = _eq11_reference(2, 5, z1, bounds)  # and the literal reading agrees with the print
    assert torch.equal(ref_h, want_h) and torch.equal(ref_g, want_g)
    if z1 == sorted(z1):  # the identity order may be left out
        assert all(torch.equal(a, b) for a, b in zip(gvp_masks(2, 5, None, bounds), (M_h, M_g)))
        assert all(torch.equal(a, b) for a, b in zip(factorisation_masks(2, 5, bounds), (M_h, M_g)))


def test_the_examples_segmentations_are_fixed_length_ones_and_z_prime_is_eq_18s():
    assert fixed_length_boundaries(5, 5).tolist() == [0, 1, 2, 3, 4, 5]  # eq. 14: K = T gives n_0 = 0
    assert fixed_length_boundaries(5, 4, n0=1).tolist() == [1, 2, 3, 4, 5]  # eq. 16
    assert fixed_length_boundaries(5, 2).tolist() == [1, 3, 5] == fixed_length_boundaries(5, 2, n0=1).tolist()
    # appendix A: z'(3) = 7, z'(4) = 3, z'(5) = 4, z'(6) = 5, z'(7) = 6 for z = [2, 3, 4, 5, 1], S = 2
    assert (inverse_order(torch.tensor([1, 2, 3, 4, 0])) + 2 + 1).tolist() == [7, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------- structure, every segmentation

def _segmentations(T, g):
    """One segmentation of each kind that fits T (K at most T - 1 for the random kinds)."""
    K = int(torch.randint(1, T, (1,), generator=g)) if T > 1 else 1
    out = [fixed_length_boundaries(T, min(K + 1, T)), fixed_length_boundaries(T, K, n0=T - K)]
    if T > 1:
        out += [random_length_boundaries(T, K, g), mixed_length_boundaries(T, K, g)]
    return out


CASES = [(S, T, seed) for seed, (S, T) in enumerate([(0, 1), (1, 1), (2, 5), (0, 7), (3, 9), (1, 16), (4, 12)])]


@pytest.mark.parametrize(("S", "T", "seed"), CASES)
def test_who_attends_to_whom_for_random_orders_and_every_segmentation(S, T, seed):
    g = torch.Generator().manual_seed(seed)
    for bounds in _segmentations(T, g):
        order = torch.randperm(T, generator=g)
        M_h, M_g = gvp_masks(S, T, order, bounds)
        ref = _eq11_reference(S, T, (order + 1).tolist(), bounds.tolist())
        assert torch.equal(M_h, ref[0]) and torch.equal(M_g, ref[1]), (bounds, order)
        n = bounds.tolist()
        group = {}  # original token index -> group of its factorisation position
        for p, t in enumerate(order.tolist()):
            group[t] = sum(nk < p + 1 for nk in n)
        visible = set(range(S)) | {S + t for t in group if group[t] == 0}  # condition and context
        for i in range(S + T):
            k = group.get(i - S, 0) if i >= S else 0
            row_h = {j for j in range(S + T) if M_h[i, j]}
            row_g = {j for j in range(S + T) if M_g[i, j]}
            if k == 0:  # condition and context rows: condition and context, in both streams
                assert row_h == row_g == visible
            else:
                assert row_g == visible | {S + t for t in group if 0 < group[t] < k}
                assert row_h == visible | {S + t for t in group if 0 < group[t] <= k}
            assert M_h[i, i]  # every token attends to itself in the content stream ...
            assert bool(M_g[i, i]) == (k == 0)  # ... and in the query stream exactly when it is not a target


@pytest.mark.parametrize(("S", "T", "seed"), CASES)
def test_original_order_masks_are_the_factorisation_masks_conjugated_by_z(S, T, seed):
    g = torch.Generator().manual_seed(100 + seed)
    B = 4
    for bounds in _segmentations(T, g):
        orders = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])
        F_h, F_g = factorisation_masks(S, T, bounds)
        # block-causal: the query mask is the content mask less each group's own block (context stays visible)
        level = torch.cat([torch.zeros(S, dtype=torch.long), torch.searchsorted(bounds, torch.arange(1, T + 1))])
        assert torch.equal(F_h, level[None] <= level[:, None])
        assert torch.equal(F_g, (level[None] < level[:, None]) | (level[None] == 0))
        M_h, M_g = gvp_masks_batched(S, T, orders, bounds)
        for M, F in ((M_h, F_h), (M_g, F_g)):
            into = permute_tokens(permute_tokens(M, orders, leading=S, dim=1), orders, leading=S, dim=2)
            assert torch.equal(into, F.expand(B, -1, -1))  # the same for every order
            back = unpermute_tokens(unpermute_tokens(F.expand(B, -1, -1), orders, leading=S, dim=1), orders,
                                    leading=S, dim=2)
            assert torch.equal(back, M)


def test_permute_tokens_puts_token_z_p_at_position_p_and_unpermute_inverts_it():
    g = torch.Generator().manual_seed(0)
    B, S, T, D = 3, 2, 6, 4
    orders = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])
    x = torch.randn(B, S + T, D, generator=g)
    y = permute_tokens(x, orders, leading=S)
    assert torch.equal(y[:, :S], x[:, :S])
    for b in range(B):
        for p in range(T):
            assert torch.equal(y[b, S + p], x[b, S + orders[b, p]])
    assert torch.equal(unpermute_tokens(y, orders, leading=S), x)
    assert torch.equal(permute_tokens(x[:, S:], orders), y[:, S:])
    assert torch.equal(inverse_order(inverse_order(orders)), orders)


@pytest.mark.parametrize("shared", [True, False])
def test_the_batched_masks_are_the_per_sample_ones(shared):
    g = torch.Generator().manual_seed(3)
    B, S, T, K = 6, 2, 16, 5
    orders = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])
    if shared:
        bounds = random_length_boundaries(T, K, g).tolist()
        per = [bounds] * B
    else:
        bounds = mixed_length_from_uniform(torch.rand(B, T, generator=g), T, K)
        per = bounds.tolist()
    M_h, M_g = gvp_masks_batched(S, T, orders, bounds)
    assert M_h.shape == M_g.shape == (B, S + T, S + T) and M_h.dtype == torch.bool
    for b in range(B):
        one_h, one_g = gvp_masks(S, T, orders[b], per[b])
        assert torch.equal(M_h[b], one_h) and torch.equal(M_g[b], one_g)
    unchecked = gvp_masks_batched(S, T, orders, bounds, validate=False)
    assert torch.equal(unchecked[0], M_h) and torch.equal(unchecked[1], M_g)
    if not shared:
        F_h, _ = factorisation_masks(S, T, bounds)
        assert F_h.shape == (B, S + T, S + T)


def test_only_the_first_group_without_condition_or_context_has_empty_query_rows():
    _, M_g = gvp_masks(0, 4, [2, 0, 3, 1], [0, 2, 4])
    assert (~M_g.any(1)).nonzero().flatten().tolist() == [0, 2]  # tokens 2 and 0: group 1, nothing before it
    _, M_g = gvp_masks(1, 4, [2, 0, 3, 1], [0, 2, 4])
    assert M_g.any(1).all()


# ------------------------------------------------------------------------------------------------------ samplers

def _valid(bounds, T, K):
    assert bounds.dtype == torch.long and bounds.shape[-1] == K + 1
    assert (bounds[..., -1] == T).all() and (bounds[..., 1:] > bounds[..., :-1]).all() and (bounds >= 0).all()
    check_boundaries(bounds, T)


def test_samplers_give_k_groups_ending_at_t_and_repeat_under_a_seed():
    for T, K in [(2, 1), (5, 2), (16, 15), (196, 20)]:
        _valid(fixed_length_boundaries(T, K), T, K)
        _valid(fixed_length_boundaries(T, K, n0=0), T, K)
        for sampler in (random_length_boundaries, mixed_length_boundaries):
            draws = [sampler(T, K, torch.Generator().manual_seed(s)) for s in range(20)]
            for d in draws:
                _valid(d, T, K)
                assert d[0] >= 1  # appendix B's n_0 is drawn from 1..T-1: there is always context
            again = sampler(T, K, torch.Generator().manual_seed(7))
            assert torch.equal(again, draws[7])
            if K < T - 1 and T > 5:  # K = T - 1 leaves one way to cut
                assert len({tuple(d.tolist()) for d in draws}) > 1
        u = torch.rand(64, T, generator=torch.Generator().manual_seed(1))
        _valid(mixed_length_from_uniform(u, T, K), T, K)
    n = fixed_length_boundaries(196, 20)  # groups of about 196 / 21 tokens
    assert n[0] == 9 and (n.diff() >= 9).all() and (n.diff() <= 10).all()


def test_mixed_length_puts_the_last_cut_near_half_the_tokens():
    T, K, N = 196, 20, 1500
    g = torch.Generator().manual_seed(0)
    last = torch.stack([mixed_length_boundaries(T, K, g)[-2] for _ in range(N)]).double() / T
    assert abs(last.mean() - 0.5) < 0.01 and abs(last.std() - 0.1) < 0.01
    batched = mixed_length_from_uniform(torch.rand(4 * N, T, generator=g), T, K)[:, -2].double() / T
    assert abs(batched.mean() - 0.5) < 0.006 and abs(batched.std() - 0.1) < 0.006
    # p far outside [K / T, 1 - 1 / T] is held there: n_{K-1} in K..T-1
    assert mixed_length_boundaries(T, K, g, mean=3.0)[-2] == T - 1
    assert mixed_length_boundaries(T, K, g, mean=-3.0).tolist() == [*range(1, K + 1), T]
    edge = mixed_length_from_uniform(torch.tensor([[0.0] * T, [0.999999] * T]), T, K, std=10.0)
    assert edge[:, -2].tolist() == [K, T - 1]


def test_random_length_is_the_boundaries_kind_distribution():
    T, K, N = 5, 2, 3000
    g = torch.Generator().manual_seed(0)
    ours = torch.stack([random_length_boundaries(T, K, g) for _ in range(N)])
    loop = boundaries_from_cuts(RANDOM_KINDS["boundaries"]((T, K), N, torch.zeros(1), g), T)
    _valid(loop, T, K)
    subsets = [(a, b) for a in range(1, T) for b in range(a + 1, T)]  # 6, each with probability 1/6
    for draws in (ours, loop):
        freq = torch.tensor([((draws[:, 0] == a) & (draws[:, 1] == b)).float().mean().item() for a, b in subsets])
        assert (freq - 1 / 6).abs().max() < 0.03, freq


# ---------------------------------------------------------------------------------------------------- bad input

BAD = [
    (lambda: check_boundaries([1, 3, 3, 5], 5), "strictly increasing.*n_2 = 3 not above n_1 = 3"),
    (lambda: check_boundaries([1, 3, 4], 5), "must end at n_K = T = 5.*ending at 4.*boundaries_from_cuts"),
    (lambda: check_boundaries(list(range(8)), 5), "K = 7 groups.*T = 5 tokens.*at most T"),
    (lambda: check_boundaries([5], 5), r"no group to predict \(K = 0\)"),
    (lambda: check_boundaries([-1, 2, 5], 5), "n_0 = m - 1 >= 0.*got n_0 = -1"),
    (lambda: check_boundaries([1.0, 5.0], 5), "must hold integers, got dtype float32"),
    (lambda: check_boundaries(torch.tensor([[1, 3, 5], [1, 5, 5]]), 5), "sample 1's GVP boundaries"),
    (lambda: check_boundaries(torch.zeros(2, 2, 2, dtype=torch.long), 5), r"K \+ 1 integers.*shape \[2, 2, 2\]"),
    (lambda: check_order([1, 2, 3, 4, 5], 5), "holds 1..5.*0-based.*0..4.*subtract 1"),
    (lambda: check_order([0, 1, 1, 3, 4], 5), r"not a permutation of 0..4: \[1\] repeated, \[2\] missing"),
    (lambda: check_order([0, 1, 2, 3], 5), r"T = 5 token indices.*got shape \[4\]"),
    (lambda: check_order([0, 1, 2, 3, 9], 5), r"holds \[9\], outside 0..4"),
    (lambda: check_order(torch.tensor([[0, 1, 2], [0, 0, 2]]), 3), "sample 1's GVP order"),
    (lambda: gvp_masks(2, 5, [4, 3, 2, 1, 0], [1, 3]), "must end at n_K = T = 5"),
    (lambda: gvp_masks(2, 5, None, [[1, 3, 5]]), "gvp_masks_batched takes"),
    (lambda: gvp_masks_batched(2, 5, torch.arange(5), [1, 3, 5]), r"takes orders \[B, 5\]"),
    (lambda: gvp_masks_batched(2, 5, torch.arange(5).expand(3, 5), torch.tensor([[1, 3, 5]] * 2)),
     "one row per order: 3 orders, 2 rows"),
    (lambda: gvp_masks(-1, 5, None, [1, 5]), "S >= 0.*T >= 1"),
    (lambda: fixed_length_boundaries(5, 7), "K = 7 groups.*at most T"),
    (lambda: fixed_length_boundaries(5, 3, n0=3), "T - n0 = 2 tokens.*K = 3 groups"),
    (lambda: random_length_boundaries(5, 5, torch.Generator()), r"1..T-1 = 1..4.*K must be in 1..4, got K = 5"),
    (lambda: mixed_length_boundaries(5, 0, torch.Generator()), "K must be in 1..4, got K = 0"),
    (lambda: mixed_length_from_uniform(torch.rand(3, 4), 5, 2), r"uniforms \[B, T = 5\]"),
    (lambda: permute_tokens(torch.zeros(2, 7, 3), torch.arange(5).expand(2, 5), leading=1), "cannot permute"),
]


@pytest.mark.parametrize(("call", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises(GenrepError, match=message) as e:
        call()
    assert "\n" not in str(e.value)
