"""Shared fixtures: tiny configs that train in a second or two on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The tests' own method (tests/toy_method.py) registers on import, here and, through GENREP_METHODS, in every
# `genrep` subprocess a test starts: the registry-wide tests cover it like a shipped method.
TESTS = Path(__file__).resolve().parent
os.environ["GENREP_METHODS"] = "toy_method"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
# The compile tests check that genrep's torch.compile path (the CUDA fast path's, which emits Triton) trains what
# eager trains. On this CPU inductor emits C++ instead, and its SIMD variant is what takes gcc the longest: scalar
# kernels compile in two thirds of the time (tiny ADM: 44 s against 66 s). A later import of torch._inductor reads this.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

import toy_method  # noqa: E402, F401

# Under pytest-xdist (`make test` runs the suite in as many workers as there are cores), the workers share the cores:
# each gets its share of intra-op threads, not all of them, or the workers' threads would fight over every core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

from genrep.config import Config, apply_overrides, config_from_dict, recipe_names, resolve_config  # noqa: E402
from genrep.methods import get_method, method_names  # noqa: E402

# Small enough for a couple of seconds of CPU training; same code path as the real recipes. TINY_RUN is what any
# method's tiny run shares; TINY adds the ViT keys, for CLI tests of the ViT recipes.
TINY_RUN = {"data.image_size": 8, "train.batch_size": 32, "train.steps": 20, "train.log_every": 5,
            "train.ckpt_every": 10, "train.progress": False, "train.device": "cpu", "optim.warmup_epochs": 0.2}
TINY = {**TINY_RUN, "model.dim": 32, "model.depth": 2, "model.num_heads": 2}


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
    """Every shipped method has a ``<method>-digits`` recipe; tests build from it so a new method is covered."""
    return f"{method}-digits"


def tiny_config(method: str = "supervised", **overrides) -> Config:
    """A tiny run of ``method``: its digits recipe (or, for a method without one, its config's defaults on
    digits), made small by ``TINY_RUN`` and the method's own ``tiny_config``."""
    model = {f"model.{k}": v for k, v in get_method(method).tiny_config.items()}
    settings = {**TINY_RUN, **model, **overrides}
    if digits_recipe(method) in recipe_names():
        return resolve_config(digits_recipe(method), settings)
    return config_from_dict(apply_overrides({"method": method, "recipe": method, "data": {"name": "digits"}}, settings))


@pytest.fixture(scope="session", autouse=True)
def toy_tokenizers(tmp_path_factory):
    """The toy method's fixed tokenizers live in this session's own temporary folder (and reach CLI subprocesses
    through the environment): no test reads a file that an earlier session left behind."""
    os.environ[toy_method.TOKENIZER_FOLDER] = str(tmp_path_factory.mktemp("toy-tokenizers"))
    yield
    os.environ.pop(toy_method.TOKENIZER_FOLDER, None)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a loaded 2-core machine: one intra-op thread is several times faster (a module's tests
    that use it, and the module fixtures that train its runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def assert_close_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Two trainings' weights alike: every tensor within rtol 1e-4 and ``atol``, but the key third of DARL's decoder
    attention's qkv bias. That attention has no RoPE, so a shift shared by every key leaves its softmax unchanged: the
    bias has no effect, its gradient is round-off, and Adam scales that to steps of the learning rate's size (3e-5
    with MAE's initialisation)."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.startswith("decoder_blocks.") and k.endswith("attn.qkv.bias"):
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``genrep ARGS`` in a fresh interpreter, as a user would; with one intra-op thread, as the in-process
    tests of tiny models use (two threads on the shared 2-core machine made a tiny run several times slower)."""
    return subprocess.run([sys.executable, "-m", "genrep.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                                                **(env or {})})


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """``genrep ARGS`` through the CLI's main() in this interpreter, read like a finished process: for a test's
    further cases after one in a fresh interpreter (each fresh interpreter costs seconds of imports)."""
    import contextlib
    import io

    from genrep.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("genrep: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


__all__ = ["SHARED_DATA", "TINY", "TINY_RUN", "assert_one_line_error", "cli_in_process", "digits_recipe", "one_line", "recipe_names", "rng_images",
           "run_cli", "tiny_config"]
