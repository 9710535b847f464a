"""``genrep predict RUN IMAGES... [-o CSV] [--coverage C | --max-risk R] [--data NAME]``: the images of files,
folders or a data set's split through :mod:`genrep.predict`, one CSV row each. An image that cannot be read is
named on stderr and left out; the others are predicted, and the command ends with exit status 1."""

from __future__ import annotations

import csv
import io as _io
import sys
from pathlib import Path

from .errors import GenrepError

HEADER = ["image", "class", "class_name", "probability", "score", "abstain"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and the image files under the folders named (sorted), in order."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise GenrepError(f"{p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise GenrepError(f"{p} does not exist; give image files or folders of them")
    return out


def read_files(files: list[Path], run):
    """(names, uint8 images at the run's size, the names that could not be read, with why)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    names, images, failed = [], [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(run.images(im))
            names.append(str(f))
        except (OSError, UnidentifiedImageError, ValueError, GenrepError) as e:
            failed.append(f"{f} ({' '.join(str(e).split())[:120] or type(e).__name__})")
    empty = torch.zeros((0, run.method.data.channels, run.method.data.image_size, run.method.data.image_size),
                        dtype=torch.uint8)
    return names, torch.cat(images) if images else empty, failed


def read_split(name: str, split: str, run):
    from .data.datasets import load_dataset

    d = run.method.data
    s = load_dataset(name, split, image_size=d.image_size, root=run.config.data.root, download=False)
    if s.channels != d.channels:
        raise GenrepError(f"{name} has {s.channels}-channel images and {run.path} reads {d.channels}-channel ones")
    return [f"{name}/{split}/{i}" for i in range(len(s))], s.images


def _is_ours(path: Path) -> bool:
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), None) == HEADER
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def cmd_predict(args, rest: list[str]) -> int:
    import torch

    from .io import atomic_write_json, atomic_write_text, check_overwrite
    from .predict import check_request, fit, predict, read_saved, save_gaussian, saved_path
    from .run import Run

    request = check_request(args.coverage, args.max_risk)
    if not args.images and args.data is None:
        raise GenrepError("genrep predict needs images: files, folders, or --data NAME (with --split)")
    out = args.out or Path(args.run) / "results" / "predictions.csv"
    check_overwrite(out, _is_ours, "predictions CSV", args.force)
    files = image_files(list(args.images))
    with Run.open(args.run, "predict", device=args.device) as run:
        record, gaussian = read_saved(run, request), None
        if record is None:
            record, gaussian = fit(run, request)
            if gaussian is not None:   # before the threshold that names it
                save_gaussian(run, gaussian)
            atomic_write_json(saved_path(run), record, "the fitted threshold")
            how = "fitted on " + record["fitted_on"]["how"]
        else:
            how = f"reused from {saved_path(run)}"
        names, images, failed = read_files(files, run)
        if args.data is not None:
            more, split_images = read_split(args.data, args.split, run)
            names, images = names + more, torch.cat([images, split_images])
        rows = predict(run, images, record, gaussian) if len(names) else None
        buf = _io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(HEADER)
        classes = record.get("classes") or []
        for i, name in enumerate(names):
            c = int(rows["classes"][i])
            writer.writerow([name, c, classes[c] if c < len(classes) else "", f"{float(rows['probabilities'][i]):.6f}",
                             f"{float(rows['scores'][i]):.6g}", str(bool(rows["abstain"][i])).lower()])
        atomic_write_text(out, buf.getvalue(), "predictions CSV")
    answered = 0 if rows is None else int((~rows["abstain"]).sum())
    held = record["held_out"]
    print(f"{len(names)} images: {answered} answered, {len(names) - answered} abstained on ({record['score']} below "
          f"{record['threshold']:.6g}; {how}; on the held-out half: coverage {held['coverage']:.3f}, selective risk "
          f"{'-' if held['selective_risk'] is None else format(held['selective_risk'], '.3f')}, AURC "
          f"{held['aurc']:.4f}): {out}")
    for line in failed:
        print(f"genrep: error: cannot read {line}; left out", file=sys.stderr)
    return 1 if failed else 0


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a trained run, abstaining on those it should not answer "
                       "(a threshold on the run's best OOD score, fitted on held-out data and saved in the run)")
    p.add_argument("run", type=Path, metavar="RUN")
    p.add_argument("images", type=Path, nargs="*", metavar="IMAGES", help="image files or folders of them")
    p.add_argument("-o", "--out", type=Path, default=None, help="the CSV (default RUN/results/predictions.csv)")
    p.add_argument("--coverage", type=float, default=None, help="the share of in-distribution images answered "
                   "(0, 1]; default 0.95")
    p.add_argument("--max-risk", type=float, default=None, help="or: the largest coverage whose error rate among the "
                   "answered stays within this, (0, 1)")
    p.add_argument("--data", default=None, metavar="NAME", help="also predict a data set's split (--split)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="overwrite -o even if genrep did not write it")
