"""Cheap pre-gates that spare the model work: motion for video, energy for audio.

Motion is measured on a small grey copy of each frame, in the source's reader thread (it must
see every frame in order and is pixel work the event loop should not do). The decision to run the
model is taken in the loop from that measurement plus a heartbeat: even a still scene is looked
at every ``max_skip_seconds`` (a person standing still is still a person).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgekeeper.config import PregateSection


@dataclass
class PregateStats:
    seen: int = 0
    spared: int = 0  # windows the model did not have to look at


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
        small = cv2.resize(image, (width, max(1, h * width // w)), interpolation=cv2.INTER_AREA)
        grey = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY), (5, 5), 0)
        if self._mog2 is not None:
            mask = self._mog2.apply(grey)
            return float(np.count_nonzero(mask)) / mask.size
        prev, self._prev = self._prev, grey
        if prev is None or prev.shape != grey.shape:
            return 1.0  # the first frame is always worth a look
        diff = cv2.absdiff(grey, prev)
        changed = np.count_nonzero(diff > self.cfg.motion_pixel_threshold)
        return float(changed) / diff.size

    def annotate(self, frame: object) -> None:
        """Source hook: runs in the reader thread for every frame, in order."""
        frame.motion = self.measure(frame.image)  # type: ignore[attr-defined]


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
    return 20.0 * np.log10(max(rms, 1e-6))


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
