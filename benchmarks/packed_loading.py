"""Issue 28's figures for ``genrep pack`` and ``packed:PATH``: packing speed, loading speed against torchvision's
ImageFolder, and the peak memory of ``genrep pretrain`` and ``genrep probe`` on a packed set larger than memory
would comfortably hold as pixels.

1. packing: ``genrep.data.pack.pack`` on a folder tree of 256 px JPEGs (train/<class>/, val/<class>/), with
   ``--resize none`` (bytes kept) and ``center_crop`` at 224 (decode, crop, re-encode), with 1 worker (the
   per-core figure) and with ``--workers`` (the total); best of ``--pack-repeats`` (1), each into an empty folder.
2. loading, 224 px, batch 64, the same N training images, with W DataLoader workers for W in 1..--workers:
   (a) packed: the set packed at 256 (center_crop), read at 224 by ``PackedImages`` in the workers of a streamed
       ``TrainBatches``, then ``make_views`` with the "crop" augmentation (MAE's RandomResizedCrop, scale 0.2-1,
       bicubic, + flip) in the main process on the CPU, as training does;
   (b) folder: torchvision ``ImageFolder`` + ``DataLoader(num_workers=W)`` with ``RandomResizedCrop(224,
       scale=(0.2, 1), bicubic)`` (MAE's main_pretrain.py: the same work as (a)'s crop) + ``RandomHorizontalFlip``
       + ``PILToTensor`` on the same 256 px files;
   and (a) without the augmentation ("packed, no augment"): the workers' share, all the CPU does where the
   augmentation runs on a GPU.
   A warm-up pass, then the best of ``--repeats`` passes; each pass starts its workers anew (both paths). Per
   pass: images/s; images/s per worker (the issue's "per core"); and images per CPU-second, the CPU time of
   every process (main + workers, from getrusage) - (a)'s main process augments while (b)'s only waits, so
   per worker flatters (a) and per CPU-second is the fair per-core figure. Then one process's per-image costs
   on one thread (read, decode, centre crop, augment; open, decode, crop, flip, to tensor) say where time goes.
3. memory: ``genrep pretrain`` (supervised-digits at 256 px, patch 32, a few steps, 2 loader workers) and
   ``genrep probe`` of that run, on a set of ``--n-memory`` training images packed at 256 px; each command runs
   under a watcher process that reports ru_maxrss of its children (the largest single process: Linux does not
   sum a tree) and the peak, sampled every 0.2 s, of the whole tree's summed RSS and PSS (PSS splits the pages
   forked workers share, so it is the one that adds up). The issue's bound: under 2 GB.

The source JPEGs are CIFAR-10's upscaled bicubically to 256 px and saved at quality 90 (as
benchmarks/packed_formats.py makes them), one tenth as many again in val/; a made tree is kept for the next run
with the same counts. Everything is written under ``--out`` (a new temporary folder by default, removed at the
end); $GENREP_DATA points inside it, so the packed-shard verification cache does not land in ~/.cache.

    python benchmarks/packed_loading.py --n 2000 --workers 2 --n-memory 20000 --json /tmp/packed_loading.json
    python benchmarks/packed_loading.py --n 200 --n-memory 500          # the quick check, under 2 minutes
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

try:
    import genrep  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from genrep.errors import GenrepError  # noqa: E402
from genrep.io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402

SIDE, QUALITY = 256, 90          # the source files
READ_SIZE, BATCH = 224, 64       # what training reads
NPZ = Path("/work/shared/data/cifar10-jpeg.npz")
DONE = "source.json"             # written last: marks a finished source tree and its counts


# ---------------------------------------------------------------------------------------------- the source tree
def _write_images(job: tuple[str, str, list[tuple[int, int, str]]]) -> int:
    """One pool task: CIFAR JPEGs (by index into the npz's split) upscaled to SIDE and written to their paths."""
    from PIL import Image

    npz, split, todo = job
    data = np.load(npz, allow_pickle=False)   # arrays only: never unpickled
    jpeg, offsets = data[f"{split}_jpeg"], data[f"{split}_offsets"]
    for i, _, path in todo:
        small = Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
        out = io.BytesIO()
        small.resize((SIDE, SIDE), Image.BICUBIC).save(out, format="JPEG", quality=QUALITY)
        atomic_write_bytes(Path(path), out.getvalue())
    return len(todo)


def make_tree(npz: Path, n_train: int, root: Path, workers: int) -> dict:
    """root/train/c<label>/*.jpg (n_train, from CIFAR's train split, seeded, with repeats past 50,000) and
    root/val/c<label>/*.jpg (a tenth, at least 10, from its test split); kept when made before with these counts."""
    counts = {"train": n_train, "val": max(10, n_train // 10)}
    done = root / DONE
    if done.is_file() and json.loads(done.read_text()) == counts:
        return counts
    if root.exists():
        shutil.rmtree(root)
    data = np.load(npz, allow_pickle=False)
    jobs = []
    for split, npz_split in (("train", "train"), ("val", "test")):
        y = data[f"y_{npz_split}"]
        order = np.random.default_rng(0).permutation(len(y))
        chosen = order[np.arange(counts[split]) % len(y)]   # past the split's size: repeats, each once more
        todo = []
        for k, i in enumerate(chosen):
            folder = root / split / f"c{int(y[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            todo.append((int(i), int(y[i]), str(folder / f"{k:06d}.jpg")))
        jobs += [(str(npz), npz_split, todo[s:s + 500]) for s in range(0, len(todo), 500)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        sum(pool.map(_write_images, jobs))
    atomic_write_json(done, counts)
    return counts


# ---------------------------------------------------------------------------------------------- 1. packing
def pack_once(source: Path, out: Path, image_size: int | None, resize: str, workers: int) -> float:
    from genrep.data.pack import DEFAULT_QUALITY, DEFAULT_SHARD_SIZE, PackSettings, pack

    if out.exists():
        shutil.rmtree(out)
    settings = PackSettings(image_size, resize, DEFAULT_QUALITY, DEFAULT_SHARD_SIZE)
    t0 = time.perf_counter()
    pack(str(source), out, settings, workers=workers, progress=False, say=lambda line: None)
    return time.perf_counter() - t0


def measure_packing(source: Path, scratch: Path, images: int, workers: int, repeats: int) -> list[dict]:
    """Each pack with more than one worker starts spawned processes (which import torch) for the header check and
    again for the shards: a fixed cost of seconds that the total with --workers includes."""
    rows = []
    for resize, size in (("none", None), ("center_crop", READ_SIZE)):
        for w in sorted({1, workers}):
            best = min(pack_once(source, scratch / "pack-timing", size, resize, w) for _ in range(repeats))
            rows.append({"resize": resize if size is None else f"{resize} {size}", "workers": w,
                         "images": images, "seconds": best, "img_s": images / best,
                         "img_s_per_core": images / best / w})
    shutil.rmtree(scratch / "pack-timing", ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------- 2. loading
def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (DataLoader workers are joined when a pass ends)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(one_pass) -> tuple[int, float, float]:
    gc.collect()
    c0, t0 = cpu_seconds(), time.perf_counter()
    count = one_pass()
    gc.collect()   # drops the last loader iterator, so its workers are joined and their CPU time counted
    return count, time.perf_counter() - t0, cpu_seconds() - c0


def packed_pass(images, labels, workers: int, seed: int, augmented: bool = True) -> int:
    """One pass of genrep's streamed path: workers decode the batch, the main process augments it (on a GPU the
    augmentation runs on the device: ``augmented`` False leaves it out, the workers' share alone)."""
    import torch

    from genrep.data.batches import BatchPlan, TrainBatches, make_views

    plan = BatchPlan(len(labels), BATCH, seed)
    batches = TrainBatches(images, labels, plan, torch.device("cpu"), resident=False, num_workers=workers)
    count = 0
    for step, x, _ in batches(0, plan.steps_per_epoch):
        if augmented:
            x = make_views(x, {"x": "crop"}, seed, step, 0, BATCH)["x"]
        count += len(x)
    return count


def folder_transform():
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(READ_SIZE, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.PILToTensor()])


def folder_pass(root: Path, workers: int, seed: int) -> int:
    """One pass of the anchor: ImageFolder, the per-image transform in the workers, default collate."""
    import torch
    from torchvision.datasets import ImageFolder

    data = ImageFolder(str(root), transform=folder_transform())
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    count = 0
    for x, _ in loader:
        count += len(x)
    return count


def measure_loading(packed_root: Path, folder_root: Path, max_workers: int, repeats: int) -> list[dict]:
    from genrep.data.packed import PackedImages, read_labels, read_manifest

    m = read_manifest(packed_root)
    images = PackedImages(packed_root, m, "train", READ_SIZE, "center_crop")
    labels = read_labels(packed_root, m, "train")
    paths = {"packed": lambda w, s: packed_pass(images, labels, w, s),
             "packed, no augment": lambda w, s: packed_pass(images, labels, w, s, augmented=False),
             "folder": lambda w, s: folder_pass(folder_root, w, s)}
    rows = []
    for w in range(1, max_workers + 1):
        for name, one_pass in paths.items():
            one_pass(w, 0)   # warm-up: page cache, imports, first-touch allocations
            runs = [timed(lambda: one_pass(w, seed)) for seed in range(1, repeats + 1)]
            count, wall, cpu = min(runs, key=lambda r: r[1])
            rows.append({"path": name, "workers": w, "images": count, "seconds": wall, "cpu_seconds": cpu,
                         "img_s": count / wall, "img_s_per_worker": count / wall / w, "img_per_cpu_s": count / cpu})
    return rows


def per_image_costs(packed_root: Path, folder_root: Path, sample: int) -> dict:
    """Microseconds per image of each step, one process, one thread, over the first ``sample`` images."""
    import torch
    from PIL import Image

    from genrep.data.augment import augment
    from genrep.data.packed import PackedImages, decode_image_bytes, read_manifest
    from genrep.data.resize import center_crop_tensor

    def clock(fn, items):
        t0 = time.perf_counter()
        out = [fn(item) for item in items]
        return out, (time.perf_counter() - t0) / len(items) * 1e6

    m = read_manifest(packed_root)
    images = PackedImages(packed_root, m, "train", READ_SIZE, "center_crop")
    idx = list(range(min(sample, len(images))))
    images.record(0)   # the shard opened before the clock starts
    costs = {}
    records, costs["packed: read record"] = clock(images.record, idx)
    decoded, costs["packed: decode_jpeg (tv)"] = clock(lambda b: decode_image_bytes(b, 3, "image"), records)
    _, costs["packed: centre crop 256->224 (PIL)"] = clock(
        lambda x: center_crop_tensor(x[None], READ_SIZE, "image"), decoded)
    batches = [idx[k:k + BATCH] for k in range(0, len(idx) - BATCH + 1, BATCH)] or [idx]
    t0 = time.perf_counter()
    xs = [images[b] for b in batches]   # what a worker runs: PackedImages[list] -> uint8 [b, 3, 224, 224]
    costs["packed: PackedImages[batch] (all of the above)"] = (time.perf_counter() - t0) / sum(map(len, xs)) * 1e6
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for x in xs:
        augment(x, "crop", g)
    costs["packed: augment crop, batched (main)"] = (time.perf_counter() - t0) / sum(map(len, xs)) * 1e6

    files = sorted(folder_root.rglob("*.jpg"))[:len(idx)]
    crop = folder_transform().transforms
    raw, costs["folder: read file"] = clock(lambda p: p.read_bytes(), files)
    pil, costs["folder: PIL open + decode RGB"] = clock(lambda b: Image.open(io.BytesIO(b)).convert("RGB"), raw)
    cropped, costs["folder: RandomResizedCrop bicubic"] = clock(crop[0], pil)
    flipped, costs["folder: RandomHorizontalFlip"] = clock(crop[1], cropped)
    tensors, costs["folder: PILToTensor"] = clock(crop[2], flipped)
    stacked = max(1, len(tensors) // BATCH * BATCH)
    t0 = time.perf_counter()
    for k in range(0, len(tensors) - BATCH + 1, BATCH):
        torch.utils.data.default_collate(tensors[k:k + BATCH])
    costs["folder: default_collate (stack)"] = (time.perf_counter() - t0) / stacked * 1e6
    return costs


# ---------------------------------------------------------------------------------------------- 3. memory
def _tree(root_pid: int) -> list[int]:
    """root_pid and its descendants, from /proc."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue   # gone meanwhile
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [c for c, p in parent.items() if p == pid]
    return tree


def _rss_pss_kb(pid: int) -> tuple[int, int]:
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return fields.get("Rss", 0), fields.get("Pss", 0)


def watch(cmd: list[str]) -> dict:
    """Run cmd; its exit code, wall time, ru_maxrss of its children and the sampled peak of its tree's RSS and PSS.
    Runs in a process of its own (--watch), so RUSAGE_CHILDREN holds only cmd's tree."""
    t0 = time.perf_counter()
    err = tempfile.TemporaryFile(mode="w+")   # a file, not a pipe: a chatty child never blocks on a full pipe
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
    peak_rss = peak_pss = peak_procs = 0
    while proc.poll() is None:
        sizes = [_rss_pss_kb(p) for p in _tree(proc.pid)]
        peak_rss = max(peak_rss, sum(s[0] for s in sizes))
        peak_pss = max(peak_pss, sum(s[1] for s in sizes))
        peak_procs = max(peak_procs, len(sizes))
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    err.seek(0)
    return {"rc": proc.returncode, "seconds": seconds, "error": [line[-200:] for line in err.read().strip().splitlines()[-3:]],
            "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "tree_rss_mb": peak_rss / 1024, "tree_pss_mb": peak_pss / 1024, "processes": peak_procs}


def watched(cmd: list[str], env: dict) -> dict:
    run = subprocess.run([sys.executable, __file__, "--watch", json.dumps(cmd)], capture_output=True, text=True,
                         env=env)
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"rc": run.returncode, "error": run.stderr.strip().splitlines()[-3:]}


def measure_memory(scratch: Path, n: int, workers: int, steps: int) -> list[dict]:
    source = scratch / "memory-source"
    counts = make_tree(NPZ, n, source, workers)
    packed = scratch / "memory-packed"
    seconds = pack_once(source, packed, SIDE, "center_crop", workers)
    env = {**os.environ, "GENREP_DATA": str(scratch / "genrep-data"), "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    run = scratch / "memory-run"
    shutil.rmtree(run, ignore_errors=True)
    genrep_cli = [sys.executable, "-c", "import sys; from genrep.cli import main; sys.exit(main())"]
    pretrain = genrep_cli + ["pretrain", "--recipe", "supervised-digits", "--out", str(run),
                             "--data.name", f"packed:{packed}", "--data.image_size", str(SIDE),
                             "--model.patch_size", "32", "--data.num_workers", "2", "--train.steps", str(steps),
                             "--train.batch_size", str(BATCH), "--train.device", "cpu", "--train.progress", "false"]
    # one weight decay: the probe's L-BFGS fits work on the 128-d features, not the images, so fitting four
    # (the default) only lengthens the run without changing the peak, which is the features' extraction
    probe = genrep_cli + ["probe", str(run), "--device", "cpu", "--probe.weight_decay", "0.001"]
    rows = []
    for name, cmd in (("pretrain", pretrain), ("probe", probe)):
        r = watched(cmd, env)
        rows.append({"command": name, "train_images": counts["train"], "test_images": counts["val"],
                     "raw_pixels_gb": counts["train"] * 3 * SIDE * SIDE / 1e9, "pack_seconds": seconds, **r})
        if r.get("rc") != 0:
            break   # no run to probe
    return rows


# ---------------------------------------------------------------------------------------------- tables
def markdown(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def tables(result: dict) -> str:
    out = [f"machine: {result['cpu']} ({result['cores']} cores), torch {result['torch']}, torchvision "
           f"{result['torchvision']}, Pillow {result['pillow']}, main-process torch threads {result['threads']}; "
           f"load average {result['load_start']} at start, {result['load_end']} at end"]
    p = result["packing"]
    out.append(markdown(["pack --resize", "workers", "images", "s", "img/s", "img/s per core"],
                        [[r["resize"], r["workers"], r["images"], f"{r['seconds']:.2f}", f"{r['img_s']:.0f}",
                          f"{r['img_s_per_core']:.0f}"] for r in p]))
    loading = result["loading"]
    rows = []
    for r in loading:
        other = next(o for o in loading if o["workers"] == r["workers"] and o["path"] == "folder")
        ratio = (f"{r['img_s_per_worker'] / other['img_s_per_worker']:.2f}x / "
                 f"{r['img_per_cpu_s'] / other['img_per_cpu_s']:.2f}x" if r["path"] != "folder" else "1")
        rows.append([r["path"], r["workers"], r["images"], f"{r['img_s']:.0f}", f"{r['img_s_per_worker']:.0f}",
                     f"{r['img_per_cpu_s']:.0f}", ratio])
    out.append(markdown(["loading 224 px", "workers", "images", "img/s", "img/s per worker", "img per CPU-s",
                         "packed/folder (per worker / per CPU-s)"], rows))
    out.append(markdown(["per image, 1 process, 1 thread", "us"],
                        [[k, f"{v:.0f}"] for k, v in result["costs"].items()]))
    if result.get("memory"):
        out.append(markdown(["memory", "train/test images", "raw pixels GB", "rc", "s", "ru_maxrss MB (largest "
                             "process)", "tree RSS MB (peak)", "tree PSS MB (peak)", "processes", "PSS < 2 GB"],
                            [[r["command"], f"{r['train_images']}/{r['test_images']}", f"{r['raw_pixels_gb']:.2f}",
                              r.get("rc"), f"{r.get('seconds', 0):.0f}", f"{r.get('maxrss_mb', 0):.0f}",
                              f"{r.get('tree_rss_mb', 0):.0f}", f"{r.get('tree_pss_mb', 0):.0f}",
                              r.get("processes", "-"), "yes" if r.get("rc") == 0 and r["tree_pss_mb"] < 2000
                              else "NO"] for r in result["memory"]]))
        for r in result["memory"]:
            if r.get("rc") != 0:
                out.append(f"{r['command']} failed: " + " / ".join(r.get("error", [])))
    return "\n\n".join(out)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="training images for packing and loading (val: a tenth)")
    p.add_argument("--workers", type=int, default=2, help="the most DataLoader workers and pack workers")
    p.add_argument("--out", type=Path, help="scratch folder (kept); default: a temporary one, removed at the end")
    p.add_argument("--skip-memory", action="store_true", help="leave out the pretrain/probe memory figures")
    p.add_argument("--n-memory", type=int, default=20000, help="training images of the memory set (256 px)")
    p.add_argument("--memory-steps", type=int, default=5, help="pretrain steps in the memory figure")
    p.add_argument("--repeats", type=int, default=3, help="timed loading passes, the best kept")
    p.add_argument("--pack-repeats", type=int, default=1, help="timed packs of each setting, the best kept")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process (workers use 1)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--npz", type=Path, default=NPZ, help="CIFAR-10 as JPEG bytes (the source of the 256 px files)")
    p.add_argument("--watch", help=argparse.SUPPRESS)   # the memory watcher's own process
    args = p.parse_args()
    if args.watch:
        print(json.dumps(watch(json.loads(args.watch))))
        return
    if min(args.n, args.n_memory) < BATCH or min(args.workers, args.repeats, args.pack_repeats, args.threads) < 1:
        raise GenrepError(f"--n and --n-memory take at least {BATCH} images (one batch); --workers, --repeats, "
                          f"--pack-repeats and --threads at least 1")
    if not args.npz.is_file():
        raise GenrepError(f"--npz {args.npz} does not exist; give CIFAR-10's JPEG npz (train_jpeg, train_offsets, "
                          f"y_train, test_jpeg, test_offsets, y_test)")
    import PIL
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    scratch = args.out or Path(tempfile.mkdtemp(prefix="packed-loading-"))
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["GENREP_DATA"] = str(scratch / "genrep-data")   # the shard-verification cache, kept in scratch
    result = {"cpu": cpu_model(), "processor": platform.processor(), "cores": os.cpu_count(),
              "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
              "threads": args.threads, "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    print(f"# {result['cpu']} | platform.processor() {result['processor']!r} | torch {result['torch']}",
          file=sys.stderr, flush=True)
    try:
        source = scratch / "source"
        counts = make_tree(args.npz, args.n, source, args.workers)
        total = counts["train"] + counts["val"]
        print(f"# source: {counts} under {source}", file=sys.stderr, flush=True)
        result["packing"] = measure_packing(source, scratch, total, args.workers, args.pack_repeats)
        print("# packing done", file=sys.stderr, flush=True)
        packed = scratch / "packed-256"
        pack_once(source, packed, SIDE, "center_crop", args.workers)
        result["loading"] = measure_loading(packed, source / "train", args.workers, args.repeats)
        print("# loading done", file=sys.stderr, flush=True)
        result["costs"] = per_image_costs(packed, source / "train", min(512, args.n))
        if not args.skip_memory:
            result["memory"] = measure_memory(scratch, args.n_memory, args.workers, args.memory_steps)
        result["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(tables(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except GenrepError as e:
        sys.exit(f"error: {e}")
