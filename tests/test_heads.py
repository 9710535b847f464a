"""Tests for genrep.eval.metrics.heads: the linear / MLP / CNN / attention heads of "Diffusion Models Beat
GANs on Image Classification" (tables 7-9) trained on cached frozen features."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_line

from genrep.errors import GenrepError
from genrep.eval.metrics import heads
from genrep.eval.metrics.heads import (
    HEADS,
    MAP_HEADS,
    HeadResult,
    HeadSpec,
    build_head,
    head_params,
    train_head,
)
from genrep.eval.metrics.probes import standardize
from genrep.eval.metrics.rows import feature_stats

# tiny problems: on a shared 2-core machine intra-op threads mostly wait on each other
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAP = (1024, 16, 16)  # the paper's block-24 feature maps


def maps(n_train=256, n_test=128, shape=(16, 4, 4), num_classes=4, spread=0.4, seed=0):
    """Class-dependent mean maps plus unit noise, with a per-channel offset and scale for the standardisation.

    Each class mean has a part constant over the map as well as one per position: the attention head has no
    positional embedding (as the authors'), so it reads the tokens as a set."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, shape[0], 1, 1, generator=g)  # constant over the map
    means = (means + torch.randn(num_classes, *shape, generator=g)) * spread
    scale = (torch.rand(shape[0], 1, 1, generator=g) * 4 + 0.5)
    offset = torch.randn(shape[0], 1, 1, generator=g) * 5

    def draw(n):
        y = torch.arange(n) % num_classes
        return (means[y] + torch.randn(n, *shape, generator=g)) * scale + offset, y

    return (*draw(n_train), *draw(n_test))


# --------------------------------------------------------------------------------------------------
# architecture


@pytest.mark.parametrize("name, spec, in_shape, paper", [
    ("Linear-1k", HeadSpec("linear"), (1024,), 1e6),
    ("Linear-4k", HeadSpec("linear"), (4096,), 4e6),
    ("MLP-1k-2k", HeadSpec("mlp", hidden=(2048,)), (1024,), 4e6),
    ("MLP-4k-2k", HeadSpec("mlp", hidden=(2048,)), (4096,), 10e6),
    ("MLP-4k-2k-2k", HeadSpec("mlp", hidden=(2048, 2048)), (4096,), 14e6),
    ("CNN-1k-256-256", HeadSpec("cnn", channels=(256, 256)), MAP, 2.4e6),  # table 8: 2.5M; brief: ~2.3-2.5M
    ("CNN-1k-512-256", HeadSpec("cnn", channels=(512, 256)), MAP, 3.5e6),
    ("CNN-1k-1k-1k", HeadSpec("cnn", channels=(1024, 1024)), MAP, 12e6),
    ("CNN-1k-2k-2k", HeadSpec("cnn", channels=(2048, 2048)), MAP, 32e6),
    ("Attention-1K-1", HeadSpec("attention", blocks=1), MAP, 13.7e6),
    ("Attention-1K-2", HeadSpec("attention", blocks=2), MAP, 26.2e6),
    ("Attention-1K-5", HeadSpec("attention", blocks=5), MAP, 64.0e6),
])
def test_param_counts_match_the_paper(name, spec, in_shape, paper):
    # the tables round to 1-2 significant digits, so 10%
    assert head_params(spec, in_shape, 1000) == pytest.approx(paper, rel=0.1), name


def test_exact_param_counts():
    # Linear 1024 -> 1000; attention: CLS 1024 + blocks of 2 LN, qkv without bias, proj, MLP 4x + the Linear
    assert head_params(HeadSpec("linear"), (1024,), 1000) == 1024 * 1000 + 1000
    block = 2 * 2048 + 1024 * 3072 + (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
    assert head_params(HeadSpec("attention", blocks=2), MAP, 1000) == 1024 + 2 * block + 1024 * 1000 + 1000
    conv = (1024 * 256 * 4 + 256) + (256 * 256 * 4 + 256)
    assert head_params(HeadSpec("cnn"), MAP, 1000) == conv + 4 * 256 * 1000 + 1000
    # parameter counts do not depend on the map size
    assert head_params(HeadSpec("cnn"), (1024, 2, 2), 1000) == head_params(HeadSpec("cnn"), MAP, 1000)


@pytest.mark.parametrize("kind", MAP_HEADS)
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (8, 8), (16, 16)])
def test_map_heads_take_small_and_large_maps(kind, hw):
    head = build_head(HeadSpec(kind, channels=(8, 8)), (16, *hw), 5)
    out = head(torch.randn(3, 16, *hw))
    assert out.shape == (3, 5) and torch.isfinite(out).all()


