"""Replay: the same loop as the device, deterministic, scored against labels, reported."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest

from edgekeeper.cli import main
from edgekeeper.device.replay import replay_recording


def run_cli(*argv: str) -> int:
    return main(list(argv))


@pytest.mark.slow
def test_replay_is_deterministic(tmp_path: Path, sample_recording: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    outs = []
    for name in ("a", "b"):
        assert run_cli("replay", str(sample_recording), "--report", str(tmp_path / name),
                       "--no-progress", "--json") == 0
        outs.append(json.loads((tmp_path / name / "report.json").read_text()))
    capsys.readouterr()
    a, b = outs[0]["runs"][0], outs[1]["runs"][0]
    assert a["events"], "the sample recording must trigger at least one event"
    assert a["decisions"] == b["decisions"]
    assert a["events"] == b["events"]
    for key in ("frames", "frames_scored", "audio_windows", "audio_scored", "event_bytes"):
        assert a[key] == b[key]
    # The events on disk are byte-identical too (JPEG, WAV, features).
    def files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in (root / "events").rglob("*") if p.is_file())

    files_a, files_b = files(tmp_path / "a"), files(tmp_path / "b")
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


@pytest.mark.slow
def test_report_has_metrics_plots_and_byte_comparison(tmp_path: Path, sample_recording: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("replay", str(sample_recording), "--report", str(tmp_path / "r"),
                   "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "triggers" in printed and "streaming everything" in printed and "report:" in printed
    run = json.loads((tmp_path / "r" / "report.json").read_text())["runs"][0]
    assert set(run["models"]) == {"vision", "audio"}
    assert 0 < run["bytes_sent"] < run["bytes_streaming_everything"]
    m = run["metrics"]["person"]
    assert m["window_recall"] is not None and m["window_recall"] > 0.5
    assert m["event_recall"] == 1.0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Gate quality" in html
    # Event folders hold what the index says.
    index = (tmp_path / "r" / "events" / "index.jsonl").read_text()
    events = [json.loads(line) for line in index.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for e in events:
        folder = tmp_path / "r" / "events" / f"{e['seq']:010d}"
        assert len(list(folder.glob("frame-*.jpg"))) == e["frames"]
        if e["audio_seconds"]:
            with wave.open(str(folder / "audio.wav"), "rb") as w:
                assert w.getsampwidth() == 2 and w.getframerate() == 16000


@pytest.mark.slow
def test_labels_file_overrides_and_scores_each_label(
    tmp_path: Path, sample_recording: Path
) -> None:
    labels = tmp_path / "truth.json"
    labels.write_text(json.dumps({"schema": 1, "labels": []}))  # nothing is there
    assert run_cli("replay", str(sample_recording / "video.avi"), "--labels", str(labels),
                   "--report", str(tmp_path / "r"), "--no-progress", "--json") == 0
    run = json.loads((tmp_path / "r" / "report.json").read_text())["runs"][0]
    m = run["metrics"]["person"]
    # With no person labelled, every trigger is a false positive.
    assert m["labelled_ranges"] == 0 and m["event_recall"] is None
    assert m["triggers"] == 0 or m["event_precision"] == 0.0


@pytest.mark.parametrize(
    ("argv_tail", "code", "needle"),
    [
        (["/definitely/missing.avi"], 3, "does not exist"),
        (["--labels", "/missing/labels.json", "SAMPLE"], 3, "labels file"),
    ],
)
def test_bad_inputs_exit_non_zero_with_one_message(tmp_path: Path, sample_recording: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    argv_tail: list[str], code: int,
                                                    needle: str) -> None:
    argv = [a.replace("SAMPLE", str(sample_recording)) for a in argv_tail]
    assert run_cli("replay", *argv, "--report", str(tmp_path / "r"), "--no-progress") == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


async def test_replay_wav_only_and_image_folder(tmp_path: Path, sample_recording: Path,
                                                make_config) -> None:
    cfg = make_config()
    res = await replay_recording(sample_recording / "audio.wav", cfg,
                                 events_dir=tmp_path / "ev", progress=False)
    assert res.stats.frames == 0 and res.stats.audio_windows > 0
    assert set(res.models) == {"audio"}
