"""`genrep reproduce`: a paper's table as a runnable spec, with the paper's numbers beside genrep's.

A spec (``genrep/specs/<paper>/<table>.yaml``) names the table, the claim it makes in the paper's words, the metric
(a key of a run's ``eval.json`` or ``probe.json``, its unit, which direction is better), the rows (a recipe per scale
plus overrides, and the paper's value where it gives one), and the comparison the claim makes: the rows from best to
worst. Each scale (``paper``: the paper's recipes and data; ``reduced``: CIFAR-10-sized, about a GPU-hour a row;
``smoke``: digits, a few CPU minutes a row, reading nothing genrep does not ship or make; ``cpu``, where a spec has
it: CIFAR-10 made small (16 px or 8 px, a fraction of the training split, narrow networks), a CPU-hour or less a
spec) changes budgets, sizes and data, never the method, which the check enforces. ``--data`` names a copy of the
scale's data set (``npz:PATH``) for a machine that cannot download it.

Running one trains and evaluates every row for each seed into ``OUT/<row>-seed<k>`` (a run folder, resumed or kept
when it is already there, as a grid's cells are), writing ``OUT/reproduce.json`` after each, then the verdict: per
row the mean and spread over seeds, the difference from the paper's value, and whether the claim's ordering holds at
this scale, in words: "holds", "does not hold", or "within noise" (a difference no larger than the seeds' spread).
Every row's config and the evaluation's settings are built and checked before the first step is trained.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import GenrepError

SPECS = Path(__file__).resolve().parent / "specs"
SCALES = ("smoke", "cpu", "reduced", "paper")
STATUSES = ("runnable", "needs data", "not implemented")
PAPERS = {"gcrl": "GCRL (gcrl-hybrid-generative-contrastive)", "hybvit": "GenViT/HybViT (genvit-hybvit-diffusion-vit)",
          "diffusion-features": "Diffusion features (diffusion-features-classification)",
          "gvp": "GVP (gvp-autoregressive-masked)", "darl": "DARL (darl-denoising-autoregressive)"}
METRIC_FILES = ("eval.json", "probe.json")
REPRODUCE_FILE = "reproduce.json"
REPRODUCE_PAGE = "reproduce.html"
_FORMAT = "genrep-reproduce-1"
_SPEC_KEYS = {"paper", "table", "title", "claim", "status", "why", "metric", "protocols", "comparison", "scales", "rows"}
_METRIC_KEYS = {"file", "key", "name", "unit", "factor", "better"}
_SCALE_KEYS = {"about", "overrides", "eval"}
_ROW_KEYS = {"name", "recipe", "overrides", "scale_overrides", "paper_value"}


@dataclass
class Row:
    name: str
    recipe: dict[str, str]        # scale -> recipe
    overrides: dict[str, Any]     # every scale's
    paper_value: float | None
    scale_overrides: dict[str, dict[str, Any]]   # scale -> this row's overrides at that scale only (a size)


@dataclass
class Spec:
    name: str                     # "hybvit/table1-accuracy"
    paper: str
    table: str
    title: str
    claim: str
    status: str
    why: str
    metric: dict[str, Any]
    protocols: list[str]
    comparison: list[str]         # row names, best first
    scales: dict[str, dict]
    rows: list[Row]

    @property
    def runnable(self) -> bool:
        return self.status == "runnable"


def spec_names() -> list[str]:
    return sorted(f"{p.parent.name}/{p.stem}" for p in SPECS.glob("*/*.yaml"))


def load_spec(name: str) -> Spec:
    """The shipped spec ``name`` ("hybvit/table1-accuracy"), read and checked in full (recipes, keys, metric)."""
    path = SPECS / f"{name}.yaml"
    if "/" not in name or ".." in name or not path.is_file():
        names = spec_names()
        near = ([n for n in names if n.startswith(f"{name}-")]                  # hybvit/table1: its parts
                or [n for n in names if n.split("/")[0] == name.split("/")[0]] or names)
        raise GenrepError(f"no reproduction spec {name!r}; choose one of {', '.join(near)} (genrep reproduce --list)")
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise GenrepError(f"spec {name}: {path} is not readable YAML ({str(e).splitlines()[0]})") from None
    return check_spec(name, doc)


def _need(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise GenrepError(f"spec {name}: {msg}")


def check_spec(name: str, doc) -> Spec:
    """A spec document checked: its keys, its rows' recipes at every scale (one method per row across scales), their
    overrides, the evaluation's settings, the metric and the comparison."""
    _need(isinstance(doc, dict), name, "must be a mapping of spec keys")
    unknown = sorted(set(doc) - _SPEC_KEYS)
    _need(not unknown, name, f"unknown keys {', '.join(unknown)}; a spec has {', '.join(sorted(_SPEC_KEYS))}")
    paper = name.split("/")[0]
    _need(paper in PAPERS, name, f"its folder {paper!r} is not one of the papers {', '.join(PAPERS)}")
    for key in ("table", "title", "claim"):
        _need(isinstance(doc.get(key), str) and doc[key].strip(), name, f"needs {key}: a non-empty string")
    status = doc.get("status", "runnable")
    _need(status in STATUSES, name, f"status {status!r} is not one of {', '.join(STATUSES)}")
    why = doc.get("why", "")
    if status != "runnable":
        _need(isinstance(why, str) and why.strip(), name, f"status {status!r} needs why: the reason, in one line")
        return Spec(name, paper, doc["table"], doc["title"], doc["claim"], status, why, {}, [], [], {}, [])
    metric = _check_metric(name, doc.get("metric"))
    protocols = _check_protocols(name, doc.get("protocols", []), metric)
    scales = _check_scales(name, doc.get("scales"))
    rows = [_check_row(name, r, scales) for r in _list(name, doc.get("rows"), "rows")]
    names = [r.name for r in rows]
    _need(len(set(names)) == len(names), name, f"row names repeat ({', '.join(names)}); give each row its own name")
    comparison = _list(name, doc.get("comparison"), "comparison")
    bad = [c for c in comparison if c not in names]
    _need(not bad and len(comparison) >= 2 and len(set(comparison)) == len(comparison), name,
          f"comparison must list two or more of the rows ({', '.join(names)}), best first, each once; got "
          f"{comparison}")
    spec = Spec(name, paper, doc["table"], doc["title"], doc["claim"], status, why, metric, protocols, comparison,
                scales, rows)
    for row in rows:
        methods = {scale: cell_config(spec, row, scale, 0).method for scale in scales}
        _need(len(set(methods.values())) == 1, name, f"row {row.name} is {', '.join(f'{m} at {s}' for s, m in methods.items())}; "
                                                     f"a scale changes budgets and data, never the method")
    for scale in scales:
        eval_config(spec, spec.rows[0], scale)
    return spec


