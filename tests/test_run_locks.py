"""One writer per run folder, with two real processes: a second training or evaluation of a run stops in one
line instead of interleaving its files; two default-named runs started together get two folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, assert_one_line_error, run_cli

from genrep.errors import GenrepError
from genrep.locks import LOCK_FILE, RunLock

ARGS = [f"--{k}={v}" for k, v in TINY.items()]


def _start(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "genrep.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_lock_holder(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``proc`` holds the run's lock (its lock file names its pid)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        lock = run / LOCK_FILE
        if lock.exists() and f'"pid": {proc.pid}' in lock.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first command never took the lock")


@pytest.mark.slow
def test_a_second_training_into_a_run_in_use_stops_in_one_line(tmp_path):
    run = tmp_path / "run"
    # long enough to outlive the two refused commands on a loaded machine; stopped once they are refused
    first = _start("pretrain", "--recipe", "supervised-digits", "--out", str(run), *ARGS, "--train.steps", "100000")
    try:
        _wait_for_lock_holder(run, first)
        second = run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(run), *ARGS)
        assert_one_line_error(second, "already holds a genrep run")
        resume = run_cli("pretrain", "--resume", str(run), "--train.steps", "500")
        assert_one_line_error(resume, "is in use by another genrep command", f"pid {first.pid}")
        assert first.poll() is None  # the refusals came while the first still held the run
    finally:
        first.kill()
        first.communicate(timeout=60)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    assert steps == sorted(set(steps))  # one writer: no doubled or interleaved rows


@pytest.mark.slow
def test_two_runs_with_the_default_name_claim_two_folders(tmp_path):
    procs = [_start("pretrain", "--recipe", "supervised-digits", *ARGS, "--train.steps", "10", cwd=tmp_path)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["supervised-digits", "supervised-digits-2"]
    for run in (tmp_path / "runs").iterdir():
        assert (run / "checkpoints" / "step_00000010").is_dir()


@pytest.mark.slow
def test_a_second_evaluation_of_a_run_in_use_stops_in_one_line(tmp_path):
    run = tmp_path / "run"
    assert run_cli("pretrain", "--recipe", "supervised-digits", "--out", str(run), *ARGS).returncode == 0
    holder = _start("pretrain", "--resume", str(run), "--train.steps", "100000")
    try:
        _wait_for_lock_holder(run, holder)
        proc = run_cli("evaluate", str(run), "--eval.protocols", "calibration", "--eval.device", "cpu")
        assert_one_line_error(proc, "is in use by another genrep command", "before you evaluate it")
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.communicate(timeout=60)
    assert not (run / "results" / "eval.json").exists()
    # the killed holder's lock went with it
    assert run_cli("pretrain", "--resume", str(run), "--train.steps", "30").returncode == 0


def test_the_lock_is_exclusive_and_released_by_the_process_ending(tmp_path):
    with RunLock(tmp_path, "train into"):
        with pytest.raises(GenrepError, match="is in use by another genrep command"):
            RunLock(tmp_path, "evaluate").acquire()
    with RunLock(tmp_path, "evaluate"):  # released on exit
        pass
    code = f"from genrep.locks import RunLock; import os; RunLock({str(tmp_path)!r}, 'x').acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)  # dies holding it: the kernel drops it
    RunLock(tmp_path, "train into").acquire().release()


def test_a_default_name_taken_before_the_start_fails_is_given_back(tmp_path):
    proc = run_cli("pretrain", "--recipe", "supervised-digits", *ARGS, "--data.name", "npz:/nonexistent.npz",
                   cwd=tmp_path)
    assert_one_line_error(proc, "no such file")
    assert not (tmp_path / "runs" / "supervised-digits").exists()
