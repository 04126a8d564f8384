"""`recon-eval report`: one static HTML page, checked in a real headless Chromium (system package; `make browser`).

The browser is required, not optional: a missing Chromium fails the test with the command that installs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from brainrecon.errors import MissingFileError
from brainrecon.report import build_report, fmt, html_table
from tests.browser import run_chromium as _browser

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def dump_dom(index: Path, profile: Path) -> str:
    res = _browser(["--dump-dom", index.resolve().as_uri()], profile)
    assert res.returncode == 0 and "<body" in res.stdout, res.stderr[-2000:]
    return res.stdout


class _Dom(HTMLParser):
    """Tables (id -> rows of {key: (data-value, data-std, text)}), <img> sources and <body> attributes."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.images: list[str] = []
        self.body: dict[str, str] = {}
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = {}
        elif tag == "td" and self._row is not None:
            self._cell = [a.get("data-key"), a.get("data-value"), a.get("data-std"), ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[3] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            key, value, std, text = self._cell
            self._row[key] = (value, std, text.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def parse(dom: str) -> _Dom:
    p = _Dom()
    p.feed(dom)
    return p


@pytest.fixture(scope="module")
def report(tiny2, tmp_path_factory) -> dict:
    """The report of the tiny exported subject over a copy of the committed results (and a recon folder)."""
    root = tmp_path_factory.mktemp("report")
    results = root / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("models", "*.tmp"))
    recon = root / "recon"
    recon.mkdir()
    shutil.copyfile(RESULTS / "demo_contact_sheet.png", recon / "contact_sheet.png")
    (recon / "metrics.json").write_text(
        json.dumps(
            {
                "stage1": {"pixcorr": 0.5, "ssim": 0.9, "clip_2way": 0.7},
                "final": {"pixcorr": 0.31234, "ssim": 0.91, "clip_2way": 0.8},
            }
        )
    )
    out = root / "report"
    index = build_report(tiny2["model"], out, results=results, recon=recon)
    return {"index": index, "out": out, "results": results, "profile": root / "profile"}


@pytest.fixture(scope="module")
def dom(report) -> _Dom:
    return parse(dump_dom(report["index"], report["profile"]))


@pytest.mark.browser
def test_report_renders_and_every_image_loads(report, dom):
    plots = sum(
        (report["results"] / p).is_file()
        for p in (
            "noise/noise.png",
            "layers/layers.png",
            "stage2_runtime_curves.png",
            "real_size_unet_curve.png",
            "foundations/training_curves.png",
        )
    )
    assert len(dom.images) >= 3 + plots  # contact sheet, stage 1 and 2 sheets, the experiment plots
    assert all(src.startswith("images/") for src in dom.images)
    assert dom.body.get("data-images-total") == str(len(dom.images))
    assert dom.body.get("data-images-loaded") == str(len(dom.images))
    sections = set(dom.body["data-sections"].split())
    assert {"model", "final", "stage1", "stage2", "speed"} <= sections
    committed = {
        "noise": "noise/noise.json",
        "layers": "layers/layers.json",
        "blob": "blob/blob.json",
        "foundations": "foundations/training.json",
    }
    for name, json_name in committed.items():  # each committed experiment has its section
        assert (name in sections) == (report["results"] / json_name).is_file()


@pytest.mark.browser
def test_report_screenshot_is_not_blank(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    res = _browser(
        [f"--screenshot={shot}", "--window-size=1280,2400", report["index"].resolve().as_uri()],
        report["profile"],
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20  # text, tables and images, not an empty white page
    assert (pixels < 128).mean() > 0.01


def _check_cells(rows_dom: list[dict], rows_json: list[dict], keys: list[str], pm: bool = False) -> int:
    assert len(rows_dom) == len(rows_json)
    checked = 0
    for row_dom, row_json in zip(rows_dom, rows_json, strict=True):
        for key in keys:
            value = row_json.get(key)
            if value is None:
                continue
            shown_value, shown_std, text = row_dom[key]
            assert float(shown_value) == pytest.approx(float(value), abs=1e-12)
            if pm:
                std = row_json[f"{key}_std"]
                assert float(shown_std) == pytest.approx(std) and text == f"{value:.3f} ± {std:.3f}"
            else:
                assert text == fmt(value, "num")
            checked += 1
    return checked


@pytest.mark.browser
def test_report_tables_show_the_json_numbers(report, dom):
    results = report["results"]
    stage2 = json.loads((results / "stage2" / "stage2.json").read_text())
    assert _check_cells(dom.tables["stage2-table"], stage2["rows"], ["pixcorr", "ssim", "clip_2way"]) >= 27
    oracle = [r for r in dom.tables["stage2-table"] if r["run"][2].startswith("oracle")]
    assert oracle  # the controls are on the page
    # Brain-Diffuser's eight columns: the committed results carry PixCorr and SSIM (no weights here)
    computed = stage2["paper_metrics"]["computed"]
    paper_rows = [{f"paper_{m}": r["paper"].get(m) for m in computed} for r in stage2["rows"]]
    keys = [f"paper_{m}" for m in computed]
    assert (
        _check_cells(dom.tables["stage2-paper-table"], paper_rows, keys) == len(keys) * len(paper_rows) >= 20
    )
    assert all(r["paper_swav"][2] == "" for r in dom.tables["stage2-paper-table"])  # not computed: empty
    stage1 = json.loads((results / "stage1" / "stage1.json").read_text())
    assert _check_cells(dom.tables["stage1-table"], stage1["rows"], ["pixcorr", "ssim"]) >= 6
    final = dom.tables["final-metrics"]
    assert [r["stage"][2] for r in final] == ["stage1", "final"] and final[1]["pixcorr"][2] == "0.312"
    if (results / "noise" / "noise.json").is_file():
        noise = json.loads((results / "noise" / "noise.json").read_text())
        assert _check_cells(
            dom.tables["noise-table"], noise["summary"], ["pixcorr", "ssim", "clip_2way"], pm=True
        )
    if (results / "layers" / "layers.json").is_file():
        layers = json.loads((results / "layers" / "layers.json").read_text())
        assert (
            _check_cells(dom.tables["layers-table"], layers["rows"], ["pixcorr", "ssim", "clip_2way"]) >= 15
        )
    if "recurring_error" in stage2["rows"][0]:
        assert _check_cells(dom.tables["stage2-table"], stage2["rows"], ["recurring_error"]) >= 9
    if (results / "foundations" / "training.json").is_file():
        runs = json.loads((results / "foundations" / "training.json").read_text())["runs"]
        shown = {r["run"][2]: r for r in dom.tables["foundations-table"]}
        assert set(shown) == set(runs)
        for label, run in runs.items():
            assert int(shown[label]["steps"][0]) == run["steps"]
            assert float(shown[label]["loss"][0]) == pytest.approx(run["curves"]["loss"][-1], abs=1e-12)
    speed = dom.tables["speed-table"]
    assert speed and all(float(r["seconds"][0]) > 0 for r in speed)
    real = json.loads((results / "real_size.json").read_text())["models"]
    shown = dom.tables["real-size-table"]
    assert len(shown) >= 8  # both precisions of the models measured so far
    for row in shown:
        latency = real[row["model"][2]][row["precision"][2]]["latency"]
        assert float(row["batch1_s"][0]) == pytest.approx(latency["1"]["median_s"], abs=1e-12)
        assert float(row["batch2_s"][0]) == pytest.approx(latency["2"]["median_s"], abs=1e-12)
    sizes = {r["foundation"][2]: float(r["megabytes"][0]) for r in dom.tables["foundations"]}
    assert (
        set(sizes) >= {"unet-small", "vae-small", "clip-small", "vdvae-small64"} and sum(sizes.values()) <= 40
    )


@pytest.mark.browser
def test_exported_model_table_has_every_manifest_file_and_no_empty_cell(tiny2, dom):
    """One row per manifest artifact, in order; no cell blank; MB is the manifest's `size` / 1e6 (data-value holds
    the unrounded number; the text is it to 3 decimals). An empty cell (a field the manifest does not have, as
    the `bytes` the report once read) fails here even where no number is shown."""
    artifacts = json.loads((tiny2["model"] / "manifest.json").read_text())["artifacts"]
    shown = dom.tables["artifacts"]
    assert len(shown) == len(artifacts) and any(a["kind"] == "data" for a in artifacts)
    for row, artifact in zip(shown, artifacts, strict=True):
        assert set(row) == {"file", "kind", "model", "precision", "megabytes"}
        assert all(text for _, _, text in row.values()), row  # no blank cell
        assert row["file"][2] == artifact["path"] and row["kind"][2] == artifact["kind"]
        assert row["model"][2] == (artifact.get("model") or "n/a")
        assert row["precision"][2] == (artifact.get("precision") or "n/a")
        assert float(row["megabytes"][0]) == pytest.approx(artifact["size"] / 1e6, rel=1e-12)
        assert row["megabytes"][2] == f"{artifact['size'] / 1e6:.3f}"


@pytest.mark.browser
def test_speed_table_trials_are_the_benchmarks_row_count(report, dom):
    """The `trials` column is the number of betas rows each benchmark ran (`betas.shape[0]` of its JSON), read
    here from the JSON on its own: not the voxel count (`shape[1]`), not blank."""
    expected = {}
    for name in ("stage1_runtime", "stage2_runtime"):
        data = json.loads((report["results"] / f"{name}.json").read_text())
        rows, voxels = data["betas"]["shape"]
        assert rows != voxels  # else this test could not tell them apart
        expected[name] = rows
    speed = dom.tables["speed-table"]
    assert {r["benchmark"][2] for r in speed} == set(expected)
    for row in speed:
        assert int(row["trials"][0]) == expected[row["benchmark"][2]]
        assert row["trials"][2] == f"{expected[row['benchmark'][2]]:,}"


@pytest.mark.browser
def test_a_broken_image_is_detected(report, tmp_path):
    """The page's own check can fail: a corrupted copy of one image is counted as not loaded."""
    out = tmp_path / "broken"
    shutil.copytree(report["out"], out)
    victim = sorted((out / "images").iterdir())[0]
    victim.write_bytes(b"not a png")
    dom = parse(dump_dom(out / "index.html", tmp_path / "profile"))
    assert int(dom.body["data-images-loaded"]) == int(dom.body["data-images-total"]) - 1


def test_report_is_offline_and_escaped(report):
    text = report["index"].read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from a network
    table = html_table([{"name": "<b>x</b>", "v": 0.12345}], [("name", "n", "text"), ("v", "v", "num")], "t")
    assert "&lt;b&gt;x&lt;/b&gt;" in table and 'data-value="0.12345">0.123<' in table
    assert fmt(1234567, "int") == "1,234,567" and fmt(None, "num") == ""


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(MissingFileError, match="subject model folder"):
        build_report(tmp_path / "nope", tmp_path / "out")
    res = subprocess.run(
        [
            Path(sys.executable).parent / "recon-eval",
            "report",
            "--model-dir",
            tmp_path / "nope",
            "--out",
            tmp_path / "o",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error:")
