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
from genrep.eval.protocols.sweep import SweepSettings, pool_fits, sweep_blocks
from genrep.eval.report.summary import headline, sweep_panels, sweep_table
from genrep.methods import DataSpec, build_method, get_method
from genrep.run import load_trained
from genrep.runs import read_run_config
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
    expected |= {(b, t, "map8", "attention") for b in BLOCKS for t in STEPS}  # the map pooled to at most 8x8
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
    assert s["noise"] == "fixed per image, cached" and s["left_out"] == []
    # every cell says how its head was fitted: the linear head by L-BFGS, the attention head by the paper's schedule
    assert s["linear_solver"] == "lbfgs" and s["training"]["linear"] == {"solver": "lbfgs", "weight_decay": [1e-3]}
    assert s["training"]["attention"]["solver"] == "paper" and s["training"]["attention"]["epochs"] == 1
    assert {(c["head"], c["solver"], c.get("epochs")) for c in s["cells"]} == {("linear", "lbfgs", None),
                                                                             ("attention", "paper", 1)}
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
    assert set(again) == {(2, 50, "1", "linear"), (2, 50, "2", "linear"), (2, 50, "map8", "attention")}
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


@pytest.mark.slow
def test_a_pool_larger_than_a_blocks_map_is_left_out_there_and_listed(runs):
    """Tiny adm: block 3's map is 4x4, block 9's 8x8; pool 8 is read at block 9 only, and the result says so."""
    part = replace(SWEEP, sweep=replace(SWEEP.sweep, blocks=[3, 9], t=[0], pools=["1", "8"], heads=["linear"]))
    s = evaluate_run(runs["adm"], part, progress=False, say=lambda m: None)["protocols"]["sweep"]
    assert {(c["block"], c["pool"]) for c in s["cells"]} == {(3, "1"), (9, "1"), (9, "8")}
    assert s["left_out"] == [{"block": 3, "pool": "8", "map_size": 4}]
    assert "left out (pool larger than the block's map): block 3 pool 8 (4x4)" in sweep_table(s)


@pytest.mark.slow
def test_the_papers_linear_head_trains_with_the_head_schedule_for_linear_epochs(runs, monkeypatch):
    """linear_solver paper: the linear head is fit_head's, for linear_epochs (not head.epochs), never L-BFGS; the
    cells, the best cells, the training record, the table and the headline say so."""
    from genrep.eval.protocols import sweep

    schedules = []
    real = sweep.fit_head
    monkeypatch.setattr(sweep, "fit_head",
                        lambda ctx, kind, s, *a: schedules.append((kind, s)) or real(ctx, kind, s, *a))
    monkeypatch.setattr(sweep, "linear_probe", lambda *a, **k: pytest.fail("the L-BFGS solver ran"))
    head = HeadSettings(epochs=1, batch_size=512, step_every=1)
    part = replace(SWEEP, sweep=SweepSettings(blocks=[2], t=[0], pools=["1"], heads=["linear"],
                                              linear_solver="paper", linear_epochs=2, head=head))
    s = evaluate_run(runs["adm"], part, progress=False, say=lambda m: None)["protocols"]["sweep"]
    assert schedules == [("linear", replace(head, epochs=2))]
    (cell,) = s["cells"]
    assert cell["solver"] == "paper" and cell["epochs"] == 2 and "weight_decay" not in cell and 0 <= cell["acc"] <= 1
    assert s["linear_solver"] == "paper" and s["best"]["linear"]["epochs"] == 2
    record = s["training"]["linear"]
    assert {k: record[k] for k in ("solver", "epochs", "lr", "batch_size")} == {"solver": "paper", "epochs": 2,
                                                                             "lr": head.lr, "batch_size": 512}
    table = sweep_table(s)
    assert "linear: Adam, 2 epochs, lr 0.001, batch 512" in table
    assert "best linear (Adam, 2 epochs): block 2, t=0, pool 1: " in table
    assert headline("sweep", s).startswith("best linear (Adam, 2 epochs) at block 2, t=0, pool 1: ")


