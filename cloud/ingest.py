"""The cloud ingest: an aiohttp app for enrollment, event uploads, results long-poll + ack, and
health (HTTP API in docs/protocol.md).

What it guarantees:

* ``202`` for an event only after the queue has durably committed it; ``200 duplicate`` for an
  idempotent retry, with no side effect.
* Every refusal is a JSON error with a stable code, decided before any side effect: nothing is
  enqueued, no token consumed, nothing acked.
* Memory is bounded: bodies are refused by Content-Length before they are read, chunked bodies
  are read only up to the limit, upload bodies held at once (being read or handled) stay within
  ``cloud.max_inflight * cloud.max_event_bytes`` bytes, and at most ``cloud.max_inflight``
  uploads are handled at once (more get ``503`` + Retry-After). A slot is taken only once the
  body is in, so clients trickling bodies hold bytes, not slots.

Public API: ``create_app(section, data_dir, *, store=None, queue=None, keys=None, clock=...)``
(injected backends are not closed by the app; otherwise it opens them from ``data_dir`` in a
cleanup context), ``IngestServer`` (owns the runner: ``await start() -> url``, ``await stop()``,
``await run(stop)``, ``await reload()``) and ``build_server(config, host, port)`` for
``edgekeeper cloud serve``, which runs it under edgekeeper.runtime. The app starts no task of its
own: the registry refresh and the results watch run inside the requests that need them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from edgekeeper import compat
from edgekeeper.cloud import enroll as enroll_mod
from edgekeeper.cloud import releases_serve
from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import EnqueueStatus, EventQueue, QueuedEvent
from edgekeeper.cloud.store.base import DeviceRecord, EnrollOutcome, Store
from edgekeeper.config import CloudSection, Config
from edgekeeper.errors import ConfigError, RetryableError
from edgekeeper.log import get_logger
from edgekeeper.metrics import CONTENT_TYPE as METRICS_TYPE
from edgekeeper.metrics import (
    IngestMetrics,
    multiprocess_dir,
    render,
    render_processes,
    total,
)
from edgekeeper.protocol.envelope import (
    CONTENT_TYPE,
    HEADER_TIMESTAMP,
    PROTOCOL_VERSION,
    open_event,
    peek_header,
    verify_request,
)
from edgekeeper.protocol.errors import (
    InvalidJson,
    InvalidRequest,
    PayloadTooLarge,
    ProtocolError,
    RequestTimeout,
    SeqConflict,
    UnsupportedMediaType,
)
from edgekeeper.protocol.keys import DevicePublicKeys, b64e
from edgekeeper.tls import server_context

log = get_logger(__name__)

MAX_ENROLL_BYTES = 4 * 1024
MAX_ACK_BYTES = 64 * 1024
MAX_ACK_IDS = 1000
MAX_RESULTS_LIMIT = 100
HEALTH_TIMEOUT_S = 2.0
# Envelopes at least this big are opened on a crypto thread. Opening and validating a 57 KB event
# costs ~100 us on the loop; handing it to a thread and back cost ~300 us of CPU on 2 cores
# (two wake-ups, GIL hand-offs, futures) and made the ingest slower (bench_ingest 2026-11-23:
# 1228 vs 1039 us CPU per event). Only envelopes that would stall the loop for a third of a
# millisecond or more (~0.35 ms per 192 KB) are worth the hop.
CRYPTO_THREAD_MIN_BYTES = 192 * 1024
JSON_TYPE = "application/json"
# On /healthz: the pid of the ingest process that answered.
PROCESS_HEADER = "X-Edgekeeper-Process"

Clock = Callable[[], float]


class ServiceError(RetryableError):
    """A refusal the device should retry later (429, 503), with its Retry-After."""

    def __init__(self, message: str, *, code: str, status: int, retry_after: float) -> None:
        super().__init__(message, fix="keep the event and retry after Retry-After seconds")
        self.code = code
        self.status = status
        self.retry_after = retry_after


def error_response(
    status: int, code: str, message: str, fix: str = "", headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "fix": fix}}, status=status, headers=headers
    )


# --- registry cache -----------------------------------------------------------------------

# How long an unknown device id is remembered as unknown, and how many are. Short: a reload
# (registry_refresh_seconds) already forgets them when any device enrolls elsewhere; the TTL
# only bounds how stale a miss can be if the refresh itself is failing.
NEGATIVE_TTL_S = 5.0
NEGATIVE_MAX = 10_000


class Registry:
    """The device registry, cached in memory so an upload costs no database read.

    It is re-read when the store's ``registry_version`` has changed (enrolments and revocations
    made by other processes, e.g. ``edgekeeper cloud revoke``), checked by the first request at
    most every ``cloud.registry_refresh_seconds``: a revocation takes effect within that. Changes
    made through this process apply at once. A device missing from the cache is looked up in the
    store before it is called unknown (it may have enrolled through another ingest a moment ago).

    That miss is remembered (negative_ttl_s, at most negative_max ids, the oldest let go first)
    and requests for the same id share one read: a flood of uploads under an unknown id costs
    one store read, not one per upload holding a max_inflight slot. Any reload (an enrollment
    elsewhere bumps the registry version) and an enrollment here forget the misses.
    """

    def __init__(self, store: Store, refresh_s: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 negative_ttl_s: float = NEGATIVE_TTL_S,
                 negative_max: int = NEGATIVE_MAX,
                 metrics: IngestMetrics | None = None) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._clock = clock
        self._devices: dict[str, DevicePublicKeys] = {}
        self._version = -1
        self._next_check = 0.0
        self._lock = asyncio.Lock()
        self._negative_ttl_s = negative_ttl_s
        self._negative_max = negative_max
        self._absent: dict[str, float] = {}  # unknown id -> when to ask the store again
        self._reads: dict[str, asyncio.Future[DevicePublicKeys | None]] = {}  # in flight
        self.metrics = metrics or IngestMetrics()

    @property
    def store_reads(self) -> int:
        """get_device calls made for ids not in the cache (counted once, in the metrics)."""
        return int(total(self.metrics.registry, "edgekeeper_ingest_registry_lookups_total",
                         {"result": "miss"}))

    async def load(self) -> None:
        version = await self._store.registry_version()  # before the list: never miss a change
        devices = await self._store.list_devices()
        self._devices = {d.device_id: d.public() for d in devices}
        self._absent.clear()
        self._version = version
        self._next_check = self._clock() + self._refresh_s

    async def _refresh_if_due(self) -> None:
        """Once due, the first request checks the version; requests arriving meanwhile wait
        for that check (in order), so none of them is judged by a registry known to be old."""
        if self._clock() < self._next_check:
            return
        async with self._lock:
            if self._clock() < self._next_check:
                return  # checked while we waited
            try:
                if await self._store.registry_version() != self._version:
                    await self.load()
            except Exception as err:  # the store hiccuped: keep the cache, look again later
                log.warning("ingest.registry_refresh_failed", error=str(err)[:300])
            finally:
                self._next_check = self._clock() + self._refresh_s

    def cached(self, device_id: str) -> DevicePublicKeys | None:
        return self._devices.get(device_id)

    async def get(self, device_id: str) -> DevicePublicKeys | None:
        await self._refresh_if_due()
        found = self._devices.get(device_id)
        if found is not None:
            self.metrics.registry_lookups.labels(result="hit").inc()
            return found
        retry_at = self._absent.get(device_id)
        if retry_at is not None:
            if self._clock() < retry_at:
                self.metrics.registry_lookups.labels(result="absent").inc()
                return None
            del self._absent[device_id]
        while (pending := self._reads.get(device_id)) is not None:
            try:
                # shielded: one waiter going away (client gone) must not cancel the read
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request was cancelled, not the read
                # the request that was reading went away: read in this one instead
        # This request reads for everyone asking meanwhile: no task of its own outlives it.
        shared: asyncio.Future[DevicePublicKeys | None] = (
            asyncio.get_running_loop().create_future())
        self._reads[device_id] = shared
        try:
            found = await self._read(device_id)
        except BaseException as err:
            if isinstance(err, Exception):
                shared.set_exception(err)
                shared.exception()  # retrieved: no "never retrieved" warning when none waits
            else:
                shared.cancel()
            raise
        finally:
            self._reads.pop(device_id, None)
        shared.set_result(found)
        return found

    async def _read(self, device_id: str) -> DevicePublicKeys | None:
        self.metrics.registry_lookups.labels(result="miss").inc()
        record = await self._store.get_device(device_id)
        if record is None:
            while len(self._absent) >= self._negative_max:
                self._absent.pop(next(iter(self._absent)))  # the oldest miss
            self._absent[device_id] = self._clock() + self._negative_ttl_s
            return None
        self._devices[device_id] = record.public()
        return self._devices[device_id]

    def update(self, record: DeviceRecord) -> None:
        self._devices[record.device_id] = record.public()
        self._absent.pop(record.device_id, None)


# --- rate limit ---------------------------------------------------------------------------


class TokenBuckets:
    """Per-device token bucket: ``rate`` tokens per second, at most ``burst`` saved up.

    Buckets exist only for authenticated devices, so their number is bounded by the registry.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> float:
        """Take one token; 0.0 if allowed, else the seconds until one is available."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


# --- results long-poll --------------------------------------------------------------------


class _Waiter:
    """One long-poll waiting in ``ResultsWatch``: its device, and the event that wakes it
    (``woken``: a result of its device landed; set without it: it is to take over polling)."""

    __slots__ = ("device_id", "event", "woken")

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.event = asyncio.Event()
        self.woken = False


class ResultsWatch:
    """Wakes a device's long-polls when a result of that device is stored (docs/scaling.md).

    Workers may run in other processes, so while anyone waits, one of the waiting requests (the
    poller) asks the store every ``poll_s`` which devices have results newer than the version it
    has seen (``Store.results_since``: one query per interval however many devices wait, and it
    reads only the rows stored since the last one) and wakes only those devices' waiters. Why
    not one global version that wakes everyone: at 100,000 waiting devices every result would
    cost 100,000 store reads. When the poller leaves, it hands polling to one other waiter, on
    the same schedule. No background task: nothing outlives a request.

    Nothing is missed: ``version`` is the newest id whose devices were woken; every result up
    to it was visible when read, and ids become visible in increasing order in both stores, so
    a later poll finds every result above it. A request that read a version below it may have
    missed a wake-up while it was reading, so it returns at once and reads again.
    """

    def __init__(self, store: Store, poll_s: float, metrics: IngestMetrics) -> None:
        self._store = store
        self._poll_s = poll_s
        self._metrics = metrics
        self._version = -1  # -1: nobody waits, nothing known (the next waiter brings a version)
        self._waiters: dict[str, set[_Waiter]] = {}
        self._order: dict[_Waiter, None] = {}  # every waiter, oldest first: who polls next
        self._poller: _Waiter | None = None
        self._next_poll = 0.0  # loop time; kept across a hand-over, so the interval holds

    @property
    def version(self) -> int:
        """The newest result id already handed out to waiters; -1 when unknown."""
        return self._version

    async def _poll(self) -> None:
        self._metrics.results_queries.labels(query="since").inc()
        try:
            found = await self._store.results_since(self._version)
        except Exception as err:
            log.warning("ingest.results_poll_failed", error=str(err)[:300])
            return
        for device_id in found.device_ids:
            for w in self._waiters.get(device_id, ()):
                w.woken = True
                w.event.set()
        self._version = max(self._version, found.version)

    async def wait_newer(self, device_id: str, version: int, timeout: float) -> bool:
        """Wait until ``device_id`` may have a result newer than ``version`` (read from the
        store, or ``self.version``, before the caller read its results); False on timeout."""
        loop = asyncio.get_running_loop()
        if self._version < 0:
            self._version, self._next_poll = version, loop.time() + self._poll_s
        elif version < self._version:
            self._metrics.results_wakeups.inc()
            return True  # a wake-up may have gone by while the caller read: read again
        deadline = loop.time() + timeout
        me = _Waiter(device_id)
        self._waiters.setdefault(device_id, set()).add(me)
        self._order[me] = None
        try:
            while not me.woken:
                now = loop.time()
                if now >= deadline:
                    return False
                if self._poller is None:
                    self._poller = me
                if self._poller is me:
                    if now >= self._next_poll:
                        self._next_poll = now + self._poll_s
                        await self._poll()
                        continue
                    until = min(deadline, self._next_poll)
                else:
                    until = deadline
                with contextlib.suppress(TimeoutError):
                    async with compat.timeout(until - now):
                        await me.event.wait()
                me.event.clear()
            self._metrics.results_wakeups.inc()
            return True
        finally:
            self._leave(me)

    def _leave(self, me: _Waiter) -> None:
        mine = self._waiters[me.device_id]
        mine.discard(me)
        if not mine:
            del self._waiters[me.device_id]
        del self._order[me]
        if self._poller is me:
            self._poller = None
            successor = next(iter(self._order), None)
            if successor is not None:
                successor.event.set()  # not woken: it loops and takes over the polling
        if not self._order:
            self._version = -1  # nobody waits: the next waiter's fresh version is better


# --- app state ----------------------------------------------------------------------------


@dataclass(eq=False)
class HeldPoll:
    """One results long-poll held open: its signed timestamp, its deadline (loop time), and
    the event that answers it early when a newer poll of the same device takes its place."""

    signed_at: float
    deadline: float
    superseded: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class IngestState:
    section: CloudSection
    store: Store
    queue: EventQueue
    keys: CloudKeys
    clock: Clock
    registry: Registry
    limiter: TokenBuckets
    watch: ResultsWatch
    metrics: IngestMetrics
    inflight: int = 0
    # Open results long-polls per device, for the per-device cap.
    polls: dict[str, list[HeldPoll]] = field(default_factory=dict)
    # Bytes of upload bodies held in memory now (being read or processed), for body_budget.
    body_bytes: int = 0
    crypto_pool: ThreadPoolExecutor | None = None
    # (model, stage) series of the releases gauge set at the last scrape.
    release_series: set[tuple[str, str]] = field(default_factory=set)


STATE: web.AppKey[IngestState] = web.AppKey("edgekeeper_ingest", IngestState)


# --- helpers ------------------------------------------------------------------------------


# Slowest body the ingest waits for, after the grace of cloud.body_timeout_seconds.
BODY_MIN_BYTES_PER_S = 4096


async def _read_capped(request: web.Request, limit: int, *, budgeted: bool = False) -> bytes:
    """The body, at most ``limit`` bytes, arriving without stalls.

    aiohttp waits for a body as long as the client keeps the connection open. A pause longer
    than cloud.body_timeout_seconds, or a body slower than that grace plus one second per
    BODY_MIN_BYTES_PER_S, is a 408.

    ``budgeted`` (uploads): the bytes read count against the ingest's body budget
    (max_inflight * max_event_bytes, IngestState.body_bytes) as they arrive, and a body that
    would go over it is a 503. The caller owns the returned bytes' share and gives it back
    with ``_release_body``; on any failure here it is given back before raising.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the body is {length} bytes; the limit is {limit}")
    st = request.app[STATE]
    grace = st.section.body_timeout_seconds
    budget = st.section.max_inflight * st.section.max_event_bytes
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace + (limit if length is None else length) / BODY_MIN_BYTES_PER_S
    buf = bytearray()
    try:
        while True:
            try:
                async with compat.timeout(min(grace, max(0.0, deadline - loop.time()))):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise RequestTimeout(
                    f"the body stalled after {len(buf)} bytes"
                    + (f" of {length}" if length is not None else "")
                ) from None
            if not chunk:
                break
            if budgeted:
                if st.body_bytes + len(chunk) > budget:
                    raise ServiceError(
                        f"upload bodies already hold {st.body_bytes} bytes of memory (the"
                        f" budget is cloud.max_inflight * cloud.max_event_bytes = {budget})",
                        code="unavailable", status=503, retry_after=1.0)
                st.body_bytes += len(chunk)
            buf += chunk
            if len(buf) > limit:
                raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
    except BaseException:
        if budgeted:
            _release_body(st, len(buf))
        raise
    return bytes(buf)


