"""Evaluation across processes: ``torchrun --nproc_per_node N -m genrep.cli probe|evaluate|sweep RUN``.

Every rank runs the same evaluation. What scales with the data is split: the batches of feature extraction, of
sampling for FID/KID/IS, of the likelihood and of completion (of the evaluation's batch size, in order) are dealt out
round robin, batch j to rank j mod N, so each batch holds exactly the images it holds in one process, and the
results are gathered back in order on every rank. A batch that draws noise draws it from its own generator, seeded
by (eval.seed, the batch), so it draws the same numbers on whichever rank computes it. On the CPU that makes every
number one process's, bit for bit (the same kernels on the same shapes; tested over two launchers); on GPUs as
equal as two runs of one process are. What follows (head training, the metrics) runs on every rank on the same
gathered tensors, so every rank holds the same results without sending them; rank 0 alone holds the run's lock and
writes (``genrep.io`` skips writes on the other ranks), and a feature cache rank 0 finds is broadcast from it, so
ranks on nodes without a shared file system still agree. The energy histograms' samples are the generation protocol's
draws, split alike. Not split yet (every rank computes them whole): the heads' training, FID's reference features of
the training set and the OOD scores' own passes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from ..train.dist import DistInfo, cleanup, init_distributed

_ACTIVE: list[tuple[DistInfo, torch.device]] = []
BROADCAST_BYTES = 64 << 20  # a float16 feature file crosses to the other ranks in blocks of about this size


def active() -> tuple[DistInfo, torch.device] | None:
    """The evaluation's process group and this rank's device, while ``evaluation_group`` is open with N > 1."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def evaluation_group(device_name: str) -> Iterator[DistInfo]:
    """Join torchrun's process group for an evaluation (a single process: nothing to join); non-main ranks write
    nothing while it is open."""
    from .. import io

    info, device = init_distributed(device_name)
    if not info.enabled:
        yield info
        return
    _ACTIVE.append((info, device))
    previous = io.set_writer(info.main)
    finished = False
    try:
        yield info
        finished = True
    finally:
        io.set_writer(previous)
        _ACTIVE.pop()
        cleanup(info, finished)


def rank_device(device_name: str) -> torch.device:
    """The device this rank evaluates on: torchrun's local GPU, or ``device_name`` resolved."""
    group = active()
    if group is not None:
        return group[1]
    from ..devices import resolve_device

    return resolve_device(device_name)


def my_batches(n: int, batch_size: int) -> list[int]:
    """The starts of the batches this rank extracts (all of them in one process)."""
    starts = list(range(0, n, batch_size))
    group = active()
    if group is None:
        return starts
    info, _ = group
    return starts[info.rank::info.world]   # a rank past the last batch gets none, and gathers the others


Shapes = Callable[[], list[tuple[tuple[int, ...], torch.dtype]]]


