"""The offline teacher's ear: an honest DSP judgement of a clip as speech, alarm, music or
background, from its short-time spectrum (numpy only; about 6 ms of CPU per second of audio
on a 2-core x86 machine).

What each label looks like, and what is measured for it (``AudioFeatures``):

* **alarm**: a narrow-band tone (at most ``BEEP_MAX_PEAKS`` spectral peaks, or tonal and
  steady frames; one or two pitches; strongest at ``BEEP_MIN_HZ`` or above) that switches on and
  off with a regular period (``period_strength``: the loud/quiet envelope's autocorrelation
  peak at 0.1-2 s, over two onsets or more: a smoke alarm's beeps, a ringing phone, a repeated
  alert), or one steady tone through most of the clip, or a tone that glides (a siren).
* **speech**: a harmonic stack in the voice band (strongest below ``VOICE_MAX_HZ``, 4-12 peaks,
  not noise-flat) broken into two bursts or more with deep gaps between them
  (``level_range_db``). A PocketSphinx transcript raises the confidence; alone, with a voiced
  spectrum, it is weak evidence (the recognizer "hears" words in music and noise too).
* **music**: harmonic texture (several peaks) well above the room that goes on without deep
  gaps, or a steady beat.
* **background**: everything else (noise, hum, silence, one short chime or click: one short
  sound is not an alarm, as in the gate's training data).

``syllable_share`` (voice-band modulation at 2-8 Hz) and ``onsets_per_second`` are reported in
``extra.audio_judgement`` but the rules use only the onset count: on these clips the syllable
share did not separate speech from music.

The rules are hand-set on Debian's sound theme, Asterisk prompts and game music (see
bench/bench_teacher.py, docs/reasoning.md for the accuracy per label); confidences are modest
by design, and the judgement never claims more than the features show.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RATE = 16_000
N_FFT = 512  # 32 ms: fine enough (31 Hz bins) to separate a tone from a harmonic stack
HOP = 160  # 10 ms
MAX_SECONDS = 30.0
BAND = (150.0, 7_500.0)  # below: hum and rumble; above: little but hiss at 16 kHz
VOICE_BAND = (300.0, 3_400.0)
LOUD_ABOVE_FLOOR_DB = 12.0  # a frame is loud this far above the clip's quiet floor...
SILENCE_DBFS = -55.0  # ...and above this absolute level
PEAK_WITHIN_DB = 25.0  # spectral peaks that count: within this of the frame's strongest
TONAL_PEAK_SHARE = 0.6  # a frame is tonal when its 3 strongest peaks (+-1 bin) hold this share
LABELS = ("speech", "alarm", "music", "background")


@dataclass(frozen=True)
class AudioFeatures:
    seconds: float
    loud_share: float  # frames above the floor (and not silent)
    tonal_share: float  # loud frames whose energy sits in <= 3 narrow peaks
    peaks_per_frame: float  # median count of spectral peaks within PEAK_WITHIN_DB, loud frames
    pitch_classes: int  # distinct dominant frequencies (1/3-octave bins) of the tonal frames
    pitch_top2_share: float  # tonal frames whose dominant frequency is in the 2 commonest bins
    sweep_share: float  # tonal frames whose dominant pitch glides (siren)
    period_strength: float  # envelope autocorrelation peak at a 0.1-2 s lag
    period_seconds: float
    syllable_share: float  # voice-band envelope modulation energy at 2-8 Hz / 0.5-20 Hz
    flatness: float  # median spectral flatness of loud frames (1 = white noise)
    onsets_per_second: float
    steady_share: float  # consecutive loud frames whose strongest peak stays within 1 bin
    dominant_hz: float  # median strongest frequency of loud frames
    level_range_db: float  # 90th - 10th percentile frame level: stationary noise is flat
    level_dbfs: float  # 90th percentile frame level (in BAND)


@dataclass(frozen=True)
class AudioJudgement:
    label: str
    confidence: float
    scores: dict[str, float]
    features: AudioFeatures
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "confidence": self.confidence, "scores": self.scores,
                "reason": self.reason,
                "features": {k: round(v, 3) if isinstance(v, float) else v
                             for k, v in asdict(self.features).items()}}


def to_rate(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 at RATE (soxr; a base dependency), cut to MAX_SECONDS."""
    pcm = np.asarray(pcm, dtype=np.float32)[: int(MAX_SECONDS * rate)]
    if rate != RATE and pcm.size:
        import soxr

        pcm = np.asarray(soxr.resample(pcm, rate, RATE), dtype=np.float32)
    return pcm


