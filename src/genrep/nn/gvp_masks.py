"""GVP's universal causal masks (section 4.3, eq. 9, 11, 12) and its group segmentations (section 3.2, appendix B).

Layout: the sequence is ``[y_1 .. y_S, x_1 .. x_T]``, the S condition tokens first, then the T image tokens in
their original (raster) order. A mask is bool ``[S+T, S+T]``; row i is the attending token, and True means it
may attend to column j (the paper's 0; False is its -inf), as ``attention.Attention(mask=)`` takes it: ``M_h``
for the content stream, ``M_g`` for the query stream (whose keys and values come from the content stream).

Conventions:
- ``order`` is z, **0-based**: ``order[p]`` is the index (0..T-1) of the image token at factorisation position p,
  i.e. the paper's ``z_{p+1} - 1``. The ``permutation`` random kind (data/random_inputs.py) draws exactly this.
- ``boundaries`` are n_0 < n_1 < ... < n_K = T, K + 1 integers: the first n_0 tokens of z are context (G_0; the
  paper's m - 1 = n_0, and 0 is allowed: no context), and group k >= 1 holds the factorisation positions
  n_{k-1} + 1 .. n_k (1-based), the tokens predicted together at step k. The ``boundaries`` random kind draws
  the K cut points n_0 .. n_{K-1} of appendix B's random length, without the final T:
  :func:`boundaries_from_cuts` appends it.

The masks. Every token gets a level: 0 for the condition tokens and the context G_0 (eq. 11's "j <= S + m - 1",
f(t) = 0), k for a token of group k. Then eq. 11, with eq. 12's relabelling by z, is exactly

    M_h[i, j] = level[j] <= level[i]                       (own group and earlier groups)
    M_g[i, j] = level[j] <  level[i]  or  level[j] == 0    (strictly earlier groups)

What follows from eq. 11, as its worked examples (appendix A, eq. 16, 17, 19) print it:
- every row, condition rows included, attends to every condition and context token: condition tokens attend
  to the condition tokens *and the context* (x_{G_0} is part of the condition; with n_0 = 0 that is the
  condition tokens only, eq. 9), and to no target token;
- context rows attend to condition and context tokens only, themselves included, in both streams (their
  query-stream rows are never read by the loss);
- a target token of group k attends in M_h to groups <= k (itself included) and in M_g to groups < k, so
  the M_g diagonal is False exactly on the target tokens;
- with S = 0 and n_0 = 0 the first group's query rows attend to nothing (SDPA then returns NaN there):
  a method needs a condition token or n_0 >= 1 (appendix B's random and mixed lengths always have n_0 >= 1).

In factorisation order (tokens permuted by z, :func:`permute_tokens`) the levels are non-decreasing, so the
masks are block-causal and the same for every sample with the same boundaries (:func:`factorisation_masks`);
the original-order masks are those conjugated by the permutation (eq. 12).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import GenrepError

Boundaries = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


# ---------------------------------------------------------------------------------------------- checks

def _show(values: Sequence[int]) -> str:
    values = list(values)
    if len(values) <= 12:
        return str(values)
    return "[" + ", ".join(map(str, values[:6])) + ", ..., " + ", ".join(map(str, values[-3:])) + "]"


def _int_tensor(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise GenrepError(f"{what} must hold integers, got dtype {str(t.dtype).removeprefix('torch.')}")
    return t.long()


def check_boundaries(boundaries: Boundaries, T: int) -> None:
    """Raise a one-line GenrepError unless ``boundaries`` is n_0 < n_1 < ... < n_K = T with n_0 >= 0 and
    1 <= K <= T: K + 1 integers, or ``[B, K + 1]`` (one segmentation per sample)."""
    b = _int_tensor(boundaries, "GVP boundaries")
    if b.ndim not in (1, 2) or b.shape[-1] == 0:
        raise GenrepError(f"GVP boundaries n_0 < n_1 < ... < n_K = T are K + 1 integers (or [B, K + 1]), got "
                          f"shape {list(b.shape)}")
    K = b.shape[-1] - 1
    if K > T:
        raise GenrepError(f"GVP boundaries give K = {K} groups to predict but there are only T = {T} tokens; "
                          f"every group needs a token, so K must be at most T")
    if K == 0:
        raise GenrepError(f"GVP boundaries {_show(b.reshape(-1)[:1].tolist())} leave no group to predict (K = 0); "
                          f"give n_0 < ... < n_K = {T} with K >= 1")
    rows = b.reshape(-1, K + 1)
    bad_end = rows[:, -1] != T
    bad_start = rows[:, 0] < 0
    bad_step = (rows[:, 1:] <= rows[:, :-1]).any(1)
    bad = bad_end | bad_start | bad_step
    if not bad.any():
        return
    r = int(bad.nonzero()[0, 0])
    row = rows[r].tolist()
    where = f"sample {r}'s " if b.ndim == 2 else ""
    if bad_end[r]:
        raise GenrepError(f"{where}GVP boundaries must end at n_K = T = {T}, got {_show(row)} ending at {row[-1]} "
                          f"(cut points drawn by the 'boundaries' random kind leave T out: boundaries_from_cuts "
                          f"appends it)")
    if bad_start[r]:
        raise GenrepError(f"{where}GVP boundaries start with n_0 = m - 1 >= 0 context tokens, got n_0 = {row[0]} "
                          f"in {_show(row)}")
    k = next(k for k in range(1, K + 1) if row[k] <= row[k - 1])
    raise GenrepError(f"{where}GVP boundaries must be strictly increasing (n_0 < n_1 < ... < n_K = T: no empty "
                      f"group), got {_show(row)} with n_{k} = {row[k]} not above n_{k - 1} = {row[k - 1]}")


def check_order(order: torch.Tensor | Sequence[int], T: int) -> None:
    """Raise a one-line GenrepError unless ``order`` is a 0-based permutation of 0..T-1 (or ``[B, T]`` of them)."""
    z = _int_tensor(order, "a GVP order")
    if z.ndim not in (1, 2) or z.shape[-1] != T:
        raise GenrepError(f"a GVP order is T = {T} token indices, a permutation of 0..{T - 1} (or [B, {T}] of "
                          f"them), got shape {list(z.shape)}")
    rows = z.reshape(-1, T)
    ok = (rows.sort(1).values == torch.arange(T, device=z.device)).all(1)
    if ok.all():
        return
    r = int((~ok).nonzero()[0, 0])
    row = rows[r]
    where = f"sample {r}'s " if z.ndim == 2 else ""
    if torch.equal(row.sort().values, torch.arange(1, T + 1, device=z.device)):
        raise GenrepError(f"{where}GVP order {_show(row.tolist())} holds 1..{T}; orders are 0-based here, a "
                          f"permutation of 0..{T - 1}: subtract 1 from the paper's z")
    outside = sorted({v for v in row.tolist() if not 0 <= v < T})
    if outside:
        raise GenrepError(f"{where}GVP order {_show(row.tolist())} holds {_show(outside)}, outside 0..{T - 1}; an "
                          f"order is a permutation of 0..{T - 1}")
    counts = torch.bincount(row, minlength=T)
    repeated = (counts > 1).nonzero().flatten().tolist()
    missing = (counts == 0).nonzero().flatten().tolist()
    raise GenrepError(f"{where}GVP order {_show(row.tolist())} is not a permutation of 0..{T - 1}: "
                      f"{_show(repeated)} repeated, {_show(missing)} missing")


def _check_sizes(S: int, T: int) -> None:
    if S < 0 or T < 1:
        raise GenrepError(f"GVP masks need S >= 0 condition tokens and T >= 1 image tokens, got S = {S}, T = {T}")


def _boundaries_tensor(boundaries: Boundaries, T: int, device: torch.device | None) -> torch.Tensor:
    check_boundaries(boundaries, T)
    return _int_tensor(boundaries, "GVP boundaries").to(device)


# ----------------------------------------------------------------------------------------------- masks

def _levels(S: int, T: int, orders: torch.Tensor | None, bounds: torch.Tensor) -> torch.Tensor:
    """[B, S+T] long: 0 for condition and context tokens, k for a token of group k, in original token order."""
    B = bounds.shape[0] if orders is None else orders.shape[0]
    t = torch.arange(1, T + 1, device=bounds.device).expand(B, T).contiguous()
    # position t (1-based) is in group #{k : n_k < t}: 0 for t <= n_0, k for n_{k-1} < t <= n_k
    group = torch.searchsorted(bounds.expand(B, -1).contiguous(), t)
    if orders is not None:  # the token at position p is x_{order[p]}: send each position's group to its token
        group = torch.empty_like(group).scatter_(1, orders, group)
    return torch.cat([group.new_zeros(B, S), group], 1)


def _masks(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    row, col = levels[:, :, None], levels[:, None, :]
    return col <= row, (col < row) | (col == 0)


def token_levels(S: int, T: int, orders: torch.Tensor | None, boundaries: torch.Tensor) -> torch.Tensor:
    """Each token's level, long ``[B, S+T]`` (0: condition and context, k: group k), unchecked: the training step's
    form (no host sync, so it compiles into one graph). ``orders`` ``[B, T]`` puts the levels in original token order;
    None gives factorisation order, where they are non-decreasing. ``boundaries``: ``[B or 1, K+1]``."""
    return _levels(S, T, orders, boundaries.reshape(-1, boundaries.shape[-1]))


def masks_from_levels(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_h, M_g), bool ``[B, N, N]``, from :func:`token_levels`: eq. 11 as levels state it (see the module doc)."""
    return _masks(levels)


