"""Throughput of the batched augmentations alone (images/s), on a real data set's training images.

Times ``augment(x, kind)`` the way the training loop calls it (a uint8 batch gathered from a random
permutation, the step's parameters drawn on the CPU for the whole batch), for each kind and batch size, and
``mix`` (Mixup/CutMix with soft targets, as the classifier's loss applies it, every batch mixed) on top of
the ``classifier`` kind. The data set's images are kept on the device, as the loop's device-resident path
does. On the CPU set the threads with --threads (the loop uses torch's default). Each batch is timed on its
own: images/s is the batch size over the median batch time, which a machine shared with other jobs disturbs
least; the mean is reported beside it.

    python benchmarks/augment_throughput.py --data npz:../shared/data/cifar10-jpeg.npz --batch-sizes 128,512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from genrep.data.augment import AUGMENTATIONS, augment
from genrep.data.datasets import load_dataset
from genrep.data.mixing import mix
from genrep.errors import GenrepError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the throughput benchmark's device helpers
from throughput import _device_name, _sync  # noqa: E402

MIXED = "classifier+mix"


def measure(images: torch.Tensor, labels: torch.Tensor, num_classes: int, kind: str, batch: int, steps: int,
            warmup: int) -> dict:
    dev = images.device
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(dev)
    times = []
    for step in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        start = (step * batch) % (len(images) - batch + 1)
        idx = order[start:start + batch]
        g = torch.Generator().manual_seed(step)
        out = augment(images.index_select(0, idx), kind.split("+")[0], g)
        if kind == MIXED:
            u = torch.rand(4, generator=g).to(dev)
            u[0] = 0.0  # every batch mixed; u[1] picks CutMix or Mixup as training would
            lam = torch.rand(2, generator=g).to(dev)
            out, _ = mix(out, labels.index_select(0, idx), num_classes, u, lam[0], lam[1], mix_prob=1.0,
                         cutmix_share=0.5)
        _sync(dev)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"kind": kind, "batch": batch, "device": _device_name(dev), "threads": torch.get_num_threads(),
            "images_per_s": batch / median, "ms_per_batch": 1000 * median,
            "mean_images_per_s": batch * len(times) / sum(times), "shape": list(images.shape[1:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", help="a genrep data set name (npz:PATH, folder:PATH, cifar10, ...)")
    p.add_argument("--kinds", default=f"weak,strong,classifier,{MIXED}",
                   help=f"comma-separated, from {', '.join(AUGMENTATIONS)}, {MIXED}")
    p.add_argument("--batch-sizes", default="128,512")
    p.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    try:
        kinds = args.kinds.split(",")
        for kind in kinds:
            if kind not in (*AUGMENTATIONS, MIXED):
                raise GenrepError(f"unknown kind {kind!r}; choose from {', '.join((*AUGMENTATIONS, MIXED))}")
        if args.threads:
            torch.set_num_threads(args.threads)
        dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                           else "cpu" if args.device == "auto" else args.device)
        data = load_dataset(args.data, "train", download=False)
        images, labels = data.images.to(dev), data.labels.to(dev)
        rows = []
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            if batch > len(images):
                raise GenrepError(f"batch {batch} is larger than the {len(images)} images of {args.data}")
            for kind in kinds:
                row = {**measure(images, labels, len(data.classes), kind, batch, args.steps, args.warmup),
                       "data": data.name}
                rows.append(row)
                print(f"{row['data']} {kind:>15} batch {batch:>5} on {row['device']} ({row['threads']} threads): "
                      f"{row['images_per_s']:8.0f} images/s  {row['ms_per_batch']:8.2f} ms/batch (median; mean "
                      f"{row['mean_images_per_s']:.0f} images/s)", flush=True)
    except GenrepError as e:
        print(f"augment_throughput: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