def test_attention_pools_large_maps_to_8x8_tokens():
    head = build_head(HeadSpec("attention"), (16, 20, 20), 4)
    assert head.tokens(torch.randn(2, 16, 20, 20)).shape == (2, 65, 16)  # CLS + 8 * 8
    assert head.tokens(torch.randn(2, 16, 3, 12)).shape == (2, 1 + 3 * 8, 16)
    # on 16x16, the adaptive pool is the authors' 2x2 average pool
    x = torch.randn(2, 16, 16, 16)
    ref = torch.nn.functional.avg_pool2d(x, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(head.tokens(x)[:, 1:], ref)


@pytest.mark.parametrize("hw", [(16, 16), (12, 20), (5, 8)])
def test_the_attention_heads_read_out_is_its_pooled_map_and_trains_it_as_the_whole_map(hw):
    """The attention head's cache holds the map pooled to at most 8x8 (head_pool: 'map8'): the head's own pool then
    leaves it as it is, so a head trains on it exactly as on the whole map (inputs read raw, as the paper's)."""
    from genrep.eval.protocols.head_training import head_pool
    from genrep.nn.pooling import pool_feature_map

    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(24, 6, *hw, generator=g), torch.randn(12, 6, *hw, generator=g)
    y, yt = torch.arange(24) % 3, torch.arange(12) % 3
    read = head_pool("attention", "mean")
    pooled, pooled_t = pool_feature_map(x, read), pool_feature_map(xt, read)
    assert read == "map8" and pooled.shape[-2:] == (min(hw[0], 8), min(hw[1], 8))
    head = build_head(HeadSpec("attention"), (6, *hw), 3)
    assert torch.equal(head.tokens(pooled), head.tokens(x))   # the head's own pool leaves the cached map as it is
    kw = dict(epochs=2, batch_size=8, seed=0, standardize=False)
    whole = train_head(HeadSpec("attention"), x, y, xt, yt, 3, **kw)
    cached = train_head(HeadSpec("attention"), pooled, y, pooled_t, yt, 3, **kw)
    assert (cached.test_acc, cached.train_acc) == (whole.test_acc, whole.train_acc)
    assert head_pool("cnn", "mean") == "map"


def test_no_batchnorm_and_linear_last():
    for kind in HEADS:
        in_shape = (16, 4, 4) if kind in MAP_HEADS else (64,)
        head = build_head(HeadSpec(kind), in_shape, 7)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules())
        last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
        assert last.out_features == 7


def test_misuse_is_a_one_line_error():
    with pytest.raises(GenrepError) as e:
        build_head(HeadSpec("cnn"), (1024,), 10)
    assert "feature maps" in one_line(e)
    with pytest.raises(GenrepError) as e:
        build_head(HeadSpec("linear"), (16, 4, 4), 10)
    assert "feature vectors" in one_line(e)
    x, y, tx, ty = maps(n_train=16, n_test=8)
    with pytest.raises(GenrepError) as e:
        train_head(HeadSpec("attention"), x.flatten(1), y, tx.flatten(1), ty, 4, epochs=1)
    assert "attention head needs feature maps" in one_line(e)
    with pytest.raises(GenrepError) as e:
        train_head(HeadSpec("mlp"), x, y, tx, ty, 4, epochs=1)
    assert "mlp head needs feature vectors" in one_line(e)
    for bad, needle in [(HeadSpec("svm"), "unknown head"), (HeadSpec("cnn", channels=(8,)), "channels"),
                        (HeadSpec("mlp", hidden=()), "hidden"), (HeadSpec("attention", blocks=0), "blocks")]:
        with pytest.raises(GenrepError) as e:
            build_head(bad, (16, 4, 4) if bad.kind != "mlp" else (16,), 4)
        assert needle in one_line(e)