@pytest.mark.slow
def test_a_grid_larger_than_memory_is_read_in_several_passes_with_the_same_features(runs, monkeypatch):
    """With little memory free each read is its own pass (in block order); the accuracies are those of one pass."""
    from genrep.eval.protocols import context, sweep

    run = runs["adm"]
    part = replace(SWEEP, sweep=replace(SWEEP.sweep, blocks=[1, 4], t=[7], heads=["linear"]))
    passes = []
    real = context.extract_feature_sets
    monkeypatch.setattr(context, "extract_feature_sets",
                        lambda m, x, reads, **k: passes.append(reads) or real(m, x, reads, **k))
    share = sweep.MEMORY_SHARE
    monkeypatch.setattr(sweep, "MEMORY_SHARE", 1e-30)  # no read fits with another
    split = _accuracies(evaluate_run(run, part, progress=False, say=lambda m: None)["protocols"]["sweep"])
    assert passes == [[r] for r in [(1, "1"), (1, "2"), (4, "1"), (4, "2")] for _ in ("train", "test")]
    for p in (run / "cache").glob("*feature_t7-*"):
        p.unlink()
    passes.clear()
    monkeypatch.setattr(sweep, "MEMORY_SHARE", share)  # the tiny grid fits in one pass
    whole = _accuracies(evaluate_run(run, part, progress=False, say=lambda m: None)["protocols"]["sweep"])
    assert passes == [[(1, "1"), (1, "2"), (4, "1"), (4, "2")]] * 2 and whole == split


def test_heatmap_titles_and_pool_lines_name_how_each_head_was_fitted(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from genrep.eval.report import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda path, fig: drawn.append(fig) or path)
    paper15, paper28 = {"solver": "paper", "epochs": 15}, {"solver": "paper", "epochs": 28}
    cells = [{"block": b, "t": t, "pool": p, "head": h, "acc": 0.5, **fit} for b in (1, 2) for t in (0, 50)
             for h, p, fit in (("linear", "1", paper15), ("linear", "2", paper15), ("attention", "map", paper28))]
    old = [{"block": 1, "t": 0, "pool": "1", "head": "linear", "acc": 0.5}]  # eval.json before the solver was named
    figures.sweep_heatmaps(cells, tmp_path / "h.png")
    figures.sweep_pool_lines(cells, tmp_path / "p.png")
    figures.sweep_heatmaps(old, tmp_path / "o.png")
    heat, lines, before = drawn
    for fig in drawn:
        plt.close(fig)
    assert [ax.get_title() for ax in heat.axes if ax.get_title()] == [
        "linear (Adam, 15 epochs), pool 1", "linear (Adam, 15 epochs), pool 2", "attention (Adam, 28 epochs), pool map"]
    assert [t.get_text() for t in lines.axes[0].get_legend().get_texts()] == [
        "linear (Adam, 15 epochs), pool 1", "linear (Adam, 15 epochs), pool 2", "attention (Adam, 28 epochs), pool map"]
    assert before.axes[0].get_title() == "linear (L-BFGS), pool 1"