def power_spectrogram(pcm: np.ndarray) -> np.ndarray:
    """|STFT|^2, frames x bins (N_FFT // 2 + 1), Hann window; pcm at RATE."""
    if pcm.size < N_FFT:
        pcm = np.pad(pcm, (0, N_FFT - pcm.size))
    n = 1 + (pcm.size - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]
    frames = pcm[idx] * np.hanning(N_FFT).astype(np.float32)
    spec = np.fft.rfft(frames, axis=1)
    return (spec.real ** 2 + spec.imag ** 2).astype(np.float64) / (N_FFT / 2) ** 2


def _autocorr_peak(x: np.ndarray, lo: int, hi: int) -> tuple[float, int]:
    x = x - x.mean()
    denom = float(np.dot(x, x))
    if denom <= 0 or x.size <= lo + 2:
        return 0.0, 0
    hi = min(hi, x.size - 2)
    ac = np.correlate(x, x, mode="full")[x.size - 1:] / denom
    # Normalise for the shrinking overlap so a long lag is not penalised for it.
    ac = ac * x.size / np.maximum(1, x.size - np.arange(ac.size))
    seg = ac[lo:hi + 1]
    if seg.size == 0:
        return 0.0, 0
    # The first local maximum after the first dip, not the lag-lo shoulder of lag 0.
    best, lag = 0.0, 0
    for i in range(1, seg.size - 1):
        if seg[i] >= seg[i - 1] and seg[i] >= seg[i + 1] and seg[i] > best:
            best, lag = float(seg[i]), lo + i
    return min(1.0, max(0.0, best)), lag


