"""The attention cost behind GVP's fast path: forward + backward of one attention call under GVP's masks.

Times one call of attention on random q, k, v of shape [B, H, N, head dim] (leaves with gradients) and its
backward against a fixed random output gradient: bf16 on CUDA, fp32 on the CPU (``--dtype``). The sequence is
GVP's: ``--cond-tokens`` S condition tokens (1, a CLS token) then T = N - S image tokens, a random order z per
sample and appendix B's mixed-length segmentation with ``--groups`` K = 20 (``mixed_length_from_uniform``).
Variants (``--variants``); each masked one gives one row per stream (``--streams``): the content stream's mask
M_h (row ``<variant>-content``) and the query stream's M_g (``<variant>-query``; its keys and values come from
the content stream, so the call has the same shape), timed as separate calls:

- ``causal``: SDPA with ``is_causal=True`` (the flash kernels, no mask materialised): the floor;
- ``per-sample-direct``: eq. 12's masks in the original token order, one order and one segmentation per sample
  (``--segment-per sample``, the default here), from ``gvp_masks_batched``: a [B, 1, N, N] bool mask through
  SDPA, what a naive implementation does (``mask_layout: direct``);
- ``shared-permuted``: the tokens in factorisation order (genrep's default ``mask_layout: permuted``), one
  segmentation per batch (sample 0's draw): one block-causal [N, N] bool mask the batch shares, through SDPA;
- ``flex-shared``: FlexAttention (``flex_attention`` under ``torch.compile``, as its docs require) with a block
  mask from ``create_block_mask`` whose mask_mod compares the token levels of ``token_levels`` in factorisation
  order: content ``levels[kv] <= levels[q]``, query ``levels[kv] < levels[q] or levels[kv] == 0``;
- ``flex-per-sample``: the same with one segmentation per sample (a B-dependent mask_mod, B block masks).

The flex rows need ``torch.nn.attention.flex_attention`` and CUDA; elsewhere they are skipped with a note (the
JSON keeps them with a ``skipped`` reason). ``--flex-on-cpu`` tries them on the CPU after a tiny forward +
backward probe (torch 2.14's CPU FlexAttention has no backward, so there they are skipped, saying so).
``--segment-per batch`` gives the per-sample rows the shared rows' segmentation (the orders still differ per
sample), so every variant's allowed fraction is the same and the rows compare kernel against kernel.

Per row: ``ms``, the median milliseconds of one forward + backward (CUDA events on CUDA, perf_counter around a
synchronised step on the CPU; after ``--warmup`` untimed steps, at least one for the flex rows, whose first call
compiles) and the mean; ``mask_ms``, building the step's mask from the orders and boundaries (the segmentation
is drawn anew every training step, so this is paid every step; not included in ``ms``): for the SDPA rows the
library's helpers, which build the pair (M_h, M_g) at once (``gvp_masks_batched``; ``token_levels`` +
``masks_from_levels``), for the flex rows ``token_levels`` + ``create_block_mask`` of that row's stream (eager,
not compiled); ``allowed``, the fraction of the [N, N] entries the mask lets attend, averaged over the batch
(causal: (N + 1) / (2N)); the flex rows' ``block_density``, the fraction of 128 x 128 blocks computed at all.
Useful work counts only allowed (query, key) pairs, matmul FLOPs of Q K^T and P V, forward x 3 for forward +
backward:

    useful FLOPs = 3 * (2 + 2) * head_dim * B * H * N^2 * allowed = 12 * B * H * N^2 * head_dim * allowed,

``tflops`` is that over ``ms`` (the SDPA mask kernels compute every entry, so theirs is lower than the kernel's
raw rate, which ``dense_tflops`` = 12 * B * H * N^2 * head_dim / ``ms`` gives), and ``mfu`` = ``tflops`` /
``--peak-tflops`` (dense bf16 peak, e.g. 989 for an H100/H200 SXM). The permutation into factorisation order
(one gather per forward, not per layer) is not timed.

Example (H100/H200):
    python benchmarks/gvp_attention.py --batch 256 --heads 8 --tokens 1024 --head-dim 32 --peak-tflops 989 \\
        --json gvp_attention.json
On the CPU use small shapes, e.g. ``--batch 4 --tokens 64``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genrep.devices import resolve_device
from genrep.errors import GenrepError
from genrep.nn.gvp_masks import gvp_masks_batched, masks_from_levels, mixed_length_from_uniform, token_levels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _device_name, _sync  # the sibling benchmark's device helpers

VARIANTS = ("causal", "per-sample-direct", "shared-permuted", "flex-shared", "flex-per-sample")
STREAMS = ("content", "query")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FLEX_BLOCK = 128  # create_block_mask's default block size


def parse_list(text: str, choices: tuple[str, ...], what: str) -> list[str]:
    """A comma-separated option, each item one of ``choices``, in the given order, without repeats."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in choices]
    if unknown or not items:
        raise GenrepError(f"unknown {what} '{unknown[0] if unknown else text}'; choose from {', '.join(choices)}")
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------------------------------------ flex

