import torch
from conftest import tiny_config

from genrep.eval.features import cached_feature_sets, extract_features
from genrep.methods import DataSpec, build_method


def test_extraction_is_batched_and_matches_one_pass():
    torch.manual_seed(0)
    method = build_method("supervised", tiny_config().model, DataSpec(8, 1, 10)).eval()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    feats = extract_features(method, images, batch_size=3)
    with torch.no_grad():
        direct = method.features(images.float() / 255)
    torch.testing.assert_close(feats, direct, rtol=1e-5, atol=1e-6)


def test_cache_is_reused_only_for_the_same_weights(tmp_path):
    calls = []

    def compute(value):
        def f(todo, spill, record):
            calls.append(value)
            return [torch.full((2, 3), float(value))]
        return f

    def cached_features(run, key, version, extract):
        return cached_feature_sets(run, [key], version, extract)[0]

    assert cached_features(tmp_path, "k", "ema@10", compute(1))[0, 0] == 1
    assert cached_features(tmp_path, "k", "ema@10", compute(2))[0, 0] == 1  # hit
    assert cached_features(tmp_path, "k", "ema@20", compute(3))[0, 0] == 3  # new weights: recomputed
    (tmp_path / "cache" / "k.safetensors").write_bytes(b"garbage")
    assert cached_features(tmp_path, "k", "ema@20", compute(4))[0, 0] == 4  # damaged: recomputed
    assert calls == [1, 3, 4]
