"""Command line: parse, build, call. Every user error ends as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import GenrepError, WriteError
from .predict_cli import add_parser as add_predict_parser
from .reproduce_cli import add_parser as add_reproduce_parser

DEFAULT_RECIPE = "hybvit-digits"  # the product's point is the hybrid

# What may change when a run is resumed: length, logging, hardware and data location, and the step size
# (to recover from a NaN); never the model, the data or anything else the checkpoint was trained with.
RESUMABLE_KEYS = ("train.steps", "train.epochs", "train.log_every", "train.ckpt_every", "train.progress",
                  "train.tensorboard", "train.device", "train.compile", "train.keep_checkpoints",
                  "data.num_workers", "data.device_resident", "data.decode", "data.root", "data.download",
                  "optim.lr", "optim.min_lr", "optim.clip_grad",
                  "train.eval_every", "train.eval_metrics", "train.eval_n", "train.eval_samples")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genrep", description="Hybrid generative-discriminative representation "
                                "learning: pretrain, probe and compare methods.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="the main job: pretrain the default recipe on digits, probe it, summarise")
    run.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe to run (default {DEFAULT_RECIPE})")
    run.add_argument("--out", type=Path, help="run folder (default: a new folder under --runs-dir)")
    run.add_argument("--runs-dir", type=Path, default=Path("runs"))

    pre = sub.add_parser("pretrain", help="train a method from a recipe (add --section.key VALUE overrides)")
    pre.add_argument("--recipe", help="shipped recipe name or path to a YAML file")
    pre.add_argument("--resume", type=Path, metavar="RUN", help="continue RUN from its last complete checkpoint")
    pre.add_argument("--init", type=Path, metavar="RUN", help="a new run that starts from RUN's trained weights and "
                     "fitted state (its palette), with a fresh optimizer: continued pretraining")
    pre.add_argument("--out", type=Path, help="run folder (default: a new folder under --runs-dir)")
    pre.add_argument("--runs-dir", type=Path, default=Path("runs"))

    probe = sub.add_parser("probe", help="linear probe and kNN on the frozen features of a run (add --probe.KEY "
                           "VALUE, a read option such as --model.feature_t 100, or --data.image_size N to read a "
                           "darl or supervised run with RoPE at another image size)")
    probe.add_argument("run", type=Path, metavar="RUN")
    probe.add_argument("--device", default="auto")

    ev = sub.add_parser("evaluate", help="every evaluation protocol that applies to a run (add --eval.KEY VALUE, "
                        "--eval.PROTOCOL.KEY VALUE, or a model option such as --model.sample_steps 50)")
    ev.add_argument("run", type=Path, metavar="RUN")

    sw = sub.add_parser("sweep", help="accuracy over a grid of blocks x noise steps x poolings x heads on cached "
                        "features, with heatmaps, into RUN/results/eval.json (the diffusion-features paper's figure 2)")
    sw.add_argument("run", type=Path, metavar="RUN")
    sw.add_argument("--blocks", help="comma-separated blocks (default: about 10 spread over the network)")
    sw.add_argument("--t", help="comma-separated noise steps (default: the run's model.feature_t)")
    sw.add_argument("--pool", help="comma-separated poolings: p for a p x p average pool, left out at a block whose "
                    "map is smaller (default: the method's default pooling)")
    sw.add_argument("--head", help="comma-separated heads: linear (fitted as --eval.sweep.linear_solver says: lbfgs, "
                    "the fast solver, or paper, figure 2's Adam schedule), mlp, cnn, attention (default linear)")
    sw.add_argument("--device", default=None, help="default: the run's eval.device")

    grid = sub.add_parser(
        "grid", help="train and probe a grid of short runs over one or two config keys, and draw the accuracy "
        "heatmap (--axis KEY V1,V2,... once or twice; any other --section.key VALUE applies to every cell)",
        usage="genrep grid --recipe RECIPE --axis KEY V1,V2,... [--axis KEY V1,V2,...] [--out GRID | --runs-dir DIR] "
              "[--section.key VALUE ...]",
        description="Train and probe a grid of short runs over one or two config keys (the DARL paper's figure 3: "
                    "linear-probe accuracy over the Beta noise schedule's a and b), and draw the accuracy heatmap.",
        epilog="--axis KEY V1,V2,...: a dotted config key and its comma-separated values, read as override values "
               "are (e.g. --axis model.beta_a 0.03,0.3,1.0). Rows of the heatmap are the first axis, columns the "
               "second. Each cell is a run folder GRID/KEY=V,...: trained as genrep pretrain trains, probed as "
               "genrep probe probes; GRID/grid.json holds the results, GRID/grid.png the heatmap. The same command "
               "again resumes the grid.")
    grid.add_argument("--recipe", help="shipped recipe name or path to a YAML file")
    grid.add_argument("--out", type=Path, metavar="GRID", help="grid folder (default: a new folder RECIPE-grid under --runs-dir); "
                      "an existing grid of the same settings is resumed")
    grid.add_argument("--runs-dir", type=Path, default=Path("runs"), metavar="DIR")

    rep = sub.add_parser("report", help="one self-contained HTML page comparing evaluated runs side by side (and "
                         "the heatmaps of grid folders)")
    rep.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="a run folder, or a grid folder (genrep grid)")
    rep.add_argument("-o", "--out", type=Path, default=Path("report.html"), help="HTML path (default report.html)")
    rep.add_argument("--force", action="store_true", help="overwrite -o even if it is not a report genrep wrote")

    smp = sub.add_parser("sample", help="draw images from a generative run and write a PNG grid")
    smp.add_argument("run", type=Path, metavar="RUN")
    smp.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    smp.add_argument("--sampler", default=None, help="ddim (any number of steps) or ddpm (all T steps); default: "
                     "the run's model.sampler (ddim)")
    smp.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's model.sample_steps, "
                     "100; at most the run's T)")
    smp.add_argument("--eta", type=float, default=None, help="DDIM noise: 0 deterministic, 1 like DDPM (default: "
                     "the run's model.eta, 0)")
    smp.add_argument("--temperature", type=float, default=None, help="softmax temperature of a token model (iGPT, "
                     "GCRL; default: the run's model.temperature, 1.0)")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--weights", default="ema", help="ema or model")
    smp.add_argument("--rank-energy", action="store_true", help="also a grid of each class's best and worst "
                     "samples by the classifier's energy logsumexp(logits) (needs a classifier head)")
    smp.add_argument("--per-class", type=int, default=8, help="samples per class and end with --rank-energy")
    smp.add_argument("-o", "--out", type=Path, default=None, help="PNG path ending in .png; the settings go beside "
                     "it as the same name with .json (default RUN/samples/...)")
    smp.add_argument("--force", action="store_true", help="overwrite existing files at -o (and its .json and "
                     "-by-energy.png) even if genrep did not write them as samples")
    smp.add_argument("--device", default="auto")

    pk = sub.add_parser("pack", help="write a compressed, sharded copy of an image folder tree or a registered set, "
                        "read as --data.name packed:OUT without ever holding it in memory")
    pk.add_argument("source", help="a folder tree (train/<class>/* beside val/<class>/* or test/<class>/*, or "
                    "<class>/* split 80/20) or a registered data set name")
    pk.add_argument("out", type=Path, help="the packed folder to write (new, empty, or an unfinished pack to resume)")
    pk.add_argument("--image-size", type=int, default=None, help="the side of the square (center_crop) or the short "
                    "side (short_side) to pack at")
    pk.add_argument("--resize", default=None, help="center_crop (guided-diffusion's; default with --image-size), "
                    "short_side (the aspect kept) or none (JPEG files kept byte for byte; default without it)")
    pk.add_argument("--quality", type=int, default=None, help="JPEG quality of re-encoded images (default 95)")
    pk.add_argument("--shard-size", type=int, default=None, help="images per shard (default 1000)")
    pk.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    exp = sub.add_parser("export", help="write a run's weights for use outside genrep: its ViT backbone as a timm "
                         "VisionTransformer state dict (--format timm), or any method's weights (--format "
                         "safetensors), each with a JSON beside it")
    exp.add_argument("run", type=Path, metavar="RUN")
    exp.add_argument("--format", default="timm", dest="fmt", metavar="FORMAT", help="timm (the ViT backbone under "
                     "timm's names, the VisionTransformer arguments in the JSON) or safetensors (every method: the "
                     "weights and its architecture); default timm")
    exp.add_argument("-o", "--out", type=Path, default=None, help="a .safetensors path; the JSON goes beside it as "
                     "the same name with .json (default RUN/export/FORMAT-WEIGHTS.safetensors)")
    exp.add_argument("--weights", default="ema", help="ema or model (default ema)")
    exp.add_argument("--force", action="store_true", help="overwrite -o (and its .json) even if genrep's export did "
                     "not write them")
    add_predict_parser(sub)
    add_reproduce_parser(sub)
    sub.add_parser("datasets", help="list the data sets genrep knows and which are available offline")
    sub.add_parser("recipes", help="list the shipped recipes")
    sub.add_parser("methods", help="list the registered methods and their capabilities")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if rest and args.command not in ("run", "pretrain", "probe", "evaluate", "sweep", "grid"):
            raise GenrepError(f"'genrep {args.command}' takes no arguments, got {' '.join(rest)}")
        return COMMANDS[args.command](args, rest)
    except GenrepError as e:
        # a refused write (a full disk) is no user error: say what is left and how to go on, as for Ctrl-C
        left = f"; {INTERRUPTED.get(args.command, 'nothing was written')}" if isinstance(e, WriteError) else ""
        print(f"genrep: error: {e}{left}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"genrep: interrupted; {INTERRUPTED.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused something outside genrep's writers (io.writing)
        print(f"genrep: error: file-system error on {e.filename or 'a file'}: {e.strerror or e}; nothing genrep had "
              f"written complete is lost (files are replaced atomically)", file=sys.stderr)
        return 1


# what an interrupted command leaves behind, and how to go on
_RESUME = "training resumes from the last checkpoint with genrep pretrain --resume RUN"
INTERRUPTED = {
    "run": _RESUME, "pretrain": _RESUME,
    "evaluate": "the protocols that finished are in RUN/results/eval.json; run genrep evaluate RUN again for the "
                "rest (--eval.protocols NAME,... picks them)",
    "probe": "RUN/results/probe.json was not written; run genrep probe RUN again",
    "sample": "no samples were written; run genrep sample again",
    "report": "the report was not written; run genrep report again",
    "pack": "the finished shards are kept; run the same genrep pack command again to pack the rest",
    "grid": "the finished cells are kept in the grid's grid.json; run the same genrep grid command again to resume "
            "the rest",
    "reproduce": "the finished rows are kept in the reproduction's folder; run the same genrep reproduce command "
                 "(with its --out) again to resume the rest",
}


def cmd_predict(args, rest: list[str]) -> int:
    from .predict_cli import cmd_predict as predict

    return predict(args, rest)


def cmd_reproduce(args, rest: list[str]) -> int:
    from .reproduce_cli import cmd_reproduce as reproduce

    return reproduce(args, rest)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(*lines: str) -> None:
    if _is_main_process():
        print(*lines, sep="\n", flush=True)


# ------------------------------------------------------------------ pretrain

def _config_for_resume(run: Path, recipe: str | None, overrides: dict):
    from .config import apply_overrides, check_budget_override, config_from_dict
    from .runs import read_run_config

    cfg = read_run_config(run)
    if recipe is not None and Path(recipe).stem != cfg.recipe:
        raise GenrepError(f"{run} was made by recipe '{cfg.recipe}', not '{recipe}'; resume it without --recipe, "
                          f"or start a new run with --recipe {recipe}")
    bad = [k for k in overrides if k not in RESUMABLE_KEYS and not k.startswith("probe.")]
    if bad:
        raise GenrepError(f"cannot change {', '.join(bad)} when resuming (the checkpoint was trained with the "
                          f"old value); resumable keys: {', '.join(RESUMABLE_KEYS)}, probe.*")
    d = apply_overrides(cfg.to_dict(), overrides)
    check_budget_override(d, overrides, str(run))
    return config_from_dict(d)


def _prepare_run(args, rest: list[str], default_recipe: str | None = None):
    """Resolve the config and the run folder (chosen by rank 0 and shared under torchrun); the trainer
    creates the folder once the data and the model have been built, so bad input leaves nothing behind."""
    from .config import parse_overrides, resolve_config
    from .io import check_can_write
    from .runs import check_new_run_dir, claim_new_run_dir
    from .train.dist import init_distributed

    overrides = parse_overrides(rest)
    resume = getattr(args, "resume", None)
    init = getattr(args, "init", None)
    if init is not None and resume is not None:
        raise GenrepError("--init starts a new run from another run's weights; --resume continues a run's own "
                          "checkpoint: drop one of them")
    if resume is not None:
        if args.out is not None:
            raise GenrepError("--resume continues RUN in place; drop --out")
        check_can_write(resume, "resumed run folder", decide=_resumable)
        cfg = _config_for_resume(resume, args.recipe, overrides)
        run = resume
    else:
        recipe = args.recipe or default_recipe
        if recipe is None:
            raise GenrepError("genrep pretrain needs --recipe NAME (see genrep recipes) or --resume RUN")
        if args.out is not None:
            check_can_write(args.out, "run folder --out", decide=check_new_run_dir)
        else:
            check_can_write(args.runs_dir, "runs folder --runs-dir")
        cfg = resolve_config(recipe, overrides)
        if init is not None:
            from .runs import check_init_source

            check_init_source(init, cfg)  # before the folder is claimed
        run = None
    info, _ = init_distributed(cfg.train.device)
    if run is None and info.main:
        if args.out is not None:
            run = args.out
        else:
            run = claim_new_run_dir(args.runs_dir, cfg.recipe)  # made empty here; released if the start fails
    if info.enabled:
        import torch.distributed as dist
        box = [str(run) if info.main else None]
        dist.broadcast_object_list(box, src=0)
        run = Path(box[0])
    return cfg, Path(run), resume is not None


def _resumable(run: Path) -> bool:
    """check_can_write's rule for --resume RUN: a run genrep made, or a one-line refusal."""
    from .runs import check_resumable

    check_resumable(run)
    return True


