"""The uploader: drains the outbox to the cloud ingest, in order, surviving any outage.

Each round leases the oldest rows (``uplink.batch``), seals each one now (fresh ``sent_at``, the
payload hash stored at capture, so the cloud recognises a retry), POSTs it (idempotent on device
id and seq) and acts on the answer's stable code (docs/protocol.md, Errors): delete after a
202/200, keep and back off on anything transient (edgekeeper/backoff.py; Retry-After wins),
correct the clock from the cloud's ``Date`` on ``stale``, dead-letter what can never be
accepted, halt on a device the cloud refuses. A 2xx that is not the ingest's JSON (a captive
portal) is a failure: deleting on it would lose the event. With ``uplink.edge_fallback`` a
provisional result from the gate's own decision goes to the result actions for events stuck
behind a dead link.

Lifecycle: ``async with Uplink(...) as up: await up.run(stop)`` (until ``stop``: the round in
hand finishes, then it returns) or ``await up.run_burst()`` (drain and return: ``edgekeeper
device upload --burst``, tests). ``DeviceLink`` bundles outbox, uploader and results client.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import json
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp

from edgekeeper import compat, runtime
from edgekeeper.backoff import Backoff, parse_retry_after
from edgekeeper.device.outbox import AsyncOutbox, Outbox, OutboxDiskFull, OutboxRow, OutboxSink
from edgekeeper.errors import PermanentError, RetryableError, classified
from edgekeeper.log import get_logger
from edgekeeper.protocol.envelope import CONTENT_TYPE, seal_event
from edgekeeper.protocol.errors import ProtocolError
from edgekeeper.protocol.keys import DeviceKeys
from edgekeeper.protocol.messages import EventBody, ResultBody
from edgekeeper.tls import client_context

if TYPE_CHECKING:
    from edgekeeper.config import Config, UplinkSection
    from edgekeeper.device.results import ResultActions, ResultsClient

log = get_logger(__name__)

# With nothing to send, look at the outbox this often even without a wake-up (another process,
# e.g. `edgekeeper run`, may be the one filling it).
IDLE_POLL_S = 5.0
_MAX_ANSWER = 64 * 1024
EDGE_REASONER = "edge-gate"

# Codes whose event can never be accepted as it is (docs/protocol.md, Errors).
_DEAD_CODES = frozenset({"malformed_envelope", "invalid_body", "seq_conflict", "payload_too_large"})
# Codes that mean nothing from this device will be accepted until someone acts.
_HALT_CODES = frozenset({"unknown_device", "device_revoked", "unsupported_version"})


class UplinkHalted(PermanentError):
    """The cloud refuses this device as a whole (not enrolled, revoked, wrong version)."""


class UplinkUnavailable(RetryableError, ConnectionError):
    """The cloud stayed unreachable for longer than the burst was allowed to wait."""


# --- one attempt ----------------------------------------------------------------------------


class Verdict(enum.Enum):
    DONE = "done"  # the cloud holds it: delete
    RETRY = "retry"  # keep, back off
    DEAD = "dead"  # can never be accepted: dead letter
    HALT = "halt"  # nothing from this device will be accepted now


@dataclass(frozen=True)
class Attempt:
    seq: int
    verdict: Verdict
    code: str  # the cloud's error code, "queued"/"duplicate", or a local cause
    message: str = ""
    status: int | None = None
    retry_after: float | None = None


@dataclass
class UplinkStats:
    delivered: int = 0
    duplicates: int = 0
    dead: int = 0
    failures: int = 0
    rounds: int = 0
    provisional: int = 0
    # Bytes of the envelopes posted (every attempt, retries included: what the link carried).
    bytes_sent: int = 0
    last_error: str | None = None
    # (code, seconds waited, the cloud's Retry-After or None) of the latest failing rounds.
    waits: deque[tuple[str, float, float | None]] = field(
        default_factory=lambda: deque(maxlen=256)
    )


@dataclass(frozen=True)
class BurstReport:
    delivered: int
    duplicates: int
    dead: int
    remaining: int
    last_error: str | None


def _now() -> float:
    return time.time()


class Uplink:
    """Owns the HTTP session and the upload loop of one device."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        *,
        keys: DeviceKeys,
        device_id: str,
        cloud_url: str,
        cloud_box_pk: bytes,
        section: UplinkSection,
        on_provisional: Callable[[ResultBody], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = _now,
    ) -> None:
        self.outbox = outbox
        self.keys = keys
        self.device_id = device_id
        self.url = cloud_url.rstrip("/") + "/v1/events"
        self.cloud_box_pk = bytes(cloud_box_pk)
        self.section = section
        self.on_provisional = on_provisional
        self.backoff = Backoff(section.backoff_base_seconds, section.backoff_cap_seconds, rng)
        self.stats = UplinkStats()
        self._clock = clock
        # The cloud's clock minus ours, learnt from a `stale` answer's Date header.
        self.clock_offset = 0.0
        self._down_since: float | None = None
        # Leases outlive one attempt's worst case (connect + read, twice) with room to spare.
        self._lease_s = max(60.0, 2 * (section.connect_timeout_seconds
                                        + section.read_timeout_seconds) + 30.0)
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Uplink:
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.section.connect_timeout_seconds,
            sock_read=self.section.read_timeout_seconds,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(
                limit=self.section.concurrency,
                ssl=client_context(self.section.ca_file) or True,
            ),
            headers={"Content-Type": CONTENT_TYPE},
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def link_down(self) -> bool:
        return self._down_since is not None

    async def run(self, stop: asyncio.Event) -> None:
        """Upload until ``stop`` is set; the edge fallback runs beside it when enabled."""
        async with compat.TaskGroup() as tg:
            tg.create_task(self._upload_loop(stop), name="uplink-upload")
            if self.section.edge_fallback:
                tg.create_task(self._fallback_loop(stop), name="uplink-fallback")

    async def run_burst(self, *, give_up_after: float | None = None,
                        stop: asyncio.Event | None = None) -> BurstReport:
        """Drain the outbox and return. Waits out failures with the usual backoff, for at most
        ``give_up_after`` seconds of consecutive failure (None: no limit), and returns early
        when ``stop`` is set. Raises UplinkHalted when the cloud refuses the device itself."""
        start = self.stats.delivered, self.stats.duplicates, self.stats.dead
        failing_since: float | None = None
        loop = asyncio.get_running_loop()
        stop = asyncio.Event() if stop is None else stop
        while not stop.is_set():
            count, failure = await self._guarded_round()
            if failure is None:
                failing_since = None
                if count == 0:
                    break
                continue
            if failure.verdict is Verdict.HALT:
                raise UplinkHalted(
                    f"the cloud refuses this device ({failure.code}): {failure.message}",
                    fix=_halt_fix(failure.code),
                )
            if self.section.edge_fallback:
                await self._fallback_pass()
            failing_since = loop.time() if failing_since is None else failing_since
            delay = self._delay(failure)
            if give_up_after is not None and loop.time() + delay - failing_since > give_up_after:
                break
            await runtime.sleep(stop, delay)
        remaining = (await self.outbox.stats()).pending
        return BurstReport(
            delivered=self.stats.delivered - start[0],
            duplicates=self.stats.duplicates - start[1],
            dead=self.stats.dead - start[2],
            remaining=remaining,
            last_error=self.stats.last_error if remaining else None,
        )

    # -- the loop ----------------------------------------------------------------------------

    async def _upload_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.outbox.changed.clear()  # before leasing, so a put() during the round wakes us
            count, failure = await self._guarded_round()
            if failure is not None:
                await runtime.sleep(stop, self._delay(failure))
            elif count == 0:
                await runtime.sleep(stop, IDLE_POLL_S, self.outbox.changed)

    def _delay(self, failure: Attempt) -> float:
        if failure.verdict is Verdict.HALT:
            # Nothing changes until an operator acts; look again at the cap, quietly.
            delay = self.backoff.cap
        elif failure.code == "stale" and failure.retry_after == 0.0:
            delay = 0.0  # clock corrected from the cloud's Date: retry at once
        else:
            delay = self.backoff.next_delay(failure.retry_after)
        self.stats.waits.append((failure.code, delay, failure.retry_after))
        log.warning(
            "uplink.retry_later",
            code=failure.code,
            status=failure.status,
            error=failure.message[:300],
            seconds=round(delay, 3),
            retry_after=failure.retry_after,
        )
        return delay

    async def _guarded_round(self) -> tuple[int, Attempt | None]:
        """A round whose outbox could not be written (disk full) is a failure to back off
        from, like a dead link: rows delivered but not deleted are sent again later and
        answered "duplicate"; rows still leased come back when their lease expires."""
        try:
            return await self._round()
        except OutboxDiskFull as err:
            return 0, Attempt(0, Verdict.RETRY, "disk_full", err.message)

    async def _round(self) -> tuple[int, Attempt | None]:
        """Send one leased batch. Returns (rows leased, the failure that stopped it or None)."""
        rows = await self.outbox.lease(self.section.batch, self._lease_s)
        if not rows:
            return 0, None
        self.stats.rounds += 1
        sem = asyncio.Semaphore(self.section.concurrency)
        failure: Attempt | None = None
        unsent = {r.seq for r in rows}
        delivered: list[int] = []  # deleted together at the end of the round (one fsync)

        async def one(row: OutboxRow) -> None:
            nonlocal failure
            async with sem:
                if failure is not None:
                    return  # the link is failing: do not hammer it, keep the order
                attempt = await self._attempt(row)
                unsent.discard(row.seq)
                if attempt.verdict is Verdict.DONE:
                    delivered.append(row.seq)
                    if attempt.code == "duplicate":
                        self.stats.duplicates += 1
                    else:
                        self.stats.delivered += 1
                else:
                    await self._settle(row, attempt)
                if attempt.verdict in (Verdict.RETRY, Verdict.HALT) and (
                    failure is None or attempt.verdict is Verdict.HALT
                ):
                    failure = attempt

        try:
            async with compat.TaskGroup() as tg:
                for row in rows:
                    tg.create_task(one(row), name=f"upload seq {row.seq}")
        finally:
            # Only now, after the cloud's 2xx for each of them. A crash before this commit
            # means those events are sent again and answered "duplicate": nothing is lost.
            await asyncio.shield(self.outbox.delete_many(delivered))
            # Rows never sent (an earlier failure, or cancellation) go back untouched, so the
            # next round - or the next process - takes them first.
            for seq in sorted(unsent):
                await asyncio.shield(self.outbox.release(seq, attempted=False))
        if failure is None:
            if self._down_since is not None:
                down = round(self._clock() - self._down_since, 1)
                log.info("uplink.link_restored", down_seconds=down)
            self._down_since = None
            self.backoff.reset()
        elif self._down_since is None:
            self._down_since = self._clock()
        return len(rows), failure

    async def _settle(self, row: OutboxRow, attempt: Attempt) -> None:
        try:
            if attempt.verdict is Verdict.DEAD:
                await self.outbox.bury(row.seq, f"{attempt.code}: {attempt.message}"[:1000])
                self.stats.dead += 1
            else:
                self.stats.failures += 1
                self.stats.last_error = f"{attempt.code}: {attempt.message}"[:1000]
                await self.outbox.release(row.seq, self.stats.last_error)
        except OutboxDiskFull as err:
            # The row stays leased until its lease expires, then is tried again.
            log.error("uplink.outbox_not_updated", seq=row.seq, error=err.message)

    async def _attempt(self, row: OutboxRow) -> Attempt:
        assert self._session is not None, "use `async with Uplink(...)`"
        sealed_offset = self.clock_offset  # what this envelope's sent_at is corrected by
        try:
            envelope = await self._seal(row)
        except ProtocolError as err:  # a stored body the protocol refuses: never sendable
            return Attempt(row.seq, Verdict.DEAD, err.code, err.message)
        try:
            with classified():
                self.stats.bytes_sent += len(envelope)
                async with self._session.post(self.url, data=envelope) as resp:
                    status = resp.status
                    text = (await resp.content.read(_MAX_ANSWER)).decode("utf-8", "replace")
                    headers = resp.headers
        except RetryableError as err:
            return Attempt(row.seq, Verdict.RETRY, "network", err.message)
        return self._judge(row.seq, status, text, headers, sealed_offset)

    async def _seal(self, row: OutboxRow) -> bytes:
        def seal() -> bytes:
            return seal_event(
                row.body,
                device=self.keys,
                cloud_box_pk=self.cloud_box_pk,
                sent_at=self._clock() + self.clock_offset,
                model_version=row.tag,
                payload_hash=row.digest,
            )

        # Small events seal faster than a thread hop; large ones would stall the loop.
        if len(row.body) <= 256 * 1024:
            return seal()
        return await asyncio.to_thread(seal)

    def _judge(
        self, seq: int, status: int, text: str, headers: Any, sealed_offset: float
    ) -> Attempt:
        retry_after = parse_retry_after(headers.get("Retry-After"), self._clock())
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # not the ingest's JSON: judged below
            data = None
        if status in (200, 202):
            ok = (
                isinstance(data, dict)
                and data.get("status") == ("queued" if status == 202 else "duplicate")
                and data.get("seq") == seq
            )
            if ok:
                return Attempt(seq, Verdict.DONE, str(data["status"]), status=status)
            return Attempt(seq, Verdict.RETRY, "unexpected_answer",
                           f"HTTP {status} without the ingest's JSON: {text[:120]!r}", status)
        code, message = "", text[:300]
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            code = str(data["error"].get("code", ""))
            message = str(data["error"].get("message", ""))
        if code in _DEAD_CODES or status == 413:
            return Attempt(seq, Verdict.DEAD, code or f"http_{status}", message, status)
        if code in _HALT_CODES:
            return Attempt(seq, Verdict.HALT, code, message, status)
        if code == "stale":
            return self._stale(seq, message, status, headers, sealed_offset)
        return Attempt(seq, Verdict.RETRY, code or f"http_{status}", message, status, retry_after)

    def _stale(
        self, seq: int, message: str, status: int, headers: Any, sealed_offset: float
    ) -> Attempt:
        """Our clock is off: seal with the cloud's (from its Date header) and retry at once,
        unless this envelope was already sealed with the cloud's time, in which case back off
        like any failure.

        Judged against the offset *this* envelope was sealed with: uploads in flight together
        are all refused stale, and whichever answer arrives second must not read the
        correction the first one just made as "already tried"."""
        try:
            server_now = email.utils.parsedate_to_datetime(headers.get("Date", "")).timestamp()
        except (TypeError, ValueError, IndexError):
            return Attempt(seq, Verdict.RETRY, "stale", message, status)
        offset = server_now - self._clock()
        if abs(offset - sealed_offset) <= 2.0:  # Date has 1 s resolution
            return Attempt(seq, Verdict.RETRY, "stale", message, status)
        if abs(offset - self.clock_offset) <= 2.0:  # corrected by another answer meanwhile
            return Attempt(seq, Verdict.RETRY, "stale", message, status, retry_after=0.0)
        log.warning("uplink.clock_skew", seconds=round(offset, 1),
                    fix="synchronise the device clock (NTP); sealing with the cloud's time")
        self.clock_offset = offset
        return Attempt(seq, Verdict.RETRY, "stale", message, status, retry_after=0.0)

    # -- edge fallback -----------------------------------------------------------------------

    async def _fallback_loop(self, stop: asyncio.Event) -> None:
        period = max(1.0, min(self.section.edge_fallback_after_seconds, IDLE_POLL_S))
        while not stop.is_set():
            if self.link_down:
                await self._fallback_pass()
            await runtime.sleep(stop, period)

    async def _fallback_pass(self) -> None:
        """Act on the gate's own decision for events stuck behind a dead link, once each."""
        if not self.link_down:
            return
        try:
            await self._fallback_rows()
        except RetryableError as err:  # the outbox or the actions' ledger is full
            log.error("uplink.fallback_postponed", error=err.message[:300], fix=err.fix)

    async def _fallback_rows(self) -> None:
        cutoff = self._clock() - self.section.edge_fallback_after_seconds
        for row in await self.outbox.fallback_candidates(cutoff, 100):
            try:
                result = provisional_result(row.body, self._clock(), self.stats.last_error)
            except ProtocolError as err:
                log.error("uplink.fallback_unreadable", seq=row.seq, error=err.message)
                await self.outbox.mark_fallback(row.seq)
                continue
            if self.on_provisional is not None:
                await self.on_provisional(result)
            await self.outbox.mark_fallback(row.seq)
            self.stats.provisional += 1
            log.info("uplink.edge_fallback", seq=row.seq, label=result.label,
                     confidence=result.confidence)


