"""`genrep report` embeds only PNG files inside the run folder: an eval.json naming any other file (a system
file, a ../ path, a symlink out of the run, a file that is not a PNG) gets a "figure not shown" note, never
its bytes in the page, and the report is still written."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from genrep.eval.report.report import write_report

FIXTURE = Path(__file__).parent / "fixtures" / "run-v1"
SECRET = b"genrep-report-secret-0123456789"


def _png(path: Path, colour=(200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), colour).save(path, format="PNG")
    return path.read_bytes()


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _name_figures(run: Path, figures: dict) -> None:
    """Replace every protocol's figures by ``figures`` under the calibration protocol."""
    path = run / "results" / "eval.json"
    d = json.loads(path.read_text())
    for p in d["protocols"].values():
        p.pop("figures", None)
    d["protocols"]["calibration"]["figures"] = figures
    path.write_text(json.dumps(d))


@pytest.fixture
def run(tmp_path) -> Path:
    run = tmp_path / "runs" / "run-v1"
    shutil.copytree(FIXTURE, run)
    return run


def _report(run: Path, tmp_path: Path, capsys) -> tuple[str, str]:
    page = write_report([run], tmp_path / "report.html").read_text()
    return page, capsys.readouterr().err


def test_a_png_inside_the_run_is_embedded(run, tmp_path, capsys):
    data = _png(run / "figures" / "eval" / "reliability.png")
    _name_figures(run, {"reliability diagram": "figures/eval/reliability.png",
                        "the same, absolute": str(run / "figures" / "eval" / "reliability.png")})
    page, err = _report(run, tmp_path, capsys)
    assert page.count(_uri(data)) == 2 and "figure not shown" not in page and err == ""


def test_a_symlink_inside_the_run_to_a_png_inside_it_is_embedded(run, tmp_path, capsys):
    data = _png(run / "figures" / "eval" / "reliability.png")
    (run / "figures" / "link.png").symlink_to(Path("eval") / "reliability.png")
    _name_figures(run, {"linked": "figures/link.png"})
    page, _ = _report(run, tmp_path, capsys)
    assert _uri(data) in page


@pytest.mark.skipif(not Path("/etc/hostname").is_file(), reason="no /etc/hostname here")
def test_a_system_file_is_not_embedded(run, tmp_path, capsys):
    _name_figures(run, {"hostname": "/etc/hostname", "up and out": "../../../../../../../../etc/hostname"})
    page, err = _report(run, tmp_path, capsys)
    host = Path("/etc/hostname").read_bytes()
    assert base64.b64encode(host).decode() not in page and "data:image" not in page
    assert page.count("figure not shown") == 2 and page.count("resolves outside the run folder") == 2
    lines = err.splitlines()
    assert len(lines) == 2 and all("figure not shown" in line and "outside the run" in line for line in lines)


def test_a_dotdot_path_to_a_png_outside_the_run_is_not_embedded(run, tmp_path, capsys):
    outside = _png(tmp_path / "runs" / "elsewhere.png")
    _name_figures(run, {"sibling": "../elsewhere.png", "sneaky": "figures/../../elsewhere.png"})
    page, _ = _report(run, tmp_path, capsys)
    assert _uri(outside) not in page and "data:image" not in page
    assert page.count("figure not shown") == 2


def test_a_file_inside_the_run_that_is_not_a_png_is_not_embedded(run, tmp_path, capsys):
    fake = run / "figures" / "eval" / "fake.png"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(SECRET)
    half = run / "figures" / "eval" / "half.png"   # the signature and IHDR, then garbage
    half.write_bytes(_png(tmp_path / "x.png")[:16] + SECRET)
    _name_figures(run, {"config": str(run / "config.yaml"), "fake": "figures/eval/fake.png",
                        "half": "figures/eval/half.png", "folder": "figures/eval"})
    page, err = _report(run, tmp_path, capsys)
    assert "data:image" not in page and base64.b64encode(SECRET).decode()[:20] not in page
    assert page.count("figure not shown") == 4 and "is not a PNG image" in page
    assert "does not decode as a PNG" in page and "is not a regular file" in page
    assert len(err.splitlines()) == 4


def test_a_symlink_in_figures_pointing_outside_is_not_embedded(run, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    outside_png = _png(tmp_path / "outside.png")
    figs = run / "figures"
    figs.mkdir()
    (figs / "secret.png").symlink_to(secret)
    (figs / "outside.png").symlink_to(tmp_path / "outside.png")   # a real PNG, but not the run's
    (figs / "summary.png").symlink_to(tmp_path / "outside.png")   # the training summary is checked too
    (figs / "hop.png").symlink_to("secret.png")                   # a chain of links ends outside
    _name_figures(run, {"secret": "figures/secret.png", "outside": "figures/outside.png",
                        "hop": "figures/hop.png"})
    page, err = _report(run, tmp_path, capsys)
    assert _uri(outside_png) not in page and "data:image" not in page
    assert base64.b64encode(SECRET).decode()[:20] not in page
    assert page.count("figure not shown") == 4 and len(err.splitlines()) == 4


def test_odd_entries_are_notes_not_crashes(run, tmp_path, capsys):
    _name_figures(run, {"number": 3, "empty": "", "nul": "figures/a\x00b.png", "newline": "../a\nb.png",
                        "missing": "figures/eval/not-there.png"})
    d = json.loads((run / "results" / "eval.json").read_text())
    d["protocols"]["ood"]["figures"] = ["figures/eval/x.png"]
    (run / "results" / "eval.json").write_text(json.dumps(d))
    page, err = _report(run, tmp_path, capsys)
    assert "missing figure figures/eval/not-there.png" in page
    assert page.count("figure not shown") == 5 and "not a caption-to-path mapping" in page
    assert len(err.splitlines()) == 5   # one line each, even for the entry holding a newline


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_does_not_hang_the_report(run, tmp_path, capsys):
    (run / "figures").mkdir()
    os.mkfifo(run / "figures" / "pipe.png")
    _name_figures(run, {"pipe": "figures/pipe.png"})
    page, _ = _report(run, tmp_path, capsys)
    assert "is not a regular file" in page


def test_the_cli_writes_the_report_and_warns(run, tmp_path):
    data = _png(run / "figures" / "eval" / "reliability.png")
    _name_figures(run, {"ok": "figures/eval/reliability.png", "escape": "../../../../../../../../etc/passwd"})
    out = tmp_path / "r.html"
    proc = run_cli("report", str(run), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert _uri(data) in page and page.count("data:image") == 1 and "figure not shown" in page
    warn = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warn) == 1 and "figure not shown" in warn[0] and "Traceback" not in proc.stderr
