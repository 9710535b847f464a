"""A library's warning never precedes genrep's error line (issue 24, item 3): torch warns about a legacy pickle's
protocol just before refusing it; the readers hold such warnings, drop them when they fail, and let a real one
through as one ``genrep: warning:`` line. Nothing is unpickled (weights_only stays)."""

import pickle
import warnings

import pytest
from conftest import TINY, TINY_RUN, assert_one_line_error, run_cli

from genrep.cli import main
from genrep.errors import library_warnings
from genrep.methods import get_method

TINY_ADM = [f"--{k}={v}" for k, v in {**TINY_RUN, **{f"model.{k}": v for k, v in
                                                      get_method("adm").tiny_config.items()}}.items()]


def _legacy_pickle(path, obj) -> None:
    """A raw pickle (not torch.save's zip): torch.load takes it for its legacy format, and warns of its protocol."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def test_a_legacy_pickle_as_pretrained_weights_is_one_line(tmp_path):
    weights = tmp_path / "256x256_diffusion_uncond.pt"
    _legacy_pickle(weights, {"input_blocks.0.0.weight": [1.0]})
    proc = run_cli("pretrain", "--recipe", "adm-digits", "--model.pretrained", str(weights),
                   "--out", str(tmp_path / "run"), *TINY_ADM)
    assert_one_line_error(proc, str(weights), "torch.load(weights_only=True)", "Unsupported operand")
    assert "Warning" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_legacy_pickle_as_a_checkpoints_state_is_one_line(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--recipe", "supervised-digits", "--out", str(run),
                 *[f"--{k}={v}" for k, v in TINY.items()]]) == 0
    state = run / "checkpoints" / "step_00000020" / "state.pt"
    _legacy_pickle(state, {"step": 20, "optimizer": {}})
    proc = run_cli("pretrain", "--resume", str(run))
    assert_one_line_error(proc, str(state), "is corrupt or not a genrep state file")
    assert "Warning" not in proc.stderr


def test_a_reader_that_succeeds_shows_each_warning_as_one_line(capsys):
    with library_warnings():
        warnings.warn("the first thing\nand its second line", UserWarning, stacklevel=1)
        warnings.warn("the first thing\nand its second line", UserWarning, stacklevel=1)
        warnings.warn("another thing", UserWarning, stacklevel=1)
    assert capsys.readouterr().err.splitlines() == ["genrep: warning: the first thing",
                                                    "genrep: warning: another thing"]


def test_a_reader_that_fails_drops_its_warnings(capsys):
    with pytest.raises(ValueError, match="refused"), library_warnings():
        warnings.warn("protocol 4 may not be supported", UserWarning, stacklevel=1)
        raise ValueError("refused")
    assert capsys.readouterr().err == ""
