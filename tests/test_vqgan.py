"""The VQGAN tokenizer reads taming-transformers' checkpoints: the same codes and reconstructions as taming's own
modules on a state dict they built (a tiny configuration), Lightning's ``last.ckpt`` layout with its loss and
callback entries, and one-line refusals of another configuration and of pickled objects."""

import sys
import types

import pytest
import torch
from conftest import one_line
from torch import nn

from genrep.errors import GenrepError
from genrep.methods import DataSpec
from genrep.methods.tokenizers import is_tokenizer, load_vqgan
from genrep.nn.vqgan import VQGAN, VQGANArch

# two levels (f = 2), attention at the 4x4 level and in the middle: every kind of module, at 8x8 pixels
TINY = VQGANArch(n_embed=16, embed_dim=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                 z_channels=8, resolution=8, in_channels=3)
SPEC = DataSpec(image_size=8, channels=3, num_classes=10)
CALLBACK = "pytorch_lightning.callbacks.model_checkpoint"


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture
def lightning_names(monkeypatch):
    """A stand-in ``pytorch_lightning`` whose ModelCheckpoint class pickles under Lightning's name (pickle looks
    the class up by name when it writes it), so a test can write a file laid out as taming's ``last.ckpt``."""
    parts = CALLBACK.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type("ModelCheckpoint", (), {"__module__": CALLBACK})
    setattr(sys.modules[CALLBACK], "ModelCheckpoint", cls)
    return cls


