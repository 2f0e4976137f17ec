"""The replay report a person reads: effective config and model files, events with key-frame
thumbnails and the rule that fired, linear plots from 0, and a page that says how to get plots
when matplotlib is missing. Every report here comes from a real replay of the bundled sample."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import cv2
import numpy as np
import pytest

from edgekeeper import config as config_mod
from edgekeeper.cli import main
from edgekeeper.device import report as report_mod
from edgekeeper.device.replay import THUMBNAIL_WIDTH, replay_recording

pytestmark = pytest.mark.slow  # CI runs it on the main Python only (.ci/run)

STREET = config_mod.MODELS_DIR / "samples" / "street"


def _shipped_tag(name: str) -> str:
    """name@version of a shipped model, read from its manifest (a rebuild bumps the version)."""
    doc = json.loads((config_mod.MODELS_DIR / name / "manifest-int8.json").read_text())
    return f"{doc['name']}@{doc['version']}"


PERSON, SOUND = _shipped_tag("person"), _shipped_tag("sound")

# The float model, and a person rule strict enough (release = threshold, 1-of-1) that the
# person's dips release it and the 60 s cooldown holds back every re-activation. The shipped
# model scores the sample's person 0.96-1.0, so the rule sits just below 1.
FLOAT_HOLD_TOML = """
[gate]
variant = "float"

[trigger]
k = 1
n = 1

[trigger.labels.person]
threshold = 0.99
release = 0.99
cooldown_seconds = 60
"""


def replay(report: Path, *paths: Path, config: Path | None = None) -> dict[str, Any]:
    argv = ["--config", str(config)] if config is not None else []
    argv += ["replay", *map(str, paths), "--report", str(report), "--no-progress", "--json"]
    assert main(argv) == 0
    data: dict[str, Any] = json.loads((report / "report.json").read_text())
    return data


@pytest.fixture(scope="module")
def street(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole sample (video and audio) with the default config: int8 models."""
    out = tmp_path_factory.mktemp("street") / "report"
    replay(out, STREET)
    return out


