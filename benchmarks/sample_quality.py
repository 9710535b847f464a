"""How digit-like are a generative run's samples? A supervised classifier's confidence on them.

Draws N samples from RUN (DDIM), classifies them with the classifier head of CLASSIFIER_RUN (e.g. a
``supervised-digits`` run) and reports the fraction labelled with confidence above a threshold, the
class histogram, and the same fraction on the real test images as the reference. A CPU-friendly
stand-in for FID on data sets the Inception network was not made for.

    python benchmarks/sample_quality.py runs/genvit-digits runs/supervised-digits -n 1000 --steps 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from genrep.errors import GenrepError
from genrep.eval.protocols.calibration import predict_probs
from genrep.run import load_trained
from genrep.runs import load_split


@torch.no_grad()
def confidences(classifier, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    conf, pred = [], []
    for i in range(0, len(images), batch_size):
        p = classifier.logits(images[i:i + batch_size]).float().softmax(-1)
        c, y = p.max(-1)
        conf.append(c)
        pred.append(y)
    return torch.cat(conf), torch.cat(pred)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("classifier", type=Path)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        options = {"sampler": args.sampler, "sample_steps": args.steps, "eta": args.eta}
        _, gen, _ = load_trained(args.run, options=options)
        ccfg, clf, _ = load_trained(args.classifier)
        if "sample" not in gen.capabilities or "logits" not in clf.capabilities:
            raise GenrepError("RUN must be able to sample and CLASSIFIER_RUN must have a classifier head")
        test = load_split(ccfg, "test")
        real = test.images.float() / 255
        x = gen.sample(args.n, generator=torch.Generator().manual_seed(args.seed), progress=True)
        conf, pred = confidences(clf, x)
        real_conf, _ = confidences(clf, real)
    except GenrepError as e:
        print(f"sample_quality: error: {e}", file=sys.stderr)
        return 2
    row = {"run": str(args.run), "classifier": str(args.classifier), "n": args.n, "sampler": args.sampler,
           "steps": args.steps, "eta": args.eta, "threshold": args.threshold,
           "confident_fraction": float((conf > args.threshold).float().mean()),
           "real_test_confident_fraction": float((real_conf > args.threshold).float().mean()),
           "classifier_test_acc": float((predict_probs(clf, test.images).argmax(1) == test.labels).float().mean()),
           "class_histogram": torch.bincount(pred, minlength=len(test.classes)).tolist()}
    print(json.dumps(row, indent=2))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
