"""genrep export (issue 29, item 4): a ViT backbone as timm's VisionTransformer, loaded into timm and compared with
genrep's features; every other network refused in one line naming what timm lacks; --format safetensors for every
method. The runs are written directly (config, marker, perturbed weights), not trained: the export reads files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_in_process, one_line, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file

from genrep.config import save_config
from genrep.errors import GenrepError
from genrep.export import export_run, json_beside
from genrep.io import atomic_save_safetensors
from genrep.methods import build_method
from genrep.runs import mark_run, trained_data_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the registered methods timm holds at their tiny configuration, and what the others lack
EXPORTABLE = {"supervised", "genvit", "hybvit", "gvp"}
REFUSED = {"darl": "2D RoPE", "adm": "U-Net", "igpt": "colour tokens", "simclr": "colour tokens",
           "gcrl": "colour tokens", "vq": "VQ-VAE", "toy": "no timm mapping"}


def make_run(folder: Path, method: str, **overrides) -> tuple[Path, torch.nn.Module]:
    """A run folder as training leaves it, with weights perturbed away from their initialisation (zero heads and
    modulations would hide a wrong mapping); the method holding the same weights, in eval mode."""
    cfg = tiny_config(method, **overrides)
    spec, _ = trained_data_spec(cfg)
    torch.manual_seed(0)
    model = build_method(cfg.method, cfg.model, spec)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    folder.mkdir(parents=True)
    mark_run(folder)
    save_config(cfg, folder / "config.yaml")
    for name in ("ema", "model"):
        atomic_save_safetensors(folder / f"{name}.safetensors", state, {"step": "3"})
    return folder, model.eval()


def timm_model(out: Path):
    vit = pytest.importorskip("timm.models.vision_transformer")
    kwargs = json.loads(json_beside(out).read_text())["timm"]["kwargs"]
    model = vit.VisionTransformer(**kwargs)
    model.load_state_dict(load_file(out), strict=True)
    return model.eval()


def genrep_readout(method, x: torch.Tensor, pool: str) -> torch.Tensor:
    """genrep's features of the read-out the export states: the last block, no causal mask; GenViT untimed."""
    method.causal_mask = False
    if method.name == "genvit":
        return method.net.pool(method.net(method.normalize(x)), pool)
    return method.features(x, layer=method.num_layers, pool=pool)


