"""The memory check (``runs.check_model_fits``) sizes a model on the meta device before any work: it writes no file
and reads no weights, so a frozen part's file that does not exist yet is not made there, and one that exists is
neither hashed nor read (the real build does both)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import toy_method
import torch
import torch._dynamo  # noqa: F401  (imported lazily by some modules' first build; it makes its cache folder then)
from conftest import tiny_config

from genrep import runs
from genrep.methods import DataSpec

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)
_WRITES = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.truncate", "os.chmod", "os.utime", "os.symlink",
           "os.link", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# where lazy imports read code and package metadata: the interpreter's and the venv's trees, genrep's and the tests'
_CODE = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                     Path(runs.__file__).parent, Path(__file__).parent)})


class FileAudit:
    """What the process opened and changed on the file system while ``recording`` (an audit hook, installed once:
    CPython cannot remove one). Opens of Python code (lazy imports) are not the build's own reads."""

    def __init__(self):
        self.events: list[tuple[str, str]] | None = None
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.events is None:
            return
        if event in _WRITES:
            self.events.append(("write", f"{event} {args[0]}"))
        elif event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = os.fsdecode(args[0]), args[1], args[2] or 0
            if any(c in (mode or "") for c in "wax+") or flags & _WRITE_FLAGS:
                self.events.append(("write", path))
            elif not os.path.realpath(path).startswith(_CODE + ("/proc/",)):  # /proc: the free memory asked
                self.events.append(("read", path))

    def record(self, call):
        self.events = []
        try:
            call()
            return self.events
        finally:
            self.events = None


AUDIT = FileAudit()


def _check(cfg, spec=SPEC):
    return AUDIT.record(lambda: runs.check_model_fits(cfg, spec, torch.device("cpu"), training=True))


def test_every_method_is_sized_without_touching_a_file(method_name):
    assert _check(tiny_config(method_name)) == []


def test_a_frozen_file_not_made_yet_is_not_made_by_the_check(tmp_path, monkeypatch):
    """The toy's default tokenizer is made on first real use: the check must not be that use."""
    monkeypatch.setenv(toy_method.TOKENIZER_FOLDER, str(tmp_path))
    assert _check(tiny_config("toy")) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method,key", [("toy", "model.tokenizer"), ("adm", "model.pretrained")])
def test_a_frozen_weights_file_is_neither_hashed_nor_read(tmp_path, method, key):
    """Not weights at all: reading them would fail, hashing them is a read the audit sees."""
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"not read on the meta device")
    before = garbage.stat().st_mtime_ns
    assert _check(tiny_config(method, **{key: str(garbage)})) == []
    assert garbage.stat().st_mtime_ns == before


def test_a_frozen_run_gives_its_config_and_nothing_else(tmp_path):
    """GVP's tokenizer is another genrep run: its config tells the shape; its weights (here not weights) are not
    read."""
    from genrep.train.loop import pretrain

    vq = tmp_path / "vq"
    pretrain(tiny_config("vq", **{"train.steps": 1}), vq)
    (vq / "ema.safetensors").write_bytes(b"not read on the meta device")
    events = _check(tiny_config("gvp", **{"model.target": "p2d", "model.tokenizer": str(vq)}))
    assert [kind for kind, _ in events] == ["read"] * len(events)
    assert {Path(path).name for _, path in events} <= {runs.CONFIG_FILE}
