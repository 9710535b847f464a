"""Training batches whose order is a function of (seed, step) alone.

The global batch of step s is a slice of the permutation of epoch s // steps_per_epoch; rank r of
W takes the r-th 1/W of it. So the data a step sees does not depend on the number of processes,
on the data path (device-resident or streamed) or on where a run was resumed. The permutation is
drawn once per epoch on the CPU (about 1 ms for 50,000 images) so that CPU and CUDA runs see the
same order; all per-step indexing then happens on the device.

A plan may hold several independent *streams* (HybViT trains its classifier and its denoiser on
separate mini-batches): stream k of a step is a slice of its own permutation, so a step yields
``streams`` local batches back to back. Stream 0 is the single-stream order.

Two paths deliver the uint8 images:
- device-resident: the whole uint8 set lives on the training device; a batch is one index_select.
- streamed: a DataLoader gathers batches in worker processes into pinned memory and copies them
  asynchronously, for sets that do not fit on the device; a packed set (``packed:PATH``) is always streamed, its
  workers decoding the batch's images from the shards.
Augmentation always runs on the device, batched (see ``augment``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import GenrepError
from .augment import augment
from .random_inputs import PROGRESS_KIND, RANDOM_KINDS

# Keep a data set on the GPU while it uses at most this fraction of free memory.
RESIDENT_FRACTION = 0.25


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby steps get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class BatchPlan:
    """Which images each (step, rank) trains on."""

    def __init__(self, num_images: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 streams: int = 1):
        if global_batch % world:
            raise GenrepError(f"train.batch_size {global_batch} is not divisible by the {world} processes; "
                              f"choose a multiple of {world}")
        if num_images < global_batch:
            raise GenrepError(f"train.batch_size {global_batch} is larger than the {num_images} training "
                              f"images; choose at most {num_images}")
        self.num_images, self.global_batch, self.seed = num_images, global_batch, seed
        self.rank, self.world, self.streams = rank, world, streams
        self.local_batch = global_batch // world
        self.steps_per_epoch = num_images // global_batch  # the incomplete last batch is dropped
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def permutation(self, epoch: int, stream: int = 0) -> torch.Tensor:
        key = (epoch, stream)
        if key not in self._perms:
            parts = (self.seed, epoch, 0xDA7A) if stream == 0 else (self.seed, epoch, 0xDA7A, stream)
            g = torch.Generator().manual_seed(mix_seed(*parts))
            self._perms = {k: v for k, v in self._perms.items() if k[0] == epoch}  # keep one epoch
            self._perms[key] = torch.randperm(self.num_images, generator=g)
        return self._perms[key]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, where this rank's slice of step's global batch starts in the epoch's permutation)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return epoch, i * self.global_batch + self.rank * self.local_batch

    def indices(self, step: int) -> torch.Tensor:
        """This rank's images of ``step``: ``streams`` local batches back to back."""
        epoch, start = self.locate(step)
        return torch.cat([self.permutation(epoch, k)[start:start + self.local_batch] for k in range(self.streams)])


