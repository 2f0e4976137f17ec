"""The device loop: sources -> pre-gate -> gate -> trigger -> capture -> sink.

One ``Pipeline`` owns every task of a run in one ``compat.TaskGroup``:

- a *stage* per modality reads its source, asks the pre-gate whether the model should look, runs
  the gate (in the gate's own thread) and emits a ``StageResult`` per frame or audio block, in time
  order, into a small bounded queue (backpressure, not buffering);
- the *decider* merges both streams, feeds the capture rings, applies the trigger policy, opens
  events when a rule fires and closes them once every stream has passed their post-roll;
- the *deliverer* encodes finished events (JPEG/WAV, in a thread) and hands them to the sink, in
  sequence order.

Live (``ordered=False``) the decider takes results as they come, so a trigger costs no waiting.
Replay (``ordered=True``) merges the streams by timestamp, so the same recording and config give
the same decisions and events however the two stages were scheduled.

Stopping: set the ``stop`` event (edgekeeper.runtime does on SIGTERM/SIGINT). Sources stop
reading, the stages drain, pending events are closed with the post-roll they have, delivered, and
``run`` returns the stats. Nothing captured is dropped on the way out.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekeeper import compat, runtime
from edgekeeper.config import Config
from edgekeeper.device.capture import Capture, PendingEvent
from edgekeeper.device.events import Event
from edgekeeper.device.gate import Gate
from edgekeeper.device.pregate import AudioPregate, MotionMeter, VideoPregate
from edgekeeper.device.sink import Sink
from edgekeeper.device.sources import AudioBlock, Frame
from edgekeeper.device.trigger import Decision, TriggerPolicy
from edgekeeper.log import get_logger

log = get_logger(__name__)

# Log event of each trigger decision (component.event).
_STAGE_QUEUE = 8
# Frames in flight to the gate's thread at once (see _video_stage).
_PIPELINE = 2


def _log_decision(action: str, fields: dict[str, Any]) -> None:
    # One literal event name per action, so each can be found by grep (tests/test_log_events.py).
    if action == "fire":
        log.info("trigger.fired", **fields)
    elif action == "hold":
        log.info("trigger.held", **fields)
    else:
        log.info("trigger.released", **fields)


@dataclass(slots=True)
class StageResult:
    modality: str
    t: float  # the stream has been read up to here
    scores: dict[str, float] | None = None  # None: the model did not look (pre-gate)
    features: np.ndarray | None = None
    frame: Frame | None = None
    samples: np.ndarray | None = None  # the audio events keep (AudioBlock.for_capture)
    samples_t: float = 0.0
    samples_rate: int = 0
    reason: str | None = None


# Gate latency buckets (ms): from a fast int8 model on a desktop to a slow board under load.
LATENCY_BUCKETS_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


@dataclass
class PipelineStats:
    frames: int = 0
    frames_dropped: int = 0
    frames_scored: int = 0
    frames_spared: int = 0
    audio_blocks: int = 0
    audio_dropped: int = 0
    audio_windows: int = 0
    audio_scored: int = 0
    audio_spared: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0
    # Triggers whose event the sink could not store at all (disk full): acted on, not kept.
    events_lost: int = 0
    event_bytes: int = 0
    media_seconds: float = 0.0
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    # Running totals, exact however much history is kept (metrics and the exit line read them).
    triggers: int = 0
    held_back: int = 0
    inferences: dict[str, int] = field(default_factory=dict)
    latency_total_ms: dict[str, float] = field(default_factory=dict)
    # Inferences per latency bucket (upper bounds LATENCY_BUCKETS_MS, the last one +inf): what
    # /metrics exports as a histogram, exact however much history is kept.
    latency_buckets: dict[str, list[int]] = field(default_factory=dict)
    # How many recent decisions and latencies to keep: None keeps all (a replay's report needs
    # every one); a live run keeps the last ``keep`` so months of running stay in bounded memory.
    keep: int | None = None

    def note_latency(self, modality: str, ms: float) -> None:
        lat = self.latencies_ms.setdefault(modality, [])
        lat.append(ms)
        self.inferences[modality] = self.inferences.get(modality, 0) + 1
        self.latency_total_ms[modality] = self.latency_total_ms.get(modality, 0.0) + ms
        buckets = self.latency_buckets.setdefault(modality, [0] * (len(LATENCY_BUCKETS_MS) + 1))
        buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        if self.keep is not None and len(lat) >= 2 * self.keep:
            del lat[: len(lat) - self.keep]  # amortised: one trim per ``keep`` appends

    def note_decision(self, explained: dict[str, Any]) -> None:
        self.decisions.append(explained)
        self.triggers += explained["action"] == "fire"
        self.held_back += explained["action"] == "hold"
        if self.keep is not None and len(self.decisions) >= 2 * self.keep:
            del self.decisions[: len(self.decisions) - self.keep]
    # (t, modality, scores) of every scored window; kept only when record_timeline=True.
    timeline: list[tuple[float, str, dict[str, float]]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        lat = {
            m: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
                "n": self.inferences.get(m, len(v))}
            for m, v in self.latencies_ms.items()
            if v
        }
        return {
            "frames": self.frames,
            "frames_dropped": self.frames_dropped,
            "frames_scored": self.frames_scored,
            "frames_spared_by_pregate": self.frames_spared,
            "audio_blocks": self.audio_blocks,
            "audio_dropped": self.audio_dropped,
            "audio_windows": self.audio_windows,
            "audio_scored": self.audio_scored,
            "audio_spared_by_pregate": self.audio_spared,
            "triggers": self.triggers,
            "held_back": self.held_back,
            "events": self.events,
            "events_lost": self.events_lost,
            "event_bytes": self.event_bytes,
            "media_seconds": round(self.media_seconds, 3),
            "gate_latency_ms": lat,
        }


@dataclass
class Progress:
    """When each stage last moved (``time.monotonic()``) and what it last did, for the
    supervisor's health check and ``device status`` (device/status.py). The loop only writes it;
    ``started`` is set once every source has delivered its first item."""

    frame_at: float | None = None
    audio_at: float | None = None
    inference_at: float | None = None
    last_trigger: dict[str, Any] | None = None  # label, score, modality, at (epoch seconds)
    last_event: dict[str, Any] | None = None  # seq, label, bytes, at
    sink_ok: bool = True  # False from a write the sink could not store until one it could
    started: asyncio.Event = field(default_factory=asyncio.Event)


class _AudioWindow:
    """Accumulates blocks and yields a model window every hop, counted in samples."""

    def __init__(self, window: int, hop: int) -> None:
        self.window, self.hop = window, hop
        # Start as if the stream had been silent before t=0, so the first window is ready one
        # hop in (not a whole window in) and a recording shorter than a window is still heard.
        pad = max(0, window - hop)
        self._buf = np.zeros(pad, np.float32)
        self._buf_start = -pad  # absolute sample index of _buf[0]
        self._next_end = hop  # absolute index one past the next window's last sample

    def push(self, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add samples; return (end sample index, window) for every window now complete."""
        self._buf = np.concatenate([self._buf, samples])
        seen = self._buf_start + len(self._buf)
        out = []
        while seen >= self._next_end:
            end = self._next_end - self._buf_start
            out.append((self._next_end, self._buf[end - self.window : end].copy()))
            self._next_end += self.hop
        # Keep only what the next window needs.
        drop = self._next_end - self.window - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return out


