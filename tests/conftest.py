"""Shared fixtures: tiny configs that train in a second or two on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from genrep.config import Config, recipe_names, resolve_config
from genrep.methods import method_names

# Small enough for a couple of seconds of CPU training; same code path as the real recipes.
TINY = {"data.image_size": 8, "model.dim": 32, "model.depth": 2, "model.num_heads": 2, "train.batch_size": 32,
        "train.steps": 20, "train.log_every": 5, "train.ckpt_every": 10, "train.progress": False,
        "train.device": "cpu", "optim.warmup_epochs": 0.2}


def digits_recipe(method: str) -> str:
    """Every method ships a ``<method>-digits`` recipe; tests build from it so a new method is covered."""
    return f"{method}-digits"


def tiny_config(method: str = "supervised", **overrides) -> Config:
    return resolve_config(digits_recipe(method), {**TINY, **overrides})


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


__all__ = ["TINY", "assert_one_line_error", "digits_recipe", "recipe_names", "run_cli", "tiny_config"]
