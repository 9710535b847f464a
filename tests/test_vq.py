"""The VQ-VAE tokenizer: its EMA codebook update through the loop's state statistics, its codes, and the loader
a GVP run reads it with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import one_line, run_cli, tiny_config
from safetensors.torch import load_file

from genrep.data.datasets import load_dataset
from genrep.errors import GenrepError
from genrep.methods import DataSpec, build_method
from genrep.methods.tokenizers import PatchTokenizer, is_tokenizer, load_tokenizer
from genrep.methods.vq import VQVAE
from genrep.train.logger import read_log
from genrep.train.loop import pretrain

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)
STATS = ("vq_counts", "vq_sums")


def _method(**overrides) -> VQVAE:
    torch.manual_seed(0)
    return build_method("vq", tiny_config("vq", **overrides).model, SPEC)


def test_apply_state_stats_follows_the_ema_formulas():
    m = _method()
    c = m.cfg
    g = torch.Generator().manual_seed(1)
    K, D = c.codebook_size, c.code_dim
    with torch.no_grad():  # a state mid-training, not the initial one
        m.cluster_size.copy_(torch.rand(K, generator=g) * 5)
        m.embed_sum.copy_(torch.randn(K, D, generator=g))
    counts = torch.randint(0, 4, (K,), generator=g).float()
    counts[:3] = 0  # codes no sample picked
    sums = torch.randn(K, D, generator=g) * counts[:, None]
    cs, es = m.cluster_size.double(), m.embed_sum.double()
    cs = c.decay * cs + (1 - c.decay) * counts.double()
    es = c.decay * es + (1 - c.decay) * sums.double()
    n = cs.sum()
    smoothed = (cs + c.eps) / (n + K * c.eps) * n
    m.apply_state_stats({"vq_counts": counts, "vq_sums": sums})
    torch.testing.assert_close(m.cluster_size.double(), cs)
    torch.testing.assert_close(m.embed_sum.double(), es)
    torch.testing.assert_close(m.codebook.double(), es / smoothed[:, None])


def test_the_loss_writes_no_state_and_its_stats_add_over_micro_batches():
    m = _method().train()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    whole = m({"image": x})
    halves = [m({"image": x[:4]}), m({"image": x[4:]})]
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # the state changes only in apply_state_stats
    assert whole["vq_counts"].sum() == 8 * 4 * 4  # every code of every image counted once
    for k in STATS:
        assert whole[k].dtype == torch.float32 and not whole[k].requires_grad
        torch.testing.assert_close(halves[0][k] + halves[1][k], whole[k])
    # the sums are of the assigned encoder outputs: each code's sum over its patches
    with torch.no_grad():
        z = m._flat(m.encoder(m.normalize(x)))
        codes = m._nearest(z)
    torch.testing.assert_close(whole["vq_sums"][codes[0]], z[codes == codes[0]].sum(0))


def test_the_loop_hands_the_global_batch_stats_once_per_step_and_the_ema_copies_the_codebook(tmp_path, monkeypatch):
    calls = []
    original = VQVAE.apply_state_stats

    def recording(self, stats):
        calls.append({k: v.clone() for k, v in stats.items()})
        return original(self, stats)

    monkeypatch.setattr(VQVAE, "apply_state_stats", recording)
    cfg = tiny_config("vq", **{"train.steps": 3, "train.accum_steps": 2, "train.ema_decay": 0.9,
                               "train.log_every": 1})
    pretrain(cfg, tmp_path)
    assert len(calls) == 3
    for stats in calls:  # summed over both micro-batches, not averaged: 32 images x 16 codes
        assert set(stats) == set(STATS) and stats["vq_counts"].sum() == 32 * 16
    rows = read_log(tmp_path)
    assert rows and not any(k in row for row in rows for k in STATS)  # state statistics are not logged
    assert {"recon", "commitment", "perplexity"} <= set(rows[0])
    model, ema = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "ema.safetensors")
    for k in ("codebook", "cluster_size", "embed_sum"):
        assert torch.equal(model[k], ema[k]), k  # the weights' EMA copies the updated buffers
    assert not torch.equal(model["encoder.0.weight"], ema["encoder.0.weight"])  # while it averages weights
    assert int(model["trained_image_size"]) == 8 and int(model["trained_channels"]) == 1


def test_a_downsample_that_does_not_divide_the_image_is_one_line():
    with pytest.raises(GenrepError) as e:
        _method(**{"model.downsample": 3})
    assert "model.downsample 3 does not divide the image size 8" in one_line(e)


# ------------------------------------------------------------------ a trained tokenizer

@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, one_thread):
    # 200 steps of the tiny model (a few CPU seconds); measured: 13 of its 16 codes in use, and 97.5% of the test
    # split's codes surviving decode-then-encode (a fresh model: 39%)
    run = tmp_path_factory.mktemp("vq") / "run"
    pretrain(tiny_config("vq", **{"train.steps": 200, "train.ckpt_every": 200, "train.batch_size": 64,
                                  "optim.lr": 3e-3}), run)
    return run


@pytest.fixture(scope="module")
def test_images():
    return load_dataset("digits", "test", image_size=8).images.float() / 255


def test_load_tokenizer_gives_the_runs_ema_weights_in_eval_mode(tokenizer_run):
    tok, weights = load_tokenizer(tokenizer_run, SPEC)
    assert weights == tokenizer_run / "ema.safetensors"
    assert isinstance(tok, VQVAE) and isinstance(tok, PatchTokenizer) and is_tokenizer(tok) and not tok.training
    assert (tok.codebook_size, tok.downsample) == (16, 2)
    saved = load_file(weights)
    assert all(torch.equal(v, saved[k]) for k, v in tok.state_dict().items())
    with torch.device("meta"):  # a reader built for the memory check reads the sizes, fills nothing
        probe, _ = load_tokenizer(tokenizer_run, SPEC)
    assert probe.codebook.is_meta


def _round_trip_rate(tok, x) -> float:
    with torch.no_grad():
        codes = tok.encode(x)
        return (tok.encode(tok.decode(codes)) == codes).float().mean().item()


def test_codes_round_trip_through_the_decoder(tokenizer_run, test_images):
    """Each codebook vector quantises to its own code, and the codes of an image survive decoding and
    re-encoding. Not all of them: the decoder's image of a code is not a fixed point of the encoder (3x3
    convolutions see across patch borders), so a patch near the border of two codes' cells can flip; measured
    97.5% on the test split, asserted 90%. A fresh tokenizer's 39% shows the bound tells them apart."""
    tok, _ = load_tokenizer(tokenizer_run, SPEC)
    K = tok.codebook_size
    assert torch.cdist(tok.codebook, tok.codebook).add(torch.eye(K)).min() > 1e-3  # distinct codes
    assert torch.equal(tok._nearest(tok.codebook), torch.arange(K))
    assert _round_trip_rate(tok, test_images) >= 0.9
    fresh = _method().eval()
    assert _round_trip_rate(fresh, test_images) < 0.6


