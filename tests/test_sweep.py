"""The read-out sweep (`genrep sweep`, protocol "sweep"): block x t x pool x head on cached features for a
U-Net (adm) and a ViT denoiser (genvit) with the same settings, the cache reused by a second sweep, the CLI's
table, eval.json shared with other protocols, the report, and bad input as one line before any work."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from eval_helpers import no_extraction

from genrep.cli import main
from genrep.config import ON_DEMAND, EvalConfig, resolve_config
from genrep.eval.evaluate import evaluate_run, plan, read_results
from genrep.eval.protocols.head_training import HeadSettings
from genrep.eval.protocols.sweep import SweepSettings, sweep_blocks
from genrep.methods import DataSpec, build_method, get_method
from genrep.runs import load_trained, read_run_config
from genrep.train.loop import pretrain

PNG = b"\x89PNG\r\n\x1a\n"
# a shipped method whose features are vectors and that reads no noised image (the tests' own toy as a
# fallback)
VECTOR = next(n for n in ("simclr", "igpt", "gcrl", "toy") if not get_method(n).feature_maps)
BLOCKS, STEPS, POOLS, HEADS = [1, 2], [0, 50], ["1", "2"], ["linear", "attention"]
# the same grid for both methods, sized for seconds: one weight decay for the linear solver, one head epoch
SWEEP = EvalConfig(protocols=["sweep"], device="cpu", batch_size=512,
                   sweep=SweepSettings(blocks=BLOCKS, t=STEPS, pools=POOLS, heads=HEADS, weight_decay=[1e-3],
                                       head=HeadSettings(epochs=1, batch_size=512)))
CLI_SWEEP = ["--blocks", "1,2", "--t", "0,50", "--pool", "1,2", "--head", "linear", "--device", "cpu",
             "--eval.sweep.weight_decay", "1e-3", "--eval.sweep.head.epochs", "1", "--eval.batch_size", "512"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Tiny trained runs: a U-Net and a ViT denoiser (both read at noise steps) and a vector-only method."""
    base = tmp_path_factory.mktemp("sweep-runs")
    out = {}
    for name in ("adm", "genvit", VECTOR):
        out[name] = base / name
        pretrain(tiny_config(name, **{"train.steps": 2}), out[name])
    return out


@pytest.fixture(scope="module")
def swept(runs) -> dict[str, dict]:
    """The same sweep on adm and genvit, through the evaluation driver."""
    return {name: evaluate_run(runs[name], SWEEP, progress=False, say=lambda m: None)
            for name in ("adm", "genvit")}


def _accuracies(sweep: dict) -> dict:
    return {(c["block"], c["t"], c["pool"], c["head"]): c["acc"] for c in sweep["cells"]}


# ------------------------------------------------------------------------------------------------ the grid

@pytest.mark.slow
@pytest.mark.parametrize("name", ["adm", "genvit"])
def test_the_grid_has_every_cell_the_best_per_head_and_figures(swept, runs, name):
    run = runs[name]
    s = read_results(run)["protocols"]["sweep"]
    assert s == json.loads(json.dumps(swept[name]["protocols"]["sweep"]))  # returned is what is on disk
    expected = {(b, t, p, "linear") for b in BLOCKS for t in STEPS for p in POOLS}
    expected |= {(b, t, "map", "attention") for b in BLOCKS for t in STEPS}  # map heads read the whole map
    acc = _accuracies(s)
    assert set(acc) == expected and len(s["cells"]) == len(expected)
    assert all(0 <= a <= 1 for a in acc.values())
    ch = {c["block"]: c["feature_shape"] for c in s["cells"] if c["head"] == "attention" and c["t"] == 0}
    for c in s["cells"]:
        assert c["params"] > 0
        if c["head"] == "linear":
            assert c["weight_decay"] == 1e-3
            assert c["feature_shape"] == [ch[c["block"]][0] * int(c["pool"]) ** 2]  # C * p * p
    # the best cell of each head, and overall
    assert set(s["best"]) == set(HEADS)
    for head, b in s["best"].items():
        assert b["acc"] == max(a for k, a in acc.items() if k[3] == head)
        assert acc[(b["block"], b["t"], b["pool"], head)] == b["acc"]
    o = s["best_overall"]
    assert o["acc"] == max(acc.values()) and acc[(o["block"], o["t"], o["pool"], o["head"])] == o["acc"]
    assert s["noise"] == "fixed"
    # heatmaps over block x t, and accuracy over pool size (two sizes here)
    assert len(s["figures"]) == 2
    for rel in s["figures"].values():
        assert (run / rel).read_bytes()[:8] == PNG
    assert s["settings"]["t"] == STEPS and s["settings"]["heads"] == HEADS
    # the sweep sets feature_t while it runs and never writes the run's config
    assert read_run_config(run).model.feature_t is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adm", "genvit"])
