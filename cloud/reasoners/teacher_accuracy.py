"""How often a teacher's audio label is right, per label, on labelled real clips.

``labelled_clips()`` builds the set from Debian packages (``PACKAGES``); labels are set by
construction, with the gate's own conventions (cloud/training/data_audio.py): an alert sound
*repeated* for seconds is an alarm, played once it is background; music is its own label here
(background to the gate, which has no music label). Every clip is 4 s (an event's clip is a few
seconds) over a quiet pink-noise bed (room tone; fixed seed), so the set is reproducible.

``score(truth, predicted)`` gives per-label precision and recall, accuracy and the confusion
matrix; bench/bench_teacher.py prints them for the offline teacher, the learning loop may reuse
both to check a teacher before trusting its labels.

Whole sources are held out (``HELDOUT_SOURCES``: another sound theme, another voice and
language, another composer's music): the rules in audio_judge.py were set looking at every other
source (the "tuning" clips), so only the held-out figures say how well they generalise.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekeeper.errors import InputError

RATE = 16_000
CLIP_SECONDS = 4.0
BED_DBFS = -50.0  # room tone under every clip
ASTERISK = Path("/usr/share/asterisk/sounds/en")
FREEDESKTOP = Path("/usr/share/sounds/freedesktop/stereo")
CHROMIUM_BSU = Path("/usr/share/games/chromium-bsu/wav")
FROZEN_BUBBLE = Path("/usr/share/games/frozen-bubble/snd")
YARU = Path("/usr/share/sounds/Yaru/stereo")
ASTERISK_ES = Path("/usr/share/asterisk/sounds/es")
SINGULARITY = Path("/usr/share/games/singularity/music")
PACKAGES = {
    ASTERISK: "asterisk-core-sounds-en-wav",
    FREEDESKTOP: "sound-theme-freedesktop",
    CHROMIUM_BSU: "chromium-bsu-data",
    FROZEN_BUBBLE: "frozen-bubble-data",  # optional: more music and game sounds
    YARU: "yaru-theme-sound",  # optional, held out
    ASTERISK_ES: "asterisk-core-sounds-es-wav",  # optional, held out
    SINGULARITY: "singularity-music",  # optional, held out
}
# Same vocabulary as the gate's recipe (cloud/training/data_audio.py).
ALERT = re.compile(r"alarm|warning|error|critical|battery|phone|ring|busy|calling|attention",
                   re.IGNORECASE)
LONG_ALARMS = frozenset({"alarm-clock-elapsed.oga", "phone-outgoing-busy.oga"})
NOT_SPEECH = frozenset({"beep.wav", "beeperr.wav", "ascending-2tone.wav",
                        "descending-2tone.wav", "confbridge-join.wav", "confbridge-leave.wav",
                        "tt-monkeys.wav"})
BEEPS = ("beep.wav", "beeperr.wav")  # repeated: a beep train is an alarm
# Never looked at while the rules of audio_judge.py were set (every other source was).
HELDOUT_SOURCES = frozenset({"yaru", "asterisk-es", "singularity"})
LABELS = ("speech", "alarm", "music", "background")


@dataclass(frozen=True)
class Clip:
    name: str
    label: str
    source: str
    pcm: np.ndarray  # mono float32 at RATE, CLIP_SECONDS long
    heldout: bool


def read_audio(path: Path) -> np.ndarray:
    """Mono float32 at RATE from any file libsndfile reads (wav, oga, ogg)."""
    import soundfile
    import soxr

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    pcm = data.mean(axis=1)
    if rate != RATE:
        pcm = soxr.resample(pcm, rate, RATE)
    return np.asarray(pcm, dtype=np.float32)


def to_wav(pcm: np.ndarray, rate: int = RATE) -> bytes:
    """16-bit mono WAV bytes (what a device sends as ``audio_wav``)."""
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _bed(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(n)
    spec = np.fft.rfft(white)
    spec /= np.sqrt(np.maximum(1, np.arange(spec.size)))  # pink: -3 dB per octave
    pink = np.fft.irfft(spec, n)
    pink /= np.sqrt(np.mean(pink ** 2)) + 1e-12
    return (pink * 10 ** (BED_DBFS / 20)).astype(np.float32)


def _place(sound: np.ndarray, seed: int, *, at: float = 0.5) -> np.ndarray:
    n = int(CLIP_SECONDS * RATE)
    out = _bed(n, seed)
    start = int(at * RATE)
    part = sound[: n - start]
    out[start:start + part.size] += part
    return out


def _repeat(sound: np.ndarray, gap: float, seconds: float) -> np.ndarray:
    one = np.concatenate([sound, np.zeros(int(gap * RATE), np.float32)])
    reps = int(np.ceil(seconds * RATE / one.size))
    return np.tile(one, reps)[: int(seconds * RATE)]


def _need(path: Path) -> Path:
    if not path.is_dir():
        raise InputError(f"{path} does not exist",
                         fix=f"apt-get install {PACKAGES.get(path, 'the package that has it')}")
    return path


def _theme(add: Any, root: Path, source: str) -> None:
    """A desktop sound theme: alerts repeated (alarm) and once (background), chimes once,
    spoken channel names (speech)."""
    for path in sorted(root.glob("*.og[ag]")):
        pcm = read_audio(path)
        if path.name in LONG_ALARMS:
            add(path.name, "alarm", source, pcm[int(0.2 * RATE):], place=False)
        elif path.name.startswith("audio-channel-"):
            add(path.name, "speech", source, pcm)
        elif ALERT.search(path.name):
            add(path.name + " x repeated", "alarm", source,
                _repeat(pcm, 0.25, CLIP_SECONDS - 0.5))
            add(path.name + " once", "background", source, pcm)
        elif path.name != "audio-test-signal.oga":  # pink noise + voice: ambiguous by design
            add(path.name + " once", "background", source, pcm)


def _prompts(add: Any, root: Path, source: str, every: int) -> None:
    """Asterisk: every ``every``-th spoken prompt (speech), its beeps repeated (alarm) and once
    (background), a few room-tone files (background)."""
    for name in BEEPS:
        if (root / name).is_file():
            pcm = read_audio(root / name)
            add(name + " x repeated", "alarm", source, _repeat(pcm, 0.4, CLIP_SECONDS - 0.5))
            add(name + " once", "background", source, pcm)
    prompts = [p for p in sorted(root.glob("*.wav")) if p.name not in NOT_SPEECH]
    for path in prompts[::every]:
        pcm = read_audio(path)
        if pcm.size >= int(1.2 * RATE):
            add(path.name, "speech", source, pcm)
    for path in sorted((root / "silence").glob("*.wav"))[:3]:
        add("silence/" + path.name, "background", source, read_audio(path))


def _music(add: Any, path: Path, source: str, starts: Sequence[float]) -> None:
    pcm = read_audio(path)
    seconds = pcm.size / RATE
    for start in starts:
        if start == 0.0 or start + CLIP_SECONDS <= seconds:
            seg = pcm[int(start * RATE):int((start + CLIP_SECONDS) * RATE)]
            add(f"{path.name}@{start:g}s", "music", source, seg, place=False)


def labelled_clips(*, limit_per_label: int = 0, optional: bool = True) -> list[Clip]:
    """The labelled set (see the module docstring). ``limit_per_label`` > 0 keeps an evenly
    spaced subset of each label (tests). ``optional`` adds the sources scripts/test does not
    install when they are present: more music and game sounds (frozen-bubble-data), and the
    held-out sources (``HELDOUT_SOURCES``: yaru-theme-sound, asterisk-core-sounds-es-wav,
    singularity-music)."""
    clips: list[Clip] = []

    def add(name: str, label: str, source: str, pcm: np.ndarray, *, place: bool = True) -> None:
        seed = zlib.crc32(f"{source}/{name}".encode())
        x = _place(pcm, seed) if place else pcm[: int(CLIP_SECONDS * RATE)]
        if x.size < int(CLIP_SECONDS * RATE):
            x = np.concatenate([x, _bed(int(CLIP_SECONDS * RATE) - x.size, seed)])
        clips.append(Clip(name, label, source, x.astype(np.float32),
                          source in HELDOUT_SOURCES))

    _theme(add, _need(FREEDESKTOP), "freedesktop")
    ast = _need(ASTERISK)
    _prompts(add, ast, "asterisk-en", 6)
    add("tt-monkeys.wav", "background", "asterisk-en", read_audio(ast / "tt-monkeys.wav"))
    for path in sorted(_need(CHROMIUM_BSU).glob("*.wav")):
        if path.name.startswith("music_"):
            _music(add, path, "chromium-bsu", (0.0, 2.5))
        else:
            add(path.name, "background", "chromium-bsu", read_audio(path))
    if optional and FROZEN_BUBBLE.is_dir():
        for path in sorted(FROZEN_BUBBLE.glob("*.ogg")):
            if "zik" in path.name:  # "musique": the soundtracks and the intro jingle
                _music(add, path, "frozen-bubble", np.arange(5.0, 120.0, 11.0).tolist())
            else:
                add(path.name, "background", "frozen-bubble", read_audio(path))
    if optional and YARU.is_dir():
        _theme(add, YARU, "yaru")
    if optional and ASTERISK_ES.is_dir():
        _prompts(add, ASTERISK_ES, "asterisk-es", 12)
    if optional and SINGULARITY.is_dir():
        for path in sorted(SINGULARITY.glob("*.ogg")):
            _music(add, path, "singularity", (30.0, 90.0, 150.0))
    for i, (kind, db) in enumerate((("white", -30), ("pink", -25), ("brown", -20), ("hum", -30))):
        n = int(CLIP_SECONDS * RATE)
        rng = np.random.default_rng(100 + i)
        if kind == "hum":
            t = np.arange(n) / RATE
            x = sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 6))
            x = x + 0.3 * rng.standard_normal(n)
        else:
            spec = np.fft.rfft(rng.standard_normal(n))
            slope = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]
            spec /= np.maximum(1, np.arange(spec.size)) ** slope
            x = np.fft.irfft(spec, n)
        x = x / (np.sqrt(np.mean(x ** 2)) + 1e-12) * 10 ** (db / 20)
        add(f"generated {kind} noise", "background", "generated", x.astype(np.float32),
            place=False)
    if limit_per_label > 0:
        kept: list[Clip] = []
        for label in LABELS:
            of = [c for c in clips if c.label == label]
            step = max(1, len(of) // limit_per_label)
            kept.extend(of[::step][:limit_per_label])
        clips = kept
    return clips


@dataclass(frozen=True)
class Score:
    labels: tuple[str, ...]
    confusion: list[list[int]]  # rows: truth, columns: predicted, in ``labels`` order
    precision: dict[str, float]
    recall: dict[str, float]
    support: dict[str, int]
    accuracy: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "confusion": self.confusion,
                "precision": self.precision, "recall": self.recall, "support": self.support,
                "accuracy": self.accuracy, "n": self.n}

    def table(self) -> str:
        w = max(len(x) for x in self.labels) + 2
        lines = ["truth \\ predicted".ljust(w + 6) + "".join(x.rjust(w) for x in self.labels)
                 + "   recall"]
        for label, row in zip(self.labels, self.confusion, strict=True):
            lines.append(label.ljust(w + 6) + "".join(str(v).rjust(w) for v in row)
                         + f"   {self.recall[label]:.2f}")
        lines.append("precision".ljust(w + 6)
                     + "".join(f"{self.precision[x]:.2f}".rjust(w) for x in self.labels))
        lines.append(f"accuracy {self.accuracy:.3f} on {self.n} clips")
        return "\n".join(lines)


def score(truth: Sequence[str], predicted: Sequence[str],
          labels: Iterable[str] = LABELS) -> Score:
    """Per-label precision/recall, accuracy and the confusion matrix. A prediction outside
    ``labels`` counts as wrong for its clip (and in no column)."""
    order = tuple(labels)
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} truths but {len(predicted)} predictions")
    at = {x: i for i, x in enumerate(order)}
    m = [[0] * len(order) for _ in order]
    for t, p in zip(truth, predicted, strict=True):
        if t in at and p in at:
            m[at[t]][at[p]] += 1
    support = {x: sum(1 for t in truth if t == x) for x in order}
    col = {x: sum(m[i][at[x]] for i in range(len(order))) for x in order}
    precision = {x: round(m[at[x]][at[x]] / col[x], 3) if col[x] else 0.0 for x in order}
    recall = {x: round(m[at[x]][at[x]] / support[x], 3) if support[x] else 0.0 for x in order}
    right = sum(1 for t, p in zip(truth, predicted, strict=True) if t == p)
    acc = round(right / len(truth), 3) if truth else 0.0
    return Score(order, m, precision, recall, support, acc, len(truth))
