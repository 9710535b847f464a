"""Peak memory of a linear probe and kNN on a feature matrix larger than memory should hold: a float16 file
mapped and read a block of rows at a time (genrep's path past ``feature_store.LARGE_FEATURES``) against the same
matrix as float32 in memory (the path below it).

    python benchmarks/feature_cache_memory.py --rows 200000 --dim 4096 --epochs 2

Each path runs in a process of its own; a thread samples ``RssAnon`` (the process's own memory: what a matrix in
memory costs) and ``VmRSS`` (which also counts the file's pages mapped in, which the kernel may drop at any time)
every 20 ms. The features are random with a planted linear rule, so the probe has something to learn.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _probe(path: str, mode: str, epochs: int) -> dict:
    import numpy as np

    from genrep.eval.metrics.probes import knn_classify, linear_probe

    peak = {"RssAnon": 0, "VmRSS": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    x = torch.from_numpy(np.load(path, mmap_mode="c", allow_pickle=False))
    if mode == "float32 in memory":
        x = x.float()
    labels = torch.from_numpy(np.load(path.replace(".npy", "-labels.npy"), allow_pickle=False))
    n_test = max(1, len(x) // 20)
    train, test = x[n_test:], x[:n_test]
    lin = linear_probe(train, labels[n_test:], test, labels[:n_test], int(labels.max()) + 1, solver="adamw",
                       epochs=epochs, batch_size=512, weight_decay=1e-4)
    knn = knn_classify(train, labels[n_test:], test[:1000], labels[:1000], int(labels.max()) + 1, k=[20])
    seconds = time.perf_counter() - t0
    done.set()
    return {"mode": mode, "linear_acc": lin.test_acc, "knn_acc": knn[20], "seconds": round(seconds, 1),
            "peak_rss_anon_gb": round(peak["RssAnon"] / 2**30, 3), "peak_vm_rss_gb": round(peak["VmRSS"] / 2**30, 3)}


def _write(path: Path, rows: int, dim: int, classes: int = 10) -> None:
    import numpy as np

    from genrep.eval.feature_store import MappedWriter

    g = torch.Generator().manual_seed(0)
    w = torch.randn(dim, classes, generator=g) / dim ** 0.5
    writer = MappedWriter(path, (rows, dim))
    labels = torch.empty(rows, dtype=torch.int64)
    for s in range(0, rows, 8192):
        block = torch.randn(min(8192, rows - s), dim, generator=g)
        labels[s:s + len(block)] = (block @ w + 0.5 * torch.randn(len(block), classes, generator=g)).argmax(1)
        writer.put(s, block, "benchmark features")
    writer.finish({"version": "benchmark"})
    np.save(str(path).replace(".npy", "-labels.npy"), labels.numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_probe(args.child[0], args.child[1], int(args.child[2]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.npy"
        _write(path, args.rows, args.dim)
        size = path.stat().st_size
        print(f"{args.rows} x {args.dim} features: {size / 2**30:.2f} GB as float16 "
              f"({2 * size / 2**30:.2f} GB as float32); adamw probe, {args.epochs} epochs, batch 512; "
              f"kNN of 1,000 rows")
        for mode in ("float16 mapped, in blocks", "float32 in memory"):
            out = subprocess.run([sys.executable, __file__, "--child", str(path), mode, str(args.epochs)],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
