"""nn/contrastive.py: NT-Xent against a plain float64 reading of eq. 3, its precision and distributed forms,
and the projection head."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from genrep.nn.contrastive import ProjectionHead, nt_xent


def eq3(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 3 written out term by term in float64: L_c = -1/(2N) sum_i [log(pos / den), both directions],
    where an anchor's denominator sums its own view's other rows and every row of the other view (its
    positive included)."""
    z1 = z1.double() / z1.double().norm(dim=1, keepdim=True)
    z2 = z2.double() / z2.double().norm(dim=1, keepdim=True)
    n = z1.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for a, b in ((z1, z2), (z2, z1)):
            pos = torch.exp(torch.dot(a[i], b[i]) / tau)
            den = torch.zeros((), dtype=torch.float64)
            for j in range(n):
                if j != i:
                    den = den + torch.exp(torch.dot(a[i], a[j]) / tau)
                den = den + torch.exp(torch.dot(a[i], b[j]) / tau)
            total = total + torch.log(pos / den)
    return -total / (2 * n)


def views(n=6, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_matches_eq3(tau):
    z1, z2 = views()
    assert abs(nt_xent(z1, z2, tau).item() - eq3(z1, z2, tau).item()) < 1e-12
    f1, f2 = z1.float(), z2.float()
    out = nt_xent(f1, f2, tau)
    assert out.dtype == torch.float32
    assert abs(out.item() - eq3(f1, f2, tau).item()) < 1e-6


def test_gradients_match_eq3():
    z1, z2 = views(seed=1)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    nt_xent(a1, a2, 0.2).backward()
    eq3(r1, r2, 0.2).backward()
    torch.testing.assert_close(a1.grad, r1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a2.grad, r2.grad, rtol=1e-10, atol=1e-12)
    t1, t2 = views(n=3, d=4, seed=2)
    assert torch.autograd.gradcheck(lambda x, y: nt_xent(x, y, 0.3),
                                    (t1.requires_grad_(), t2.requires_grad_()))


def test_scale_invariant_and_alignment_lowers_loss():
    z1, z2 = views(seed=3)
    torch.testing.assert_close(nt_xent(3.0 * z1, 0.01 * z2, 0.5), nt_xent(z1, z2, 0.5), rtol=1e-12, atol=0)
    # Orthonormal rows, each its own partner: cos 1 to the positive, 0 to the 2N - 2 negatives, a closed form.
    n, tau = 4, 0.2
    e = torch.eye(n, 8, dtype=torch.float64)
    closed = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * n - 2))
    assert abs(nt_xent(e, e.clone(), tau).item() - closed) < 1e-12
    r1, r2 = views(n=n, d=8, seed=4)
    assert nt_xent(e, e.clone(), tau) < nt_xent(r1, r2, tau)


