"""Capture: ring buffers of recent frames and audio, and the assembly of events from them.

When a trigger fires at time t, the event spans ``[t - pre_roll, t + post_roll]``. The pre-roll is
already in the rings; the event stays *pending* until every stream has passed ``t + post_roll``
(its watermark), then it is assembled: a few key frames (always including the frame that
fired), the audio segment, peak scores over the span, and the gate's features.

Memory stays bounded: the video ring keeps only a couple of frames per second (key-frame
candidates, not a video), the audio ring only the span plus one model window.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from edgekeeper.config import EventSection
from edgekeeper.device.events import Event, encode_wav
from edgekeeper.device.trigger import Decision


class VideoRing:
    """Key-frame candidates: frames at most every ``interval`` seconds, for ``span`` seconds."""

    def __init__(self, span: float, interval: float) -> None:
        self.span = span
        self.interval = interval
        self._frames: collections.deque[tuple[float, np.ndarray]] = collections.deque()
        self._next = -math.inf

    def add(self, t: float, image: np.ndarray) -> None:
        if t + 1e-9 < self._next:
            return
        self._next = t + self.interval
        self._frames.append((t, image))
        while self._frames and t - self._frames[0][0] > self.span:
            self._frames.popleft()

    def between(self, t0: float, t1: float) -> list[tuple[float, np.ndarray]]:
        return [(t, im) for t, im in self._frames if t0 <= t <= t1]


class AudioRing:
    """The last ``seconds`` of mono audio, addressed by absolute sample index.

    Its rate is the rate of what it is given: the model's, or a file's own when that is lower
    (sources.AudioBlock.for_capture), so an event never carries upsampled audio. A source's
    rate is known once it is open, after the ring is made: the first block sets it."""

    def __init__(self, rate: int, seconds: float) -> None:
        self.seconds = seconds
        self._reset(rate)

    def _reset(self, rate: int) -> None:
        self.rate = rate
        self._buf = np.zeros(max(1, int(self.seconds * rate)), np.float32)
        self._end = 0  # absolute index one past the newest sample

    def add(self, t: float, samples: np.ndarray, rate: int | None = None) -> None:
        if rate and rate != self.rate:
            self._reset(rate)  # the first block (a source keeps its rate for its whole life)
        start = round(t * self.rate)
        if start > self._end:  # a gap (dropped block): keep the timeline, fill with silence
            self._write(np.zeros(start - self._end, np.float32))
        elif start < self._end:
            samples = samples[self._end - start :]
        self._write(samples)

    def _write(self, samples: np.ndarray) -> None:
        n = len(self._buf)
        if len(samples) >= n:
            self._buf[:] = samples[-n:]
            self._end += len(samples)
            # Keep the invariant: index i lives at i % n.
            self._buf = np.roll(self._buf, self._end % n)
            return
        pos = self._end % n
        first = min(len(samples), n - pos)
        self._buf[pos : pos + first] = samples[:first]
        self._buf[: len(samples) - first] = samples[first:]
        self._end += len(samples)

    @property
    def end_t(self) -> float:
        return self._end / self.rate

    def segment(self, t0: float, t1: float) -> np.ndarray:
        n = len(self._buf)
        i0 = max(round(t0 * self.rate), self._end - n, 0)
        i1 = min(round(t1 * self.rate), self._end)
        if i1 <= i0:
            return np.zeros(0, np.float32)
        idx = np.arange(i0, i1) % n
        return self._buf[idx].copy()


@dataclass
class PendingEvent:
    seq: int
    decision: Decision
    modality: str
    start_t: float
    end_t: float
    trigger_frame: tuple[float, np.ndarray] | None
    features: np.ndarray | None
    scores: dict[str, float] = field(default_factory=dict)


class Capture:
    """Owns the rings and the pending events; builds Events when their post-roll is in."""

    def __init__(
        self,
        cfg: EventSection,
        *,
        device_id: str,
        audio_rate: int,
        clock_base: float,
        models: dict[str, str],
        priorities: dict[str, int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.priorities = priorities or {}
        self.device_id = device_id
        self.clock_base = clock_base
        self.models = models
        span = cfg.pre_roll_seconds + cfg.post_roll_seconds
        interval = span / max(1, cfg.key_frames * 2) if cfg.key_frames else math.inf
        self.video = VideoRing(span + 1.0, max(interval, 0.05))
        self.audio = AudioRing(audio_rate, span + 4.0)
        self.pending: list[PendingEvent] = []

    def observe(self, t: float, scores: dict[str, float] | None) -> None:
        """Track the peak score of each label over every pending event's span."""
        if not scores:
            return
        for p in self.pending:
            if p.start_t <= t <= p.end_t:
                for label, s in scores.items():
                    if s > p.scores.get(label, -1.0):
                        p.scores[label] = s

    def open(
        self,
        seq: int,
        decision: Decision,
        modality: str,
        frame: tuple[float, np.ndarray] | None,
        features: np.ndarray | None,
        scores: dict[str, float],
    ) -> PendingEvent:
        p = PendingEvent(
            seq=seq,
            decision=decision,
            modality=modality,
            start_t=max(0.0, decision.t - self.cfg.pre_roll_seconds),
            end_t=decision.t + self.cfg.post_roll_seconds,
            trigger_frame=frame,
            features=features if self.cfg.include_features else None,
            scores=dict(scores),
        )
        self.pending.append(p)
        return p

    def due(self, watermark: float) -> list[PendingEvent]:
        """Pending events whose post-roll every stream has passed, oldest first."""
        ready = [p for p in self.pending if p.end_t <= watermark]
        self.pending = [p for p in self.pending if p.end_t > watermark]
        return ready

    def snapshot(self, p: PendingEvent) -> dict[str, Any]:
        """Copy what the event needs out of the rings (cheap; on the loop)."""
        frames: list[tuple[float, np.ndarray]] = []
        if self.cfg.include_frames and self.cfg.key_frames:
            candidates = self.video.between(p.start_t, p.end_t)
            chosen = [p.trigger_frame] if p.trigger_frame is not None else []
            others = [c for c in candidates if not chosen or c[0] != chosen[0][0]]
            want = self.cfg.key_frames - len(chosen)
            if want > 0 and others:
                picks = np.linspace(0, len(others) - 1, num=min(want, len(others)))
                chosen += [others[i] for i in sorted({round(x) for x in picks})]
            frames = sorted(chosen, key=lambda c: c[0])
        audio = None
        if self.cfg.include_audio:
            seg = self.audio.segment(p.start_t, p.end_t)
            audio = seg if len(seg) else None
        return {"frames": frames, "audio": audio}

    def build(self, p: PendingEvent, snap: dict[str, Any]) -> Event:
        """Encode JPEGs and WAV (blocking: call in a thread)."""
        width = self.cfg.thumbnail_width if self.cfg.thumbnails_only else self.cfg.jpeg_width
        jpegs = []
        for _, image in snap["frames"]:
            h, w = image.shape[:2]
            if width and w > width:
                image = cv2.resize(image, (width, h * width // w), interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
            if ok:
                jpegs.append(buf.tobytes())
        audio = snap["audio"]
        audio_wav = encode_wav(audio, self.audio.rate) if audio is not None else None
        d = p.decision
        return Event(
            device_id=self.device_id,
            seq=p.seq,
            label=d.label,
            modality=p.modality,
            captured_at=self.clock_base + d.t,
            trigger_t=d.t,
            start_t=p.start_t,
            end_t=p.end_t,
            decision=d.explain(),
            scores=p.scores,
            models=dict(self.models),
            frames=tuple(jpegs),
            frame_times=tuple(t for t, _ in snap["frames"]),
            audio_wav=audio_wav,
            features=p.features,
            priority=self.priorities.get(d.label, 0),
        )

    async def finalize(self, p: PendingEvent) -> Event:
        snap = self.snapshot(p)
        return await asyncio.to_thread(self.build, p, snap)
