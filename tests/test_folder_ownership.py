"""A folder genrep refuses is never touched while it decides (issue 24, item 4): ownership (marker, emptiness) is
decided before writability is tried, and writability is never tried by writing inside a folder that is not
genrep's. Each refusal leaves the folder's listing and modification time as they were."""

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import TINY

from genrep.cli import main
from genrep.grid import GRID_FILE, GRID_MARKER, _new_doc, plan_grid
from genrep.io import atomic_write_json
from genrep.runs import mark_run

TINY_ARGS = [f"--{k}={v}" for k, v in TINY.items()]
GRID = ["grid", "--recipe", "supervised-digits", "--axis", "model.dim", "16,32", *TINY_ARGS[:-3]]
PRETRAIN = ["pretrain", "--recipe", "supervised-digits", *TINY_ARGS]


def _state(folder: Path) -> dict:
    """Every entry under ``folder`` with its modification time, and the folder's own."""
    entries = {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in folder.rglob("*")}
    return {".": folder.stat().st_mtime_ns, **entries}


def _users_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


def _existing_run(folder: Path) -> Path:
    folder.mkdir()
    mark_run(folder)
    (folder / "config.yaml").write_text("method: supervised\n")
    return folder


def _grid_of_other_settings(folder: Path) -> Path:
    plan = plan_grid("supervised-digits", [("model.dim", "8,64")], {})
    folder.mkdir()
    atomic_write_json(folder / GRID_MARKER, {"format": "genrep-grid-1"})
    atomic_write_json(folder / GRID_FILE, _new_doc(plan))
    return folder


FOLDERS = {"a user's folder": _users_folder, "an existing run": _existing_run,
           "an existing grid": _grid_of_other_settings}
REFUSALS = {("pretrain", "a user's folder"): "exists and was not made by genrep",
            ("pretrain", "an existing run"): "already holds a genrep run",
            ("pretrain", "an existing grid"): "exists and was not made by genrep",
            ("grid", "a user's folder"): "is not a genrep grid",
            ("grid", "an existing run"): "is not a genrep grid",
            ("grid", "an existing grid"): "made with other settings"}


@pytest.mark.parametrize("command, kind", list(REFUSALS))
def test_a_refused_out_folder_is_left_untouched(tmp_path, capsys, command, kind):
    folder = FOLDERS[kind](tmp_path / "out")
    before = _state(folder)
    argv = [*(PRETRAIN if command == "pretrain" else GRID), "--out", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genrep: error: ") and REFUSALS[command, kind] in err[0], err
    assert _state(folder) == before


def test_a_report_refused_for_a_folder_leaves_it_untouched(tmp_path, capsys):
    folder = _users_folder(tmp_path / "page")
    before = _state(folder)
    assert main(["report", str(tmp_path), "-o", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert _state(folder) == before


@pytest.mark.parametrize("command", ["pretrain", "grid"])
def test_an_accepted_empty_folder_is_not_written_before_the_work_starts(tmp_path, capsys, command):
    """An empty folder is accepted as --out, but it is the user's until genrep marks it: a start refused later
    (here a bad value) must not have written into it either."""
    folder = tmp_path / "empty"
    folder.mkdir()
    before = _state(folder)
    argv = [*(PRETRAIN if command == "pretrain" else GRID), "--out", str(folder), "--model.dim", "-3"]
    assert main(argv) == 2
    assert "model.dim" in capsys.readouterr().err
    assert _state(folder) == before


@contextlib.contextmanager
def _mounted(folder: Path, options: str):
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or proc.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_an_empty_read_only_folder_is_refused_without_a_probe_file(tmp_path, capsys):
    """Writability of a folder that is not genrep's is asked of the kernel, which knows a read-only mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    with _mounted(tmp_path / "ro", "ro,size=1m") as folder:
        assert main([*PRETRAIN, "--out", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not writable (Read-only file system)" in err[0], err
