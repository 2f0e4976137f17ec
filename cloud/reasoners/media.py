"""What reasoners make of an event's media: which key frames to look at, frames scaled down to
bound their token cost, and a description of the audio clip that a text-only model can read.

Everything here is CPU work on bytes (cv2, wave, numpy): callers run it in a thread.
"""

from __future__ import annotations

import io
import math
import wave
from typing import Any

import cv2
import numpy as np


def pick_frames(frames: tuple[bytes, ...], limit: int) -> list[tuple[int, bytes]]:
    """Up to ``limit`` frames, first and last included, evenly spaced between; with indexes."""
    n = len(frames)
    if limit <= 0 or n == 0:
        return []
    if n <= limit:
        return list(enumerate(frames))
    if limit == 1:
        return [(n // 2, frames[n // 2])]
    idx = sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})
    return [(i, frames[i]) for i in idx]


def decode_jpeg(data: bytes) -> np.ndarray | None:
    """BGR image, or None when the bytes do not decode (a frame is attacker-shaped input)."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    return img if img is not None and img.size else None


def fit_jpeg(data: bytes, max_side: int, quality: int = 85) -> tuple[bytes, tuple[int, int]]:
    """The frame re-encoded with its longer side at most ``max_side`` (0: unchanged), and its
    (width, height). Frames already small enough are sent as they came. Raises ValueError when
    the frame does not decode."""
    img = decode_jpeg(data)
    if img is None:
        raise ValueError("frame is not a decodable JPEG")
    h, w = img.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return data, (w, h)
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - imencode of a valid array does not fail
        raise ValueError("frame could not be re-encoded")
    return buf.tobytes(), size


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate. Raises ValueError if unreadable."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as err:
        raise ValueError(f"audio is not a readable WAV: {err}") from None
    if width == 2:
        pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 1:
        pcm = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        pcm = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"audio uses {width * 8}-bit samples; 8, 16 or 32-bit PCM expected")
    if channels > 1:
        pcm = pcm[: len(pcm) - len(pcm) % channels].reshape(-1, channels).mean(axis=1)
    if rate <= 0:
        raise ValueError("audio has no sample rate")
    return pcm, rate


def _dbfs(x: float) -> float:
    return round(20.0 * math.log10(max(x, 1e-9)), 1)


def audio_summary(data: bytes) -> dict[str, Any]:
    """What a text-only reader can use of a clip: length, level, peak, how much is loud."""
    try:
        pcm, rate = read_wav(data)
    except ValueError as err:
        return {"readable": False, "error": str(err)}
    if pcm.size == 0:
        return {"readable": True, "seconds": 0.0, "sample_rate": rate}
    rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
    peak = float(np.max(np.abs(pcm)))
    # Fraction of 50 ms windows louder than -30 dBFS: "a short loud sound" vs "loud throughout".
    win = max(1, rate // 20)
    usable = pcm[: len(pcm) - len(pcm) % win] if len(pcm) >= win else pcm
    windows = usable.reshape(-1, win) if usable.size >= win else usable.reshape(1, -1)
    levels = np.sqrt(np.mean(windows.astype(np.float64) ** 2, axis=1))
    loud = float(np.mean(levels > 10 ** (-30 / 20)))
    return {
        "readable": True,
        "seconds": round(len(pcm) / rate, 2),
        "sample_rate": rate,
        "rms_dbfs": _dbfs(rms),
        "peak_dbfs": _dbfs(peak),
        "loud_fraction": round(loud, 2),
    }