def _list(name: str, value, key: str) -> list:
    _need(isinstance(value, list) and value, name, f"{key} must be a non-empty list")
    return value


def _check_metric(name: str, m) -> dict:
    _need(isinstance(m, dict), name, "needs metric: {file, key, name, unit, factor, better}")
    unknown = sorted(set(m) - _METRIC_KEYS)
    _need(not unknown, name, f"metric has unknown keys {', '.join(unknown)}; it has {', '.join(sorted(_METRIC_KEYS))}")
    _need(m.get("file") in METRIC_FILES, name, f"metric.file {m.get('file')!r} must be one of {', '.join(METRIC_FILES)}")
    key = m.get("key")
    path = key.split(".") if isinstance(key, str) else key
    _need(isinstance(path, list) and path and all(isinstance(p, str) and p for p in path), name,
          "metric.key must be a dotted key of the file (protocols.calibration.ece), or a list of its parts when a "
          "part holds a dot")
    _need(m.get("better") in ("higher", "lower"), name, f"metric.better {m.get('better')!r} must be higher or lower")
    factor = m.get("factor", 1)
    _need(isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0, name,
          f"metric.factor {factor!r} must be a positive number (genrep's value x factor = the paper's unit)")
    for k in ("name", "unit"):
        _need(isinstance(m.get(k, ""), str), name, f"metric.{k} must be a string")
    return {"file": m["file"], "key": path, "name": m.get("name") or path[-1], "unit": m.get("unit", ""),
            "factor": float(factor), "better": m["better"]}