def _release_body(st: IngestState, nbytes: int) -> None:
    st.body_bytes -= nbytes


def _require_type(request: web.Request, expected: str) -> None:
    if request.content_type != expected:
        raise UnsupportedMediaType(
            f"Content-Type {request.content_type or '(none)'!r} is not accepted here",
            fix=f"send Content-Type: {expected}",
        )


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidJson(f"the body is not valid UTF-8 JSON: {err}") from None
    except RecursionError:  # "[[[[..." a few KB long: json recurses once per level
        raise InvalidJson("the body's JSON is nested too deeply") from None


async def _read_json(request: web.Request, limit: int) -> Any:
    _require_type(request, JSON_TYPE)
    return _parse_json(await _read_capped(request, limit))


async def _signed_device(request: web.Request, body: bytes) -> DevicePublicKeys:
    st = request.app[STATE]
    path, _, query = request.raw_path.partition("?")
    device_id = request.headers.get("X-Edgekeeper-Device", "")
    device = await st.registry.get(device_id) if device_id else None
    return verify_request(
        request.headers,
        method=request.method,
        path=path,
        query=query,
        body=body,
        lookup=lambda _id: device,
        now=st.clock(),
        window_s=st.section.replay_window_seconds,
    )


def _signed_at(request: web.Request) -> float:
    """The signed X-Edgekeeper-Timestamp of a request verify_request has accepted."""
    return float(request.headers[HEADER_TIMESTAMP])


