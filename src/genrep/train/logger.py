"""JSONL log of every logged step (and, optionally, TensorBoard), written by rank 0 only."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import GenrepError
from ..io import atomic_write_text, writing

LOG_FILE = "log.jsonl"


def read_log(run: Path) -> list[dict]:
    """The logged rows, checked: a line cut by a kill ends the log (what follows is unreliable); any other line
    that is not a row genrep writes is a one-line error naming the file and the line, and the file is kept."""
    path = Path(run) / LOG_FILE
    if not path.exists():
        return []
    fix = f"move {path} away to resume without the earlier log"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise GenrepError(f"cannot read {path} ({e.strerror}); {fix}") from None
    except UnicodeDecodeError:
        raise GenrepError(f"{path} is not a genrep log (not UTF-8 text); {fix}") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            break
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise GenrepError(f"{path} line {i} is not a genrep log row (an object with an integer step); {fix}")
        rows.append(row)
    return rows


def truncate_log(run: Path, step: int) -> None:
    """Drop what a killed run logged after the checkpoint it resumes from."""
    rows = [r for r in read_log(run) if r["step"] <= step]
    atomic_write_text(Path(run) / LOG_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise GenrepError("train.tensorboard needs the tensorboard package; "
                          "pip install 'genrep[tensorboard]' or set --train.tensorboard false") from None


def _open_for_append(path: Path):
    """Append to the log, never through a link: rows written through one would land outside the run."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if path.is_symlink():
            raise GenrepError(f"{path} is a symbolic link (to {os.readlink(path)}); genrep does not write through "
                              f"links in a run folder: replace it with a regular file") from None
        raise GenrepError(f"cannot open {path} to append the training log ({e.strerror})") from None
    return os.fdopen(fd, "a")


class Logger:
    def __init__(self, run: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run) / LOG_FILE
        self.file = _open_for_append(self.path) if enabled else None
        self.tb = None
        if enabled and tensorboard:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run) / "tensorboard"))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        # a row cut by a full disk ends the log as a kill's would: read_log stops at it
        with writing(self.path, f"training log row of step {row['step']}"):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.file:
            file, self.file = self.file, None
            with writing(self.path, "training log"):
                file.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