def _check_protocols(name: str, protocols, metric: dict) -> list[str]:
    from .eval.protocols import PROTOCOLS

    _need(isinstance(protocols, list), name, "protocols must be a list of genrep evaluate's protocols")
    bad = [p for p in protocols if p not in PROTOCOLS]
    _need(not bad, name, f"protocols {', '.join(map(str, bad))} are not genrep's; choose among {', '.join(PROTOCOLS)}")
    if metric["file"] == "eval.json":
        key = metric["key"]
        _need(len(key) >= 3 and key[0] == "protocols" and key[1] in protocols, name,
              f"metric.key {'.'.join(key)} must read protocols.<one of the spec's protocols ({', '.join(protocols)})>"
              f".<its result>")
    else:
        _need(not protocols, name, "a probe.json metric is genrep probe's: leave protocols empty")
    return protocols


def _check_scales(name: str, scales) -> dict[str, dict]:
    _need(isinstance(scales, dict) and scales, name, f"scales must map some of {', '.join(SCALES)} to their settings")
    out = {}
    for scale, s in scales.items():
        _need(scale in SCALES, name, f"scale {scale!r} is not one of {', '.join(SCALES)}")
        _need(isinstance(s, dict) and not set(s) - _SCALE_KEYS, name,
              f"scale {scale} takes {', '.join(sorted(_SCALE_KEYS))}")
        _need(isinstance(s.get("about"), str) and s["about"].strip(), name,
              f"scale {scale} needs about: its data and budget in words (e.g. about one GPU-hour a row)")
        for k in ("overrides", "eval"):
            _need(isinstance(s.get(k, {}), dict), name, f"scale {scale}'s {k} must be a mapping of keys to values")
        out[scale] = {"about": s["about"], "overrides": dict(s.get("overrides") or {}), "eval": dict(s.get("eval") or {})}
    return out


def _check_row(name: str, r, scales: dict) -> Row:
    from .config import recipe_names

    _need(isinstance(r, dict) and not set(r) - _ROW_KEYS and isinstance(r.get("name"), str), name,
          f"a row takes {', '.join(sorted(_ROW_KEYS))} (name a string), got {r!r}")
    recipe = r.get("recipe")
    if isinstance(recipe, str):
        recipe = dict.fromkeys(scales, recipe)
    _need(isinstance(recipe, dict) and set(scales) <= set(recipe), name,
          f"row {r['name']}: recipe must name a recipe for every scale of the spec ({', '.join(scales)})")
    known = set(recipe_names())
    missing = [v for s, v in recipe.items() if s in scales and v not in known]
    _need(not missing, name, f"row {r['name']}: recipe {', '.join(map(str, missing))} no longer exists (genrep recipes)")
    value = r.get("paper_value")
    _need(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)), name,
          f"row {r['name']}: paper_value must be a number in the metric's unit, or null where the paper gives none")
    _need(isinstance(r.get("overrides", {}), dict), name, f"row {r['name']}: overrides must be a mapping")
    at = r.get("scale_overrides") or {}
    _need(isinstance(at, dict) and set(at) <= set(scales) and all(isinstance(v, dict) for v in at.values()), name,
          f"row {r['name']}: scale_overrides must map some of the spec's scales ({', '.join(scales)}) to overrides")
    return Row(r["name"], {s: recipe[s] for s in scales}, dict(r.get("overrides") or {}), value,
               {s: dict(v) for s, v in at.items()})


def cell_config(spec: Spec, row: Row, scale: str, seed: int, data: str | None = None):
    """The config of ``row`` at ``scale`` for seed index ``seed`` (the recipe's seed plus it), checked; ``data``
    (``--data``) replaces the data set's name (a local copy of the scale's set)."""
    from .config import resolve_config

    base = resolve_config(row.recipe[scale], {})
    try:
        cfg = resolve_config(row.recipe[scale], {**spec.scales[scale]["overrides"], **row.overrides,
                                                 **row.scale_overrides.get(scale, {}),
                                                 "train.seed": base.train.seed + seed,
                                                 **({"data.name": data} if data else {})})
    except GenrepError as e:
        raise GenrepError(f"spec {spec.name}, row {row.name} at scale {scale}: {e}") from None
    return cfg


def eval_config(spec: Spec, row: Row, scale: str, cfg=None):
    """The evaluation of a row's run: its config's ``eval`` section with the spec's protocols, the training's device
    and the scale's eval keys; None for a probe.json metric (genrep probe, with the run's own probe section)."""
    import dataclasses

    from .config import EvalConfig, apply_overrides, build_dataclass

    if spec.metric["file"] != "eval.json":
        return None
    cfg = cfg or cell_config(spec, row, scale, 0)
    values = apply_overrides(dataclasses.asdict(cfg.eval), {"protocols": spec.protocols, "device": cfg.train.device,
                                                            **spec.scales[scale]["eval"]})
    try:
        return build_dataclass(EvalConfig, values, "eval")
    except GenrepError as e:
        raise GenrepError(f"spec {spec.name} at scale {scale}: {e}") from None


