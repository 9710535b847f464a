"""Two CPU processes under torchrun (gloo) train the same model as one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import TINY, assert_close_weights, run_cli
from safetensors.torch import load_file

ARGS = [f"--{k}={v}" for k, v in {**TINY, "train.steps": 4, "train.ckpt_every": 2}.items()]
# supervised: all randomness in the data path; hybvit: two mini-batch streams and the diffusion t and noise,
# which the loop draws for the global batch like the augmentations; gcrl: NT-Xent's negatives gathered across the
# processes, the palette fitted on rank 0 and broadcast, and the contrastive term switched on half-way (no dropout:
# nn.Dropout draws per process)
# gvp: a random order and a segmentation per sample; darl: a Beta noise level per patch and the patches' noise
RECIPES = {"supervised-digits": {"model.augment": "weak"}, "hybvit-digits": {"model.augment": "weak"},
           "gcrl-digits": {"model.encoder_depth": 1, "model.drop": 0.0, "model.colours": 8},
           "gvp-digits": {"model.segment_per": "sample"}, "darl-digits": {}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_match_one(tmp_path, recipe):
    args = ARGS + [f"--{k}={v}" for k, v in RECIPES[recipe].items()]
    single = run_cli("pretrain", "--recipe", recipe, "--out", str(tmp_path / "one"), *args)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
         "-m", "genrep.cli", "pretrain", "--recipe", recipe, "--out", str(tmp_path / "two"), *args],
        capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("genrep: done") == 1  # only rank 0 talks
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert_close_weights(a, b, atol=2e-5)
    # the two runs really trained (weights moved) and the logs saw the same losses
    first = load_file(tmp_path / "two" / "checkpoints" / "step_00000002" / "model.safetensors")
    assert any(not torch.equal(first[k], b[k]) for k in b)
    loss1 = [json.loads(line)["loss"] for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    loss2 = [json.loads(line)["loss"] for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert loss1 == pytest.approx(loss2, rel=1e-4)


_REPORT_THREADS = """
import os, sys
from pathlib import Path
from genrep.cli import main
from genrep.train.dist import live_group_threads
code = main(sys.argv[2:])
Path(sys.argv[1], "threads-" + os.environ["RANK"]).write_text(",".join(live_group_threads()) or "none")
sys.exit(code)
"""


@pytest.mark.slow
def test_a_finished_run_ends_its_process_group_before_the_interpreter_exits(tmp_path):
    """The teardown abort's cause: a process group that outlived destroy_process_group (held by a default argument
    of torch.distributed.nn, imported after the group existed) kept its gloo threads, which could drop their last
    work while the interpreter was finalizing. Every rank must end with no group thread alive."""
    script = tmp_path / "report_threads.py"
    script.write_text(_REPORT_THREADS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script), str(tmp_path),
         "pretrain", "--recipe", "supervised-digits", "--out", str(tmp_path / "two"), *ARGS],
        capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # a file per rank: the two ranks' lines on one stdout pipe may interleave
    assert [(tmp_path / f"threads-{rank}").read_text() for rank in (0, 1)] == ["none", "none"]


def _two_nodes(tmp_path, *args: str) -> list[subprocess.CompletedProcess]:
    """``genrep ARGS`` as two one-process "nodes": two torchrun launchers meeting at a c10d rendezvous, the
    README's multi-node command on one machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    endpoint = f"127.0.0.1:{_free_port()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={tmp_path.name}",
              "-m", "genrep.cli", *args]
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    done = []
    for node in nodes:
        out, err = node.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(launch, node.returncode, out, err))
    return done


@pytest.mark.slow
def test_two_nodes_pretrain_and_evaluate_as_one_process(tmp_path):
    """Pretraining and the evaluation over two launchers (c10d, gloo). The evaluation deals out its batches (the
    probes' extraction, the likelihood's noise draws, the completions' samples) and gathers them in order, each batch
    with its own generator: the feature caches are one process's byte for byte and every number is the same; only
    rank 0 writes and talks."""
    run = tmp_path / "run"
    args = ["--recipe", "igpt-digits", *ARGS, "--model.colours=8"]
    nodes = _two_nodes(tmp_path, "pretrain", "--out", str(run), *args)
    assert [n.returncode for n in nodes] == [0, 0], nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    assert sum(n.stdout.count("genrep: done") for n in nodes) == 1
    evaluate = ["evaluate", str(run), "--eval.device=cpu", "--eval.protocols=probes,likelihood,completion",
                "--eval.batch_size=128", "--eval.likelihood.n=300", "--eval.completion.n=3",
                "--eval.completion.samples=1", "--eval.probes.sweep=false"]
    # one process on one thread, as each rank: the L-BFGS probe's sums depend on the thread count (0.3 points)
    one_process = run_cli(*evaluate)   # 12 train batches, 3 test batches, 3 likelihood batches, 1 completion batch
    assert one_process.returncode == 0, one_process.stderr
    one = {p.name: p.read_bytes() for p in (run / "cache").iterdir()}
    results_one = json.loads((run / "results" / "eval.json").read_text())["protocols"]
    for p in (run / "cache").iterdir():
        p.unlink()
    (run / "results" / "eval.json").unlink()
    nodes = _two_nodes(tmp_path, *evaluate)
    assert [n.returncode for n in nodes] == [0, 0], nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    assert sum(n.stdout.count("results:") for n in nodes) == 1
    assert {p.name: p.read_bytes() for p in (run / "cache").iterdir()} == one
    results_two = json.loads((run / "results" / "eval.json").read_text())["protocols"]
    for name in ("probes", "likelihood", "completion"):
        assert _timeless(results_one[name]) == _timeless(results_two[name]), name


def _timeless(result):
    """A result without its timings (seconds differ from run to run)."""
    if isinstance(result, dict):
        return {k: _timeless(v) for k, v in result.items() if "seconds" not in k}
    if isinstance(result, list):
        return [_timeless(v) for v in result]
    return result