def provisional_result(body: bytes, now: float, link_error: str | None) -> ResultBody:
    """A result from the gate's own decision, marked provisional (no reasoner saw the event)."""
    event = EventBody.decode(body)
    meta = event.meta
    label = str(meta.get("label", ""))
    scores = meta.get("scores") if isinstance(meta.get("scores"), dict) else {}
    score = scores.get(label, 0.0) if isinstance(scores, dict) else 0.0
    confidence = float(score) if isinstance(score, (int, float)) else 0.0
    return ResultBody(
        device_id=event.device_id,
        seq=event.seq,
        reasoner=EDGE_REASONER,
        label=label,
        confidence=min(max(confidence, 0.0), 1.0),
        summary=f"gate decided {label or 'an event'}; the cloud was unreachable",
        action="",
        gate_correct=None,
        provisional=True,
        produced_at=now,
        extra={"source": "edge_fallback", "link_error": (link_error or "")[:300],
               "captured_at": event.captured_at},
    )


def _halt_fix(code: str) -> str:
    return {
        "unknown_device": "enroll: edgekeeper device enroll --cloud URL --token=TOKEN",
        "device_revoked": "this device was revoked; an operator must enroll it under a new id",
        "unsupported_version": "upgrade edgekeeper on the device to the cloud's version",
    }.get(code, "see docs/protocol.md, Errors")


