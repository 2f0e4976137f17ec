"""The event queue between the ingest and the workers: what any backend must provide.

Why dedupe lives here and not in the store: "every committed event is in the queue exactly
once" needs the (device_id, seq) check and the insert in ONE atomic step. Split across two
backends (a PostgreSQL store and a Redis queue), a crash between "mark seen" and "enqueue" would
lose or duplicate the event. So ``enqueue`` is idempotent on (device_id, seq) itself and
remembers each key's payload hash (for at least ``seen_retention`` after the event is acked), and
answers QUEUED, DUPLICATE or CONFLICT.

Delivery is at-least-once with leases: ``lease`` hands out events that are not leased (or whose
lease expired: the worker died), each delivery counts an attempt; ``ack`` deletes; ``nack``
makes the event available again (after ``delay_s``) unless it has used up ``max_attempts``, in
which case it moves to the dead-letter list, as does any event leased once more after its
attempts ran out (a poison message that kills its worker). Ack and nack only succeed for the
current holder of the lease (``receipt``): a worker whose lease expired and was re-leased cannot
ack someone else's delivery.

Not every return to the queue is the event's failure: over a budget it waits for the next
UTC day, with the provider down it waits for the provider. ``release`` puts it back after
``delay_s`` without charging the delivery it just had, so such waits never use up
``max_attempts`` (an event over budget for a week must not be dead-lettered when nothing
failed). A lease that merely expires (the worker died) is still charged: that could be the
event's fault.

A worker whose reasoner call may outlive ``visibility_s`` keeps its lease with ``extend``
(a heartbeat): otherwise the lease expires under the call, a second worker leases the event and
the provider is paid twice. ``extend`` only ever prolongs the caller's own delivery; once that
was lost (expired and re-leased, or the event is gone) it answers False and changes nothing, so
a late heartbeat never takes an event back from its new holder.

How a Redis Streams backend maps onto this (next issue): ``enqueue`` = a Lua script doing
``HGET seen {key}`` / ``HSET`` + ``XADD`` atomically (with appendfsync always for durability);
``lease`` = ``XAUTOCLAIM`` (min-idle = visibility) for expired leases, then ``XREADGROUP >``;
``attempts`` = the entry's delivery count less its released (uncharged) deliveries; ``receipt``
= the stream entry id; ``ack`` = ``XACK``
+ ``XDEL``; ``nack`` = ``XACK`` + re-``XADD`` with attempts carried in the entry (or a delayed
ZSET); dead letters = a second stream.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

DEFAULT_SEEN_RETENTION_S = 30 * 86400.0


class EnqueueStatus(enum.Enum):
    QUEUED = "queued"  # new: durably committed
    DUPLICATE = "duplicate"  # same key, same payload hash: nothing done
    CONFLICT = "conflict"  # same key, different payload hash: refused, nothing done


@dataclass(frozen=True)
class QueuedEvent:
    """What the ingest enqueues: the sealed envelope as received (queue and storage hold
    ciphertext only) plus the authenticated header fields needed to route and dedupe it."""

    device_id: str
    seq: int
    payload_hash: bytes
    envelope: bytes
    received_at: float

    @property
    def key(self) -> str:
        return f"{self.device_id}:{self.seq}"


@dataclass(frozen=True)
class Lease:
    """One delivery of one event to one consumer. ``receipt`` identifies this delivery."""

    receipt: str
    event: QueuedEvent
    attempts: int  # deliveries so far, this one included
    consumer: str
    leased_until: float


@dataclass(frozen=True)
class DeadLetter:
    event: QueuedEvent
    attempts: int
    reason: str
    failed_at: float


@dataclass(frozen=True)
class QueueStats:
    ready: int  # waiting for a worker (including ones whose lease expired)
    leased: int  # held by a worker right now
    dead: int
    seen: int  # keys remembered for dedupe


@runtime_checkable
class EventQueue(Protocol):
    """A durable, idempotent, leased event queue. All methods are coroutines; none blocks the
    event loop."""

    max_attempts: int

    async def enqueue(self, event: QueuedEvent) -> EnqueueStatus:
        """Add ``event`` unless its key was seen. QUEUED is returned only once durable (fsync)."""
        ...

    async def lease(self, consumer: str, *, count: int, visibility_s: float) -> list[Lease]:
        """Up to ``count`` events, oldest first, invisible to others for ``visibility_s``."""
        ...

    async def ack(self, lease: Lease) -> bool:
        """Done: delete the event. False when the lease was lost (expired and re-leased)."""
        ...

    async def extend(self, lease: Lease, *, visibility_s: float) -> bool:
        """Still working on it: keep the event invisible to others for ``visibility_s`` from
        now. False when the lease was lost (expired and re-leased by someone else, or the event
        is gone); the caller must then stop, store nothing and not ack."""
        ...

    async def nack(self, lease: Lease, *, reason: str, delay_s: float = 0.0) -> bool:
        """Failed this time: True if it will be delivered again, False if now dead-lettered."""
        ...

    async def release(self, lease: Lease, *, delay_s: float = 0.0) -> bool:
        """Not the event's fault (over budget, provider down): make it available again after
        ``delay_s`` and do not count the delivery it just had as an attempt, so it is never
        dead-lettered for waiting. False (and no change) when the lease was lost."""
        ...

    async def dead_letter(self, lease: Lease, *, reason: str) -> bool:
        """Failed for good (it can never succeed): move it to the dead-letter list now."""
        ...

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    async def requeue_dead(self, keys: Sequence[str] | None = None) -> list[str]:
        """Put dead letters back in the queue, attempts reset (``edgekeeper cloud dlq
        requeue``): those whose ``event.key`` is in ``keys``, or all of them when None. Returns
        the keys requeued (unknown keys are skipped). The dedupe key stays remembered, so the
        device's own retries of that event are still duplicates."""
        ...

    async def stats(self) -> QueueStats: ...

    async def ping(self) -> None:
        """Raise if the backend cannot answer (for /healthz)."""
        ...

    async def close(self) -> None: ...
