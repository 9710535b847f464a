"""When the file system refuses a write (issue 24, item 1): a full disk, a quota, a read-only mount, an I/O error,
or torch's and safetensors' wrappers of them, every command ends in one line naming the path and what was being
written, exit status 1; the temporary file or folder of the failed write is gone, and the last complete
checkpoint is the one --resume continues from, to the same weights as a run never interrupted.

The errors are injected where the libraries raise them, and once for real on a small tmpfs where this machine
lets the tests mount one."""

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors import SafetensorError
from safetensors.torch import load_file

from genrep.cli import main
from genrep.errors import WriteError
from genrep.io import atomic_write_json, write_error
from genrep.train.checkpoint import checkpoint_dirs

TINY_ARGS = [f"--{k}={v}" for k, v in TINY.items()]
PRETRAIN = ["pretrain", "--recipe", "supervised-digits", *TINY_ARGS]
FAST_PROBE = ["--device", "cpu", "--probe.weight_decay", "1e-3"]  # one weight decay: the probe takes a second
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


# ------------------------------------------------------------------ injecting the refusals

def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _refuse_fsync(monkeypatch, where: str, code: int) -> None:
    """The kernel's refusal (ENOSPC, EDQUOT, EROFS, EIO) of a file whose path holds ``where``, as the OS reports
    a delayed write error: at fsync, with no file name."""
    real = os.fsync

    def fsync(fd):
        if where in _fd_path(fd):
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _refuse_torch_save(monkeypatch, where: str) -> None:
    """torch.save on a full disk: part of the file written, then its zip writer's RuntimeError."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if where in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half a state file")
            raise RuntimeError(TORCH_SHORT_WRITE)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _refuse_save_file(monkeypatch, where: str) -> None:
    """safetensors' save_file on a full disk: part of the file written, then its SafetensorError."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if where in str(filename):
            Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
            raise SafetensorError(SAFETENSORS_FULL)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


FAULTS = {"ENOSPC": ("No space left on device", lambda m, w: _refuse_fsync(m, w, errno.ENOSPC)),
          "EDQUOT": ("Disk quota exceeded", lambda m, w: _refuse_fsync(m, w, errno.EDQUOT)),
          "EROFS": ("Read-only file system", lambda m, w: _refuse_fsync(m, w, errno.EROFS)),
          "EIO": ("Input/output error", lambda m, w: _refuse_fsync(m, w, errno.EIO)),
          "torch": ("torch could not write the whole file (", _refuse_torch_save),
          "safetensors": ("No space left on device", _refuse_save_file)}


