"""Prometheus metrics: the registry helpers every process uses (docs/operations.md lists the
metrics).

Each process, and each ingest, worker or device built in one process (the tests and the demo
run several), keeps its own ``CollectorRegistry``: prometheus_client's global default registry
would refuse a second metric of the same name and mix two services' numbers. A metric is
counted once, here, and the JSON status and report APIs read the same numbers back
(``value`` / ``total``) instead of keeping a second copy.

The ingest serves ``GET /metrics`` on its own aiohttp app. The worker and the device have no
HTTP server of their own: ``serve`` runs prometheus_client's small threaded server on
``127.0.0.1`` by default (``--metrics-port``), in a thread, so a collector that reads a SQLite
file at scrape time (the device's outbox) never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from edgekeeper.errors import ConfigError
from edgekeeper.log import get_logger

log = get_logger(__name__)

NAMESPACE = "edgekeeper"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Request and call latencies: from a fast ingest answer (~1 ms) to a slow LLM call (~a minute).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)


def new_registry() -> CollectorRegistry:
    """A registry of its own (never prometheus_client's global REGISTRY)."""
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format of everything in ``registry``."""
    return generate_latest(registry)


# Set (by `cloud serve --workers N`, for its children only) to a directory where every child
# keeps its values in memory-mapped files (prometheus_client's multiprocess mode): whichever child
# answers GET /metrics on the shared port sums them all (render_processes), so a scrape sees the
# whole ingest, not one random child. It must be set before prometheus_client is imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The multiprocess directory this process counts into, or None (its own registry)."""
    return os.environ.get(MULTIPROC_ENV) or None


def render_processes(path: str) -> bytes:
    """The text format of every process's values under ``path``, added up (counters and
    histograms summed, live gauges summed, scrape-time gauges the most recent)."""
    registry = CollectorRegistry(auto_describe=True)
    # prometheus_client's multiprocess module carries no annotations
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def forget_process(path: str, pid: int) -> None:
    """A child has exited: drop its live gauges (its counters stay in the totals)."""
    mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # (as above: unannotated)


def total(registry: CollectorRegistry, name: str, labels: Mapping[str, str] | None = None
          ) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (all of them when
    None): a counter's value summed over the label values not named."""
    want = dict(labels or {})
    found = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                found += sample.value
    return found


def by_label(registry: CollectorRegistry, name: str, label: str) -> dict[str, float]:
    """``{label value: sample value}`` of the samples called ``name`` (summed over the rest)."""
    out: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and label in sample.labels:
                key = sample.labels[label]
                out[key] = out.get(key, 0.0) + sample.value
    return out


# Distinct label values one worker's metrics keep (WorkerMetrics.reasoned).
MAX_LABELS = 50
# Per-device series for what the provider costs: one series per device up to this many, then
# "other" (a 100,000-device fleet must not grow the worker's scrape without bound; the store's
# `cloud usage --device` keeps every device's exact figures).
MAX_DEVICES = 1000


class IngestMetrics:
    """The ingest's metrics (cloud/ingest.py counts, ``GET /metrics`` serves them)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        r, ns = self.registry, f"{NAMESPACE}_ingest"
        self.events = Counter("events", "Events accepted: queued (new) or duplicate (a retry)",
                              ["status"], namespace=ns, registry=r)
        self.event_bytes = Counter("event_bytes", "Bytes of the envelopes accepted",
                                   namespace=ns, registry=r)
        self.refused = Counter("refused", "Requests refused, by error code (docs/protocol.md)",
                               ["reason"], namespace=ns, registry=r)
        self.enrollments = Counter("enrollments", "Enrollments answered, by outcome",
                                   ["outcome"], namespace=ns, registry=r)
        # multiprocess_mode: how `cloud serve --workers N` adds the children's values up
        # (MULTIPROC_ENV below); ignored by a single process.
        self.polls_open = Gauge("results_polls_open", "Results long-polls open now",
                                namespace=ns, registry=r, multiprocess_mode="livesum")
        self.results_queries = Counter(
            "results_queries", "Store queries the results long-polls made: since (the one "
            "poll per interval for all of them), version (a poll's starting point), rows (a "
            "device's results)", ["query"], namespace=ns, registry=r)
        self.results_wakeups = Counter("results_wakeups", "Results long-polls woken to read "
                                       "their device's results again", namespace=ns, registry=r)
        self.uploads_inflight = Gauge("uploads_inflight", "Event uploads being handled now",
                                      namespace=ns, registry=r, multiprocess_mode="livesum")
        self.latency = Histogram("request_seconds", "Time to answer a request, by route",
                                 ["route"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.queue_depth = Gauge("queue_events", "Events in the queue, by state (read when "
                                 "scraped)", ["state"], namespace=ns, registry=r,
                                 multiprocess_mode="mostrecent")
        self.queue_age = Gauge("queue_oldest_seconds", "How long the oldest event in the "
                               "queue has waited (0: empty; read when scraped)", namespace=ns,
                               registry=r, multiprocess_mode="mostrecent")
        self.releases = Gauge("releases", "Unexpired model releases, by model and rollout "
                              "stage (read when scraped)", ["model", "stage"], namespace=ns,
                              registry=r, multiprocess_mode="mostrecent")
        self.release_latest = Gauge("release_latest_published", "When the newest release of "
                                    "each model was published (epoch seconds)", ["model"],
                                    namespace=ns, registry=r, multiprocess_mode="mostrecent")
        self.registry_lookups = Counter(
            "registry_lookups", "Device registry look-ups: hit (cached), miss (read from the "
            "store), absent (a remembered unknown id)", ["result"], namespace=ns, registry=r)


class WorkerMetrics:
    """The worker's metrics (cloud/worker.py counts; its WorkerStats is read from them)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        r, ns = self.registry, f"{NAMESPACE}_worker"
        self.results = Counter(
            "events_reasoned", "Events concluded and stored, by reasoner, label and path "
            "(primary, cheaper over budget, fallback while the provider is down)",
            ["reasoner", "label", "path"], namespace=ns, registry=r)
        self.outcomes = Counter(
            "events_settled", "Events settled otherwise: retried, dead, skipped (already "
            "done), waiting (budget), deferred (provider down), lost (lease taken over)",
            ["outcome"], namespace=ns, registry=r)
        self.failures = Counter("failures", "Failed reasoning attempts and events, by kind",
                                ["kind"], namespace=ns, registry=r)
        self.latency = Histogram("reason_seconds", "Time a reasoner took to answer an event",
                                 ["reasoner"], namespace=ns, registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.tokens = Counter("llm_tokens", "Provider tokens used, by kind (input, output, "
                              "cache_write, cache_read)", ["reasoner", "kind"], namespace=ns,
                              registry=r)
        self.cost = Counter("llm_cost_usd", "What the provider calls cost, in USD",
                            ["reasoner"], namespace=ns, registry=r)
        self.device_tokens = Counter("llm_device_tokens", "Provider tokens used, by device "
                                     f"(the first {MAX_DEVICES} seen; the rest as 'other')",
                                     ["device"], namespace=ns, registry=r)
        self.device_cost = Counter("llm_device_cost_usd", "What the provider calls cost, in "
                                   f"USD, by device (the first {MAX_DEVICES}; then 'other')",
                                   ["device"], namespace=ns, registry=r)
        self._devices: set[str] = set()
        self.retrain_rounds = Counter("retrain_rounds", "Scheduled retrain rounds, by model "
                                      "and decision (published, accepted, refused)",
                                      ["model", "decision"], namespace=ns, registry=r)
        self.retrain_last = Gauge("retrain_last_round", "When the last scheduled retrain "
                                  "round of each model ended (epoch seconds)", ["model"],
                                  namespace=ns, registry=r)
        self.probes = Counter("provider_probes", "Probes of a provider that was down",
                              namespace=ns, registry=r)
        self.pruned = Counter("results_pruned", "Acknowledged results deleted after the "
                              "retention", namespace=ns, registry=r)
        self.provider = Enum("provider", "The provider as this worker last found it",
                             states=["ok", "down", "refused"], namespace=ns, registry=r)
        self._labels: set[str] = set()

    def device(self, device_id: str) -> str:
        """The ``device`` label for ``device_id``: itself, or "other" past MAX_DEVICES."""
        if device_id not in self._devices:
            if len(self._devices) >= MAX_DEVICES:
                return "other"
            self._devices.add(device_id)
        return device_id

    def reasoned(self, reasoner: str, label: str, path: str) -> None:
        """Count one concluded event. An LLM names its labels freely: past MAX_LABELS
        distinct ones, the rest count as "other" so a chatty model cannot grow the series
        without bound (``cloud results`` keeps every label)."""
        if label not in self._labels:
            if len(self._labels) >= MAX_LABELS:
                label = "other"
            else:
                self._labels.add(label)
        self.results.labels(reasoner=reasoner, label=label, path=path).inc()


@contextlib.asynccontextmanager
async def serve(registry: CollectorRegistry, port: int | None, host: str = "127.0.0.1",
                *, service: str) -> AsyncIterator[str | None]:
    """Serve ``registry`` on ``http://host:port/metrics`` in a thread while the block runs;
    yields the URL (the real port when ``port`` is 0), or None when ``port`` is None (off)."""
    if port is None:
        yield None
        return
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port {port} is not a port",
                          fix="use 1-65535 for --metrics-port (0: any free port)")
    try:
        server, thread = await asyncio.to_thread(
            _start_http_server, port, host, registry)
    except OSError as err:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {err.strerror or err}",
            fix="choose another --metrics-port, or stop the process using it",
        ) from None
    bound: Any = server.server_address
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{int(bound[1])}/metrics"
    log.info("metrics.listening", service=service, url=url)
    try:
        yield url
    finally:
        await asyncio.to_thread(_shutdown, server, thread)


def _shutdown(server: Any, thread: Any) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5.0)


__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "MULTIPROC_ENV", "NAMESPACE", "IngestMetrics",
           "WorkerMetrics", "by_label", "forget_process", "multiprocess_dir", "new_registry",
           "render", "render_processes", "serve", "total"]