def _pretrain(cfg, run: Path, resume: bool, claimed: bool, init: Path | None = None):
    from .api import train

    return train(cfg, run, resume=resume, claimed=claimed, init=init)


def cmd_pretrain(args, rest: list[str]) -> int:
    cfg, run, resume = _prepare_run(args, rest)
    _say(f"genrep: {'resuming' if resume else 'training'} {cfg.method} ({cfg.recipe}) in {run}")
    result = _pretrain(cfg, run, resume, claimed=not resume and args.out is None, init=args.init)
    loss = result.last_log.get("loss")
    if result.steps == 0:
        _say(f"genrep: nothing to train: every parameter of {cfg.method} is frozen (model.pretrained); {run} records "
             f"the frozen file and its config: read it with genrep probe, sweep or evaluate {run}")
        return 0
    _say(f"genrep: done: {result.steps} steps ({result.steps - result.start_step} this time) in "
         f"{result.seconds:.1f} s, {result.images_per_s:.0f} images/s"
         + (f", final loss {loss:.4f}" if loss is not None else "") + f"; weights in {run}")
    return 0


# ------------------------------------------------------------------ probe

# the one data key a trained run may be read with changed, by genrep probe (Run.reading)
READ_SIZE = "data.image_size"


def _split_overrides(rest: list[str], section: str, example: str, command: str) -> tuple[dict, dict, int | None]:
    """``--SECTION.KEY V`` and ``--model.KEY V`` overrides of a command on a trained run, apart, and the image
    size to read the run at (``--data.image_size``, genrep probe only)."""
    from .config import parse_overrides

    overrides = parse_overrides(rest)
    takes_size = command == "probe"
    bad = [k for k in overrides if not k.startswith((f"{section}.", "model.")) and not (takes_size and k == READ_SIZE)]
    if bad:
        size = f", and --{READ_SIZE} N to read the run at another size" if takes_size else ""
        hint = f"; genrep probe RUN --{READ_SIZE} N reads a run at another size" if READ_SIZE in bad else ""
        raise GenrepError(f"genrep {command} takes {section}.* overrides (e.g. {example}) and the model's read "
                          f"options (e.g. --model.feature_t 100){size}, got {', '.join(bad)}{hint}")
    ours = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(f"{section}.")}
    options = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
    return ours, options, overrides.get(READ_SIZE)