def _flex():
    """(flex_attention, create_block_mask), or the reason they cannot be had."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return None, f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({e})"
    return (flex_attention, create_block_mask), None


def flex_mask_mod(levels: torch.Tensor, stream: str):
    """GVP's mask as a FlexAttention mask_mod over token levels: ``[N]`` (shared by the batch) or ``[B, N]``."""
    if levels.ndim == 1:
        if stream == "content":
            return lambda b, h, q, kv: levels[kv] <= levels[q]
        return lambda b, h, q, kv: (levels[kv] < levels[q]) | (levels[kv] == 0)
    if stream == "content":
        return lambda b, h, q, kv: levels[b, kv] <= levels[b, q]
    return lambda b, h, q, kv: (levels[b, kv] < levels[b, q]) | (levels[b, kv] == 0)


def _flex_cpu_probe(flex_attention, create_block_mask) -> str | None:
    """None if FlexAttention runs forward + backward on the CPU, else why not."""
    levels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    try:
        bm = create_block_mask(flex_mask_mod(levels, "content"), None, None, 8, 8, device="cpu")
        q = torch.randn(1, 1, 8, 16, requires_grad=True)
        flex_attention(q, q, q, block_mask=bm).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: not on this CPU
        return f"FlexAttention fails on the CPU in torch {torch.__version__}: {type(e).__name__}: " \
               f"{str(e).splitlines()[0] if str(e) else ''}"
    return None


# ------------------------------------------------------------------------------------------------ timing

class _Timer:
    """Per-step milliseconds: CUDA events on CUDA, perf_counter around a synchronised step elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.spans: list = []

    def time(self, fn) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.spans.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self.spans.append(1000 * (time.perf_counter() - t0))

    def ms(self) -> list[float]:
        _sync(self.device)
        return [s.elapsed_time(e) for s, e in self.spans] if self.cuda else list(self.spans)


def _time_steps(fn, device: torch.device, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    timer = _Timer(device)
    for _ in range(steps):
        timer.time(fn)
    return timer.ms()


# ------------------------------------------------------------------------------------------------ setup

class Problem:
    """q, k, v, the output gradient and one step's draws: orders [B, T] and mixed-length boundaries [B, K + 1]."""

    def __init__(self, B: int, H: int, N: int, D: int, S: int, K: int, dtype: torch.dtype, device: torch.device,
                 segment_per: str, seed: int = 0):
        self.B, self.H, self.N, self.D, self.S, self.T, self.K = B, H, N, D, S, N - S, K
        self.device, self.dtype = device, dtype
        g = torch.Generator(device).manual_seed(seed)
        self.q, self.k, self.v, self.grad = (torch.randn(B, H, N, D, generator=g, device=device).to(dtype)
                                             for _ in range(4))
        for t in (self.q, self.k, self.v):
            t.requires_grad_(True)
        self.orders = torch.rand(B, self.T, generator=g, device=device).argsort(1)
        bounds = mixed_length_from_uniform(torch.rand(B, self.T, generator=g, device=device), self.T, K)
        self.shared_bounds = bounds[:1]  # one segmentation per batch: sample 0's
        self.sample_bounds = bounds if segment_per == "sample" else self.shared_bounds

    def step(self, attend) -> None:
        """One forward + backward of ``attend(q, k, v)``, gradients dropped (no accumulation kernel)."""
        for t in (self.q, self.k, self.v):
            t.grad = None
        attend(self.q, self.k, self.v).backward(self.grad)

    def direct_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_h, M_g) [B, N, N] in the original token order, per sample."""
        return gvp_masks_batched(self.S, self.T, self.orders, self.sample_bounds, validate=False)

    def shared_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_h, M_g) [N, N] in factorisation order, one the batch shares."""
        M_h, M_g = masks_from_levels(token_levels(self.S, self.T, None, self.shared_bounds))
        return M_h[0], M_g[0]

    def factorisation_levels(self, per_sample: bool) -> torch.Tensor:
        """Token levels in factorisation order: [N] shared, or [B, N] per sample."""
        levels = token_levels(self.S, self.T, None, self.sample_bounds if per_sample else self.shared_bounds)
        return levels.expand(self.B, -1).contiguous() if per_sample else levels[0]


