"""The event queue between the ingest and the workers: the Protocol every backend implements
(cloud/queue/sqlite.py, cloud/queue/redis_streams.py).

``enqueue`` is idempotent on (device_id, seq) and answers QUEUED, DUPLICATE or CONFLICT;
delivery is at-least-once with leases (``lease``, ``extend``, ``ack``, ``nack``, ``release``,
dead letters). Why dedupe lives here and what each call promises: docs/architecture.md.
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
    # When the oldest event still in the queue (ready or leased) was received; None: empty.
    oldest_received_at: float | None = None

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest queued event has waited (0 when the queue is empty)."""
        return 0.0 if self.oldest_received_at is None else max(0.0, now - self.oldest_received_at)


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