def lightning_checkpoint(state: dict, callback_class) -> dict:
    """What PyTorch Lightning 1.0 writes (taming's ``last.ckpt``): the weights beside the trainer's state, each
    callback's state keyed by the callback's class."""
    return {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
            "callbacks": {callback_class: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {0: {"step": 1, "exp_avg": torch.zeros(2)}},
                                  "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0]}]}],
            "lr_schedulers": [], "state_dict": state}


def _with_loss_entries(state: dict) -> dict:
    """VQModel's state dict holds its loss (LPIPS, discriminator), which a tokenizer never reads."""
    return {**state, "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
            "loss.perceptual_loss.net.slice1.0.weight": torch.randn(4, 3, 3, 3), "loss.logvar": torch.zeros(())}


class TamingVQModel(nn.Module):
    """taming's VQModel without its Lightning base and its loss (models/vqgan.py imports pytorch_lightning):
    its own Encoder, Decoder and VectorQuantizer2 under VQModel's attribute names."""

    def __init__(self, arch: VQGANArch):
        super().__init__()
        model = pytest.importorskip("taming.modules.diffusionmodules.model")
        quantize = pytest.importorskip("taming.modules.vqvae.quantize")
        dd = dict(double_z=False, z_channels=arch.z_channels, resolution=arch.resolution,
                  in_channels=arch.in_channels, out_ch=arch.in_channels, ch=arch.ch, ch_mult=list(arch.ch_mult),
                  num_res_blocks=arch.num_res_blocks, attn_resolutions=list(arch.attn_resolutions), dropout=0.0)
        self.encoder, self.decoder = model.Encoder(**dd), model.Decoder(**dd)
        self.quantize = quantize.VectorQuantizer2(arch.n_embed, arch.embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(arch.z_channels, arch.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(arch.embed_dim, arch.z_channels, 1)

    def codes_and_reconstruction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VQModel.encode's indices (raster order) and VQModel.decode of its quantized z, for x in [0, 1]."""
        quant, _, (_, _, indices) = self.quantize(self.quant_conv(self.encoder(x * 2 - 1)))
        y = self.decoder(self.post_quant_conv(quant))
        return indices.view(len(x), -1), ((y + 1) / 2).clamp(0, 1)


@pytest.fixture(scope="module")
def taming_model():
    torch.manual_seed(0)
    model = TamingVQModel(TINY).eval()
    with torch.no_grad():  # codes spread over the codebook, not all on the one nearest a fresh encoder's output
        model.quantize.embedding.weight.normal_()
    return model


def test_codes_and_reconstructions_equal_taming_modules(taming_model, lightning_names, tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(_with_loss_entries(taming_model.state_dict()), lightning_names), path)
    ours, source = load_vqgan(path, TINY, SPEC)
    assert source == path and is_tokenizer(ours) and (ours.codebook_size, ours.downsample) == (16, 2)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes, recon = taming_model.codes_and_reconstruction(x)
        assert codes.unique().numel() > 4  # a comparison of many codes, not one
        assert torch.equal(ours.encode(x), codes)
        torch.testing.assert_close(ours.decode(codes), recon, rtol=0, atol=5e-6)
        torch.testing.assert_close(ours.code_vectors(codes), taming_model.quantize.embedding.weight[codes])
    torch.save(taming_model.state_dict(), tmp_path / "plain.pt")  # a plain state dict of VQModel reads the same
    plain, _ = load_vqgan(tmp_path / "plain.pt", TINY, SPEC)
    assert torch.equal(plain.encode(x), codes)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vqgan") / "tiny.pt"
    torch.save(VQGAN(TINY).state_dict(), path)
    return path


def test_a_checkpoint_of_another_configuration_is_one_line(tiny_file):
    wider = VQGANArch(**{**TINY.__dict__, "n_embed": 32, "ch_mult": (1, 2, 2), "resolution": 16})
    with pytest.raises(GenrepError) as e:
        load_vqgan(tiny_file, wider, DataSpec(image_size=8, channels=3, num_classes=10))
    msg = one_line(e)
    assert msg.startswith(f"model.vqgan {tiny_file}: the file is not a VQGAN of this configuration")
    assert "missing keys encoder.down.1.downsample.conv.weight" in msg and "more)" in msg
    assert "quantize.embedding.weight: file (16, 8) vs model (32, 8)" in msg and "model.vqgan_*" in msg
    with pytest.raises(GenrepError) as e:  # grey images against a colour VQGAN
        load_vqgan(tiny_file, VQGANArch(**{**TINY.__dict__, "in_channels": 1}), SPEC)
    assert "encoder.conv_in.weight: file (32, 3, 3, 3) vs model (32, 1, 3, 3)" in one_line(e)


class Pickled(nn.Module):
    pass


@pytest.mark.parametrize("content", ["module", "callback instance", "not a dict", "bad entry"])
def test_a_checkpoint_that_is_not_plain_tensors_is_refused_in_one_line(content, lightning_names, tmp_path):
    path = tmp_path / "bad.ckpt"
    obj = {"module": lambda: {"state_dict": Pickled()}, "callback instance": lambda: {"cb": lightning_names()},
           "not a dict": lambda: [torch.zeros(1)], "bad entry": lambda: {"state_dict": {"encoder.x": 3}}}[content]()
    torch.save(obj, path)
    with pytest.raises(GenrepError) as e:
        load_vqgan(path, TINY, SPEC)
    expected = {"module": f"it pickles {__name__}.Pickled", "callback instance": "with torch.load(weights_only=True)",
                "not a dict": "holds a value of type list", "bad entry": "entry 'encoder.x' is not a tensor (int)"}
    assert expected[content] in one_line(e) and str(path) in one_line(e)


def test_bad_paths_and_sizes_are_one_line(tiny_file, tmp_path):
    with pytest.raises(GenrepError) as e:
        load_vqgan(tmp_path / "none.ckpt", TINY, SPEC)
    assert "is not a file" in one_line(e)
    with pytest.raises(GenrepError) as e:
        load_vqgan(tiny_file, TINY, DataSpec(image_size=9, channels=3, num_classes=10))
    assert "one code per 2x2 pixels" in one_line(e) and "multiple of 2" in one_line(e)
    with pytest.raises(GenrepError) as e:
        VQGAN(VQGANArch(**{**TINY.__dict__, "ch": 48}))
    assert "GroupNorm cannot split" in one_line(e)

