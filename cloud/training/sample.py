"""The bundled sample recording ``models/samples/street/``: held-out video plus composed audio.

The video is the held-out tail of vtest.avi (never trained on), re-encoded to MPEG-4 Part 2 with
the XVID tag so OpenCV's bundled FFmpeg reads it everywhere and the file stays small at the
original 768x576, 10 fps. The audio is composed from held-out material only (a held-out
Asterisk prompt, the held-out freedesktop alarm clock, a held-out click, generated noise) at known
times, so its labels hold by construction. Person labels come from looking at the frames: every
held-out frame shows at least one walker (checked by eye and by background subtraction).
"""

from __future__ import annotations

import json
import os
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekeeper.cloud.training import data_audio as da
from edgekeeper.cloud.training import data_vision as dv
from edgekeeper.cloud.training.sources import (
    ASTERISK_SOUNDS,
    FREEDESKTOP_SOUNDS,
    OPENCV_DATA,
    decode_audio,
    require,
    require_tool,
)

STARTED_AT = "2026-11-23T12:00:00Z"
FPS = 10
SPEECH_AT = 3.0
CLICK_AT = 8.5
ALARM_AT, ALARM_SECONDS = 12.0, 2.5
NOISE_DBFS = -50.0
CLICK = "power-plug.oga"
# A held-out warning tone repeated like an alarm. Not alarm-clock-elapsed (a mechanical bell,
# also held out): the sound gate misses that one (see its model card), and the demo should show
# the pipeline working, while the card reports the miss.
ALARM = "dialog-warning.oga"
ALARM_GAP_SECONDS = 0.15


@dataclass(frozen=True)
class Sample:
    folder: Path
    duration: float
    labels: list[dict[str, object]]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pick_speech() -> Path:
    """A held-out Asterisk prompt of 2.5-4 s of voice (the first by name: stable across runs)."""
    for p in sorted(require(ASTERISK_SOUNDS).glob("*.wav")):
        rel = str(p.relative_to(ASTERISK_SOUNDS))
        if da.heldout_file(rel):
            voiced = da.trim(decode_audio(p, da.SR))
            if 2.5 <= len(voiced) / da.SR <= 4.0:
                return p
    raise FileNotFoundError("no held-out Asterisk prompt of 2.5-4 s found")


def write_video(frames: np.ndarray, path: Path) -> None:
    """Frames (BGR) -> XVID AVI via ffmpeg, written to a temp name then moved into place."""
    h, w = frames.shape[1:3]
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    cmd = [
        require_tool("ffmpeg"),
        "-v",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "bgr24",
        "-s",
        f"{w}x{h}",
        "-r",
        str(FPS),
        "-i",
        "-",
        "-c:v",
        "mpeg4",
        "-vtag",
        "XVID",
        "-q:v",
        "5",
        "-g",
        "10",
        "-pix_fmt",
        "yuv420p",
        "-an",
        str(tmp),
    ]
    subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True)
    os.replace(tmp, path)


def write_wav(audio: np.ndarray, path: Path, sample_rate: int = da.SR) -> None:
    pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype("<i2")
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def compose_audio(
    duration: float, seed: int = 0
) -> tuple[np.ndarray, list[dict[str, object]], str]:
    """Noise bed + held-out speech + held-out click + held-out alarm; labels by construction."""
    rng = np.random.default_rng(seed)
    n = round(duration * da.SR)
    bed = np.fft.irfft(
        np.fft.rfft(rng.normal(size=n)) / np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / da.SR), 20.0)),
        n,
    )  # pink-ish: quiet room / distant traffic
    audio = (bed / np.sqrt(np.mean(bed**2)) * 10 ** (NOISE_DBFS / 20)).astype(np.float32)

    labels: list[dict[str, object]] = []
    speech_file = _pick_speech()
    speech = da.trim(decode_audio(speech_file, da.SR))
    speech = speech / np.max(np.abs(speech)) * 0.5
    at = int(SPEECH_AT * da.SR)
    audio[at : at + len(speech)] += speech
    labels.append(
        {"label": "speech", "start": SPEECH_AT, "end": round(SPEECH_AT + len(speech) / da.SR, 2)}
    )

    click = da.trim(decode_audio(require(FREEDESKTOP_SOUNDS / CLICK), da.SR))
    click = click / np.max(np.abs(click)) * 0.3
    at = int(CLICK_AT * da.SR)
    audio[at : at + len(click)] += click  # a non-event the gate should ignore: no label

    alarm = da.trim(decode_audio(require(FREEDESKTOP_SOUNDS / ALARM), da.SR))
    gap = np.zeros(int(ALARM_GAP_SECONDS * da.SR), dtype=np.float32)
    reps = int(np.ceil(ALARM_SECONDS * da.SR / (len(alarm) + len(gap))))
    alarm = np.tile(np.concatenate([alarm, gap]), reps)[: int(ALARM_SECONDS * da.SR)]
    alarm = alarm / np.max(np.abs(alarm)) * 0.5
    at = int(ALARM_AT * da.SR)
    audio[at : at + len(alarm)] += alarm
    labels.append({"label": "alarm", "start": ALARM_AT, "end": ALARM_AT + ALARM_SECONDS})
    provenance = (
        f"speech: asterisk-core-sounds-en-wav en/{speech_file.relative_to(ASTERISK_SOUNDS)} "
        f"(Allison Smith, CC-BY-SA-3.0) at {SPEECH_AT} s; click: sound-theme-freedesktop "
        f"{CLICK} at {CLICK_AT} s (unlabelled distractor); alarm: sound-theme-freedesktop {ALARM} "
        f"(repeated; licence: see models/samples/NOTICE) at {ALARM_AT} s; "
        f"background: generated pink noise at {NOISE_DBFS} dBFS"
    )
    return np.clip(audio, -1, 1), labels, provenance


def build(out_dir: Path, seed: int = 0) -> Sample:
    """Write ``out_dir/samples/street/`` (video, audio, recording.json, labels.json)."""
    folder = out_dir / "samples" / "street"
    folder.mkdir(parents=True, exist_ok=True)
    vtest = dv.read_video(OPENCV_DATA / dv.VTEST)
    _, held = dv.time_split(len(vtest))
    frames = vtest[held.start : held.stop]
    duration = round(len(frames) / FPS, 2)
    write_video(frames, folder / "video.avi")

    audio, audio_labels, audio_source = compose_audio(duration, seed)
    write_wav(audio, folder / "audio.wav")

    labels = [{"label": "person", "start": 0.0, "end": duration}, *audio_labels]
    recording = {
        "schema": 1,
        "video": "video.avi",
        "audio": "audio.wav",
        "started_at": STARTED_AT,
        "source": (
            f"video: frames {held.start}-{held.stop - 1} of opencv-doc samples/data/vtest.avi "
            f"(the held-out last quarter, never trained on), re-encoded to MPEG-4/XVID at "
            f"768x576 {FPS} fps; audio: 16 kHz mono composed by "
            f"edgekeeper.cloud.training.sample from held-out files: {audio_source}. "
            "See models/samples/NOTICE."
        ),
    }
    _atomic_write(folder / "recording.json", (json.dumps(recording, indent=2) + "\n").encode())
    _atomic_write(
        folder / "labels.json",
        (json.dumps({"schema": 1, "labels": labels}, indent=2) + "\n").encode(),
    )
    return Sample(folder, duration, labels)