def gvp_masks_batched(S: int, T: int, orders: torch.Tensor, boundaries: Boundaries, *,
                      validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_h, M_g), each bool ``[B, S+T, S+T]`` in original token order, for ``orders`` (long ``[B, T]``, 0-based)
    and ``boundaries`` (``[B, K+1]``, one segmentation per sample, or K + 1 integers shared by all), on the
    orders' device, with no loop over the batch. For ``Attention(mask=)`` add the head axis: ``M[:, None]``.
    ``validate=False`` skips the input checks (they synchronise with the device)."""
    _check_sizes(S, T)
    orders = torch.as_tensor(orders)
    if validate:
        check_order(orders, T)
        if orders.ndim != 2:
            raise GenrepError(f"gvp_masks_batched takes orders [B, {T}], got shape {list(orders.shape)}; "
                              f"gvp_masks builds one sample's masks")
        bounds = _boundaries_tensor(boundaries, T, orders.device)
        if bounds.ndim == 2 and bounds.shape[0] not in (1, orders.shape[0]):
            raise GenrepError(f"GVP boundaries [B, K + 1] must have one row per order: {orders.shape[0]} orders, "
                              f"{bounds.shape[0]} rows")
    else:
        bounds = torch.as_tensor(boundaries, device=orders.device).long()
    return _masks(_levels(S, T, orders.long(), bounds.reshape(-1, bounds.shape[-1])))


def gvp_masks(S: int, T: int, order: torch.Tensor | Sequence[int] | None,
              boundaries: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_h, M_g), each bool ``[S+T, S+T]``, of eq. 11 relabelled by z (eq. 12), in original token order.

    ``order``: z, a permutation of 0..T-1 (0-based; None: the identity, eq. 9/11 as printed);
    ``boundaries``: n_0 < ... < n_K = T. On the device of ``order`` (or of ``boundaries``) if a tensor."""
    _check_sizes(S, T)
    device = order.device if isinstance(order, torch.Tensor) else (
        boundaries.device if isinstance(boundaries, torch.Tensor) else None)
    bounds = _boundaries_tensor(boundaries, T, device)
    if bounds.ndim != 1:
        raise GenrepError(f"gvp_masks builds one sample's masks from K + 1 boundaries, got shape "
                          f"{list(bounds.shape)}; gvp_masks_batched takes [B, K + 1]")
    orders = None
    if order is not None:
        check_order(order, T)
        orders = _int_tensor(order, "a GVP order").to(device)
        if orders.ndim != 1:
            raise GenrepError(f"gvp_masks takes one order of {T} indices, got shape {list(orders.shape)}; "
                              f"gvp_masks_batched takes [B, {T}]")
        orders = orders[None]
    M_h, M_g = _masks(_levels(S, T, orders, bounds[None]))
    return M_h[0], M_g[0]


