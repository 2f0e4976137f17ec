"""Labelled 2 s windows (and long held-out streams) for the sound gate, built offline.

Every recording comes from a Debian package (``SOURCES``: package, licence, where its files
are). Roles:

* speech: Asterisk prompts (real voices; ``NOT_SPEECH`` names the beeps, tones and the monkey
  recording, which are background instead), the ALSA channel announcements of the freedesktop
  theme, and espeak-ng (synthetic, many voices);
* alarm: real alert sounds of the desktop sound themes (``ALERT``: warning, error, battery-low,
  ringing...) *repeated* for seconds, plus synthesised alarms (smoke-alarm T3 beeps, sirens,
  hi-lo two-tone, buzzers, beep trains, mechanical bells);
* background: generated noise beds (white/pink/brown, mains hum, rumble), real room tone
  (Asterisk's silence files), real music (game soundtracks), and every theme sound played *once*
  (chimes, clicks, a single alert tone: one short sound is not an alarm). Speech or alarms over
  a music bed make TV- or radio-like windows.

**Held out by source.** Whole sources never reach training (``HELDOUT_SOURCES``: two other
sound themes, another music collection, the French and Spanish Asterisk voices, other espeak
voices and sentences); within the training sources a stable hash of each file name also holds
out about a quarter of the files. Held-out figures are computed per source.

Labels are set by construction: a window is ``speech`` or ``alarm`` when at least
``MIN_EVENT_SECONDS`` of that event (of which ``ACTIVE_SECONDS`` audible) lies inside it, else
``background``. To keep the model from learning "band-limited audio means Asterisk means
speech", every class is sometimes passed through a telephone band filter.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from tqdm import tqdm

from edgekeeper.cloud.training.sources import (
    ASTERISK_SOUNDS,
    FREEDESKTOP_SOUNDS,
    decode_audio,
    require_tool,
)

SR = 16_000
WINDOW = 2 * SR
LABELS = ("background", "speech", "alarm")
BACKGROUND, SPEECH, ALARM = 0, 1, 2
# How much of an event a window must hold to carry its label: the part inside the window must
# span this long *and* be audible for ACTIVE_SECONDS (a T3 smoke alarm's 1.5 s pause or a gap
# between words does not count). Alarms need more than speech: an alarm is a sound that goes on
# or repeats (1.5 s of a repeated alert holds parts of at least two of its tones), and one
# short alert tone must stay `background`.
MIN_EVENT_SECONDS = {1: 0.5, 2: 1.5}
ACTIVE_SECONDS = {1: 0.3, 2: 0.5}


@dataclass(frozen=True)
class Source:
    """One Debian package's recordings: where they are and under what licence."""

    name: str
    package: str
    licence: str
    root: Path
    patterns: tuple[str, ...]
    kind: str  # "theme", "music", "speech"

    def files(self) -> list[Path]:
        root = require_package(self.root, self.package)
        return sorted({p for pat in self.patterns for p in root.glob(pat) if p.is_file()})


