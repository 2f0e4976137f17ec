"""Labelled 2 s windows (and long held-out streams) for the sound gate, built offline.

Sources, all from Debian packages:

* speech: Allison Smith's Asterisk prompts (real human voice, 8 kHz telephone band), the ALSA
  channel announcements in the freedesktop theme (real voice), and espeak-ng (synthetic, full
  band, many accents and languages);
* alarm: freedesktop ringing/busy/warning sounds plus synthesised alarms (smoke-alarm T3 beeps,
  sirens, hi-lo two-tone, buzzers, beep trains, mechanical bells);
* background: generated noise beds (white/pink/brown, mains hum, rumble, silence with hiss),
  real near-silent Asterisk recordings, and short non-alarm UI sounds (clicks, shutters).

**Held out by file.** Every real file is held out or not by a stable hash of its name; espeak
voices and sentences are split the same way, and synthetic alarms for the held-out set come from
a separate random stream. No held-out file is ever mixed into a training window.

Labels are set by construction: a window is ``speech`` or ``alarm`` when at least
``MIN_EVENT_SECONDS`` of that event (of which ``ACTIVE_SECONDS`` audible) lies inside it, else
``background``. Single short beeps and blips are generated as background on purpose.
To keep the model from learning "band-limited audio means Asterisk means speech", every class is
sometimes passed through a telephone band filter.
"""

from __future__ import annotations

import subprocess
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import soxr
from tqdm import tqdm

from edgekeeper.cloud.training.sources import (
    ASTERISK_SOUNDS,
    FREEDESKTOP_SOUNDS,
    decode_audio,
    require,
    require_tool,
)

SR = 16_000
WINDOW = 2 * SR
LABELS = ("background", "speech", "alarm")
BACKGROUND, SPEECH, ALARM = 0, 1, 2
# How much of an event a window must hold to carry its label: the part inside the window must
# span this long *and* be audible for ACTIVE_SECONDS (a T3 smoke alarm's 1.5 s pause or a gap
# between words does not count). Alarms need more than speech: an alarm is a sound that goes on
# or repeats, and one short UI beep must stay `background`.
MIN_EVENT_SECONDS = {1: 0.5, 2: 1.0}
ACTIVE_SECONDS = {1: 0.3, 2: 0.5}

ALARM_SOUNDS = (
    "alarm-clock-elapsed.oga",
    "phone-incoming-call.oga",
    "phone-outgoing-busy.oga",
    "phone-outgoing-calling.oga",
    "dialog-warning.oga",
    "suspend-error.oga",
)
SPEECH_SOUNDS = tuple(
    f"audio-channel-{p}.oga"
    for p in (
        "front-center",
        "front-left",
        "front-right",
        "rear-center",
        "rear-left",
        "rear-right",
        "side-left",
        "side-right",
    )
)
# Short sounds that are neither speech nor alarm: the gate must stay quiet on them.
BACKGROUND_SOUNDS = (
    "camera-shutter.oga",
    "screen-capture.oga",
    "trash-empty.oga",
    "power-plug.oga",
    "power-unplug.oga",
    "device-added.oga",
    "device-removed.oga",
    "audio-volume-change.oga",
    "network-connectivity-established.oga",
    "network-connectivity-lost.oga",
    "message.oga",
    "audio-test-signal.oga",
)
# Chimes and bells (bell, complete, service-login...) are left out on purpose: whether a chime is
# an "alarm" is a judgement call the labels cannot settle, so they neither teach nor test.

ESPEAK_TRAIN_VOICES = ("en", "en-us", "en-gb-x-rp", "en-gb-x-gbclan", "en-029", "de", "fr", "es")
ESPEAK_HELDOUT_VOICES = ("en-gb-scotland", "en-us-nyc", "en-gb-x-gbcwmd", "it", "nl")
ESPEAK_VARIANTS = ("", "+m1", "+m3", "+m5", "+f1", "+f2", "+f3", "+f4", "+f5")
TRAIN_SENTENCES = (
    "The delivery van is parked outside the front gate.",
    "Could you please close the window before you leave?",
    "I think the meeting has been moved to Thursday afternoon.",
    "Somebody left the lights on in the garage again.",
    "Turn left at the roundabout and take the second exit.",
    "We are out of milk, bread and coffee.",
    "Hello, is anybody home? I have a parcel for you.",
    "The weather tomorrow will be cloudy with some rain.",
    "Please remember to feed the cat at six o'clock.",
    "Yes, that sounds good to me, let's do it.",
    "Where did you put the keys to the shed?",
    "Numbers one two three four five six seven eight nine ten.",
    "The quick brown fox jumps over the lazy dog.",
    "It is twenty past three and the train is late again.",
    "Can you hear me? The line is very bad today.",
    "They said the repairs would take about two weeks.",
    "Good morning everyone, the shop opens at nine.",
    "Stop! Wait for me, I am coming with you.",
    "My phone battery died halfway through the call.",
    "The children are playing football in the park.",
)
HELDOUT_SENTENCES = (
    "Excuse me, could you tell me the way to the station?",
    "The heating has been making a strange noise all week.",
    "I will call you back as soon as I get home.",
    "Dinner is ready, come and sit down at the table.",
    "Security, please report to the loading bay.",
    "Thank you for waiting, your order is ready.",
)


