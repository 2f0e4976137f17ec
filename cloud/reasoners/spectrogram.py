"""A spectrogram picture of an event's audio clip, for a model that reads images but not sound.

A log-frequency (mel) spectrogram drawn with numpy and OpenCV only (no matplotlib on the cloud
path): time runs left to right with tick labels in seconds, frequency bottom to top with tick
labels in Hz/kHz (100 Hz to 8 kHz), and colour is level in dB relative to the clip's loudest
bin (a scale bar on the right: black/purple -80 dB, yellow 0 dB; OpenCV's "inferno" map).

Size: ``WIDTH`` x ``HEIGHT`` = 512 x 256 pixels (the plot itself 440 x 200). Claude bills an
image by its pixels, about width x height / 750 tokens: ~175 input tokens, less than one
scaled-down key frame. On the wire it is a PNG of 40-100 KB (lossless, so one-pixel tonal lines
survive; colour in 4 dB steps keeps it that small). How to read it is in the system prompt
(cloud/reasoners/anthropic.py).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from edgekeeper.cloud.reasoners.audio_judge import HOP, N_FFT, RATE, power_spectrogram, to_rate

WIDTH, HEIGHT = 512, 256
LEFT, RIGHT, TOP, BOTTOM = 44, 28, 8, 48  # margins for the axes' labels and the colour bar
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
MEL_BANDS = PLOT_H  # one mel band per pixel row
FMIN, FMAX = 100.0, 8_000.0
DB_RANGE = 80.0
DB_STEP = 4.0
FREQ_TICKS = (100, 250, 500, 1_000, 2_000, 4_000, 8_000)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_inv(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10 ** (m / 2595.0) - 1.0)


def mel_filterbank(bands: int = MEL_BANDS) -> np.ndarray:
    """Triangular filters, bands x (N_FFT // 2 + 1), centres evenly spaced in mel."""
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / RATE)
    edges = _mel_inv(np.linspace(float(_mel(FMIN)), float(_mel(FMAX)), bands + 2))
    fb = np.zeros((bands, freqs.size))
    for i in range(bands):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        up = (freqs - lo) / max(mid - lo, 1e-9)
        down = (hi - freqs) / max(hi - mid, 1e-9)
        fb[i] = np.clip(np.minimum(up, down), 0.0, None)
        if not fb[i].any():  # narrower than a bin at low frequencies: take the nearest bin
            fb[i, int(np.argmin(np.abs(freqs - mid)))] = 1.0
    return fb


_FILTERS = mel_filterbank()


def mel_db(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Mel bands (low first) x frames, in dB relative to the clip's loudest bin, >= -DB_RANGE."""
    p = power_spectrogram(to_rate(pcm, rate))
    mel = _FILTERS @ p.T
    db = 10.0 * np.log10(mel + 1e-12)
    out: np.ndarray = np.maximum(db - db.max(), -DB_RANGE)
    return out


def _row_of(freq: float) -> int:
    """Pixel row (in the plot) of a frequency: row 0 is the top (FMAX)."""
    frac = (float(_mel(freq)) - float(_mel(FMIN))) / (float(_mel(FMAX)) - float(_mel(FMIN)))
    return round((1.0 - frac) * (PLOT_H - 1))


def _text(img: np.ndarray, s: str, x: int, y: int) -> None:
    cv2.putText(img, s, (x, y), FONT, 0.33, (230, 230, 230), 1, cv2.LINE_AA)


def render(pcm: np.ndarray, rate: int) -> np.ndarray:
    """The picture as a BGR uint8 array, HEIGHT x WIDTH (blocking CPU work: call in a thread)."""
    db = mel_db(pcm, rate)
    seconds = max(1e-3, pcm.size / rate)
    frames = db.shape[1]
    # Colour steps of DB_STEP: finer than the eye (or a model) can use, and the PNG stays small.
    steps = np.floor((db + DB_RANGE) / DB_STEP)
    scaled = (steps * (255.0 / (DB_RANGE / DB_STEP))).clip(0, 255).astype(np.uint8)[::-1]
    plot = cv2.resize(scaled, (PLOT_W, PLOT_H), interpolation=cv2.INTER_AREA
                      if frames > PLOT_W else cv2.INTER_NEAREST)
    img = np.full((HEIGHT, WIDTH, 3), 24, np.uint8)
    img[TOP:TOP + PLOT_H, LEFT:LEFT + PLOT_W] = cv2.applyColorMap(plot, cv2.COLORMAP_INFERNO)
    for f in FREQ_TICKS:
        y = TOP + _row_of(f)
        cv2.line(img, (LEFT - 4, y), (LEFT - 1, y), (200, 200, 200), 1)
        _text(img, f"{f // 1000}k" if f >= 1000 else str(f), 4, y + 4)
    step = next(s for s in (0.25, 0.5, 1.0, 2.0, 5.0, 10.0) if seconds / s <= 8)
    for k in range(math.floor(seconds / step) + 1):
        t = k * step
        x = LEFT + round(t / seconds * (PLOT_W - 1))
        cv2.line(img, (x, TOP + PLOT_H), (x, TOP + PLOT_H + 3), (200, 200, 200), 1)
        _text(img, f"{t:g}", x - 6, TOP + PLOT_H + 14)
    _text(img, "time (s)", LEFT + PLOT_W // 2 - 20, TOP + PLOT_H + 28)
    _text(img, "Hz", 4, HEIGHT - 6)
    # Colour bar: dB relative to the loudest bin.
    ramp = np.linspace(255, 0, PLOT_H).astype(np.uint8).reshape(-1, 1)
    bar = cv2.applyColorMap(np.repeat(ramp, 8, axis=1), cv2.COLORMAP_INFERNO)
    x0 = LEFT + PLOT_W + 4
    img[TOP:TOP + PLOT_H, x0:x0 + 8] = bar
    _text(img, "0", x0 + 9, TOP + 8)
    _text(img, f"-{DB_RANGE:g}", x0 - 4, TOP + PLOT_H + 28)
    _text(img, "colour: dB (0 = loudest)", LEFT + PLOT_W - 130, HEIGHT - 6)
    return img


def spectrogram_png(pcm: np.ndarray, rate: int) -> bytes:
    """``render`` encoded as PNG (lossless: thin tonal lines survive)."""
    # Level 3, not 9: about 10 ms against 106 ms of a worker's CPU per event, for 8 % more
    # bytes (the provider bills an image by its pixels, not its bytes).
    ok, buf = cv2.imencode(".png", render(pcm, rate), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - imencode of a valid array does not fail
        raise ValueError("spectrogram could not be encoded")
    return buf.tobytes()


def plot_rows(img: np.ndarray) -> np.ndarray:
    """The plot area of a rendered picture (for tests and checks): PLOT_H x PLOT_W x 3."""
    return img[TOP:TOP + PLOT_H, LEFT:LEFT + PLOT_W]


__all__ = ["HEIGHT", "HOP", "PLOT_H", "PLOT_W", "WIDTH", "mel_db", "plot_rows", "render",
           "spectrogram_png"]
