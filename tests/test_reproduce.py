"""`genrep reproduce` (issue 30): every shipped spec checks (its recipes, keys, metric, comparison); a spec runs end to
end at its smoke scale, resumes, and its verdict is the claim's ordering in words; bad specs and requests are one
line before anything is trained."""

import copy
import json

import pytest
import yaml
from conftest import one_line

from genrep.cli import main
from genrep.errors import GenrepError
from genrep.reproduce import SPECS, cell_config, check_spec, eval_config, load_spec, spec_names, summarise

GOOD = yaml.safe_load((SPECS / "hybvit" / "table1-accuracy.yaml").read_text())


@pytest.mark.parametrize("name", spec_names())
def test_every_shipped_spec_checks_and_lists(name):
    spec = load_spec(name)   # recipes exist at every scale, one method a row, overrides and eval keys valid
    assert spec.table and spec.claim and spec.title
    if spec.runnable:
        # smoke is digits: a spec whose data digits cannot stand in for (SVHN as OOD) defines reduced and paper only;
        # a row with no recipe at the paper's size (DARL's supervised ViT on ImageNet) defines smoke and reduced
        assert "reduced" in spec.scales and len(spec.scales) >= 2
        assert all(spec.scales[s]["about"] for s in spec.scales)
    else:
        assert spec.why and not spec.rows


