"""`genrep reproduce SPEC [--scale S] [--out DIR] [--seeds N] [--reuse DIR] [--data NAME]` and
`genrep reproduce --list`."""

from __future__ import annotations

from pathlib import Path

from .errors import GenrepError


def spec_table() -> str:
    """Every shipped spec, a line each: its name, whether it runs here (runnable, needs data, not implemented) and
    why not, its scales and its claim."""
    from .reproduce import load_spec, spec_names

    lines = []
    for name in spec_names():
        s = load_spec(name)
        how = f"runnable ({', '.join(s.scales)})" if s.runnable else f"{s.status}: {s.why}"
        lines.append(f"{name:34s} {s.table:10s} {how}\n{'':34s} claim: {s.claim}")
    return "\n".join(lines)


def cmd_reproduce(args, rest: list[str]) -> int:
    import os

    from .eval.report.summary import reproduction_table
    from .reproduce import reproduce

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GenrepError("genrep reproduce runs in one process (its rows one after another); start it without "
                          "torchrun, or train a row with torchrun ... genrep pretrain")
    if args.list:
        if args.spec is not None:
            raise GenrepError("genrep reproduce --list takes no spec; run genrep reproduce SPEC to run one")
        print(spec_table())
        return 0
    if args.spec is None:
        raise GenrepError("genrep reproduce needs a spec (genrep reproduce --list shows them), e.g. genrep reproduce "
                          "hybvit/table1-accuracy --scale smoke")
    doc = reproduce(args.spec, args.scale, args.out, args.seeds, runs_dir=args.runs_dir, reuse=args.reuse,
                    data=args.data)
    print(reproduction_table(doc))
    print(f"results: {Path(doc['out']) / 'reproduce.json'}; page: {doc['page']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="run a paper's table as a spec (rows trained and evaluated, resumable) and "
                       "set the paper's numbers beside genrep's, with whether the paper's claim holds at this scale")
    p.add_argument("spec", nargs="?", default=None, metavar="SPEC", help="a spec name, e.g. hybvit/table1-accuracy")
    p.add_argument("--list", action="store_true", help="list the specs: runnable, needs data, or not implemented")
    p.add_argument("--scale", default="smoke", help="smoke (digits, CPU minutes a row), cpu (CIFAR-10 made small, a "
                   "CPU-hour or less a spec, where a spec has it), reduced (CIFAR-10-sized, about a GPU-hour a row) or "
                   "paper (the paper's recipes); default smoke")
    p.add_argument("--data", default=None, metavar="NAME", help="a local copy of the scale's data set for every row "
                   "(e.g. npz:PATH for CIFAR-10 on a machine that cannot download it); default the scale's own")
    p.add_argument("--seeds", type=int, default=1, help="training runs per row (default 1; two measure the noise)")
    p.add_argument("--out", type=Path, default=None, help="the reproduction's folder (default a new one under "
                   "--runs-dir); the same command with the same --out resumes it")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--reuse", type=Path, action="append", default=[], metavar="DIR",
                   help="earlier reproductions (one, or a folder of them such as runs; repeatable): a row whose config "
                   "equals a run they finished is copied from it instead of trained")
