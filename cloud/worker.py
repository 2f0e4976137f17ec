"""The worker: lease events from the queue, open them, ask the reasoner, store the result sealed
for the device, ack.

Minimal for now (the next issue adds LLM reasoners, Redis/PostgreSQL backends and cost
bounds), but the delivery rules are final:

* At-least-once: the result is stored *before* the ack, and ``put_result`` is idempotent on
  (device_id, seq), so a worker killed between the two produces no second result.
* An event that can never succeed (device unknown or revoked since, envelope fails to open or
  its payload hash does not match, a reasoner's PermanentError) goes to the dead-letter list at
  once; a transient failure (``ReasonerUnavailable``, any other exception) is nacked with a
  growing delay and dead-lettered after ``cloud.queue_max_attempts`` deliveries.
* ``Worker.run(burst=True)`` drains what is ready and returns (tests, cron); otherwise it polls
  until ``stop`` is set, then finishes the events in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass

from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import EventQueue, Lease
from edgekeeper.cloud.reasoners.base import Reasoner, ReasonerUnavailable, load_reasoner
from edgekeeper.cloud.store.base import Store
from edgekeeper.config import Config
from edgekeeper.errors import PermanentError
from edgekeeper.log import get_logger
from edgekeeper.protocol.envelope import open_event, seal_result
from edgekeeper.protocol.errors import ProtocolError
from edgekeeper.protocol.keys import DevicePublicKeys
from edgekeeper.protocol.messages import ResultBody

log = get_logger(__name__)

RETRY_BASE_S = 5.0
RETRY_CAP_S = 300.0


@dataclass
class WorkerStats:
    done: int = 0
    retried: int = 0
    dead: int = 0


class Worker:
    """Owns one worker's lifecycle: its lease loop and the tasks reasoning about events."""

    def __init__(
        self,
        *,
        queue: EventQueue,
        store: Store,
        reasoner: Reasoner,
        keys: CloudKeys,
        concurrency: int = 4,
        visibility_s: float = 120.0,
        poll_s: float = 0.5,
        consumer: str | None = None,
        retry_base_s: float = RETRY_BASE_S,
    ) -> None:
        self.queue = queue
        self.store = store
        self.reasoner = reasoner
        self.keys = keys
        self.concurrency = concurrency
        self.visibility_s = visibility_s
        self.poll_s = poll_s
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.retry_base_s = retry_base_s
        self.stats = WorkerStats()

    async def run(self, *, burst: bool = False, stop: asyncio.Event | None = None) -> WorkerStats:
        stop = stop or asyncio.Event()
        slots = asyncio.Semaphore(self.concurrency)
        async with asyncio.TaskGroup() as tg:
            while not stop.is_set():
                await slots.acquire()
                free = 1
                while free < self.concurrency and not slots.locked():
                    await slots.acquire()
                    free += 1
                leases = await self.queue.lease(
                    self.consumer, count=free, visibility_s=self.visibility_s
                )
                for _ in range(free - len(leases)):
                    slots.release()
                for lease in leases:
                    tg.create_task(self._guarded(lease, slots))
                if leases:
                    continue
                if burst:
                    # Nothing ready: wait for the events in hand (a nack with no delay may make
                    # one ready again), then stop if there is still nothing.
                    for _ in range(self.concurrency):
                        await slots.acquire()
                    for _ in range(self.concurrency):
                        slots.release()
                    if not await self._ready():
                        break
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await stop.wait()
        return self.stats

    async def _ready(self) -> bool:
        stats = await self.queue.stats()
        return stats.ready > 0

    async def _guarded(self, lease: Lease, slots: asyncio.Semaphore) -> None:
        try:
            await self.process(lease)
        except Exception as err:  # never let one event take the worker down
            log.exception("worker_event_crashed", key=lease.event.key, error=str(err))
            await self._retry(lease, f"worker error: {err!r}")
        finally:
            slots.release()

    async def process(self, lease: Lease) -> None:
        ev = lease.event
        record = await self.store.get_device(ev.device_id)
        if record is None or record.revoked:
            why = "device unknown" if record is None else "device revoked"
            await self._dead(lease, why)
            return
        keys = DevicePublicKeys(ev.device_id, record.sign_pk, record.box_pk)
        try:
            opened = open_event(
                ev.envelope,
                cloud_box_sk=self.keys.box_key,
                lookup=lambda _id: keys,
                now=None,  # freshness was checked at ingest; it may have waited long since
                window_s=0.0,
                max_bytes=max(len(ev.envelope), 1),
                verify_payload_hash=True,
            )
        except ProtocolError as err:
            await self._dead(lease, f"cannot open: {err.code}: {err.message}")
            return
        try:
            verdict = await self.reasoner.reason(opened.body, model_version=opened.model_version)
        except ReasonerUnavailable as err:
            await self._retry(lease, f"reasoner unavailable: {err.message}")
            return
        except PermanentError as err:
            await self._dead(lease, f"reasoner refused: {err.message}")
            return
        result = ResultBody(
            device_id=ev.device_id,
            seq=ev.seq,
            reasoner=self.reasoner.name,
            label=verdict.label,
            confidence=verdict.confidence,
            summary=verdict.summary,
            action=verdict.action,
            gate_correct=verdict.gate_correct,
            provisional=verdict.provisional,
            produced_at=time.time(),
            extra=verdict.extra,
        )
        sealed = seal_result(result, cloud_box_sk=self.keys.box_key, device_box_pk=record.box_pk)
        await self.store.put_result(device_id=ev.device_id, seq=ev.seq, envelope=sealed,
                                    now=time.time())
        if not await self.queue.ack(lease):
            log.warning("worker_lease_lost", key=ev.key, attempts=lease.attempts)
        self.stats.done += 1
        log.debug("worker_event_done", key=ev.key, label=result.label)

    async def _retry(self, lease: Lease, reason: str) -> None:
        delay = min(RETRY_CAP_S, self.retry_base_s * 2 ** (lease.attempts - 1))
        if await self.queue.nack(lease, reason=reason, delay_s=delay):
            self.stats.retried += 1
            log.warning("worker_event_retry", key=lease.event.key, reason=reason, delay_s=delay)
        else:
            self.stats.dead += 1
            log.error("worker_event_dead", key=lease.event.key, reason=reason,
                      attempts=lease.attempts)

    async def _dead(self, lease: Lease, reason: str) -> None:
        await self.queue.dead_letter(lease, reason=reason)
        self.stats.dead += 1
        log.error("worker_event_dead", key=lease.event.key, reason=reason)


async def run_worker(config: Config, *, burst: bool = False) -> WorkerStats:
    """The ``edgekeeper cloud worker`` command: open backends, run until signalled (or drained)."""
    section = config.cloud
    data_dir = config.cloud_data_dir
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        store = await open_store(section.store_backend, data_dir, section=section)
        stack.push_async_callback(store.close)
        queue = await open_queue(section.queue_backend, data_dir,
                                 max_attempts=section.queue_max_attempts, section=section)
        stack.push_async_callback(queue.close)
        keys = await asyncio.to_thread(CloudKeys.ensure, data_dir)
        reasoner = load_reasoner(section.reasoner)
        stack.push_async_callback(reasoner.close)
        worker = Worker(
            queue=queue,
            store=store,
            reasoner=reasoner,
            keys=keys,
            concurrency=section.worker_concurrency,
            visibility_s=section.queue_visibility_seconds,
        )
        log.info("worker_started", consumer=worker.consumer, reasoner=reasoner.name, burst=burst)
        stats = await worker.run(burst=burst, stop=stop)
        log.info("worker_stopped", done=stats.done, retried=stats.retried, dead=stats.dead)
        return stats