# ------------------------------------------------------------------ runs reused from earlier reproductions

def finished_runs(sources: list[Path]) -> list[tuple[Path, dict]]:
    """Every row's run that the reproductions under ``sources`` finished (a source is a reproduction, or a folder
    of them, such as ``runs``), with its config: what a row trained with the same config may copy."""
    from .runs import is_marked_run, read_run_config

    found = []
    for source in sources:
        source = Path(source)
        if not source.is_dir():
            raise GenrepError(f"--reuse {source} is not a folder; name a reproduction or a folder of them")
        folders = [source] if is_reproduction(source) else sorted(p for p in source.iterdir() if is_reproduction(p))
        if not folders:
            raise GenrepError(f"--reuse {source} holds no genrep reproduction (no {REPRODUCE_FILE}); name a "
                              f"reproduction or a folder of them")
        for folder in folders:
            doc = read_reproduction(folder)
            for names in (doc or {}).get("runs", {}).values():
                for name in names if isinstance(names, list) else []:
                    run = folder / str(name)
                    if run.parent != folder or run.is_symlink() or not is_marked_run(run):
                        continue
                    try:
                        found.append((run, read_run_config(run).to_dict()))
                    except GenrepError:
                        continue   # a config this genrep cannot read (another version's keys) is no row's config
    return found


def copied_before(out: Path) -> dict[str, str]:
    """The rows an earlier call of this reproduction copied (row folder -> source), kept when it is resumed."""
    copied = (read_reproduction(out) or {}).get("copied", {})
    return {str(k): str(v) for k, v in copied.items()} if isinstance(copied, dict) else {}


def copy_run(source: Path, folder: Path) -> None:
    """``source``'s run folder copied to ``folder`` whole (weights, results, caches), or nothing left on failure:
    it is copied beside ``folder`` and renamed into place."""
    import shutil

    from .locks import LOCK_FILE
    from .runs import check_no_links

    check_no_links(source)
    part = folder.with_name(f".{folder.name}.copying")
    if part.exists():
        shutil.rmtree(part)   # a copy an earlier call left half-made: genrep's own
    try:
        shutil.copytree(source, part, ignore=shutil.ignore_patterns(LOCK_FILE))
        part.rename(folder)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise


# ------------------------------------------------------------------ running a spec

