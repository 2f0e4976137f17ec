"""The Claude reasoner: the REAL anthropic SDK against the fake Messages API on 127.0.0.1
(tests/fake_anthropic.py), which checks every request's shape and answers as scripted."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgekeeper import config as config_mod
from edgekeeper import log as log_mod
from edgekeeper.cloud.reasoners.anthropic import (
    JUDGEMENT_SCHEMA,
    SYSTEM_PROMPT,
    TOOL_NAME,
    AnthropicReasoner,
    parse_judgement,
)
from edgekeeper.cloud.reasoners.base import (
    MalformedAnswer,
    ProviderRefused,
    ProviderUnavailable,
    load_reasoner,
    resolve_name,
)
from edgekeeper.errors import ConfigError, PermanentError
from edgekeeper.protocol.messages import EventBody

from cloudkit import make_event
from fake_anthropic import FakeAnthropic, Reply

KEY = "fake-key-test-0123456789-SECRET-do-not-log"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY, images_required=True) as server:
        yield server


Make = Callable[..., AnthropicReasoner]


@pytest.fixture
async def make(fake: FakeAnthropic) -> AsyncIterator[Make]:
    made: list[AnthropicReasoner] = []

    def build(**reasoner: Any) -> AnthropicReasoner:
        cfg = config_mod.build_from_dict(
            {"reasoner": {"transcriber": "none", "max_retries": 0, **reasoner}}, source="test")
        r = AnthropicReasoner(config=cfg, environ={"ANTHROPIC_API_KEY": KEY,
                                                   "ANTHROPIC_BASE_URL": fake.url})
        made.append(r)
        return r

    yield build
    for r in made:
        await r.close()


def event_with_frames(n: int, *, side: int = 64, seq: int = 7) -> EventBody:
    frames = []
    for i in range(n):
        img = np.full((side, side * 4 // 3, 3), 40 * i % 255, dtype=np.uint8)
        cv2.putText(img, str(i), (5, side // 2), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 255, 255))
        frames.append(cv2.imencode(".jpg", img)[1].tobytes())
    base = make_event("porch-pi", seq)
    return EventBody(device_id=base.device_id, seq=seq, captured_at=1_790_000_000.0,
                     meta={"label": "person", "scores": {"person": 0.83, "vehicle": 0.1},
                           "rule": "3 of 5 windows above 0.7"},
                     frames=tuple(frames))


async def test_request_shape_and_verdict(make: Make, fake: FakeAnthropic) -> None:
    r = make(max_frames=4)
    verdict = await r.reason(event_with_frames(6), model_version="person@1.2.0")
    assert fake.problems == []
    (req,) = fake.requests
    body = req.body
    assert body["model"] == "claude-sonnet-4-6" and body["max_tokens"] == 1024
    assert body["system"] == [{"type": "text", "text": SYSTEM_PROMPT,
                               "cache_control": {"type": "ephemeral"}}]
    assert body["tools"][0]["name"] == TOOL_NAME
    assert body["tools"][0]["input_schema"] == JUDGEMENT_SCHEMA
    assert body["tool_choice"] == {"type": "tool", "name": TOOL_NAME}
    content = body["messages"][0]["content"]
    assert [b["type"] for b in content] == ["image"] * 4 + ["text"]
    # First, last and evenly spaced frames, in order, as real JPEGs.
    assert all(img.startswith(b"\xff\xd8") for img in req.images)
    shown = json.loads(req.text.split("\n", 1)[1])
    assert [f["index"] for f in shown["frames"]["shown"]] == [0, 2, 3, 5]
    assert shown["frames"]["captured"] == 6
    assert shown["device_id"] == "porch-pi" and shown["seq"] == 7
    assert shown["gate"]["scores"] == {"person": 0.83, "vehicle": 0.1}
    assert shown["gate"]["rule"] == "3 of 5 windows above 0.7"
    assert shown["gate_model"] == "person@1.2.0"
    assert shown["captured_at"].startswith("2026-09-21T")
    assert shown["audio"] == "no audio clip"
    # The key went as a credential, and only there.
    assert fake.request_key(req.headers) == KEY and KEY not in json.dumps(body)
    # The fake's default answer, validated and carried over; usage parsed (first call writes
    # the cache).
    assert (verdict.label, verdict.confidence, verdict.action, verdict.gate_correct) == (
        "person", pytest.approx(0.9), "none", True)
    assert verdict.provisional is False and r.name == "anthropic:claude-sonnet-4-6"
    u = verdict.usage
    assert u.model == "claude-sonnet-4-6" and u.call_id.startswith("msg_")
    assert u.input_tokens > 4 * 1000 and u.output_tokens > 0
    assert u.cache_write_tokens > 0 and u.cache_read_tokens == 0
    again = await r.reason(event_with_frames(2, seq=8), model_version="person@1.2.0")
    assert again.usage.cache_write_tokens == 0 and again.usage.cache_read_tokens > 0


async def test_frames_are_scaled_to_bound_tokens(make: Make, fake: FakeAnthropic) -> None:
    r = make(image_max_side=256, max_frames=1)
    await r.reason(event_with_frames(1, side=900), model_version="m")
    (img,) = fake.requests[0].images
    decoded = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR)
    assert max(decoded.shape[:2]) == 256
    assert fake.problems == []


async def test_audio_is_described_not_sent(make: Make, fake: FakeAnthropic) -> None:
    rate = 16000
    t = np.arange(rate * 2) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    import wave

    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    base = event_with_frames(1)
    ev = EventBody(device_id=base.device_id, seq=1, captured_at=base.captured_at,
                   meta={"label": "alarm", "scores": {"alarm": 0.9}}, frames=base.frames,
                   audio_wav=buf.getvalue())
    await make().reason(ev, model_version="sound@1")
    req = fake.requests[0]
    audio = json.loads(req.text.split("\n", 1)[1])["audio"]
    assert audio["seconds"] == 2.0 and audio["sample_rate"] == rate
    assert -14 < audio["rms_dbfs"] < -12 and audio["loud_fraction"] == 1.0
    assert "transcript" not in audio  # transcriber = none
    assert not any(b.get("type") == "document" or "audio" in str(b.get("source", {}).get(
        "media_type", "")) for b in req.body["messages"][0]["content"])


async def test_429_retry_after_is_honoured(make: Make, fake: FakeAnthropic) -> None:
    fake.push(Reply.rate_limited(retry_after=1))
    verdict = await make(max_retries=2).reason(event_with_frames(1), model_version="m")
    assert verdict.label == "person"
    first, second = fake.requests
    assert (first.status, second.status) == (429, 200)
    assert second.headers.get("x-stainless-retry-count") == "1"
    # The SDK waited at least what the provider asked for (a lower bound, not a timing).
    assert second.received_at - first.received_at >= 0.95


async def test_429_after_the_sdk_retries_is_provider_unavailable(make: Make,
                                                                fake: FakeAnthropic) -> None:
    fake.push(Reply.rate_limited(retry_after=0.1), Reply.rate_limited(retry_after=7))
    with pytest.raises(ProviderUnavailable, match="rate limit") as err:
        await make(max_retries=1).reason(event_with_frames(1), model_version="m")
    assert err.value.retry_after == 7
    assert [r.status for r in fake.requests] == [429, 429]


async def test_529_then_success(make: Make, fake: FakeAnthropic) -> None:
    fake.push(Reply.overloaded())
    verdict = await make(max_retries=2).reason(event_with_frames(1), model_version="m")
    assert verdict.provisional is False
    assert [r.status for r in fake.requests] == [529, 200]


@pytest.mark.parametrize("reply", [Reply.overloaded(), Reply.server_error(500),
                                   Reply.server_error(503)])
async def test_provider_errors_after_retries_are_provider_unavailable(
        make: Make, fake: FakeAnthropic, reply: Reply) -> None:
    fake.default = reply
    with pytest.raises(ProviderUnavailable, match=str(reply.status)):
        await make(max_retries=1).reason(event_with_frames(1), model_version="m")
    assert [r.status for r in fake.requests] == [reply.status] * 2


async def test_bad_request_is_permanent(make: Make, fake: FakeAnthropic) -> None:
    fake.push(Reply(400, error_type="invalid_request_error"))
    with pytest.raises(PermanentError, match="400 invalid_request_error"):
        await make().reason(event_with_frames(1), model_version="m")


@pytest.mark.parametrize(
    ("tool_input", "needle"),
    [
        ({"label": "person", "confidence": 7, "summary": "s", "action": "none",
          "gate_correct": True}, "outside"),
        ({"label": 5, "confidence": 0.5, "summary": "s", "action": "none",
          "gate_correct": True}, "label"),
        ({"label": "person", "confidence": 0.5, "summary": "s", "action": "launch",
          "gate_correct": True}, "action"),
        ({"label": "person", "confidence": "high", "summary": "s", "action": "none",
          "gate_correct": True}, "number"),
        ({"label": "person", "confidence": 0.5, "summary": "s", "action": "none"},
         "gate_correct"),
        ({"label": "person", "confidence": 0.5, "summary": "s", "action": "none",
          "gate_correct": "yes"}, "gate_correct"),
        ({"label": "person", "confidence": 0.5, "summary": "s", "action": "alert",
          "gate_correct": None, "door": "open it"}, "unexpected"),
        ({"label": "person", "confidence": float("nan"), "summary": "s", "action": "none",
          "gate_correct": True}, "confidence"),
    ],
)
async def test_malformed_tool_input_is_refused(make: Make, fake: FakeAnthropic,
                                               tool_input: dict[str, Any], needle: str) -> None:
    if tool_input.get("confidence") != tool_input.get("confidence"):  # NaN is not JSON
        with pytest.raises(ValueError, match=needle):
            parse_judgement(tool_input)
        return
    fake.push(Reply.malformed(tool_input))
    with pytest.raises(MalformedAnswer, match=needle) as err:
        await make().reason(event_with_frames(1), model_version="m")
    # The tokens were spent all the same: the error carries them for the budget.
    assert err.value.usage.tokens > 0 and err.value.usage.model == "claude-sonnet-4-6"


async def test_answer_without_the_tool_call_is_malformed(make: Make, fake: FakeAnthropic) -> None:
    fake.push(Reply.text_only())
    with pytest.raises(MalformedAnswer, match="no record_judgement call"):
        await make().reason(event_with_frames(1), model_version="m")


async def test_timeout_is_provider_unavailable(make: Make, fake: FakeAnthropic) -> None:
    fake.push(Reply.ok().slow(5.0))
    with pytest.raises(ProviderUnavailable, match="timed out"):
        await make(timeout_seconds=0.3).reason(event_with_frames(1), model_version="m")


async def test_probe_uses_the_cached_prefix(make: Make, fake: FakeAnthropic) -> None:
    r = make()
    await r.reason(event_with_frames(1), model_version="m")
    fake.images_required = False  # a probe carries no event, so no frame
    usage = await r.probe()
    assert usage.cache_read_tokens > 0 and usage.model == "claude-sonnet-4-6"
    assert "Health check" in fake.requests[-1].text
    fake.default = Reply.overloaded()
    with pytest.raises(ProviderUnavailable):
        await r.probe()


def test_auto_picks_anthropic_only_with_a_key() -> None:
    assert resolve_name("auto", {"ANTHROPIC_API_KEY": KEY}) == "anthropic"
    assert resolve_name("auto", {"ANTHROPIC_API_KEY": "  "}) == "offline"
    assert resolve_name("auto", {}) == "offline"
    assert resolve_name("echo", {"ANTHROPIC_API_KEY": KEY}) == "echo"
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY") as err:
        load_reasoner("anthropic", environ={})
    assert err.value.fix and "never on a device" in err.value.fix


async def test_key_and_base_url_come_from_the_environment(
        fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    cfg = config_mod.build_from_dict({"reasoner": {"transcriber": "none"}}, source="test")
    r = load_reasoner("auto", cfg)
    try:
        assert r.name == "anthropic:claude-sonnet-4-6"
        await r.reason(event_with_frames(1), model_version="m")
        assert fake.request_key(fake.requests[0].headers) == KEY
    finally:
        await r.close()


async def test_key_never_reaches_a_log_or_an_error(
        fake: FakeAnthropic, make: Make, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    stream = io.StringIO()
    log_mod.configure("debug", "json", stream=stream)
    caplog.set_level(logging.DEBUG)  # the SDK's and httpx's own loggers too
    errors: list[str] = []
    try:
        r = make(max_retries=1)
        await r.reason(event_with_frames(1), model_version="m")
        for reply in (Reply.overloaded(), Reply.rate_limited(0.1), Reply.malformed({"x": 1}),
                      Reply.ok().slow(3)):
            fake.default = reply
            try:
                await make(max_retries=0, timeout_seconds=0.5).reason(
                    event_with_frames(1), model_version="m")
            except Exception as err:
                errors.append(f"{err!s} {err!r} {getattr(err, 'fix', '')}")
        fake.default = Reply.ok()
        wrong = AnthropicReasoner(
            config=config_mod.build_from_dict({"reasoner": {"transcriber": "none",
                                                            "max_retries": 0}}, source="t"),
            environ={"ANTHROPIC_API_KEY": KEY + "-revoked", "ANTHROPIC_BASE_URL": fake.url})
        # A rejected key is no outage to wait out: the worker stops (test_runtime.py).
        with pytest.raises(ProviderRefused, match="refused the API key") as err:
            await wrong.reason(event_with_frames(1), model_version="m")
        errors.append(f"{err.value!s} {err.value!r}")
        errors.append(repr(wrong) + repr(vars(wrong).keys()))
        await wrong.close()
    finally:
        log_mod.configure("warning", "json")
    assert len(errors) == 6
    text = stream.getvalue() + caplog.text + "\n".join(errors)
    # The SDK's and the HTTP layer's own debug logging was captured, so a key in it would
    # have been seen.
    assert "Request options" in caplog.text and "send_request_headers" in caplog.text
    assert KEY not in text and KEY[-20:] not in text
    assert base64.b64encode(KEY.encode()).decode() not in text


SPEECH = Path("/usr/share/asterisk/sounds/en/hello-world.wav")  # asterisk-core-sounds-en-wav


@pytest.mark.skipif(not SPEECH.exists(),
                    reason="asterisk-core-sounds-en-wav is installed by scripts/test")
async def test_only_the_labels_listed_are_transcribed(make: Make, fake: FakeAnthropic) -> None:
    # The same spoken clip under two gate labels: the recognizer runs for `speech` (listed by
    # default) and not for `alarm`, whose clip the spectrogram serves.
    reasoner = make(transcriber="pocketsphinx")
    base = event_with_frames(1)
    for seq, label in ((1, "speech"), (2, "alarm")):
        ev = EventBody(device_id=base.device_id, seq=seq, captured_at=base.captured_at,
                       meta={"label": label}, frames=base.frames, audio_wav=SPEECH.read_bytes())
        await reasoner.reason(ev, model_version="sound@1")
    heard = [json.loads(r.text.split("\n", 1)[1])["audio"] for r in fake.requests]
    assert heard[0]["transcript"].strip() and heard[0]["transcript_by"].startswith("pocketsphinx")
    assert "transcript" not in heard[1] and "spectrogram" in heard[1]
