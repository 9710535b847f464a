"""genrep writes only into what it made: run folders it created (marked ``.genrep-run``), checkpoints it wrote,
outputs it wrote before; it never writes through a link, and a start that fails leaves nothing behind."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY, assert_one_line_error, one_line, run_cli, tiny_config

from genrep.errors import GenrepError
from genrep.methods.supervised import SupervisedViT
from genrep.runs import RUN_MARKER, is_marked_run
from genrep.train.checkpoint import checkpoint_dirs
from genrep.train.logger import LOG_FILE, Logger, read_log
from genrep.train.loop import pretrain

TINY_ARGS = [f"--{k}={v}" for k, v in TINY.items()]
FIXTURE = Path(__file__).parent / "fixtures" / "run-v1"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _users_folder(folder: Path) -> Path:
    """What a user may have at --out: their own weights and step folders with other files in them."""
    (folder / "checkpoints" / "step_00000001").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"the user's model")
    (folder / "ema.safetensors").write_bytes(b"the user's ema")
    (folder / "checkpoints" / "step_00000001" / "notes.txt").write_text("keep me")
    return folder


# ------------------------------------------------------------------ run folders: made, marked, refused

def test_pretrain_refuses_an_existing_folder_it_did_not_make(tmp_path):
    users = _users_folder(tmp_path / "mine")
    before = _snapshot(users)
    proc = run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(users), *TINY_ARGS, "--train.steps=2")
    assert_one_line_error(proc, str(users), "exists and was not made by genrep", "choose another --out or remove it")
    assert _snapshot(users) == before


def test_a_new_run_is_marked_and_cannot_be_started_over(tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(**{"train.steps": 2}), run)
    marker = json.loads((run / RUN_MARKER).read_text())
    assert marker["format"] == "genrep-run-1" and is_marked_run(run)
    with pytest.raises(GenrepError) as e:
        pretrain(tiny_config(**{"train.steps": 2}), run)
    assert "already holds a genrep run" in one_line(e) and f"--resume {run}" in one_line(e)


def test_pruning_never_deletes_a_checkpoint_with_foreign_files(tmp_path):
    pretrain(tiny_config(**{"train.steps": 20}), tmp_path)
    first = tmp_path / "checkpoints" / "step_00000010"
    (first / "notes.txt").write_text("someone else's file")
    pretrain(tiny_config(**{"train.steps": 40}), tmp_path, resume=True)
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["step_00000010", "step_00000030", "step_00000040"]
    assert (first / "notes.txt").read_text() == "someone else's file"


def test_a_run_from_before_the_marker_resumes_and_is_adopted(tmp_path):
    run = tmp_path / "run-v1"
    shutil.copytree(FIXTURE, run)
    assert not (run / RUN_MARKER).exists()
    proc = run_cli("pretrain", "--resume", str(run), "--train.steps", "30", "--train.progress", "false")
    assert proc.returncode == 0, proc.stderr
    assert is_marked_run(run) and json.loads((run / RUN_MARKER).read_text())["adopted"] is True


def test_a_folder_with_a_genrep_config_but_foreign_checkpoints_is_not_resumed(tmp_path):
    folder = _users_folder(tmp_path / "copy")
    shutil.copy(FIXTURE / "config.yaml", folder / "config.yaml")
    (folder / "checkpoints" / "step_00000001" / "state.pt").write_bytes(b"not genrep's")
    before = _snapshot(folder)
    assert_one_line_error(run_cli("pretrain", "--resume", str(folder)), "was not made by genrep", RUN_MARKER)
    assert _snapshot(folder) == before


def test_resume_without_checkpoints_keeps_the_trained_weights(tmp_path):
    run = tmp_path / "run"
    assert run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(run), *TINY_ARGS,
                   "--train.steps=10").returncode == 0
    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    assert_one_line_error(run_cli("pretrain", "--resume", str(run)), "has trained weights but no complete checkpoint",
                          "checkpoints")
    assert _snapshot(run) == before
    (run / "checkpoints").mkdir()  # only an unfinished one: the same
    (run / "checkpoints" / ".tmp-step_00000010").mkdir()
    assert_one_line_error(run_cli("pretrain", "--resume", str(run)), "no complete checkpoint")
    assert (run / LOG_FILE).read_bytes() == before[LOG_FILE]


# ------------------------------------------------------------------ a start that fails leaves nothing behind

@pytest.fixture
def loss_that_fails(monkeypatch):
    def failing(self, batch):
        raise GenrepError("labels out of range for this model")  # what a bad data set does at the first step

    monkeypatch.setattr(SupervisedViT, "loss", failing)


def test_a_failed_start_removes_the_folders_it_made(tmp_path, loss_that_fails):
    run = tmp_path / "runs" / "supervised-digits"
    with pytest.raises(GenrepError, match="labels out of range"):
        pretrain(tiny_config(**{"train.steps": 2}), run)
    assert list(tmp_path.iterdir()) == []  # runs/ too: this start made it


def test_a_folder_filled_between_the_check_and_the_start_is_left_alone(tmp_path):
    from genrep.train.loop import Trainer

    run = tmp_path / "run"
    trainer = Trainer(tiny_config(**{"train.steps": 2}), run)
    before = _snapshot(_users_folder(run))
    try:
        with pytest.raises(GenrepError, match="exists and was not made by genrep"):
            trainer.fit()
    finally:
        trainer.close()
    assert _snapshot(run) == before


def test_a_failed_start_in_an_empty_folder_empties_it_and_keeps_it(tmp_path, loss_that_fails):
    with pytest.raises(GenrepError, match="labels out of range"):
        pretrain(tiny_config(**{"train.steps": 2}), tmp_path)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_a_failed_start_leaves_the_out_folder_usable(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = SupervisedViT.loss

    def fails_once(self, batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise GenrepError("labels out of range for this model")
        return original(self, batch)

    monkeypatch.setattr(SupervisedViT, "loss", fails_once)
    run = tmp_path / "run"
    with pytest.raises(GenrepError):
        pretrain(tiny_config(**{"train.steps": 2}), run)
    assert not run.exists()
    assert pretrain(tiny_config(**{"train.steps": 2}), run).steps == 2


# ------------------------------------------------------------------ links in a run folder

def test_the_log_is_never_appended_through_a_link(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("outside\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOG_FILE).symlink_to(outside)
    with pytest.raises(GenrepError) as e:
        Logger(run, enabled=True).log({"step": 1})
    assert "symbolic link" in one_line(e)
    assert outside.read_text() == "outside\n"


@pytest.mark.parametrize("linked", [LOG_FILE, "config.yaml", "results", "checkpoints"])
def test_a_run_holding_a_link_is_refused_by_every_writer(tmp_path, linked):
    """A link anywhere in a run (a file or a folder) would lead genrep's writes, or its checkpoint pruning,
    outside the run: resume, evaluate and probe refuse such a run in one line and change nothing outside."""
    from genrep.eval.evaluate import evaluate_run, run_probes

    run = tmp_path / "run"
    pretrain(tiny_config(**{"train.steps": 10}), run)
    (run / "results").mkdir(exist_ok=True)
    outside = tmp_path / f"outside-{linked}"
    shutil.move(run / linked, outside)
    (run / linked).symlink_to(outside)
    before = _snapshot(outside) if outside.is_dir() else outside.read_bytes()
    for call in (lambda: pretrain(tiny_config(**{"train.steps": 20}), run, resume=True),
                 lambda: evaluate_run(run, progress=False), lambda: run_probes(run, progress=False)):
        with pytest.raises(GenrepError) as e:
            call()
        assert f"{run / linked} is a symbolic link" in one_line(e) and "replace it with a real" in one_line(e)
    assert (_snapshot(outside) if outside.is_dir() else outside.read_bytes()) == before


def test_sample_into_a_run_holding_a_link_is_refused(generative_run, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (generative_run / "samples").symlink_to(outside)
    try:
        with pytest.raises(GenrepError, match="samples is a symbolic link"):
            _sample(generative_run, None)
    finally:
        (generative_run / "samples").unlink()
    assert list(outside.iterdir()) == []


def test_evaluate_and_probe_refuse_a_folder_genrep_did_not_train(tmp_path):
    """A copied config.yaml does not make a folder a run: results are written only into genrep's runs."""
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(FIXTURE / "config.yaml", folder / "config.yaml")
    for command in ("evaluate", "probe"):
        proc = run_cli(command, str(folder))
        assert_one_line_error(proc, str(folder), "was not made by genrep")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]


