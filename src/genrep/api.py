"""genrep from Python: what the commands do, as functions that return results instead of printing them.

    import genrep
    run = genrep.pretrain("supervised-digits", out="runs/sup", train={"steps": 200})
    feats = run.features(images)                      # uint8 or float images, NumPy, PIL, ...
    genrep.probe(run)["linear_acc"]

Settings are given as the command line's keys, nested (``train={"steps": 200}``) or dotted
(``**{"train.steps": 200}``); errors are the one-line ``GenrepError`` the CLI prints; nothing is printed and no
progress bar is drawn unless ``progress=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io as _io
from pathlib import Path
from typing import Any

from .errors import GenrepError
from .run import Run, load


def _dotted(overrides: dict[str, Any], section: str | None = None) -> dict[str, Any]:
    """``{"train": {"steps": 5}, "optim.lr": 1e-3}`` -> ``{"train.steps": 5, "optim.lr": 1e-3}``; with ``section``,
    keys that name no section of the config are read as its own (``probe(run, layer=2)`` is ``probe.layer``,
    ``evaluate(run, ood={"n": 500})`` is ``eval.ood.n``)."""
    from .config import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        flat = {f"{key}.{k}": v for k, v in _dotted(value).items()} if isinstance(value, dict) else {key: value}
        for k, v in flat.items():
            out[f"{section}.{k}" if section is not None and k.split(".")[0] not in sections else k] = v
    return out


@contextlib.contextmanager
def _quiet(progress: bool):
    """What the commands print (their own lines, not the results) goes nowhere unless asked for."""
    if progress:
        yield
        return
    with contextlib.redirect_stdout(_io.StringIO()):
        yield


def pretrain(recipe: str, out=None, *, runs_dir="runs", init=None, progress: bool = False, **overrides) -> Run:
    """Train ``recipe`` (with the command line's overrides) into ``out`` (default: a new folder under
    ``runs_dir``) and return the trained run, as ``genrep pretrain --recipe RECIPE --out OUT``."""
    from .config import resolve_config
    from .io import check_can_write
    from .runs import check_init_source, check_new_run_dir, claim_new_run_dir

    flat = {"train.progress": progress, **_dotted(overrides)}
    cfg = resolve_config(recipe, flat)
    if init is not None:
        check_init_source(init, cfg)
    if out is not None:
        check_can_write(out, "run folder out", decide=check_new_run_dir)
        run, claimed = Path(out), False
    else:
        check_can_write(runs_dir, "runs folder runs_dir")
        run, claimed = claim_new_run_dir(Path(runs_dir), cfg.recipe), True
    with _quiet(progress):
        train(cfg, run, resume=False, claimed=claimed, init=init)
    return load(run, device=cfg.train.device)


def train(cfg, run: Path, *, resume: bool, claimed: bool, init=None):
    """Train; a default-named folder that ``claim_new_run_dir`` made is given back if the start fails."""
    from .train.loop import pretrain as train_loop

    try:
        return train_loop(cfg, run, resume=resume, init=init)
    except BaseException:
        if claimed:
            with contextlib.suppress(OSError):
                run.rmdir()  # only succeeds while empty: a run that trained keeps its folder
        raise


def _section(cfg, name: str, cls, overrides: dict):
    from .config import apply_overrides, build_dataclass

    return build_dataclass(cls, apply_overrides(dataclasses.asdict(getattr(cfg, name)), overrides), name)


def _split(overrides: dict, section: str) -> tuple[dict, dict]:
    """(this section's keys without its prefix, the model's read options)."""
    flat = _dotted(overrides, section)
    bad = [k for k in flat if not k.startswith((f"{section}.", "model."))]
    if bad:
        raise GenrepError(f"{', '.join(bad)}: this call takes {section} keys (e.g. layer=2 or {section}={{...}}) and "
                          f"the model's read options (model={{'feature_t': 100}})")
    return ({k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(f"{section}.")},
            {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("model.")})


def probe(run, *, device: str = "auto", image_size: int | None = None, progress: bool = False, **overrides) -> dict:
    """``genrep probe RUN``: the linear probe and kNN at the run's read-out (``probe`` keys as keywords, e.g.
    ``layer=2``); writes ``RUN/results/probe.json`` and returns it."""
    from .config import ProbeConfig
    from .eval.evaluate import run_probes

    run = Run.of(run)
    ours, options = _split(overrides, "probe")
    with _quiet(progress):
        return run_probes(run, _section(run.config, "probe", ProbeConfig, ours), device=device, progress=progress,
                          options=options, image_size=image_size)


def evaluate(run, protocols: list[str] | str | None = None, *, progress: bool = False, **overrides) -> dict:
    """``genrep evaluate RUN``: the protocols that apply (``protocols``: some of them), ``eval`` keys as keywords
    (``ood={"n": 500}``); writes ``RUN/results/eval.json`` and returns it."""
    from .config import EvalConfig
    from .eval.evaluate import evaluate_run

    run = Run.of(run)
    if protocols is not None:
        overrides = {**overrides, "protocols": [protocols] if isinstance(protocols, str) else list(protocols)}
    ours, options = _split(overrides, "eval")
    ev = _section(run.config, "eval", EvalConfig, ours)
    with _quiet(progress):
        return evaluate_run(run, ev, options=options, progress=progress, say=print if progress else _silent)


def _silent(*_args, **_kwargs) -> None:
    pass