def _one_error_line(capsys, *fragments: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("genrep: error: cannot write "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def _leftovers(folder: Path) -> list[str]:
    """Temporaries of genrep's atomic writes (``.NAME.*.tmp``, ``.tmp-step_*``, a link's ``.NAME.tmp``)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name)


def _weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> Path:
    """The tiny run, never interrupted: 20 steps, checkpoints at 10 and 20."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main([*PRETRAIN, "--out", str(run)]) == 0
    return run


@pytest.fixture
def trained(reference, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / ".genrep-lock").unlink(missing_ok=True)
    return run


# ------------------------------------------------------------------ pretrain, resume

@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_refused_checkpoint_is_one_line_leaves_no_temporary_and_resumes(reference, tmp_path, capsys, monkeypatch, fault):
    reason, inject = FAULTS[fault]
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        inject(m, ".tmp-step_00000020")
        assert main([*PRETRAIN, "--out", str(run)]) == 1
    _one_error_line(capsys, str(run / "checkpoints" / ".tmp-step_00000020"), "(checkpoint of step 20)", reason,
                    "genrep pretrain --resume")
    assert _leftovers(run) == []
    assert [c.name for c in checkpoint_dirs(run)] == ["step_00000010"]
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert [c.name for c in checkpoint_dirs(run)] == ["step_00000010", "step_00000020"]
    assert _same_weights(run, reference)


@pytest.mark.parametrize("fault", ["safetensors", "torch"])
def test_a_refused_checkpoint_on_resume_keeps_the_one_it_resumed_from(trained, capsys, monkeypatch, fault):
    reason, inject = FAULTS[fault]
    with monkeypatch.context() as m:
        inject(m, ".tmp-step_00000030")
        assert main(["pretrain", "--resume", str(trained), "--train.steps", "30"]) == 1
    _one_error_line(capsys, str(trained / "checkpoints" / ".tmp-step_00000030"), reason)
    assert _leftovers(trained) == []
    assert [c.name for c in checkpoint_dirs(trained)] == ["step_00000010", "step_00000020"]
    assert main(["pretrain", "--resume", str(trained), "--train.steps", "30"]) == 0
    assert checkpoint_dirs(trained)[-1].name == "step_00000030"


def test_the_latest_weights_link_refused_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    """After the checkpoint is whole, the run's top-level model.safetensors is pointed at it; refused, the
    checkpoint stays and the old link target is kept."""
    import genrep.train.checkpoint as checkpoint

    real, calls = os.replace, []

    def replace(src, dst):
        if str(src).endswith(".model.safetensors.tmp"):  # the link's temporary, not an atomic write's
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    assert main([*PRETRAIN, "--out", str(run)]) == 1
    _one_error_line(capsys, str(run / "model.safetensors"), "the latest weights", "Input/output error")
    assert _leftovers(run) == []
    assert [c.name for c in checkpoint_dirs(run)] == ["step_00000010", "step_00000020"]
    assert os.path.samefile(run / "model.safetensors", run / "checkpoints" / "step_00000010" / "model.safetensors")


# ------------------------------------------------------------------ probe, evaluate

@pytest.mark.parametrize("fault", ["safetensors", "ENOSPC"])
def test_probe_on_a_full_disk_names_the_feature_cache(trained, capsys, monkeypatch, fault):
    reason, inject = FAULTS[fault]
    inject(monkeypatch, "/cache/.features-")  # the temporary of an atomic write
    assert main(["probe", str(trained), *FAST_PROBE]) == 1
    _one_error_line(capsys, str(trained / "cache" / "features-"), reason, "run genrep probe RUN again")
    assert _leftovers(trained) == [] and not (trained / "results" / "probe.json").exists()


def test_probe_on_a_full_disk_names_its_results_file(trained, capsys, monkeypatch):
    _refuse_fsync(monkeypatch, "/results/.probe.json.", errno.ENOSPC)
    assert main(["probe", str(trained), *FAST_PROBE]) == 1
    _one_error_line(capsys, str(trained / "results" / "probe.json"), "No space left on device")
    assert _leftovers(trained) == [] and not (trained / "results" / "probe.json").exists()


def test_evaluate_on_a_full_disk_names_its_results_file(trained, capsys, monkeypatch):
    _refuse_fsync(monkeypatch, "/results/.eval.json.", errno.ENOSPC)
    assert main(["evaluate", str(trained), "--eval.protocols", "calibration", "--eval.device", "cpu"]) == 1
    _one_error_line(capsys, str(trained / "results" / "eval.json"), "No space left on device",
                    "run genrep evaluate RUN again")
    assert _leftovers(trained) == [] and not (trained / "results" / "eval.json").exists()


# ------------------------------------------------------------------ the boundary itself

def test_only_the_file_systems_refusals_become_the_line(tmp_path):
    """A bug in a writer (a RuntimeError or a SafetensorError of its own) keeps its traceback."""
    path = tmp_path / "x.safetensors"
    assert isinstance(write_error(OSError(errno.EDQUOT, "Disk quota exceeded"), path), WriteError)
    assert isinstance(write_error(RuntimeError("PytorchStreamWriter failed writing file data/0"), path), WriteError)
    assert isinstance(write_error(SafetensorError(SAFETENSORS_FULL), path), WriteError)
    assert write_error(RuntimeError("Cannot pickle a lambda"), path) is None
    assert write_error(SafetensorError("Error while serializing: tensor is not contiguous"), path) is None
    assert write_error(ValueError("bad"), path) is None


def test_a_written_file_has_the_permissions_open_would_give(tmp_path):
    from genrep.io import atomic_save_safetensors

    umask = os.umask(0)
    os.umask(umask)
    atomic_write_json(tmp_path / "a.json", {})
    atomic_save_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(1)})
    for name in ("a.json", "a.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ------------------------------------------------------------------ a real small disk

@contextlib.contextmanager
def _small_disk(folder: Path, size: str = "8m"):
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or proc.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _pages(n: int, page: int) -> int:
    return -(-n // page) * page


def _fill(disk: Path, leave: int) -> Path:
    """A file that takes all but ``leave`` bytes of the disk."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


@pytest.mark.parametrize("fails", ["safetensors", "torch"])
def test_a_real_full_disk_at_the_second_checkpoint(reference, tmp_path, capsys, fails):
    """On a tmpfs with room for one checkpoint and part of the second: the second fails in torch.save (the
    state) or in safetensors (the weights), as the room left decides; then probe fails on the feature cache;
    with room again the run resumes to the uninterrupted run's weights."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    with _small_disk(tmp_path / "disk") as disk:
        page = os.statvfs(disk).f_frsize
        ckpt = checkpoint_dirs(reference)[0]
        sizes = {p.name: _pages(p.stat().st_size, page) for p in ckpt.iterdir()}
        small_files = 8 * page  # marker, lock, config.yaml, log.jsonl and their temporaries
        room = sum(sizes.values()) + small_files + 4 * page
        if fails == "torch":  # both weights files of the second checkpoint fit, its state does not
            room += sizes["model.safetensors"] + sizes["ema.safetensors"]
        filler = _fill(disk, room)
        run = disk / "run"
        assert main([*PRETRAIN, "--out", str(run)]) == 1
        _one_error_line(capsys, str(run / "checkpoints" / ".tmp-step_00000020"), "No space left on device",
                        "state.pt" if fails == "torch" else ".safetensors")
        assert _leftovers(run) == []
        assert [c.name for c in checkpoint_dirs(run)] == ["step_00000010"]

        assert main(["probe", str(run), *FAST_PROBE]) == 1
        _one_error_line(capsys, str(run / "cache" / "features-"), "No space left on device")
        assert _leftovers(run) == []

        filler.unlink()
        assert main(["pretrain", "--resume", str(run)]) == 0
        assert _same_weights(run, reference)


# ------------------------------------------------------------------ the training log, a grid's cells

def _refuse_log_write(monkeypatch, code: int) -> None:
    """The kernel refusing the training log's append (flushed per row) on a full disk."""
    import genrep.train.logger as logger

    real = logger._open_for_append

    class Refusing:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            raise OSError(code, os.strerror(code))

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(logger, "_open_for_append", lambda path: Refusing(real(path)))


def test_a_refused_log_row_is_one_line_naming_the_log(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _refuse_log_write(m, errno.ENOSPC)
        assert main([*PRETRAIN, "--out", str(run)]) == 1
    _one_error_line(capsys, str(run / "log.jsonl"), "training log row of step 5", "No space left on device")
    assert _leftovers(run) == []


def test_a_refused_write_in_a_grid_cell_keeps_exit_status_1(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid"
    with monkeypatch.context() as m:
        _refuse_log_write(m, errno.EDQUOT)
        assert main(["grid", "--recipe", "supervised-digits", "--out", str(out), "--axis", "train.seed", "0,1",
                     *TINY_ARGS]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("genrep: error: grid cell seed=0 (1/2): cannot write "), err
    assert "log.jsonl" in err[0] and "Disk quota exceeded" in err[0]
