"""DARL's issue-27 choices on digits: gamma conditioning, initialisation and positions, each against the paper's
defaults, pretrained with ``darl-digits`` and read by its evaluation (the linear probe with the causal mask kept,
appendix B.1, and fine-tuning, both as the recipe's ``eval`` section sets them), two seeds each.

Variants (``--variants``, comma-separated; each is ``darl-digits`` plus its overrides):
- ``paper``: the defaults (gamma not given to the decoder, MAE's Xavier initialisation, 2D RoPE at base 10000);
- ``gamma-channel``: gamma as a channel of the corrupted patch (section 4.1); ``gamma-embedding``: the sinusoidal
  embedding and MLP genrep used before;
- ``trunc-normal``: the backbone and decoder drawn trunc-normal with std 0.02 (genrep's before);
- ``before``: both of genrep's old choices (gamma embedded, trunc-normal): the runs docs/benchmarks.md reports;
- ``rope-100``: 2D RoPE at rope-vit's axial base 100; ``learned``: learned absolute positions (the 3-8 point
  fine-tuning gap to 2D RoPE that docs/benchmarks.md leaves unexplained).

Each run goes to ``--out``/VARIANT-sSEED (a temporary folder by default). ``--steps N`` trains N steps instead of the
recipe's 100 epochs and ``--finetune-epochs`` shortens the fine-tuning: a quick check of the script, not a result.
Any other ``--KEY value`` is a config override of every run. Prints one markdown row per run: variant, seed, final
training loss, linear probe and fine-tuning test accuracy, seconds of pretraining and of evaluation.

The full measurement (CPU; two threads):
    python benchmarks/darl_ablation.py --out runs/darl-ablation --threads 2 --json darl_ablation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from genrep.config import parse_overrides, resolve_config
from genrep.errors import GenrepError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import parse_names, parse_seeds  # noqa: E402 - the sibling benchmark's argument helpers

RECIPE = "darl-digits"
VARIANTS = {
    "paper": {},
    "gamma-channel": {"model.gamma_conditioning": "channel"},
    "gamma-embedding": {"model.gamma_conditioning": "embedding"},
    "trunc-normal": {"model.init": "trunc_normal"},
    "before": {"model.gamma_conditioning": "embedding", "model.init": "trunc_normal"},
    "rope-100": {"model.rope_base": 100.0},
    "learned": {"model.pos_embed": "learned"},
}


def measure(out: Path, variant: str, seed: int, overrides: dict, steps: int | None,
            finetune_epochs: int | None, device: str) -> dict:
    from genrep.eval.evaluate import evaluate_run
    from genrep.train.loop import pretrain

    settings = {**overrides, **VARIANTS[variant], "train.seed": seed, "train.device": device, "train.progress": False}
    if steps:
        settings.update({"train.steps": steps, "train.ckpt_every": steps, "train.log_every": steps})
    cfg = resolve_config(RECIPE, settings)
    run = out / f"{variant}-s{seed}"
    t0 = time.perf_counter()
    trained = pretrain(cfg, run)
    train_s = time.perf_counter() - t0
    ev = replace(cfg.eval, protocols=["probes", "finetune"], device=device)
    if finetune_epochs:
        ev = replace(ev, finetune=replace(ev.finetune, epochs=finetune_epochs))
    t0 = time.perf_counter()
    results = evaluate_run(run, ev, progress=False, say=lambda _: None)["protocols"]
    probes, finetune = results["probes"], results["finetune"]
    return {"variant": variant, "seed": seed, "run": str(run), "steps": trained.steps,
            "loss": trained.last_log.get("loss"), "probe_acc": probes["headline"]["test_acc"],
            "probe": f"{probes['headline']['name']}, block {probes['layer']}, {probes['pool']}",
            "finetune_acc": finetune["test_acc"], "finetune_epochs": ev.finetune.epochs,
            "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t0, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| variant | seed | final loss | linear probe | fine-tune | pretrain s | eval s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        lines.append(f"| {r['variant']} | {r['seed']} | {loss} | {100 * r['probe_acc']:.2f}% | "
                     f"{100 * r['finetune_acc']:.2f}% | {r['train_s']:.0f} | {r['eval_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--out", type=Path, default=None, help="the runs' parent folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=None, help="train this many steps (default: the recipe's epochs)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default: the recipe's eval.finetune.epochs")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args, rest = p.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        variants = parse_names(args.variants, VARIANTS, "variant", "--variants")
        seeds = parse_seeds(args.seeds)
        if any(n is not None and n < 1 for n in (args.steps, args.finetune_epochs)):
            raise GenrepError("--steps and --finetune-epochs must be at least 1")
        overrides = parse_overrides(rest)
        for v in variants:  # every configuration checked before the first run trains
            resolve_config(RECIPE, {**overrides, **VARIANTS[v]})
        out = args.out or Path(tempfile.mkdtemp(prefix="darl-ablation-"))
        taken = [out / f"{v}-s{s}" for v in variants for s in seeds if (out / f"{v}-s{s}").exists()]
        if taken:
            raise GenrepError(f"{taken[0]} exists; choose another --out (runs are never overwritten)")
        rows = []
        for v in variants:
            for s in seeds:
                rows.append(measure(out, v, s, overrides, args.steps, args.finetune_epochs, args.device))
                r = rows[-1]
                print(f"{v} seed {s}: probe {100 * r['probe_acc']:.2f}%, fine-tune {100 * r['finetune_acc']:.2f}% "
                      f"({r['train_s']:.0f} s + {r['eval_s']:.0f} s)", file=sys.stderr, flush=True)
    except GenrepError as e:
        print(f"genrep: error: {e}", file=sys.stderr)
        return 2
    print(f"{RECIPE}, {rows[0]['steps']} steps; probe: {rows[0]['probe']}; fine-tuning {rows[0]['finetune_epochs']} "
          f"epochs; runs under {out}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
