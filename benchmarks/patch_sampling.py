"""Sampling speed of DARL: patches/s of ``sample`` with and without the key/value cache.

``cache`` feeds one patch at a time through the blocks' key/value caches (the default, ``model.cache true``);
``recompute`` runs the whole sequence again for every patch (``model.cache false``, what a model without a cache
costs). Each patch of the denoising decoder also runs ``model.sample_steps`` decoder steps (one transformer block on
two tokens), the same in both modes. Random weights: speed does not depend on training. bf16 autocast on CUDA.

Example (H100/H200):
    python benchmarks/patch_sampling.py --recipe darl-diff-cifar10 --batch 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from genrep.config import parse_overrides
from genrep.devices import resolve_device
from genrep.errors import GenrepError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _device_name, _sync, parse_modes  # noqa: E402 - the sibling benchmark's device helpers
from token_sampling import build  # noqa: E402 - the same recipe -> random-weights method

MODES = ("cache", "recompute")


@torch.no_grad()
def measure(method, mode: str, batch: int, device: torch.device) -> dict:
    if not hasattr(method, "reverse_levels"):
        raise GenrepError(f"method {method.name} does not decode patches; choose a darl recipe")
    method.cfg.cache = mode == "cache"
    g = torch.Generator().manual_seed(0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        method.sample(min(batch, 2), generator=g)  # warms up kernels and allocations
        _sync(device)
        t0 = time.perf_counter()
        method.sample(batch, generator=g)
        _sync(device)
    seconds = time.perf_counter() - t0
    return {"mode": mode, "batch": batch, "patches": method.T, "device": _device_name(device),
            "patches_per_s": batch * method.T / seconds, "seconds": seconds, "decoder": method.cfg.decoder,
            "sample_steps": method.cfg.sample_steps if method.cfg.decoder == "diffusion" else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="darl-diff-cifar10")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args, rest = p.parse_known_args(argv)
    try:
        modes = parse_modes(args.modes, MODES)
        device = resolve_device(args.device)
        method = build(args.recipe, parse_overrides(rest), device, need="reverse_levels")
        rows = [measure(method, m, args.batch, device) for m in modes]
    except GenrepError as e:
        print(f"genrep: error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{args.recipe} {r['mode']:>9} batch {r['batch']} x {r['patches']} patches on {r['device']}: "
              f"{r['patches_per_s']:,.1f} patches/s ({r['seconds']:.2f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