def cmd_probe(args, rest: list[str]) -> int:
    import dataclasses

    from .config import ProbeConfig, apply_overrides, build_dataclass
    from .eval.distributed import evaluation_group
    from .eval.evaluate import run_probes
    from .eval.report.summary import probe_table
    from .run import Run

    ours, options, image_size = _split_overrides(rest, "probe", "--probe.layer 2", "probe")
    with evaluation_group(args.device), Run.open(args.run, "probe") as run:   # torchrun: the extraction split
        probe = build_dataclass(ProbeConfig, apply_overrides(dataclasses.asdict(run.config.probe), ours), "probe")
        results = run_probes(run, probe, device=args.device, options=options, image_size=image_size)
    _say(probe_table(results), f"results: {args.run / 'results' / 'probe.json'}")
    return 0


# ------------------------------------------------------------------ evaluate and report

def _evaluation(path: Path, rest: list[str]):
    """The run (its config read once for the command; the lock is taken once torchrun's group is joined, by rank 0),
    its ``eval`` section with ``--eval.*`` overrides (nested: --eval.ood.n 500), and the model options
    (``--model.sample_steps 50``) this evaluation reads the trained model with."""
    import dataclasses

    from .config import EvalConfig, apply_overrides, build_dataclass
    from .run import Run

    ours, options, _ = _split_overrides(rest, "eval", "--eval.protocols ood,calibration", "evaluate")
    run = Run.open(path)
    return run, build_dataclass(EvalConfig, apply_overrides(dataclasses.asdict(run.config.eval), ours), "eval"), options