def features(pcm: np.ndarray, rate: int) -> AudioFeatures:
    """What the rules read (blocking CPU work: call in a thread)."""
    x = to_rate(pcm, rate)
    seconds = x.size / RATE
    p = power_spectrogram(x)
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / RATE)
    band = (freqs >= BAND[0]) & (freqs <= BAND[1])
    pb = p[:, band]
    fb = freqs[band]
    energy = pb.sum(axis=1) + 1e-12
    level = 10 * np.log10(energy)
    floor = float(np.percentile(level, 10))
    loud = (level > floor + LOUD_ABOVE_FLOOR_DB) & (level > SILENCE_DBFS)
    if loud.sum() < 3:
        loud = level > SILENCE_DBFS
    n_loud = int(loud.sum())
    empty = AudioFeatures(round(seconds, 2), 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
                          0.0, 0.0, 0.0, SILENCE_DBFS)
    if n_loud < 3:
        return empty
    lp = pb[loud]
    # Peaks: local maxima within PEAK_WITHIN_DB of the frame's strongest bin.
    db = 10 * np.log10(lp + 1e-12)
    is_peak = np.zeros_like(db, dtype=bool)
    is_peak[:, 1:-1] = (db[:, 1:-1] > db[:, :-2]) & (db[:, 1:-1] >= db[:, 2:])
    is_peak &= db > (db.max(axis=1, keepdims=True) - PEAK_WITHIN_DB)
    peaks = is_peak.sum(axis=1)
    # Share of energy in the 3 strongest peaks (+-1 bin).
    smooth = lp.copy()
    smooth[:, 1:] += lp[:, :-1]
    smooth[:, :-1] += lp[:, 1:]
    peak_energy = np.where(is_peak, smooth, 0.0)
    top3 = -np.sort(-peak_energy, axis=1)[:, :3].sum(axis=1)
    tonal = top3 / (lp.sum(axis=1) + 1e-12) > TONAL_PEAK_SHARE
    tonal_share = float(tonal.mean())
    flat = np.exp(np.mean(np.log(lp + 1e-12), axis=1)) / (lp.mean(axis=1) + 1e-12)
    # Dominant frequencies of tonal frames, in 1/3-octave bins.
    dom = fb[np.argmax(lp, axis=1)]
    pitch_classes, top2, sweep = 0, 0.0, 0.0
    if tonal.sum() >= 3:
        third = np.round(3 * np.log2(dom[tonal] / 100.0)).astype(int)
        counts = np.sort(np.bincount(third - third.min()))[::-1]
        counts = counts[counts > 0]
        # A class counts when it holds at least 5% of the tonal frames (not one stray frame).
        pitch_classes = int((counts >= max(2, 0.05 * tonal.sum())).sum())
        top2 = float(counts[:2].sum() / counts.sum())
        # Siren: consecutive tonal frames whose pitch moves, but by under a semitone per frame.
        d = np.abs(np.diff(12 * np.log2(dom / 100.0)))
        both = tonal[1:] & tonal[:-1]
        glide = both & (d > 0.02) & (d < 1.0)
        sweep = float(glide.sum() / max(1, both.sum()))
    # Envelope periodicity over the whole clip (quiet frames included: they are the gaps).
    env = np.clip(level - floor, 0, 60)
    period, lag = _autocorr_peak(env, int(0.1 * RATE / HOP), int(2.0 * RATE / HOP))
    # Syllable modulation of the voice band.
    vb = (fb >= VOICE_BAND[0]) & (fb <= VOICE_BAND[1])
    venv = np.log10(pb[:, vb].sum(axis=1) + 1e-10)
    venv = venv - venv.mean()
    mod = np.abs(np.fft.rfft(venv * np.hanning(venv.size))) ** 2
    mf = np.fft.rfftfreq(venv.size, HOP / RATE)
    total = mod[(mf >= 0.5) & (mf <= 20)].sum()
    syll = float(mod[(mf >= 2) & (mf <= 8)].sum() / total) if total > 0 else 0.0
    onsets = np.sum(loud[1:] & ~loud[:-1])
    peak_bin = np.argmax(pb, axis=1)
    pairs = loud[1:] & loud[:-1]
    steady = float(np.sum(pairs & (np.abs(np.diff(peak_bin)) <= 1)) / max(1, pairs.sum()))
    return AudioFeatures(
        seconds=round(seconds, 2),
        loud_share=float(loud.mean()),
        tonal_share=tonal_share,
        peaks_per_frame=float(np.median(peaks)),
        pitch_classes=pitch_classes,
        pitch_top2_share=top2,
        sweep_share=sweep,
        period_strength=period,
        period_seconds=lag * HOP / RATE,
        syllable_share=syll,
        flatness=float(np.median(flat)),
        onsets_per_second=float(onsets / max(seconds, 1e-3)),
        steady_share=steady,
        dominant_hz=float(np.median(dom)),
        level_range_db=float(np.percentile(level, 90) - floor),
        level_dbfs=float(np.percentile(level, 90)),
    )


# The rules' thresholds (set on the tuning split of bench/bench_teacher.py's clips).
BEEP_MIN_HZ = 400.0  # alarm tones sit above a voice's strongest harmonics (150-350 Hz here)
BEEP_MAX_PEAKS = 3.0  # a beep is one tone, maybe with a partial or two
REPEAT_MIN_PERIOD = 0.7  # loud/quiet envelope this regular...
REPEAT_MIN_ONSETS = 2  # ...over at least two beeps
SUSTAINED_MIN_LOUD = 0.6  # a tone loud for most of the clip (a continuous alarm, a siren)
SIREN_MIN_SWEEP = 0.5
VOICE_MAX_HZ = 400.0
SPEECH_PEAKS = (4.0, 12.0)  # a harmonic stack in the voice band
SPEECH_MIN_RANGE_DB = 20.0  # speech pauses between words; music and noise rarely do
SPEECH_MAX_FLATNESS = 0.01
MUSIC_RANGE_DB = (3.0, 18.0)  # goes on without the deep gaps of speech or beeps...
MUSIC_MIN_DBFS = -35.0  # ...well above the room's noise
MUSIC_MIN_PEAKS = 5.0  # harmonic texture, not one tone
MUSIC_MAX_FLATNESS = 0.2  # not noise
MUSIC_BEAT = 0.75  # or a steady beat (drums: broadband, but regular) over a gappier level
MUSIC_BEAT_MAX_RANGE_DB = 26.0


