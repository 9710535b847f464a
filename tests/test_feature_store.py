"""Feature caches too large for memory (issue 28): float16 files written batch by batch and read back mapped, the
probes reading them a block of rows at a time, and two ranks agreeing on them. ``LARGE_FEATURES`` and the block
size are made tiny so a few hundred floats take the paths ImageNet's read-outs take."""

import errno
import json
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from genrep import io
from genrep.errors import GenrepError, WriteError
from genrep.eval import distributed, feature_store
from genrep.eval.features import cached_feature_sets, extract_feature_sets, mapped_path
from genrep.eval.metrics import rows
from genrep.eval.metrics.heads import HeadSpec, train_head
from genrep.eval.metrics.probes import knn_classify, linear_probe
from genrep.methods import DataSpec, build_method
from genrep.train.dist import DistInfo

IMAGES = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _method():
    torch.manual_seed(0)
    return build_method("supervised", tiny_config().model, DataSpec(8, 1, 10)).eval()


@pytest.fixture
def large(monkeypatch):
    monkeypatch.setattr(feature_store, "LARGE_FEATURES", 64)   # 16 floats: every read-out here is "large"


def _cached(run, method, version="ema@1", calls=None):
    def extract(todo, spill, record):
        if calls is not None:
            calls.append(len(todo))
        return extract_feature_sets(method, IMAGES, [(None, None)], batch_size=3, spill=spill, record=record)
    return cached_feature_sets(run, ["k"], version, extract)[0]


def _leftovers(run):
    return sorted(p.name for p in (run / "cache").iterdir() if p.name.startswith("."))


def test_large_features_are_a_float16_file_read_back_mapped(tmp_path, large):
    method, calls = _method(), []
    exact = extract_feature_sets(method, IMAGES, [(None, None)], batch_size=10)[0]   # no spill: anonymous file
    assert exact.dtype == torch.float16
    first = _cached(tmp_path, method, calls=calls)
    assert first.dtype == torch.float16 and torch.equal(first, exact)
    with torch.no_grad():
        direct = method.features(IMAGES.float() / 255)
    torch.testing.assert_close(first.float(), direct, rtol=2e-3, atol=2e-3)   # float16's rounding, nothing else
    assert np.load(mapped_path(tmp_path, "k"), allow_pickle=False).dtype == np.float16
    record = json.loads((tmp_path / "cache" / "k.json").read_text())
    assert record["version"] == "ema@1" and record["shape"] == list(exact.shape)
    assert torch.equal(_cached(tmp_path, method, calls=calls), exact) and calls == [1]   # read, not extracted
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / "cache").iterdir()) and not _leftovers(tmp_path)


@pytest.mark.parametrize("damage", ["new weights", "truncated", "record missing", "record of another shape"])
def test_a_stale_or_damaged_float16_file_is_extracted_again(tmp_path, large, damage):
    method, calls = _method(), []
    _cached(tmp_path, method, calls=calls)
    array, record = mapped_path(tmp_path, "k"), tmp_path / "cache" / "k.json"
    version = "ema@2" if damage == "new weights" else "ema@1"
    if damage == "truncated":
        array.write_bytes(array.read_bytes()[:-7])
    elif damage == "record missing":
        record.unlink()
    elif damage == "record of another shape":
        record.write_text(json.dumps({**json.loads(record.read_text()), "shape": [9, 32]}))
    again = _cached(tmp_path, method, version, calls=calls)
    assert calls == [1, 1] and again.shape == (10, 32)
    assert json.loads(record.read_text())["version"] == version and not _leftovers(tmp_path)


def test_features_beyond_float16_are_refused_in_one_line_and_nothing_is_left(tmp_path, large):
    method = _method()
    method.feature_sets = lambda x, reads: [torch.full((len(x), 8), 1e5)]
    with pytest.raises(GenrepError, match="beyond float16") as e:
        _cached(tmp_path, method)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").iterdir())