# --- the device's whole link ----------------------------------------------------------------


class DeviceLink:
    """Outbox + uploader + results client of one device, owned together.

    For the device loop: ``async with await DeviceLink.open(config) as link:`` then hand
    ``link.sink`` to the pipeline and run ``await link.run(stop)`` beside it.
    """

    def __init__(
        self,
        outbox: AsyncOutbox,
        uplink: Uplink,
        actions: ResultActions,
        results: ResultsClient | None,
    ) -> None:
        self.outbox = outbox
        self.uplink = uplink
        self.actions = actions
        self.results = results
        self.sink = OutboxSink(outbox)
        self._stack = contextlib.AsyncExitStack()

    @classmethod
    def from_config(cls, config: Config, *, with_results: bool = True) -> DeviceLink:
        from edgekeeper.device import identity
        from edgekeeper.device.results import ResultActions, ResultsClient

        state = config.device.state_dir
        enrollment = identity.load_enrollment(state, config.device.id)
        keys = identity.load_keys(state)
        outbox = AsyncOutbox(open_outbox(config))
        cloud_url = config.uplink.cloud_url or enrollment.cloud_url
        actions = ResultActions.from_config(config)
        uplink = Uplink(
            outbox,
            keys=keys,
            device_id=config.device.id,
            cloud_url=cloud_url,
            cloud_box_pk=enrollment.cloud.box_pk,
            section=config.uplink,
            on_provisional=actions.handle_provisional,
        )
        results = None
        if with_results:
            results = ResultsClient(
                actions,
                keys=keys,
                device_id=config.device.id,
                cloud_url=cloud_url,
                cloud_box_pk=enrollment.cloud.box_pk,
                section=config.results,
                connect_timeout=config.uplink.connect_timeout_seconds,
                ssl_context=client_context(config.uplink.ca_file),
            )
            results.heartbeat_s = config.uplink.heartbeat_seconds  # sent once heartbeat is set
        return cls(outbox, uplink, actions, results)

    @classmethod
    async def open(cls, config: Config, *, with_results: bool = True) -> DeviceLink:
        """``from_config`` off the event loop (it opens SQLite files and reads the keys)."""
        return await asyncio.to_thread(cls.from_config, config, with_results=with_results)

    async def __aenter__(self) -> DeviceLink:
        try:
            self._stack.push_async_callback(self.outbox.close)
            self._stack.push_async_callback(self.actions.close)
            await self._stack.enter_async_context(self.uplink)
            if self.results is not None:
                await self._stack.enter_async_context(self.results)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        async with compat.TaskGroup() as tg:
            tg.create_task(self.uplink.run(stop), name="device-uplink")
            if self.results is not None:
                tg.create_task(self.results.run(stop), name="device-results")
                if self.results.heartbeat is not None and self.results.heartbeat_s > 0:
                    tg.create_task(self.results.run_heartbeats(stop), name="device-heartbeat")


def open_outbox(config: Config) -> Outbox:
    """The configured outbox, opened on the calling thread (it creates or checks the file)."""
    return Outbox(
        config.outbox_path,
        device_id=config.device.id,
        quota_bytes=int(config.outbox.quota_mb * 1024 * 1024),
        full_policy=config.outbox.full_policy,
    )


async def open_async_outbox(config: Config) -> AsyncOutbox:
    """The configured outbox for asyncio code, opened off the event loop."""
    return AsyncOutbox(await asyncio.to_thread(open_outbox, config))


__all__ = [
    "BurstReport",
    "DeviceLink",
    "Uplink",
    "UplinkHalted",
    "UplinkStats",
    "UplinkUnavailable",
    "open_async_outbox",
    "open_outbox",
    "provisional_result",
]
