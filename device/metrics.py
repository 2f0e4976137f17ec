"""The device's Prometheus metrics (``edgekeeper run --metrics-port``; docs/operations.md).

The loop, the pre-gates, the trigger and the uplink already count what they do for the replay
report and ``device status`` (PipelineStats, TriggerStats, UplinkStats, the outbox's table). A
second copy in prometheus counters would drift from them, so this collector reads those very
numbers when a scrape comes, on the metrics server's thread: the outbox's counts are one
SQLite read there (Outbox is thread-safe), never on the event loop. Results are counted by one
more result action, which the ledger runs once per result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from edgekeeper.device.loop import LATENCY_BUCKETS_MS
from edgekeeper.log import get_logger
from edgekeeper.metrics import NAMESPACE, new_registry

if TYPE_CHECKING:
    from edgekeeper.device.loop import Pipeline
    from edgekeeper.device.uplink import DeviceLink

log = get_logger(__name__)

_P = f"{NAMESPACE}_device"
# A camera or microphone silent for longer than this counts as down (a live camera delivers
# several frames a second; a reconnect takes a few seconds).
SOURCE_UP_SECONDS = 10.0


class DeviceMetrics:
    """A collector over one running device: its pipeline and (when enrolled) its link."""

    def __init__(self, pipeline: Pipeline, link: DeviceLink | None,
                 registry: CollectorRegistry | None = None) -> None:
        self.pipeline = pipeline
        self.link = link
        self.registry = registry or new_registry()
        self.results = Counter("results", "Results handed to the result actions, by label and "
                               "whether they are provisional", ["label", "provisional"],
                               namespace=NAMESPACE, subsystem="device",
                               registry=self.registry)
        self.registry.register(self)
        if link is not None:
            link.actions.actions.append(("metrics", self._count_result))

    async def _count_result(self, doc: dict[str, Any]) -> None:
        self.results.labels(label=str(doc.get("label", "")),
                            provisional=str(bool(doc.get("provisional"))).lower()).inc()

    def describe(self) -> list[Metric]:
        # Nothing up front: describing would collect, and collecting reads the outbox.
        return []

    def _latency(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(f"{_P}_gate_seconds", "Gate inference time per window",
                                    labels=["modality"])
        s = self.pipeline.stats
        for gate, counts in list(s.latency_buckets.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS_MS, math.inf), list(counts), strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == math.inf else f"{bound / 1000:g}",
                                cumulative))
            # The loop names its gates vision/audio; the other series say video/audio.
            modality = "video" if gate == "vision" else gate
            fam.add_metric([modality], buckets,
                           sum_value=s.latency_total_ms.get(gate, 0.0) / 1000.0)
        return fam

    def collect(self) -> Iterator[Metric]:
        s = self.pipeline.stats

        def per_modality(name: str, doc: str, video: int, audio: int) -> CounterMetricFamily:
            fam = CounterMetricFamily(f"{_P}_{name}", doc, labels=["modality"])
            fam.add_metric(["video"], video)
            fam.add_metric(["audio"], audio)
            return fam

        yield per_modality("windows", "Video frames and audio windows read", s.frames,
                           s.audio_windows)
        yield per_modality("dropped", "Frames and audio blocks dropped by a full live queue",
                           s.frames_dropped, s.audio_dropped)
        yield per_modality("pregate_spared", "Windows the pre-gate spared the model",
                           s.frames_spared, s.audio_spared)
        yield per_modality("inferences", "Windows the gate model scored", s.frames_scored,
                           s.audio_scored)
        yield self._latency()
        fired = CounterMetricFamily(f"{_P}_triggers", "Triggers fired, by label",
                                    labels=["label"])
        for label, n in sorted(dict(self.pipeline.trigger.stats.by_label).items()):
            fired.add_metric([label], n)
        yield fired
        yield CounterMetricFamily(f"{_P}_events", "Events captured and stored",
                                  value=s.events)
        yield CounterMetricFamily(f"{_P}_event_bytes", "Bytes of the events captured",
                                  value=s.event_bytes)
        yield CounterMetricFamily(f"{_P}_events_lost", "Events acted on but not stored "
                                  "(the sink had no room)", value=s.events_lost)
        yield from self._sources_and_models()
        if self.link is not None:
            yield from self._link()

    def _sources_and_models(self) -> Iterator[Metric]:
        pl, p = self.pipeline, self.pipeline.progress
        now = time.monotonic()
        up = GaugeMetricFamily(f"{_P}_source_up", "1 while the camera or microphone delivered "
                               f"within the last {SOURCE_UP_SECONDS:g} s", labels=["source"])
        ages = GaugeMetricFamily(f"{_P}_source_last_seconds", "Seconds since the camera's last "
                                 "frame or the microphone's last block", labels=["source"])
        for name, src, at in (("camera", pl.video, p.frame_at), ("microphone", pl.audio,
                                                                  p.audio_at)):
            if src is None:
                continue  # not configured: no series (absent, not down)
            fresh = at is not None and now - at <= SOURCE_UP_SECONDS
            up.add_metric([name], 1.0 if fresh else 0.0)
            if at is not None:
                ages.add_metric([name], now - at)
        yield up
        yield ages
        # The model each gate runs now (a signed update swaps it): one series per modality.
        info = GaugeMetricFamily(f"{_P}_model_info", "The gate model running, as labels "
                                 "(value 1)", labels=["modality", "model", "version"])
        for modality, tag in sorted(dict(pl.capture.models).items()):
            name, _, version = str(tag).partition("@")
            info.add_metric([modality, name, version], 1.0)
        yield info

    def _link(self) -> Iterator[Metric]:
        assert self.link is not None
        u = self.link.uplink.stats
        uploads = CounterMetricFamily(f"{_P}_uploads", "Events the uplink settled, by outcome",
                                      labels=["outcome"])
        for outcome, n in (("delivered", u.delivered), ("duplicate", u.duplicates),
                           ("dead", u.dead), ("failed", u.failures)):
            uploads.add_metric([outcome], n)
        yield uploads
        yield CounterMetricFamily(f"{_P}_bytes_sent", "Bytes of the event envelopes posted "
                                  "to the cloud, retries included", value=u.bytes_sent)
        yield CounterMetricFamily(f"{_P}_provisional_results", "Edge fallbacks made while the "
                                  "link was down", value=u.provisional)
        try:
            o = self.link.outbox.sync.stats()
        except Exception as err:  # a scrape must not fail because the disk hiccuped
            log.warning("metrics.outbox_unreadable", error=repr(err)[:300])
            return
        backlog = GaugeMetricFamily(f"{_P}_outbox_events", "Events in the outbox, by state",
                                    labels=["state"])
        for state, n in (("pending", o.pending), ("leased", o.leased), ("dead", o.dead)):
            backlog.add_metric([state], n)
        yield backlog
        yield GaugeMetricFamily(f"{_P}_outbox_bytes", "Bytes the outbox holds", value=o.bytes)
        yield GaugeMetricFamily(f"{_P}_outbox_quota_bytes", "The outbox's quota",
                                value=o.quota_bytes)
        age = o.oldest_age()
        yield GaugeMetricFamily(f"{_P}_outbox_oldest_seconds", "Age of the oldest event "
                                "waiting (0: none)", value=0.0 if age is None else age)
        yield CounterMetricFamily(f"{_P}_outbox_dropped", "Events the full outbox dropped",
                                  value=o.dropped_total)


__all__ = ["DeviceMetrics"]