def judge_features(f: AudioFeatures, transcript: str | None = None) -> AudioJudgement:
    """The rules, in order: alarm, speech, music, else background. ``transcript``: what an
    offline recognizer heard (None: no recognizer ran)."""
    words = len((transcript or "").split())
    onsets = round(f.onsets_per_second * f.seconds)
    beep_like = (f.dominant_hz >= BEEP_MIN_HZ and f.pitch_classes <= 2
                 and f.pitch_top2_share >= 0.9
                 and (f.peaks_per_frame <= BEEP_MAX_PEAKS
                      or (f.tonal_share >= 0.85 and f.steady_share >= 0.85)))
    repeated = f.period_strength >= REPEAT_MIN_PERIOD and onsets >= REPEAT_MIN_ONSETS
    sustained = (f.loud_share >= SUSTAINED_MIN_LOUD and f.tonal_share >= 0.8
                 and f.pitch_classes == 1 and f.steady_share >= 0.9)
    siren = (f.sweep_share >= SIREN_MIN_SWEEP and f.tonal_share >= 0.7
             and f.loud_share >= SUSTAINED_MIN_LOUD and f.dominant_hz >= BEEP_MIN_HZ)
    voiced = (f.dominant_hz < VOICE_MAX_HZ and SPEECH_PEAKS[0] <= f.peaks_per_frame
              <= SPEECH_PEAKS[1] and f.flatness < SPEECH_MAX_FLATNESS)
    speechy = voiced and f.level_range_db >= SPEECH_MIN_RANGE_DB and onsets >= 2
    texture = (MUSIC_RANGE_DB[0] <= f.level_range_db <= MUSIC_RANGE_DB[1]
               and f.flatness < MUSIC_MAX_FLATNESS)
    beat = (f.period_strength >= MUSIC_BEAT and f.level_range_db <= MUSIC_BEAT_MAX_RANGE_DB)
    musical = (f.level_dbfs >= MUSIC_MIN_DBFS and f.peaks_per_frame >= MUSIC_MIN_PEAKS
               and (texture or beat))
    scores = {label: 0.0 for label in LABELS}
    if beep_like and (repeated or sustained):
        label, conf = "alarm", 0.8 if repeated else 0.7
        reason = (f"narrow-band tone at ~{f.dominant_hz:.0f} Hz "
                  + (f"repeating every {f.period_seconds:.2f} s" if repeated
                     else "sounding through most of the clip"))
    elif siren:
        label, conf = "alarm", 0.7
        reason = f"a tone gliding around ~{f.dominant_hz:.0f} Hz through the clip (siren)"
    elif speechy or (words >= 2 and voiced):
        label = "speech"
        conf = 0.8 if speechy and words else 0.7 if speechy else 0.55
        reason = (f"harmonic voice-band sound (~{f.dominant_hz:.0f} Hz strongest) broken "
                  f"into {onsets} bursts" + (f", recognizer heard {words} word(s)"
                                             if words else ""))
    elif musical:
        label, conf = "music", 0.6
        reason = ("sustained harmonic texture"
                  + (f" with a beat every {f.period_seconds:.2f} s" if beat else ""))
    else:
        label = "background"
        quiet = f.loud_share < 0.05 or f.level_range_db < 3.0
        conf = 0.7 if quiet else 0.55
        if beep_like:
            reason, conf = "one short tone, not repeated (not an alarm)", 0.6
        elif quiet:
            reason = "no sound stands out of the noise floor"
        else:
            reason = "sound with no tonal repetition, voice or musical structure"
    scores[label] = conf
    rest = (1.0 - conf) / (len(LABELS) - 1)
    scores = {k: round(v if k == label else rest, 3) for k, v in scores.items()}
    return AudioJudgement(label, round(conf, 3), scores, f, reason)


def judge_pcm(pcm: np.ndarray, rate: int, transcript: str | None = None) -> AudioJudgement:
    """Features, then the rules (blocking CPU work: call in a thread)."""
    return judge_features(features(pcm, rate), transcript)