SOUNDS = Path("/usr/share/sounds")
SOURCES = {
    s.name: s
    for s in (
        Source("freedesktop", "sound-theme-freedesktop",
               "GPL-2+, CC-BY-SA-3.0, CC-BY-3.0 (per file, see its debian/copyright)",
               FREEDESKTOP_SOUNDS, ("*.oga",), "theme"),
        Source("oxygen", "oxygen-sounds", "LGPL-3.0-or-later", SOUNDS, ("Oxygen-*.ogg",), "theme"),
        Source("gnome-audio", "gnome-audio", "CC-BY-SA-2.0, CC-BY-3.0", SOUNDS,
               ("*.wav", "gtk-events/*.wav", "panel/*.wav"), "theme"),
        Source("yaru", "yaru-theme-sound", "CC-BY-SA-4.0", SOUNDS / "Yaru" / "stereo",
               ("*.oga",), "theme"),
        Source("deepin", "deepin-sound-theme", "GPL-3+", SOUNDS / "deepin" / "stereo",
               ("*.wav",), "theme"),
        Source("asc-music", "asc-music", "GPL-2+", Path("/usr/share/games/asc/music"),
               ("*.mp3",), "music"),
        Source("frozen-bubble-music", "fb-music-high", "GPL-2",
               Path("/usr/share/games/frozen-bubble/snd"), ("*.xm",), "music"),
        # The hr-savino-* tracks are left out: Debian 12's ffmpeg cannot parse their headers.
        Source("hyperrogue-music", "hyperrogue-music", "GPL-2+",
               Path("/usr/share/hyperrogue/music"), ("hr3-*.ogg", "hr-domina-*.ogg"), "music"),
        Source("drascula-music", "drascula-music",
               "Drascula-License (free redistribution, see its debian/copyright)",
               Path("/usr/share/scummvm/drascula/audio"), ("track*.ogg",), "music"),
        Source("singularity-music", "singularity-music", "CC-BY-SA-3.0",
               Path("/usr/share/games/singularity/music"), ("*.ogg",), "music"),
        Source("asterisk-en", "asterisk-core-sounds-en-wav", "CC-BY-SA-3.0 (Allison Smith)",
               ASTERISK_SOUNDS, ("**/*.wav",), "speech"),
        Source("asterisk-fr", "asterisk-core-sounds-fr-wav", "CC-BY-SA-3.0 (June Wallack, fr-CA)",
               ASTERISK_SOUNDS.parent / "fr", ("**/*.wav",), "speech"),
        Source("asterisk-es", "asterisk-core-sounds-es-wav", "CC-BY-SA-3.0 (Allison Smith, es-MX)",
               ASTERISK_SOUNDS.parent / "es", ("**/*.wav",), "speech"),
    )
}
# Whole sources no training window ever comes from.
HELDOUT_SOURCES = frozenset(
    {"yaru", "deepin", "singularity-music", "asterisk-fr", "asterisk-es", "espeak-ng-heldout"}
)
DEBIAN_PACKAGES = tuple(sorted({s.package for s in SOURCES.values()}))

# Asterisk files that are not speech (names are the same in every language): tones and beeps,
# and a long recording of monkeys. They are background (one short sound) instead. Found by
# listing every prompt of under 0.5 s of audible sound and every file over 15 s and listening.
NOT_SPEECH = frozenset(
    {
        "beep.wav",
        "beeperr.wav",
        "ascending-2tone.wav",
        "descending-2tone.wav",
        "confbridge-join.wav",
        "confbridge-leave.wav",
        "tt-monkeys.wav",
    }
)
# Theme sounds that warn (repeated for seconds they are an alarm; played once, background).
ALERT = re.compile(r"alarm|warning|error|critical|battery|phone|ring|busy|calling|attention|nudge",
                   re.IGNORECASE)
# Speech in the freedesktop theme (a real voice naming speaker channels).
THEME_SPEECH = re.compile(r"^audio-channel-")
# Theme sounds that already ring on for seconds: never used as "played once" background.
LONG_ALARMS = frozenset({"alarm-clock-elapsed.oga", "phone-outgoing-busy.oga",
                         "Oxygen-Im-Phone-Ring.ogg"})

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


# The bundled sample recording and the trigger tests play these, so they are never trained on.
FORCED_HELDOUT = frozenset({"alarm-clock-elapsed.oga", "dialog-warning.oga"})


def heldout_file(name: str, every: int = 4) -> bool:
    """Stable, seed-independent split by file name: about one file in ``every``."""
    return zlib.crc32(name.encode()) % every == 1


def require_package(path: Path, package: str) -> Path:
    """``path`` if it exists, else one error naming the ``apt-get install`` that provides it."""
    from edgekeeper.errors import InputError

    if path.exists():
        return path
    raise InputError(f"training data {path} does not exist", fix=f"apt-get install {package}")


