"""`genrep grid`: train and probe a grid of short runs over one or two config keys, and draw the heatmap.

A grid folder holds ``.genrep-grid`` (genrep's marker: the folder is a grid genrep made), ``grid.json`` (the
recipe, the overrides every cell shares, the axes and one entry per cell, rewritten atomically after each cell
trains and after it is probed), ``grid.png`` (the heatmap of linear-probe accuracy, written at the end) and one
ordinary run folder per cell, named from its values (``beta_a=0.03,beta_b=1.0``): trained by the same
``Trainer`` as `genrep pretrain` and probed as `genrep probe` probes (the run's ``probe`` section), so
`genrep probe`, `evaluate`, `sweep` and `report` work on each cell.

Every cell's config is built, so checked, before anything is written; the data is loaded and every cell's
model is built on the meta device before the first training, so what only the data or the method can refuse
stops the command before minutes of work. Running the same command again resumes: finished cells (probed
weights that are still the run's, a config equal to the cell's) are kept, an unfinished cell is resumed as
`genrep pretrain --resume` would resume it; a grid made with other settings, a cell folder holding another
config, and a folder that is not genrep's are one-line refusals, never written into.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GenrepError
from .fields import one_line, show

GRID_MARKER = ".genrep-grid"
GRID_FILE = "grid.json"
GRID_FIGURE = "grid.png"
_FORMAT = "genrep-grid-1"
MAX_AXES = 2
STATUSES = ("pending", "trained", "done")
METRIC = "linear-probe test accuracy"


@dataclass
class Axis:
    key: str
    values: list[Any]   # as the built config holds them (what the cells ran with)
    texts: list[str]    # as given on the command line


@dataclass
class Cell:
    index: tuple[int, ...]
    values: dict[str, Any]
    name: str
    cfg: Any            # the cell's Config
    causal: bool | None = None  # how `genrep probe` reads a causal method (as trained), set by the preflight


@dataclass
class GridPlan:
    recipe: str
    method: str
    data: str
    overrides: dict[str, Any]
    axes: list[Axis]
    cells: list[Cell] = field(default_factory=list)

    def settings(self) -> dict:
        """What makes two grids the same grid (JSON-shaped, as grid.json holds it)."""
        return _plain({"recipe": self.recipe, "overrides": self.overrides,
                       "axes": [{"key": a.key, "values": a.values} for a in self.axes]})


def _plain(x):
    return json.loads(json.dumps(x))


# ------------------------------------------------------------------------------------------ the command line

def split_axes(args: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """``--axis KEY V1,V2`` (or ``--axis=KEY V1,V2``) pairs out of the overrides; the rest is left as it was.
    Parsed here rather than by argparse, so a value list that starts with a minus (``-1,0,1``) is a value."""
    axes, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--axis" or arg.startswith("--axis="):
            given = [arg[len("--axis="):]] if arg.startswith("--axis=") else []
            need = 2 - len(given)
            if len(args) - (i + 1) < need:
                raise GenrepError("--axis needs a config key and its values, e.g. --axis model.beta_a 0.03,0.3,1.0")
            key, values = [*given, *args[i + 1:i + 1 + need]]
            if not key or key.startswith("--") or values.startswith("--"):
                raise GenrepError(f"--axis needs a config key and its values, got --axis {key} {values}; e.g. --axis "
                                  f"model.beta_a 0.03,0.3,1.0")
            axes.append((key, values))
            i += 1 + need
            continue
        rest.append(arg)
        i += 1
    return axes, rest


def _split_values(text: str) -> list[str]:
    """``0.03,0.3`` -> ['0.03', '0.3']; commas inside brackets belong to the value (``[0.9,0.95],[0.9,0.99]``)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [s.strip() for s in items]


def _lookup(d: dict, dotted: str):
    node = d
    for part in dotted.split("."):
        node = node[part]
    return node


