"""The diffusion-features paper's heads trained on one fixed noise draw against a new noise draw and flip every epoch:
test accuracy and images/s of each, at the same epochs, on an ADM run (``adm-digits`` by default).

Modes (``--modes``): ``fixed`` (the cached read-out: one noise draw per image, fixed, no augmentation: genrep's
habit before issue 26), ``fresh-flip`` (the paper's: a new noise draw and a random flip every epoch, the features
read again each epoch), and the parts apart, ``fresh`` (noise only) and ``flip`` (flip only), and ``crop-flip``
(random resized crop and flip: the paper's table 6 and figure 7). Every mode trains each head of ``--heads`` with
the same schedule and seed and scores it on the same deterministic test read-out (noise fixed per image).

Without ``--run`` it first trains a tiny U-Net itself (``adm-digits`` for ``--train-steps`` steps; any other
``--KEY value`` is a config override of that run), in a temporary folder unless ``--out`` names one.

Per row: ``test_acc``, ``train_acc`` (the train split for ``fixed``; the last epoch's training batches for the
others), ``seconds`` of the head's training and scoring, ``images_per_s`` = epochs x training images / seconds,
``extract_s`` (``fixed`` only: one uncached extraction of both splits at the read-out, which the cached mode pays
once and the others every epoch), ``readout_gflops`` (the network's forward to the read-out, per image; counted
once with torch.utils.flop_counter) and, for the modes that read features every epoch, ``readout_tflops`` =
images/s x readout FLOPs (a lower bound on the utilisation: the head's own work is left out) and ``mfu`` against
``--peak-tflops``.

Example (an idle GPU; the machine and its load go beside any figure quoted):
    python benchmarks/head_noise.py --train-steps 3300 --heads linear,attention --epochs 28 --device cuda \\
        --peak-tflops 989 --json head_noise.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from genrep.config import WEIGHTS, EvalConfig, build_dataclass, parse_overrides, resolve_config
from genrep.devices import resolve_device
from genrep.errors import GenrepError
from genrep.eval.features import PRECISIONS
from genrep.eval.metrics.heads import HEADS
from genrep.eval.protocols.context import EvalContext
from genrep.eval.protocols.head_training import HeadSettings, head_pool, train_head_at
from genrep.run import Run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_extraction import readout_flops  # noqa: E402 - the sibling benchmark's FLOP count
from throughput import _device_name, parse_modes  # noqa: E402

MODES = {"fixed": ("fixed", "none"), "fresh-flip": ("fresh", "flip"), "fresh": ("fresh", "none"),
         "flip": ("fixed", "flip"), "crop-flip": ("fresh", "crop_flip")}


def train_run(out: Path, steps: int, overrides: dict, device: str) -> Path:
    from genrep.train.loop import pretrain

    cfg = resolve_config("adm-digits", {"train.steps": steps, "train.ckpt_every": steps, "train.device": device,
                                        "train.progress": False, **overrides})
    pretrain(cfg, out)
    return out


def measure(ctx: EvalContext, kind: str, mode: str, settings: HeadSettings, layer: int, pool: str,
            gflops: float, peak: float | None) -> dict:
    noise, augment = MODES[mode]
    s = dataclasses.replace(settings, noise=noise, augment=augment)
    extract_s = None
    if mode == "fixed":
        hp = head_pool(kind, pool)
        t0 = time.perf_counter()
        for split in (ctx.train, ctx.test):
            ctx.extract(split.images, layer, hp)
        extract_s = time.perf_counter() - t0
        ctx.features("train", layer, hp), ctx.features("test", layer, hp)  # cached before the timed training
    r = train_head_at(ctx, kind, s, layer, pool)
    ips = r["epochs"] * len(ctx.train) / r["seconds"]
    row = {"head": kind, "mode": mode, "train_noise": r["train_noise"], "augment": augment, "epochs": r["epochs"],
           "test_acc": r["test_acc"], "train_acc": r["train_acc"], "train_acc_on": r["train_acc_on"],
           "seconds": r["seconds"], "images_per_s": ips, "extract_s": extract_s, "readout_gflops": gflops,
           "device": _device_name(ctx.device), "precision": r["precision"], "features": r["features"]}
    if r["features"] != "cached":
        row["readout_tflops"] = ips * gflops / 1e3
        if peak:
            row["mfu"] = row["readout_tflops"] / peak
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="an adm run to read (default: train a tiny one)")
    p.add_argument("--out", type=Path, default=None, help="where the tiny run is trained (default: a temp folder)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--heads", default="linear,attention", help=f"comma-separated, from {', '.join(HEADS)}")
    p.add_argument("--modes", default="fixed,fresh-flip", help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--epochs", type=int, default=28)
    p.add_argument("--preset", default="custom", help="custom (Adam 1e-3, batch 256) or diffssl (the authors' SGD)")
    p.add_argument("--feature-t", default="25", help="the read-out's noise step, or none for the clean image")
    p.add_argument("--layer", type=int, default=None, help="read-out block (default: the run's)")
    p.add_argument("--pool", default=None, help="the linear and mlp heads' pooling (default: the run's)")
    p.add_argument("--batch", type=int, default=256, help="extraction batch of the test split and of the fixed mode")
    p.add_argument("--standardize", action="store_true",
                   help="standardise the heads' inputs (genrep's habit; the paper's heads read raw features)")
    p.add_argument("--precision", default="auto", help=f"extraction precision, from {', '.join(PRECISIONS)}")
    p.add_argument("--weights", default="ema", choices=WEIGHTS,
                   help="the run's EMA or raw weights (a briefly trained run's EMA is still near its initialisation)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args, rest = p.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        modes = parse_modes(args.modes, tuple(MODES))
        heads = args.heads.split(",")
        if any(h not in HEADS for h in heads):
            raise GenrepError(f"unknown head in --heads {args.heads}; choose from {', '.join(HEADS)}")
        device = resolve_device(args.device)
        settings = build_dataclass(HeadSettings, {"epochs": args.epochs, "preset": args.preset,
                                                  "standardize": args.standardize}, "head")
        t = None if args.feature_t.lower() == "none" else int(args.feature_t)
        run = args.run or train_run(args.out or Path(tempfile.mkdtemp(prefix="head-noise-")) / "run",
                                    args.train_steps, parse_overrides(rest), str(device))
        ev = EvalConfig(device=str(device), batch_size=args.batch, precision=args.precision, weights=args.weights)
        ctx = EvalContext.open(Run.open(run), ev, options={"feature_t": t, "feature_noise": "fixed"}, progress=False)
        layer, pool = ctx.method.check_feature_args(args.layer, args.pool)
        rows = []
        for kind in heads:
            hp = head_pool(kind, pool)
            gflops = readout_flops(ctx.method, layer, hp) / 1e9
            rows += [measure(ctx, kind, mode, settings, layer, pool, gflops, args.peak_tflops) for mode in modes]
    except GenrepError as e:
        print(f"genrep: error: {e}", file=sys.stderr)
        return 2
    print(f"{run}: block {layer}, pool {pool}, t={t}, {len(ctx.train)} train / {len(ctx.test)} test images, "
          f"{args.epochs} epochs, preset {args.preset}, {'standardised' if args.standardize else 'raw'} inputs, "
          f"on {rows[0]['device']} ({rows[0]['precision']} extraction, {args.weights} weights)")
    for r in rows:
        extra = f", extraction once {r['extract_s']:.1f} s" if r["extract_s"] is not None else (
            f", {r['readout_tflops']:.3f} TFLOP/s in the read-out" + (f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r
                                                                       else ""))
        print(f"{r['head']:>9} {r['mode']:>10}: test {100 * r['test_acc']:6.2f}%, train {100 * r['train_acc']:6.2f}%, "
              f"{r['seconds']:.1f} s, {r['images_per_s']:,.0f} images/s{extra}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