async def _first_of(*waits: Awaitable[Any]) -> None:
    """Wait until any of ``waits`` is done; the others are cancelled (a task group would wait
    for all of them)."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"query parameter {name}={value} is outside [{lo}, {hi}]")
    return value


# --- handlers -----------------------------------------------------------------------------


async def post_event(request: web.Request) -> web.Response:
    st = request.app[STATE]
    section = st.section
    _require_type(request, CONTENT_TYPE)
    if request.content_length is not None and request.content_length > section.max_event_bytes:
        raise PayloadTooLarge(
            f"the envelope is {request.content_length} bytes; the limit is "
            f"{section.max_event_bytes}"
        )
    # The body is read before an upload slot is taken: a client trickling its body holds only
    # the bytes it has sent (against the memory budget), not one of max_inflight slots, so
    # 200 slow clients cannot turn every device away with 503 (bench/bench_floods.py, flood c).
    data = await _read_capped(request, section.max_event_bytes, budgeted=True)
    try:
        return await _process_event(st, data)
    finally:
        _release_body(st, len(data))


async def _process_event(st: IngestState, data: bytes) -> web.Response:
    section = st.section
    if st.inflight >= section.max_inflight:
        raise ServiceError(
            "too many uploads in flight", code="unavailable", status=503, retry_after=1.0
        )
    st.inflight += 1
    st.metrics.uploads_inflight.inc()
    try:
        header = peek_header(data, max_bytes=section.max_event_bytes)
        device = await st.registry.get(header.device_id)
        open_it = functools.partial(
            open_event,
            data,
            cloud_box_sk=st.keys.box_key,
            lookup=lambda _id: device,
            now=st.clock(),
            window_s=section.replay_window_seconds,
            max_bytes=section.max_event_bytes,
        )
        # libsodium releases the GIL: a large envelope is opened on a crypto thread so the loop
        # keeps reading other uploads meanwhile. Small ones are cheaper to open than to hand off.
        if len(data) >= CRYPTO_THREAD_MIN_BYTES and st.crypto_pool is not None:
            opened = await asyncio.get_running_loop().run_in_executor(st.crypto_pool, open_it)
        else:
            opened = open_it()
        wait = st.limiter.take(opened.device_id, time.monotonic())
        if wait > 0:
            raise ServiceError(
                f"device {opened.device_id!r} is over {section.rate_per_second:g} events/s",
                code="rate_limited",
                status=429,
                retry_after=wait,
            )
        try:
            status = await st.queue.enqueue(
                QueuedEvent(
                    device_id=opened.device_id,
                    seq=opened.seq,
                    payload_hash=opened.payload_hash,
                    envelope=opened.envelope,
                    received_at=st.clock(),
                )
            )
        except Exception as err:
            log.error("ingest.enqueue_failed", device_id=opened.device_id, seq=opened.seq,
                      error=str(err))
            raise ServiceError(
                "the queue could not commit the event", code="unavailable", status=503,
                retry_after=5.0,
            ) from err
    finally:
        st.inflight -= 1
        st.metrics.uploads_inflight.dec()
    body = {"device_id": opened.device_id, "seq": opened.seq}
    if status is EnqueueStatus.QUEUED:
        st.metrics.events.labels(status="queued").inc()
        st.metrics.event_bytes.inc(len(data))
        return web.json_response({"status": "queued", **body}, status=202)
    if status is EnqueueStatus.DUPLICATE:
        st.metrics.events.labels(status="duplicate").inc()
        return web.json_response({"status": "duplicate", **body}, status=200)
    raise SeqConflict(
        f"device {opened.device_id!r} seq {opened.seq} was already queued with another payload"
    )


async def post_enroll(request: web.Request) -> web.Response:
    st = request.app[STATE]
    req = enroll_mod.EnrollRequest.from_json(await _read_json(request, MAX_ENROLL_BYTES))
    outcome = await enroll_mod.enroll(st.store, req, now=st.clock())
    record = await st.store.get_device(req.device_id)
    if record is not None:
        st.registry.update(record)
    st.metrics.enrollments.labels(outcome=outcome.value).inc()
    log.info("ingest.device_enrolled", device_id=req.device_id, outcome=outcome.value)
    return web.json_response(
        {
            "device_id": req.device_id,
            "protocol_version": PROTOCOL_VERSION,
            "cloud": st.keys.public().to_json(),
        },
        status=201 if outcome is EnrollOutcome.ENROLLED else 200,
    )


async def get_results(request: web.Request) -> web.Response:
    st = request.app[STATE]
    device = await _signed_device(request, b"")
    cursor = _query_int(request, "cursor", 0, 0, 2**63 - 1)
    limit = _query_int(request, "limit", 20, 1, MAX_RESULTS_LIMIT)
    wait = _query_int(request, "wait", 0, 0, 3600)
    wait_s = min(float(wait), st.section.results_max_wait_seconds)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    # A signed long-poll can be replayed inside the freshness window: cap how many sockets one
    # device may hold open (its own client needs one; a reconnect may briefly overlap it). At
    # the cap, a poll signed later than a held one takes the oldest one's place (that one is
    # answered now with what it has): copies of a captured request can never be newer than
    # the device's own next poll, so they cannot lock the device out of its results (bench:
    # bench/bench_floods.py, flood b). A poll no newer than every held one gets 429.
    polls = st.polls.setdefault(device.device_id, [])
    cap = st.section.results_max_polls_per_device
    held = HeldPoll(_signed_at(request), deadline)
    if wait_s > 0 and len(polls) >= cap:
        oldest = min(polls, key=lambda p: p.signed_at)
        if held.signed_at <= oldest.signed_at:
            raise ServiceError(
                f"device {device.device_id!r} already holds {len(polls)} results long-polls"
                f" open (cloud.results_max_polls_per_device = {cap})",
                code="rate_limited", status=429,
                retry_after=min(p.deadline for p in polls) - loop.time(),
            )
        polls.remove(oldest)
        st.metrics.polls_open.dec()
        oldest.superseded.set()
    if wait_s > 0:
        polls.append(held)
        st.metrics.polls_open.inc()
    try:
        while True:
            # The watch's version when it has one (saves a query; results_since's contract
            # makes it as good as the store's), else the store's newest id: read before the
            # rows, so a result the rows miss is newer than it and wakes this poll.
            version = st.watch.version
            if version < 0:
                st.metrics.results_queries.labels(query="version").inc()
                version = await st.store.results_version()
            st.metrics.results_queries.labels(query="rows").inc()
            rows = await st.store.results_after(device.device_id, cursor, limit)
            remaining = deadline - loop.time()
            if rows or remaining <= 0 or held.superseded.is_set():
                break
            await _first_of(st.watch.wait_newer(device.device_id, version, remaining),
                            held.superseded.wait())
    finally:
        if wait_s > 0 and held in polls:  # not when superseded: its successor took its place
            polls.remove(held)
            st.metrics.polls_open.dec()
        if not polls and st.polls.get(device.device_id) is polls:
            st.polls.pop(device.device_id, None)
    return web.json_response(
        {
            "results": [{"id": r.id, "seq": r.seq, "envelope": b64e(r.envelope)} for r in rows],
            "cursor": rows[-1].id if rows else cursor,
        },
        headers=await releases_serve.hint_headers(request, device.device_id),
    )


async def post_results_ack(request: web.Request) -> web.Response:
    st = request.app[STATE]
    _require_type(request, JSON_TYPE)
    raw = await _read_capped(request, MAX_ACK_BYTES)
    device = await _signed_device(request, raw)
    data = _parse_json(raw)
    ids = data.get("ids") if isinstance(data, dict) else None
    if (
        not isinstance(ids, list)
        or not 1 <= len(ids) <= MAX_ACK_IDS
        or not all(type(i) is int and 0 < i < 2**63 for i in ids)
    ):
        raise InvalidRequest(f"'ids' must be a list of 1-{MAX_ACK_IDS} positive integers")
    acked = await st.store.ack_results(device.device_id, ids, now=st.clock())
    return web.json_response({"acked": acked})


# A heartbeat is a few hundred bytes of metadata; the cap keeps it from carrying anything else.
MAX_HEARTBEAT_BYTES = 8 * 1024


async def post_heartbeat(request: web.Request) -> web.Response:
    """A device's signed heartbeat (docs/protocol.md): kept as its latest, for `cloud devices`."""
    st = request.app[STATE]
    _require_type(request, JSON_TYPE)
    raw = await _read_capped(request, MAX_HEARTBEAT_BYTES)
    device = await _signed_device(request, raw)
    data = _parse_json(raw)
    if not isinstance(data, dict):
        raise InvalidRequest("a heartbeat must be a JSON object")
    await st.store.put_heartbeat(device.device_id, received_at=st.clock(),
                                 body=json.dumps(data, sort_keys=True))
    return web.json_response({"ok": True})