# The bundled sample recording plays this alarm, so it must never be trained on.
FORCED_HELDOUT = frozenset({"alarm-clock-elapsed.oga"})


def heldout_file(name: str, every: int = 4) -> bool:
    """Stable, seed-independent split by file name: about one file in ``every``."""
    return zlib.crc32(name.encode()) % every == 1


# ---------------------------------------------------------------- loading real material


def trim(x: np.ndarray, top_db: float = 35.0) -> np.ndarray:
    """Cut leading/trailing near-silence so "the event" means audible sound."""
    if len(x) == 0:
        return x
    frame = 320
    n = len(x) // frame
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    if rms.max() < 1e-5:  # digital silence (below -100 dBFS): nothing audible to keep
        return x[:0]
    loud = np.nonzero(20 * np.log10(rms / rms.max()) > -top_db)[0]
    if len(loud) == 0:
        return x[:0]
    return x[loud[0] * frame : (loud[-1] + 1) * frame]


@cache
def _decoded(path: Path) -> np.ndarray:
    return decode_audio(path, SR)


def espeak(text: str, voice: str, *, speed: int, pitch: int) -> np.ndarray:
    """Synthetic speech at 16 kHz (espeak-ng writes 22.05 kHz; soxr resamples)."""
    exe = require_tool("espeak-ng")
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp.name, text]
        subprocess.run(cmd, check=True, capture_output=True)
        return trim(decode_audio(Path(tmp.name), SR))


@dataclass(frozen=True)
class Pools:
    """Event clips for one split: lists of mono float32 arrays at 16 kHz."""

    speech: list[np.ndarray]
    alarm_real: list[np.ndarray]
    background_real: list[np.ndarray]
    names: dict[str, list[str]]


def _asterisk_files() -> list[Path]:
    root = require(ASTERISK_SOUNDS)
    return sorted(p for p in root.rglob("*.wav") if p.parent.name != "silence")


def _silence_files() -> list[Path]:
    return sorted((require(ASTERISK_SOUNDS) / "silence").glob("*.wav"))


def load_pools(heldout: bool, rng: np.random.Generator, *, progress: bool) -> Pools:
    """Real and espeak clips for the training (``heldout=False``) or held-out split."""
    names: dict[str, list[str]] = {"speech": [], "alarm": [], "background": []}
    speech: list[np.ndarray] = []
    files = [
        p for p in _asterisk_files() if heldout_file(str(p.relative_to(ASTERISK_SOUNDS))) == heldout
    ]
    for p in tqdm(
        files, desc=f"speech files ({'held-out' if heldout else 'train'})", disable=not progress
    ):
        clip = trim(_decoded(p))
        if len(clip) >= SR // 4:
            speech.append(clip)
            names["speech"].append(f"asterisk:{p.relative_to(ASTERISK_SOUNDS)}")
    for name in SPEECH_SOUNDS:
        if heldout_file(name) == heldout:
            speech.append(trim(_decoded(require(FREEDESKTOP_SOUNDS / name))))
            names["speech"].append(f"freedesktop:{name}")
    voices = ESPEAK_HELDOUT_VOICES if heldout else ESPEAK_TRAIN_VOICES
    sentences = HELDOUT_SENTENCES if heldout else TRAIN_SENTENCES
    n_synth = 60 if heldout else 240
    for _ in tqdm(range(n_synth), desc="espeak-ng", disable=not progress):
        voice = voices[int(rng.integers(len(voices)))]
        variant = ESPEAK_VARIANTS[int(rng.integers(len(ESPEAK_VARIANTS)))]
        text = sentences[int(rng.integers(len(sentences)))]
        speech.append(
            espeak(
                text,
                voice + variant,
                speed=int(rng.integers(120, 200)),
                pitch=int(rng.integers(25, 75)),
            )
        )
        names["speech"].append(f"espeak-ng:{voice}{variant}")
    alarm_real = []
    for name in ALARM_SOUNDS:
        if (heldout_file(name) or name in FORCED_HELDOUT) == heldout:
            alarm_real.append(trim(_decoded(require(FREEDESKTOP_SOUNDS / name))))
            names["alarm"].append(f"freedesktop:{name}")
    background_real = []
    for name in BACKGROUND_SOUNDS:
        if heldout_file(name) == heldout:
            background_real.append(trim(_decoded(require(FREEDESKTOP_SOUNDS / name))))
            names["background"].append(f"freedesktop:{name}")
    for p in _silence_files():
        if heldout_file(f"silence/{p.name}") == heldout:
            background_real.append(_decoded(p))
            names["background"].append(f"asterisk:silence/{p.name}")
    return Pools(speech, alarm_real, background_real, names)


