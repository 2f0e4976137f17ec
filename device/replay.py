"""Replay: recorded sensor data through the very same Pipeline, for tuning and comparing models.

``replay_recording`` opens a recording with the same source classes the device uses (in lossless,
media-time mode), builds the same gates, trigger policy and capture, and runs ``Pipeline`` with
``ordered=True``: the same input and config give the same events, every time. With ground-truth
labels it scores the gate (precision, recall, triggers per hour); ``device/report.py`` turns the
result into JSON and an HTML page with plots. A result also names each model file it ran (variant,
sha256) and keeps a small thumbnail of each event's key frames for that page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekeeper import compat
from edgekeeper import config as config_mod
from edgekeeper.config import Config
from edgekeeper.device.events import Event
from edgekeeper.device.gate import Gate
from edgekeeper.device.loop import Pipeline, PipelineStats
from edgekeeper.device.manifest import Manifest, load_manifest
from edgekeeper.device.sink import LocalSink, Sink
from edgekeeper.device.sources import Recording, open_recording
from edgekeeper.errors import ModelError
from edgekeeper.log import bind_context, get_logger

log = get_logger(__name__)


@dataclass
class Gates:
    vision: Gate | None = None
    audio: Gate | None = None

    @property
    def models(self) -> dict[str, str]:
        out = {}
        if self.vision is not None:
            out["vision"] = self.vision.manifest.tag
        if self.audio is not None:
            out["audio"] = self.audio.manifest.tag
        return out

    def describe(self, config: Config) -> dict[str, dict[str, Any]]:
        """Per modality: the model tag, its variant and every file it ran, with sha256.

        ``name@version`` alone cannot tell a float build from an int8 one (both ship as
        person@1.0.0); the hashes can, and say exactly which files a report is about.
        Reads the model files: call it off the event loop.
        """
        specs = {"vision": config.gate.vision_model, "audio": config.gate.audio_model}
        out: dict[str, dict[str, Any]] = {}
        for modality, gate in (("vision", self.vision), ("audio", self.audio)):
            if gate is None:
                continue
            m = gate.manifest
            # A built-in model is picked by gate.variant (manifest-<variant>.json); a manifest
            # given by path, or a built-in one without variants, is what it is.
            variant = config.gate.variant
            picked = specs[modality].startswith("builtin:") and m.path.name == (
                f"manifest-{variant}.json"
            )
            files = [("manifest", m.path)]
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                labels = json.loads(m.path.read_bytes())["labels"]  # loading checked it exists
                files.append(("labels", m.path.parent / str(labels)))
            files += [(f"stage {i}", s.model) for i, s in enumerate(m.stages)]
            out[modality] = {
                "tag": m.tag,
                "spec": specs[modality],
                "variant": variant if picked else None,
                "manifest": str(m.path.resolve()),
                "files": [
                    {"role": role, "path": str(path.resolve()), "bytes": path.stat().st_size,
                     "sha256": _sha256(path)}
                    for role, path in files
                ],
            }
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.asynccontextmanager
async def open_gates(config: Config, *, vision: bool, audio: bool) -> AsyncIterator[Gates]:
    """Load the configured gate models (each in its own thread); close them on exit."""
    gates = Gates()
    try:
        if vision:
            gates.vision = Gate("vision", config.gate.num_threads)
            await gates.vision.load(await asyncio.to_thread(
                config_mod.resolve_model, config.gate.vision_model, config.gate.variant
            ))
        if audio:
            gates.audio = Gate("audio", config.gate.num_threads)
            await gates.audio.load(await asyncio.to_thread(
                config_mod.resolve_model, config.gate.audio_model, config.gate.variant
            ))
        await _check_trigger_labels(config, gates)
        bind_context(models=gates.models)
        yield gates
    finally:
        for g in (gates.vision, gates.audio):
            if g is not None:
                await asyncio.to_thread(g.close)


def _read_manifest(spec: str, variant: str) -> Manifest:
    """The manifest a gate.*_model value names (resolving a builtin: name stats files)."""
    return load_manifest(config_mod.resolve_model(spec, variant))


async def _check_trigger_labels(config: Config, gates: Gates) -> None:
    """Refuse a trigger rule no configured model can fire, now that the manifests are known.

    Both configured models count, loaded or not: a camera-only device keeps the audio labels'
    rules for when its microphone is switched on, and a video-only replay keeps them too."""
    outputs: dict[str, tuple[str, ...]] = {}
    for modality, gate in (("vision", gates.vision), ("audio", gates.audio)):
        if gate is not None:
            manifest = gate.manifest
        else:
            spec = getattr(config.gate, f"{modality}_model")
            try:
                manifest = await asyncio.to_thread(_read_manifest, spec, config.gate.variant)
            except ModelError:
                continue  # not loaded and not readable: nothing it outputs can be counted on
        outputs[f"{modality} model {manifest.tag}"] = manifest.labels
    config_mod.check_labels(config, outputs)


@dataclass
class ReplayResult:
    recording: Recording
    stats: PipelineStats
    models: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    # Per modality: tag, variant, files and their sha256 (Gates.describe).
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    # seq -> small JPEGs of the event's key frames, for the report page (not in report.json).
    thumbnails: dict[int, list[bytes]] = field(default_factory=dict)
    # seq -> (width, height) of each key frame the event carries (for the LLM cost estimate).
    frame_sizes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # Where the events were written as files (a LocalSink); None when they went to another sink.
    events_dir: Path | None = None

    @property
    def streaming_bytes(self) -> int:
        """What streaming everything would have sent: the recording's own encoded size."""
        return self.recording.input_bytes

    def summary(self) -> dict[str, Any]:
        s = self.stats.as_dict()
        return {
            "recording": str(self.recording.path),
            "models": self.models,
            **s,
            "bytes_sent": self.stats.event_bytes,
            "bytes_streaming_everything": self.streaming_bytes,
            "bytes_ratio": (
                round(self.stats.event_bytes / self.streaming_bytes, 5)
                if self.streaming_bytes
                else None
            ),
            "metrics": self.metrics,
        }


