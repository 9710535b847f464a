"""The diffusion-features paper's fine-grained transfer sets (genrep.data.fgvc_sets) through load_dataset, on tiny
fakes written in each set's published layout under tmp_path: their splits, labels and class names, every image
centre-cropped as guided-diffusion's loader crops it, the one-line refusals when files are missing or damaged (and
never a download), and the adm-finegrained-<set> recipes as a user runs them. Nothing touches the network."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from center_crop_reference import crop_file
from conftest import one_line
from PIL import Image

from genrep.config import load_recipe, resolve_config
from genrep.data.datasets import describe_datasets, load_dataset, registered_spec
from genrep.errors import GenrepError

FGVC = ["aircraft", "cars", "cub", "dogs", "flowers", "nabirds"]
SIZE = 12   # small, and below most fake images' short side: both down- and upsampling crops are exercised
# table 5: classes, train, test
TABLE_5 = {"aircraft": (100, 6667, 3333), "cars": (196, 8144, 8041), "cub": (200, 5994, 5794),
           "dogs": (120, 12000, 8580), "flowers": (102, 2040, 6149), "nabirds": (555, 23929, 24633)}


def _jpeg(path: Path, seed: int) -> Path:
    """A JPEG photograph of a size of its own (landscape or portrait, 9..40 px a side)."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(9, 41, 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, "JPEG", quality=95)
    return path


def _lines(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------- fake layouts
# each writer returns {split: [(file, label), ...]} in the order the set lists them, and the class names

def _write_aircraft(root: Path):
    data = root / "aircraft" / "fgvc-aircraft-2013b" / "data"
    classes = ["707-320", "A300B4", "Cessna 172"]          # a variant name may hold a space
    _lines(data / "variants.txt", [[c] for c in classes])
    rows = {"train": [("1025794", 2), ("0034309", 0), ("1340192", 1), ("0056978", 0)],
            "test": [("0062765", 1), ("1514522", 2)]}
    for split, name in (("train", "trainval"), ("test", "test")):
        _lines(data / f"images_variant_{name}.txt", [[i, classes[y]] for i, y in rows[split]])
    _lines(data / "images_variant_train.txt", [[i, classes[y]] for i, y in rows["train"][:2]])   # not read
    out = {s: [(_jpeg(data / "images" / f"{i}.jpg", int(i)), y) for i, y in r] for s, r in rows.items()}
    return out, classes


def _write_cars(root: Path):
    base = root / "cars" / "stanford_cars"
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object)[None]})
    rows = {"train": [("00001.jpg", 2), ("00002.jpg", 0), ("00003.jpg", 1), ("00004.jpg", 1)],
            "test": [("00001.jpg", 0), ("00002.jpg", 2)]}
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    out = {}
    for split, mat in (("train", base / "devkit" / "cars_train_annos.mat"),
                       ("test", base / "cars_test_annos_withlabels.mat")):
        ann = np.zeros(len(rows[split]), dtype=fields)
        for k, (f, y) in enumerate(rows[split]):
            ann[k] = (1, 1, 8, 8, y + 1, f)                  # published 1-based
        scipy.io.savemat(mat, {"annotations": ann[None]})
        out[split] = [(_jpeg(base / f"cars_{split}" / f, 100 * len(split) + k), y)
                      for k, (f, y) in enumerate(rows[split])]
    return out, classes


def _write_flowers(root: Path):
    base = root / "flowers" / "flowers-102"
    labels = [77, 1, 102, 1, 77, 50, 2]                       # image_00001 .. image_00007, 1-based
    for i in range(len(labels)):
        _jpeg(base / "jpg" / f"image_{i + 1:05d}.jpg", 300 + i)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    ids = {"trnid": [3, 1], "valid": [7, 4], "tstid": [2, 6, 5]}
    scipy.io.savemat(base / "setid.mat", {k: np.array([v]) for k, v in ids.items()})

    def rows(*keys):
        return [(base / "jpg" / f"image_{i:05d}.jpg", labels[i - 1] - 1) for k in keys for i in ids[k]]
    import torchvision.datasets as tvd

    return {"train": rows("trnid", "valid"), "test": rows("tstid")}, list(tvd.Flowers102.classes)