async def get_health(request: web.Request) -> web.Response:
    st = request.app[STATE]
    checks: dict[str, str] = {}
    pings: dict[str, Callable[[], Awaitable[None]]] = {
        "store": st.store.ping,
        "queue": st.queue.ping,
    }
    for name, ping in pings.items():
        try:
            async with compat.timeout(HEALTH_TIMEOUT_S):
                await ping()
            checks[name] = "ok"
        except Exception as err:
            checks[name] = f"error: {err or type(err).__name__}"
    if checks["store"] == "ok":
        # A provider refusing the workers' key stops every worker: nothing gets reasoned
        # about, so the cloud is not healthy even though this process is (docs/operations.md).
        try:
            provider = await st.store.provider_state()
        except Exception as err:
            checks["provider"] = f"error: {err or type(err).__name__}"
        else:
            checks["provider"] = ("ok" if provider is None or provider.state != "refused"
                                  else f"refused: {provider.reason}; fix: {provider.fix}")
    ok = all(v == "ok" for v in checks.values())
    # Which ingest process answered (`cloud serve --workers N` runs several on one port).
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503,
        headers={PROCESS_HEADER: str(os.getpid())},
    )


async def get_metrics(request: web.Request) -> web.Response:
    """The Prometheus text format; the queue's depth is read now, the rest was counted."""
    st = request.app[STATE]
    try:
        async with compat.timeout(HEALTH_TIMEOUT_S):
            depth = await st.queue.stats()
    except Exception as err:  # the metrics still answer; the depth is left as it was
        log.warning("ingest.queue_stats_failed", error=str(err)[:300])
    else:
        for state, n in (("ready", depth.ready), ("leased", depth.leased),
                         ("dead", depth.dead)):
            st.metrics.queue_depth.labels(state=state).set(n)
        st.metrics.queue_age.set(depth.oldest_age(time.time()))
    try:
        async with compat.timeout(HEALTH_TIMEOUT_S):
            releases = await st.store.releases()
    except Exception as err:  # as above: the rest of the metrics still answer
        log.warning("ingest.release_stats_failed", error=str(err)[:300])
    else:
        now = time.time()
        counts: dict[tuple[str, str], int] = {}
        latest: dict[str, float] = {}
        for r in releases:
            if r.expires_at > now:
                counts[(r.model, r.stage)] = counts.get((r.model, r.stage), 0) + 1
                latest[r.model] = max(latest.get(r.model, 0.0), r.published_at)
        shared = multiprocess_dir()
        for model, stage in st.release_series - counts.keys():
            # A stage no release is in any more reads as absent; with several processes it
            # reads 0 (their shared files cannot forget a series).
            if shared:
                st.metrics.releases.labels(model=model, stage=stage).set(0)
            else:
                st.metrics.releases.remove(model, stage)
        st.release_series = set(counts)
        for (model, stage), n in counts.items():
            st.metrics.releases.labels(model=model, stage=stage).set(n)
        for model, at in latest.items():
            st.metrics.release_latest.labels(model=model).set(at)
    shared = multiprocess_dir()  # `cloud serve --workers N`: every child's values, added up
    body = render(st.metrics.registry) if shared is None else render_processes(shared)
    return web.Response(body=body, headers={"Content-Type": METRICS_TYPE})