def check_sources() -> None:
    """Fail fast, before any slow step, if a package of ``SOURCES`` is missing."""
    for s in SOURCES.values():
        require_package(s.root, s.package)
        if not s.files():
            from edgekeeper.errors import InputError

            raise InputError(f"{s.root} holds no {s.patterns} files",
                             fix=f"apt-get install --reinstall {s.package}")


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
class Clip:
    audio: np.ndarray  # mono float32, 16 kHz
    source: str  # a SOURCES key, or espeak-ng / espeak-ng-heldout
    name: str  # source:relative/path


@dataclass(frozen=True)
class Pools:
    """Real and espeak clips for one split."""

    speech: list[Clip]
    alerts: list[Clip]  # real alert sounds, repeated to make alarms
    singles: list[Clip]  # real short sounds played once: background
    quiet: list[Clip]  # real room tone (Asterisk silence files)
    music: list[Clip]  # whole tracks
    synth_alarms: bool = True  # False: alarms only from real alerts (held-out event figures)

    @property
    def names(self) -> dict[str, list[str]]:
        return {
            "speech": [c.name for c in self.speech],
            "alarm": [c.name for c in self.alerts],
            "background": [c.name for c in self.singles + self.quiet + self.music],
        }

    def only(self, **sources: tuple[str, ...]) -> Pools:
        """The same pools with some roles cut to the given sources (per-source figures)."""
        cut: dict[str, Any] = {role: [c for c in getattr(self, role) if c.source in keep]
                               for role, keep in sources.items()}
        return replace(self, **cut)


def roles_of(src: Source, path: Path) -> tuple[str, ...]:
    """What one file of ``src`` is used as: speech, alerts (repeated: alarm), singles (played
    once: background), quiet (room tone) or music. Decided by name, as documented above."""
    if src.kind == "music":
        return ("music",)
    if src.kind == "speech":
        if path.parent.name == "silence":
            return ("quiet",)
        return ("singles",) if path.name in NOT_SPEECH else ("speech",)
    if THEME_SPEECH.match(path.name):
        return ("speech",)
    roles = ("alerts",) if ALERT.search(path.name) else ()
    return roles if path.name in LONG_ALARMS else (*roles, "singles")


def _in_split(source: str, rel: str, heldout: bool) -> bool:
    if source in HELDOUT_SOURCES:
        return heldout
    return (heldout_file(rel) or rel in FORCED_HELDOUT) == heldout


def load_pools(heldout: bool, rng: np.random.Generator, *, progress: bool) -> Pools:
    """Every clip of the training (``heldout=False``) or held-out split."""
    speech: list[Clip] = []
    alerts: list[Clip] = []
    singles: list[Clip] = []
    quiet: list[Clip] = []
    music: list[Clip] = []
    split = "held-out" if heldout else "train"
    for src in SOURCES.values():
        files = [p for p in src.files()
                 if _in_split(src.name, str(p.relative_to(src.root)), heldout)]
        for p in tqdm(files, desc=f"{src.name} ({split})", disable=not progress, leave=False):
            name = f"{src.name}:{p.relative_to(src.root)}"
            roles = roles_of(src, p)
            if "music" in roles or "quiet" in roles:  # whole recordings
                (music if "music" in roles else quiet).append(Clip(_decoded(p), src.name, name))
                continue
            clip = trim(_decoded(p))
            if len(clip) < SR // 4 and src.kind == "speech":
                continue  # a prompt with under 0.25 s of sound is no example of speech
            if len(clip) == 0:
                continue
            for role in roles:
                keep = clip[: 4 * SR] if role == "singles" else clip
                {"speech": speech, "alerts": alerts, "singles": singles}[role].append(
                    Clip(keep, src.name, name)
                )
    voices = ESPEAK_HELDOUT_VOICES if heldout else ESPEAK_TRAIN_VOICES
    sentences = HELDOUT_SENTENCES if heldout else TRAIN_SENTENCES
    source = "espeak-ng-heldout" if heldout else "espeak-ng"
    n_synth = 60 if heldout else 240
    for _ in tqdm(range(n_synth), desc="espeak-ng", disable=not progress, leave=False):
        voice = voices[int(rng.integers(len(voices)))]
        variant = ESPEAK_VARIANTS[int(rng.integers(len(ESPEAK_VARIANTS)))]
        text = sentences[int(rng.integers(len(sentences)))]
        speed, pitch = int(rng.integers(120, 200)), int(rng.integers(25, 75))
        audio = espeak(text, voice + variant, speed=speed, pitch=pitch)
        speech.append(Clip(audio, source, f"{source}:{voice}{variant}"))
    return Pools(speech, alerts, singles, quiet, music)


