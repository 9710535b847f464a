"""Sampling speed of the colour-token models (iGPT, GCRL): tokens/s with and without the key/value cache.

Decodes the first ``--tokens`` positions of ``--batch`` images with the method's own decoding steps: ``cache``
feeds one token at a time through the per-block key/value caches (dense attention, what ``sample`` uses);
``recompute`` runs the whole sequence again for every token (what axial attention does, and what dense attention
would cost without a cache). Random weights: speed does not depend on training. bf16 autocast on CUDA.

Example (H100/H200):
    python benchmarks/token_sampling.py --recipe gcrl-cifar10 --batch 64 --tokens 1024
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

MODES = ("cache", "recompute")


def build(recipe: str, overrides: dict, device: torch.device, need: str = "_cached_step"):
    """The recipe's method with random weights, on ``device``; ``need`` names what the benchmark decodes with."""
    cfg = resolve_config(recipe, overrides)
    known = {r["name"]: r for r in describe_datasets()}
    if cfg.data.name not in known:
        raise GenrepError(f"data set {cfg.data.name} has no known shape; choose a recipe of a registered data set")
    r = known[cfg.data.name]
    data = DataSpec(cfg.data.image_size or r["native_size"], r["channels"], r["num_classes"])
    torch.manual_seed(0)
    method = build_method(cfg.method, cfg.model, data).to(device).eval()
    if not hasattr(method, need):
        what = "colour tokens; choose an igpt or gcrl recipe" if need == "_cached_step" else "patches; choose a darl recipe"
        raise GenrepError(f"method {cfg.method} does not decode {what}")
    return method


@torch.no_grad()
def measure(method, mode: str, batch: int, tokens: int, device: torch.device) -> dict:
    if mode == "cache" and method.cfg.attention != "dense":
        raise GenrepError("the key/value cache needs dense attention; pass --model.attention dense")
    seq = torch.randint(0, method.cfg.colours, (batch, method.net.length), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for timed in (False, True):  # the first pass warms up kernels and allocations
            n = min(tokens, 8) if not timed else tokens
            state = method.net.new_cache() if mode == "cache" else None
            _sync(device)
            t0 = time.perf_counter()
            for k in range(n):
                step = method._cached_step if mode == "cache" else method._recomputed_step
                step(seq, k, state)
            _sync(device)
    seconds = time.perf_counter() - t0
    return {"mode": mode, "batch": batch, "tokens": tokens, "device": _device_name(device),
            "tokens_per_s": batch * tokens / seconds, "ms_per_token_step": 1000 * seconds / tokens,
            "attention": method.cfg.attention}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="gcrl-cifar10")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=None, help="positions decoded (default: the whole image)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args, rest = p.parse_known_args(argv)
    try:
        modes = parse_modes(args.modes, MODES)
        device = resolve_device(args.device)
        method = build(args.recipe, parse_overrides(rest), device)
        tokens = min(args.tokens or method.net.length, method.net.length)
        rows = [measure(method, m, args.batch, tokens, device) for m in modes]
    except GenrepError as e:
        print(f"genrep: error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{args.recipe} {r['mode']:>9} batch {r['batch']} x {r['tokens']} tokens on {r['device']}: "
              f"{r['tokens_per_s']:,.0f} tokens/s ({r['ms_per_token_step']:.2f} ms per token step)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
