"""Audio files as sox and Audacity write them (24-bit WAVE_FORMAT_EXTENSIBLE, 32-bit float,
FLAC, OGG Vorbis, 8 kHz), read through libsndfile; what cannot be read is refused naming the
file; and an event from an 8 kHz source carries 8 kHz audio, not the model's 16 kHz."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekeeper.device.replay import replay_recording
from edgekeeper.device.sources import WavSource, open_recording
from edgekeeper.errors import InputError

SOX = shutil.which("sox")
pytestmark = pytest.mark.skipif(SOX is None, reason="sox is installed by scripts/test")


def sox(out: Path, *args: str, seconds: float = 1.5, rate: int = 16000) -> Path:
    """A 440 Hz tone written by sox itself (its own headers, not ours)."""
    subprocess.run([SOX, "-n", "-r", str(rate), *args, str(out), "synth", str(seconds),
                    "sine", "440", "vol", "0.5"], check=True, capture_output=True)
    return out


def fmt_tag(path: Path) -> int:
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[12:16] == b"fmt "
    return int.from_bytes(data[20:22], "little")


async def collect(source: Any) -> list[Any]:
    return [item async for item in source.stream()]


@pytest.mark.parametrize(
    ("name", "args", "rate"),
    [
        ("pcm24.wav", ["-b", "24", "-e", "signed-integer"], 48000),
        ("pcm24-stereo.wav", ["-b", "24", "-e", "signed-integer", "-c", "2"], 44100),
        ("float32.wav", ["-b", "32", "-e", "floating-point"], 16000),
        ("tone.flac", ["-b", "16"], 44100),
        ("tone.ogg", [], 48000),
        ("narrow.wav", ["-b", "16"], 8000),
    ],
)
async def test_sox_written_files_are_read(tmp_path: Path, name: str, args: list[str],
                                          rate: int) -> None:
    path = sox(tmp_path / name, *args, rate=rate)
    if name.startswith("pcm24"):
        assert fmt_tag(path) == 0xFFFE  # what sox writes for 24-bit: WAVE_FORMAT_EXTENSIBLE
    if name.startswith("float32"):
        assert fmt_tag(path) == 3  # IEEE float
    rec = await asyncio.to_thread(open_recording, path, audio_rate=16000, fps=10, realtime=False)
    assert rec.audio is not None and rec.video is None
    blocks = await collect(rec.audio)
    samples = np.concatenate([b.samples for b in blocks])
    assert abs(len(samples) - 24000) <= 2  # 1.5 s at the model's 16 kHz
    assert rec.audio.duration == pytest.approx(1.5, abs=0.01)
    segment = samples[2000:18000]
    peak_hz = np.argmax(np.abs(np.fft.rfft(segment))) * 16000 / len(segment)
    assert abs(peak_hz - 440) < 3  # still the tone, at the model's rate
    assert 0.4 < np.abs(samples).max() < 0.6


async def test_what_cannot_be_read_is_refused_naming_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"definitely not RIFF")
    with pytest.raises(InputError) as err:
        await collect(WavSource(garbage))
    assert "garbage.wav" in err.value.message and "WAV" in err.value.message
    assert err.value.fix and "sox" in err.value.fix
    # a text file with an audio suffix, through the path replay takes
    notes = tmp_path / "notes.flac"
    notes.write_text("these are notes, not FLAC\n")
    rec = await asyncio.to_thread(open_recording, notes, audio_rate=16000, fps=10, realtime=False)
    with pytest.raises(InputError, match=r"notes\.flac"):
        await collect(rec.audio)


async def test_an_8khz_source_makes_8khz_events(tmp_path: Path, make_config) -> None:
    # Every window fires at once: the event spans the file's first seconds.
    cfg = make_config(
        trigger={"k": 1, "n": 1, "labels": {"speech": {"threshold": 0.0, "release": 0.0}}},
        pregate={"energy": False},
        event={"pre_roll_seconds": 3.0, "post_roll_seconds": 3.0, "include_features": False},
        camera={"enabled": False},
    )
    path = sox(tmp_path / "narrow.wav", "-b", "16", seconds=10.0, rate=8000)
    res = await replay_recording(path, cfg, events_dir=tmp_path / "ev", progress=False)
    assert res.stats.events >= 1
    event_dir = sorted(d for d in (tmp_path / "ev").iterdir() if d.is_dir())[0]  # seq 1
    wav_bytes = (event_dir / "audio.wav").read_bytes()
    with wave.open(io.BytesIO(wav_bytes)) as w:
        rate, frames, width = w.getframerate(), w.getnframes(), w.getsampwidth()
    meta = res.events[0]
    span = meta["end_t"] - meta["start_t"]
    assert rate == 8000 and width == 2  # the source's rate, not the model's 16 kHz
    assert abs(frames - span * 8000) <= 2
    # The event's audio costs what streaming that span of the file would, not 2x it.
    streamed = span * 8000 * 2
    assert len(wav_bytes) <= streamed + 100
    assert meta["payload_bytes"] == len(wav_bytes)
