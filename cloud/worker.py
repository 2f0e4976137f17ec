"""The worker: lease events from the queue, open them, ask the reasoner, store the result sealed
for the device, ack. ``cloud.worker_concurrency`` events are in flight per process, each in its
own task of ``Worker.run``'s TaskGroup, named after the event.

The result is stored before the ack and a stored result is never asked for twice (effectively
once, with a heartbeat extending the lease while a call runs); an event that can never succeed
is dead-lettered, its own transient failure is nacked with the backoff's delay for its attempt,
and waits that are not its fault (provider down: the circuit opens; a budget spent) release it
without spending an attempt. A provider that refuses the worker itself (``ProviderRefused``: the
key, the model) stops it: leasing ends, the events in hand finish, ``run`` raises it. A lease
that fails with a RetryableError (the queue backend away) is tried again after the backoff.
docs/reasoning.md tells these rules in full; docs/runtime.md the stopping and the errors.

``Worker.run(burst=True)`` drains what is ready and returns; otherwise it runs until ``stop``
(edgekeeper.runtime sets it on SIGTERM/SIGINT), then finishes the events in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from edgekeeper import compat, runtime
from edgekeeper import metrics as metrics_mod
from edgekeeper.backoff import Backoff, Circuit
from edgekeeper.cloud import retrain_schedule as schedule
from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.budget import Budget, Decision
from edgekeeper.cloud.keys import CloudKeys, seal_summary
from edgekeeper.cloud.queue.base import EventQueue, Lease, QueuedEvent
from edgekeeper.cloud.reasoners.base import (
    ProviderRefused,
    ProviderUnavailable,
    Reasoner,
    ReasonerUnavailable,
    Usage,
    Verdict,
    load_reasoner,
    resolve_name,
)
from edgekeeper.cloud.retrain_schedule import RetrainScheduler
from edgekeeper.cloud.store.base import ProviderState, ResultSummary, Store
from edgekeeper.cloud.training.examples import ExampleRecorder
from edgekeeper.config import ACTIONS, Config
from edgekeeper.errors import FatalError, PermanentError, RetryableError
from edgekeeper.log import get_logger
from edgekeeper.metrics import WorkerMetrics, by_label, total
from edgekeeper.protocol.envelope import open_event, seal_result
from edgekeeper.protocol.errors import ProtocolError
from edgekeeper.protocol.keys import DevicePublicKeys
from edgekeeper.protocol.messages import EventBody, ResultBody

log = get_logger(__name__)

RETRY_BASE_S = 5.0
RETRY_CAP_S = 300.0
# Waits while the queue backend is away (Redis or PostgreSQL restarting).
BACKEND_BASE_S = 0.5
BACKEND_CAP_S = 30.0
# The midnight reset is spread over this many seconds, so waiting events do not all come back
# at 00:00:00 UTC at once.
BUDGET_RESET_SPREAD_S = 600.0
PROBE_DEVICE = "(probe)"  # usage of circuit probes (no device id can contain parentheses)
# cloud.results_retention_seconds' default; acked results are pruned every PRUNE_EVERY_S, at
# most PRUNE_BATCH per transaction (the SQLite store's write lock is shared with the ingest).
RESULTS_RETENTION_S = 7 * 86400.0
PRUNE_EVERY_S = 3600.0
PRUNE_BATCH = 1000
# A lease is extended this many times per visibility timeout while a reasoner call runs: two
# extensions can fail or come late before the lease expires under the call.
HEARTBEATS_PER_VISIBILITY = 3

T = TypeVar("T")


class _LeaseLost(Exception):
    """Our lease on an event was taken over while its reasoner call ran (worker-internal)."""


@dataclass(frozen=True)
class WorkerStats:
    done: int = 0
    retried: int = 0
    dead: int = 0
    skipped: int = 0  # redelivered with a result already stored: acked, no reasoner call
    provisional: int = 0  # results from the cheaper path or the fallback
    waiting: int = 0  # put back until a budget resets (no attempt spent)
    deferred: int = 0  # put back while the provider is down (no attempt spent)
    provider_failures: int = 0
    lost: int = 0  # lease taken over during a reasoner call: call cancelled, nothing stored
    pruned: int = 0  # acknowledged results deleted after the retention
    probes: int = 0
    cost_usd: float = 0.0

    @classmethod
    def read(cls, metrics: WorkerMetrics) -> WorkerStats:
        """The numbers of ``metrics`` (the one place they are counted) as the worker's
        summary: what ``run`` returns and ``cloud worker`` prints."""
        reg = metrics.registry
        paths = by_label(reg, f"{_M}_events_reasoned_total", "path")
        settled = by_label(reg, f"{_M}_events_settled_total", "outcome")
        done = int(sum(paths.values()))

        def n(outcome: str) -> int:
            return int(settled.get(outcome, 0))

        return cls(
            done=done, retried=n("retried"), dead=n("dead"), skipped=n("skipped"),
            provisional=done - int(paths.get("primary", 0)), waiting=n("waiting"),
            deferred=n("deferred"), lost=n("lost"),
            provider_failures=int(total(reg, f"{_M}_failures_total",
                                        {"kind": "provider_unavailable"})),
            pruned=int(total(reg, f"{_M}_results_pruned_total")),
            probes=int(total(reg, f"{_M}_provider_probes_total")),
            cost_usd=total(reg, f"{_M}_llm_cost_usd_total"),
        )


_M = "edgekeeper_worker"  # WorkerMetrics' prefix


def _fields(event: QueuedEvent) -> dict[str, Any]:
    """The log fields naming an event."""
    return {"device_id": event.device_id, "seq": event.seq}


def cap_action(action: str, limit: str) -> str:
    """The weaker of ``action`` and ``limit``; an unknown action counts as the strongest."""
    rank = ACTIONS.index(action) if action in ACTIONS else len(ACTIONS)
    return action if rank <= ACTIONS.index(limit) else limit


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
        retry_cap_s: float = RETRY_CAP_S,
        budget: Budget | None = None,
        over_budget: Literal["wait", "cheaper"] = "wait",
        cheaper: Reasoner | None = None,
        fallback: Reasoner | None = None,
        fallback_after_s: float = 600.0,
        provisional_max_action: str = "notify",
        circuit: Circuit | None = None,
        budget_reset_spread_s: float = BUDGET_RESET_SPREAD_S,
        results_retention_s: float = RESULTS_RETENTION_S,
        examples: ExampleRecorder | None = None,
        upkeep: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = (),
        clock: Callable[[], float] = time.time,
        metrics: WorkerMetrics | None = None,
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
        self.retry_cap_s = retry_cap_s
        # The nack delay of an event's n-th failed attempt (its count is the queue's).
        self.retry_backoff = Backoff(retry_base_s, max(retry_base_s, retry_cap_s))
        self.backend_backoff = Backoff(BACKEND_BASE_S, BACKEND_CAP_S)
        # None: no accounting at all (tests and the demo); run_worker always passes one.
        self.budget = budget
        self.over_budget = over_budget
        self.cheaper = cheaper
        self.fallback = fallback
        self.fallback_after_s = fallback_after_s
        self.provisional_max_action = provisional_max_action
        self.circuit = circuit or Circuit()
        self.budget_reset_spread_s = budget_reset_spread_s
        self.results_retention_s = results_retention_s  # 0: keep acknowledged results
        self.examples = examples  # training examples ([training]); None: none recorded
        # Periodic tasks beside leasing (scheduled retrain, rollout evaluation), each given
        # the event set when leasing is done; build_worker makes them from the config.
        self.upkeep = tuple(upkeep)
        # Wall-clock time for budget days, pauses and timestamps (tests cross a UTC midnight
        # with their own; the circuit keeps its own monotonic clock).
        self.clock = clock
        # Every count lives here (served by --metrics-port); ``stats`` reads them back.
        self.metrics = metrics or WorkerMetrics()
        # A spent global budget (wait policy) pauses leasing until this clock() time.
        self._paused_until = 0.0
        # Set by the first FatalError (a refused key): leasing stops, the events in hand
        # finish, then run() raises it.
        self._fatal: FatalError | None = None
        self._told_no_operator_key = False  # logged once: no operator.pub, no summaries

    @property
    def stats(self) -> WorkerStats:
        return WorkerStats.read(self.metrics)

    # --- the provider's state, for /healthz and `cloud status` ----------------------------
    async def _refused(self, err: FatalError) -> None:
        """The provider refuses this worker: say so once (with the fix), and record it where
        the ingest's /healthz and ``cloud status`` read it."""
        if self._fatal is not None:
            return
        self._fatal = err
        self.metrics.provider.state("refused")
        self.metrics.failures.labels(kind="provider_refused").inc()
        log.error("worker.provider_refused", reason=err.message, fix=err.fix)
        try:
            await self.store.put_provider_state(ProviderState(
                "refused", err.message, err.fix or "", self.consumer, self.clock()))
        except Exception as serr:  # the worker stops with the fix either way
            log.warning("worker.provider_state_unrecorded", error=repr(serr)[:300])

    async def _recheck_refused(self) -> None:
        """A worker starting after an earlier one was refused asks the provider once, so the
        refusal recorded for /healthz is cleared as soon as the key is fixed (or stays, and
        this worker stops at once, before leasing anything)."""
        try:
            prior = await self.store.provider_state()
        except RetryableError as err:  # the store is away: leasing waits it out, so do we
            log.warning("worker.provider_state_unread", error=err.message[:300], fix=err.fix)
            return
        if prior is None or prior.state != "refused":
            return
        try:
            usage = await self.reasoner.probe()
        except FatalError as err:
            await self._refused(err)
            return
        except Exception as err:  # down, not refused: the lease loop's circuit handles that
            log.warning("worker.probe_failed", error=repr(err)[:300])
            return
        await self._record(usage, PROBE_DEVICE, 0, self.reasoner.name)
        try:
            await self.store.put_provider_state(ProviderState(
                "ok", "", "", self.consumer, self.clock()))
        except RetryableError as err:
            log.warning("worker.provider_state_unrecorded", error=err.message[:300])
            return
        log.info("worker.provider_accepted", reasoner=self.reasoner.name, was=prior.reason)

    # --- the lease loop ---------------------------------------------------------------------
    async def run(self, *, burst: bool = False, stop: asyncio.Event | None = None) -> WorkerStats:
        stop = stop or asyncio.Event()
        await self._recheck_refused()
        slots = asyncio.Semaphore(self.concurrency)
        leasing_done = asyncio.Event()
        async with compat.TaskGroup() as tg:
            if self.results_retention_s > 0:
                tg.create_task(self._prune_results_hourly(leasing_done), name="worker-prune")
            if self.examples is not None:
                tg.create_task(self.examples.retention(leasing_done), name="worker-media")
            for task in self.upkeep:
                tg.create_task(task(leasing_done), name=f"worker-{task.__name__}")
            while not stop.is_set() and self._fatal is None:
                if self.circuit.is_open or self._paused_until > self.clock():
                    if burst:
                        break  # leave the rest queued: nothing more can be done now
                    await self._hold(stop)
                    continue
                await slots.acquire()
                free = 1
                while free < self.concurrency and not slots.locked():
                    await slots.acquire()
                    free += 1
                if stop.is_set() or self._fatal is not None:  # draining: lease no more
                    for _ in range(free):
                        slots.release()
                    break
                if self.circuit.is_open or self._paused_until > self.clock():
                    for _ in range(free):  # it failed while we waited for slots
                        slots.release()
                    continue
                try:
                    leases = await self.queue.lease(
                        self.consumer, count=free, visibility_s=self.visibility_s
                    )
                    self.backend_backoff.reset()
                except RetryableError as err:
                    # Redis or PostgreSQL went away: nothing is lost (events stay queued, leases
                    # expire), so wait and try again instead of exiting.
                    delay = self.backend_backoff.next_delay()
                    log.warning("worker.queue_unavailable", error=err.message[:300],
                                fix=err.fix, retry_in_s=round(delay, 2))
                    for _ in range(free):
                        slots.release()
                    await runtime.sleep(stop, delay)
                    continue
                if self._fatal is not None:  # it came while we leased: hand them back untouched
                    for lease in leases:
                        await self._put_back(lease, self._fatal.message, 0.0)
                    for _ in range(free):
                        slots.release()
                    break
                for _ in range(free - len(leases)):
                    slots.release()
                for lease in leases:
                    tg.create_task(self._guarded(lease, slots), name=f"event {lease.event.key}")
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
                await runtime.sleep(stop, self.poll_s)
            leasing_done.set()  # upkeep ends with the lease loop; the group awaits it
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    async def _hold(self, stop: asyncio.Event) -> None:
        """Leasing is paused: wait for the budget day to turn, or probe the provider."""
        if self._paused_until > self.clock():
            await runtime.sleep(stop, min(self._paused_until - self.clock(), 60.0))
            return
        await runtime.sleep(stop, self.circuit.remaining())
        if stop.is_set():
            return
        self.metrics.probes.inc()
        try:
            usage = await self.reasoner.probe()
        except ProviderUnavailable as err:
            await self._record(err.usage, PROBE_DEVICE, 0, self.reasoner.name)
            wait = self.circuit.probe_failed(err.retry_after)
            log.warning("worker.provider_still_down", reason=err.message,
                        next_probe_s=round(wait, 1))
            return
        except FatalError as err:  # the key or the model is refused: no probe will ever pass
            await self._refused(err)
            return
        except Exception as err:  # an unexpected probe failure is still "not back yet"
            wait = self.circuit.probe_failed()
            log.warning("worker.probe_failed", error=repr(err), next_probe_s=round(wait, 1))
            return
        await self._record(usage, PROBE_DEVICE, 0, self.reasoner.name)
        down = self.circuit.close()
        self.metrics.provider.state("ok")
        log.warning("worker.provider_back", down_s=round(down, 1))

    async def _prune_results_hourly(self, leasing_done: asyncio.Event) -> None:
        """Prune acknowledged results now, then every PRUNE_EVERY_S until leasing is done.

        Why the worker owns this and not the ingest: the ingest's request path is the one that
        is latency- and CPU-critical (benchmarked against a bare handler), while a worker
        mostly waits on a provider and already runs for the whole life of the cloud; it also
        writes the results. Several workers pruning at once is harmless: each batch is the same
        idempotent delete. Only workers prune.
        """
        while True:
            await self._prune_results(leasing_done)
            await runtime.sleep(leasing_done, PRUNE_EVERY_S)
            if leasing_done.is_set():
                return

    async def _prune_results(self, leasing_done: asyncio.Event) -> None:
        # Acked before the cutoff: the retention counts from the device's ack, not from when
        # the result was made, so a device that was offline for weeks still gets its full
        # retention after it finally fetched them.
        cutoff = self.clock() - self.results_retention_s
        pruned = 0
        try:
            while True:  # one batch at least, even when leasing is done already (burst)
                n = await self.store.prune_results(acked_before=cutoff, limit=PRUNE_BATCH)
                pruned += n
                if n < PRUNE_BATCH or leasing_done.is_set():
                    break
        except Exception as err:
            # Housekeeping: the store being away must not stop the worker; next hour again.
            log.warning("worker.results_prune_failed", error=repr(err)[:300],
                        retry_in_s=PRUNE_EVERY_S)
        self.metrics.pruned.inc(pruned)
        if pruned:
            log.info("worker.results_pruned", count=pruned, acked_before=round(cutoff))

    async def _ready(self) -> bool:
        stats = await self.queue.stats()
        return stats.ready > 0

    async def _guarded(self, lease: Lease, slots: asyncio.Semaphore) -> None:
        try:
            await self.process(lease)
        except FatalError as err:
            # The worker as a whole cannot go on (process() released the event): stop leasing,
            # let the events in hand finish, then run() raises it.
            await self._refused(err)
        except Exception as err:  # never let one event take the worker down
            self.metrics.failures.labels(kind="crashed").inc()
            log.exception("worker.event_crashed", **_fields(lease.event), error=str(err))
            try:
                await self._retry(lease, f"worker error: {err!r}")
            except RetryableError as down:
                # The queue is down too (most often the very outage that failed the event, an
                # ack to a restarting Redis): the lease expires and the event is delivered
                # again. Raising here would take the worker and every event in flight down.
                log.warning("worker.retry_not_recorded", **_fields(lease.event),
                            error=down.message[:300],
                            outcome="delivered again when its lease expires")
        finally:
            slots.release()

    # --- one event --------------------------------------------------------------------------
    async def process(self, lease: Lease) -> None:
        ev = lease.event
        started = time.perf_counter()
        if await self.store.has_result(ev.device_id, ev.seq):
            # Redelivered after its result was stored (the worker died before acking, or a
            # second copy was leased): nothing to do but ack. No second provider call.
            await self.queue.ack(lease)
            self.metrics.outcomes.labels(outcome="skipped").inc()
            log.info("worker.event_already_done", **_fields(ev), attempts=lease.attempts)
            return
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
            self.metrics.failures.labels(kind="cannot_open").inc()
            await self._dead(lease, f"cannot open: {err.code}: {err.message}")
            return

        reasoner, path, note = self.reasoner, "primary", ""
        if self.budget is not None:
            decision = await self.budget.check(ev.device_id, now=self.clock())
            if not decision.allowed:
                if self.over_budget == "wait" or self.cheaper is None:
                    await self._wait_for_budget(lease, decision)
                    return
                reasoner, path, note = self.cheaper, "cheaper", decision.reason

        reasoned = await self._reason(lease, reasoner, opened.body, opened.model_version)
        if reasoned is None:
            return
        reasoner, verdict, fell_back = reasoned
        if fell_back:
            path, note = "fallback", "provider unavailable"
        provisional = verdict.provisional or path != "primary"
        extra = dict(verdict.extra)
        if path != "primary":
            extra.update({"path": path, "why": note})
        result = ResultBody(
            device_id=ev.device_id,
            seq=ev.seq,
            reasoner=reasoner.name,
            label=verdict.label,
            confidence=verdict.confidence,
            summary=verdict.summary,
            action=(cap_action(verdict.action, self.provisional_max_action) if provisional
                    else verdict.action),
            gate_correct=verdict.gate_correct,
            provisional=provisional,
            produced_at=self.clock(),
            extra=extra,
        )
        sealed = seal_result(result, cloud_box_sk=self.keys.box_key, device_box_pk=record.box_pk)
        # The operator's view goes in with the sealed result, sealed to the operator key so
        # the store alone reveals nothing (cloud/keys.py, docs/security.md); none without one.
        summary = None
        if self.keys.operator_pk is not None:
            summary = seal_summary(ResultSummary(
                device_id=ev.device_id, seq=ev.seq, label=result.label,
                confidence=result.confidence, summary=result.summary, action=result.action,
                reasoner=result.reasoner, provisional=result.provisional,
                produced_at=result.produced_at, received_at=ev.received_at),
                self.keys.operator_pk)
        elif not self._told_no_operator_key:
            self._told_no_operator_key = True
            log.warning("worker.no_operator_key", fix="run 'edgekeeper cloud keys operator' "
                        "and restart the worker: until then no result summaries are stored")
        # The example goes in before the result: a worker killed between the two reasons the
        # redelivered event again (its example is kept once, by (device, seq, model)); the other
        # order would skip a redelivered event's example for good (it already has its result).
        if self.examples is not None:  # never raises: an example is not worth the event
            await self.examples.record(opened.body, result, opened.model_version)
        await self.store.put_result(device_id=ev.device_id, seq=ev.seq, envelope=sealed,
                                    now=self.clock(), summary=summary)
        if not await self.queue.ack(lease):
            log.warning("worker.lease_lost", **_fields(ev), attempts=lease.attempts, during="ack")
        self.metrics.reasoned(result.reasoner, result.label, path)
        log.info("worker.reasoned", **_fields(ev), label=result.label, reasoner=result.reasoner,
                 ms=round(1000 * (time.perf_counter() - started)))

    async def _reason(
        self, lease: Lease, reasoner: Reasoner, body: EventBody, model_version: str
    ) -> tuple[Reasoner, Verdict, bool] | None:
        """Ask ``reasoner``; on failure settle the lease and return None. The bool says the
        fallback answered instead."""
        ev = lease.event
        started = time.perf_counter()
        try:
            verdict = await self._call_leased(
                lease, reasoner.reason(body, model_version=model_version))
            self.metrics.latency.labels(reasoner=reasoner.name).observe(
                time.perf_counter() - started)
        except _LeaseLost:
            self._lease_lost(lease, reasoner)
            return None
        except ProviderRefused as err:
            # Not this event's fault and no retry will help: put it back untouched (no attempt
            # spent) and stop the worker with the fix.
            await self._refused(err)
            await self._record(err.usage, ev.device_id, ev.seq, reasoner.name)
            await self._put_back(lease, err.message, 0.0)
            raise
        except ProviderUnavailable as err:
            await self._record(err.usage, ev.device_id, ev.seq, reasoner.name)
            self.metrics.failures.labels(kind="provider_unavailable").inc()
            self.metrics.provider.state("down")
            wait = self.circuit.trip(err.retry_after)
            waited = self.clock() - ev.received_at
            if self.fallback is not None and reasoner is not self.fallback \
                    and waited >= self.fallback_after_s:
                try:
                    verdict = await self._call_leased(
                        lease, self.fallback.reason(body, model_version=model_version))
                except _LeaseLost:
                    self._lease_lost(lease, self.fallback)
                    return None
                except Exception as ferr:
                    log.warning("worker.fallback_failed", **_fields(ev), error=repr(ferr))
                else:
                    log.warning("worker.fallback_used", **_fields(ev), waited_s=round(waited, 1))
                    return self.fallback, verdict, True
            # Due again when the next probe is: if the provider is back by then, so is it.
            # The outage is not this event's fault, so it spends no attempt: released, not
            # nacked. (ProviderUnavailable means the provider as a whole, reasoners/base.py;
            # a reasoner must not raise it for a failure that only this event would cause,
            # or the event would come back after every outage forever.)
            reason = f"provider unavailable: {err.message}"
            delay = wait + random.uniform(0.0, 1.0)  # spread the comeback over a second
            if await self._put_back(lease, reason, delay):
                self.metrics.outcomes.labels(outcome="deferred").inc()
                log.warning("worker.event_deferred", **_fields(ev), reason=reason,
                            delay_s=round(delay, 2))
            return None
        except ReasonerUnavailable as err:
            await self._record(err.usage, ev.device_id, ev.seq, reasoner.name)
            self.metrics.failures.labels(kind="reasoner_unavailable").inc()
            await self._retry(lease, f"reasoner unavailable: {err.message}")
            return None
        except PermanentError as err:
            self.metrics.failures.labels(kind="refused_event").inc()
            await self._dead(lease, f"reasoner refused: {err.message}")
            return None
        await self._record(verdict.usage, ev.device_id, ev.seq, reasoner.name)
        return reasoner, verdict, False

    async def _call_leased(self, lease: Lease, call: Coroutine[Any, Any, T]) -> T:
        """Await ``call`` (a reasoner's) while a heartbeat keeps ``lease`` alive.

        Both are children of this event's task: the heartbeat is cancelled and awaited as soon
        as the call ends, and the call is cancelled and awaited when the heartbeat finds the
        lease lost, which raises _LeaseLost. The call's own exceptions reach the caller as they
        are (not wrapped in an ExceptionGroup), so _reason handles them as before.
        """
        async with compat.TaskGroup() as tg:
            answer = tg.create_task(_outcome(call), name=f"reason {lease.event.key}")
            heartbeat = tg.create_task(self._heartbeat(lease, answer),
                                       name=f"heartbeat {lease.event.key}")
            answer.add_done_callback(lambda _: heartbeat.cancel())
        if not heartbeat.cancelled() and heartbeat.result():
            raise _LeaseLost
        value, error = answer.result()
        if error is not None:
            raise error
        return cast(T, value)  # no error: the call returned a T

    async def _heartbeat(self, lease: Lease, call: asyncio.Task[Any]) -> bool:
        """Extend ``lease`` every visibility_s / HEARTBEATS_PER_VISIBILITY until cancelled or
        ``call`` is done (then False); if the queue says the lease was lost, cancel ``call``
        and return True."""
        every = self.visibility_s / HEARTBEATS_PER_VISIBILITY
        # Watch the call, not only our own cancellation: a queue client may swallow the cancel
        # that lands in the middle of an extend (seen with redis-py across a Redis restart),
        # and a heartbeat that outlives its call holds the event's lease forever.
        while not call.done():
            await asyncio.sleep(every)
            if call.done():
                break
            try:
                kept = await self.queue.extend(lease, visibility_s=self.visibility_s)
            except Exception as err:
                # The backend did not answer (Redis restarting, a busy SQLite file): the lease
                # may well still hold, and if it does expire the event is delivered again (at
                # least once). Abandoning a call already paid for would only cost more.
                log.warning("worker.lease_extend_failed", **_fields(lease.event),
                            error=repr(err)[:300])
                continue
            if not kept:
                call.cancel()
                return True
        return False

    def _lease_lost(self, lease: Lease, reasoner: Reasoner) -> None:
        self.metrics.outcomes.labels(outcome="lost").inc()
        log.warning("worker.lease_lost", **_fields(lease.event), attempts=lease.attempts,
                    reasoner=reasoner.name, during="reasoning",
                    outcome="call cancelled; no result stored, not acked (the new holder "
                            "answers it)")

    async def _record(self, usage: Usage, device_id: str, seq: int, reasoner: str) -> None:
        if usage.tokens == 0:
            return
        for kind, n in (("input", usage.input_tokens), ("output", usage.output_tokens),
                        ("cache_write", usage.cache_write_tokens),
                        ("cache_read", usage.cache_read_tokens)):
            if n:
                self.metrics.tokens.labels(reasoner=reasoner, kind=kind).inc(n)
        device = self.metrics.device(device_id)
        self.metrics.device_tokens.labels(device=device).inc(usage.tokens)
        if self.budget is None:
            return
        cost = await self.budget.record(usage, device_id=device_id, seq=seq, reasoner=reasoner,
                                        now=self.clock())
        self.metrics.cost.labels(reasoner=reasoner).inc(cost)
        self.metrics.device_cost.labels(device=device).inc(cost)

    async def _wait_for_budget(self, lease: Lease, decision: Decision) -> None:
        now = self.clock()
        delay = max(0.0, decision.retry_at - now) + random.random() * self.budget_reset_spread_s
        if decision.scope == "global":
            self._paused_until = max(self._paused_until, decision.retry_at)
        # Released, not nacked: a day spent over budget is no failure of the event, so an
        # event that waits longer than queue_max_attempts days is still never dead-lettered.
        if await self._put_back(lease, decision.reason, delay):
            self.metrics.outcomes.labels(outcome="waiting").inc()
            log.warning("worker.event_waits_for_budget", **_fields(lease.event),
                        reason=decision.reason, delay_s=round(delay))

    async def _put_back(self, lease: Lease, reason: str, delay: float) -> bool:
        """Release ``lease`` for ``delay`` seconds without charging an attempt. False when
        the lease was lost meanwhile (whoever holds it now decides)."""
        if await self.queue.release(lease, delay_s=delay):
            return True
        log.warning("worker.lease_lost", **_fields(lease.event), attempts=lease.attempts,
                    during="release", reason=reason)
        return False

    async def _retry(self, lease: Lease, reason: str, *, delay: float | None = None) -> None:
        if delay is None:
            delay = self.retry_backoff.delay_for(lease.attempts)
        if await self.queue.nack(lease, reason=reason, delay_s=delay):
            self.metrics.outcomes.labels(outcome="retried").inc()
            log.warning("worker.event_retry", **_fields(lease.event), reason=reason,
                        delay_s=round(delay, 2))
        else:
            self.metrics.outcomes.labels(outcome="dead").inc()
            log.error("worker.event_dead", **_fields(lease.event), reason=reason,
                      attempts=lease.attempts)

    async def _dead(self, lease: Lease, reason: str) -> None:
        await self.queue.dead_letter(lease, reason=reason)
        self.metrics.outcomes.labels(outcome="dead").inc()
        log.error("worker.event_dead", **_fields(lease.event), reason=reason)


