"""Run-folder checkpoints that survive being killed at any moment.

Layout of a run folder::

    config.yaml                 resolved config (what --resume rebuilds from)
    model.safetensors           latest weights, ema.safetensors their EMA (hard links into the checkpoint)
    checkpoints/step_00001000/  model.safetensors, ema.safetensors, state.pt (optimizer + step)
    log.jsonl, results/, figures/

A checkpoint folder is written as ``.tmp-step_N`` and renamed when complete, so the newest
``step_*`` folder is always whole; a write the file system refuses (a full disk) removes the ``.tmp-`` folder at
once, and a kill mid-write leaves only that folder, removed at the next save. ``state.pt`` holds only tensors
and plain containers, loadable with ``torch.load(weights_only=True)``; nothing is unpickled.

Pruning deletes only folders that hold exactly genrep's three files: a ``step_*`` folder with anything else in
it (or that is a link) was not written by genrep and is never deleted.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import GenrepError, library_warnings
from ..io import atomic_save_safetensors, atomic_torch_save, writing

CKPT_DIR = "checkpoints"
MAX_STEP = 99_999_999  # step folders have 8 digits: a larger step is a damaged file, not a long run
_STEP_RE = re.compile(r"^step_(\d{8})$")
CKPT_FILES = frozenset({"model.safetensors", "ema.safetensors", "state.pt"})


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_RE.match(p.name) and p.is_dir()), key=lambda p: p.name)


def is_genrep_checkpoint(path: Path) -> bool:
    """A folder genrep's save_checkpoint wrote: exactly its three files, as regular files, and no link."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    entries = list(path.iterdir())
    return ({e.name for e in entries} == CKPT_FILES
            and all(e.is_file() and not e.is_symlink() for e in entries))


def checkpoint_step(path: Path) -> int:
    return int(_STEP_RE.match(path.name).group(1))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Atomically point ``dst`` at the bytes of ``src`` (a hard link when the file system allows)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    with writing(dst, "the latest weights") as partial:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        partial.append(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def save_checkpoint(run: Path, step: int, model: dict, ema: dict, state: dict, metadata: dict[str, str],
                    keep: int = 2) -> Path:
    root = Path(run) / CKPT_DIR
    final = root / f"step_{step:08d}"
    if final.exists() and not is_genrep_checkpoint(final):
        raise GenrepError(f"{final} holds files genrep did not write; move it out of {root} (genrep writes and "
                          f"deletes only its own checkpoints there)")
    what = f"checkpoint of step {step}"
    # a failure anywhere here (a full disk) removes the unfinished folder; the last complete checkpoint stays
    with writing(final, what) as partial:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{final.name}"
        tmp.mkdir()
        partial.append(tmp)
        meta = {**metadata, "step": str(step)}
        atomic_save_safetensors(tmp / "model.safetensors", model, meta, what=what)
        atomic_save_safetensors(tmp / "ema.safetensors", ema, meta, what=what)
        atomic_torch_save(tmp / "state.pt", {**state, "step": step}, what=what)
        if final.exists():  # re-saving the same step (e.g. a resumed run that was already finished)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    for name in ("model.safetensors", "ema.safetensors"):
        _link_or_copy(final / name, Path(run) / name)
    for old in checkpoint_dirs(run)[:-keep] if keep > 0 else []:
        if is_genrep_checkpoint(old):  # a folder with someone else's files in it is never deleted
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise GenrepError(f"weights file {path} does not exist; is this a genrep run folder with a finished "
                          f"checkpoint?")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GenrepError(f"weights file {path} is corrupt or truncated ({str(e).splitlines()[0]}); "
                          f"restore it or delete the checkpoint folder to fall back to an older one") from None


def load_state(path: Path) -> dict:
    try:
        with library_warnings():  # torch warns of a pickle protocol before refusing a file that is not ours
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GenrepError(f"training state {path} does not exist; the checkpoint folder is incomplete") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle opcode, a non-allow-listed global...
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise GenrepError(f"training state {path} is corrupt or not a genrep state file ({first}); "
                          f"delete that checkpoint folder to resume from an older one") from None
    if not isinstance(state, dict) or "step" not in state:
        raise GenrepError(f"training state {path} holds no step counter; it is not a genrep state file")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step <= MAX_STEP:
        raise GenrepError(f"training state {path} has step {step!r}, not a step genrep writes (an integer in "
                          f"1..{MAX_STEP}); delete that checkpoint folder to resume from an older one")
    if _STEP_RE.match(path.parent.name) and checkpoint_step(path.parent) != step:
        raise GenrepError(f"training state {path} says step {step} but its folder is {path.parent.name}; delete "
                          f"that checkpoint folder to resume from an older one")
    if not isinstance(state.get("optimizer"), dict):
        raise GenrepError(f"training state {path} holds no optimizer state; delete that checkpoint folder to "
                          f"resume from an older one")
    return state


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    path = Path(path)
    return (load_safetensors(path / "model.safetensors"), load_safetensors(path / "ema.safetensors"),
            load_state(path / "state.pt"))