def value_text(v) -> str:
    """A built value as a cell name and a table show it: 0.03, 1.0, 1e-05, true, null, [0.9,0.95]."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (int, str)):
        return str(v)
    return json.dumps(v, separators=(",", ":"))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)


def _short_keys(keys: list[str]) -> list[str]:
    short = [k.rsplit(".", 1)[-1] for k in keys]
    return short if len(set(short)) == len(short) else list(keys)


def cell_name(keys: list[str], values: list) -> str:
    """``beta_a=0.03,beta_b=1.0``: each axis's last key part (the whole key where two share it) and its value,
    every character outside letters, digits and ``._+=-`` made ``_``, so the name is one safe folder name."""
    return ",".join(f"{_safe(k)}={_safe(value_text(v))}" for k, v in zip(_short_keys(keys), values))


def plan_grid(recipe: str, axes: list[tuple[str, str]], overrides: dict[str, Any]) -> GridPlan:
    """Every cell's config, built and so checked, before anything is written."""
    from .config import parse_overrides, resolve_config

    if not axes:
        raise GenrepError("genrep grid needs one or two --axis KEY V1,V2,... (e.g. --axis model.beta_a 0.03,0.3,1.0 "
                          "--axis model.beta_b 0.3,1.0,3.0)")
    if len(axes) > MAX_AXES:
        raise GenrepError(f"genrep grid takes one or two --axis, got {len(axes)} ({', '.join(k for k, _ in axes)}); "
                          f"run one grid per value of the others (set it with --KEY VALUE)")
    keys = [k for k, _ in axes]
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise GenrepError(f"--axis {twice} is given twice; give each key once, with all its values "
                          f"(--axis {twice} V1,V2,...)")
    for key in keys:
        if key in overrides:
            raise GenrepError(f"{key} is both an --axis and an override (--{key} {show(overrides[key])}); an axis "
                              f"sets it in every cell: drop --{key}, or make it a plain override without --axis")
    try:
        base = resolve_config(recipe, overrides)
    except GenrepError as e:
        raise GenrepError(f"genrep grid --recipe {recipe}: {e}") from None
    base_dict = base.to_dict()
    parsed: list[Axis] = []
    for key, text in axes:
        items = _split_values(text)
        if not text.strip() or any(not s for s in items):
            raise GenrepError(f"--axis {key} {show(text)} has an empty value; give values separated by commas, "
                              f"e.g. --axis {key} V1,V2")
        if len(items) < 2:
            raise GenrepError(f"--axis {key} {show(text)} has one value; a grid compares two or more (--axis {key} "
                              f"V1,V2), and one value for every cell is an override (--{key} {one_line(items[0], 80)})")
        values = []
        for item in items:
            value = parse_overrides([f"--{key}", item])[key]  # as an override's value is read
            try:
                cfg = resolve_config(recipe, {**overrides, key: value})
                built = _lookup(cfg.to_dict(), key)
            except GenrepError as e:
                raise GenrepError(f"--axis {key} {item}: {e}") from None
            except (KeyError, TypeError):
                raise GenrepError(f"--axis {key}: {key} is not a config key of recipe {recipe}") from None
            if isinstance(built, dict):
                raise GenrepError(f"--axis {key} names a config section, not a key; name one of its keys, e.g. "
                                  f"--axis {key}.{next(iter(built), 'KEY')} V1,V2")
            if any(_plain(built) == _plain(v) for v in values):
                same = items[[_plain(v) for v in values].index(_plain(built))]
                raise GenrepError(f"--axis {key}: {same} and {item} are the same value once the config is built "
                                  f"({key} {value_text(built)}); give each value once")
            values.append(built)
        parsed.append(Axis(key, values, items))
    overrides_built = {k: _lookup(base_dict, k) for k in overrides}
    plan = GridPlan(base.recipe, base.method, base.data.name, overrides_built, parsed)
    names: dict[str, tuple] = {}
    for index in itertools.product(*(range(len(a.values)) for a in parsed)):
        values = {a.key: a.values[i] for a, i in zip(parsed, index)}
        name = cell_name(keys, list(values.values()))
        if name in names:
            raise GenrepError(f"grid cells {show(names[name])} and {show(tuple(values.values()))} would share the "
                              f"folder name {name} (characters outside letters, digits and ._+=- become _); choose "
                              f"values that differ in letters or digits")
        names[name] = tuple(values.values())
        try:
            cfg = resolve_config(recipe, {**overrides, **values})
        except GenrepError as e:
            raise GenrepError(f"grid cell {name}: {e}") from None
        plan.cells.append(Cell(index, values, name, cfg))
    for axis in parsed:
        _check_axis_is_read(axis.key, plan.cells)
    return plan