def evaluate(
    labels: list[dict[str, Any]],
    stats: PipelineStats,
    config: Config,
    duration: float,
) -> dict[str, Any]:
    """Score the gate against ground truth, per triggering label.

    - window level: a scored window is positive when its score reaches the label's threshold,
      and truly positive when its time falls inside a labelled range;
    - event level: a trigger is a true positive when it falls inside a range of its label (or
      within the post-roll after it), recall is the share of ranges that got a trigger;
    - triggers per hour over the recording's duration.
    """
    out: dict[str, Any] = {}
    post = config.event.post_roll_seconds
    fired = [d for d in stats.decisions if d["action"] == "fire"]
    for label, rule in sorted(config.trigger.labels.items()):
        ranges = [(r["start"], r["end"]) for r in labels if r["label"] == label]
        windows = [(t, s[label]) for t, _, s in stats.timeline if label in s]
        if not windows:
            continue
        inside = [any(a <= t <= b for a, b in ranges) for t, _ in windows]
        predicted = [s >= rule.threshold for _, s in windows]
        tp = sum(1 for p, y in zip(predicted, inside, strict=True) if p and y)
        fp = sum(1 for p, y in zip(predicted, inside, strict=True) if p and not y)
        fn = sum(1 for p, y in zip(predicted, inside, strict=True) if not p and y)
        triggers = [d["t"] for d in fired if d["label"] == label]
        ev_tp = sum(1 for t in triggers if any(a <= t <= b + post for a, b in ranges))
        hit_ranges = sum(1 for a, b in ranges if any(a <= t <= b + post for t in triggers))
        hours = duration / 3600.0
        out[label] = {
            "threshold": rule.threshold,
            "windows": len(windows),
            # The raw counts, so runs over several recordings can be pooled (replay --compare).
            "window_tp": tp,
            "window_fp": fp,
            "window_fn": fn,
            "true_triggers": ev_tp,
            "false_triggers": len(triggers) - ev_tp,
            "hit_ranges": hit_ranges,
            "window_precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "window_recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "labelled_ranges": len(ranges),
            "triggers": len(triggers),
            "event_precision": round(ev_tp / len(triggers), 4) if triggers else None,
            "event_recall": round(hit_ranges / len(ranges), 4) if ranges else None,
            "triggers_per_hour": round(len(triggers) / hours, 2) if duration else None,
            "false_triggers_per_hour": (
                round((len(triggers) - ev_tp) / hours, 2) if duration else None
            ),
        }
    return out


THUMBNAIL_WIDTH = 160


def thumbnails(frames: tuple[bytes, ...], width: int = THUMBNAIL_WIDTH) -> list[bytes]:
    """Each JPEG scaled down to ``width`` pixels (never up), re-encoded small."""
    return _thumbnails_and_sizes(frames, width)[0]