def gathered(n: int, batch_size: int, local: Iterator[list[torch.Tensor]],
             shapes: Shapes) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Every batch of ``n`` rows as (start, its tensors on the CPU), in order, on every rank. ``local`` yields this
    rank's batches (``my_batches``) in order; the others' arrive round by round (one batch from each rank per
    round), so no rank ever holds more than one round: features too large for memory go to a file as they come.
    ``shapes()``: (row shape, dtype) of each tensor, asked only of a rank with no batch to take a shape from."""
    starts = list(range(0, n, batch_size))
    group = active()
    if group is None:
        yield from zip(starts, local)
        return
    info, device = group
    like = None
    for first in range(0, len(starts), info.world):
        outs = next(local) if first + info.rank < len(starts) else None
        if like is None:
            like = [(tuple(t.shape[1:]), t.dtype) for t in outs] if outs is not None else shapes()
        received = []
        for i, (shape, dtype) in enumerate(like):
            padded = torch.zeros((batch_size, *shape), dtype=dtype, device=device)
            if outs is not None:
                padded[:len(outs[i])] = outs[i].to(device)
            parts = [torch.empty_like(padded) for _ in range(info.world)]
            dist.all_gather(parts, padded)
            received.append(parts)
        for r, start in enumerate(starts[first:first + info.world]):
            size = min(batch_size, n - start)
            yield start, [parts[r][:size].cpu() for parts in received]


def broadcast_from_main(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Rank 0's tensor (or None) on every rank: a cache entry rank 0 found stands for all. A float16 feature file
    is sent in blocks of rows into a file of each rank's own (``feature_store``), never whole through memory."""
    from .feature_store import anonymous_array

    group = active()
    if group is None:
        return tensor
    info, device = group
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]
    header = torch.full((10,), -1, dtype=torch.int64, device=device)
    if info.main and tensor is not None:
        if tensor.dim() > 8 or tensor.dtype not in dtypes:
            raise ValueError(f"cannot broadcast a {tensor.dtype} tensor of {tensor.dim()} dimensions")
        header[0], header[1] = dtypes.index(tensor.dtype), tensor.dim()
        header[2:2 + tensor.dim()] = torch.tensor(tensor.shape)
    dist.broadcast(header, src=0)
    if int(header[0]) < 0:
        return None
    shape = tuple(int(s) for s in header[2:2 + int(header[1])])
    dtype = dtypes[int(header[0])]
    if dtype != torch.float16:   # float16 is a feature file's (feature_store.is_mapped)
        buf = tensor.to(device) if info.main else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(buf, src=0)
        return buf.cpu()
    out = tensor if info.main else anonymous_array(shape)
    step = max(1, BROADCAST_BYTES // max(1, 2 * math.prod(shape[1:])))
    for s in range(0, shape[0], step):
        buf = out[s:s + step].to(device) if info.main else torch.empty((min(step, shape[0] - s), *shape[1:]),
                                                                      dtype=dtype, device=device)
        dist.broadcast(buf, src=0)
        if not info.main:
            out[s:s + len(buf)] = buf.cpu()
    return out


def is_main() -> bool:
    group = active()
    return group is None or group[0].main


def batch_generator(seed: int, start: int, batch_size: int) -> torch.Generator:
    """The CPU generator of the batch of a split that starts at ``start``: one per batch, so a batch draws the same
    numbers on whichever rank computes it (sampling, the likelihood's noise, completions)."""
    from ..data.batches import mix_seed

    return torch.Generator().manual_seed(mix_seed(seed, start // batch_size, 0xE7A1))


def map_batches(n: int, batch_size: int, fn, tail: tuple[int, ...], dtype: torch.dtype, *, progress: bool = False,
                desc: str = "batches") -> torch.Tensor:
    """``fn(start, size)`` -> ``[size, *tail]`` for this rank's batches of ``n`` rows (every batch in one process),
    gathered in order on every rank, on the CPU."""
    return map_batch_sets(n, batch_size, lambda i, size: [fn(i, size)], [(tail, dtype)], progress=progress,
                          desc=desc)[0]


def map_batch_sets(n: int, batch_size: int, fn, like: list[tuple[tuple[int, ...], torch.dtype]], *,
                   progress: bool = False, desc: str = "batches") -> list[torch.Tensor]:
    """``fn(start, size)`` -> one ``[size, *tail]`` tensor per (tail, dtype) of ``like``, as ``map_batches``."""
    starts = my_batches(n, batch_size)
    if progress and is_main():
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=desc, unit="batch", leave=False, disable=None)
    outs = [torch.empty((n, *tail), dtype=dtype) for tail, dtype in like]
    local = ([t.cpu() for t in fn(i, min(batch_size, n - i))] for i in starts)
    for start, parts in gathered(n, batch_size, local, lambda: like):
        for out, rows in zip(outs, parts):
            out[start:start + len(rows)] = rows
    return outs


def all_max(value: float) -> float:
    """The largest of every rank's ``value``."""
    group = active()
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=group[1])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