def _check_axis_is_read(key: str, cells: list[Cell]) -> None:
    """Refuse an axis whose key no cell reads: its cells would train bit-identical weights. An axis read in some
    cells only (DARL's beta_a against an axis over the decoder) is kept: those cells differ."""
    why = [_unread(cell.cfg, key) for cell in cells]
    if all(why):
        raise GenrepError(f"--axis {key} changes nothing in this grid ({why[0]}): every cell would train the same "
                          f"weights and read them the same way; drop the axis, or change what it depends on")


def _unread(cfg, key: str) -> str | None:
    """Why ``key`` changes neither the training nor the probes of a cell with config ``cfg`` (None: it may)."""
    from .methods import get_method

    section, _, name = key.partition(".")
    if section != "model":
        return None
    method = get_method(cfg.method)
    inert = method.inert_keys(cfg.model).get(name)
    if inert:
        return f"{cfg.method}: {inert}"
    caps = [cap for cap, keys in method.capability_options.items() if name in keys]
    if caps and name not in method.feature_options and cfg.train.eval_every is None:
        # a capability's option is read when the method samples, completes, ...: by genrep evaluate, or by
        # train.eval_every's FID, which this cell does not run
        return (f"{key} is an option of {cfg.method}'s {' and '.join(caps)}, which training and the probes do not "
                f"use; set it when evaluating a cell: genrep evaluate CELL --{key} V")
    return None


def preflight(plan: GridPlan) -> None:
    """What only the data and the method can refuse, for every cell, before the first training (:func:`check_cell`).
    Records how `genrep probe` will read a causal method (as trained)."""
    specs: dict[str, Any] = {}
    for cell in plan.cells:
        try:
            method = check_cell(cell.cfg, specs)
        except GenrepError as e:
            raise GenrepError(f"grid cell {cell.name}: {e}") from None
        cell.causal = bool(method.causal_mask) if method.causal_readout else None
        del method


def check_cell(cfg, specs: dict[str, Any]):
    """A cell's run before it trains (a grid's, a reproduction's row): the data loads (once per data section in
    ``specs``) and both splits agree, the model is built on the meta device (its own checks, its frozen parts' files,
    whether it fits in memory), the batch splits, the probe's read-out exists. Returns the meta-device method."""
    import torch

    from .devices import resolve_device
    from .methods import build_method
    from .runs import check_model_fits, data_spec, load_splits
    from .train.loop import check_accumulation, check_train_config

    key = json.dumps(_plain(cfg.to_dict()["data"]), sort_keys=True)
    if key not in specs:
        specs[key] = data_spec(load_splits(cfg)[0])
    spec = specs[key]
    check_train_config(cfg, 1)
    check_model_fits(cfg, spec, resolve_device(cfg.train.device), training=True)
    with torch.device("meta"):
        method = build_method(cfg.method, cfg.model, spec)
    check_accumulation(cfg, method)
    method.check_feature_args(cfg.probe.layer, cfg.probe.pool)
    return method


# ------------------------------------------------------------------------------------------ the grid folder

def is_grid_folder(path: Path) -> bool:
    from .runs import has_marker

    return has_marker(path, GRID_MARKER, _FORMAT)


