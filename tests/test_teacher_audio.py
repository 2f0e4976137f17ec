"""The teachers' audio judgement on real sounds (Debian's freedesktop sound theme, the Asterisk
prompts, chromium-bsu's game music, all installed by scripts/test): the offline teacher's DSP
ear, and the spectrogram picture Claude gets, checked in the request the real SDK sends to the
fake Messages API (tests/fake_anthropic.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import cv2
import numpy as np
import pytest

from edgekeeper import config as config_mod
from edgekeeper.cloud.reasoners import spectrogram as sp
from edgekeeper.cloud.reasoners import teacher_accuracy as ta
from edgekeeper.cloud.reasoners.anthropic import SYSTEM_PROMPT, AnthropicReasoner
from edgekeeper.cloud.reasoners.audio_judge import judge_pcm
from edgekeeper.cloud.reasoners.offline import OfflineReasoner
from edgekeeper.protocol.messages import EventBody

from fake_anthropic import FakeAnthropic

KEY = "fake-key-teacher-audio-0123456789"


def need(path: Any) -> None:
    if not path.exists():
        pytest.fail(f"{path} is missing: apt-get install {ta.PACKAGES.get(path.parent, '')} "
                    "(scripts/test installs it)")


def alert_repeated(name: str = "dialog-warning.oga") -> np.ndarray:
    need(ta.FREEDESKTOP / name)
    one = ta.read_audio(ta.FREEDESKTOP / name)
    return ta._place(ta._repeat(one, 0.25, 3.5), 1)


def alert_once(name: str = "dialog-warning.oga") -> np.ndarray:
    need(ta.FREEDESKTOP / name)
    return ta._place(ta.read_audio(ta.FREEDESKTOP / name), 2)


def prompt(name: str) -> np.ndarray:
    need(ta.ASTERISK / name)
    return ta._place(ta.read_audio(ta.ASTERISK / name), 3)


def music(offset: float = 0.0) -> np.ndarray:
    need(ta.CHROMIUM_BSU / "music_game.wav")
    pcm = ta.read_audio(ta.CHROMIUM_BSU / "music_game.wav")
    return pcm[int(offset * ta.RATE):int((offset + 4) * ta.RATE)]


def audio_event(pcm: np.ndarray, label: str, frames: tuple[bytes, ...] = ()) -> EventBody:
    return EventBody(device_id="porch-pi", seq=3, captured_at=1_790_000_000.0,
                     meta={"label": label, "scores": {label: 0.9}}, frames=frames,
                     audio_wav=ta.to_wav(pcm))


# The DSP judgement --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dialog-warning.oga", "window-attention.oga",
                                  "phone-outgoing-calling.oga"])
def test_a_repeated_alert_is_an_alarm_and_once_it_is_not(name: str) -> None:
    rep = judge_pcm(alert_repeated(name), ta.RATE)
    assert rep.label == "alarm", rep.reason
    assert rep.features.period_strength > 0.7 and rep.features.dominant_hz >= 400
    once = judge_pcm(alert_once(name), ta.RATE)
    assert once.label == "background", once.reason


def test_a_continuous_alarm_clock_is_an_alarm() -> None:
    need(ta.FREEDESKTOP / "alarm-clock-elapsed.oga")
    pcm = ta.read_audio(ta.FREEDESKTOP / "alarm-clock-elapsed.oga")[: 4 * ta.RATE]
    j = judge_pcm(pcm, ta.RATE)
    assert j.label == "alarm" and j.confidence >= 0.7


@pytest.mark.parametrize("name", ["vm-mismatch.wav", "auth-incorrect.wav", "conf-extended.wav",
                                  "queue-youarenext.wav"])
def test_spoken_prompts_are_speech(name: str) -> None:
    j = judge_pcm(prompt(name), ta.RATE)
    assert j.label == "speech", j.reason
    assert j.features.dominant_hz < 400


def test_music_is_music_not_an_alarm() -> None:
    j = judge_pcm(music(), ta.RATE)
    assert j.label == "music", j.reason


@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_steady_noise_is_background(slope: float) -> None:
    rng = np.random.default_rng(5)
    spec = np.fft.rfft(rng.standard_normal(4 * ta.RATE))
    spec /= np.maximum(1, np.arange(spec.size)) ** slope
    x = np.fft.irfft(spec, 4 * ta.RATE)
    x = (x / np.sqrt(np.mean(x ** 2)) * 0.05).astype(np.float32)
    j = judge_pcm(x, ta.RATE)
    assert j.label == "background"


def test_another_sample_rate_is_resampled() -> None:
    # The Asterisk prompts are 8 kHz; the judge works at 16 kHz whatever it is given.
    need(ta.ASTERISK / "vm-mismatch.wav")
    import soundfile

    pcm, rate = soundfile.read(str(ta.ASTERISK / "vm-mismatch.wav"), dtype="float32")
    assert rate == 8000
    assert judge_pcm(pcm, rate).label == "speech"


# The offline teacher's verdicts on audio events ---------------------------------------------
@pytest.fixture
async def teacher() -> AsyncIterator[OfflineReasoner]:
    r = OfflineReasoner(transcriber=None)
    yield r
    await r.close()


async def test_offline_teacher_confirms_and_denies_the_gate(teacher: OfflineReasoner) -> None:
    beeps, beep, voice, tune = await asyncio.gather(
        asyncio.to_thread(alert_repeated), asyncio.to_thread(alert_once),
        asyncio.to_thread(prompt, "vm-mismatch.wav"), asyncio.to_thread(music))
    cases = [  # (clip, the gate's label, teacher label, gate_correct)
        (beeps, "alarm", "alarm", True),
        (beep, "alarm", "background", False),  # one short tone is not an alarm
        (voice, "speech", "speech", True),
        (voice, "alarm", "speech", False),
        (tune, "alarm", "music", False),  # the case: music is not an alarm
        (tune, "background", "music", True),  # the gate has no music label
    ]
    for pcm, gate, label, correct in cases:
        v = await teacher.reason(audio_event(pcm, gate), model_version="sound@1")
        assert (v.label, v.gate_correct) == (label, correct), v.summary
        assert v.provisional is True and v.usage.tokens == 0
        j = v.extra["audio_judgement"]
        assert j["label"] == label and j["confidence"] == v.confidence
        assert f"sounds like {label}" in v.summary
        assert v.action == ("log" if label in ("alarm", "speech") else "none")


async def test_a_sound_event_is_judged_by_ear_even_with_frames(
        teacher: OfflineReasoner) -> None:
    dark = cv2.imencode(".jpg", np.zeros((120, 160, 3), np.uint8))[1].tobytes()
    pcm = await asyncio.to_thread(alert_repeated)
    v = await teacher.reason(audio_event(pcm, "alarm", (dark,)), model_version="sound@1")
    assert v.label == "alarm" and v.gate_correct is True
    assert v.extra["frames"][0]["people"] == 0


async def test_unreadable_audio_gives_no_opinion(teacher: OfflineReasoner) -> None:
    ev = EventBody(device_id="porch-pi", seq=4, captured_at=1_790_000_000.0,
                   meta={"label": "alarm"}, audio_wav=b"RIFF\x00\x00\x00\x00WAVEjunk")
    v = await teacher.reason(ev, model_version="sound@1")
    assert v.gate_correct is None and v.extra["audio_judgement"] is None
    assert v.extra["audio"]["readable"] is False


# The spectrogram picture --------------------------------------------------------------------
def bright_rows(img: np.ndarray) -> np.ndarray:
    """Per plot row, the share of pixels that are bright (the loud end of the colour map)."""
    gray = cv2.cvtColor(sp.plot_rows(img), cv2.COLOR_BGR2GRAY)
    return np.asarray((gray > 150).mean(axis=1))


def test_spectrogram_layout_and_size() -> None:
    png = sp.spectrogram_png(alert_repeated(), ta.RATE)
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (sp.HEIGHT, sp.WIDTH, 3) == (256, 512, 3)
    assert len(png) < 120_000  # ~175 tokens as an image (billed by pixels), under 120 KB


def test_beeps_draw_few_horizontal_lines_and_speech_does_not() -> None:
    beeps = bright_rows(sp.render(alert_repeated(), ta.RATE))
    speech = bright_rows(sp.render(prompt("vm-mismatch.wav"), ta.RATE))
    # A 500 Hz beep is one line: most of its bright pixels lie in a band a few rows high.
    top = np.sort(beeps)[::-1]
    assert top[:6].sum() / beeps.sum() > 0.5
    # Its row: 500 Hz on the mel axis (rows run from 8 kHz at the top to 100 Hz at the bottom).
    assert abs(int(np.argmax(beeps)) - sp._row_of(500.0)) <= 3
    # Speech spreads its energy over many rows (harmonic stacks, formants).
    assert np.sort(speech)[::-1][:6].sum() / speech.sum() < 0.45
    # In time, the beeps switch on and off: bright columns come and go along the line.
    plot = cv2.cvtColor(sp.plot_rows(sp.render(alert_repeated(), ta.RATE)), cv2.COLOR_BGR2GRAY)
    line = plot[int(np.argmax(beeps))] > 150
    assert np.sum(line[1:] & ~line[:-1]) >= 4  # at least four separate beeps


Make = Callable[..., AnthropicReasoner]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY) as server:
        yield server


@pytest.fixture
async def claude(fake: FakeAnthropic) -> AsyncIterator[AnthropicReasoner]:
    cfg = config_mod.build_from_dict({"reasoner": {"transcriber": "none", "max_retries": 0}},
                                     source="test")
    r = AnthropicReasoner(config=cfg, environ={"ANTHROPIC_API_KEY": KEY,
                                               "ANTHROPIC_BASE_URL": fake.url})
    yield r
    await r.close()


async def test_claude_gets_a_spectrogram_beside_the_transcript_and_level(
        claude: AnthropicReasoner, fake: FakeAnthropic) -> None:
    frame = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()
    pcm = await asyncio.to_thread(alert_repeated)
    verdict = await claude.reason(audio_event(pcm, "alarm", (frame,)), model_version="sound@1")
    assert fake.problems == []
    req = fake.requests[0]
    content = req.body["messages"][0]["content"]
    kinds = [(b["type"], b.get("source", {}).get("media_type")) for b in content]
    # Frames first, the spectrogram as the last image, the JSON text last.
    assert kinds == [("image", "image/jpeg"), ("image", "image/png"), ("text", None)]
    png = base64.b64decode(content[1]["source"]["data"])
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[:2] == (sp.HEIGHT, sp.WIDTH)
    rows = bright_rows(img)
    assert np.sort(rows)[::-1][:6].sum() / rows.sum() > 0.5  # the beeps' line
    described = json.loads(req.text.split("\n", 1)[1])
    audio = described["audio"]
    assert audio["spectrogram"]["shown"] == "the last image"
    assert audio["spectrogram"]["width"] == sp.WIDTH and "rms_dbfs" in audio
    # The system prompt says how to read it.
    system = req.body["system"][0]["text"]
    assert system == SYSTEM_PROMPT
    for hint in ("horizontal lines", "harmonics", "beat", "noise", "mel"):
        assert hint in system
    assert verdict.extra["frames_shown"] == 1 and verdict.extra["spectrogram"] is True


async def test_no_audio_no_spectrogram(claude: AnthropicReasoner, fake: FakeAnthropic) -> None:
    frame = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()
    ev = EventBody(device_id="porch-pi", seq=5, captured_at=1_790_000_000.0,
                   meta={"label": "person"}, frames=(frame,))
    verdict = await claude.reason(ev, model_version="person@1")
    content = fake.requests[0].body["messages"][0]["content"]
    assert [b.get("source", {}).get("media_type") for b in content if b["type"] == "image"] == [
        "image/jpeg"]
    assert verdict.extra["spectrogram"] is False
