"""Frozen-feature extraction speed of a diffusion backbone: images/s, model FLOPs and utilisation of the read-out
pass (noise the image to t, run the network up to the read-out block, pool), the work `genrep probe` and
`genrep sweep` repeat over a data set.

Modes: ``fp32`` (the plain path), ``bf16`` (autocast), ``bf16-cl`` (autocast, channels-last images and weights:
the convolutions' fast layout on tensor cores). Random weights: speed does not depend on training, so
``adm-imagenet256`` runs without the user's checkpoint (its learned-sigma output half is dropped; the read-out
stops before the output layer anyway). Model FLOPs are counted once with torch.utils.flop_counter on the
read-out of one image (matmuls and convolutions).

Example (H100/H200):
    python benchmarks/feature_extraction.py --recipe adm-imagenet256 --batch 64 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from genrep.config import parse_overrides, resolve_config
from genrep.data.datasets import describe_datasets
from genrep.devices import resolve_device
from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _device_name, _sync, parse_modes  # noqa: E402 - the sibling benchmark's device helpers

MODES = ("fp32", "bf16", "bf16-cl")


def build(recipe: str, overrides: dict, device: torch.device):
    cfg = resolve_config(recipe, overrides)
    if hasattr(cfg.model, "pretrained"):  # random weights of the same network
        cfg = resolve_config(recipe, {"model.pretrained": "", "model.learn_sigma": False, **overrides})
    known = {r["name"]: r for r in describe_datasets()}
    shape = known.get(cfg.data.name)
    size = cfg.data.image_size or (shape["native_size"] if shape else None)
    if size is None:
        raise GenrepError(f"data set {cfg.data.name} has no known size; pass --data.image_size")
    data = DataSpec(size, shape["channels"] if shape else 3, shape["num_classes"] if shape else 1000)
    torch.manual_seed(0)
    method = build_method(cfg.method, cfg.model, data).to(device).eval()
    if not method.feature_maps:
        raise GenrepError(f"method {cfg.method} reads no feature maps; choose an adm, genvit or hybvit recipe")
    return method


def readout_flops(method, layer: int, pool: str) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    d = method.data
    x = torch.rand(1, d.channels, d.image_size, d.image_size, device=next(method.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        method.features(x, layer, pool)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure(method, mode: str, batch: int, steps: int, device: torch.device, layer: int, pool: str,
            flops: int) -> dict:
    d = method.data
    fmt = torch.channels_last if mode == "bf16-cl" else torch.contiguous_format
    method.to(memory_format=fmt)
    x = torch.rand(batch, d.channels, d.image_size, d.image_size, device=device).contiguous(memory_format=fmt)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32"):
        method.features(x, layer, pool)  # warm-up: kernels, allocations, the diffusion tables on the device
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            method.features(x, layer, pool)
        _sync(device)
    seconds = time.perf_counter() - t0
    method.to(memory_format=torch.contiguous_format)
    ips = batch * steps / seconds
    return {"mode": mode, "batch": batch, "device": _device_name(device), "layer": layer, "pool": pool,
            "feature_t": method.cfg.feature_t, "images_per_s": ips, "gflops_per_image": flops / 1e9,
            "model_tflops": ips * flops / 1e12}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="adm-imagenet256")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layer", type=int, default=None, help="read-out block (default: the recipe's)")
    p.add_argument("--pool", default=None, help="read-out pooling (default: the recipe's)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args, rest = p.parse_known_args(argv)
    try:
        modes = parse_modes(args.modes, MODES)
        device = resolve_device(args.device)
        method = build(args.recipe, parse_overrides(rest), device)
        layer, pool = method.check_feature_args(args.layer, args.pool)
        flops = readout_flops(method, layer, pool)
        rows = [measure(method, m, args.batch, args.steps, device, layer, pool, flops) for m in modes]
    except GenrepError as e:
        print(f"genrep: error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        if args.peak_tflops:
            r["mfu"] = r["model_tflops"] / args.peak_tflops
        mfu = f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(f"{args.recipe} {r['mode']:>7} batch {r['batch']} block {layer} pool {pool} t={r['feature_t']} on "
              f"{r['device']}: {r['images_per_s']:,.1f} images/s, {r['gflops_per_image']:.2f} GFLOPs/image, "
              f"{r['model_tflops']:.3f} TFLOP/s{mfu}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