def check_grid_out(out: Path, plan: GridPlan | None = None) -> None:
    """A grid goes into a new folder, an empty one, or a grid genrep made (with ``plan``: of the same settings);
    anything else is left alone."""
    out = Path(out)
    if out.is_symlink():
        raise GenrepError(f"{out} is a symbolic link; genrep writes a grid only into a real folder: choose another "
                          f"--out")
    if not out.exists():
        return
    if not out.is_dir():
        raise GenrepError(f"{out} exists and is not a folder; choose another --out")
    if is_grid_folder(out):
        old = read_grid(out) if plan is not None else None
        if old is not None:
            _check_same(plan, old, out)
        return
    from .locks import LOCK_FILE

    marker = out / GRID_MARKER
    if marker.exists() or marker.is_symlink():
        raise GenrepError(f"{out} has a malformed {GRID_MARKER} marker ({_marker_fault(marker)}); genrep writes it as "
                          f"a JSON object with \"format\": \"{_FORMAT}\": if genrep made this grid, restore the "
                          f"marker, else choose another --out")
    if any(p.name != LOCK_FILE for p in out.iterdir()):
        raise GenrepError(f"{out} exists and is not a genrep grid (no {GRID_MARKER} marker); choose another --out, "
                          f"or an empty or new folder")


def _marker_fault(marker: Path) -> str:
    """What is wrong with a grid marker :func:`is_grid_folder` did not accept, in a few words."""
    if marker.is_symlink():
        return "a symbolic link"
    if not marker.is_file():
        return "not a file"
    try:
        d = json.loads(marker.read_bytes())
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    except (ValueError, RecursionError):
        return "not JSON"
    if not isinstance(d, dict):
        return f"JSON {type(d).__name__}, not an object"
    return f"format {show(d.get('format'))}, not {_FORMAT!r}"


def _bad(path: Path, what: str) -> GenrepError:
    return GenrepError(f"{path} is not a genrep grid file ({what}); move it away to start the grid again, or restore "
                       f"the file genrep wrote")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_grid(d, path: Path) -> dict:
    """``d`` (grid.json's content) checked to be what genrep writes: an object with the recipe, one or two axes
    and one entry per cell; a finished cell holds its accuracies."""
    if not isinstance(d, dict):
        raise _bad(path, f"expected an object, got {type(d).__name__}")
    if d.get("format") != _FORMAT:
        raise _bad(path, f"format {show(d.get('format'))}, expected {_FORMAT!r}")
    if not isinstance(d.get("recipe"), str) or not isinstance(d.get("overrides"), dict):
        raise _bad(path, "no recipe or no overrides object")
    axes = d.get("axes")
    if not isinstance(axes, list) or not 1 <= len(axes) <= MAX_AXES or not all(
            isinstance(a, dict) and isinstance(a.get("key"), str) and isinstance(a.get("values"), list)
            and a["values"] for a in axes):
        raise _bad(path, "'axes' must be one or two objects with a key and a non-empty list of values")
    cells = d.get("cells")
    sizes = [len(a["values"]) for a in axes]
    if not isinstance(cells, list) or len(cells) != math.prod(sizes):
        raise _bad(path, f"'cells' must be a list of {math.prod(sizes)} entries, one per cell of the axes")
    for i, c in enumerate(cells):
        where = f"cell {i + 1}"
        if not isinstance(c, dict) or not all(isinstance(c.get(k), t) for k, t in
                                              (("name", str), ("run", str), ("values", dict))):
            raise _bad(path, f"{where} is not an object with 'name', 'run' and 'values'")
        index = c.get("index")
        if not (isinstance(index, list) and len(index) == len(sizes) and all(
                isinstance(j, int) and not isinstance(j, bool) and 0 <= j < n for j, n in zip(index, sizes))):
            raise _bad(path, f"{where} has no valid 'index' into the axes")
        if c.get("status") not in STATUSES:
            raise _bad(path, f"{where} has status {show(c.get('status'))}, not one of {', '.join(STATUSES)}")
        if c["status"] == "done":
            knn = c.get("knn")
            if not (_is_number(c.get("linear_acc")) and isinstance(knn, dict)
                    and all(_is_number(v) for v in knn.values())):
                raise _bad(path, f"{where} is done but has no numeric 'linear_acc' and 'knn'")
    return d