def check_request(spec: Spec, scale: str, seeds) -> None:
    if not spec.runnable:
        raise GenrepError(f"spec {spec.name} is not runnable ({spec.status}: {spec.why})")
    if scale not in spec.scales:
        raise GenrepError(f"spec {spec.name} defines no scale {scale!r}; choose {' or '.join(spec.scales)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise GenrepError(f"--seeds must be a whole number of at least 1 (training runs per row), got {seeds!r}")


def metric_value(spec: Spec, run: Path) -> float:
    """The spec's metric from a row's run, in the paper's unit."""
    import json

    path = run / "results" / spec.metric["file"]
    try:
        value: Any = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise GenrepError(f"cannot read {path} ({e}); run genrep reproduce again") from None
    for part in spec.metric["key"]:
        if not isinstance(value, dict) or part not in value:
            raise GenrepError(f"{path} has no {'.'.join(spec.metric['key'])} (no {part!r}); the spec's metric no "
                              f"longer matches what genrep writes: fix the spec")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GenrepError(f"{path}: {'.'.join(spec.metric['key'])} is {value!r}, not a number; fix the spec")
    return float(value) * spec.metric["factor"]


def _evaluated(run, ev) -> bool:
    """Whether the run's eval.json already holds the spec's protocols, from these weights and with these settings."""
    from .eval.evaluate import read_results, settings

    try:
        r = read_results(run.path)
    except GenrepError:
        return False
    return (r.get("weights") == run.weights_version(ev.weights) and all(
        isinstance(r["protocols"].get(p), dict) and r["protocols"][p].get("settings") == settings(p, ev)
        for p in ev.protocols))


def _probed(run) -> bool:
    import json

    try:
        probe = json.loads((run.path / "results" / "probe.json").read_bytes())
        return probe.get("weights") == run.weights_version(run.config.probe.weights)
    except (OSError, ValueError, AttributeError):
        return False


def run_cell(spec: Spec, row: Row, scale: str, cfg, folder: Path, say) -> float:
    """Train (or resume, or keep) one row's run (``cfg``: one seed's config), evaluate it (or keep its results) and
    read the metric."""
    from .eval.evaluate import evaluate_run, run_probes
    from .grid import cell_resumes
    from .run import Run
    from .train.loop import pretrain

    resume = cell_resumes(folder, cfg, "reproduce", "run genrep reproduce again")
    result = pretrain(cfg, folder, resume=resume)
    trained = "kept" if resume and result.start_step >= result.steps else f"trained {result.seconds:.1f} s"
    run = Run.open(folder)
    ev = eval_config(spec, row, scale, cfg)
    if ev is None:
        done = _probed(run)
        if not done:
            run_probes(run, device=cfg.train.device, progress=cfg.train.progress)
    else:
        done = _evaluated(run, ev)
        if not done:
            evaluate_run(run, ev, progress=cfg.train.progress, say=lambda _m: None)
    value = metric_value(spec, folder)
    say(f"genrep reproduce: {folder.name}: {trained}, {'results kept' if done else 'evaluated'}: "
        f"{spec.metric['name']} {value:.4g}{spec.metric['unit']}")
    return value


def summarise(spec: Spec, values: dict[str, list[float]]) -> dict:
    """Per row the mean, spread and the paper's difference; the claim's verdict at this scale."""
    rows = {}
    for row in spec.rows:
        v = values.get(row.name, [])
        mean = sum(v) / len(v) if v else None
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
        rows[row.name] = {"values": v, "mean": mean, "std": std, "spread": (max(v) - min(v)) if len(v) > 1 else None,
                          "paper": row.paper_value,
                          "difference": None if mean is None or row.paper_value is None else mean - row.paper_value}
    return {"rows": rows, "verdict": verdict(spec, rows)}


def verdict(spec: Spec, rows: dict) -> dict:
    """Whether each adjacent pair of the comparison is ordered as the claim says: "holds" when every pair is, beyond
    the seeds' spread; "does not hold" when a pair is reversed beyond it; else "within noise". With one seed there
    is no spread to measure, and the words say so."""
    sign = 1 if spec.metric["better"] == "higher" else -1
    pairs, words = [], []
    for better, worse in zip(spec.comparison, spec.comparison[1:]):
        a, b = rows[better], rows[worse]
        if a["mean"] is None or b["mean"] is None:
            return {"result": "incomplete", "pairs": pairs, "words": "not every row has a value yet"}
        margin = sign * (a["mean"] - b["mean"])
        noise = None if a["spread"] is None or b["spread"] is None else max(a["spread"], b["spread"])
        if noise is not None and abs(margin) <= noise:
            result = "within noise"
        else:
            result = "holds" if margin > 0 else "does not hold"
        pairs.append({"better": better, "worse": worse, "margin": margin, "noise": noise, "result": result})
        words.append(f"{better} {'>' if sign > 0 else '<'} {worse}: {result} ({margin:+.4g}"
                     + (f", noise {noise:.4g})" if noise is not None else ", one seed: noise not measured)"))
    results = {p["result"] for p in pairs}
    overall = "does not hold" if "does not hold" in results else "within noise" if "within noise" in results else "holds"
    return {"result": overall, "pairs": pairs, "words": "; ".join(words)}


def preflight(spec: Spec, scale: str, cells: list[tuple[Row, int]], data: str | None = None) -> list:
    """Every row's config and evaluation built, its data loaded and its model built on the meta device (its frozen
    parts' files, such as a tokenizer run, found): what would stop a row is said before the first row trains.
    Returns the cells' configs, in the order of ``cells``."""
    from .grid import check_cell

    loaded: dict[str, Any] = {}
    configs = []
    for row, seed in cells:
        cfg = cell_config(spec, row, scale, seed, data)
        eval_config(spec, row, scale, cfg)
        if seed == 0:
            try:
                check_cell(cfg, loaded)
            except GenrepError as e:
                raise GenrepError(f"spec {spec.name}, row {row.name} at scale {scale}: {e}") from None
        configs.append(cfg)
    return configs


def reproduce(name: str, scale: str = "smoke", out: Path | None = None, seeds: int = 1, say=print,
              runs_dir: Path = Path("runs"), reuse: list[Path] | None = None, data: str | None = None) -> dict:
    """Run spec ``name`` at ``scale`` with ``seeds`` seeds per row into ``out``: see the module's text. A row whose
    config equals a run that a reproduction under ``reuse`` finished (or an earlier row of this one) is copied from
    it instead of trained, and says so in ``reproduce.json``'s ``copied``."""
    from .io import atomic_write_json, check_can_write
    from .locks import RunLock
    from .runs import claim_new_run_dir, make_folders

    spec = load_spec(name)
    check_request(spec, scale, seeds)
    cells = [(row, seed) for row in spec.rows for seed in range(seeds)]
    configs = preflight(spec, scale, cells, data)
    done = finished_runs(list(reuse or []))
    if out is None:
        check_can_write(runs_dir, "runs folder --runs-dir")
        out = claim_new_run_dir(runs_dir, f"reproduce-{name.replace('/', '-')}-{scale}")
    else:
        out = Path(out)
        check_can_write(out, "reproduction folder --out", decide=lambda o: check_out(o, spec, scale))
        make_folders(out)
    lock = RunLock(out, "reproduce into").acquire()
    try:
        doc = {"format": _FORMAT, "spec": spec.name, "paper": PAPERS[spec.paper], "table": spec.table,
               "title": spec.title, "claim": spec.claim, "scale": scale, "about": spec.scales[scale]["about"],
               "data": data, "seeds": seeds, "metric": {**spec.metric, "key": ".".join(spec.metric["key"])},
               "comparison": spec.comparison, "runs": {}, "copied": copied_before(out), "rows": {}, "verdict": None,
               "finished": False}
        atomic_write_json(out / REPRODUCE_FILE, doc)   # the folder is genrep's from here on, so a rerun resumes it
        values: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for (row, seed), cfg in zip(cells, configs):
            folder_name, want = f"{row.name}-seed{seed}", cfg.to_dict()
            source = next((run for run, c in done if c == want), None)
            if source is not None and not (out / folder_name).exists():
                copy_run(source, out / folder_name)
                doc["copied"][folder_name] = str(source)
                say(f"genrep reproduce: {folder_name}: copied from {source} (trained with the same config)")
            values.setdefault(row.name, []).append(run_cell(spec, row, scale, cfg, out / folder_name, say))
            doc["runs"].setdefault(row.name, []).append(folder_name)
            done.append((out / folder_name, want))
            doc.update(summarise(spec, values))
            atomic_write_json(out / REPRODUCE_FILE, doc)
        doc["finished"], doc["seconds_this_call"] = True, round(time.perf_counter() - t0, 1)
        atomic_write_json(out / REPRODUCE_FILE, doc)
        from .eval.report.report import write_report

        write_report([out], out / REPRODUCE_PAGE)
        doc["page"] = str(out / REPRODUCE_PAGE)
        return {**doc, "out": str(out)}
    finally:
        lock.release()


def read_reproduction(folder: Path) -> dict | None:
    """``FOLDER/reproduce.json`` checked to be genrep's (None when there is none)."""
    import json

    path = Path(folder) / REPRODUCE_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise GenrepError(f"{path} is not readable JSON ({e}); move it away and run genrep reproduce again") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or not isinstance(doc.get("rows"), dict):
        raise GenrepError(f"{path} is not a genrep reproduction ({_FORMAT}); move it away and run genrep reproduce "
                          f"again")
    return doc


def is_reproduction(folder: Path) -> bool:
    return (Path(folder) / REPRODUCE_FILE).is_file()


def check_out(out: Path, spec: Spec, scale: str) -> bool:
    """An --out genrep may write into: new, empty, or this spec's reproduction at this scale (resumed)."""
    from .locks import LOCK_FILE

    if not out.exists():
        return False
    if not out.is_dir():
        raise GenrepError(f"--out {out} is not a folder; choose a new folder for the reproduction")
    doc = read_reproduction(out)
    if doc is not None:
        if (doc.get("spec"), doc.get("scale")) != (spec.name, scale):
            raise GenrepError(f"{out} holds the reproduction of {doc.get('spec')} at scale {doc.get('scale')}, not "
                              f"{spec.name} at {scale}; choose another --out")
        return True
    if any(p.name != LOCK_FILE for p in out.iterdir()):
        raise GenrepError(f"--out {out} exists and was not made by genrep reproduce; choose another --out or empty it")
    return False