def test_an_atomic_write_replaces_a_link_to_a_file_outside(tmp_path):
    from genrep.io import atomic_write_json

    outside = tmp_path / "outside.json"
    outside.write_text("{}\n")
    (tmp_path / "run" / "results").mkdir(parents=True)
    (tmp_path / "run" / "results" / "eval.json").symlink_to(outside)
    atomic_write_json(tmp_path / "run" / "results" / "eval.json", {"protocols": {}})
    assert outside.read_text() == "{}\n" and not (tmp_path / "run" / "results" / "eval.json").is_symlink()


# ------------------------------------------------------------------ -o: never over someone else's file

@pytest.fixture(scope="module")
def generative_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    pretrain(tiny_config("hybvit", **{"train.steps": 2}), run)
    return run


def _sample(run, out, **kw):
    from genrep.eval.report.samples import run_sampling

    return run_sampling(run, n=2, steps=2, out=out, progress=False, **kw)


def test_sample_refuses_an_output_that_is_not_a_png(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("mine")
    assert_one_line_error(run_cli("sample", str(FIXTURE), "-o", str(out)), "must end in .png", str(out))
    assert out.read_text() == "mine"


def test_sample_never_overwrites_a_file_it_did_not_write(generative_run, tmp_path):
    results = generative_run / "results"
    results.mkdir(exist_ok=True)
    (results / "eval.json").write_text('{"protocols": {}}\n')
    with pytest.raises(GenrepError) as e:
        _sample(generative_run, results / "eval.png")
    assert "eval.json exists and is not a sample file genrep wrote" in one_line(e) and "--force" in one_line(e)
    assert (results / "eval.json").read_text() == '{"protocols": {}}\n' and not (results / "eval.png").exists()

    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    with pytest.raises(GenrepError, match="mine.png exists and is not a sample file"):
        _sample(generative_run, mine)
    assert mine.read_bytes() == b"my picture"
    _sample(generative_run, mine, force=True)
    assert mine.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(mine.with_suffix(".json").read_text())["grid"] == str(mine)
    _sample(generative_run, mine)  # what genrep sample wrote, it may write again


def test_report_never_overwrites_a_file_it_did_not_write(tmp_path):
    run = tmp_path / "run-v1"
    shutil.copytree(FIXTURE, run)
    page = tmp_path / "notes.html"
    page.write_text("<html>my notes</html>")
    assert_one_line_error(run_cli("report", str(run), "-o", str(page)), "is not a report genrep wrote", "--force")
    assert page.read_text() == "<html>my notes</html>"
    assert run_cli("report", str(run), "-o", str(page), "--force").returncode == 0
    assert "my notes" not in page.read_text()
    again = run_cli("report", str(run), "-o", str(page))  # genrep's own report is replaced without --force
    assert again.returncode == 0, again.stderr


# ------------------------------------------------------------------ outputs the file system would refuse

def _unwritable_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {"under a file": (a_file / "out", "is a file, not a folder"),
            "under /proc": (Path("/proc/genrep-out/x"), "is not writable"),
            "a name too long": (tmp_path / ("n" * 300), "longer than"),
            "a path too long": (tmp_path.joinpath(*["d" * 200] * 25), "longer than")}


@pytest.mark.parametrize("case", ["under a file", "under /proc", "a name too long", "a path too long"])
def test_outputs_the_file_system_refuses_are_one_line_before_any_work(tmp_path, capsys, case):
    from genrep.cli import main

    path, fragment = _unwritable_paths(tmp_path)[case]
    calls = {"--out": ["pretrain", "--recipe", "supervised-digits", "--out", str(path)],
             "--runs-dir": ["pretrain", "--recipe", "supervised-digits", "--runs-dir", str(path)],
             "report -o": ["report", str(FIXTURE), "-o", str(path) + ".html"],
             "sample -o": ["sample", str(FIXTURE), "-n", "1", "--steps", "1", "-o", str(path) + ".png"]}
    for what, argv in calls.items():
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("genrep: error: cannot write"), (what, err)
        assert fragment in err[0], (what, err)
    assert not (tmp_path / "runs").exists()


def test_a_file_system_error_at_run_time_is_one_line_naming_the_path(monkeypatch, capsys):
    import errno

    from genrep import cli

    def disk_full(args, rest):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors")

    monkeypatch.setitem(cli.COMMANDS, "recipes", disk_full)
    assert cli.main(["recipes"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/runs/x/model.safetensors" in err[0] and "No space left" in err[0]


@pytest.mark.parametrize("command", ["pretrain", "evaluate", "probe", "sample", "report", "datasets"])
def test_ctrl_c_says_what_the_interrupted_command_left(monkeypatch, capsys, command):
    from genrep import cli

    def interrupted(args, rest):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    argv = {"pretrain": ["pretrain"], "report": ["report", "R"], "datasets": ["datasets"]}.get(command,
                                                                                           [command, "R"])
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert ("pretrain --resume" in err) == (command == "pretrain")
    assert f"genrep {command}" in err if command != "datasets" else "nothing was written" in err