def read_grid(folder: Path) -> dict | None:
    """FOLDER/grid.json checked (None where there is none yet)."""
    path = Path(folder) / GRID_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        d = json.loads(path.read_bytes())
    except OSError as e:
        raise GenrepError(f"cannot read {path} ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"not valid JSON: {str(e).splitlines()[0][:120]}") from None
    return check_grid(d, path)


def _differences(old: dict, new: dict) -> str:
    """The first differences of two grids' settings, in words."""
    out = []
    if old["recipe"] != new["recipe"]:
        out.append(f"recipe {old['recipe']}, not {new['recipe']}")
    def axes(d: dict) -> str:
        return " x ".join(f"{a['key']} {','.join(value_text(v) for v in a['values'])}" for a in d["axes"])

    if old["axes"] != new["axes"]:
        out.append(f"--axis {axes(old)}, not {axes(new)}")
    for key in sorted(set(old["overrides"]) | set(new["overrides"])):
        was, now = old["overrides"].get(key, "(none)"), new["overrides"].get(key, "(none)")
        if was != now:
            out.append(f"--{key} {_or_none(was)}, not {_or_none(now)}")
    return "; ".join(out[:4]) + ("; ..." if len(out) > 4 else "")


def _or_none(v) -> str:
    return v if v == "(none)" else value_text(v)


def _config_differences(had: dict, want: dict, ours: str, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(had) | set(want), key=str):
        a, b = had.get(key, "(none)"), want.get(key, "(none)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, ours, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {_or_none(a)} ({ours}: {_or_none(b)})")
    return out


# ------------------------------------------------------------------------------------------ running it

def _new_doc(plan: GridPlan) -> dict:
    from . import __version__

    return {"format": _FORMAT, "genrep": __version__, **plan.settings(), "method": plan.method, "data": plan.data,
            "metric": METRIC,
            "cells": [{"name": c.name, "index": list(c.index), "values": _plain(c.values), "run": c.name,
                       "status": "pending"} for c in plan.cells],
            "best": None, "finished": False}


def cell_resumes(run: Path, cfg, what: str = "grid", again: str = "run the grid again") -> bool:
    """Whether a cell's folder (a grid's, a reproduction's row: ``what``) is a run of ``cfg`` to resume (False: to
    start); refuses what pretrain would not take. ``again``: how the command is run again."""
    from .locks import LOCK_FILE
    from .runs import CONFIG_FILE, is_marked_run, is_unmarked_old_run, read_run_config

    if run.is_symlink():
        raise GenrepError(f"{what} cell folder {run} is a symbolic link; genrep trains only into real folders: "
                          f"replace it with the run folder, or remove it")
    if not run.exists():
        return False
    if not run.is_dir():
        raise GenrepError(f"{what} cell folder {run} exists and is not a folder; move it away and {again}")
    if is_marked_run(run) or is_unmarked_old_run(run):
        if (run / CONFIG_FILE).is_file():
            diff = _config_differences(read_run_config(run).to_dict(), cfg.to_dict(), f"the {what}'s")
            if diff:
                raise GenrepError(f"{what} cell folder {run} holds a run with other settings ({'; '.join(diff[:3])}); "
                                  f"move it away to train the cell again")
        return True
    if any(p.name != LOCK_FILE for p in run.iterdir()):
        raise GenrepError(f"{what} cell folder {run} exists and was not made by genrep; move it away and {again}")
    return False


def _probed(entry: dict, run: Path) -> bool:
    """A finished cell: its probe.json (at the trained image size) and the run's EMA weights are still those the
    entry recorded."""
    from .eval.evaluate import PROBE_FILE
    from .eval.protocols.context import RESULTS_DIR
    from .run import weights_version

    if entry.get("status") != "done" or not isinstance(entry.get("weights"), str):
        return False
    try:
        probe = json.loads((run / RESULTS_DIR / PROBE_FILE).read_bytes())
        now = weights_version(run, "ema")
    except Exception:  # noqa: BLE001 - anything missing or unreadable: the cell is probed again
        return False
    return (isinstance(probe, dict) and probe.get("weights") == entry["weights"] == now
            and "trained_image_size" not in probe)


def _final_loss(result, run: Path) -> float | None:
    from .train.logger import read_log

    loss = result.last_log.get("loss")
    if loss is None:
        rows = [r for r in read_log(run) if _is_number(r.get("loss"))]
        loss = rows[-1]["loss"] if rows else None
    return loss


def _readout(cfg, probe: dict, causal: bool | None) -> dict:
    from .methods import get_method

    out = {"layer": probe["layer"], "pool": probe["pool"]}
    if causal is not None:
        out["causal"] = causal
    for k in get_method(cfg.method).feature_options:
        if k in probe:
            out[k] = probe[k]
    return out


def best_cell(doc: dict) -> dict | None:
    done = [c for c in doc["cells"] if c.get("status") == "done"]
    return max(done, key=lambda c: c["linear_acc"]) if done else None


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def first_knn(c: dict) -> tuple[str, float] | None:
    """(k, accuracy) of a finished cell's smallest kNN k (None without kNN results)."""
    knn = c.get("knn") or {}
    if not knn:
        return None
    k = min(knn, key=lambda s: int(s) if str(s).isdigit() else 0)
    return k, knn[k]


def cell_summary(c: dict) -> str:
    k = first_knn(c)
    return f"linear {_pct(c['linear_acc'])}" + (f", kNN k={k[0]} {_pct(k[1])}" if k else "")


def _open(out: Path, claimed: bool):
    """(lock, folders made, whether the grid is new): the folder made or checked, locked, and marked."""
    from .io import atomic_write_json
    from .locks import LOCK_FILE, RunLock
    from .runs import check_no_links, make_folders

    check_grid_out(out)
    made = make_folders(out)
    lock = RunLock(out, "run a grid in").acquire()
    try:
        check_grid_out(out)  # again, under the lock: of two commands racing for one --out, the second stops
        fresh = not is_grid_folder(out)
        if fresh:
            from . import __version__

            atomic_write_json(out / GRID_MARKER, {"format": _FORMAT, "genrep": __version__})
        else:
            check_no_links(out)
        return lock, made, fresh
    except BaseException:
        lock.release()
        if made or claimed:
            for path in (out / LOCK_FILE,):
                if path.is_file() and not path.is_symlink():
                    path.unlink()
            for folder in made or [out]:
                try:
                    folder.rmdir()
                except OSError:
                    pass
        raise


def _discard(out: Path, made: list[Path], claimed: bool) -> None:
    """Undo a new grid none of whose cells left a folder: genrep's own files, and the folders this call made."""
    from .locks import LOCK_FILE

    if any(p.name not in (GRID_MARKER, GRID_FILE, LOCK_FILE) and not p.name.startswith(f".{GRID_FILE}.")
           for p in out.iterdir()):
        return  # a cell trained: the grid is kept, to resume
    for name in (GRID_FILE, GRID_MARKER, LOCK_FILE):
        path = out / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
    for folder in made or ([out] if claimed else []):
        try:
            folder.rmdir()
        except OSError:
            pass


def run_grid(plan: GridPlan, out: Path, *, claimed: bool = False, say=print) -> dict:
    """Train and probe every cell of ``plan`` into the grid folder ``out`` (resuming a grid of the same
    settings), then draw the heatmap; returns grid.json's content. ``claimed``: ``out`` was made empty by
    :func:`genrep.runs.claim_new_run_dir` for this call, and is given back if nothing could start."""
    import time

    from .io import atomic_write_json, check_can_write

    out = Path(out)
    try:
        for cell in plan.cells:  # a value too long for a file name, a parent that is a file: before any work
            check_can_write(out / cell.name, "grid cell folder")
    except GenrepError:
        if claimed:
            out.rmdir()
        raise
    lock, made, fresh = _open(out, claimed)
    try:
        doc = _start(plan, out, fresh)
        atomic_write_json(out / GRID_FILE, doc)
        t0 = time.perf_counter()
        for k, cell in enumerate(plan.cells):
            _run_cell(plan, out, doc, k, cell, say)
        doc["best"] = _best_ref(doc)
        doc["finished"] = all(c["status"] == "done" for c in doc["cells"])
        grid_figure(doc, out / GRID_FIGURE)
        doc["figure"] = GRID_FIGURE
        doc["seconds_this_call"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out / GRID_FILE, doc)
        return doc
    except BaseException:
        if fresh:
            _discard(out, made, claimed)
        raise
    finally:
        lock.release()


def _check_same(plan: GridPlan, old: dict, out: Path) -> None:
    ours = plan.settings()
    theirs = {"recipe": old["recipe"], "overrides": old["overrides"],
              "axes": [{"key": a["key"], "values": a["values"]} for a in old["axes"]]}
    if theirs != ours:
        raise GenrepError(f"{out} is a grid made with other settings ({_differences(theirs, ours)}); run the command "
                          f"that made it to resume it, or choose another --out")


def _start(plan: GridPlan, out: Path, fresh: bool) -> dict:
    """grid.json to start from: new, or the existing grid's, whose settings must be this command's."""
    doc = _new_doc(plan)
    old = None if fresh else read_grid(out)
    if old is None:
        return doc
    _check_same(plan, old, out)
    by_name = {c.get("name", c["run"]): c for c in old["cells"]}
    for entry in doc["cells"]:
        was = by_name.get(entry["name"])
        if was is not None and was.get("run") == entry["run"]:
            entry.update({k: v for k, v in was.items() if k not in ("name", "index", "values", "run")})
    return doc


def _best_ref(doc: dict) -> dict | None:
    b = best_cell(doc)
    return None if b is None else {"name": b["name"], "index": b["index"], "linear_acc": b["linear_acc"]}


def _run_cell(plan: GridPlan, out: Path, doc: dict, k: int, cell: Cell, say) -> None:
    from .eval.evaluate import run_probes
    from .io import atomic_write_json
    from .run import Run
    from .train.loop import pretrain

    entry, run, n = doc["cells"][k], out / cell.name, len(plan.cells)
    head = f"genrep grid: cell {k + 1}/{n} {cell.name}"
    try:
        resume = cell_resumes(run, cell.cfg)
        if resume and _probed(entry, run):
            took = _secs(entry.get("train_seconds") or 0)
            say(f"{head}: kept (finished earlier, trained in {took}), {cell_summary(entry)}")
            return
        earlier = resume and entry.get("status") in ("trained", "done") and _is_number(entry.get("train_seconds"))
        before = entry["train_seconds"] if earlier else 0.0
        for key in ("linear_acc", "knn", "classifier_acc", "readout", "probe_seconds"):
            entry.pop(key, None)
        entry["status"] = "pending"
        result = pretrain(cell.cfg, run, resume=resume)
        trained = Run.open(run)   # the cell's folder read once for its record and its probe
        entry.update(status="trained", train_seconds=round(before + result.seconds, 2), steps=result.steps,
                     final_loss=_final_loss(result, run), weights=trained.weights_version("ema"))
        atomic_write_json(out / GRID_FILE, doc)
        probe = run_probes(trained, device=cell.cfg.train.device, progress=cell.cfg.train.progress)
    except GenrepError as e:
        raise type(e)(f"grid cell {cell.name} ({k + 1}/{n}): {e}") from None  # a refused write keeps its exit 1
    entry.update(status="done", weights=probe["weights"], linear_acc=probe["linear_probe"]["test_acc"],
                 knn=probe["knn"], readout=_readout(cell.cfg, probe, cell.causal), probe_seconds=probe["seconds"])
    if "classifier_test_acc" in probe:
        entry["classifier_acc"] = probe["classifier_test_acc"]
    doc["best"] = _best_ref(doc)
    atomic_write_json(out / GRID_FILE, doc)
    if not resume or result.start_step == 0:
        how = f"trained {_secs(entry['train_seconds'])} ({entry['steps']} steps)"
    elif result.start_step < result.steps:
        how = (f"resumed at step {result.start_step}, trained {_secs(entry['train_seconds'])} "
               f"({entry['steps']} steps)")
    else:
        how = f"trained earlier ({entry['steps']} steps), probed now"
    say(f"{head}: {how}, {cell_summary(entry)}")


# ------------------------------------------------------------------------------------------ table and figure

def grid_matrix(doc: dict) -> tuple[list[list[float]], list[str], list[str], str, str]:
    """Linear-probe accuracy (%) as rows x columns (NaN where a cell is not done), their labels and the axes'
    names. Rows: the first axis, columns: the second; one axis is one row over its values."""
    axes = doc["axes"]
    labels = [[value_text(v) for v in a["values"]] for a in axes]
    if len(axes) == 1:
        rows, cols, row_name, col_name = ["linear probe"], labels[0], "", axes[0]["key"]
    else:
        rows, cols, row_name, col_name = labels[0], labels[1], axes[0]["key"], axes[1]["key"]
    m = [[float("nan")] * len(cols) for _ in rows]
    for c in doc["cells"]:
        if c.get("status") == "done":
            i, j = (0, c["index"][0]) if len(axes) == 1 else tuple(c["index"])
            m[i][j] = 100 * c["linear_acc"]
    return m, rows, cols, row_name, col_name


def grid_table(doc: dict) -> str:
    """The heatmap as text: a header of the columns' values, one line per row, the best cell starred."""
    m, rows, cols, row_name, col_name = grid_matrix(doc)
    best = best_cell(doc)
    bi = None if best is None else ((0, best["index"][0]) if len(doc["axes"]) == 1 else tuple(best["index"]))
    corner = f"{row_name} \\ {col_name}" if row_name else col_name
    width = max(len(corner), *(len(r) for r in rows))
    colw = max(7, *(len(c) + 1 for c in cols))
    lines = [f"{METRIC} (%) of {doc['recipe']}" + (" (* best)" if best else ""),
             f"{corner:<{width}}" + "".join(f"{c:>{colw}}" for c in cols)]
    for i, r in enumerate(rows):
        cells = []
        for j, v in enumerate(m[i]):
            text = "-" if math.isnan(v) else f"{v:.1f}" + ("*" if (i, j) == bi else " ")
            cells.append(f"{text:>{colw}}")
        lines.append(f"{r:<{width}}" + "".join(cells))
    if best is not None:
        lines.append(f"best: {best['name']}: {cell_summary(best)}")
    return "\n".join(lines)


def grid_figure(doc: dict, path: Path) -> Path:
    from .eval.report.figures import grid_heatmap

    m, rows, cols, row_name, col_name = grid_matrix(doc)
    extra = ", ".join(f"{k} {value_text(v)}" for k, v in doc["overrides"].items())
    title = f"{doc['recipe']}: {METRIC} (%)" + (f"\n{extra}" if extra and len(extra) < 90 else "")
    return grid_heatmap(m, path, rows, cols, row_name=row_name, col_name=col_name, title=title,
                        label="linear-probe accuracy (%)")