def cmd_evaluate(args, rest: list[str]) -> int:
    from .eval.distributed import evaluation_group
    from .eval.evaluate import EVAL_FILE, evaluate_run
    from .eval.report.summary import evaluation_summary

    run, ev, options = _evaluation(args.run, rest)
    t0 = time.perf_counter()
    with evaluation_group(ev.device), run.writing("evaluate"):
        results = evaluate_run(run, ev, options=options)
    _say(evaluation_summary(results),
         f"results: {args.run / 'results' / EVAL_FILE}  ({time.perf_counter() - t0:.1f} s); figures in "
         f"{args.run / 'figures' / 'eval'}; compare runs with genrep report RUN... -o report.html")
    return 0


def cmd_sweep(args, rest: list[str]) -> int:
    from .eval.distributed import evaluation_group
    from .eval.evaluate import EVAL_FILE, evaluate_run
    from .eval.report.summary import sweep_table

    flags = {"sweep.blocks": args.blocks, "sweep.t": args.t, "sweep.pools": args.pool, "sweep.heads": args.head,
             "device": args.device}
    extra = [a for key, value in flags.items() if value is not None for a in (f"--eval.{key}", value)]
    run, ev, options = _evaluation(args.run, [*rest, *extra, "--eval.protocols", "sweep"])
    t0 = time.perf_counter()
    with evaluation_group(ev.device), run.writing("evaluate"):
        results = evaluate_run(run, ev, options=options)
    _say(sweep_table(results["protocols"]["sweep"]),
         f"results: {args.run / 'results' / EVAL_FILE}  ({time.perf_counter() - t0:.1f} s); heatmaps in "
         f"{args.run / 'figures' / 'eval'}")
    return 0