class _Tagged:
    """A stage's output in live mode: puts (stage name, result) into the shared queue."""

    def __init__(self, name: str, merged: asyncio.Queue[tuple[str, StageResult | None]]) -> None:
        self.name, self.merged = name, merged

    async def put(self, item: StageResult | None) -> None:
        await self.merged.put((self.name, item))


class Pipeline:
    def __init__(
        self,
        config: Config,
        sink: Sink,
        *,
        video: Any = None,
        audio: Any = None,
        vision_gate: Gate | None = None,
        audio_gate: Gate | None = None,
        clock_base: float = 0.0,
        ordered: bool = False,
        record_timeline: bool = False,
        history: int | None = None,
        on_event: Callable[[Event], Any] | None = None,
        on_decision: Callable[[Decision], Any] | None = None,
    ) -> None:
        if video is not None and vision_gate is None:
            raise ValueError("a video source needs a vision gate")
        if audio is not None and audio_gate is None:
            raise ValueError("an audio source needs an audio gate")
        self.config = config
        self.sink = sink
        self.video, self.audio = video, audio
        self.vision_gate, self.audio_gate = vision_gate, audio_gate
        self.ordered = ordered
        self.record_timeline = record_timeline
        self.on_event, self.on_decision = on_event, on_decision
        self.stats = PipelineStats(keep=history)
        self.progress = Progress()
        self._debug = config.log.level == "debug"
        self.trigger = TriggerPolicy(config.trigger)
        self.video_pregate = VideoPregate(config.pregate)
        self.audio_pregate = AudioPregate(config.pregate)
        models = {}
        if vision_gate is not None:
            models["vision"] = vision_gate.manifest.tag
        if audio_gate is not None:
            models["audio"] = audio_gate.manifest.tag
        audio_rate = audio_gate.manifest.sample_rate if audio_gate is not None else 16000
        self.capture = Capture(
            config.event,
            device_id=config.device.id,
            audio_rate=audio_rate,
            clock_base=clock_base,
            models=models,
            priorities={k: r.priority for k, r in config.trigger.labels.items()},
        )
        if video is not None and config.pregate.motion:
            # Motion is measured in the source's reader thread, on every frame, in order.
            video.annotate = MotionMeter(config.pregate).annotate

    # -- stages -----------------------------------------------------------------------------
    async def _video_stage(self, out: Any) -> None:
        assert self.vision_gate is not None
        # Up to _PIPELINE frames are submitted to the gate's thread before the oldest is
        # awaited: the loop's own work (queues, trigger, rings) overlaps the inference instead
        # of adding to it. Results still come out in frame order (one thread, FIFO).
        pending: collections.deque[tuple[StageResult, asyncio.Future[Any] | None]] = (
            collections.deque()
        )

        async def emit_oldest() -> None:
            result, fut = pending.popleft()
            if fut is not None:
                g = await fut
                self.stats.note_latency("vision", g.latency_ms)
                self.progress.inference_at = time.monotonic()
                result.scores, result.features = g.scores, g.features
            await out.put(result)

        try:
            async for frame in self.video.stream():
                self.stats.frames += 1
                self._moved("frame_at")
                reason = self.video_pregate.decide(frame.t, frame.motion)
                result = StageResult("vision", frame.t, frame=frame, reason=reason)
                fut = None
                if reason is not None:
                    fut = self.vision_gate.submit(frame.image)
                    self.stats.frames_scored += 1
                else:
                    self.stats.frames_spared += 1
                pending.append((result, fut))
                if len(pending) >= _PIPELINE:
                    await emit_oldest()
            while pending:
                await emit_oldest()
        finally:
            for _, fut in pending:
                if fut is not None:
                    fut.cancel()
            await out.put(None)

    async def _audio_stage(self, out: Any) -> None:
        assert self.audio_gate is not None
        a = self.audio_gate.manifest.audio
        assert a is not None
        windows = _AudioWindow(a.window_samples, a.hop_samples)
        block: AudioBlock  # the source is duck-typed (Any): say what it yields
        try:
            async for block in self.audio.stream():
                self.stats.audio_blocks += 1
                self._moved("audio_at")
                completed = windows.push(block.samples)
                block_end = block.t + len(block.samples) / a.sample_rate
                clip_t, clip, clip_rate = block.for_capture(a.sample_rate)
                result = StageResult(
                    "audio", block_end, samples=clip, samples_t=clip_t, samples_rate=clip_rate
                )
                for i, (end_index, window) in enumerate(completed):
                    t = end_index / a.sample_rate
                    self.stats.audio_windows += 1
                    reason, _level = self.audio_pregate.decide(t, window)
                    if reason is None:
                        self.stats.audio_spared += 1
                        continue
                    g = await self.audio_gate.classify(window, end_index)
                    self.stats.note_latency("audio", g.latency_ms)
                    self.progress.inference_at = time.monotonic()
                    self.stats.audio_scored += 1
                    scored = StageResult("audio", t, g.scores, g.features, reason=reason)
                    if i < len(completed) - 1:
                        await out.put(scored)
                    else:
                        result.scores, result.features, result.reason = g.scores, g.features, reason
                        result.t = max(result.t, t)
                await out.put(result)
        finally:
            await out.put(None)

    # -- decider ----------------------------------------------------------------------------
    async def _merged(self, queues: dict[str, Any]) -> Any:
        """Yield (result, watermark) from all stages; time-ordered when self.ordered.

        Unordered (live), every stage writes into one shared queue, tagged with its name, and
        results are taken as they come. Ordered (replay), each stage has its own queue and the
        result with the smallest time goes first, once every live stream has one waiting.
        """
        heads: dict[str, StageResult] = {}
        last_t = {name: -math.inf for name in queues}
        live = set(queues)
        if not self.ordered:
            merged: asyncio.Queue[tuple[str, StageResult | None]] = next(
                iter(queues.values())
            ).merged
            while live:
                name, item = await merged.get()
                if item is None:
                    live.discard(name)
                    last_t[name] = math.inf
                    yield None, min(last_t.values())
                    continue
                last_t[name] = item.t
                yield item, min(last_t.values())
            return
        while live:
            for name in list(live):
                if name not in heads:
                    item = await queues[name].get()
                    if item is None:
                        live.discard(name)
                        last_t[name] = math.inf
                    else:
                        heads[name] = item
            if not heads:
                break
            name = min(heads, key=lambda n: (heads[n].t, n))
            item = heads.pop(name)
            # Every other stream's next item is at or after its head: everything before item.t
            # has been seen from every stream.
            yield item, item.t
        yield None, math.inf

    async def _decide(
        self,
        queues: dict[str, Any],
        deliver: asyncio.Queue[tuple[PendingEvent, dict[str, Any]] | None],
    ) -> None:
        cap = self.capture
        try:
            async for item, watermark in self._merged(queues):
                if item is not None:
                    self._observe(item)
                    if item.scores is not None:
                        await self._apply_trigger(item)
                for pending in cap.due(watermark):
                    await deliver.put((pending, cap.snapshot(pending)))
            # Streams ended (or we were stopped): close what is still open, with what it has.
            for pending in cap.due(math.inf):
                await deliver.put((pending, cap.snapshot(pending)))
        finally:
            await deliver.put(None)

    def _observe(self, item: StageResult) -> None:
        cap = self.capture
        if item.frame is not None:
            cap.video.add(item.frame.t, item.frame.image)
        if item.samples is not None:
            cap.audio.add(item.samples_t, item.samples, item.samples_rate)
        self.stats.media_seconds = max(self.stats.media_seconds, item.t)
        if item.scores is not None:
            cap.observe(item.t, item.scores)
            if self.record_timeline:
                self.stats.timeline.append((item.t, item.modality, item.scores))
            if self._debug:  # building the fields costs more than the check, every frame
                log.debug("loop.scores", modality=item.modality, t=round(item.t, 3),
                          why=item.reason, scores={k: round(v, 3) for k, v in item.scores.items()})

    async def _apply_trigger(self, item: StageResult) -> None:
        assert item.scores is not None
        for d in self.trigger.update(item.t, item.scores):
            explained = d.explain()
            explained["modality"] = item.modality
            self.stats.note_decision(explained)
            _log_decision(d.action, explained)
            if self.on_decision is not None:
                self.on_decision(d)
            if not d.fired:
                continue
            self.progress.last_trigger = {"label": d.label, "score": round(d.score, 3),
                                          "modality": item.modality, "at": time.time()}
            seq = await self.sink.next_seq()
            self.progress.sink_ok = seq is not None
            if seq is None:  # the sink cannot store anything now (disk full); it said why
                self.stats.events_lost += 1
                continue
            frame = (item.frame.t, item.frame.image) if item.frame is not None else None
            self.capture.open(seq, d, item.modality, frame, item.features, item.scores)

    async def _deliver(
        self, deliver: asyncio.Queue[tuple[PendingEvent, dict[str, Any]] | None]
    ) -> None:
        while (job := await deliver.get()) is not None:
            pending, snap = job
            event = await asyncio.to_thread(self.capture.build, pending, snap)
            lost = getattr(self.sink, "lost", 0)  # both sinks count what they could not store
            await self.sink.deliver(event)
            self.progress.sink_ok = getattr(self.sink, "lost", 0) == lost
            self.progress.last_event = {"seq": event.seq, "label": event.label,
                                        "bytes": event.payload_bytes, "at": time.time()}
            self.stats.events += 1
            self.stats.event_bytes += event.payload_bytes
            log.info("loop.event_captured", seq=event.seq, label=event.label,
                     frames=len(event.frames), bytes=event.payload_bytes)
            if self.on_event is not None:
                self.on_event(event)

    # -- supervision ------------------------------------------------------------------------
    def _moved(self, what: str) -> None:
        setattr(self.progress, what, time.monotonic())
        p = self.progress
        if not p.started.is_set() and (self.video is None or p.frame_at is not None) and (
                self.audio is None or p.audio_at is not None):
            p.started.set()

    def reconfigure(self, config: Config) -> None:
        """Apply what can change while running (SIGHUP): trigger rules and log detail. The
        trigger keeps its windows and cooldowns; a new n keeps the newest scores."""
        self.trigger.reconfigure(config.trigger)
        self.capture.priorities = {k: r.priority for k, r in config.trigger.labels.items()}
        self.config = config
        self._debug = config.log.level == "debug"

    # -- lifecycle --------------------------------------------------------------------------
    def stop_sources(self) -> None:
        for src in (self.video, self.audio):
            if src is not None:
                src.stop()

    async def run(self, stop: asyncio.Event | None = None) -> PipelineStats:
        deliver: asyncio.Queue[tuple[PendingEvent, dict[str, Any]] | None] = asyncio.Queue()
        names = [n for n, src in (("vision", self.video), ("audio", self.audio)) if src is not None]
        queues: dict[str, Any]
        if self.ordered:
            queues = {n: asyncio.Queue(_STAGE_QUEUE) for n in names}
        else:
            merged: asyncio.Queue[tuple[str, StageResult | None]] = asyncio.Queue(_STAGE_QUEUE)
            queues = {n: _Tagged(n, merged) for n in names}
        async with compat.TaskGroup() as tg:
            if self.video is not None:
                tg.create_task(self._video_stage(queues["vision"]), name="stage-vision")
            if self.audio is not None:
                tg.create_task(self._audio_stage(queues["audio"]), name="stage-audio")
            tg.create_task(self._decide(queues, deliver), name="decider")
            deliverer = tg.create_task(self._deliver(deliver), name="deliverer")
            if stop is not None:

                async def watch() -> None:
                    # Until a stop, or until the loop ends by itself (a recording ran out).
                    ended = asyncio.Event()
                    deliverer.add_done_callback(lambda _: ended.set())
                    if await runtime.sleep(stop, math.inf, wake=ended):
                        log.info("loop.draining", why="stop: sources closed, pending events "
                                 "are finished and delivered")
                        self.stop_sources()

                tg.create_task(watch(), name="stop-watch")
        if self.video is not None:
            self.stats.frames_dropped = self.video.stats.dropped
        if self.audio is not None:
            self.stats.audio_dropped = self.audio.stats.dropped
        return self.stats