async def _outcome(call: Coroutine[Any, Any, T]) -> tuple[T | None, Exception | None]:
    """What ``call`` returned or raised, so a task group does not wrap its error."""
    try:
        return await call, None
    except Exception as err:
        return None, err


def build_reasoners(config: Config, budget: Budget) -> tuple[Reasoner, Reasoner | None,
                                                             Reasoner | None]:
    """The primary reasoner (``cloud.reasoner``), the cheaper one for ``budget.over_budget =
    'cheaper'`` and the fallback (``reasoner.fallback``), refusing unpriced models up front."""
    section = config.reasoner
    primary = load_reasoner(config.cloud.reasoner, config)
    offline: Reasoner | None = primary if resolve_name(config.cloud.reasoner) == "offline" \
        else None

    def get_offline() -> Reasoner:
        nonlocal offline
        if offline is None:
            offline = load_reasoner("offline", config)
        return offline

    if primary.name.startswith("anthropic:"):
        budget.check_prices(section.model)
    cheaper: Reasoner | None = None
    if config.budget.over_budget == "cheaper":
        if section.cheaper_model and primary.name.startswith("anthropic:"):
            budget.check_prices(section.cheaper_model)
            cheaper = load_reasoner("anthropic", config, model=section.cheaper_model)
        else:
            cheaper = get_offline()
    fallback = get_offline() if section.fallback == "offline" else None
    return primary, cheaper, fallback