def test_the_tokenizer_api_shapes_order_and_precision(tokenizer_run, test_images):
    tok, _ = load_tokenizer(tokenizer_run, SPEC)
    x = test_images[:6]
    with torch.no_grad():
        codes = tok.encode(x)
        assert codes.shape == (6, 16) and codes.dtype == torch.int64
        z = tok.encoder(tok.normalize(x))  # [6, D, 4, 4]
        for i in range(4):  # raster order: row i, column j is code i * 4 + j
            for j in range(4):
                assert torch.equal(codes[:, i * 4 + j], tok._nearest(z[:, :, i, j]))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 reader gets the same targets
            assert torch.equal(tok.encode(x), codes)
        vectors = tok.code_vectors(codes)
        assert vectors.shape == (6, 16, tok.cfg.code_dim) and torch.equal(vectors, tok.codebook[codes])
        images = tok.decode(codes)
    assert images.shape == x.shape and 0 <= images.min() and images.max() <= 1


def test_load_tokenizer_refusals_are_one_line_and_name_the_path(tokenizer_run, tmp_path):
    def refusal(run, data=SPEC) -> str:
        with pytest.raises(GenrepError) as e:
            load_tokenizer(run, data, key="model.tokenizer")
        msg = one_line(e)
        assert "model.tokenizer" in msg and str(run) in msg
        return msg

    assert "is not a folder" in refusal(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "is not a genrep run (no config.yaml)" in refusal(tmp_path / "empty")
    supervised = tmp_path / "supervised"
    pretrain(tiny_config("supervised", **{"train.steps": 1}), supervised)
    assert "a run of supervised, which is not a patch tokenizer; give a run of vq" in refusal(supervised)
    msg = refusal(tokenizer_run, DataSpec(32, 3, 10))
    assert "was trained on 8x8 images with 1 channel; this run's data are 32x32 with 3 channels" in msg
    assert "genrep pretrain --recipe vq-digits" in msg
    assert "with 1 channel; this run's data are 8x8 with 3 channels" in refusal(tokenizer_run, DataSpec(8, 3, 10))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((tokenizer_run / "config.yaml").read_text())
    assert "has no trained weights (ema.safetensors)" in refusal(unfinished)


@pytest.mark.slow
def test_two_processes_update_the_codebook_as_one(tmp_path):
    """Under torchrun each process sees half the batch; the all-reduced statistics give one process's codebook."""
    from test_distributed import _free_port

    args = ["--data.image_size=8", "--train.batch_size=32", "--train.steps=4", "--train.log_every=2",
            "--train.ckpt_every=4", "--train.progress=False", "--train.device=cpu", "--optim.warmup_epochs=0.2",
            *[f"--model.{k}={v}" for k, v in VQVAE.tiny_config.items()]]
    single = run_cli("pretrain", "--recipe", "vq-digits", "--out", str(tmp_path / "one"), *args)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
         "-m", "genrep.cli", "pretrain", "--recipe", "vq-digits", "--out", str(tmp_path / "two"), *args],
        capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)
    init = _method()  # the codebook moved from its initial value, so the comparison above means something
    assert not torch.allclose(a["codebook"], init.codebook)
    loss1 = [json.loads(line)["loss"] for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    loss2 = [json.loads(line)["loss"] for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert loss1 == pytest.approx(loss2, rel=1e-4)