def _thumbnails_and_sizes(
    frames: tuple[bytes, ...], width: int = THUMBNAIL_WIDTH
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Thumbnails, and each readable frame's (width, height): what an LLM would be sent
    (device/cost.py prices images by their pixels). One decode serves both."""
    import cv2
    import numpy as np

    out, sizes = [], []
    for jpeg in frames:
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is None:  # not a JPEG we can read: leave it out rather than fail the report
            continue
        h, w = image.shape[:2]
        sizes.append((w, h))
        if w > width:
            image = cv2.resize(image, (width, max(1, round(h * width / w))),
                               interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 75])
        if ok:
            out.append(buf.tobytes())
    return out, sizes


class _RecordingSink:
    """Wraps a sink to keep each event's metadata and key-frame thumbnails for the report."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.metas: list[dict[str, Any]] = []
        self.thumbnails: dict[int, list[bytes]] = {}
        self.frame_sizes: dict[int, list[tuple[int, int]]] = {}

    async def next_seq(self) -> int | None:
        return await self.inner.next_seq()

    async def deliver(self, event: Event) -> None:
        await self.inner.deliver(event)
        self.metas.append({**event.meta(), "payload_bytes": event.payload_bytes})
        if event.frames:
            thumbs, sizes = await asyncio.to_thread(_thumbnails_and_sizes, event.frames)
            self.thumbnails[event.seq], self.frame_sizes[event.seq] = thumbs, sizes

    async def aclose(self) -> None:
        await self.inner.aclose()


async def replay_recording(
    path: Path,
    config: Config,
    *,
    events_dir: Path,
    realtime: bool = False,
    labels: list[dict[str, Any]] | None = None,
    progress: bool = True,
    gates: Gates | None = None,
    sink: Sink | None = None,
) -> ReplayResult:
    """Run one recording through the device pipeline and return its stats and metrics."""
    # Which gates a recording needs depends on what it holds; open it first to know.
    # Opening reads recording.json and probes the media files: on a thread, off the loop.
    probe = await asyncio.to_thread(open_recording, path, audio_rate=16000,
                                    fps=config.camera.fps, realtime=realtime)
    need_vision, need_audio = probe.video is not None, probe.audio is not None
    async with contextlib.AsyncExitStack() as stack:
        if gates is None:
            gates = await stack.enter_async_context(
                open_gates(config, vision=need_vision, audio=need_audio)
            )
        rate = gates.audio.manifest.sample_rate if gates.audio is not None else None
        rec = await asyncio.to_thread(
            open_recording,
            path,
            audio_rate=rate,
            fps=config.camera.fps,
            realtime=realtime,
            block_seconds=config.microphone.block_seconds,
        )
        if labels is not None:
            rec.labels = labels
        recorder = _RecordingSink(sink if sink is not None else LocalSink(events_dir))
        pipeline = Pipeline(
            config,
            recorder,
            video=rec.video,
            audio=rec.audio,
            vision_gate=gates.vision if rec.video is not None else None,
            audio_gate=gates.audio if rec.audio is not None else None,
            clock_base=rec.started_at,
            ordered=True,
            record_timeline=True,
        )
        stats = await _run_with_progress(pipeline, rec, show=progress)
        result = ReplayResult(
            rec,
            stats,
            gates.models,
            events=recorder.metas,
            gates=await asyncio.to_thread(gates.describe, config),
            thumbnails=recorder.thumbnails,
            frame_sizes=recorder.frame_sizes,
            events_dir=events_dir if sink is None else None,
        )
        if rec.labels is not None:
            duration = max(rec.duration, stats.media_seconds)
            result.metrics = evaluate(rec.labels, stats, config, duration)
        return result


async def _run_with_progress(pipeline: Pipeline, rec: Recording, *, show: bool) -> PipelineStats:
    # Opening a source reads its header (frame count, WAV length): do it off the loop first.
    for src in (rec.video, rec.audio):
        if src is not None:
            await asyncio.to_thread(src.ensure_open)
    total = rec.duration
    if not show or total < 5.0:
        return await pipeline.run()
    from tqdm import tqdm

    bar_format = "{l_bar}{bar}| {n:.1f}/{total:.1f} media s [{elapsed}<{remaining}]"
    with tqdm(total=round(total, 1), unit="s", desc=f"replay {rec.path.name}", leave=False,
              bar_format=bar_format) as bar:
        # The group owns the run: cancelling the replay (Ctrl-C) cancels and awaits it too.
        async with compat.TaskGroup() as tg:
            task = tg.create_task(pipeline.run(), name="replay-pipeline")
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                bar.n = round(min(total, pipeline.stats.media_seconds), 1)
                bar.refresh()
        return task.result()