@pytest.fixture(scope="module")
def float_hold(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("float")
    (root / "device.toml").write_text(FLOAT_HOLD_TOML)
    replay(root / "report", STREET / "video.avi", config=root / "device.toml")
    return root / "report"


@dataclasses.dataclass
class Cell:
    text: str = ""
    imgs: list[dict[str, str]] = dataclasses.field(default_factory=list)
    hrefs: list[str] = dataclasses.field(default_factory=list)


class Page(HTMLParser):
    """The page's visible text, and each classed table's body rows as cells."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[Cell]]] = {}
        self.text_parts: list[str] = []
        self._table: str | None = None
        self._in_body = False
        self._cell: Cell | None = None
        self._skip = 0
        self.feed(html)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.text_parts).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("style", "title"):
            self._skip += 1
        elif tag == "table" and a.get("class"):
            self._table = a["class"]
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table and self._in_body:
            self.tables[self._table].append([])
        elif tag == "td" and self._table and self._in_body:
            self._cell = Cell()
            self.tables[self._table][-1].append(self._cell)
        elif tag == "img" and self._cell is not None:
            self._cell.imgs.append(a)
        elif tag == "a" and self._cell is not None:
            self._cell.hrefs.append(a.get("href", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "title"):
            self._skip -= 1
        elif tag == "table":
            self._table, self._in_body = None, False
        elif tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text_parts.append(data)
        if self._cell is not None:
            self._cell.text += data


def page(report: Path) -> Page:
    return Page((report / "report.html").read_text(encoding="utf-8"))


def test_report_json_records_effective_config_variant_and_file_hashes(
    street: Path, float_hold: Path
) -> None:
    a = json.loads((street / "report.json").read_text())
    b = json.loads((float_hold / "report.json").read_text())
    assert a["schema"] == b["schema"] == report_mod.SCHEMA

    # Effective values, not the file's name: defaults in one, the file's overrides in the other.
    defaults = config_mod.Config()
    assert a["config"]["source"] == "defaults"
    assert a["config"]["trigger"] == dataclasses.asdict(defaults.trigger)
    assert a["config"]["pregate"] == dataclasses.asdict(defaults.pregate)
    assert a["config"]["gate"]["variant"] == "int8"
    assert b["config"]["source"].endswith("device.toml")
    assert b["config"]["gate"]["variant"] == "float"
    assert b["config"]["trigger"] == dataclasses.asdict(
        config_mod.load(b["config"]["source"], env={}).trigger
    )
    assert b["config"]["trigger"]["k"] == b["config"]["trigger"]["n"] == 1
    person = b["config"]["trigger"]["labels"]["person"]
    assert (person["threshold"], person["release"], person["cooldown_seconds"]) == (0.99, 0.99, 60)
    # Credentials and addresses stay out of a report people pass around.
    assert not {"uplink", "cloud", "reasoner", "device"} & set(a["config"])

    ga, gb = a["runs"][0]["gates"], b["runs"][0]["gates"]
    assert set(ga) == {"vision", "audio"} and set(gb) == {"vision"}
    va, vb = ga["vision"], gb["vision"]
    # The tag alone cannot tell them apart; variant, manifest and hashes do.
    assert va["tag"] == vb["tag"] == PERSON
    assert (va["variant"], vb["variant"]) == ("int8", "float")
    assert Path(va["manifest"]).name == "manifest-int8.json"
    assert Path(vb["manifest"]).name == "manifest-float.json"
    for gate in (*ga.values(), *gb.values()):
        roles = [f["role"] for f in gate["files"]]
        assert roles[:2] == ["manifest", "labels"] and roles[2] == "stage 0"
        for f in gate["files"]:
            data = Path(f["path"]).read_bytes()
            assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["bytes"] == len(data)
    models_a = {f["sha256"] for f in va["files"] if f["role"].startswith("stage")}
    models_b = {f["sha256"] for f in vb["files"] if f["role"].startswith("stage")}
    assert models_a and models_b and not models_a & models_b

    # The page shows the same: variant, the rule's values and each model file's hash.
    text = page(float_hold).text
    assert f"{PERSON} (float)" in text and "0.99" in text and "60 s" in text
    for f in vb["files"]:
        assert f["sha256"][:16] in text
    assert f"{PERSON} (int8)" in page(street).text


def test_events_table_has_one_row_per_event_with_existing_thumbnails(street: Path) -> None:
    run = json.loads((street / "report.json").read_text())["runs"][0]
    index = (street / "events" / "index.jsonl").read_text().splitlines()
    assert len(run["events"]) == len(index) >= 2
    rows = page(street).tables["events"]
    assert len(rows) == len(index)
    for row, e in zip(rows, run["events"], strict=True):
        seq, time, label, score, decision, size, frames = row
        assert seq.text == str(e["seq"])
        assert f"{e['trigger_t']:.1f} s" in time.text
        assert e["label"] in label.text
        assert f"{e['decision']['score']:.2f}" in score.text
        # The rule that fired, its numbers, and the cooldown that follows.
        assert "k-of-n" in decision.text and "cooldown" in decision.text
        assert f"threshold {e['decision']['threshold']}" in decision.text
        assert size.text.endswith("KB")
        assert len(frames.imgs) == e["frames"] >= 1
        folder = f"{e['seq']:010d}"
        for i, img in enumerate(frames.imgs):
            prefix = "data:image/jpeg;base64,"
            assert img["src"].startswith(prefix)
            jpeg = base64.b64decode(img["src"][len(prefix):])
            thumb = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert thumb is not None and thumb.shape[1] <= THUMBNAIL_WIDTH
            assert len(jpeg) < 20_000  # a thumbnail, not the 640 px frame
            # Each thumbnail links to its full-size frame, relative to the report.
            target = street / unquote(frames.hrefs[i])
            assert target.is_file() and target.parent.name == folder
            assert target.name == f"frame-{i}.jpg"
        if e["audio_seconds"]:
            assert (street / unquote(frames.hrefs[-1])).name == "audio.wav"
            assert (street / unquote(frames.hrefs[-1])).is_file()


def test_decisions_name_the_rule_that_held_an_activation_back(float_hold: Path) -> None:
    run = json.loads((float_hold / "report.json").read_text())["runs"][0]
    holds = [d for d in run["decisions"] if d["action"] == "hold"]
    assert holds, "the strict person rule must be held back by its cooldown at least once"
    p = page(float_hold)
    rows = p.tables["decisions"]
    assert len(rows) == len(run["decisions"])
    for row, d in zip(rows, run["decisions"], strict=True):
        rule = row[3].text
        expected = {"fire": "k-of-n over threshold", "hold": "cooldown",
                    "release": "release (hysteresis)"}[d["action"]]
        assert rule == expected, (rule, d)
    assert len(p.tables["events"]) == len(run["events"]) == 1
    assert f"{len(holds)} held back" in p.text


def test_page_uses_readable_labels_and_rounded_units(street: Path) -> None:
    run = json.loads((street / "report.json").read_text())["runs"][0]
    text = page(street).text
    raw_keys = [k for k in (*run, *run["metrics"]["person"]) if "_" in k]
    assert raw_keys and not [k for k in raw_keys if k in text]
    assert not re.findall(r"\d+\.\d{4,}", text), "numbers rounded for people"
    p50 = run["gate_latency_ms"]["vision"]["p50"]
    assert f"median {report_mod.fmt_ms(p50)}" in text and " ms" in text
    assert report_mod.fmt_bytes(run["bytes_sent"]) in text
    assert [report_mod.fmt_bytes(n) for n in (999, 960_198, 2_725_556, 12_345_678)] == [
        "999 B", "960 KB", "2.73 MB", "12.3 MB"]
    assert [report_mod.fmt_share(v) for v in (None, 1.0, 0.35229, 0.0)] == [
        "–", "100 %", "35.2 %", "0 %"]


def test_plots_are_linear_from_zero_and_legends_hide_no_curve(
    tmp_path: Path, make_config: Any
) -> None:
    # The vision model named by its manifest's path: its variant is the manifest's, not
    # gate.variant's, and the report says which manifest it was.
    manifest = config_mod.MODELS_DIR / "person" / "manifest-float.json"
    cfg = make_config(gate={"vision_model": str(manifest)})
    res = asyncio.run(replay_recording(STREET, cfg, events_dir=tmp_path / "ev", progress=False))
    assert res.gates["vision"]["variant"] is None and res.gates["audio"]["variant"] == "int8"
    assert res.gates["vision"]["manifest"] == str(manifest.resolve())
    html = report_mod.render_html([res], cfg, tmp_path)
    assert f"{PERSON} (manifest manifest-float.json), {SOUND} (int8)" in Page(html).text

    plt = report_mod.pyplot()
    assert plt is not None, "the test extra brings matplotlib"

    fig = report_mod.bytes_figure(plt, res)
    (ax,) = fig.axes
    assert ax.get_xscale() == "linear" and ax.get_xlim()[0] == 0
    widths = sorted(round(p.get_width()) for p in ax.patches)
    assert widths == sorted([res.stats.event_bytes, res.streaming_bytes])
    plt.close(fig)

    fig = report_mod.scores_figure(plt, res, cfg)
    assert fig is not None and len(fig.axes) == len(res.metrics or cfg.trigger.labels)
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert ax.get_yscale() == ax.get_xscale() == "linear"
        assert ax.get_ylim()[0] == 0 and ax.get_xlim()[0] == 0
        assert ax.get_legend() is None
        assert not box.overlaps(ax.get_window_extent()), "the legend sits outside the plots"
    plt.close(fig)


def test_page_without_matplotlib_says_how_to_get_plots(tmp_path: Path, street: Path) -> None:
    # A device installed without the report extra: matplotlib cannot be imported at all.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text('import sys\nsys.modules["matplotlib"] = None\n')
    env = {**os.environ, "PYTHONPATH": str(shim)}
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from edgekeeper.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "replay", str(STREET / "video.avi"), "--report",
         str(out), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    html = (out / "report.html").read_text()
    p = Page(html)
    assert "Plots are missing: matplotlib is not installed" in p.text
    assert "pip install -e '.[report]'" in p.text
    assert "data:image/png" not in html
    # Everything else is still there.
    run = json.loads((out / "report.json").read_text())["runs"][0]
    assert len(p.tables["events"]) == len(run["events"]) >= 1
    assert f"{PERSON} (int8)" in p.text
    # With matplotlib, the plots are there and the notice is not.
    with_plots = (street / "report.html").read_text()
    assert "data:image/png;base64," in with_plots and "Plots are missing" not in with_plots


def test_a_hold_for_a_short_run_names_the_min_span_rule() -> None:
    # The reason as device/trigger.py words it when a run of hits is too short to fire alone.
    hold = {"action": "hold", "reason": "3-of-5 >= 0.6 but hits span 1.00s < min_span_seconds "
                                        "2.5 (one short sound)"}
    assert report_mod.decision_rule(hold) == "too short (min span)"
    assert report_mod.decision_rule({"action": "hold", "reason": "cooldown 30s"}) == "cooldown"