def test_the_list_names_every_spec_and_whether_it_runs(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name in spec_names():
        spec = load_spec(name)
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert ("runnable (" in line) == spec.runnable and (spec.runnable or spec.why in line)


def _bad(change) -> str:
    doc = copy.deepcopy(GOOD)
    change(doc)
    with pytest.raises(GenrepError) as e:
        check_spec("hybvit/table1-accuracy", doc)
    return one_line(e)


def test_a_spec_that_no_longer_fits_genrep_is_named_in_one_line():
    assert "recipe hybvit-gone no longer exists" in _bad(
        lambda d: d["rows"][1]["recipe"].update(smoke="hybvit-gone"))
    assert "must read protocols.<one of the spec's protocols (calibration)>" in _bad(
        lambda d: d["metric"].update(key="protocols.ood.scores.msp.noise.auroc"))
    assert "is hybvit at smoke, supervised at reduced" in _bad(
        lambda d: d["rows"][1]["recipe"].update(reduced="supervised-cifar10"))
    assert "comparison must list two or more of the rows" in _bad(lambda d: d.update(comparison=["vit", "jem"]))
    assert "unknown config key" in _bad(lambda d: d["scales"]["smoke"]["overrides"].update({"train.epoch": 3}))
    assert "status 'needs data' needs why" in _bad(lambda d: d.update(status="needs data"))
    assert "metric.better 'up' must be higher or lower" in _bad(lambda d: d["metric"].update(better="up"))


@pytest.mark.parametrize("args, message", [
    (["hybvit/nope"], "no reproduction spec 'hybvit/nope'; choose one of hybvit/figure6-ece"),
    (["hybvit/table1"], "choose one of hybvit/table1-accuracy, hybvit/table1-fid, hybvit/table1-is (genrep"),
    (["hybvit/table1-accuracy", "--scale", "cpu"], "defines no scale 'cpu'; choose smoke or reduced or paper"),
    (["hybvit/table1-accuracy", "--seeds", "0"], "--seeds must be a whole number of at least 1"),
    (["hybvit/table1-accuracy", "--scale", "huge"], "defines no scale 'huge'; choose smoke or reduced or paper"),
    ([], "genrep reproduce needs a spec"),
])
def test_bad_requests_are_one_line_before_anything_is_made(capsys, tmp_path, args, message):
    assert main(["reproduce", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "out").exists()


def _spec_of(rows_best_first, better="higher"):
    doc = copy.deepcopy(GOOD)
    doc["metric"]["better"] = better
    doc["comparison"] = rows_best_first
    return check_spec("hybvit/table1-accuracy", doc)


@pytest.mark.parametrize("values, better, result", [
    ({"vit": [90.0, 91.0], "hybvit": [80.0, 81.0]}, "higher", "holds"),
    ({"vit": [80.0, 81.0], "hybvit": [90.0, 91.0]}, "higher", "does not hold"),
    ({"vit": [80.0, 90.0], "hybvit": [84.0, 86.0]}, "higher", "within noise"),   # 0 apart, spread 10
    ({"vit": [0.02], "hybvit": [0.05]}, "lower", "holds"),                       # one seed: no noise measured
])
def test_the_verdict_is_the_claims_ordering_against_the_seeds_spread(values, better, result):
    s = summarise(_spec_of(["vit", "hybvit"], better), values)
    assert s["verdict"]["result"] == result
    assert s["rows"]["vit"]["paper"] == 96.5 and s["rows"]["vit"]["mean"] == pytest.approx(sum(values["vit"]) /
                                                                                          len(values["vit"]))
    if len(values["vit"]) == 1:
        assert "one seed: noise not measured" in s["verdict"]["words"] and s["rows"]["vit"]["std"] is None


def test_a_spec_runs_end_to_end_at_smoke_scale_and_resumes(tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "hybvit/table1-accuracy", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "verdict at this scale:" in text and "vit-seed0: trained" in text
    doc = json.loads((out / "reproduce.json").read_text())
    assert doc["finished"] and doc["scale"] == "smoke" and doc["runs"] == {"vit": ["vit-seed0"],
                                                                          "hybvit": ["hybvit-seed0"]}
    for name, paper in (("vit", 96.5), ("hybvit", 95.9)):
        row = doc["rows"][name]
        ev = json.loads((out / f"{name}-seed0" / "results" / "eval.json").read_text())
        assert row["values"] == [100 * ev["protocols"]["calibration"]["accuracy"]] and row["paper"] == paper
        assert row["difference"] == pytest.approx(row["mean"] - paper)
    assert doc["verdict"]["result"] in ("holds", "does not hold")
    page = (out / "reproduce.html").read_text()
    assert doc["claim"] in page and "Verdict at this scale" in page
    # the same command again trains and evaluates nothing: every row is kept
    assert main(["reproduce", "hybvit/table1-accuracy", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("kept, results kept") == 2
    assert json.loads((out / "reproduce.json").read_text())["rows"] == doc["rows"]

    # a second spec whose rows are these runs' configs: copied from them (--reuse), evaluated, never trained
    source_eval = (out / "vit-seed0" / "results" / "eval.json").read_bytes()
    ood = tmp_path / "ood"
    assert main(["reproduce", "hybvit/table3-ood-interp", "--out", str(ood), "--reuse", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert ": trained" not in text and text.count("(trained with the same config)") == 2
    doc = json.loads((ood / "reproduce.json").read_text())
    assert doc["finished"] and doc["copied"] == {f"{r}-seed0": str(out / f"{r}-seed0") for r in ("vit", "hybvit")}
    for name in ("vit", "hybvit"):
        ev = json.loads((ood / f"{name}-seed0" / "results" / "eval.json").read_text())
        assert doc["rows"][name]["values"] == [ev["protocols"]["ood"]["scores"]["energy"]["interp"]["auroc"]]
    assert doc["verdict"]["result"] in ("holds", "does not hold")
    assert (out / "vit-seed0" / "results" / "eval.json").read_bytes() == source_eval   # the source is only read
    assert f"vit-seed0 (copied from {out / 'vit-seed0'})" in (ood / "reproduce.html").read_text()


def test_an_out_folder_that_is_not_this_reproduction_is_refused(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert main(["reproduce", "hybvit/table1-accuracy", "--out", str(theirs)]) == 2
    assert "was not made by genrep reproduce" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "reproduce.json").write_text(json.dumps({"format": "genrep-reproduce-1", "spec": "hybvit/x",
                                                      "scale": "smoke", "rows": {}}))
    assert main(["reproduce", "hybvit/table1-accuracy", "--out", str(other)]) == 2
    assert "holds the reproduction of hybvit/x at scale smoke" in capsys.readouterr().err
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in other.iterdir()) == ["reproduce.json"]



def test_reuse_must_name_reproductions(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for where, said in ((tmp_path / "empty", "holds no genrep reproduction"), (tmp_path / "nothing", "is not a folder")):
        assert main(["reproduce", "hybvit/table1-accuracy", "--out", str(tmp_path / "out"), "--reuse", str(where)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err
    assert not (tmp_path / "out").exists()


def test_a_scale_override_of_a_row_holds_at_that_scale_only_and_data_names_a_copy():
    spec = load_spec("gcrl/table4-linear")
    gcrl = next(r for r in spec.rows if r.name == "gcrl")
    assert cell_config(spec, gcrl, "cpu", 0).model.encoder_depth == 2
    assert cell_config(spec, gcrl, "reduced", 0).model.encoder_depth == 6
    assert cell_config(spec, gcrl, "cpu", 0, data="npz:c10.npz").data.name == "npz:c10.npz"
    assert "scale_overrides must map some of the spec's scales" in _bad(
        lambda d: d["rows"][0].update(scale_overrides={"cpu": {"train.epochs": 2}}))


@pytest.mark.parametrize("name", [n for n in spec_names() if "smoke" in load_spec(n).scales])
def test_every_smoke_scale_reads_only_what_genrep_ships_or_makes(name):
    """Smoke runs on a fresh machine with no network: digits, and OOD sets genrep generates."""
    from genrep.eval.ood_sets import GENERATED

    spec = load_spec(name)
    for row in spec.rows:
        cfg = cell_config(spec, row, "smoke", 0)
        ev = eval_config(spec, row, "smoke", cfg)
        assert cfg.data.name == "digits"
        if ev is not None:
            assert set(ev.ood.sets) <= set(GENERATED) and ev.transfer_data in (None, "", "digits")


def test_a_row_that_could_not_start_stops_the_reproduction_before_any_row_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # no runs/vq-digits here: GVP-p2d's tokenizer run is missing
    assert main(["reproduce", "gvp/table1-linear", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row gvp-p2d at scale smoke: model.tokenizer runs/vq-digits is not a folder" in err
    assert not (tmp_path / "out").exists()


def test_reuse_skips_a_run_whose_config_this_genrep_cannot_read(tmp_path):
    """Another genrep version's run (a key this one does not know) is no row's config: skipped, not fatal."""
    from genrep.reproduce import finished_runs
    from genrep.runs import CONFIG_FILE, mark_run

    repro = tmp_path / "repro"
    (repro / "vit-seed0").mkdir(parents=True)
    mark_run(repro / "vit-seed0")
    (repro / "vit-seed0" / CONFIG_FILE).write_text("method: supervised\ndata:\n  name: digits\n  from_the_future: 1\n")
    (repro / "reproduce.json").write_text(json.dumps({"format": "genrep-reproduce-1", "spec": "hybvit/x",
                                                      "scale": "smoke", "rows": {}, "runs": {"vit": ["vit-seed0"]}}))
    assert finished_runs([tmp_path]) == [] and finished_runs([repro]) == []
