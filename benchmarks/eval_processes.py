"""Feature extraction over N processes against one (issue 28): wall time of ``genrep probe`` on a trained run with
one process and under ``torchrun --nproc_per_node N``, each process on one thread, and whether the feature caches
the two wrote are the same bytes.

A run of ``--recipe`` is trained for ``--steps`` (the weights only need to exist), then probed once per process
count with its cache emptied before, so each probe extracts both splits; the probe's head is the same on both, so the
difference is the extraction and the processes' start. Prints one markdown row per process count.

    python benchmarks/eval_processes.py --recipe supervised-digits --data.image_size 64 --processes 1,2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[:6])} ... failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def _cache_digest(run: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((run / "cache").iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="supervised-digits")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--processes", default="1,2", help="comma-separated process counts")
    p.add_argument("--out", type=Path, default=None)
    args, rest = p.parse_known_args(argv)
    counts = [int(c) for c in args.processes.split(",")]
    if not counts or min(counts) < 1:
        sys.exit("--processes must be positive integers, e.g. 1,2")
    out = args.out or Path(tempfile.mkdtemp(prefix="eval-processes-"))
    run = out / "run"
    cli = [sys.executable, "-m", "genrep.cli"]
    _run([*cli, "pretrain", "--recipe", args.recipe, "--out", str(run), "--train.steps", str(args.steps),
          "--train.progress", "false", *rest])
    rows = []
    for n in counts:
        shutil.rmtree(run / "cache", ignore_errors=True)
        probe = ["probe", str(run), "--device", "cpu"]
        if n == 1:
            seconds = _run([*cli, *probe])
        else:
            seconds = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={n}",
                            f"--master_port={_free_port()}", "--master_addr=127.0.0.1", "-m", "genrep.cli", *probe])
        result = json.loads((run / "results" / "probe.json").read_text())
        rows.append({"processes": n, "seconds": round(seconds, 1), "cache_sha256": _cache_digest(run)[:16],
                     "probe": result["headline"]["test_acc"], "n_train": result["n_train"],
                     "image_size": result["image_size"]})
    same = len({r["cache_sha256"] for r in rows}) == 1
    print(f"{args.recipe}, {rows[0]['n_train']} train images at {rows[0]['image_size']} px; caches identical: {same}")
    print("| processes | genrep probe wall s | caches sha256 | linear probe |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['processes']} | {r['seconds']} | {r['cache_sha256']} | {r['probe']:.2%} |")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
