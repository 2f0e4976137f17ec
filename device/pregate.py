"""Cheap pre-gates that spare the model work: motion for video, energy for audio.

Motion is measured on a small grey copy of each frame, in the source's reader thread (it must
see every frame in order and is pixel work the event loop should not do). The decision to run the
model is taken in the loop from that measurement plus a heartbeat: even a still scene is looked
at every ``max_skip_seconds`` (a person standing still is still a person).

Frame differencing works in the dark too: before comparing, both frames are brightened to a
reference level (as a camera's automatic gain would, at most ``MAX_GAIN`` times), a change of
the whole frame's level is taken out, and a pixel counts as changed only above the larger of
``motion_pixel_threshold`` and ``NOISE_FACTOR`` times the frame pair's own noise (a robust
estimate from the median change). A walker at 5 % exposure then changes as many pixels as by
day, while sensor noise in a dark still scene changes none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edgekeeper.config import PregateSection


@dataclass
class PregateStats:
    seen: int = 0
    spared: int = 0  # windows the model did not have to look at


# Grey level both frames are brightened to before differencing (vtest by day averages ~110).
REFERENCE_LEVEL = 100.0
# At most this much brightening: darker than ~6 grey levels on average is too little signal.
MAX_GAIN = 16.0
# A change counts only above this many robust standard deviations of the frame pair's noise.
NOISE_FACTOR = 4.0
# Noise floor in grey levels before brightening: uint8 rounding alone (uniform, sd 0.29).
MIN_NOISE = 0.3


class MotionMeter:
    """Fraction of pixels that changed since the previous frame (or the background model)."""

    def __init__(self, cfg: PregateSection) -> None:
        self.cfg = cfg
        self._prev: np.ndarray | None = None
        self._mog2 = (
            cv2.createBackgroundSubtractorMOG2(history=200, detectShadows=False)
            if cfg.motion_method == "mog2"
            else None
        )

    def measure(self, image: np.ndarray) -> float:
        h, w = image.shape[:2]
        width = min(self.cfg.motion_width, w)
        size = (width, max(1, h * width // w))
        if self._mog2 is not None:
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            grey = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY), (5, 5), 0)
            mask = self._mog2.apply(grey)
            return float(np.count_nonzero(mask)) / mask.size
        # Grey at full resolution, then shrunk and blurred in float: in the dark a walker is a
        # change of a few grey levels, which rounding to uint8 after the shrink would erase.
        full = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        level = cv2.GaussianBlur(cv2.resize(full, size, interpolation=cv2.INTER_AREA), (5, 5), 0)
        prev, self._prev = self._prev, level
        if prev is None or prev.shape != level.shape:
            return 1.0  # the first frame is always worth a look
        return changed_share(prev, level, self.cfg.motion_pixel_threshold)

    def annotate(self, frame: object) -> None:
        """Source hook: runs in the reader thread for every frame, in order."""
        frame.motion = self.measure(frame.image)  # type: ignore[attr-defined]


def changed_share(prev: np.ndarray, grey: np.ndarray, threshold: float) -> float:
    """Share of pixels that changed between two blurred grey frames (float32), lit or dark.

    Dark frames are brightened (up to ``MAX_GAIN``) so a walker's small change in grey levels
    counts as it would by day; the median change (the whole frame getting lighter or darker) is
    taken out; a pixel counts when its change exceeds ``threshold`` and ``NOISE_FACTOR`` robust
    standard deviations of the changes (1.4826 x the median absolute change, at least
    ``MIN_NOISE`` grey levels before brightening), so amplified sensor noise alone never does.
    """
    mean = (float(prev.mean()) + float(grey.mean())) / 2
    gain = min(MAX_GAIN, max(1.0, REFERENCE_LEVEL / max(mean, 1.0)))
    diff: np.ndarray = (grey - prev) * gain
    diff -= np.median(diff)
    diff = np.abs(diff, out=diff)
    sigma = max(1.4826 * float(np.median(diff)), MIN_NOISE * gain)
    changed = int(np.count_nonzero(diff > max(float(threshold), NOISE_FACTOR * sigma)))
    return float(changed) / diff.size


class VideoPregate:
    """Decides, per frame, whether the model runs."""

    def __init__(self, cfg: PregateSection) -> None:
        self.cfg = cfg
        self.stats = PregateStats()
        self._last_run: float | None = None

    def decide(self, t: float, motion: float | None) -> str | None:
        """Return why the model should run ('motion', 'heartbeat', 'off'), or None to skip."""
        self.stats.seen += 1
        reason: str | None
        if not self.cfg.motion or motion is None:
            reason = "off"
        elif motion > self.cfg.motion_min_area:
            reason = "motion"
        elif self._last_run is None or t - self._last_run >= self.cfg.max_skip_seconds:
            reason = "heartbeat"
        else:
            reason = None
        if reason is None:
            self.stats.spared += 1
        else:
            self._last_run = t
        return reason


def rms_dbfs(samples: np.ndarray) -> float:
    if samples.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20.0 * math.log10(max(rms, 1e-6))


class AudioPregate:
    """Skips windows quieter than ``energy_threshold_dbfs`` (a quiet room costs no inference)."""

    def __init__(self, cfg: PregateSection) -> None:
        self.cfg = cfg
        self.stats = PregateStats()
        self._last_run: float | None = None

    def decide(self, t: float, window: np.ndarray) -> tuple[str | None, float]:
        self.stats.seen += 1
        level = rms_dbfs(window)
        reason: str | None
        if not self.cfg.energy:
            reason = "off"
        elif level >= self.cfg.energy_threshold_dbfs:
            reason = "energy"
        elif self._last_run is None or t - self._last_run >= self.cfg.max_skip_seconds:
            reason = "heartbeat"
        else:
            reason = None
        if reason is None:
            self.stats.spared += 1
        else:
            self._last_run = t
        return reason, level