def build_worker(
    config: Config,
    *,
    queue: EventQueue,
    store: Store,
    keys: CloudKeys,
    stack: contextlib.AsyncExitStack,
    poll_s: float = 0.5,
    metrics: WorkerMetrics | None = None,
) -> Worker:
    """A Worker wired from the config: reasoners, budget, fallbacks, backoff. The reasoners are
    closed by ``stack``. `cloud worker` and `edgekeeper demo` build theirs here."""
    section = config.cloud
    budget = Budget(config.budget, store)
    reasoner, cheaper, fallback = build_reasoners(config, budget)
    for r in {id(x): x for x in (reasoner, cheaper, fallback) if x is not None}.values():
        stack.push_async_callback(r.close)
    rs = config.reasoner
    # Scheduled retrain ([training] retrain_every_hours; off by default) and the canary
    # promotion, so a release moves on even when no device polls (cloud/retrain_schedule.py).
    scheduler = RetrainScheduler(config, store, metrics=metrics)

    async def retrain(stop: asyncio.Event) -> None:
        await scheduler.run(stop)

    async def rollouts(stop: asyncio.Event) -> None:
        await schedule.rollouts(config, store, stop)

    return Worker(
        queue=queue,
        store=store,
        reasoner=reasoner,
        keys=keys,
        concurrency=section.worker_concurrency,
        visibility_s=section.queue_visibility_seconds,
        poll_s=poll_s,
        retry_base_s=rs.retry_base_seconds,
        retry_cap_s=rs.retry_max_seconds,
        budget=budget,
        over_budget=config.budget.over_budget,
        results_retention_s=section.results_retention_seconds,
        cheaper=cheaper,
        fallback=fallback,
        fallback_after_s=rs.fallback_after_seconds,
        provisional_max_action=rs.provisional_max_action,
        circuit=Circuit(rs.backoff_initial_seconds, rs.backoff_max_seconds),
        examples=ExampleRecorder(store, config.training, config.cloud_data_dir),
        upkeep=(retrain, rollouts),
        metrics=metrics,
    )


