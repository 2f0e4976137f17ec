"""Trigger policy: k-of-n, span, hysteresis, cooldown, hourly cap, unknown labels; and the
default audio rules through the shipped sound gate on real recordings (chime, alert, speech)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgekeeper import config as config_mod
from edgekeeper.config import LabelRule, TriggerSection
from edgekeeper.device.gate import ModelRunner
from edgekeeper.device.trigger import TriggerPolicy


def policy(k: int = 3, n: int = 5, cap: int = 60, **rule: float) -> TriggerPolicy:
    r = LabelRule(**{"threshold": 0.6, "release": 0.4, "cooldown_seconds": 10.0, **rule})
    return TriggerPolicy(TriggerSection(k=k, n=n, max_events_per_hour=cap, labels={"person": r}))


def feed(p: TriggerPolicy, scores: list[float], t0: float = 0.0, dt: float = 1.0) -> list:
    out = []
    for i, s in enumerate(scores):
        out += p.update(t0 + i * dt, {"person": s, "no_person": 1 - s})
    return out


def test_fires_only_when_k_of_n_windows_reach_threshold() -> None:
    p = policy()
    assert feed(p, [0.9, 0.1, 0.9, 0.1]) == []  # 2 of 4: not yet
    decisions = feed(p, [0.9], t0=4)  # 3 of last 5
    assert [d.action for d in decisions] == ["fire"]
    assert decisions[0].hits == 3 and decisions[0].label == "person"
    assert "3 of last 5" in decisions[0].reason


def test_threshold_is_inclusive_and_single_spike_never_fires() -> None:
    p = policy(k=1, n=1)
    assert [d.action for d in feed(p, [0.6])] == ["fire"]
    p = policy()
    assert feed(p, [0.99, 0.0, 0.0, 0.0, 0.0, 0.99, 0.0]) == []


def test_hysteresis_one_activation_one_event_until_release() -> None:
    p = policy(cooldown_seconds=0.0)
    d = feed(p, [0.9, 0.9, 0.9])
    assert [x.action for x in d] == ["fire"]
    # Hovering between release (0.4) and threshold (0.6) keeps it active: no new event.
    assert feed(p, [0.5, 0.45, 0.55, 0.5, 0.5, 0.9, 0.9, 0.9], t0=3) == []
    d = feed(p, [0.1, 0.1, 0.1], t0=11)
    assert [x.action for x in d] == ["release"]
    d = feed(p, [0.9, 0.9, 0.9], t0=14)
    assert [x.action for x in d] == ["fire"]


def test_cooldown_holds_back_and_says_why() -> None:
    p = policy(k=1, n=1, cooldown_seconds=10.0)
    assert [x.action for x in feed(p, [0.9])] == ["fire"]
    assert [x.action for x in feed(p, [0.1], t0=1)] == ["release"]
    held = feed(p, [0.9], t0=5)
    assert [x.action for x in held] == ["hold"]
    assert "cooldown" in held[0].reason
    feed(p, [0.1], t0=6)
    assert [x.action for x in feed(p, [0.9], t0=10)] == ["fire"]  # exactly at the boundary


def test_hourly_cap_counts_across_a_sliding_hour() -> None:
    p = policy(k=1, n=1, cap=2, cooldown_seconds=0.0)
    actions = []
    for t in (0, 10, 20):
        actions += [d.action for d in feed(p, [0.9, 0.1], t0=t)]
    assert actions == ["fire", "release", "fire", "release", "hold", "release"]
    assert p.stats.held_rate_cap == 1
    # An hour after the first event, one slot is free again.
    assert [d.action for d in feed(p, [0.9], t0=3600)] == ["fire"]


def test_labels_without_a_rule_never_trigger() -> None:
    p = policy(k=1, n=1)
    assert p.update(0.0, {"no_person": 1.0, "dog": 1.0}) == []


def test_explain_carries_numbers() -> None:
    p = policy(k=1, n=1)
    (d,) = feed(p, [0.93])
    e = d.explain()
    assert e["action"] == "fire" and e["score"] == 0.93 and e["threshold"] == 0.6 and e["n"] == 1


# ------------------------------------------------ span: one short sound must not fire alone


def test_short_sound_in_overlapping_windows_does_not_fire() -> None:
    # A 0.5 s chime seen by 2 s windows every 0.48 s: hits in 5 consecutive windows (k-of-n is
    # met) but they span at most 1.92 s, under min_span_seconds: held once, never fired.
    p = policy(min_span_seconds=2.5)
    d = feed(p, [0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], dt=0.48)
    assert [x.action for x in d] == ["hold"]
    assert "min_span_seconds" in d[0].reason and "span 0.96s" in d[0].reason  # said at 3 hits
    assert p.stats.fired == 0 and p.stats.held_short == 1


def test_sound_that_lasts_or_repeats_fires_once_its_hits_span_enough() -> None:
    p = policy(min_span_seconds=2.5)
    d = feed(p, [0.9] * 8, dt=0.48)  # hits from 0 to 3.36 s
    assert [x.action for x in d] == ["hold", "fire"]
    assert d[1].t == 0.48 * 6  # the first hit whose distance from the run's start is >= 2.5 s
    assert "span 2.88s >= 2.5s" in d[1].reason
    # A beep train with gaps (hit, miss, miss, hit ...) is one run: the gaps are shorter than n.
    p = policy(min_span_seconds=2.5)
    d = feed(p, [0.9, 0.9, 0.1, 0.9, 0.9, 0.1, 0.9, 0.9], dt=0.48)
    assert [x.action for x in d] == ["hold", "fire"]


def test_run_ends_after_n_windows_without_a_hit() -> None:
    # Two chimes 4 s apart are two runs, each too short: neither fires, each held once.
    p = policy(min_span_seconds=2.5)
    chime = [0.9, 0.9, 0.9, 0.9]
    d = feed(p, chime + [0.1] * 5 + chime + [0.1] * 5, dt=0.48)
    assert [x.action for x in d] == ["hold", "hold"]
    assert p.stats.fired == 0


def test_min_span_zero_keeps_plain_k_of_n() -> None:
    p = policy()  # person: no span rule
    assert [x.action for x in feed(p, [0.9, 0.9, 0.9], dt=0.1)] == ["fire"]


def test_min_span_is_validated_and_on_for_audio_labels_by_default() -> None:
    with pytest.raises(ValueError, match="min_span_seconds"):
        LabelRule(min_span_seconds=-1.0)
    rules = TriggerSection().labels
    assert rules["alarm"].min_span_seconds == rules["speech"].min_span_seconds == 2.5
    assert rules["person"].min_span_seconds == 0.0


# --------------------------- the real sound gate on real recordings, through the default rules

FREEDESKTOP = Path("/usr/share/sounds/freedesktop/stereo")  # sound-theme-freedesktop
ASTERISK = Path("/usr/share/asterisk/sounds/en")  # asterisk-core-sounds-en-wav
SR = 16_000


def _decode(path: Path) -> np.ndarray:
    """Any file sox reads (Ogg Vorbis, WAV) as 16 kHz mono float32; sox comes with scripts/test."""
    if not path.is_file():
        pytest.fail(f"{path} is missing: apt-get install sound-theme-freedesktop "
                    "asterisk-core-sounds-en-wav (scripts/test installs them)")
    raw = subprocess.run(
        ["sox", str(path), "-r", str(SR), "-c", "1", "-e", "floating-point", "-b", "32",
         "-t", "raw", "-"],
        check=True, capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype=np.float32).copy()


def _room(event: np.ndarray, seconds: float = 14.0, at: float = 4.0) -> np.ndarray:
    """``event`` at ``at`` s in a quiet room (noise at about -55 dBFS)."""
    rng = np.random.default_rng(1)
    out = (rng.normal(size=int(seconds * SR)) * 10 ** (-55 / 20)).astype(np.float32)
    i = int(at * SR)
    ev = event[: len(out) - i] / (np.max(np.abs(event)) + 1e-9) * 0.5
    out[i : i + len(ev)] += ev
    return out


def _repeat(clip: np.ndarray, seconds: float, gap: float) -> np.ndarray:
    one = np.concatenate([clip, np.zeros(int(gap * SR), np.float32)])
    return np.tile(one, int(np.ceil(seconds * SR / len(one))))[: int(seconds * SR)]


@pytest.fixture(scope="module")
def gate() -> ModelRunner:
    return ModelRunner.load(config_mod.resolve_model("builtin:sound", "int8"), 1)


def _fired(gate: ModelRunner, audio: np.ndarray) -> list[tuple[str, float]]:
    """Fires of the default trigger rules over ``audio``, hop by hop as the device loop runs."""
    a = gate.manifest.audio
    assert a is not None
    p = TriggerPolicy(TriggerSection())
    fires = []
    for end in range(a.window_samples, len(audio) + 1, a.hop_samples):
        out = gate.classify(audio[end - a.window_samples : end], end)
        fires += [(d.label, end / SR) for d in p.update(end / SR, out.scores) if d.fired]
    return fires


@pytest.mark.parametrize(
    "name", ["dialog-warning.oga", "bell.oga", "message-new-instant.oga", "complete.oga",
             "camera-shutter.oga", "power-plug.oga"])
def test_single_chime_or_click_fires_nothing(gate: ModelRunner, name: str) -> None:
    assert _fired(gate, _room(_decode(FREEDESKTOP / name))) == []


def test_repeated_alert_fires_alarm(gate: ModelRunner) -> None:
    alert = _repeat(_decode(FREEDESKTOP / "dialog-warning.oga"), 5.0, gap=0.15)
    fires = _fired(gate, _room(alert))
    assert [lab for lab, _ in fires] == ["alarm"]
    assert 4.0 < fires[0][1] <= 4.0 + 5.0 + 2.0  # while the alert is in the window


def test_speech_fires_speech(gate: ModelRunner) -> None:
    speech = np.concatenate([_decode(ASTERISK / "demo-thanks.wav"),
                             _decode(ASTERISK / "please-try-again.wav")])
    fires = _fired(gate, _room(speech))
    assert [lab for lab, _ in fires] == ["speech"]
    assert 4.0 < fires[0][1] <= 4.0 + len(speech) / SR + 2.0