# --- middleware ---------------------------------------------------------------------------


@web.middleware
async def timing_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Time every request, by route (its pattern: unmatched paths share one label)."""
    started = time.perf_counter()
    try:
        return await handler(request)
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        if STATE in request.app:
            request.app[STATE].metrics.latency.labels(route=route).observe(
                time.perf_counter() - started)

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    400: "invalid_request",
}


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProtocolError as err:
        request.app[STATE].metrics.refused.labels(reason=err.code).inc()
        log.info("ingest.request_refused", path=request.path, code=err.code, reason=err.message,
                 remote=request.remote)
        return error_response(err.status, err.code, err.message, err.fix or "")
    except ServiceError as err:
        request.app[STATE].metrics.refused.labels(reason=err.code).inc()
        retry = str(max(1, math.ceil(err.retry_after)))
        return error_response(err.status, err.code, err.message, err.fix or "",
                              headers={"Retry-After": retry})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, exc.reason, "", headers=headers)
    except asyncio.CancelledError:
        raise
    except ConnectionResetError:
        # The client went away mid-request (a device losing its link mid-upload): nothing was
        # enqueued, it will send again, and there is nobody to answer. Not a server error.
        request.app[STATE].metrics.refused.labels(reason="client_gone").inc()
        log.info("ingest.client_gone", path=request.path, remote=request.remote)
        return error_response(400, "client_gone", "the connection closed mid-request",
                              "send the request again")
    except Exception:
        log.exception("ingest.internal_error", path=request.path)
        return error_response(500, "internal", "internal error", "retry later; report if it lasts")


# --- app ----------------------------------------------------------------------------------


def create_app(
    section: CloudSection,
    data_dir: Path,
    *,
    store: Store | None = None,
    queue: EventQueue | None = None,
    keys: CloudKeys | None = None,
    clock: Clock = time.time,
) -> web.Application:
    # client_max_size is only the backstop; handlers refuse by Content-Length first.
    app = web.Application(
        middlewares=[timing_middleware, errors_middleware],
        client_max_size=section.max_event_bytes + 1024,
    )
    metrics = IngestMetrics()  # this app's own registry (tests run several in one process)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            own_store = store or await open_store(section.store_backend, data_dir,
                                                  section=section)
            if store is None:
                stack.push_async_callback(own_store.close)
            own_queue = queue or await open_queue(
                section.queue_backend, data_dir, max_attempts=section.queue_max_attempts,
                section=section,
            )
            if queue is None:
                stack.push_async_callback(own_queue.close)
            own_keys = (keys if keys is not None
                        else await asyncio.to_thread(CloudKeys.ensure, data_dir))
            registry = Registry(own_store, section.registry_refresh_seconds, metrics=metrics)
            await registry.load()
            watch = ResultsWatch(own_store, section.results_poll_seconds, metrics)
            app[STATE] = IngestState(
                section=section,
                store=own_store,
                queue=own_queue,
                keys=own_keys,
                clock=clock,
                registry=registry,
                limiter=TokenBuckets(section.rate_per_second, section.rate_burst),
                watch=watch,
                metrics=metrics,
            )
            pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                      thread_name_prefix="ingest-crypto")
            stack.push_async_callback(asyncio.to_thread, pool.shutdown, True)
            app[STATE].crypto_pool = pool
            yield

    app.cleanup_ctx.append(resources)
    app.router.add_post("/v1/events", post_event)
    app.router.add_post("/v1/enroll", post_enroll)
    app.router.add_get("/v1/results", get_results)
    app.router.add_post("/v1/results/ack", post_results_ack)
    app.router.add_post("/v1/heartbeat", post_heartbeat)
    app.router.add_get("/healthz", get_health)
    app.router.add_get("/metrics", get_metrics)
    releases_serve.add_routes(app, releases_serve.Hooks(
        authenticate=_signed_device, read_body=_read_capped, store=lambda r: r.app[STATE].store,
        catalog=releases_serve.Catalog(section.registry_refresh_seconds,
                                       section.rollout_canary_seconds, clock)))
    return app


class IngestServer:
    """Owns one running ingest: the app, its runner and its listening socket."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None, *, reuse_port: bool = False) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        # SO_REUSEPORT: one of `cloud serve --workers N`'s children, sharing the port with its
        # siblings (the kernel spreads connections over them). Off otherwise, so a second
        # `cloud serve` on a taken port fails instead of silently sharing it.
        self.reuse_port = reuse_port
        self._runner: web.AppRunner | None = None

    @property
    def state(self) -> IngestState:
        return self.app[STATE]

    async def start(self) -> str:
        """Start listening; return the base URL (with the real port when ``port`` was 0)."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=10.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context,
                           reuse_port=self.reuse_port or None)
        try:
            await site.start()
        except OSError as err:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port}: {err.strerror or err}",
                fix="choose another --port / cloud.port, or stop the process using it",
            ) from None
        if self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop intake, let in-flight requests finish (bounded), then release resources."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop``; then stop intake and let requests in flight finish (aiohttp's
        shutdown_timeout bounds them, well inside the runtime's drain deadline)."""
        url = await self.start()
        log.info("ingest.listening", url=url)
        try:
            await stop.wait()
            log.info("ingest.draining")
        finally:
            await self.stop()

    async def reload(self) -> None:
        """SIGHUP: re-read the device registry now (enrolments and revocations made elsewhere)."""
        await self.state.registry.load()


def build_server(config: Config, *, host: str | None = None, port: int | None = None,
                 reuse_port: bool = False) -> IngestServer:
    """The ingest `edgekeeper cloud serve` runs (TLS files are read here, before any side
    effect)."""
    section = config.cloud
    tls = server_context(section.tls_cert_file, section.tls_key_file)
    app = create_app(section, config.cloud_data_dir)
    return IngestServer(app, host or section.host, section.port if port is None else port,
                        ssl_context=tls, reuse_port=reuse_port)


def claim_port(host: str, port: int) -> int:
    """Check that ``host:port`` is free before `cloud serve --workers N` starts its children
    (with SO_REUSEPORT they would join another server's port instead of failing); return the
    port (a free one when ``port`` is 0). ConfigError, as IngestServer.start says it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does
            probe.bind(address)
            return int(probe.getsockname()[1])
    except OSError as err:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {err.strerror or err}",
            fix="choose another --port / cloud.port, or stop the process using it",
        ) from None
