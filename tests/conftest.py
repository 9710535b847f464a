"""Shared fixtures: tiny configs that train in a second or two on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genrep.config import Config, recipe_names, resolve_config
from genrep.methods import method_names

# Small enough for a couple of seconds of CPU training; same code path as the real recipes.
TINY = {"data.image_size": 8, "model.dim": 32, "model.depth": 2, "model.num_heads": 2, "train.batch_size": 32,
        "train.steps": 20, "train.log_every": 5, "train.ckpt_every": 10, "train.progress": False,
        "train.device": "cpu", "optim.warmup_epochs": 0.2}


# The workspace's real data sets (../shared/data beside the checkout); tests that read them skip without.
SHARED_DATA = Path(os.environ.get("GENREP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def one_line(e: pytest.ExceptionInfo) -> str:
    """The message of a raised GenrepError, checked to be one clean line."""
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def rng_images(n, c, h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def digits_recipe(method: str) -> str:
    """Every method ships a ``<method>-digits`` recipe; tests build from it so a new method is covered."""
    return f"{method}-digits"


def tiny_config(method: str = "supervised", **overrides) -> Config:
    return resolve_config(digits_recipe(method), {**TINY, **overrides})


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for a test of tiny tensors: as fast, and robust to a loaded machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=method_names())
def method_name(request) -> str:
    return request.param


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``genrep ARGS`` in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "genrep.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("genrep: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


__all__ = ["SHARED_DATA", "TINY", "assert_one_line_error", "digits_recipe", "one_line", "recipe_names", "rng_images",
           "run_cli", "tiny_config"]
