"""Every file genrep writes goes through here: atomic writes (a temporary file in the same folder, fsync, then a
rename), the one boundary that turns the file system's refusals into one line, and the check of an output path
before the work.

A reader (or a resumed run) sees either the old file or the complete new one, never half of one. The rename
replaces a symbolic link at the path rather than writing through it, so a link in a run folder never lets
genrep write outside the run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import GenrepError, WriteError

_UMASK = os.umask(0)
os.umask(_UMASK)

# torch.save reports a short write (a full disk, a quota) by these, without the OS's errno
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "inline_container.cc", "unexpected pos")


def write_error(e: BaseException, path, what: str | None = None) -> WriteError | None:
    """The one line for a write the file system refused: ``e`` is an OSError, or torch's or safetensors' wrapper of
    one (which carry no path); None for anything else, which is a bug and keeps its traceback."""
    reason = _refusal(e, Path(path).parent)
    if reason is None:
        return None
    return WriteError(f"cannot write {path}{f' ({what})' if what else ''}: {reason}")


def _refusal(e: BaseException, folder: Path) -> str | None:
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    text = str(e)
    first = (text.strip().splitlines() or [""])[0][:120]
    if type(e).__name__ == "SafetensorError" and ("I/O error" in text or "os error" in text):
        code = re.search(r"os error (\d+)", text)
        return os.strerror(int(code.group(1))) if code else first
    if isinstance(e, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILED):
        return _full_or_read_only(folder) or f"torch could not write the whole file ({first})"
    return None


def _full_or_read_only(folder: Path) -> str | None:
    """What torch's short write most likely was, asked of the file system while the partial file still fills it."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if st.f_bavail == 0 or (st.f_files and st.f_favail == 0):  # some file systems count no inodes (0 of 0)
        return os.strerror(errno.ENOSPC)
    return None


@contextlib.contextmanager
def writing(path, what: str | None = None) -> Iterator[list[Path]]:
    """The boundary every writer goes through: a refusal inside the block becomes a WriteError naming ``path``
    and ``what``. The block registers the temporaries it makes (``partial.append(tmp)``); they are removed on
    every way out but success (a failed checkpoint leaves no ``.tmp-step_*`` behind)."""
    partial: list[Path] = []
    try:
        yield partial
    except BaseException as e:
        error = None if isinstance(e, GenrepError) else write_error(e, path, what)  # before the partial is removed
        for p in reversed(partial):
            _remove(Path(p))
        if error is None:
            raise
        raise error from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


# False on the non-main ranks of a distributed evaluation (eval/distributed.py): every rank computes the same
# results, and only rank 0, which holds the run's lock, writes them
_WRITER = [True]


def is_writer() -> bool:
    return _WRITER[0]


def set_writer(flag: bool) -> bool:
    """Whether this process writes genrep's files; returns the previous setting."""
    previous, _WRITER[0] = _WRITER[0], bool(flag)
    return previous


def _atomic(path: Path, write: Callable[[str], None], what: str | None = None) -> None:
    path = Path(path)
    if not _WRITER[0]:
        return
    with writing(path, what) as partial:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        partial.append(Path(tmp))
        write(tmp)
        sync_as_written(tmp)
        os.replace(tmp, path)


def sync_as_written(tmp) -> None:
    """A finished temporary before its rename: the permissions open() would have given (mkstemp makes 0600 files,
    and safetensors makes its file anew), then fsync."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes, what: str | None = None) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(path, write, what)


def atomic_write_text(path: Path, text: str, what: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), what)


def atomic_write_json(path: Path, obj, what: str | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", what)


def atomic_save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None,
                            what: str | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp) -> None:
        save_file(contiguous, tmp, metadata=metadata)
        _sort_safetensors_metadata(tmp)

    _atomic(path, write, what)


def _sort_safetensors_metadata(path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted: safetensors keeps them in a hash map, whose
    order changes from process to process, so the same tensors would give files with different sha256."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # never longer in practice (same keys and values); keep the original then
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))  # safetensors pads its header with spaces


def atomic_torch_save(path: Path, obj, what: str | None = None) -> None:
    import torch

    _atomic(path, lambda tmp: torch.save(obj, tmp), what)


def atomic_savefig(path: Path, fig) -> None:
    _atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120,
                                          bbox_inches="tight"), "figure")


def save_figure(path: Path, fig) -> Path:
    """Write a matplotlib figure atomically (format from the suffix) and close it, even when writing fails."""
    import matplotlib.pyplot as plt

    try:
        atomic_savefig(Path(path), fig)
    finally:
        plt.close(fig)
    return Path(path)


def check_overwrite(path: Path, ours: Callable[[Path], bool], what: str, force: bool) -> None:
    """Refuse to replace a file that genrep did not write as ``what`` (``ours`` recognises one), unless forced."""
    path = Path(path)
    if force or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir():
        raise GenrepError(f"{path} is a folder; name a file for the {what}")
    if not ours(path):
        raise GenrepError(f"{path} exists and is not a {what} genrep wrote; choose another -o, or add --force to "
                          f"overwrite it")


def check_can_write(path: Path, what: str, decide: Callable[[Path], bool | None] | None = None) -> None:
    """Refuse, in one line and before any expensive work, an output path the file system would refuse later:
    a name longer than the OS allows, a parent that is a file, a read-only or pseudo file system (/proc).

    ``decide`` is the caller's rule for what already exists at ``path`` (it raises GenrepError to refuse it, and
    returns True where the folder is genrep's own); it runs once the names are known to be valid and before
    writability is tried, so a refused folder is never touched. Writability is tried for real (a probe file
    made and removed: as root, permission bits say nothing, and only the kernel knows a read-only mount or
    /proc) only where genrep is about to write anyway: the deepest existing folder above a path it will make,
    or a folder of its own. In any other existing folder (a user's empty one) the kernel is asked instead, which
    writes nothing there and leaves its modification time alone."""
    path = Path(path)
    full = Path(os.path.abspath(path))
    missing, here = ([], full) if os.path.isdir(full) else ([full.name], full.parent)
    while not os.path.lexists(here):
        missing.append(here.name)
        here = here.parent
    if not os.path.isdir(here):
        raise GenrepError(f"cannot write the {what} {path}: {here} is a file, not a folder; choose another path")
    try:
        name_max, path_max = os.pathconf(here, "PC_NAME_MAX"), os.pathconf(here, "PC_PATH_MAX")
    except OSError:
        name_max, path_max = 255, 4096
    for name in missing:
        if len(os.fsencode(name)) > name_max:
            raise GenrepError(f"cannot write the {what} {path}: the name '{name[:40]}...' is longer than the "
                              f"{name_max} bytes this file system allows; choose a shorter one")
    if len(os.fsencode(str(full))) >= path_max:
        raise GenrepError(f"cannot write the {what}: its path is longer than the {path_max} bytes the OS allows; "
                          f"choose a shorter one")
    ours = bool(decide(path)) if decide is not None else False
    if here == full and not ours:
        if not os.access(here, os.W_OK | os.X_OK):
            raise GenrepError(f"cannot write the {what} {path}: {here} is not writable ({_why_not_writable(here)}); "
                              f"choose another path")
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".genrep-write-test-", dir=here)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GenrepError(f"cannot write the {what} {path}: {here} is not writable ({e.strerror}); choose another "
                          f"path") from None


def _why_not_writable(folder: Path) -> str:
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return os.strerror(errno.EROFS if read_only else errno.EACCES)