def test_bad_data_is_a_one_line_error():
    x, y, tx, ty = maps(n_train=16, n_test=8)
    spec = HeadSpec("cnn", channels=(4, 4))
    cases = [
        ((x, y, tx[:, :, :2], ty, 4), "per-sample shape"),
        ((x, y, tx, ty, 3), "labels in [0, 3]"),
        ((x, y[:-1], tx, ty, 4), "same length"),
        ((x.clone().index_fill_(0, torch.tensor([2]), float("nan")), y, tx, ty, 4), "non-finite"),
        ((x, y.float(), tx, ty, 4), "integer class indices"),
    ]
    for args, needle in cases:
        with pytest.raises(GenrepError) as e:
            train_head(spec, *args, epochs=1)
        assert needle in one_line(e)
    with pytest.raises(GenrepError) as e:
        train_head(spec, x, y, tx, ty, 4, epochs=0)
    assert "epochs" in one_line(e)


# --------------------------------------------------------------------------------------------------
# training


def test_vector_statistics_are_probes_standardize():
    x = torch.randn(300, 9) * torch.arange(1, 10) + 4
    mean, scale = feature_stats(x)
    torch.testing.assert_close((x - mean) * scale, standardize(x)[0])
    m = torch.randn(50, 3, 5, 5) * torch.tensor([1.0, 3.0, 0.2]).view(3, 1, 1) + 2
    mean, scale = feature_stats(m)
    z = (m - mean) * scale
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec", [HeadSpec("linear"), HeadSpec("mlp", hidden=(64,)),
                                  HeadSpec("cnn", channels=(32, 32)), HeadSpec("attention")],
                         ids=lambda s: s.kind)
def test_each_head_learns_a_separable_problem(spec):
    x, y, tx, ty = maps()
    if spec.kind not in MAP_HEADS:
        x, tx = x.flatten(1), tx.flatten(1)
    r = train_head(spec, x, y, tx, ty, 4, epochs=4, batch_size=32, lr=3e-3)
    assert r.test_acc > 0.9 and r.train_acc > 0.9, r
    assert r.head == spec.kind and r.epochs == 4 and r.params == head_params(spec, x.shape[1:], 4)
    assert json.loads(json.dumps(r.to_dict()))["spec"]["kind"] == spec.kind


@pytest.mark.parametrize("kind", MAP_HEADS)
@pytest.mark.parametrize("hw", [(1, 1), (2, 2)])
def test_float16_cache_and_tiny_maps_train(kind, hw):
    # a 1x1 map holds 16 numbers: a wider class separation than the 4x4 problem's
    x, y, tx, ty = maps(shape=(16, *hw), spread=1.5)
    r = train_head(HeadSpec(kind, channels=(32, 32)), x.half(), y, tx.half(), ty, 4, epochs=4, batch_size=32,
                   lr=3e-3)
    assert r.test_acc > 0.9, r