def test_a_second_sweep_reads_the_cache_and_gives_the_same_accuracies(swept, runs, name, monkeypatch):
    run = runs[name]
    cached = sorted(p.name for p in (run / "cache").iterdir() if "feature_tNone" not in p.name)
    # one file per (split, block, pool incl. map, t)
    assert len(cached) == 2 * len(BLOCKS) * (len(POOLS) + 1) * len(STEPS)
    assert all(f"feature_t{t}" in " ".join(cached) for t in STEPS)
    work = no_extraction(monkeypatch)
    # a part of the grid (both heads, one block, one step): every feature it reads is cached
    part = replace(SWEEP, sweep=replace(SWEEP.sweep, blocks=[2], t=[50]))
    again = _accuracies(evaluate_run(run, part, progress=False, say=lambda m: None)["protocols"]["sweep"])
    assert work == []
    first = _accuracies(swept[name]["protocols"]["sweep"])
    assert set(again) == {(2, 50, "1", "linear"), (2, 50, "2", "linear"), (2, 50, "map", "attention")}
    assert again == {k: first[k] for k in again}
    assert sorted(p.name for p in (run / "cache").iterdir() if "feature_tNone" not in p.name) == cached


@pytest.mark.slow
def test_cached_noised_features_equal_a_fresh_extraction(swept, runs):
    """A cache entry of the sweep at t=50 is what the method gives for those images now (fixed noise)."""
    run = runs["adm"]
    _, method, _ = load_trained(run, options={"feature_t": 50})
    key = next(p for p in (run / "cache").iterdir() if "-test-layer2-2-feature_t50-" in p.name)
    from safetensors.torch import load_file
    cached = load_file(key)["features"]
    from genrep.runs import load_splits
    _, test = load_splits(read_run_config(run))
    with torch.no_grad():
        direct = method.features(test.images[:100].float() / 255, layer=2, pool="2")
    torch.testing.assert_close(cached[:100], direct)


# ----------------------------------------------------------------------------------------------- the CLI

@pytest.mark.slow
def test_genrep_sweep_prints_a_table_and_keeps_the_other_protocols(runs, capsys):
    run = runs["adm"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--eval.protocols", "probes", "--eval.device", "cpu",
                 "--eval.probes.sweep", "false", "--eval.probes.solver", "lbfgs",
                 "--eval.probes.weight_decay", "1e-3", "--eval.probes.knn_k", "5"]) == 0
    probes = read_results(run)["protocols"]["probes"]
    capsys.readouterr()
    assert main(["sweep", str(run), *CLI_SWEEP]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("head, pool, t"))
    assert lines[top].split() == ["head,", "pool,", "t", "b1", "b2"]
    lines = lines[top:]
    for p in POOLS:
        for t in STEPS:
            row = next(line for line in lines if line.startswith(f"linear pool {p} t={t} "))
            assert len(row.split()) == 4 + len(BLOCKS)
    assert any(line.startswith("best linear: block ") for line in lines)
    assert "results: " in out and "eval.json" in out
    results = read_results(run)
    assert list(results["protocols"]) == ["probes", "sweep"]  # registry order, the probes kept
    assert results["protocols"]["probes"] == probes
    s = results["protocols"]["sweep"]
    assert {c["head"] for c in s["cells"]} == {"linear"}
    assert len(s["cells"]) == len(BLOCKS) * len(STEPS) * len(POOLS)
    assert all(0 <= c["acc"] <= 1 for c in s["cells"])


