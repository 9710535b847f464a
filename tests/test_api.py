"""The Python API (issue 29): the README's example as written, ``genrep.load`` on a run of every registered method
(features, and each capability it has, refused in one line where it has not), and the image forms a run takes."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, tiny_config

import genrep
from genrep.api import train
from genrep.methods import get_method, method_names

README = Path(__file__).resolve().parents[1] / "README.md"
IMAGES = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written_and_prints_only_what_it_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_example(), "README.md", "exec"), {})
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("Run('runs/api-example': hybvit") and err == ""
    assert (tmp_path / "runs" / "api-example" / "results" / "probe.json").is_file()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-step run of every registered method, trained once for the module."""
    root = tmp_path_factory.mktemp("api-runs")
    made = {}
    for name in method_names():
        path = root / name
        train(tiny_config(name, **{"train.steps": 1, "train.ckpt_every": 1}), path, resume=False, claimed=False)
        made[name] = path
    return made


CALLS = {"logits": lambda r: r.logits(IMAGES), "sample": lambda r: r.sample(2, seed=0),
         "nll": lambda r: r.nll(IMAGES[:1]), "complete": lambda r: r.complete(IMAGES[:1], _top_half())}
SHAPES = {"logits": (3, 10), "sample": (2, 1, 8, 8), "nll": (1,), "complete": (1, 1, 8, 8)}


def _top_half() -> torch.Tensor:
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep[:4] = True
    return keep


@pytest.mark.parametrize("name", method_names())
def test_a_loaded_run_reads_features_and_offers_exactly_its_methods_capabilities(runs, name):
    run = genrep.load(runs[name], device="cpu")
    assert run.config.method == name and not run.method.training and name in repr(run)
    feats = run.features(IMAGES)
    assert feats.dtype == torch.float32 and feats.shape[0] == 3 and torch.isfinite(feats).all()
    torch.testing.assert_close(run.features(IMAGES), feats)   # the same model every call: eval mode, no state
    for capability, call in CALLS.items():
        if capability in get_method(name).capabilities:
            out = call(run)
            assert tuple(out.shape) == SHAPES[capability] and torch.isfinite(out).all()
        else:
            with pytest.raises(genrep.GenrepError, match=f"no '{capability}' capability") as e:
                call(run)
            one_line(e)
    if "complete" in get_method(name).capabilities:   # the kept pixels come back as they were
        torch.testing.assert_close(run.complete(IMAGES[:1], _top_half())[..., :4, :], IMAGES[:1, :, :4].float() / 255)


def test_every_image_form_gives_the_same_features(runs):
    from PIL import Image

    run = genrep.load(runs["supervised"], device="cpu")
    want = run.features(IMAGES)
    pil = [Image.fromarray(im[0].numpy()) for im in IMAGES]
    for form in (IMAGES.permute(0, 2, 3, 1), IMAGES.numpy(), IMAGES.float() / 255, IMAGES.int(), pil,
                 list(IMAGES), [im.permute(1, 2, 0).numpy() for im in IMAGES]):
        torch.testing.assert_close(run.features(form), want)
    big = torch.nn.functional.interpolate(IMAGES.float(), size=(16, 16), mode="nearest").to(torch.uint8)
    assert run.features(big).shape == want.shape   # resized to the run's 8x8 the way its data set was


@pytest.mark.parametrize("images, message", [
    (torch.rand(2, 3, 8, 8), "have 3 channels"),
    (torch.rand(2, 1, 8, 8) * 2, "floats in"),
    (torch.full((2, 1, 8, 8), 300), "integers in"),
    ([], "list of images is empty"),
    ("a picture.png", "are a str"),
    (np.array([object()]), "NumPy array of object"),
    (torch.zeros(2, 0, 8, 8), "shape"),
])
def test_images_a_run_cannot_read_are_one_line(runs, images, message):
    run = genrep.load(runs["supervised"], device="cpu")
    with pytest.raises(genrep.GenrepError, match=message) as e:
        run.features(images)
    one_line(e)


def test_loading_what_is_not_a_trained_run_is_one_line(runs, tmp_path):
    for path, weights, message in ((tmp_path, "ema", "not a genrep run folder"), (runs["supervised"], "best",
                                                                                      "weights 'best' is unknown")):
        with pytest.raises(genrep.GenrepError, match=message) as e:
            genrep.load(path, weights=weights)
        one_line(e)


def test_the_packages_named_like_api_functions_are_both():
    assert set(genrep.methods()) >= {"hybvit", "gcrl", "adm"} and genrep.methods()["hybvit"] == tuple(
        get_method("hybvit").capabilities)
    assert "hybvit-digits" in genrep.recipes() and genrep.methods.Method is not None


@pytest.mark.parametrize("command", [["probe"], ["evaluate", "--eval.protocols", "calibration"],
                                     ["predict", "--data", "digits", "--coverage", "0.9"]])
def test_a_command_reads_the_runs_config_once(runs, monkeypatch, command):
    """The config is read once per command: the command opens the Run, which hands it down (the lock, the read
    options, the evaluation context, the threshold's fit)."""
    from genrep import config, runs as run_folders
    from genrep.cli import main

    reads = []
    real = config.load_config_file

    def counted(path, *args, **kwargs):
        reads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(run_folders, "load_config_file", counted)
    assert main([command[0], str(runs["supervised"]), *command[1:], "--eval.device" if command[0] == "evaluate"
                 else "--device", "cpu"]) == 0
    assert len(reads) == 1


def test_a_run_opened_to_write_holds_its_lock_until_it_is_closed(runs):
    from genrep.errors import GenrepError
    from genrep.run import Run

    path = runs["supervised"]
    with Run.open(path, "evaluate") as run:
        with pytest.raises(GenrepError) as e:
            Run.open(path, "probe")
        assert "in use by another genrep command" in one_line(e) and "before you probe it" in one_line(e)
        # what it is handed to works under the lock it holds
        assert genrep.evaluate(run, protocols="calibration", device="cpu")["protocols"]["calibration"]["ece"] >= 0
    Run.open(path, "probe").close()   # released


def test_a_run_opened_to_read_locks_only_while_something_writes_into_it(runs):
    from genrep.errors import GenrepError
    from genrep.run import Run

    path = runs["supervised"]
    run = Run.open(path)
    Run.open(path, "probe").close()
    with run.writing("evaluate"):
        with pytest.raises(GenrepError, match="before you probe it"):
            Run.open(path, "probe")
    Run.open(path, "probe").close()
    with pytest.raises(GenrepError) as e:
        Run.open(path, "train")
    assert "mode 'train' is unknown; choose one of read, evaluate, probe, predict" in one_line(e)