def test_rows_and_panels_keep_each_heads_pools_in_size_order_when_a_pool_is_left_out_at_the_first_block():
    fit = {"solver": "paper", "epochs": 1}
    cells = [{"block": b, "t": t, "pool": p, "head": h, "acc": 0.5, **fit} for t in (50, 0) for b in (3, 9)
             for h, p in (("linear", "1"), ("linear", "8"), ("attention", "map")) if (b, p) != (3, "8")]
    order = [("linear", "1"), ("linear", "8"), ("attention", "map")]
    assert sweep_panels(cells) == order
    best = {"linear": {"block": 9, "t": 0, "pool": "8", "acc": 0.5, **fit}}
    rows = [line.split()[:4] for line in sweep_table({"cells": cells, "best": best}).splitlines()
            if line.startswith(("linear pool", "attention pool"))]
    assert rows == [[h, "pool", p, f"t={t}"] for t in (0, 50) for h, p in order]


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
    assert any(line.startswith("best linear (L-BFGS): block ") for line in lines)
    assert "linear: full-batch L-BFGS on standardised features, weight decay 0.001" in out
    assert "noise of the read-out: fixed per image, cached" in out
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
    # how each head was fitted, and the read-out's noise (genvit's grid holds both heads)
    assert "fitted by" in section and "full-batch L-BFGS on standardised features" in section
    assert "Adam, 1 epoch, lr 0.001, batch 512" in section and "fixed per image, cached" in section


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("name, args, fragments", [
    (VECTOR, ["--t", "0,50"], (f"eval.sweep.t: {VECTOR} reads no noised image; noise steps apply to adm, "
                               "genvit, hybvit",)),
    ("adm", ["--t", "0,1000"], ("eval.sweep.t 1000 is not a diffusion step; choose 0..999",)),
    ("genvit", ["--t", "1000"], ("eval.sweep.t 1000 is not a diffusion step; choose 0..999",)),
    ("adm", ["--blocks", "2,99"], ("layer 99 does not exist in adm; choose 1..9",)),
    ("genvit", ["--blocks", "3"], ("layer 3 does not exist in genvit; choose 1..2",)),
    ("adm", ["--pool", "1,map"], ("eval.sweep.pools", "'map'")),
    ("adm", ["--pool", "99", "--blocks", "1,3"], ("eval.sweep.pools: pool 99 is larger than the map of every swept "
                                                  "block (the largest is 8x8, at block 1); choose pools up to 8",)),
    ("adm", ["--eval.sweep.linear_solver", "sgd"], ("eval.sweep.linear_solver 'sgd' is unknown; choose lbfgs, "
                                                    "paper",)),
    ("adm", ["--eval.sweep.linear_epochs", "0"], ("eval.sweep.linear_epochs must be at least 1",)),
    (VECTOR, ["--pool", "2", "--blocks", "1"], (f"pooling '2' is not offered by {VECTOR}",)),
    (VECTOR, ["--head", "linear,cnn", "--blocks", "1"], ("eval.sweep.heads: the cnn head needs feature maps, "
                                                         f"and {VECTOR}'s features are vectors",)),
    (VECTOR, ["--head", "attention", "--blocks", "1"], ("the attention head needs feature maps",)),
    ("adm", ["--head", "svm"], ("svm",)),
    ("adm", ["--eval.sweep.head.augment", "flip"], ("eval.sweep.head.augment flip read new features every epoch",
                                                     "the sweep trains its heads on the cached read-out")),
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


@pytest.mark.parametrize("recipe, image_size, channels", [("adm-digits", 8, 1), ("adm-cifar10", 32, 3),
                                                         ("adm-imagenet256", 256, 3)])
def test_the_adm_recipes_sweep_the_papers_grid_at_its_places_in_their_u_net(tmp_path, recipe, image_size, channels):
    """Figures 2 and 5's blocks 15, 19, 24 of ADM-256 are, in any U-Net: the encoder's last block at twice the
    bottleneck's side, the middle, and the default read-out; figure 3's noise steps; the paper's pools 1, 2, 4, 8 up
    to half of the default block's map (all four on ADM-256's 16x16); every pool reads some block."""
    fake = tmp_path / "256x256_diffusion_uncond.pt"  # adm-imagenet256 names a frozen file; the meta build reads none
    fake.write_bytes(b"not read on the meta device")
    cfg = resolve_config(recipe, {"model.pretrained": str(fake)} if recipe == "adm-imagenet256" else {})
    with torch.device("meta"):
        m = build_method("adm", cfg.model, DataSpec(image_size=image_size, channels=channels, num_classes=10))
    side, middle, s = m.feature_map_size, m.middle_block, cfg.eval.sweep
    encoder = max(b for b in range(1, middle) if side(b) == 2 * side(middle))
    assert s.blocks == [encoder, middle, m.default_layer]
    assert s.t == [0, 10, 30, 50, 90, 150, 300, 500]
    assert s.pools == [str(p) for p in (1, 2, 4, 8) if 2 * p <= side(m.default_layer)]
    assert all(any(pool_fits(m, b, p) for b in s.blocks) for p in s.pools)
    if recipe == "adm-imagenet256":
        assert s.blocks == [15, 19, 24] and s.pools == ["1", "2", "4", "8"]


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