# ---------------------------------------------------------------- synthesis


def _tone(freq: np.ndarray | float, n: int, harmonics: int, rng: np.random.Generator) -> np.ndarray:
    """A tone (fixed or swept frequency) with a few odd harmonics, like cheap piezo sounders."""
    f = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    phase = 2 * np.pi * np.cumsum(f) / SR + rng.uniform(0, 2 * np.pi)
    out = np.sin(phase)
    for k in range(3, 2 * harmonics + 2, 2):
        out += np.sin(k * phase) / k * rng.uniform(0.3, 1.0)
    return out / np.max(np.abs(out))


def synth_alarm(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """One synthetic alarm of a random family: what smoke alarms, sirens and buzzers sound like."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    family = int(rng.integers(6))
    harmonics = int(rng.integers(0, 4))
    if family == 0:  # beep train: on/off at one pitch
        f = rng.uniform(700, 4000)
        on, off = rng.uniform(0.05, 0.5), rng.uniform(0.05, 0.5)
        gate = (t % (on + off)) < on
        out = _tone(f, n, harmonics, rng) * gate
    elif family == 1:  # smoke alarm T3: three 0.5 s beeps, 1.5 s pause
        f = rng.uniform(2800, 3500)
        cyc = t % 4.0
        gate = (cyc < 3.0) & ((cyc % 1.0) < 0.5)
        out = _tone(f, n, harmonics, rng) * gate
    elif family == 2:  # siren: frequency sweeps up and down
        lo, hi = rng.uniform(400, 900), rng.uniform(1100, 2000)
        period = rng.uniform(0.2, 3.0)
        saw = (t / period) % 1.0
        sweep = lo + (hi - lo) * (np.abs(2 * saw - 1) if rng.random() < 0.5 else saw)
        out = _tone(sweep, n, harmonics, rng)
    elif family == 3:  # hi-lo two-tone
        f1, f2 = rng.uniform(400, 1000), rng.uniform(1000, 2500)
        period = rng.uniform(0.3, 1.2)
        f = np.where((t % period) < period / 2, f1, f2)
        out = _tone(f, n, harmonics, rng)
    elif family == 5:  # mechanical bell (fire bell, alarm clock): a clapper striking metal
        out = np.zeros(n)
        f0 = rng.uniform(1200, 4000)
        partials = np.array([1.0, 2.32, 4.25, 6.63]) * rng.uniform(0.97, 1.03, 4)
        k = np.arange(int(0.15 * SR)) / SR
        strike = sum(
            np.sin(2 * np.pi * f0 * r * k) * np.exp(-k * rng.uniform(15, 60) * r) / r
            for r in partials
        )
        rate = rng.uniform(12, 30)  # strikes per second
        burst, gap = rng.uniform(0.3, 1.5), rng.uniform(0.0, 0.8)
        for hit in np.arange(0, seconds, 1 / rate):
            if hit % (burst + gap) < burst:
                at = int(hit * SR)
                seg = strike[: n - at] * rng.uniform(0.6, 1.0)
                out[at : at + len(seg)] += seg
        out = out / (np.max(np.abs(out)) + 1e-9)
    else:  # buzzer: harsh low square-ish tone, pulsed
        f = rng.uniform(200, 700)
        out = np.sign(np.sin(2 * np.pi * f * t)) * 0.7 + _tone(f, n, 1, rng) * 0.3
        period = rng.uniform(0.3, 1.5)
        out = out * ((t % period) < period * rng.uniform(0.4, 0.8))
    ramp = min(n, 80)
    out[:ramp] *= np.linspace(0, 1, ramp)
    return out.astype(np.float32)


def _colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power ~ 1/f**exponent (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.normal(size=n))
    f = np.fft.rfftfreq(n, 1 / SR)
    f[0] = f[1]
    spec /= f ** (exponent / 2)
    out = np.fft.irfft(spec, n)
    return out / (np.std(out) + 1e-9)


def background_bed(rng: np.random.Generator, n: int, real: list[np.ndarray]) -> np.ndarray:
    """Ambient sound for one window or stream: noise, hum, rumble, sometimes a real snippet."""
    kind = rng.random()
    out = _colored_noise(rng, n, float(rng.choice([0.0, 1.0, 1.5, 2.0]))) * rng.uniform(0.2, 1.0)
    if kind < 0.25:  # mains hum with harmonics (fridges, transformers)
        base = 50.0 if rng.random() < 0.5 else 60.0
        t = np.arange(n) / SR
        hum = sum(np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6)) / k for k in (1, 2, 3, 4))
        out = out * 0.3 + hum * rng.uniform(0.3, 1.0)
    elif kind < 0.4:  # slowly varying rumble (traffic, wind)
        env = np.interp(np.arange(n), np.linspace(0, n, 8), rng.uniform(0.2, 1.0, 8))
        out = _colored_noise(rng, n, 2.0) * env
    if rng.random() < 0.2:  # one or two short UI beeps/blips: not an alarm
        t = np.arange(int(rng.uniform(0.03, 0.3) * SR)) / SR
        for _ in range(int(rng.integers(1, 3))):
            blip = _tone(rng.uniform(300, 4000), len(t), int(rng.integers(0, 3)), rng)
            blip = blip * np.exp(-t * rng.uniform(0, 20)) * 10 ** (rng.uniform(-8, 6) / 20)
            at = int(rng.integers(0, n - len(t)))
            out[at : at + len(t)] += blip * np.std(out) * 4
    level = 10 ** (rng.uniform(-70, -28) / 20)
    out = out / (np.sqrt(np.mean(out**2)) + 1e-9) * level
    if real and rng.random() < 0.35:  # a real snippet: a click, a shutter, a quiet room
        clip = real[int(rng.integers(len(real)))]
        clip = clip / (np.max(np.abs(clip)) + 1e-9) * 10 ** (rng.uniform(-40, -10) / 20)
        clip = clip[:n]
        at = int(rng.integers(0, n - len(clip) + 1))
        out[at : at + len(clip)] += clip
    return out.astype(np.float32)


def _frame_rms(x: np.ndarray, frame: int = 320) -> np.ndarray:
    n = len(x) // frame
    return np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)


def active_seconds(x: np.ndarray, reference: float | None = None, top_db: float = 30.0) -> float:
    """Seconds of 20 ms frames within ``top_db`` of ``reference`` (default: x's loudest frame).

    Pass the whole event's loudest frame as ``reference`` when measuring a part of it, so a faint
    tail does not count as the event.
    """
    rms = _frame_rms(x)
    if len(rms) == 0:
        return 0.0
    ref = rms.max() if reference is None else reference
    return float(np.sum(rms > ref * 10 ** (-top_db / 20))) * 320 / SR


def phone_band(x: np.ndarray) -> np.ndarray:
    """Down to 8 kHz and back: the band an Asterisk prompt has."""
    return soxr.resample(soxr.resample(x, SR, 8000), 8000, SR)[: len(x)].astype(np.float32)


def _event(
    kind: int,
    pools: Pools,
    rng: np.random.Generator,
    synth_rng: np.random.Generator,
    seconds: float,
) -> np.ndarray:
    if kind == SPEECH:
        parts = [
            pools.speech[int(rng.integers(len(pools.speech)))]
            for _ in range(int(rng.integers(1, 4)))
        ]
        gap = np.zeros(int(rng.uniform(0.05, 0.4) * SR), dtype=np.float32)
        return np.concatenate([q for p in parts for q in (p, gap)])[: -len(gap) or None]
    if pools.alarm_real and rng.random() < 0.35:
        clip = pools.alarm_real[int(rng.integers(len(pools.alarm_real)))]
        reps = int(np.ceil(seconds * SR / max(1, len(clip))))
        return np.tile(clip, reps)[: int(seconds * SR)]  # ringing repeats
    return synth_alarm(synth_rng, seconds)


def mix(bed: np.ndarray, event: np.ndarray, at: int, rng: np.random.Generator) -> np.ndarray:
    """``event`` added into ``bed`` at sample ``at`` with a random SNR and loudness."""
    out = bed.copy()
    ev = event[: max(0, len(out) - at)]
    ev = ev / (np.max(np.abs(ev)) + 1e-9) * 10 ** (rng.uniform(-30, -1) / 20)
    bed_rms = np.sqrt(np.mean(bed**2)) + 1e-9
    ev_rms = np.sqrt(np.mean(ev**2)) + 1e-9
    snr_floor = 10 ** (rng.uniform(3, 12) / 20)  # never bury the event below ~3 dB SNR
    if ev_rms < bed_rms * snr_floor:
        ev = ev * (bed_rms * snr_floor / ev_rms)
    out[at : at + len(ev)] += ev
    peak = np.max(np.abs(out))
    return (out / peak * 0.99 if peak > 0.99 else out).astype(np.float32)


def make_window(
    label: int, pools: Pools, rng: np.random.Generator, synth_rng: np.random.Generator
) -> np.ndarray:
    """One 2 s training window whose label holds by construction."""
    bed = background_bed(rng, WINDOW, pools.background_real)
    if label != BACKGROUND:
        ev = _event(label, pools, rng, synth_rng, rng.uniform(1.5, 4.0))
        need = min(int(MIN_EVENT_SECONDS[label] * SR), len(ev))
        peak = float(_frame_rms(ev).max(initial=0.0))
        active = min(ACTIVE_SECONDS[label], 0.8 * active_seconds(ev))
        # Start anywhere that leaves `need` samples of the event, enough of them audible, inside.
        for _ in range(50):
            at = int(rng.integers(-(len(ev) - need), WINDOW - need + 1))
            part = ev[max(0, -at) : max(0, -at) + WINDOW - max(0, at)]
            if active_seconds(part, peak) >= active:
                break
        if at < 0:
            ev, at = ev[-at:], 0
        bed = mix(bed, ev, at, rng)
    if rng.random() < 0.25:
        bed = phone_band(bed)
    return bed


@dataclass(frozen=True)
class WindowSet:
    """Raw 2 s windows with labels; features are computed by the caller (features.py)."""

    audio: np.ndarray  # (N, 32000) float32
    labels: np.ndarray  # (N,) int64


def make_windows(
    pools: Pools, per_class: int, seed: int, *, progress: bool, desc: str
) -> WindowSet:
    rng = np.random.default_rng(seed)
    synth_rng = np.random.default_rng(seed + 1000)
    labels = np.repeat(np.arange(len(LABELS)), per_class)
    audio = np.stack(
        [
            make_window(int(lab), pools, rng, synth_rng)
            for lab in tqdm(labels, desc=desc, disable=not progress)
        ]
    )
    return WindowSet(audio, labels)


@dataclass(frozen=True)
class Stream:
    """A long held-out recording and the (label, start, end) of each event placed in it."""

    audio: np.ndarray
    events: list[tuple[str, float, float]]


def make_stream(
    pools: Pools,
    seconds: float,
    seed: int,
    *,
    event_every: float | None,
    kinds: tuple[int, ...] = (SPEECH, ALARM),
) -> Stream:
    """Background built from 10 s beds; with ``event_every`` an event every that many seconds.

    Without events the stream measures false triggers per hour on background alone.
    """
    rng = np.random.default_rng(seed)
    synth_rng = np.random.default_rng(seed + 1000)
    n = int(seconds * SR)
    chunk = 10 * SR
    beds = [background_bed(rng, chunk, pools.background_real) for _ in range(0, n, chunk)]
    out = np.concatenate(beds)[:n]
    events: list[tuple[str, float, float]] = []
    if event_every:
        for i, start in enumerate(np.arange(3.0, seconds - 6.0, event_every)):
            kind = kinds[i % len(kinds)]
            ev = _event(kind, pools, rng, synth_rng, rng.uniform(1.5, 3.0))
            at = int((start + rng.uniform(0, 2)) * SR)
            ev = ev[: n - at]
            out = mix(out, ev, at, rng)
            events.append((LABELS[kind], at / SR, (at + len(ev)) / SR))
    return Stream(out, events)


FeatureFn = Callable[[np.ndarray], np.ndarray]