class _StepSampler(Sampler):
    def __init__(self, plan: BatchPlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.plan.indices(step).tolist()

    def __len__(self) -> int:
        return self.stop - self.start


class _Images(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, idx: list[int]):  # one gather per batch instead of one per image
        idx = torch.as_tensor(idx)
        return self.images[idx], self.labels[idx]


def _collate(batch):
    return batch


def fits_on_device(images: torch.Tensor, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # on the CPU the set is in memory already
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= RESIDENT_FRACTION * free


class TrainBatches:
    """Yields ``(step, uint8 images [s*b,C,H,W], labels [s*b])`` on the device for steps [start, stop),
    s = ``plan.streams`` local batches of b images back to back."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, plan: BatchPlan, device: torch.device,
                 resident: bool | None = None, num_workers: int = 2, decode: str = "auto"):
        from .packed import PackedImages, decode_on_device

        self.plan, self.device, self.num_workers = plan, device, num_workers
        self.decode_here = False   # a packed set's JPEGs decoded on the device, batched, not in the workers
        if isinstance(images, PackedImages):   # decoded per batch: never whole in memory
            self.decode_here = decode_on_device(images, decode, device)
            if resident:
                raise GenrepError(f"data.device_resident true cannot hold packed:{images.root} on the device; it is "
                                  f"read image by image: drop the key or set it to false")
            resident = False
        self.resident = fits_on_device(images, device) if resident is None else resident
        if self.resident:
            self.images, self.labels = images.to(device), labels.to(device)
        else:
            self.images, self.labels = images, labels

    def __call__(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if self.resident:
            plan, perm_epoch, perm = self.plan, -1, None
            for step in range(start, stop):
                epoch, i = plan.locate(step)
                if epoch != perm_epoch:  # one host-to-device copy per epoch, not per step
                    perm_epoch = epoch
                    perm = torch.stack([plan.permutation(epoch, k) for k in range(plan.streams)]).to(self.device)
                idx = perm[:, i:i + plan.local_batch].reshape(-1)
                yield step, self.images.index_select(0, idx), self.labels.index_select(0, idx)
            return
        from .packed import _Records, decode_batch

        source = _Records(self.images, self.labels) if self.decode_here else _Images(self.images, self.labels)
        loader = DataLoader(source, batch_sampler=_StepSampler(self.plan, start, stop),
                            collate_fn=_collate, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda" and not self.decode_here,
                            prefetch_factor=4 if self.num_workers else None, persistent_workers=False)
        for step, (x, y) in zip(range(start, stop), loader):
            x = decode_batch(x, self.images, self.device) if self.decode_here else x.to(self.device, non_blocking=True)
            yield step, x, y.to(self.device, non_blocking=True)


def make_views(images: torch.Tensor, views: dict[str, str], seed: int, step: int, start: int,
               total: int, streams: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Augment the local slice [start, start+b) of a global batch of ``total`` images, once per view.

    Each view's random parameters come from a generator seeded by (seed, step, view), drawn for the
    whole global batch, so any split of the batch across processes gets the same augmentation.
    ``images`` holds the local batches of every stream back to back; ``streams`` maps a view to the
    stream it is made from (default 0).
    """
    out = {}
    n = max((streams or {}).values(), default=0) + 1
    b = len(images) // n
    for i, (name, kind) in enumerate(views.items()):
        k = (streams or {}).get(name, 0)
        g = torch.Generator().manual_seed(mix_seed(seed, step, i, 0xA06))
        out[name] = augment(images[k * b:(k + 1) * b], kind, g, start=start, total=total)
    return out


def draw_random_inputs(spec: dict[str, tuple[str, object]], views: dict[str, torch.Tensor], seed: int, step: int,
                       start: int, total: int, *, progress: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-sample random inputs of a method (``spec``: name -> (kind, arg), see ``random_inputs``), drawn for
    the whole global batch of ``total`` and sliced to this process's [start, start+b).

    Like the augmentations, the draw depends on (seed, step, the entry's place in ``spec``) only, so a step's
    randomness does not depend on the number of processes or on gradient accumulation. It is drawn on the
    batch's device with a generator of that device: no copy. The ``progress`` kind is not drawn: every row holds
    ``progress``, the fraction of training done at this step (a loss term's schedule, as a tensor so that the
    compiled objective does not recompile when it changes).
    """
    out = {}
    for i, (name, (kind, arg)) in enumerate(spec.items()):
        like = views[arg] if kind == "normal" else next(iter(views.values()))
        if kind == PROGRESS_KIND:
            out[name] = torch.full((like.shape[0],), float(progress), device=like.device)
            continue
        if kind not in RANDOM_KINDS:
            raise ValueError(f"unknown random input kind {kind!r}; expected one of {', '.join(RANDOM_KINDS)}")
        g = torch.Generator(device=like.device).manual_seed(mix_seed(seed, step, i, 0x401))
        out[name] = RANDOM_KINDS[kind](arg, total, like, g)[start:start + like.shape[0]]
    return out
