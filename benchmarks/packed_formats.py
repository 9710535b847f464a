"""Storage libraries for ``genrep pack`` (issue 28), measured on the same JPEG records: litdata,
webdataset (tar shards, read by index through ``wids``), mosaicml-streaming (MDS) and Hugging Face
``datasets`` (Arrow), beside a baseline folder of one file per image.

genrep's loader picks every step's images by its own seeded permutation and each rank reads its slice by
global index, so what matters is ``get(i) -> (jpeg_bytes, label)`` for any i, from forked DataLoader
workers, with memory that does not grow with the data set. Per library this writes the records in shards
of ``--per-shard`` and measures, in one process on one thread (best of ``--repeats``):

    write s       writing all records (the baseline folder is the source itself: n/a)
    seq rec/s     get(i) in index order, bytes + label
    rand rec/s    get(i) in a fixed random order
    +tv img/s     the random order plus torchvision.io.decode_jpeg
    +PIL img/s    the random order plus PIL decode to an RGB array
    fork          2 forked DataLoader workers fed index lists by a batch_sampler return the right
                  bytes, in order (the reader was opened and read in the parent first)
    maxrss MB     growth of the peak resident set over the seq and rand passes (ru_maxrss)
    anon MB       growth of anonymous (non-file) resident memory over the same passes; memory-mapped
                  shards show in the peak as file pages the kernel can drop, not here
    disk          bytes on disk over the raw JPEG bytes

The project does not depend on these libraries: run it from a scratch environment that has them (genrep
itself is taken from this checkout's src/ when that environment lacks it). Each library runs in its own
subprocess so that one's memory or import failure leaves the others' figures alone; one that is not
installed is reported as missing.

    python benchmarks/packed_formats.py --n 4000 --out /tmp/fmtdata --libs folder,webdataset,mds,datasets
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

try:
    import genrep  # noqa: F401
except ImportError:  # a scratch environment with the libraries but not genrep: the checkout's source
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from genrep.errors import GenrepError  # noqa: E402
from genrep.io import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402

LIBS = ("folder", "litdata", "webdataset", "mds", "datasets")
MODULES = {"folder": [], "litdata": ["litdata"], "webdataset": ["webdataset", "wids"], "mds": ["streaming"],
           "datasets": ["datasets"]}
SIDE = 256
QUALITY = 90


# ---- the source records: CIFAR-10's JPEGs upscaled to 256 px, so that the JPEG sizes are realistic ----

def make_source(npz: Path, n: int, folder: Path) -> None:
    """Writes ``folder/NNNNN.jpg`` and ``labels.json``; kept when already made for the same n."""
    from PIL import Image

    labels_path = folder / "labels.json"
    if labels_path.exists() and len(json.loads(labels_path.read_text())) == n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    data = np.load(npz, allow_pickle=False)  # an npz of arrays only: never unpickled
    jpeg, offsets, y = data["train_jpeg"], data["train_offsets"], data["y_train"]
    # the npz is ordered by class: a seeded choice mixes the classes as a real folder would
    chosen = np.random.default_rng(0).choice(len(y), size=n, replace=False)
    for k, i in enumerate(chosen):
        small = Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
        out = io.BytesIO()
        small.resize((SIDE, SIDE), Image.BICUBIC).save(out, format="JPEG", quality=QUALITY)
        atomic_write_bytes(folder / f"{k:05d}.jpg", out.getvalue())
    atomic_write_json(labels_path, [int(y[i]) for i in chosen])  # written last: it marks the folder complete


def load_source(folder: Path) -> tuple[list[bytes], list[int]]:
    labels = json.loads((folder / "labels.json").read_text())
    if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
        raise GenrepError(f"{folder / 'labels.json'} is not a list of int labels: remove the folder to make "
                          "it again")
    return [(folder / f"{k:05d}.jpg").read_bytes() for k in range(len(labels))], labels


# ---- one writer and one reader per library; every reader has get(i) -> (bytes, int) ----

class FolderReader:
    """The baseline: one file per image, open().read() by index."""

    def __init__(self, folder: Path, labels: list[int]):
        self.paths = [folder / f"{k:05d}.jpg" for k in range(len(labels))]
        self.labels = labels

    def get(self, i: int) -> tuple[bytes, int]:
        with open(self.paths[i], "rb") as f:
            return f.read(), self.labels[i]


def write_litdata(out: Path, jpegs, labels, per_shard: int) -> None:
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(out), chunk_size=per_shard)
    for i, (b, y) in enumerate(zip(jpegs, labels)):
        writer[i] = {"jpeg": b, "label": y}
    writer.done()
    writer.merge()


class LitdataReader:
    def __init__(self, out: Path):
        import litdata

        self.ds = litdata.StreamingDataset(str(out))

    def get(self, i: int) -> tuple[bytes, int]:
        item = self.ds[i]
        return item["jpeg"], int(item["label"])


def write_webdataset(out: Path, jpegs, labels, per_shard: int) -> None:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    shards = []
    # plain ustar headers and a fixed mtime: the default pax headers carry the write time (a shard's sha256 would
    # change on every write) and take 3 blocks of 512 bytes per member instead of 1
    with wds.ShardWriter(str(out / "shard-%05d.tar"), maxcount=per_shard, verbose=0, mtime=1,
                         format=tarfile.USTAR_FORMAT) as sink:
        for i, (b, y) in enumerate(zip(jpegs, labels)):
            sink.write({"__key__": f"{i:08d}", "jpg": b, "cls": str(y).encode()})
    for k in range(0, len(jpegs), per_shard):  # ShardWriter starts a shard every per_shard records
        shards.append({"url": str(out / f"shard-{k // per_shard:05d}.tar"),
                       "nsamples": min(per_shard, len(jpegs) - k)})
    atomic_write_json(out / "shards.json", shards)


class WebdatasetReader:
    """Random access by index through wids (webdataset's indexed reader, a package of its own since
    webdataset 1.0)."""

    def __init__(self, out: Path):
        import wids

        shards = json.loads((out / "shards.json").read_text())
        # the shards are local: opened where they are, not copied into wids' download cache
        self.ds = wids.ShardListDataset(shards, localname=lambda url: url, transformations=[], lru_size=64)

    def get(self, i: int) -> tuple[bytes, int]:
        s = self.ds[i]  # wids hands each member back as a BytesIO
        return s[".jpg"].getvalue(), int(s[".cls"].getvalue())


def webdataset_iterate(out: Path) -> int:
    """webdataset's own streaming path, sequential only: the records it yields."""
    import webdataset as wds

    urls = [s["url"] for s in json.loads((out / "shards.json").read_text())]
    count = 0
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        count += len(s["jpg"]) > 0 and int(s["cls"]) >= 0
    return count


