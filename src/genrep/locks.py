"""One writer per run folder: an exclusive lock that every command writing into a run takes first.

The lock is ``flock`` on ``RUN/.genrep-lock``. The kernel releases it when the holding process ends, however it
ends (SIGKILL included), so a crashed command never leaves a stale lock behind; the file itself stays and only
says who held the lock last, for the message a second command prints. A second writer does not wait: it stops
at once with one line naming the holder, since two trainings or evaluations of one run would interleave their
files.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from .errors import GenrepError

LOCK_FILE = ".genrep-lock"


class RunLock:
    def __init__(self, run: str | Path, what: str):
        self.run, self.what = Path(run), what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        path = self.run / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise GenrepError(f"cannot open the lock file {path} ({e.strerror}); genrep needs to write into the "
                              f"run folder {self.run}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise GenrepError(f"{self.run} is in use by another genrep command ({holder}); wait for it to finish "
                              f"before you {self.what} it") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv[1:3]) or "python",
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(fd: int) -> str:
    try:
        d = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"genrep {d['command']}, pid {d['pid']}, since {d['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
