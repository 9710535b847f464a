"""torch.distributed set-up for torchrun: NCCL on CUDA, gloo on the CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before any process group: see init_distributed)

from ..devices import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process.

    ``torch.distributed.nn`` is imported (at the top of this module) before the group exists: its functions take
    ``group=group.WORLD`` as a default argument, so a first import after ``init_process_group`` (DDP's
    construction does one) would hold the group for the life of the interpreter. ``cleanup`` could then not free
    it: its gloo worker threads outlived ``destroy_process_group`` and could drop their last work (tensors with
    Python objects) while the interpreter was finalizing, which aborts the process ("terminate called without an
    active exception", seen on a loaded machine)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(), resolve_device(device_name)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a NaN seen by one process)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def cleanup(info: DistInfo, finished: bool = False) -> None:
    """Destroy the process group. After a finished run every rank first meets at a barrier, so none tears its
    connections down while another still has collective work in flight; after a failure there is no barrier, which
    a rank stuck in a collective would never reach (torchtitan destroys only on success for the same reason).
    Once nothing else holds the group (the caller has dropped its DDP wrapper: ``Trainer.close``), destroying it
    joins its worker threads here, while the interpreter is whole, not during its finalization."""
    if info.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def live_group_threads() -> list[str]:
    """The names of this process's threads that belong to a process group (gloo's worker and transport loops):
    none should be left once ``cleanup`` has run after a finished run."""
    import os

    names = []
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we listed it
            continue
    return sorted(n for n in names if "gloo" in n or "nccl" in n.lower())