def _allowed(mask: torch.Tensor) -> float:
    return float(mask.float().mean())


def measure(p: Problem, variant: str, stream: str | None, steps: int, warmup: int, flex=None) -> dict:
    dev = p.device
    row = {"variant": variant, "stream": stream, "name": variant if stream is None else f"{variant}-{stream}"}
    s = STREAMS.index(stream) if stream else None
    if variant == "causal":
        times = _time_steps(lambda: p.step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                            dev, steps, warmup)
        row.update(allowed=(p.N + 1) / (2 * p.N), mask_ms=None)
    elif variant in ("per-sample-direct", "shared-permuted"):
        build = p.direct_masks if variant == "per-sample-direct" else p.shared_masks
        mask = build()[s]
        mask = mask[:, None] if mask.ndim == 3 else mask  # [B, 1, N, N] or [N, N]
        row["allowed"] = _allowed(mask)
        row["mask_ms"] = statistics.median(_time_steps(build, dev, steps, 1))
        times = _time_steps(lambda: p.step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
                            dev, steps, warmup)
    else:  # flex-shared, flex-per-sample
        compiled, create_block_mask = flex
        per_sample = variant == "flex-per-sample"

        def build():
            levels = p.factorisation_levels(per_sample)
            return create_block_mask(flex_mask_mod(levels, stream), p.B if per_sample else None, None, p.N, p.N,
                                     device=dev)

        block_mask = build()
        dense = masks_from_levels(p.factorisation_levels(per_sample).reshape(-1, p.N))[s]
        row["allowed"] = _allowed(dense)
        row["block_density"] = 1 - block_mask.sparsity() / 100
        row["mask_ms"] = statistics.median(_time_steps(build, dev, steps, 1))
        times = _time_steps(lambda: p.step(lambda q, k, v: compiled(q, k, v, block_mask=block_mask)), dev, steps,
                            max(warmup, 1))
    ms = statistics.median(times)
    dense_flops = 12 * p.B * p.H * p.N * p.N * p.D
    row.update(ms=ms, mean_ms=statistics.fmean(times), useful_gflops=dense_flops * row["allowed"] / 1e9,
               tflops=dense_flops * row["allowed"] / (ms / 1e3) / 1e12, dense_tflops=dense_flops / (ms / 1e3) / 1e12)
    return row


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024, help="N: the condition tokens and the T image tokens")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--cond-tokens", type=int, default=1, help="S: condition tokens first (level 0)")
    p.add_argument("--groups", type=int, default=20, help="K of the mixed-length segmentation (appendix B: 20)")
    p.add_argument("--segment-per", default="sample",
                   help="sample: the per-sample rows draw one segmentation per sample; batch: they use the shared "
                   "rows' one (orders still per sample)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--streams", default=",".join(STREAMS), help="comma-separated masks of the masked variants: "
                   "content (M_h), query (M_g)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on the CPU), bf16 or fp32")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, for MFU")
    p.add_argument("--flex-on-cpu", action="store_true", help="try the flex rows on the CPU (after a probe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    try:
        variants = parse_list(args.variants, VARIANTS, "variant")
        streams = parse_list(args.streams, STREAMS, "stream")
        if args.segment_per not in ("sample", "batch"):
            raise GenrepError(f"unknown --segment-per '{args.segment_per}'; choose from sample, batch")
        if args.dtype not in ("auto", *DTYPES):
            raise GenrepError(f"unknown dtype '{args.dtype}'; choose from auto, {', '.join(DTYPES)}")
        for name in ("batch", "heads", "head_dim", "steps", "groups", "cond_tokens"):
            if getattr(args, name) < 1:
                raise GenrepError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if args.warmup < 0:
            raise GenrepError(f"--warmup must be at least 0, got {args.warmup}")
        if args.peak_tflops is not None and args.peak_tflops <= 0:
            raise GenrepError(f"--peak-tflops must be positive, got {args.peak_tflops:g}")
        T = args.tokens - args.cond_tokens
        if not 1 <= args.groups <= T - 1:
            raise GenrepError(f"--tokens {args.tokens} leaves T = {T} image tokens after {args.cond_tokens} condition "
                              f"token(s); the mixed-length segmentation with K = {args.groups} groups needs "
                              f"T >= K + 1, i.e. --tokens >= {args.groups + 1 + args.cond_tokens}")
        device = resolve_device(args.device)
        dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
    except GenrepError as e:
        print(f"gvp_attention: error: {e}", file=sys.stderr)
        return 2

    problem = Problem(args.batch, args.heads, args.tokens, args.head_dim, args.cond_tokens, args.groups, dtype,
                      device, args.segment_per, args.seed)
    flex, flex_note = None, None
    if any(v.startswith("flex") for v in variants):
        fns, flex_note = _flex()
        if fns is not None and device.type != "cuda":
            flex_note = (_flex_cpu_probe(*fns) if args.flex_on_cpu else
                         "FlexAttention rows run on CUDA only here (pass --flex-on-cpu to try them on the CPU)")
        if flex_note is None:
            flex = (torch.compile(fns[0]), fns[1])
    print(f"GVP attention forward + backward on {_device_name(device)}, {str(dtype).removeprefix('torch.')}: "
          f"B {args.batch} x H {args.heads} x N {args.tokens} (S {args.cond_tokens} + T {T}) x head dim "
          f"{args.head_dim}, mixed-length K = {args.groups}, segmentation per {args.segment_per} for the per-sample "
          f"rows", flush=True)
    header = (f"{'row':<26} {'ms':>9} {'mean ms':>9} {'mask ms':>9} {'allowed':>8} {'TFLOP/s':>8} "
              f"{'dense TF/s':>10}" + (f" {'MFU':>6}" if args.peak_tflops else ""))
    print(header, flush=True)
    rows = []
    for variant in variants:
        for stream in ([None] if variant == "causal" else streams):
            common = {"batch": args.batch, "heads": args.heads, "tokens": args.tokens, "head_dim": args.head_dim,
                      "cond_tokens": args.cond_tokens, "groups": args.groups, "segment_per": args.segment_per,
                      "dtype": str(dtype).removeprefix("torch."), "device": _device_name(device)}
            name = variant if stream is None else f"{variant}-{stream}"
            if variant.startswith("flex") and flex is None:
                row = {"variant": variant, "stream": stream, "name": name, "skipped": flex_note, **common}
            else:
                try:
                    row = {**measure(problem, variant, stream, args.steps, args.warmup, flex), **common}
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row = {"variant": variant, "stream": stream, "name": name, "error": "out of memory", **common}
                if args.peak_tflops and "tflops" in row:
                    row["mfu"] = row["tflops"] / args.peak_tflops
            rows.append(row)
            _print_row(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _print_row(r: dict) -> None:
    if "skipped" in r or "error" in r:
        print(f"{r['name']:<26} {'skipped: ' + r['skipped'] if 'skipped' in r else r['error']}", flush=True)
        return
    mask = f"{r['mask_ms']:9.3f}" if r["mask_ms"] is not None else f"{'-':>9}"
    mfu = f" {100 * r['mfu']:5.1f}%" if "mfu" in r else ""
    mfu += f"  (blocks computed: {r['block_density']:.3f})" if "block_density" in r else ""
    print(f"{r['name']:<26} {r['ms']:9.3f} {r['mean_ms']:9.3f} {mask} {r['allowed']:8.4f} {r['tflops']:8.4g} "
          f"{r['dense_tflops']:10.4g}{mfu}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
