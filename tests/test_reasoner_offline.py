"""The offline teacher on real media: frames of the bundled street recording (people in every
frame), a person-free plate made from the same video, real speech from the asterisk prompts."""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLE

from edgekeeper.cloud.reasoners.base import load_reasoner
from edgekeeper.cloud.reasoners.offline import OfflineReasoner
from edgekeeper.cloud.reasoners.transcribe import make_transcriber, pocketsphinx_available
from edgekeeper.protocol.messages import EventBody

VIDEO = SAMPLE / "video.avi"
SPEECH = Path("/usr/share/asterisk/sounds/en/hello-world.wav")  # Debian asterisk-core-sounds-en-wav


def video_frames() -> list[np.ndarray]:
    if not VIDEO.is_file():
        pytest.fail(f"the bundled sample video is missing at {VIDEO}")
    cap = cv2.VideoCapture(str(VIDEO))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) > 50, "the sample video did not decode"
    return frames


def jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


def event(frames: tuple[bytes, ...] = (), *, label: str = "person",
          audio: bytes | None = None) -> EventBody:
    return EventBody(device_id="porch-pi", seq=1, captured_at=time.time(),
                     meta={"label": label, "scores": {label: 0.9}}, frames=frames,
                     audio_wav=audio)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return video_frames()


@pytest.fixture
async def teacher() -> AsyncIterator[OfflineReasoner]:
    r = OfflineReasoner(transcriber=None)
    yield r
    await r.close()


async def test_people_are_found_in_real_street_frames(teacher: OfflineReasoner,
                                                      frames: list[np.ndarray]) -> None:
    picked = tuple(jpeg(frames[i]) for i in np.linspace(0, len(frames) - 1, 4).astype(int))
    v = await teacher.reason(event(picked), model_version="person@1")
    assert v.label == "person" and v.gate_correct is True
    assert v.provisional is True and v.usage.tokens == 0
    assert teacher.name == "offline:hog+haar"
    assert sum(f["people"] for f in v.extra["frames"]) >= 4  # pedestrians in each frame
    assert 0.6 <= v.confidence <= 0.97
    assert v.action == "log" and "no LLM" in v.summary


async def test_a_person_free_scene_has_no_one(teacher: OfflineReasoner,
                                              frames: list[np.ndarray]) -> None:
    # The per-pixel temporal median of the video removes the walkers: the empty street.
    plate = np.median(np.stack(frames[::5]), axis=0).astype(np.uint8)
    v = await teacher.reason(event((jpeg(plate),)), model_version="person@1")
    assert v.extra["frames"][0]["people"] == 0 and v.extra["frames"][0]["faces"] == 0
    assert v.label == "background" and v.gate_correct is False and v.action == "none"
    assert v.provisional is True


async def test_unreadable_frame_is_noted_not_fatal(teacher: OfflineReasoner) -> None:
    v = await teacher.reason(event((b"\xff\xd8 not really a jpeg",)), model_version="m")
    assert v.extra["frames"][0]["readable"] is False
    assert v.gate_correct is None and v.provisional is True


async def test_audio_only_event_gets_metadata_and_a_judgement(teacher: OfflineReasoner) -> None:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        t = np.arange(16000) / 16000
        w.writeframes((0.5 * np.sign(np.sin(2 * np.pi * 3000 * t)) * 32767).astype("<i2").tobytes())
    v = await teacher.reason(event(label="alarm", audio=buf.getvalue()), model_version="sound@1")
    # A steady 3 kHz tone through the whole clip: a sustained alarm tone to the audio judge
    # (tests/test_teacher_audio.py has the real sounds).
    assert v.label == "alarm" and v.gate_correct is True and v.provisional is True
    assert v.extra["audio_judgement"]["features"]["dominant_hz"] == pytest.approx(3000, abs=40)
    assert v.extra["audio"]["seconds"] == 1.0 and v.extra["audio"]["rms_dbfs"] > -10
    assert "audio 1.0 s" in v.summary


@pytest.mark.skipif(not pocketsphinx_available(), reason="pocketsphinx is in the cloud extra")
async def test_speech_is_transcribed_offline() -> None:
    if not SPEECH.is_file():
        pytest.fail(f"{SPEECH} is missing: apt-get install asterisk-core-sounds-en-wav")
    transcriber = make_transcriber("pocketsphinx")
    assert transcriber is not None
    r = OfflineReasoner(transcriber=transcriber)
    try:
        audio = await asyncio.to_thread(SPEECH.read_bytes)
        v = await r.reason(event(label="speech", audio=audio), model_version="s")
    finally:
        await r.close()
        await transcriber.close()
    assert r.name == "offline:hog+haar+pocketsphinx"
    transcript = v.extra["audio"]["transcript"]
    assert transcript.strip(), "pocketsphinx heard nothing in a spoken prompt"
    assert v.label == "speech" and v.gate_correct is True and v.provisional


async def test_auto_without_a_key_is_the_offline_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    r = load_reasoner("auto")
    try:
        assert isinstance(r, OfflineReasoner) and r.name.startswith("offline:hog+haar")
    finally:
        await r.close()