def cmd_grid(args, rest: list[str]) -> int:
    from .config import parse_overrides
    from .grid import check_grid_out, grid_table, is_grid_folder, plan_grid, preflight, run_grid, split_axes
    from .io import check_can_write
    from .runs import claim_new_run_dir

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GenrepError("genrep grid runs in one process (its cells one after another); start it without torchrun, "
                          "or train a cell with torchrun ... genrep pretrain")
    axes, rest = split_axes(rest)
    if args.recipe is None:
        raise GenrepError("genrep grid needs --recipe NAME (see genrep recipes)")
    plan = plan_grid(args.recipe, axes, parse_overrides(rest))
    if args.out is not None:
        def ours(out: Path) -> bool:  # a new or empty folder, or a grid of these settings; refused otherwise
            check_grid_out(out, plan)
            return is_grid_folder(out)

        check_can_write(args.out, "grid folder --out", decide=ours)
    else:
        check_can_write(args.runs_dir, "runs folder --runs-dir")
    t0 = time.perf_counter()
    preflight(plan)
    out = args.out if args.out is not None else claim_new_run_dir(args.runs_dir, f"{plan.recipe}-grid")
    over = " x ".join(f"{a.key} ({len(a.values)})" for a in plan.axes)
    _say(f"genrep grid: {len(plan.cells)} cells of {plan.method} ({plan.recipe}) over {over} in {out}")
    doc = run_grid(plan, out, claimed=args.out is None, say=_say)
    _say("", grid_table(doc), "",
         f"grid: {out / 'grid.json'}, heatmap {out / doc['figure']} ({time.perf_counter() - t0:.1f} s); each cell "
         f"is a run folder in {out} (genrep evaluate CELL); compare grids with genrep report {out} -o report.html")
    return 0