def test_the_default_protocols_do_not_include_the_sweep(runs):
    assert ON_DEMAND == ("sweep",) and "sweep" not in EvalConfig().protocols
    assert "sweep" not in read_run_config(runs["adm"]).eval.protocols
    assert "sweep" not in resolve_config("adm-digits").eval.protocols
    _, method, _ = load_trained(runs["adm"])
    names, skipped = plan(method, EvalConfig())
    assert "sweep" not in names and "sweep" not in skipped
    names, _ = plan(method, replace(EvalConfig(), protocols=["probes", "sweep"]))
    assert names == ["probes", "sweep"]


@pytest.mark.slow
def test_the_report_shows_the_sweep_of_both_runs(swept, runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(runs["adm"]), str(runs["genvit"]), "-o", str(out)]) == 0
    page = out.read_text()
    assert "Read-out sweep (block x t x pool x head)" in page
    section = page[page.index("Read-out sweep (block x t x pool x head)"):]
    for name in ("adm", "genvit"):
        assert name in section
    # (genrep sweep in the CLI test may have replaced adm's grid by a linear one; genvit's has both heads)
    assert "best block" in section and "attention" in section and "linear" in section


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("name, args, fragments", [
    (VECTOR, ["--t", "0,50"], (f"eval.sweep.t: {VECTOR} reads no noised image; noise steps apply to adm, "
                               "genvit, hybvit",)),
    ("adm", ["--t", "0,1000"], ("eval.sweep.t 1000 is not a diffusion step; choose 0..999",)),
    ("genvit", ["--t", "1000"], ("eval.sweep.t 1000 is not a diffusion step; choose 0..999",)),
    ("adm", ["--blocks", "2,99"], ("layer 99 does not exist in adm; choose 1..9",)),
    ("genvit", ["--blocks", "3"], ("layer 3 does not exist in genvit; choose 1..2",)),
    ("adm", ["--pool", "1,map"], ("eval.sweep.pools", "'map'")),
    ("adm", ["--pool", "99"], ("pool 99 is larger than the",)),
    (VECTOR, ["--pool", "2", "--blocks", "1"], (f"pooling '2' is not offered by {VECTOR}",)),
    (VECTOR, ["--head", "linear,cnn", "--blocks", "1"], ("eval.sweep.heads: the cnn head needs feature maps, "
                                                         f"and {VECTOR}'s features are vectors",)),
    (VECTOR, ["--head", "attention", "--blocks", "1"], ("the attention head needs feature maps",)),
    ("adm", ["--head", "svm"], ("svm",)),
    ("adm", ["--model.num_channels", "64"], ("cannot change model.num_channels of a trained adm run",)),
])
def test_bad_sweep_input_is_one_line_before_any_work(runs, capsys, monkeypatch, name, args, fragments):
    run = runs[name]
    path = run / "results" / "eval.json"
    before = path.read_bytes() if path.exists() else None
    work = no_extraction(monkeypatch)
    capsys.readouterr()
    rc = main(["sweep", str(run), "--device", "cpu", *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("genrep: error: "), (rc, lines)
    assert all(f in lines[0] for f in fragments), lines[0]
    assert work == []
    assert (path.read_bytes() if path.exists() else None) == before


def test_default_blocks_for_every_method(method_name):
    """Without --blocks the sweep reads about 10 blocks spread over the network and the default read-out, also
    for a method that leaves its default layer to the base class (default_layer None: the last)."""
    spec = DataSpec(image_size=8, channels=1, num_classes=10)
    m = build_method(method_name, tiny_config(method_name).model, spec)
    blocks = sweep_blocks(m, [])
    default, _ = m.check_feature_args(None, None)
    assert blocks == sorted(set(blocks)) and default in blocks and m.num_layers in blocks
    assert all(1 <= b <= m.num_layers for b in blocks) and len(blocks) <= 11
    assert sweep_blocks(m, [2, 1, 2]) == [1, 2]
