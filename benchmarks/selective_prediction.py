"""Selective prediction on a run's test digits mixed half-and-half with uniform noise: how many of each
``genrep predict`` answers, and the accuracy on the answered against answering everything.

    genrep pretrain --recipe hybvit-digits --out runs/hyb && genrep evaluate runs/hyb --eval.protocols ood
    python benchmarks/selective_prediction.py runs/hyb --coverage 0.9 0.95

The threshold is fitted (``genrep predict RUN --data NAME --coverage C``) on one half of the test split; the
measurement uses the other half, so no image it is judged on chose the threshold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch


def main() -> None:
    import genrep
    from genrep.data.datasets import load_dataset
    from genrep.predict import held_out_halves

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--coverage", type=float, nargs="+", default=[0.9, 0.95])
    args = ap.parse_args()
    run = genrep.load(args.run, device="cpu")
    cfg = run.config
    test = load_dataset(cfg.data.name, "test", image_size=run.method.data.image_size, root=cfg.data.root,
                        download=False)
    _, check = held_out_halves(len(test))
    digits, labels, n = test.images[check], test.labels[check], len(check)
    noise = torch.randint(0, 256, (n, *digits.shape[1:]), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for coverage in args.coverage:
        subprocess.run([sys.executable, "-m", "genrep.cli", "predict", args.run, "--data", cfg.data.name,
                        "--coverage", str(coverage), "-o", f"{args.run}/results/predictions-{coverage}.csv"],
                       check=True, stdout=subprocess.DEVNULL)
        p = run.predict(torch.cat([digits, noise]), coverage=coverage)
        answered = ~p["abstain"]
        correct = torch.cat([p["classes"][:n] == labels, torch.zeros(n, dtype=torch.bool)])
        print(json.dumps({
            "coverage": coverage, "score": p["score"], "digits_answered": f"{int(answered[:n].sum())}/{n}",
            "noise_answered": f"{int(answered[n:].sum())}/{n}",
            "accuracy_on_answered": float(correct[answered].double().mean()) if answered.any() else None,
            "accuracy_answering_all": float(correct.double().mean()),
            "digits_accuracy_all": float((p["classes"][:n] == labels).double().mean())}))


if __name__ == "__main__":
    main()