def check_timm_matches(run: Path, method, tmp_path: Path) -> dict:
    out = tmp_path / "backbone.safetensors"
    result = export_run(run, out, "timm")
    model = timm_model(out)
    x = torch.rand(3, method.data.channels, method.data.image_size, method.data.image_size)
    with torch.no_grad():
        ours = genrep_readout(method, x, result["readout"]["pool"])
        theirs = model((x - 0.5) / 0.5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    return result


def test_every_method_exports_to_timm_or_says_what_timm_lacks(method_name, tmp_path):
    run, method = make_run(tmp_path / "run", method_name)
    if method_name in EXPORTABLE:
        result = check_timm_matches(run, method, tmp_path)
        assert result["genrep"] == {**result["genrep"], "method": method_name, "weights": "ema", "step": 3}
        with safe_open(result["path"], "pt") as f:
            assert json.loads(f.metadata()["export_json"]) == json.loads(json_beside(result["path"]).read_text())
        return
    with pytest.raises(GenrepError) as e:
        export_run(run, tmp_path / "backbone.safetensors", "timm")
    msg = one_line(e)
    assert REFUSED[method_name] in msg and "--format safetensors" in msg, msg
    assert not list(tmp_path.glob("backbone.*"))


def test_every_method_exports_its_weights_and_architecture(method_name, tmp_path):
    run, method = make_run(tmp_path / "run", method_name)
    result = export_run(run, None, "safetensors", "model")
    out = run / "export" / "safetensors-model.safetensors"
    assert result["path"] == str(out)
    back = load_file(out)
    state = method.state_dict()
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    doc = json.loads(json_beside(out).read_text())
    assert doc["architecture"]["method"] == method_name
    assert doc["architecture"]["model"] == tiny_config(method_name).to_dict()["model"]


@pytest.mark.parametrize("overrides", [
    {"model.pos_embed": "sincos", "model.causal": True, "model.head_pool": "mean"},
    {"model.pos_embed": "none"},
], ids=["sincos-causal", "no-positions"])
def test_supervised_positions_timm_holds(overrides, tmp_path):
    run, method = make_run(tmp_path / "run", "supervised", **overrides)
    result = check_timm_matches(run, method, tmp_path)
    if overrides.get("model.causal"):  # the masked read-out, through timm's own causal call
        model = timm_model(Path(result["path"]))
        x = torch.rand(2, 1, 8, 8)
        method.causal_mask = True
        with torch.no_grad():
            tokens = model.forward_features((x - 0.5) / 0.5, is_causal=True)
            torch.testing.assert_close(tokens[:, 1:].mean(1), method.features(x, pool="mean"), atol=1e-5, rtol=1e-5)


def test_darl_with_absolute_positions_exports_its_content_stream(tmp_path):
    # a random order: the query stream and its token are left out, the content stream is the plain ViT
    run, method = make_run(tmp_path / "run", "darl", **{"model.pos_embed": "learned", "model.order": "random"})
    result = check_timm_matches(run, method, tmp_path)
    assert result["readout"]["causal"] is False and "query_token" not in load_file(result["path"])


@pytest.mark.parametrize("method, overrides, fragment", [
    ("supervised", {"model.pos_embed": "rope1d"}, "1D RoPE"),
    ("darl", {"model.pos_embed": "rope2d"}, "model.pos_embed learned, sincos or none exports"),
])
def test_rope_is_refused_naming_it(method, overrides, fragment, tmp_path):
    run, _ = make_run(tmp_path / "run", method, **overrides)
    with pytest.raises(GenrepError) as e:
        export_run(run, None, "timm")
    assert fragment in one_line(e)
    assert not (run / "export").exists()


def test_export_does_not_import_timm(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path / "run", "supervised")
    monkeypatch.setitem(sys.modules, "timm", None)  # any import of timm now fails
    export_run(run, None, "timm")


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export") / "run", "hybvit")[0]


def _error(*argv: str) -> str:
    proc = cli_in_process("export", *argv)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("genrep: error: "), proc
    return lines[0]


def test_cli_writes_the_default_path_and_says_so(cli_run):
    proc = cli_in_process("export", str(cli_run))
    assert proc.returncode == 0, proc.stderr
    out = cli_run / "export" / "timm-ema.safetensors"
    assert str(out) in proc.stdout and str(json_beside(out)) in proc.stdout
    assert cli_in_process("export", str(cli_run)).returncode == 0  # its own files are replaced


@pytest.mark.parametrize("argv, fragment", [
    (["--format", "onnx"], "--format 'onnx' is unknown; choose timm or safetensors"),
    (["--weights", "best"], "--weights 'best' is unknown; choose ema or model"),
    (["-o", "backbone.pt"], "must name a .safetensors file"),
    (["-o", "{run}/ema.safetensors"], "writes only under"),
])
def test_cli_bad_arguments_are_one_line(cli_run, argv, fragment):
    argv = [a.replace("{run}", str(cli_run)) for a in argv]
    assert fragment in _error(str(cli_run), *argv)


def test_cli_missing_run_is_one_line(tmp_path):
    assert "is not a genrep run folder" in _error(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name", ["mine.safetensors", "mine.json"])
def test_cli_keeps_a_file_genrep_did_not_write_unless_forced(cli_run, tmp_path, name):
    (tmp_path / name).write_text("a user's file")
    out = tmp_path / "mine.safetensors"
    assert f"{tmp_path / name} exists and is not a weights export genrep wrote" in _error(str(cli_run), "-o", str(out))
    assert (tmp_path / name).read_text() == "a user's file"
    assert cli_in_process("export", str(cli_run), "-o", str(out), "--force").returncode == 0
    assert load_file(out)["cls_token"].shape == (1, 1, 32)