def factorisation_masks(S: int, T: int, boundaries: Boundaries) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_h, M_g) in factorisation order (condition tokens first, then the image tokens permuted by z): block-causal,
    content mask including the own group, query mask strictly earlier groups (condition and context always
    visible); the same for every sample with these boundaries. ``[S+T, S+T]`` for K + 1 boundaries, ``[B, S+T,
    S+T]`` for ``[B, K+1]``. ``gvp_masks`` of an order is this conjugated by the permutation (eq. 12)."""
    _check_sizes(S, T)
    device = boundaries.device if isinstance(boundaries, torch.Tensor) else None
    bounds = _boundaries_tensor(boundaries, T, device)
    M_h, M_g = _masks(_levels(S, T, None, bounds.reshape(-1, bounds.shape[-1])))
    return (M_h[0], M_g[0]) if bounds.ndim == 1 else (M_h, M_g)


# ------------------------------------------------------------------------------------------ permutation

def _gather(x: torch.Tensor, index: torch.Tensor, leading: int, dim: int) -> torch.Tensor:
    B, T = index.shape
    if dim < 1 or dim >= x.ndim or x.shape[0] != B or x.shape[dim] != leading + T:
        raise GenrepError(f"cannot permute {leading} leading + {T} tokens along dim {dim} of a tensor of shape "
                          f"{list(x.shape)} with orders [{B}, {T}]")
    full = torch.cat([torch.arange(leading, device=index.device).expand(B, leading), index + leading], 1)
    shape = [B] + [1] * (x.ndim - 1)
    shape[dim] = leading + T
    return x.gather(dim, full.view(shape).expand(x.shape))


def permute_tokens(x: torch.Tensor, order: torch.Tensor, *, leading: int = 0, dim: int = 1) -> torch.Tensor:
    """x (``[B, leading + T, ...]`` along ``dim``) in factorisation order: position p gets token ``order[b, p]``;
    the first ``leading`` tokens (condition tokens) stay first. Masks permute by both axes:
    ``permute_tokens(permute_tokens(M, z, leading=S, dim=1), z, leading=S, dim=2)``."""
    return _gather(x, order.long(), leading, dim)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """z' of eq. 12 on the image tokens: ``inverse_order(z)[b, t]`` is the factorisation position of token t."""
    order = order.long()
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def unpermute_tokens(x: torch.Tensor, order: torch.Tensor, *, leading: int = 0, dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`permute_tokens`: x from factorisation order back to original token order."""
    return _gather(x, inverse_order(order), leading, dim)


# -------------------------------------------------------------------------------------------- segmentation

def boundaries_from_cuts(cuts: torch.Tensor, T: int) -> torch.Tensor:
    """n_0 < ... < n_{K-1} (``[..., K]``, e.g. the ``boundaries`` random kind's draw) with n_K = T appended:
    ``[..., K + 1]``, what the masks take."""
    cuts = _int_tensor(cuts, "GVP cut points")
    return torch.cat([cuts, cuts.new_full((*cuts.shape[:-1], 1), T)], -1)


def fixed_length_boundaries(T: int, K: int, n0: int | None = None) -> torch.Tensor:
    """Fixed length (section 3.2): n_i = floor((i + 1) T / (K + 1)), i = 0..K, K + 1 groups of about T / (K + 1)
    tokens, G_0 the context (K = T gives n_0 = 0 and one token per group: eq. 9's plain autoregression). With
    ``n0``, G_0 holds n0 tokens and the other T - n0 are cut into K groups of about equal size:
    n_k = n0 + floor(k (T - n0) / K). Long ``[K + 1]``."""
    if K < 1:
        raise GenrepError(f"a GVP segmentation needs K >= 1 groups to predict, got K = {K}")
    if n0 is None:
        bounds = [(i + 1) * T // (K + 1) for i in range(K + 1)]
    else:
        if not 0 <= n0 < T:
            raise GenrepError(f"n0 = {n0} context tokens must be in 0..T-1 = 0..{T - 1}")
        if K > T - n0:
            raise GenrepError(f"cannot cut the T - n0 = {T - n0} tokens after the context into K = {K} groups; "
                              f"K must be at most {T - n0}")
        bounds = [n0] + [n0 + k * (T - n0) // K for k in range(1, K + 1)]
    check_boundaries(bounds, T)
    return torch.tensor(bounds, dtype=torch.long)


def _check_random(T: int, K: int, what: str) -> None:
    if not 1 <= K <= T - 1:
        raise GenrepError(f"{what} draws n_0 < ... < n_{{K-1}} from 1..T-1 = 1..{T - 1}, so K must be in "
                          f"1..{T - 1}, got K = {K}")


def random_length_boundaries(T: int, K: int, generator: torch.Generator) -> torch.Tensor:
    """Random length, appendix B's code: the first K of a random permutation of 1..T-1, sorted, as
    n_0 .. n_{K-1}; then n_K = T. Long ``[K + 1]`` on the generator's device.

    In training the loop draws the same distribution for the global batch: declare ``("boundaries", (T, K))``
    in ``random_inputs()`` and pass the draw through :func:`boundaries_from_cuts` (the kind permutes by float64
    keys rather than ``randperm``, so the two differ draw by draw, not in distribution)."""
    _check_random(T, K, "random-length segmentation")
    device = generator.device
    integers = torch.arange(1, T, device=device)
    shuffled = integers[torch.randperm(T - 1, generator=generator, device=device)]
    cuts = shuffled[:K].sort().values
    return boundaries_from_cuts(cuts, T)


def _mixed_end(p: torch.Tensor, T: int, K: int) -> torch.Tensor:
    # n_{K-1} = round(p T), held in K..T-1: K - 1 cut points need 1..n-1 to hold them, and n_{K-1} < n_K = T
    # (appendix B's code leaves both unchecked; p outside [K/T, 1 - 1/T] is rare for mean 0.5, std 0.1)
    return torch.round(p * T).clamp(K, T - 1).long()


def mixed_length_boundaries(T: int, K: int, generator: torch.Generator, mean: float = 0.5,
                            std: float = 0.1) -> torch.Tensor:
    """Mixed length (section 3.2, the paper's default with K = 20), appendix B's code: p ~ N(mean, std),
    n_{K-1} = round(p T) (held in K..T-1), n_0 .. n_{K-2} the first K - 1 of a random permutation of 1..n_{K-1}-1,
    sorted; then n_K = T. Long ``[K + 1]`` on the generator's device. :func:`mixed_length_from_uniform` is the
    batched form for the loop's draws."""
    _check_random(T, K, "mixed-length segmentation")
    device = generator.device
    p = torch.normal(mean, std, (1,), generator=generator, device=device, dtype=torch.float64)
    n = int(_mixed_end(p, T, K))
    integers = torch.arange(1, n, device=device)
    shuffled = integers[torch.randperm(n - 1, generator=generator, device=device)]
    cuts = shuffled[:K - 1].sort().values
    return boundaries_from_cuts(torch.cat([cuts, cuts.new_tensor([n])]), T)


def mixed_length_from_uniform(u: torch.Tensor, T: int, K: int, mean: float = 0.5,
                              std: float = 0.1) -> torch.Tensor:
    """Mixed-length boundaries ``[B, K + 1]`` from uniforms ``u`` ``[B, T]`` in [0, 1), vectorised: what a method
    computes from the loop's ``("uniform", (T,))`` draw, so the compiled objective holds no random op.
    ``u[:, 0]`` gives p = mean + std * Phi^-1(u) (the normal draw), ``u[:, 1:]`` are keys whose smallest K - 1
    among the first n_{K-1} - 1 pick the cut points: the same distribution as :func:`mixed_length_boundaries`
    (float32 keys may tie, which changes which subset, never its validity)."""
    _check_random(T, K, "mixed-length segmentation")
    if u.ndim != 2 or u.shape[1] != T:
        raise GenrepError(f"mixed_length_from_uniform takes uniforms [B, T = {T}], got shape {list(u.shape)}")
    p = mean + std * torch.special.ndtri(u[:, 0].double())
    n = _mixed_end(p, T, K)  # [B]
    keys = u[:, 1:].masked_fill(torch.arange(T - 1, device=u.device) >= (n - 1)[:, None], 2.0)
    cuts = (keys.argsort(1)[:, :K - 1] + 1).sort(1).values
    return boundaries_from_cuts(torch.cat([cuts, n[:, None]], 1), T)