def test_a_full_disk_is_one_line_before_the_extraction(tmp_path, large, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(WriteError, match="No space left on device") as e:
        _cached(tmp_path, _method())
    assert str(mapped_path(tmp_path, "k")) in str(e.value) and not list((tmp_path / "cache").iterdir())


def test_a_process_that_does_not_write_fills_an_anonymous_file(tmp_path, large):
    previous = io.set_writer(False)
    try:
        feats = _cached(tmp_path, _method())
    finally:
        io.set_writer(previous)
    assert feats.dtype == torch.float16 and feats.shape == (10, 32) and not (tmp_path / "cache").exists()


def _problem(n, d=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=g)
    x = torch.randn(n, d, generator=g) * 3 + 1
    return x.half(), (x @ w).argmax(1)


@pytest.mark.parametrize("solver", ["adamw", "lars", "lbfgs"])
def test_the_linear_probe_reads_a_float16_matrix_in_blocks_as_it_would_whole(monkeypatch, solver):
    """Blocks of 37 rows (a weight-decay sweep's subsets included) give the fit the float32 copy gives."""
    monkeypatch.setattr(rows, "ROW_BLOCK_ELEMENTS", 16 * 37)
    (x, y), (xt, yt) = _problem(300), _problem(100, seed=1)
    kw = dict(solver=solver, epochs=4, batch_size=64, weight_decay=[1e-4, 1e-2], warmup_epochs=1)
    whole = linear_probe(x.float(), y, xt.float(), yt, 3, **kw, return_test_probs=True)
    blocks = linear_probe(x, y, xt, yt, 3, **kw, return_test_probs=True)
    assert blocks.weight_decay == whole.weight_decay and blocks.test_acc == whole.test_acc
    assert blocks.train_loss == pytest.approx(whole.train_loss, rel=1e-4)
    tol = 1e-3 if solver == "lbfgs" else 1e-4   # L-BFGS's line search sees the full loss summed in another order
    torch.testing.assert_close(blocks.test_probs, whole.test_probs, rtol=tol, atol=tol)


def test_knn_reads_the_train_matrix_in_blocks(monkeypatch):
    monkeypatch.setattr(rows, "ROW_BLOCK_ELEMENTS", 16 * 23)
    (x, y), (xt, yt) = _problem(300), _problem(100, seed=1)
    assert knn_classify(x, y, xt, yt, 3, k=[1, 20, 500]) == knn_classify(x.float(), y, xt.float(), yt, 3,
                                                                          k=[1, 20, 500])


def test_a_head_trains_on_a_float16_map_cache_as_on_its_float32_copy():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(40, 4, 4, 4, generator=g).half(), torch.randn(20, 4, 4, 4, generator=g).half()
    y, yt = torch.arange(40) % 3, torch.arange(20) % 3
    kw = dict(epochs=2, batch_size=8, seed=0)
    a = train_head(HeadSpec("attention"), x, y, xt, yt, 3, **kw)
    b = train_head(HeadSpec("attention"), x.float(), y, xt, yt, 3, **kw)
    assert (a.test_acc, a.train_acc) == (b.test_acc, b.train_acc)


def _two_ranks(rank, init, out, expected_shape):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    distributed._ACTIVE.append((DistInfo(rank=rank, world=2), torch.device("cpu")))
    io.set_writer(rank == 0)
    feature_store.LARGE_FEATURES, distributed.BROADCAST_BYTES = 64, 100   # large; blocks of 1-2 rows
    torch.set_num_threads(1)
    try:
        run = out / "run"
        mine = _cached(run, _method())   # extracted: 4 batches of 3 dealt to the two ranks, gathered round by round
        hits = []
        again = _cached(run, _method(), calls=hits)   # found by rank 0, sent to rank 1 in blocks
        assert hits == []
        save_file({"extracted": mine.clone(), "broadcast": again.clone()}, out / f"rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_extract_and_share_a_float16_file_as_one_process(tmp_path, large):
    torch.set_num_threads(1)
    one = _cached(tmp_path / "one", _method())
    init = f"file://{tempfile.mkdtemp(dir=tmp_path)}/rendezvous"
    mp.spawn(_two_ranks, args=(init, tmp_path, one.shape), nprocs=2)
    for rank in (0, 1):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        assert torch.equal(got["extracted"], one) and torch.equal(got["broadcast"], one)
    assert (tmp_path / "run" / "cache" / "k.npy").read_bytes() == mapped_path(tmp_path / "one", "k").read_bytes()