def test_deterministic_and_global_rng_untouched(monkeypatch):
    built = []
    real_build = heads.build_head
    monkeypatch.setattr(heads, "build_head", lambda *a: built.append(real_build(*a)) or built[-1])
    x, y, tx, ty = maps(n_train=64, n_test=32)
    spec = HeadSpec("attention")
    state = torch.random.get_rng_state()
    a = train_head(spec, x, y, tx, ty, 4, epochs=2, batch_size=16, seed=3)
    b = train_head(spec, x, y, tx, ty, 4, epochs=2, batch_size=16, seed=3)
    train_head(spec, x, y, tx, ty, 4, epochs=2, batch_size=16, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert {**a.to_dict(), "seconds": 0} == {**b.to_dict(), "seconds": 0}
    for (k, va), vb, vc in zip(built[0].state_dict().items(), built[1].state_dict().values(),
                               built[2].state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(built[0].fc.weight, built[2].fc.weight)


def test_step_lr_schedule_per_epoch(monkeypatch):
    seen = []

    class Recording(heads.StepLR):
        def step(self, *args, **kwargs):  # StepLR's own first call (in __init__), then one per epoch
            super().step(*args, **kwargs)
            seen.append(self.optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(heads, "StepLR", Recording)
    x, y, tx, ty = maps(n_train=16, n_test=8)
    train_head(HeadSpec("linear"), x.flatten(1), y, tx.flatten(1), ty, 4, epochs=10, lr=1e-2)
    # seen[e]: the lr epoch e trains with (seen[10]: after the last); epochs 0-7 at lr, from epoch 8 at 0.1 lr
    assert seen == pytest.approx([1e-2] * 8 + [1e-3] * 3)


def test_result_fields():
    x, y, tx, ty = maps(n_train=16, n_test=8)
    r = train_head(HeadSpec("mlp", hidden=(8, 8)), x.flatten(1), y, tx.flatten(1), ty, 4, epochs=1,
                   batch_size=5)
    assert isinstance(r, HeadResult)
    d = r.to_dict()
    assert set(d) == {"head", "test_acc", "train_acc", "params", "epochs", "lr", "batch_size", "seconds",
                      "spec", "optimizer", "momentum", "step_every", "gamma", "weight_decay", "standardize",
                      "train_acc_on"}
    assert d["spec"] == {"kind": "mlp", "hidden": [8, 8], "channels": [256, 256], "blocks": 1, "relu": True}
    assert d["batch_size"] == 5 and d["lr"] == 1e-3 and d["seconds"] > 0
    assert d["optimizer"] == "adam" and d["standardize"] is True and d["train_acc_on"] == "train split"


# --------------------------------------------------------------------------------------------------
# the authors' choices as options (issue 26)


def _authors_block(block, x):
    """The authors' timm-style block (ssl_diff/attention_head.py) written out on ``block``'s parameters: LayerNorm
    eps 1e-5, q/k/v from one Linear split as (3, heads, head dim), softmax(q k^T / sqrt(d)) v, exact GELU."""
    heads = block.attn.num_heads
    b, n, c = x.shape

    def ln(t, norm):
        return torch.nn.functional.layer_norm(t, (c,), norm.weight, norm.bias, 1e-5)

    q, k, v = block.attn.qkv(ln(x, block.norm1)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
    x = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    mlp = block.mlp
    return x + mlp.fc2(torch.nn.functional.gelu(mlp.fc1(ln(x, block.norm2))))


def test_the_attention_heads_blocks_are_the_authors_and_block_keeps_its_own():
    from genrep.nn.transformer import Block

    torch.manual_seed(0)
    head = build_head(HeadSpec("attention", blocks=2), (64, 4, 4), 5)
    x = torch.randn(3, 17, 64)
    for block in head.blocks:
        torch.testing.assert_close(block(x), _authors_block(block, x), rtol=1e-5, atol=1e-5)
    plain = Block(64, 2, qkv_bias=False)  # ViT's block for every other user: eps 1e-6, the tanh GELU
    assert plain.norm1.eps == plain.norm2.eps == 1e-6 and plain.mlp.act.approximate == "tanh"
    plain.load_state_dict(head.blocks[0].state_dict())  # the same parameters, another function
    assert (plain(x) - head.blocks[0](x)).abs().max() > 5e-5  # float32 noise at these values is ~1e-6


def test_the_cnn_heads_relu_is_an_option():
    torch.manual_seed(0)
    with_relu = build_head(HeadSpec("cnn", channels=(4, 4)), (3, 8, 8), 2)
    without = build_head(HeadSpec("cnn", channels=(4, 4), relu=False), (3, 8, 8), 2)
    without.load_state_dict(with_relu.state_dict())
    x = torch.randn(5, 3, 8, 8)
    f = torch.nn.functional
    plain = f.max_pool2d(without.conv2(f.max_pool2d(without.conv1(x), 2)), 2)
    torch.testing.assert_close(without(x), without.fc(f.adaptive_avg_pool2d(plain, 2).flatten(1)))
    assert not torch.allclose(with_relu(x), without(x))


def _recording_heads(monkeypatch) -> list:
    """Every head train_head builds, with the inputs of its forward calls kept in ``head.seen``."""
    built = []
    real_build = heads.build_head

    def build(*args):
        head = real_build(*args)
        head.seen = []
        head.register_forward_pre_hook(lambda m, inputs: m.seen.append(inputs[0].clone()))
        built.append(head)
        return head

    monkeypatch.setattr(heads, "build_head", build)
    return built


def test_standardize_false_feeds_the_raw_features(monkeypatch):
    built = _recording_heads(monkeypatch)
    x, y, tx, ty = maps(n_train=16, n_test=8)
    x, tx = x.flatten(1), tx.flatten(1)
    for standardized in (False, True):
        train_head(HeadSpec("linear"), x, y, tx, ty, 4, epochs=1, batch_size=16, standardize=standardized)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))  # the first epoch's shuffle, seed 0
    raw, standardised = built[0].seen[0], built[1].seen[0]
    torch.testing.assert_close(raw, x[perm])
    torch.testing.assert_close(standardised, standardize(x)[0][perm])


def test_sgd_without_momentum_takes_the_plain_gradient_step(monkeypatch):
    built = _recording_heads(monkeypatch)
    x, y, tx, ty = maps(n_train=16, n_test=8)
    x, tx = x.flatten(1), tx.flatten(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        start = heads.nn.Linear(x.shape[1], 4)  # what train_head builds from seed 5
    r = train_head(HeadSpec("linear"), x, y, tx, ty, 4, epochs=1, batch_size=16, optimizer="sgd", lr=0.5, seed=5,
                   standardize=False)
    loss = torch.nn.functional.cross_entropy(start(x), y)  # one full batch: the order does not change the mean
    loss.backward()
    torch.testing.assert_close(built[0].weight, start.weight - 0.5 * start.weight.grad)
    assert r.optimizer == "sgd" and r.momentum == 0 and r.lr == 0.5


def test_momentum_with_adam_is_a_one_line_error():
    x, y, tx, ty = maps(n_train=16, n_test=8)
    with pytest.raises(GenrepError) as e:
        train_head(HeadSpec("linear"), x.flatten(1), y, tx.flatten(1), ty, 4, epochs=1, momentum=0.9)
    assert "momentum 0.9 applies to the sgd optimizer" in one_line(e)
    with pytest.raises(GenrepError) as e:
        train_head(HeadSpec("linear"), x.flatten(1), y, tx.flatten(1), ty, 4, epochs=1, optimizer="lion")
    assert "optimizer 'lion' is unknown; choose adam, sgd" in one_line(e)


@pytest.mark.parametrize("kind", ["linear", "attention"])
def test_streamed_training_on_the_cached_features_is_train_head(kind, monkeypatch):
    """The streamed path is the cached one's loop: served the cached features batch by batch, it trains the same
    head (the same shuffle, steps and standardisation) and scores the same test accuracy."""
    built = _recording_heads(monkeypatch)
    x, y, tx, ty = maps(n_train=48, n_test=24)
    if kind == "linear":
        x, tx = x.flatten(1), tx.flatten(1)
    spec = HeadSpec(kind)
    cached = train_head(spec, x, y, tx, ty, 4, epochs=3, batch_size=16, seed=2)
    epochs_seen = []

    def batch(rows, epoch):
        epochs_seen.append(epoch)
        return x[rows]

    streamed = heads.train_head_streamed(spec, tuple(x.shape[1:]), y, ty, 4, train_batch=batch,
                                         test_batches=lambda: tx.split(5), stats_batches=lambda: x.split(7),
                                         epochs=3, batch_size=16, seed=2)
    for a, b in zip(built[0].state_dict().values(), built[1].state_dict().values()):
        torch.testing.assert_close(a, b)
    assert streamed.test_acc == cached.test_acc and epochs_seen == [0] * 3 + [1] * 3 + [2] * 3
    assert streamed.train_acc_on == "last epoch's training batches" and streamed.standardize


def test_streamed_test_features_must_cover_the_test_labels():
    x, y, tx, ty = maps(n_train=16, n_test=8)
    with pytest.raises(GenrepError) as e:
        heads.train_head_streamed(HeadSpec("linear"), (x[0].numel(),), y, ty, 4,
                                  train_batch=lambda rows, e: x.flatten(1)[rows],
                                  test_batches=lambda: [tx.flatten(1)[:5]], epochs=1)
    assert "covered 5 rows but there are 8 test labels" in one_line(e)