# ---------------------------------------------------------------- synthesis


def _tone(freq: np.ndarray | float, n: int, harmonics: int, rng: np.random.Generator) -> np.ndarray:
    """A tone (fixed or swept frequency) with a few odd harmonics, like cheap piezo sounders."""
    f = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    phase = 2 * np.pi * np.cumsum(f) / SR + rng.uniform(0, 2 * np.pi)
    out = np.sin(phase)
    for k in range(3, 2 * harmonics + 2, 2):
        out += np.sin(k * phase) / k * rng.uniform(0.3, 1.0)
    peak: float = np.max(np.abs(out))
    tone: np.ndarray = out / peak
    return tone


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
        hilo = np.where((t % period) < period / 2, f1, f2)
        out = _tone(hilo, n, harmonics, rng)
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


def _excerpt(rng: np.random.Generator, clips: list[Clip], n: int) -> np.ndarray:
    """``n`` samples from a random place of a random clip (whole tracks: music)."""
    track = clips[int(rng.integers(len(clips)))].audio
    if len(track) <= n:
        return np.resize(track, n)
    at = int(rng.integers(0, len(track) - n))
    return track[at : at + n]


def _at_rms(x: np.ndarray, dbfs: float) -> np.ndarray:
    scaled: np.ndarray = x / (np.sqrt(np.mean(x**2)) + 1e-9) * 10 ** (dbfs / 20)
    return scaled


def _add_single(rng: np.random.Generator, out: np.ndarray, clips: list[Clip]) -> None:
    """One real short sound, played once, somewhere in ``out`` (in place)."""
    clip = clips[int(rng.integers(len(clips)))].audio[: len(out)]
    clip = clip / (np.max(np.abs(clip)) + 1e-9) * 10 ** (rng.uniform(-40, -6) / 20)
    at = int(rng.integers(0, len(out) - len(clip) + 1))
    out[at : at + len(clip)] += clip


def background_bed(
    rng: np.random.Generator, n: int, pools: Pools, *, music: float = 0.35
) -> np.ndarray:
    """What a room sounds like with no event: noise, hum, rumble, music, a chime or a click.

    With probability ``music`` the bed is a music excerpt (radio, TV, a phone playing a game),
    which is the loud, tonal, rhythmic background the gate must not call an alarm.
    """
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
    if rng.random() < 0.2:  # one or two short synthetic beeps/blips: not an alarm
        t = np.arange(int(rng.uniform(0.03, 0.3) * SR)) / SR
        for _ in range(int(rng.integers(1, 3))):
            blip = _tone(rng.uniform(300, 4000), len(t), int(rng.integers(0, 3)), rng)
            blip = blip * np.exp(-t * rng.uniform(0, 20)) * 10 ** (rng.uniform(-8, 6) / 20)
            at = int(rng.integers(0, n - len(t)))
            out[at : at + len(t)] += blip * np.std(out) * 4
    out = _at_rms(out, rng.uniform(-70, -28))
    if pools.quiet and rng.random() < 0.15:  # real room tone
        out += _at_rms(_excerpt(rng, pools.quiet, n), rng.uniform(-65, -40))
    if pools.music and rng.random() < music:
        out = out * 0.3 + _at_rms(_excerpt(rng, pools.music, n), rng.uniform(-40, -12))
    if pools.singles and rng.random() < 0.45:  # a chime, a click, one alert tone, one beep
        _add_single(rng, out, pools.singles)
    return out.astype(np.float32)