@pytest.fixture
def no_flowers_md5(monkeypatch):
    """torchvision checks the md5 of the real Flowers-102 .mat files; the fakes must pass on presence."""
    from torchvision.datasets import flowers102

    monkeypatch.setattr(flowers102, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())


def _write_listed(base: Path, classes: dict[int, str], images: list[tuple[str, str, int, int]], seed: int):
    """CUB's and NABirds' layout; images: (id, path under images/, class number, 1 = train)."""
    _lines(base / "classes.txt", [[c, n] for c, n in classes.items()])
    _lines(base / "images.txt", [[i, p] for i, p, _, _ in images])
    _lines(base / "image_class_labels.txt", [[i, c] for i, _, c, _ in images])
    _lines(base / "train_test_split.txt", [[i, t] for i, _, _, t in images])
    for k, (_, p, _, _) in enumerate(images):
        _jpeg(base / "images" / p, seed + k)


def _write_cub(root: Path):
    base = root / "cub" / "CUB_200_2011"
    classes = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross"}
    images = [("1", "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, 0),
              ("2", "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 1, 1),
              ("3", "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 2, 1),
              ("4", "003.Sooty_Albatross/Sooty_Albatross_0031_1066.jpg", 3, 0),
              ("5", "003.Sooty_Albatross/Sooty_Albatross_0079_796130.jpg", 3, 1)]
    _write_listed(base, classes, images, 500)
    split = {s: [(base / "images" / p, c - 1) for _, p, c, t in images if t == (s == "train")] for s in ("train", "test")}
    return split, list(classes.values())


def _write_nabirds(root: Path):
    base = root / "nabirds" / "nabirds"
    # classes.txt names the taxonomy's inner nodes too (0, 1, 295); only leaf species label images
    classes = {0: "Birds", 1: "Perching Birds", 295: "Tits and Chickadees", 817: "Oak Titmouse",
               313: "Black-capped Chickadee", 1000: "Common Raven"}
    images = [("0000139e-21dc-4d0c-bfe1-4cae3c85c829", "0817/0000139e21dc4d0cbfe14cae3c85c829.jpg", 817, 0),
              ("00007dcc-7b37-4b8a-a5e2-b2ad0a1ea12a", "0313/00007dcc7b374b8aa5e2b2ad0a1ea12a.jpg", 313, 1),
              ("0001afd4-8f8f-4bd3-a6c0-ed5e6a5d8a4b", "1000/0001afd48f8f4bd3a6c0ed5e6a5d8a4b.jpg", 1000, 1),
              ("00020ff4-7d14-4d2b-8c4b-8e2f2d3a0c11", "0817/00020ff47d144d2b8c4b8e2f2d3a0c11.jpg", 817, 1)]
    _write_listed(base, classes, images, 700)
    index = {313: 0, 817: 1, 1000: 2}                         # the species in numeric order
    split = {s: [(base / "images" / p, index[c]) for _, p, c, t in images if t == (s == "train")]
             for s in ("train", "test")}
    return split, ["Black-capped Chickadee", "Oak Titmouse", "Common Raven"]


def _write_dogs(root: Path):
    base = root / "dogs"
    classes = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02116738-African_hunting_dog"]
    rows = {"train": [(classes[2] + "/n02116738_10024.jpg", 2), (classes[0] + "/n02085620_5927.jpg", 0),
                      (classes[1] + "/n02085782_1039.jpg", 1)],
            "test": [(classes[0] + "/n02085620_2650.jpg", 0), (classes[2] + "/n02116738_4367.jpg", 2)]}
    out = {}
    for split, r in rows.items():
        scipy.io.savemat(base / f"{split}_list.mat" if base.exists() else _mkdir(base) / f"{split}_list.mat",
                         {"file_list": np.array([f for f, _ in r], dtype=object)[:, None],
                          "annotation_list": np.array([f[:-4] for f, _ in r], dtype=object)[:, None],
                          "labels": np.array([[y + 1.0] for _, y in r])})
        out[split] = [(_jpeg(base / "Images" / f, 900 + k + 10 * len(split)), y) for k, (f, y) in enumerate(r)]
    return out, classes


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


WRITERS = {"aircraft": _write_aircraft, "cars": _write_cars, "cub": _write_cub, "dogs": _write_dogs,
           "flowers": _write_flowers, "nabirds": _write_nabirds}


# ----------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", FGVC)
def test_each_set_loads_its_split_centre_cropped_as_guided_diffusion_reads_it(tmp_path, name, no_flowers_md5):
    expected, classes = WRITERS[name](tmp_path)
    for split, rows in expected.items():
        s = load_dataset(name, split, image_size=SIZE, root=tmp_path, download=False)
        assert s.name == name and s.classes == classes
        assert s.labels.tolist() == [y for _, y in rows]
        assert s.images.shape == (len(rows), 3, SIZE, SIZE)
        for got, (path, _) in zip(s.images, rows):
            assert np.array_equal(got.permute(1, 2, 0).numpy(), crop_file(path, SIZE)), path


def test_squash_still_reads_a_fine_grained_set_whole(tmp_path):
    expected, _ = _write_cub(tmp_path)
    s = load_dataset("cub", "test", image_size=SIZE, root=tmp_path, download=False, resize="squash")
    for got, (path, _) in zip(s.images, expected["test"]):
        with Image.open(path) as im:
            ref = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
        assert np.array_equal(got.permute(1, 2, 0).numpy(), ref)


def test_they_are_served_at_256_and_listed_with_table_5s_shape(tmp_path):
    for name, (classes, _, _) in TABLE_5.items():
        assert registered_spec(name, None) == (256, 3, classes)
        assert registered_spec(name, 64) == (64, 3, classes)
    rows = {r["name"]: r for r in describe_datasets(tmp_path)}
    for name, (classes, n_train, n_test) in TABLE_5.items():
        r = rows[name]
        assert r["size"] == "varies" and r["native_size"] is None and r["num_classes"] == classes
        assert f"{n_train:,}" in r["description"] and f"{n_test:,}" in r["description"] and not r["available"]
    _write_cub(tmp_path)
    assert {r["name"]: r for r in describe_datasets(tmp_path)}["cub"]["available"]
    _write_cub(tmp_path / "big")
    s = load_dataset("cub", "test", root=tmp_path / "big", download=False)
    assert s.images.shape == (2, 3, 256, 256)                 # upsampled: every fake is smaller


# the fragment of each refusal that says what to fetch
SOURCES = {"aircraft": "fgvc-aircraft-2013b.tar.gz", "cars": "cars_test_annos_withlabels.mat",
           "cub": "CUB_200_2011.tgz", "dogs": "lists.tar", "flowers": "setid.mat", "nabirds": "nabirds.tar.gz"}


@pytest.mark.parametrize("name", FGVC)
def test_missing_files_are_one_line_saying_what_to_get_and_nothing_is_downloaded(tmp_path, monkeypatch, name):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(GenrepError) as e:
        load_dataset(name, "test", root=tmp_path, download=True)
    msg = one_line(e)
    assert not calls and str(tmp_path / name) in msg and "cannot download" in msg and SOURCES[name] in msg


def test_damaged_lists_are_one_line(tmp_path):
    _write_cub(tmp_path)
    base = tmp_path / "cub" / "CUB_200_2011"
    (base / "train_test_split.txt").write_text("1 0\n2 1\n")
    with pytest.raises(GenrepError, match="image 3 of") as e:
        load_dataset("cub", root=tmp_path, download=False)
    assert "train_test_split.txt" in one_line(e)
    _write_listed(base, {1: "a"}, [("1", "a/1.jpg", 7, 1)], 0)
    with pytest.raises(GenrepError, match="class 7") as e:
        load_dataset("cub", root=tmp_path, download=False)
    assert "classes.txt" in one_line(e)
    (base / "image_class_labels.txt").write_text("1 seven\n")
    with pytest.raises(GenrepError, match="not a class number") as e:
        load_dataset("cub", root=tmp_path, download=False)
    one_line(e)
    (base / "images" / "a" / "1.jpg").write_bytes(b"not a jpeg")
    (base / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(GenrepError, match="corrupted or incomplete") as e:
        load_dataset("cub", root=tmp_path, download=False)
    assert "CUB_200_2011.tgz" in one_line(e)


def test_a_dogs_list_that_disagrees_with_the_breed_folders_is_one_line(tmp_path):
    _write_dogs(tmp_path)
    scipy.io.savemat(tmp_path / "dogs" / "test_list.mat",
                     {"file_list": np.array(["n02085620-Chihuahua/n02085620_2650.jpg"], dtype=object)[:, None],
                      "labels": np.array([[2.0]])})
    with pytest.raises(GenrepError) as e:
        load_dataset("dogs", "test", root=tmp_path, download=False)
    assert "breed folder 2" in one_line(e) and "n02085782-Japanese_spaniel" in one_line(e)
    scipy.io.savemat(tmp_path / "dogs" / "test_list.mat", {"files": np.zeros(2)})
    with pytest.raises(GenrepError, match="no 'file_list' and 'labels'") as e:
        load_dataset("dogs", "test", root=tmp_path, download=False)
    one_line(e)


def test_a_one_pixel_photograph_is_refused_naming_it_before_any_decoding(tmp_path, monkeypatch):
    from genrep.data import file_sets

    _write_cub(tmp_path)
    bad = tmp_path / "cub" / "CUB_200_2011" / "images" / "003.Sooty_Albatross" / "Sooty_Albatross_0031_1066.jpg"
    Image.new("RGB", (1, 1)).save(bad, "JPEG")
    decoded = []
    real_crop = file_sets.center_crop_pil
    monkeypatch.setattr(file_sets, "center_crop_pil", lambda im, size: decoded.append(1) or real_crop(im, size))
    with pytest.raises(GenrepError) as e:
        load_dataset("cub", "test", image_size=SIZE, root=tmp_path, download=False)
    msg = one_line(e)
    assert msg.startswith(f"cub: {bad} is 1x1 pixels;") and "remove or replace it" in msg and not decoded


# ----------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", FGVC)
def test_each_recipe_reads_the_imagenet_unet_on_its_set_at_256_centre_cropped(name):
    cfg = resolve_config(f"adm-finegrained-{name}")
    assert (cfg.method, cfg.data.name, cfg.data.image_size, cfg.data.resize) == ("adm", name, 256, "center_crop")
    assert load_recipe(f"adm-finegrained-{name}")["model"] == load_recipe("adm-imagenet256")["model"]
    assert cfg.eval.sweep.blocks == [15, 19, 24] and cfg.eval.sweep.pools == ["1", "2", "4", "8"]
    header = [line for line in (Path(__file__).parents[1] / "src" / "genrep" / "recipes" /
                                f"adm-finegrained-{name}.yaml").read_text().splitlines() if line.startswith("#")]
    classes, n_train, n_test = TABLE_5[name]
    text = " ".join(header)
    assert "table 5" in text and f"{n_train:,} train" in text and f"{n_test:,} test" in text and str(classes) in text


def test_a_user_probes_the_imagenet_unet_on_cub_through_its_recipe(tmp_path, one_torch_thread, capsys):
    """genrep pretrain --recipe adm-finegrained-cub --model.pretrained U --data.root R, then genrep probe RUN: a tiny
    U-Net of the recipe's kind (learned sigma, a frozen file) on the fake CUB."""
    from genrep.cli import main
    from genrep.methods import DataSpec
    from genrep.methods.adm import unet_kwargs
    from genrep.nn.unet import UNet
    from genrep.train.loop import pretrain

    _write_cub(tmp_path / "data")
    tiny = {"model.num_channels": 32, "model.num_res_blocks": 1, "model.channel_mult": [1, 2],
            "model.attention_resolutions": [4], "model.num_head_channels": 32, "model.feature_layer": 8,
            "model.pretrained": str(tmp_path / "unet.pt"), "data.image_size": 8, "data.root": str(tmp_path / "data"),
            "train.device": "cpu", "train.progress": False, "train.batch_size": 3}
    cfg = resolve_config("adm-finegrained-cub", tiny)
    torch.manual_seed(0)
    torch.save(UNet(**unet_kwargs(cfg.model, DataSpec(8, 3, 3))).state_dict(), tmp_path / "unet.pt")
    assert pretrain(cfg, tmp_path / "run").steps == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (written["name"], written["resize"]) == ("cub", "center_crop")
    capsys.readouterr()
    assert main(["probe", str(tmp_path / "run"), "--device", "cpu", "--probe.weight_decay", "1e-3",
                 "--probe.knn_k", "1", "--probe.heads", "[]", "--probe.head.epochs", "1"]) == 0
    out = capsys.readouterr().out  # the recipe's headline, the paper's linear head, is trained whatever heads says
    assert "linear probe" in out and "linear head" in out