def _is_genrep_report(path: Path) -> bool:
    """A page genrep report wrote: its head carries genrep's title (report.py's render)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace").lower()
    except OSError:
        return False
    return head.startswith("<!doctype html>") and "<title>genrep report</title>" in head


def cmd_report(args, rest: list[str]) -> int:
    from .eval.report.report import write_report
    from .io import check_can_write, check_overwrite

    check_can_write(args.out, "report", decide=lambda out: check_overwrite(out, _is_genrep_report, "report",
                                                                          args.force))
    out = write_report(args.runs, args.out)
    print(f"report of {len(args.runs)} folder(s): {out}")
    return 0


# ------------------------------------------------------------------ sample

def cmd_sample(args, rest: list[str]) -> int:
    from .eval.report.samples import run_sampling

    r = run_sampling(args.run, n=args.n, sampler=args.sampler, steps=args.steps, eta=args.eta,
                     temperature=args.temperature, seed=args.seed,
                     weights=args.weights, device=args.device, rank_energy=args.rank_energy,
                     per_class=args.per_class, out=args.out, force=args.force)
    from .eval.report.summary import sampling_text

    print(f"{r['n']} samples from {r['method']} ({sampling_text(r)}, seed {r['seed']}) in {r['seconds']:.1f} s: "
          f"{r['grid']}")
    if "ranked_grid" in r:
        counts = ", ".join(f"{name} {v['count']}" for name, v in r["per_class"].items())
        print(f"by class (classifier's choice): {counts}")
        print(f"best and worst by energy per class: {r['ranked_grid']}")
    return 0


# ------------------------------------------------------------------ export

def cmd_export(args, rest: list[str]) -> int:
    from .export import export_run

    r = export_run(args.run, args.out, args.fmt, args.weights, force=args.force)
    what = "timm VisionTransformer backbone" if r["export"] == "timm" else "weights"
    print(f"{r['genrep']['method']} {what} ({r['genrep']['weights']}, {r['tensors']} tensors): {r['path']}")
    print(f"{'VisionTransformer arguments and read-out' if r['export'] == 'timm' else 'architecture'}: {r['json']}")
    return 0


# ------------------------------------------------------------------ run (the main job)

def cmd_run(args, rest: list[str]) -> int:
    import dataclasses

    from .eval.evaluate import evaluate_run, run_probes
    from .eval.report.figures import summary_figure
    from .eval.report.report import write_report
    from .eval.report.summary import evaluation_summary, probe_table
    from .methods import get_method
    from .run import Run

    t0 = time.perf_counter()
    cfg, run, _ = _prepare_run(args, rest, default_recipe=args.recipe)
    _say(f"genrep run: 1/4 pretraining {cfg.method} ({cfg.recipe}) on {cfg.data.name} in {run}")
    result = _pretrain(cfg, run, False, claimed=args.out is None)
    if not _is_main_process():
        return 0
    _say(f"genrep run: 2/4 probing frozen features ({result.steps} steps took {result.seconds:.1f} s)")
    opened = Run.open(run)   # the trained run, read once for the three steps that follow
    results = run_probes(opened, device=cfg.train.device)
    figure = summary_figure(run, results, run / "figures" / "summary.png")
    lines = []
    if "sample" in get_method(cfg.method).capabilities:
        from .eval.report.samples import run_sampling
        diffusion = "sampler" in get_method(cfg.method).capability_options.get("sample", ())
        how = "DDIM, 100 steps" if diffusion else f"model.temperature {getattr(cfg.model, 'temperature', None)}"
        _say(f"genrep run: drawing 64 samples ({how})")
        s = run_sampling(opened, n=64, sampler="ddim" if diffusion else None, steps=100 if diffusion else None,
                         device=cfg.train.device, out=run / "figures" / "samples.png",
                         rank_energy="logits" in get_method(cfg.method).capabilities, per_class=4)
        lines.append(f"samples: {s['grid']} ({s['seconds']:.1f} s)"
                     + (f", ranked by energy per class: {s['ranked_grid']}" if "ranked_grid" in s else ""))
    # fine-tuning retrains the whole network: the main job leaves it to `genrep evaluate --eval.protocols`
    ev = dataclasses.replace(cfg.eval, protocols=[p for p in cfg.eval.protocols if p != RUN_SKIPS],
                             device=cfg.train.device)
    _say(f"genrep run: 3/4 evaluating ({', '.join(ev.protocols)}; not {RUN_SKIPS}, which is expensive)")
    t_eval = time.perf_counter()
    evaluation = evaluate_run(opened, ev, say=lambda m: _say("  " + m))
    report = write_report([run], run / "report.html")
    _say("genrep run: 4/4 summary", "", probe_table(results), "", evaluation_summary(evaluation), "",
         f"run folder: {run}  (config.yaml, model.safetensors, ema.safetensors, checkpoints/, log.jsonl, "
         f"results/probe.json, results/eval.json)", f"figure: {figure}", *lines,
         f"evaluation: {time.perf_counter() - t_eval:.1f} s; report: {report}  (fine-tuning: genrep evaluate {run} "
         f"--eval.protocols finetune)", f"total time: {time.perf_counter() - t0:.1f} s")
    return 0


RUN_SKIPS = "finetune"


# ------------------------------------------------------------------ pack

def cmd_pack(args, rest) -> int:
    from .data.pack import DEFAULT_QUALITY, DEFAULT_SHARD_SIZE, PackSettings, pack

    resize = args.resize or ("center_crop" if args.image_size is not None else "none")
    settings = PackSettings(args.image_size, resize, DEFAULT_QUALITY if args.quality is None else args.quality,
                            DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size)
    if args.workers is not None and args.workers < 1:
        raise GenrepError(f"--workers must be at least 1, got {args.workers}")
    pack(args.source, args.out, settings, workers=args.workers)
    return 0


# ------------------------------------------------------------------ listings

def cmd_datasets(args, rest) -> int:
    from .data.datasets import describe_datasets

    rows = describe_datasets()
    print(f"{'name':<12} {'offline':<8} {'size':<10} description")
    for r in rows:
        print(f"{r['name']:<12} {'yes' if r['available'] else 'no':<8} {r.get('size', ''):<10} "
              f"{r['description']}  [{r['where']}]")
    print("any local data set: --data.name npz:PATH (x_train, y_train, x_test, y_test), folder:PATH "
          "(one sub-folder per class), or packed:PATH (genrep pack SOURCE PATH: read image by image, never whole)")
    return 0


def cmd_recipes(args, rest) -> int:
    from .config import load_recipe, recipe_names

    for name in recipe_names():
        d = load_recipe(name)
        print(f"{name:<24} method={d.get('method', '?'):<12} data={d.get('data', {}).get('name', 'digits')}")
    return 0


def cmd_methods(args, rest) -> int:
    from .methods import get_method, method_names

    for name in method_names():
        m = get_method(name)
        caps = ", ".join(sorted(m.capabilities)) or "-"
        print(f"{name:<14} views/labels: {'labels' if m.needs_labels else 'no labels'}; capabilities: {caps}")
    return 0


COMMANDS = {"run": cmd_run, "pretrain": cmd_pretrain, "pack": cmd_pack, "probe": cmd_probe, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
            "grid": cmd_grid, "report": cmd_report, "sample": cmd_sample, "export": cmd_export,
            "predict": cmd_predict, "reproduce": cmd_reproduce, "datasets": cmd_datasets, "recipes": cmd_recipes,
            "methods": cmd_methods}


if __name__ == "__main__":
    sys.exit(main())
