"""`genrep grid`: a 2x2 grid of tiny supervised runs through the CLI (grid.json, the cell runs, the heatmap, the
table), resume (finished cells kept, an interrupted cell resumed from its checkpoint), refusals (other settings,
a folder that is not a grid, bad axes: one line, nothing written), and the report's grid section."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_RUN, assert_one_line_error, run_cli

from genrep.cli import main
from genrep.config import EvalConfig
from genrep.errors import GenrepError
from genrep.eval.evaluate import evaluate_run
from genrep.eval.report.report import write_report
from genrep.grid import GRID_FILE, GRID_MARKER, cell_name, read_grid, split_axes
from genrep.runs import read_run_config
from genrep.train.checkpoint import checkpoint_dirs

PNG = b"\x89PNG\r\n\x1a\n"
# tiny ViT runs of 10 steps with a checkpoint at 5 (the interrupted cell resumes from it); one weight decay for the
# probe's solver keeps each cell's probe under a second
SHARED = {**{k: v for k, v in TINY_RUN.items() if k != "train.steps"}, "train.steps": 10, "train.ckpt_every": 5,
          "model.depth": 1, "model.num_heads": 2, "probe.weight_decay": 1e-3}
ARGS = [a for k, v in SHARED.items() for a in (f"--{k}", str(v))]
AXES = ["--axis", "model.dim", "16,32", "--axis", "optim.lr", "1e-3,3e-3"]
NAMES = ["dim=16,lr=0.001", "dim=16,lr=0.003", "dim=32,lr=0.001", "dim=32,lr=0.003"]


def _grid_cli(out: Path, *extra: str):
    return run_cli("grid", "--recipe", "supervised-digits", *AXES, "--out", str(out), *ARGS, *extra)


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("grid") / "g"
    proc = _grid_cli(out)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def _doc(out: Path) -> dict:
    return json.loads((out / GRID_FILE).read_text())


def test_the_grid_holds_every_cell_as_a_probed_run(grid):
    out, stdout = grid
    doc = _doc(out)
    assert (out / GRID_MARKER).is_file() and read_grid(out) == doc
    assert doc["recipe"] == "supervised-digits" and doc["method"] == "supervised" and doc["finished"]
    assert doc["axes"] == [{"key": "model.dim", "values": [16, 32]}, {"key": "optim.lr", "values": [1e-3, 3e-3]}]
    assert doc["overrides"]["train.steps"] == 10 and doc["overrides"]["probe.weight_decay"] == [1e-3]
    assert [c["name"] for c in doc["cells"]] == NAMES == [c["run"] for c in doc["cells"]]
    assert [c["index"] for c in doc["cells"]] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    for c in doc["cells"]:
        run = out / c["run"]
        cfg = read_run_config(run)  # a normal run folder, built from the cell's values
        assert (cfg.model.dim, cfg.optim.lr) == (c["values"]["model.dim"], c["values"]["optim.lr"])
        assert c["status"] == "done" and c["steps"] == 10 and c["train_seconds"] > 0
        assert isinstance(c["final_loss"], float) and 0 <= c["linear_acc"] <= 1
        assert set(c["knn"]) == {"20", "200"} and all(0 <= v <= 1 for v in c["knn"].values())
        # supervised has no causal mask: no "causal"; its one feature option, rope_grid, as trained
        assert c["readout"] == {"layer": 1, "pool": "cls", "rope_grid": 0}
        probe = json.loads((run / "results" / "probe.json").read_text())
        assert probe["weights"] == c["weights"] == "ema@10"
        assert probe["linear_probe"]["test_acc"] == c["linear_acc"]
    best = max(doc["cells"], key=lambda c: c["linear_acc"])
    assert doc["best"]["name"] == best["name"] and doc["figure"] == "grid.png"
    assert (out / "grid.png").read_bytes()[:8] == PNG
    # a line per cell, then the table: a header and one line per row of the first axis, the best starred
    for i, name in enumerate(NAMES, 1):
        assert f"genrep grid: cell {i}/4 {name}: trained" in stdout
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model.dim \\ optim.lr"))
    assert lines[header + 1].split()[0] == "16" and lines[header + 2].split()[0] == "32"
    assert sum("*" in line for line in lines[header + 1:header + 3]) == 1
    assert f"best: {best['name']}" in stdout


def test_the_same_command_again_trains_nothing(grid):
    out, _ = grid
    before = {n: (out / n / "ema.safetensors").stat().st_mtime_ns for n in NAMES}
    doc = _doc(out)
    proc = _grid_cli(out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("kept (finished earlier") == 4 and ": trained" not in proc.stdout, proc.stdout
    assert {n: (out / n / "ema.safetensors").stat().st_mtime_ns for n in NAMES} == before
    again = _doc(out)
    assert [c["linear_acc"] for c in again["cells"]] == [c["linear_acc"] for c in doc["cells"]]


def test_an_interrupted_cell_resumes_from_its_checkpoint_and_the_rest_are_kept(grid, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(grid[0], out)
    cut = out / NAMES[1]
    # as if killed after the checkpoint of step 5: no step 10, no final weights, no probe; grid.json still pending
    shutil.rmtree(checkpoint_dirs(cut)[-1])
    shutil.rmtree(cut / "results")
    for name in ("model.safetensors", "ema.safetensors"):
        (cut / name).unlink()
    doc = _doc(out)
    doc["cells"][1] = {k: doc["cells"][1][k] for k in ("name", "index", "values", "run")} | {"status": "pending"}
    (out / GRID_FILE).write_text(json.dumps(doc))
    proc = _grid_cli(out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("kept (finished earlier") == 3
    assert f"cell 2/4 {NAMES[1]}: resumed at step 5" in proc.stdout
    c = _doc(out)["cells"][1]
    assert c["status"] == "done" and c["weights"] == "ema@10" and (cut / "results" / "probe.json").is_file()


def test_a_cell_probed_since_at_another_image_size_is_probed_again(grid, tmp_path):
    """genrep probe CELL --data.image_size N rewrites the cell's probe.json: the grid does not keep that one."""
    out = tmp_path / "g"
    shutil.copytree(grid[0], out)
    probe = out / NAMES[0] / "results" / "probe.json"
    probe.write_text(json.dumps({**json.loads(probe.read_text()), "image_size": 16, "trained_image_size": 8}))
    proc = _grid_cli(out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("kept (finished earlier") == 3
    assert f"cell 1/4 {NAMES[0]}: trained earlier (10 steps), probed now" in proc.stdout
    assert "trained_image_size" not in json.loads(probe.read_text())


def test_a_grid_made_with_other_settings_is_refused(grid):
    out, _ = grid
    before = (out / GRID_FILE).read_bytes()
    proc = run_cli("grid", "--recipe", "supervised-digits", "--axis", "model.dim", "16,64", "--axis", "optim.lr",
                   "1e-3,3e-3", "--out", str(out), *ARGS)
    assert_one_line_error(proc, "made with other settings", "model.dim 16,32", "16,64")
    proc = _grid_cli(out, "--train.seed", "1")
    assert_one_line_error(proc, "made with other settings", "--train.seed")
    assert (out / GRID_FILE).read_bytes() == before


def test_the_report_shows_the_grid(grid, tmp_path):
    out, _ = grid
    page = write_report([out], tmp_path / "r.html").read_text()
    png = base64.b64encode((out / "grid.png").read_bytes()).decode()
    assert png in page and "Grid over model.dim x optim.lr" in page
    doc = _doc(out)
    for c in doc["cells"]:
        assert f"{100 * c['linear_acc']:.2f} / {100 * c['knn']['20']:.2f}" in page
    # a cell is a run like any other: evaluated, it is shown beside its grid
    evaluate_run(out / NAMES[0], EvalConfig(protocols=["calibration"], device="cpu"), progress=False,
                 say=lambda m: None)
    both = write_report([out, out / NAMES[0]], tmp_path / "both.html").read_text()
    assert png in both and "Calibration" in both and NAMES[0] in both


def test_the_report_refuses_a_damaged_grid_json_and_a_figure_that_is_not_a_png(grid, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(grid[0], out, ignore=shutil.ignore_patterns("dim=*"))
    (out / "grid.png").write_bytes(b"not a png")
    page = write_report([out], tmp_path / "r.html").read_text()
    assert "figure not shown" in page and "not a PNG" in page
    (out / GRID_FILE).write_text(json.dumps({"format": "genrep-grid-1", "recipe": "x", "overrides": {}, "axes": []}))
    with pytest.raises(GenrepError, match="grid.json is not a genrep grid file"):
        write_report([out], tmp_path / "r.html")
    (out / GRID_FILE).write_text("[1, 2]")
    assert_one_line_error(run_cli("report", str(out), "-o", str(tmp_path / "r2.html")), str(out / GRID_FILE))
    assert not (tmp_path / "r2.html").exists()


def test_a_folder_that_is_not_a_grid_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(_grid_cli(out), "is not a genrep grid")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("axes, fragments", [
    (["--axis", "model.dimm", "16,32"], ["model.dimm", "did you mean 'dim'"]),
    (["--axis", "model.dim", "16,-3"], ["--axis model.dim -3", "at least 1"]),
    (["--axis", "model.dim", "16,32", "--axis", "optim.lr", "1,2", "--axis", "train.seed", "0,1"], ["one or two"]),
    (["--axis", "model.dim", "16,32", "--axis", "model.dim", "8"], ["given twice"]),
    (["--axis", "model.depth", "1,2"], ["both an --axis and an override"]),
    (["--axis", "model.dim", "16,,32"], ["empty value"]),
    (["--axis", "model.dim", ""], ["empty value"]),
    (["--axis", "optim.lr", "1e-3,0.001"], ["same value", "0.001"]),
    (["--axis", "model.dim"], ["--axis needs a config key and its values"]),
    ([], ["needs one or two --axis"]),
    (["--axis", "model", "16,32"], ["model"]),
])
def test_bad_axes_are_one_line_and_write_nothing(tmp_path, capsys, axes, fragments):
    out = tmp_path / "g"
    assert main(["grid", "--recipe", "supervised-digits", *axes, "--out", str(out), *ARGS]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("genrep: error: "), err
    for f in fragments:
        assert f in err[0], (f, err[0])
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_one_axis_and_default_folder_names(tmp_path, capsys, one_torch_thread):
    args = ["grid", "--recipe", "supervised-digits", "--axis", "train.seed", "0,1", "--runs-dir", str(tmp_path), *ARGS]
    assert main(args) == 0
    assert main(args) == 0  # a new default folder, never the first grid's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supervised-digits-grid", "supervised-digits-grid-2"]
    table = capsys.readouterr().out.split("linear-probe test accuracy")[-1].splitlines()
    assert table[1].split() == ["train.seed", "0", "1"] and table[2].startswith("linear probe")  # one row
    doc = _doc(tmp_path / "supervised-digits-grid")
    assert [c["name"] for c in doc["cells"]] == ["seed=0", "seed=1"]
    assert (tmp_path / "supervised-digits-grid" / "seed=1").is_dir()
    assert doc["cells"][1]["index"] == [1]
    assert (tmp_path / "supervised-digits-grid" / "grid.png").read_bytes()[:8] == PNG
    page = write_report([tmp_path / "supervised-digits-grid"], tmp_path / "r.html").read_text()
    assert "Grid over train.seed" in page


def test_axes_and_names():
    axes, rest = split_axes(["--axis", "model.shift", "-1,0,1", "--optim.lr", "1e-3", "--axis=optim.betas",
                             "[0.9,0.95],[0.9,0.99]"])
    assert axes == [("model.shift", "-1,0,1"), ("optim.betas", "[0.9,0.95],[0.9,0.99]")]
    assert rest == ["--optim.lr", "1e-3"]
    assert cell_name(["model.beta_a", "model.beta_b"], [0.03, 1.0]) == "beta_a=0.03,beta_b=1.0"
    assert cell_name(["data.name", "model.x"], ["npz:/a b/c.npz", [0.9, 0.95]]) == "name=npz__a_b_c.npz,x=_0.9_0.95_"
    assert cell_name(["model.dim", "train.dim"], [1, 2]) == "model.dim=1,train.dim=2"  # the same last part: whole keys
