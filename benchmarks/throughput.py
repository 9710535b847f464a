"""Training throughput of a recipe: images/s, analytic model FLOPs and model-FLOPs utilisation.

Runs the real training step of genrep's loop (``Trainer._train_step``: augmentation on the device,
forward, backward, clipping, AdamW, EMA) on synthetic uint8 data of the recipe's shape, kept on the
device. A method whose image costs several forward passes (HybViT: a classification pass and a
diffusion pass, on separate mini-batches of ``batch`` images each) also reports image-passes/s. Modes:

- ``eager-fp32``: the plain path, fp32, no compilation (the baseline);
- ``fast``: bf16 autocast + torch.compile (CUDA only; the loop's fast path);
- ``compile-fp32``: fp32 + torch.compile (useful on the CPU).

On CUDA the default compares ``fast`` with ``eager-fp32`` in the same run, on the same card.
MFU = model FLOPs per second / the peak you pass with --peak-tflops (dense bf16 for the fast path;
the same peak is used for both modes so the numbers compare). Model FLOPs count matmuls only
(forward count x 3 for forward + backward), see genrep.nn.flops: analytic where the method has the
formula, else counted once with torch.utils.flop_counter (the row's ``flops_source`` says which).

Example (H100/H200):
    python benchmarks/throughput.py --recipe supervised-cifar10 --batch-sizes 128,1024,4096 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from genrep.config import parse_overrides, resolve_config
from genrep.data.datasets import ImageSet, describe_datasets
from genrep.errors import GenrepError
from genrep.methods import Method
from genrep.nn.flops import training_flops
from genrep.train.loop import Trainer

MODES = {
    "eager-fp32": {"train.precision": "fp32", "train.compile": False},
    "fast": {"train.precision": "bf16", "train.compile": True},
    "compile-fp32": {"train.precision": "fp32", "train.compile": True},
}


def synthetic_set(cfg, shape: str | None) -> ImageSet:
    """Random uint8 images of the recipe's data shape (no download, no disk)."""
    if shape:
        c, h, n_cls = (int(v) for v in shape.split(","))
    else:
        known = {r["name"]: r for r in describe_datasets()}
        if cfg.data.name not in known:
            raise GenrepError(f"data set {cfg.data.name} has no known shape; pass --shape C,H,CLASSES")
        r = known[cfg.data.name]
        c, h, n_cls = r["channels"], cfg.data.image_size or r["native_size"], r["num_classes"]
        if cfg.data.name == "digits" and cfg.data.image_size is None:
            h = 16
    n = 8192
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=g),
                    torch.randint(0, n_cls, (n,), generator=g), [str(i) for i in range(n_cls)], "synthetic")


def measure(recipe: str, overrides: dict, mode: str, batch: int, steps: int, warmup: int, shape: str | None,
            device: str) -> dict:
    total = warmup + steps
    cfg = resolve_config(recipe, {**overrides, **MODES[mode], "train.batch_size": batch, "train.steps": total,
                                  "train.progress": False, "train.log_every": 10 ** 9,
                                  "train.ckpt_every": 10 ** 9, "train.device": device,
                                  "data.device_resident": True})
    images = synthetic_set(cfg, shape)
    if len(images) < batch:  # more synthetic images so one global batch fits
        reps = -(-batch // len(images))
        images = ImageSet(images.images.repeat(reps, 1, 1, 1), images.labels.repeat(reps), images.classes,
                          images.name)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), train_set=images)
        dev = trainer.device
        flops = training_flops(trainer.method.flops_per_image())
        passes = trainer.method.passes_per_image
        trainer.method.train()
        t0 = None
        for step, x, y in trainer.batches(0, total):
            if step == warmup:
                _sync(dev)
                t0 = time.perf_counter()
            terms = trainer._train_step(step, x, y)
        loss = terms["loss"].item()  # waits for the last step
        seconds = time.perf_counter() - t0
        trainer.close()
    ips = steps * batch / seconds
    return {"mode": mode, "batch": batch, "device": _device_name(dev), "images_per_s": ips,
            "passes_per_image": passes, "image_passes_per_s": ips * passes,
            "ms_per_step": 1000 * seconds / steps, "train_flops_per_image": flops,
            "model_tflops": ips * flops / 1e12, "final_loss": loss,
            "params_m": trainer.method.param_counts()["trainable"] / 1e6,
            "params_total_m": trainer.method.param_counts()["total"] / 1e6,
            "flops_source": "analytic" if type(trainer.method).flops_per_image is not Method.flops_per_image
            else "counted (torch.utils.flop_counter, once)"}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def parse_modes(text: str, choices: tuple[str, ...]) -> list[str]:
    """A benchmark's comma-separated --modes, each one of ``choices``."""
    modes = text.split(",")
    unknown = [m for m in modes if m not in choices]
    if unknown:
        raise GenrepError(f"unknown mode '{unknown[0]}'; choose from {', '.join(choices)}")
    return modes


def parse_names(text: str, choices, what: str, flag: str) -> list[str]:
    """A benchmark's comma-separated list of named runs (``--variants``, ``--tokenizers``), each one of ``choices``
    and at least one."""
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in choices]
    if unknown or not names:
        raise GenrepError(f"unknown {what} {', '.join(unknown) or '(none given)'} in {flag}; choose from "
                          f"{', '.join(choices)}")
    return names


def parse_seeds(text: str) -> list[int]:
    """A benchmark's comma-separated ``--seeds``."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise GenrepError(f"--seeds takes comma-separated integers, got {text!r}") from None


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="supervised-cifar10")
    p.add_argument("--batch-sizes", default="128", help="comma-separated global batch sizes")
    p.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)} "
                   "(default: fast,eager-fp32 on CUDA, eager-fp32 on the CPU)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    p.add_argument("--shape", default=None, help="C,H,CLASSES of the synthetic data (default: the recipe's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args, rest = p.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        cuda = torch.cuda.is_available() and args.device != "cpu"
        modes = parse_modes(args.modes, MODES) if args.modes else (["fast", "eager-fp32"] if cuda else ["eager-fp32"])
        rows = []
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for mode in modes:
                try:
                    row = measure(args.recipe, overrides, mode, batch, args.steps, args.warmup, args.shape,
                                  args.device)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row = {"mode": mode, "batch": batch, "error": "out of memory"}
                if args.peak_tflops and "model_tflops" in row:
                    row["mfu"] = row["model_tflops"] / args.peak_tflops
                rows.append(row)
                _print_row(row, args.recipe)
    except GenrepError as e:
        print(f"throughput: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _print_row(r: dict, recipe: str) -> None:
    if "error" in r:
        print(f"{recipe} {r['mode']:>12} batch {r['batch']:>5}: {r['error']}", flush=True)
        return
    mfu = f"  MFU {100 * r['mfu']:5.1f}%" if "mfu" in r else ""
    passes = (f" ({r['image_passes_per_s']:.1f} image-passes/s, {r['passes_per_image']} per image)"
              if r["passes_per_image"] > 1 else "")
    print(f"{recipe} {r['mode']:>12} batch {r['batch']:>5} on {r['device']}: {r['images_per_s']:10.1f} images/s"
          f"{passes}  "
          f"{r['ms_per_step']:8.2f} ms/step  {r['train_flops_per_image'] / 1e9:.3f} GFLOP/image (fwd+bwd)  "
          f"{r['model_tflops']:.3f} TFLOP/s{mfu}  loss {r['final_loss']:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