async def run_worker(config: Config, *, burst: bool = False,
                     stop: asyncio.Event | None = None, metrics_port: int | None = None,
                     metrics_host: str = "127.0.0.1") -> WorkerStats:
    """The ``edgekeeper cloud worker`` command: open backends, run until ``stop`` (or drained).
    With ``metrics_port``, its metrics are served on http://metrics_host:port/metrics."""
    section = config.cloud
    data_dir = config.cloud_data_dir
    async with contextlib.AsyncExitStack() as stack:
        metrics = WorkerMetrics()
        await stack.enter_async_context(
            metrics_mod.serve(metrics.registry, metrics_port, metrics_host, service="worker"))
        store = await open_store(section.store_backend, data_dir, section=section)
        stack.push_async_callback(store.close)
        queue = await open_queue(section.queue_backend, data_dir,
                                 max_attempts=section.queue_max_attempts, section=section)
        stack.push_async_callback(queue.close)
        keys = await asyncio.to_thread(CloudKeys.ensure, data_dir)
        worker = build_worker(config, queue=queue, store=store, keys=keys, stack=stack,
                              metrics=metrics)
        reasoner, cheaper, fallback = worker.reasoner, worker.cheaper, worker.fallback
        log.info("worker.started", consumer=worker.consumer, reasoner=reasoner.name, burst=burst,
                 concurrency=worker.concurrency,
                 cheaper=cheaper.name if cheaper else None,
                 fallback=fallback.name if fallback else None)
        stats = await worker.run(burst=burst, stop=stop)
        log.info("worker.stopped", done=stats.done, retried=stats.retried, dead=stats.dead,
                 skipped=stats.skipped, waiting=stats.waiting, cost_usd=round(stats.cost_usd, 6))
        return stats