def _frame_rms(x: np.ndarray, frame: int = 320) -> np.ndarray:
    n = len(x) // frame
    rms: np.ndarray = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    return rms


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
    narrow: np.ndarray = soxr.resample(soxr.resample(x, SR, 8000), 8000, SR)
    return narrow[: len(x)].astype(np.float32)


def repeat_alert(clip: np.ndarray, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A real alert sound going off again and again (a battery or error alert left sounding)."""
    gap = np.zeros(int(rng.uniform(0.05, 0.6) * SR), dtype=np.float32)
    one = np.concatenate([clip, gap])
    return np.tile(one, int(np.ceil(seconds * SR / len(one))))[: int(seconds * SR)]


def _event(
    kind: int,
    pools: Pools,
    rng: np.random.Generator,
    synth_rng: np.random.Generator,
    seconds: float,
) -> np.ndarray:
    if kind == SPEECH:
        parts = [
            pools.speech[int(rng.integers(len(pools.speech)))].audio
            for _ in range(int(rng.integers(1, 4)))
        ]
        gap = np.zeros(int(rng.uniform(0.05, 0.4) * SR), dtype=np.float32)
        return np.concatenate([q for p in parts for q in (p, gap)])[: -len(gap) or None]
    if pools.alerts and (not pools.synth_alarms or rng.random() < 0.6):
        clip = pools.alerts[int(rng.integers(len(pools.alerts)))].audio
        return repeat_alert(clip, max(seconds, 2.5), rng)
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
    # Half of all background windows are music: it is the background most like an alarm.
    bed = background_bed(rng, WINDOW, pools, music=0.5 if label == BACKGROUND else 0.35)
    if label != BACKGROUND:
        ev = _event(label, pools, rng, synth_rng, rng.uniform(1.5, 6.0))
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
    pools: Pools,
    per_class: int | tuple[int, int, int],
    seed: int,
    *,
    progress: bool,
    desc: str,
) -> WindowSet:
    """``per_class`` windows of each label (or a (background, speech, alarm) count each)."""
    rng = np.random.default_rng(seed)
    synth_rng = np.random.default_rng(seed + 1000)
    counts = (per_class,) * len(LABELS) if isinstance(per_class, int) else per_class
    labels = np.repeat(np.arange(len(LABELS)), counts)
    audio = np.stack(
        [
            make_window(int(lab), pools, rng, synth_rng)
            for lab in tqdm(labels, desc=desc, disable=not progress, leave=False)
        ]
    )
    return WindowSet(audio, labels)


@dataclass(frozen=True)
class Stream:
    """A long held-out recording, the (label, start, end) of each event in it, and its parts."""

    audio: np.ndarray
    events: list[tuple[str, float, float]]
    parts: list[tuple[str, float, float]]  # (kind of material, start, end): music, broadcast...


def make_event_stream(
    pools: Pools,
    seconds: float,
    seed: int,
    *,
    every: float,
    kinds: tuple[int, ...] = (SPEECH, ALARM),
    event_seconds: tuple[float, float] = (3.0, 8.0),
) -> Stream:
    """Background beds with an event every ``every`` seconds (alarms from ``pools.alerts``,
    repeated for ``event_seconds``), to count events caught through the trigger rule."""
    rng = np.random.default_rng(seed)
    synth_rng = np.random.default_rng(seed + 1000)
    n = int(seconds * SR)
    chunk = 10 * SR
    out = np.concatenate([background_bed(rng, chunk, pools) for _ in range(0, n, chunk)])[:n]
    events: list[tuple[str, float, float]] = []
    for i, start in enumerate(np.arange(3.0, seconds - every + 3.0, every)):
        kind = kinds[i % len(kinds)]
        ev = _event(kind, pools, rng, synth_rng, rng.uniform(*event_seconds))
        at = int((start + rng.uniform(0, 1)) * SR)
        ev = ev[: n - at]
        out = mix(out, ev, at, rng)
        events.append((LABELS[kind], at / SR, (at + len(ev)) / SR))
    return Stream(out, events, [("events", 0.0, seconds)])


def make_singles_stream(
    pools: Pools, seed: int, *, every: float = 8.0, longest: float = 2.5
) -> Stream:
    """Each of ``pools.singles`` of at most ``longest`` seconds (chimes, clicks, one alert tone,
    beeps) played once, one every ``every`` seconds, in a quiet room (no music: music is
    measured on its own): none may fire. ``events`` holds (name, start, end) of each sound.
    Longer single sounds (log-in jingles, an animal recording) are in the household stream."""
    rng = np.random.default_rng(seed)
    n = int(every * SR)
    parts, events = [], []
    short = [c for c in pools.singles if len(c.audio) <= longest * SR]
    for i, clip in enumerate(short):
        bed = background_bed(rng, n, replace(pools, singles=[]), music=0.0)
        x = clip.audio
        x = x / (np.max(np.abs(x)) + 1e-9) * 10 ** (rng.uniform(-20, -3) / 20)
        at = int(rng.uniform(1.0, 2.0) * SR)
        parts.append(mix(bed, x, at, rng))
        events.append((clip.name, i * every + at / SR, i * every + (at + len(x)) / SR))
    return Stream(np.concatenate(parts), events, [("singles", 0.0, len(parts) * every)])


def make_quiet_stream(
    pools: Pools, seed: int, *, music_s: float, broadcast_s: float, household_s: float
) -> Stream:
    """Continuous event-free material, in three parts one after the other:

    * music: whole stretches of held-out tracks at living-room levels;
    * broadcast: the same music with held-out speech over it, as a radio or TV plays it (speech
      is real speech here: only alarm triggers count as false in this part);
    * household: room noise beds with a held-out chime, click or single alert tone every few
      seconds.
    """
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    parts: list[tuple[str, float, float]] = []
    t = 0.0

    def music_run(seconds: float) -> np.ndarray:
        chunks, left = [], int(seconds * SR)
        while left > 0:  # 1-3 minute stretches of a track, each at its own volume
            n = min(left, int(rng.uniform(60, 180) * SR))
            chunks.append(_at_rms(_excerpt(rng, pools.music, n), rng.uniform(-35, -14)))
            left -= n
        x: np.ndarray = np.concatenate(chunks)
        mixed: np.ndarray = x + _at_rms(_colored_noise(rng, len(x), 1.0), -60)
        return mixed.astype(np.float32)

    x = music_run(music_s)
    out.append(x)
    parts.append(("music", t, t + len(x) / SR))
    t += len(x) / SR

    x = music_run(broadcast_s)
    at = int(rng.uniform(0.5, 2.0) * SR)
    while at < len(x) - SR:  # a presenter talking over the music, with short pauses
        utt = pools.speech[int(rng.integers(len(pools.speech)))].audio[: len(x) - at]
        level = np.sqrt(np.mean(x[at : at + len(utt)] ** 2)) * 10 ** (rng.uniform(0, 15) / 20)
        x[at : at + len(utt)] += _at_rms(utt, 20 * np.log10(level + 1e-9))
        at += len(utt) + int(rng.uniform(0.2, 3.0) * SR)
    x = np.clip(x, -0.99, 0.99)
    out.append(x)
    parts.append(("broadcast", t, t + len(x) / SR))
    t += len(x) / SR

    chunk = 10 * SR
    quiet = replace(pools, music=[], singles=[])
    beds = []
    for _ in range(int(household_s * SR) // chunk):
        bed = background_bed(rng, chunk, quiet)
        for _ in range(int(rng.integers(0, 3))):  # 0-2 single sounds per 10 s
            _add_single(rng, bed, pools.singles)
        beds.append(bed)
    x = np.concatenate(beds)
    out.append(x)
    parts.append(("household", t, t + len(x) / SR))
    return Stream(np.concatenate(out).astype(np.float32), [], parts)


FeatureFn = Callable[[np.ndarray], np.ndarray]
