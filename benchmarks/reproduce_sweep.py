"""Every runnable spec at one scale, one after another, and the table of their verdicts (docs/benchmarks.md's
"Papers' tables at smoke scale").

    python benchmarks/reproduce_sweep.py --scale smoke --out runs/sweep-smoke [--only hybvit darl] [--threads 1]

Two processes with disjoint --only lists share two cores; the same --out lets each reuse the other's rows.

Each spec is reproduced into OUT/<paper>-<table> with every earlier reproduction under OUT as ``--reuse``, so a row
whose config another spec already trained is copied, not trained again. A spec that stops (a missing tokenizer run,
data not found) is recorded with its one-line error and the sweep goes on. OUT/sweep.json holds per spec the verdict,
the rows' values and the seconds; the Markdown table is printed at the end (and with --table-only, from OUT alone).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def specs_at(scale: str, only: list[str]) -> list[str]:
    from genrep.reproduce import load_spec, spec_names

    names = [n for n in spec_names() if not only or n.split("/")[0] in only or n in only]
    specs = [load_spec(n) for n in names]   # each read and checked once
    return [s.name for s in specs if s.runnable and scale in s.scales]


def sweep(scale: str, out: Path, only: list[str], log) -> None:
    from genrep.errors import GenrepError
    from genrep.io import atomic_write_json
    from genrep.reproduce import is_reproduction, reproduce

    out.mkdir(parents=True, exist_ok=True)
    record_path = out / f"sweep-{'-'.join(o.replace('/', '-') for o in only) or 'all'}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    for name in specs_at(scale, only):
        if record.get(name, {}).get("verdict"):
            continue
        t0 = time.perf_counter()
        folder = out / name.replace("/", "-")
        try:
            earlier = [out] if any(map(is_reproduction, out.iterdir())) else []
            doc = reproduce(name, scale, folder, 1, say=log, reuse=earlier)
            record[name] = {"verdict": doc["verdict"], "rows": {r: v["mean"] for r, v in doc["rows"].items()},
                            "copied": sorted(doc["copied"])}
        except GenrepError as e:
            record[name] = {"error": str(e)}
        record[name]["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"sweep: {name}: {record[name].get('verdict', {}).get('result') or record[name].get('error')} "
            f"({record[name]['seconds']} s)")
        atomic_write_json(record_path, record)


def table(out: Path) -> str:
    from genrep.reproduce import load_spec

    record = {}
    for p in sorted(out.glob("sweep-*.json")):
        record.update(json.loads(p.read_text()))
    lines = ["| spec | metric | rows, best first by the claim (genrep's value) | verdict | s |",
             "| --- | --- | --- | --- | --- |"]
    for name in sorted(record):
        r, spec = record[name], load_spec(name)
        if "error" in r:
            lines.append(f"| {name} | | stopped: {r['error']} | | {r['seconds']:.0f} |")
            continue
        vals = ", ".join(f"{row} {r['rows'][row]:.3g}" for row in spec.comparison)
        unit = f" ({spec.metric['unit'].strip()})" if spec.metric["unit"].strip() else ""
        lines.append(f"| {name} | {spec.metric['name']}{unit} | {vals} | "
                     f"{r['verdict']['result']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="smoke")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=[],
                    help="papers (hybvit gcrl darl gvp diffusion-features) or specs (hybvit/table5-epochs)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        sweep(args.scale, args.out, args.only, lambda m: print(m, flush=True))
    print(table(args.out))


if __name__ == "__main__":
    main()
