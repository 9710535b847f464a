"""The throughput benchmark runs on the CPU (its CUDA fast path runs on GPU machines)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_throughput_reports_images_per_second_flops_and_mfu(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run("--recipe", "supervised-digits", "--batch-sizes", "32,64", "--steps", "3", "--warmup", "1",
                "--peak-tflops", "0.5", "--json", str(out), "--model.dim", "32", "--model.num_heads", "2",
                "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["batch"]) for r in rows] == [("eager-fp32", 32), ("eager-fp32", 64)]
    for r in rows:
        assert r["images_per_s"] > 0 and r["train_flops_per_image"] > 0
        assert r["mfu"] == pytest.approx(r["model_tflops"] / 0.5)
        assert r["flops_source"] == "analytic" and r["params_m"] == r["params_total_m"] > 0
    assert "images/s" in proc.stdout and "MFU" in proc.stdout


def test_paper_size_flops_match_the_known_cost():
    """The CIFAR-10 ViT of the HybViT paper costs about 4.33 GFLOP per image for forward + backward."""
    from genrep.config import resolve_config
    from genrep.methods import DataSpec, build_method
    from genrep.nn.flops import training_flops

    cfg = resolve_config("supervised-cifar10")
    method = build_method("supervised", cfg.model, DataSpec(32, 3, 10))
    assert training_flops(method.flops_per_image()) / 1e9 == pytest.approx(4.33, rel=0.01)


def test_bad_mode_is_a_clear_error():
    proc = _run("--recipe", "supervised-digits", "--modes", "warp")
    assert proc.returncode == 2 and "unknown mode 'warp'" in proc.stderr and "Traceback" not in proc.stderr


AUGMENT_SCRIPT = SCRIPT.parent / "augment_throughput.py"


def test_augment_throughput_reports_images_per_second(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(AUGMENT_SCRIPT), "--data", "digits", "--kinds",
                           "weak,classifier,classifier+mix", "--batch-sizes", "32", "--steps", "2", "--warmup", "1",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["kind"], r["batch"]) for r in rows] == [("weak", 32), ("classifier", 32), ("classifier+mix", 32)]
    assert all(r["images_per_s"] > 0 and r["threads"] == 1 for r in rows) and "images/s" in proc.stdout
    bad = subprocess.run([sys.executable, str(AUGMENT_SCRIPT), "--kinds", "heavy"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "unknown kind 'heavy'" in bad.stderr and "Traceback" not in bad.stderr


def test_token_sampling_reports_tokens_per_second_with_and_without_the_cache(tmp_path):
    out = tmp_path / "rows.json"
    script = SCRIPT.parent / "token_sampling.py"
    proc = subprocess.run([sys.executable, str(script), "--recipe", "gcrl-digits", "--batch", "4", "--tokens", "6",
                           "--json", str(out), "--model.dim", "32", "--model.num_heads", "2", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["cache", "recompute"]
    assert all(r["tokens_per_s"] > 0 and r["tokens"] == 6 for r in rows)
    assert "tokens/s" in proc.stdout
    axial = subprocess.run([sys.executable, str(script), "--recipe", "gcrl-digits", "--modes", "cache",
                            "--model.attention", "axial", "--device", "cpu"], capture_output=True, text=True,
                           timeout=600)
    assert axial.returncode == 2 and "needs dense attention" in axial.stderr


def test_throughput_runs_a_colour_token_method_with_axial_attention(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run("--recipe", "gcrl-digits", "--batch-sizes", "16", "--steps", "2", "--warmup", "1", "--json",
                str(out), "--model.dim", "32", "--model.num_heads", "2", "--model.attention", "axial",
                "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["images_per_s"] > 0 and row["passes_per_image"] == 2


def test_feature_extraction_reports_images_per_second_in_each_precision(tmp_path):
    out = tmp_path / "rows.json"
    script = SCRIPT.parent / "feature_extraction.py"
    proc = subprocess.run([sys.executable, str(script), "--recipe", "adm-digits", "--batch", "4", "--steps", "1",
                           "--json", str(out), "--model.feature_t", "50", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["fp32", "bf16", "bf16-cl"]
    assert all(r["images_per_s"] > 0 and r["gflops_per_image"] > 0 and r["feature_t"] == 50 for r in rows)
    vectors = subprocess.run([sys.executable, str(script), "--recipe", "simclr-digits", "--device", "cpu"],
                             capture_output=True, text=True, timeout=600)
    assert vectors.returncode == 2 and "reads no feature maps" in vectors.stderr


GVP_SCRIPT = SCRIPT.parent / "gvp_attention.py"
GVP_TINY = ("--batch", "2", "--heads", "2", "--tokens", "65", "--head-dim", "8", "--steps", "2", "--warmup", "1",
            "--device", "cpu")


def _gvp(*args):
    return subprocess.run([sys.executable, str(GVP_SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_gvp_attention_times_each_variant_and_counts_the_allowed_entries(tmp_path):
    out = tmp_path / "rows.json"
    proc = _gvp(*GVP_TINY, "--peak-tflops", "0.5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["causal", "per-sample-direct-content", "per-sample-direct-query", "shared-permuted-content",
                          "shared-permuted-query", "flex-shared-content", "flex-shared-query",
                          "flex-per-sample-content", "flex-per-sample-query"]
    N = 65
    assert rows["causal"]["allowed"] == pytest.approx((N + 1) / (2 * N))
    for name, r in rows.items():
        if name.startswith("flex"):  # FlexAttention runs on CUDA only here: skipped with the reason
            assert r["skipped"] and "ms" not in r
            continue
        assert r["ms"] > 0 and r["mean_ms"] > 0 and 0 < r["allowed"] < 1 and r["dtype"] == "float32"
        useful = 12 * 2 * 2 * N * N * 8 * r["allowed"]  # QK^T and PV of the allowed pairs, forward x 3
        assert r["tflops"] == pytest.approx(useful / (r["ms"] / 1e3) / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        assert (r["mask_ms"] is None) == (name == "causal")
    for variant in ("per-sample-direct", "shared-permuted"):  # the query stream sees strictly earlier groups
        assert rows[f"{variant}-query"]["allowed"] < rows[f"{variant}-content"]["allowed"]
    assert "skipped" in proc.stdout and "TFLOP/s" in proc.stdout


def test_gvp_attention_direct_and_permuted_masks_allow_the_same_work_for_one_segmentation(tmp_path):
    out = tmp_path / "rows.json"
    proc = _gvp(*GVP_TINY, "--segment-per", "batch", "--variants", "per-sample-direct,shared-permuted",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    for stream in ("content", "query"):  # a permutation moves the allowed entries, never changes their number
        assert rows[f"per-sample-direct-{stream}"]["allowed"] == pytest.approx(
            rows[f"shared-permuted-{stream}"]["allowed"])


def test_gvp_attention_flex_mask_mods_are_the_gvp_masks(monkeypatch):
    """The flex rows' mask_mods (forward only: FlexAttention has no CPU backward) give SDPA's result under the
    dense masks, and the direct masks are the factorisation-order ones conjugated by each sample's order."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from genrep.nn.gvp_masks import masks_from_levels, permute_tokens

    monkeypatch.syspath_prepend(str(GVP_SCRIPT.parent))
    from gvp_attention import Problem, flex_mask_mod

    p = Problem(3, 2, 65, 8, 1, 20, torch.float32, torch.device("cpu"), "sample")
    q, k, v = p.q.detach(), p.k.detach(), p.v.detach()
    for per_sample in (False, True):
        levels = p.factorisation_levels(per_sample)
        dense = masks_from_levels(levels.reshape(-1, p.N))
        for s, stream in enumerate(("content", "query")):
            block_mask = create_block_mask(flex_mask_mod(levels, stream), p.B if per_sample else None, None, p.N,
                                           p.N, device="cpu")
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[s][:, None])
            torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask), expected)
    factorised = masks_from_levels(p.factorisation_levels(True))
    for direct, fact in zip(p.direct_masks(), factorised):
        assert torch.equal(permute_tokens(permute_tokens(direct, p.orders, leading=1, dim=1), p.orders, leading=1,
                                          dim=2), fact)


def test_gvp_attention_bad_variant_is_a_one_line_error():
    proc = _gvp("--variants", "causal,warp", "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    expected = ("gvp_attention: error: unknown variant 'warp'; choose from causal, per-sample-direct, "
                "shared-permuted, flex-shared, flex-per-sample")
    assert proc.stderr.strip().splitlines() == [expected]


def test_patch_sampling_reports_patches_per_second_with_and_without_the_cache(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run_script("patch_sampling.py", "--recipe", "darl-digits", "--batch", "2", "--device", "cpu",
                       "--model.dim", "32", "--model.depth", "1", "--model.num_heads", "2", "--model.sample_steps", "2",
                       "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["cache", "recompute"]
    assert all(r["patches_per_s"] > 0 and r["patches"] == 16 and r["sample_steps"] == 2 for r in rows)
    bad = _run_script("patch_sampling.py", "--recipe", "supervised-digits", "--device", "cpu")
    assert bad.returncode == 2 and "does not decode patches" in bad.stderr and "Traceback" not in bad.stderr


def _run_script(name, *args):
    return subprocess.run([sys.executable, str(SCRIPT.parent / name), *args], capture_output=True, text=True,
                          timeout=600)