def test_bf16_inputs_and_autocast_give_float32():
    z1, z2 = views(n=16, d=32, seed=5, dtype=torch.float32)
    ref = nt_xent(z1, z2, 0.1)
    low = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert abs(low.item() - ref.item()) < 2e-2 * abs(ref.item())
    # float32 arithmetic on the bf16-rounded values: the same as float32 inputs that happen to be those values
    torch.testing.assert_close(low, nt_xent(z1.bfloat16().float(), z2.bfloat16().float(), 0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = nt_xent(z1, z2, 0.1)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, ref)  # autocast is off inside, so the matmul is not done in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cold = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.01)  # logits up to 100: the diagonal fill stays finite
    assert torch.isfinite(cold)


def test_identical_rows_stay_finite():
    z = torch.ones(4, 3, requires_grad=True)
    loss = nt_xent(z, z, 0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert abs(loss.item() - math.log(2 * 4 - 1)) < 1e-5  # every key alike: uniform over the 2N - 1 others


@pytest.mark.parametrize("args, fragment", [
    ((torch.zeros(4, 3), torch.zeros(4, 2), 0.1), "same shape"),
    ((torch.zeros(4), torch.zeros(4), 0.1), "same shape"),
    ((torch.zeros(0, 3), torch.zeros(0, 3), 0.1), "B >= 1"),
    ((torch.ones(4, 3), torch.ones(4, 3), 0.0), "temperature"),
    ((torch.ones(4, 3), torch.ones(4, 3), float("nan")), "temperature"),
])
def test_refuses_bad_arguments(args, fragment):
    with pytest.raises(ValueError, match=fragment) as e:
        nt_xent(*args)
    assert "\n" not in str(e.value)


# -- two processes ---------------------------------------------------------------------------------------

WORLD, N_GLOBAL, TAU = 2, 8, 0.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_inputs():
    torch.manual_seed(0)
    head = ProjectionHead(6, hidden=16, out=5).double()
    x1, x2 = views(n=N_GLOBAL, d=6, seed=7)
    z1, z2 = views(n=N_GLOBAL, d=5, seed=8)
    return head, x1, x2, z1, z2


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        head, x1, x2, z1, z2 = _global_inputs()
        half = slice(rank * N_GLOBAL // WORLD, (rank + 1) * N_GLOBAL // WORLD)
        a1, a2 = z1[half].clone().requires_grad_(), z2[half].clone().requires_grad_()
        loss = nt_xent(a1, a2, TAU)
        loss.backward()
        head_loss = nt_xent(head(x1[half]), head(x2[half]), TAU)
        head_loss.backward()
        grads = {k: p.grad for k, p in head.named_parameters()}
        torch.save({"loss": loss.detach(), "g1": a1.grad, "g2": a2.grad, "head_loss": head_loss.detach(),
                    "head_grads": grads}, f"{out_dir}/rank{rank}.pt")
        # a rank that tears gloo down while its peer still exchanges gradients aborts the peer (SIGABRT,
        # "terminate called without an active exception"): both finish before either leaves
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    head, x1, x2, z1, z2 = _global_inputs()
    z1.requires_grad_(), z2.requires_grad_()
    loss = nt_xent(z1, z2, TAU)
    loss.backward()
    head_loss = nt_xent(head(x1), head(x2), TAU)
    head_loss.backward()

    # Each process returns the mean over its own 2B anchors; with equal halves the mean of the two is eq. 3's
    # mean over all 2N anchors.
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sum(r["head_loss"] for r in ranks) / WORLD, head_loss.detach(),
                               rtol=1e-12, atol=0)
    # The all-gather's backward sums onto process r every process's gradient w.r.t. half r's embeddings:
    # grad_r = sum_p d loss_p / d z_r. The global loss is (1/WORLD) sum_p loss_p, so its gradient w.r.t.
    # half r is grad_r / WORLD: the same 1/WORLD that DDP applies when it averages parameter gradients over
    # the processes.
    for r, got in enumerate(ranks):
        half = slice(r * N_GLOBAL // WORLD, (r + 1) * N_GLOBAL // WORLD)
        torch.testing.assert_close(got["g1"] / WORLD, z1.grad[half], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got["g2"] / WORLD, z2.grad[half], rtol=1e-10, atol=1e-14)
    # End to end through a head with the same weights on both processes: DDP's average of the parameter
    # gradients is the single process's gradient on the global batch.
    for k, p in head.named_parameters():
        averaged = sum(r["head_grads"][k] for r in ranks) / WORLD
        torch.testing.assert_close(averaged, p.grad, rtol=1e-10, atol=1e-14)


# -- projection head -------------------------------------------------------------------------------------

def test_projection_head_shapes_params_flops():
    head = ProjectionHead(48, hidden=32, out=16)
    assert isinstance(head.norm, torch.nn.LayerNorm)
    x = torch.randn(5, 48)
    assert head(x).shape == (5, 16)
    assert head(torch.randn(2, 3, 48)).shape == (2, 3, 16)
    # fc1 weight + bias, LayerNorm weight + bias, fc2 weight + bias
    assert sum(p.numel() for p in head.parameters()) == 48 * 32 + 32 + 2 * 32 + 32 * 16 + 16
    with FlopCounterMode(display=False) as counter:
        head(x)
    assert counter.get_total_flops() == 5 * head.flops() == 5 * 2 * (48 * 32 + 32 * 16)
    paper = ProjectionHead(384)
    assert (paper.hidden, paper.out) == (1024, 64)  # GCRL section 4.1, CIFAR


def test_projection_head_refuses_bad_sizes():
    for kwargs in ({"dim": 0}, {"dim": 8, "hidden": -1}, {"dim": 8, "out": 2.5}):
        with pytest.raises(ValueError, match="positive integer"):
            ProjectionHead(**kwargs)