def write_mds(out: Path, jpegs, labels, per_shard: int) -> None:
    from streaming import MDSWriter

    # MDS shards by bytes, not records: aim at per_shard records of the mean size
    limit = int(sum(map(len, jpegs)) / len(jpegs) * per_shard * 1.02) + 4096
    with MDSWriter(out=str(out), columns={"jpeg": "bytes", "label": "int"}, size_limit=limit) as w:
        for b, y in zip(jpegs, labels):
            w.write({"jpeg": b, "label": y})


class MdsReader:
    def __init__(self, out: Path):
        from streaming import StreamingDataset

        self.ds = StreamingDataset(local=str(out), batch_size=1)

    def get(self, i: int) -> tuple[bytes, int]:
        item = self.ds.get_item(i)
        return item["jpeg"], int(item["label"])


def write_datasets(out: Path, jpegs, labels, per_shard: int) -> None:
    import datasets

    features = datasets.Features({"jpeg": datasets.Value("binary"), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"jpeg": jpegs, "label": labels}, features=features)
    ds.save_to_disk(str(out), num_shards=-(-len(jpegs) // per_shard))


class DatasetsReader:
    def __init__(self, out: Path):
        import datasets

        self.ds = datasets.load_from_disk(str(out))  # memory-mapped Arrow files

    def get(self, i: int) -> tuple[bytes, int]:
        row = self.ds[i]
        return row["jpeg"], int(row["label"])


WRITERS = {"litdata": write_litdata, "webdataset": write_webdataset, "mds": write_mds,
           "datasets": write_datasets}
READERS = {"litdata": LitdataReader, "webdataset": WebdatasetReader, "mds": MdsReader,
           "datasets": DatasetsReader}
ACCESS = {"folder": "open(path).read()", "litdata": "StreamingDataset(dir)[i]",
          "webdataset": "wids.ShardListDataset(shards)[i]", "mds": "StreamingDataset(local=dir).get_item(i)",
          "datasets": "load_from_disk(dir)[i]"}


# ---- measurements, in the subprocess of one library ----

def best_rate(fn, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return count / min(times)


def rss_mb() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    fields["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return fields


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class ByIndex:
    """A map-style dataset over a reader, as genrep's loader would hold one."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return 1 << 62

    def __getitem__(self, i):
        return self.reader.get(int(i))


def fork_check(reader, order: np.ndarray, expected: str) -> str:
    import torch

    batches = [order[k:k + 50].tolist() for k in range(0, len(order), 50)]
    loader = torch.utils.data.DataLoader(ByIndex(reader), batch_sampler=batches, num_workers=2,
                                         multiprocessing_context="fork", collate_fn=lambda b: b)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    try:
        for batch in loader:
            for b, y in batch:
                h.update(b)
                h.update(str(y).encode())
    except Exception as e:  # a library that cannot serve forked workers is a finding, not a crash
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    rate = len(order) / (time.perf_counter() - t0)
    return f"ok ({rate:.0f} rec/s)" if h.hexdigest() == expected else "wrong bytes"


def digest(pairs) -> str:
    h = hashlib.sha256()
    for b, y in pairs:
        h.update(b)
        h.update(str(y).encode())
    return h.hexdigest()


def measure_one(lib: str, args) -> dict:
    import torch
    import torchvision.io
    from PIL import Image

    torch.set_num_threads(1)
    jpegs, labels = load_source(args.out / "source")
    n = len(jpegs)
    raw = sum(map(len, jpegs))
    order = np.random.default_rng(1).permutation(n)
    result = {"lib": lib, "n": n, "raw_mb": raw / 2**20, "access": ACCESS[lib]}
    if lib == "folder":
        target = args.out / "source"
        reader = FolderReader(target, labels)
        result["write_s"] = None
    else:
        writes = []
        for k in range(args.repeats):
            target = args.out / lib / f"try{k}"
            if target.exists():  # each try writes into an empty folder
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            WRITERS[lib](target, jpegs, labels, args.per_shard)
            writes.append(time.perf_counter() - t0)
        result["write_s"] = min(writes)
        result["files"] = sorted(p.name for p in target.iterdir())
        reader = READERS[lib](target)
    result["disk_ratio"] = disk_bytes(target) / raw if lib != "folder" else 1.0
    expected_order = digest((jpegs[i], labels[i]) for i in order)
    del jpegs  # the source bytes out of the way of the memory figures

    reader.get(0)  # opened and touched before the fork, as a loader's dataset would be
    before = rss_mb()
    result["seq_rec_s"] = best_rate(lambda: [reader.get(i) for i in range(n)], n, args.repeats)
    got = [reader.get(int(i)) for i in order]
    result["correct"] = digest(got) == expected_order
    del got
    result["rand_rec_s"] = best_rate(lambda: [reader.get(int(i)) for i in order], n, args.repeats)
    after = rss_mb()
    result["maxrss_growth_mb"] = after["maxrss"] - before["maxrss"]
    result["anon_growth_mb"] = after.get("RssAnon", 0) - before.get("RssAnon", 0)
    result["rss_file_mb"] = after.get("RssFile", 0)
    if lib == "webdataset":
        result["tar_iter_rec_s"] = best_rate(lambda: webdataset_iterate(target), n, args.repeats)

    def decode_tv():
        for i in order:
            b, _ = reader.get(int(i))
            torchvision.io.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))

    def decode_pil():
        for i in order:
            b, _ = reader.get(int(i))
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    result["tv_img_s"] = best_rate(decode_tv, n, args.repeats)
    result["pil_img_s"] = best_rate(decode_pil, n, args.repeats)
    result["fork"] = fork_check(reader, order, expected_order)
    return result


# ---- the driver: one subprocess per library, then the table ----

def missing(lib: str) -> str | None:
    import importlib.util

    absent = [m for m in MODULES[lib] if importlib.util.find_spec(m) is None]
    return ", ".join(absent) or None


def version(lib: str) -> str:
    from importlib.metadata import PackageNotFoundError, version as v

    names = {"litdata": ["litdata"], "webdataset": ["webdataset", "wids"], "mds": ["mosaicml-streaming"],
             "datasets": ["datasets", "pyarrow"]}.get(lib, [])
    found = []
    for name in names:
        try:
            found.append(f"{name} {v(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found) or "-"


def fmt(x, spec=".0f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    head = ("| library | version | get(i) | write s | seq rec/s | rand rec/s | +tv img/s | +PIL img/s "
            "| fork, 2 workers | maxrss +MB | anon +MB | disk/raw |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['lib']} | {r.get('version', '-')} | {r['error']} |" + " |" * 9)
            continue
        seq = fmt(r["seq_rec_s"])
        if "tar_iter_rec_s" in r:
            seq += f" (tar iter {r['tar_iter_rec_s']:.0f})"
        lines.append(
            f"| {r['lib']} | {r['version']} | `{r['access']}` | {fmt(r['write_s'], '.2f')} | {seq} | "
            f"{fmt(r['rand_rec_s'])}{'' if r['correct'] else ' WRONG'} | {fmt(r['tv_img_s'])} | "
            f"{fmt(r['pil_img_s'])} | {r['fork']} | {r['maxrss_growth_mb']:.0f} | "
            f"{r['anon_growth_mb']:.0f} | {r['disk_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000, help="records (images)")
    p.add_argument("--out", type=Path, default=Path("/tmp/fmtdata"),
                   help="scratch folder for the source images and the shards")
    p.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated, of {','.join(LIBS)}")
    p.add_argument("--per-shard", type=int, default=1000, help="records per shard")
    p.add_argument("--repeats", type=int, default=3, help="timings repeated, the best kept")
    p.add_argument("--npz", type=Path, default=Path("/work/shared/data/cifar10-jpeg.npz"))
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--one", choices=LIBS, help=argparse.SUPPRESS)  # the subprocess of one library
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return
    libs = [s for s in args.libs.split(",") if s]
    unknown = [s for s in libs if s not in LIBS]
    if unknown or args.n < 1 or args.per_shard < 1:
        raise GenrepError(f"--libs takes names of {','.join(LIBS)} (got {','.join(unknown) or args.libs}); "
                          "--n and --per-shard take positive counts")
    make_source(args.npz, args.n, args.out / "source")
    results = []
    for lib in libs:
        absent = missing(lib)
        if absent:
            results.append({"lib": lib, "error": f"missing: {absent} not installed"})
            continue
        cmd = [sys.executable, __file__, "--one", lib, "--out", str(args.out), "--n", str(args.n),
               "--per-shard", str(args.per_shard), "--repeats", str(args.repeats)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        last = (run.stdout.strip().splitlines() or [""])[-1]
        try:
            r = json.loads(last)
        except json.JSONDecodeError:
            tail = (run.stderr.strip().splitlines() or ["no output"])[-1][:100]
            r = {"lib": lib, "error": f"failed: {tail}"}
        r["version"] = version(lib)
        results.append(r)
        print(f"{lib}: {json.dumps(r)}", file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    try:
        main()
    except GenrepError as e:
        sys.exit(f"error: {e}")
