"""`edgekeeper record` writes a recording that replay reads; `run` drives the live loop."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from edgekeeper.cli import main
from edgekeeper.device.record import record
from edgekeeper.device.replay import replay_recording
from edgekeeper.errors import InputError

from test_sources import FakeInputStream


async def test_record_then_replay(tmp_path: Path, sample_recording: Path, make_config) -> None:
    cfg = make_config(camera={"source": str(sample_recording / "video.avi"), "fps": 10},
                      microphone={"enabled": True})
    tone = (0.3 * np.sin(np.arange(16000 * 3) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    out = await record(cfg, tmp_path / "rec", seconds=1.5,
                       mic_factory=lambda **kw: FakeInputStream(**kw, source=tone))
    meta = json.loads((out / "recording.json").read_text())
    assert meta["video"] == "video.avi" and meta["audio"] == "audio.wav"
    with wave.open(str(out / "audio.wav"), "rb") as w:
        assert w.getframerate() == 16000 and w.getnframes() > 0
    assert not list(tmp_path.glob(".rec.partial"))
    res = await replay_recording(out, cfg, events_dir=tmp_path / "ev", progress=False)
    assert res.stats.frames > 0 and res.stats.audio_blocks > 0


async def test_record_refuses_an_existing_folder(tmp_path: Path, make_config) -> None:
    (tmp_path / "rec").mkdir()
    with pytest.raises(InputError, match="already exists"):
        await record(make_config(), tmp_path / "rec", seconds=1)


def test_run_with_a_file_as_camera(tmp_path: Path, sample_recording: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[device]\nid = "cam-test"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[camera]\nsource = "{sample_recording / "video.avi"}"\n'
        '[uplink]\nmode = "local-only"\n'  # not enrolled, on purpose
    )
    assert main(["--config", str(cfg), "run", "--seconds", "2"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["frames"] > 0
    assert stats["frames"] >= stats["frames_scored"] > 0


def test_run_with_an_unopenable_camera_fails_clearly(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[device]\nstate_dir = "{tmp_path}"\n[camera]\nsource = "rtsp://127.0.0.1:9/none"\n'
                   '[uplink]\nmode = "local-only"\n')
    assert main(["--config", str(cfg), "run", "--seconds", "1"]) == 3
    err = capsys.readouterr().err
    assert "cannot be opened" in err and "Traceback" not in err
