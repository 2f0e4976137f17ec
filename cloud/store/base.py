"""The cloud's durable state other than the queue: the Protocol every store implements
(cloud/store/sqlite.py, cloud/store/postgres.py).

The device registry (with a ``registry_version`` that changes on every change), one-time
enrolment tokens (SHA-256 hashes only), results sealed for their device (an increasing ``id`` is
the long-poll cursor; kept until acked, then ``cloud.results_retention_seconds``) and usage per
device and day. docs/architecture.md says why each is so.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from edgekeeper.cloud.store.releases import ReleaseStore
from edgekeeper.cloud.training.examples import ExampleStore
from edgekeeper.protocol.errors import DeviceExists, InvalidToken
from edgekeeper.protocol.keys import DevicePublicKeys


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    sign_pk: bytes
    box_pk: bytes
    enrolled_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def public(self) -> DevicePublicKeys:
        return DevicePublicKeys(self.device_id, self.sign_pk, self.box_pk, revoked=self.revoked)


class EnrollOutcome(enum.Enum):
    ENROLLED = "enrolled"  # new device, token consumed
    REPEATED = "repeated"  # the same token, id and keys again: the device lost our answer


@dataclass(frozen=True)
class StoredResult:
    id: int
    device_id: str
    seq: int
    envelope: bytes
    created_at: float


@dataclass(frozen=True)
class UsageRecord:
    """One provider call's usage, priced (cloud/budget.py). ``call_id`` is unique per call
    (the provider's message id), so recording it twice counts it once; ``day`` is the UTC day
    'YYYY-MM-DD' the budget charges it to."""

    call_id: str
    device_id: str
    seq: int
    day: str
    reasoner: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    cost_usd: float
    created_at: float

    @property
    def tokens(self) -> int:
        return (self.input_tokens + self.output_tokens + self.cache_write_tokens
                + self.cache_read_tokens)


@dataclass(frozen=True)
class UsageTotals:
    calls: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class UsageRow:
    """One device's usage on one UTC day (``edgekeeper cloud usage``)."""

    day: str
    device_id: str
    calls: int
    events: int  # distinct sequence numbers
    input_tokens: int
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    cost_usd: float


@runtime_checkable
class Store(ExampleStore, ReleaseStore, Protocol):
    """Registry, tokens and results; training examples (ExampleStore,
    cloud/training/examples.py); releases (cloud/store/releases.py). Coroutines only; none
    blocks the event loop."""

    # registry ---------------------------------------------------------------------------
    async def enroll(
        self, *, token_hash: bytes, device_id: str, sign_pk: bytes, box_pk: bytes, now: float
    ) -> EnrollOutcome:
        """Consume the token and register the device, atomically. Raises
        protocol.errors.InvalidToken (unknown/expired/used) or DeviceExists, with no change."""
        ...

    async def get_device(self, device_id: str) -> DeviceRecord | None: ...

    async def list_devices(self) -> list[DeviceRecord]: ...

    async def revoke(self, device_id: str, *, now: float) -> bool:
        """Mark revoked (kept, so the id stays taken). False if unknown or already revoked."""
        ...

    async def registry_version(self) -> int: ...

    # tokens -----------------------------------------------------------------------------
    async def add_token(self, *, token_hash: bytes, created_at: float, expires_at: float) -> None:
        ...

    # results ----------------------------------------------------------------------------
    async def put_result(self, *, device_id: str, seq: int, envelope: bytes, now: float) -> int:
        """Store a sealed result; idempotent on (device_id, seq) (a re-run worker keeps the
        first). Returns its id. Durable on return."""
        ...

    async def results_after(self, device_id: str, cursor: int, limit: int) -> list[StoredResult]:
        """This device's unacked results with id > cursor, oldest first."""
        ...

    async def ack_results(self, device_id: str, ids: Sequence[int], *, now: float) -> int:
        """Mark acked; returns how many of ``ids`` were this device's and not yet acked."""
        ...

    async def results_version(self) -> int:
        """Changes whenever a result is added (the largest id), for long-poll wake-ups."""
        ...

    async def has_result(self, device_id: str, seq: int) -> bool:
        """Whether a result for (device_id, seq) is stored (acked or not): the worker asks
        before calling a reasoner, so a redelivered event costs no second provider call. An
        acked result is pruned only after the retention, far longer than any event stays
        queued once its result is stored (a lease), so this stays sound."""
        ...

    async def prune_results(self, *, acked_before: float, limit: int) -> int:
        """Delete up to ``limit`` results acked before ``acked_before`` (oldest acks first), in
        one short transaction on an index of ``acked_at``; returns how many. Unacked results
        are never touched. Call again while it returns ``limit``."""
        ...

    # usage (cloud/budget.py) --------------------------------------------------------------
    async def record_usage(self, record: UsageRecord) -> bool:
        """Add one call's usage and, in the same transaction, to the running totals of
        (record.day, record.device_id) and of (record.day, "*"), the global total. Idempotent
        on ``call_id``: True if new, False if that call was already recorded."""
        ...

    async def usage_totals(self, *, day: str, device_id: str | None = None) -> UsageTotals:
        """The running total of ``day`` for one device, or for all (None). Zeros when none."""
        ...

    async def usage_by_day(self, *, since_day: str,
                           device_id: str | None = None) -> list[UsageRow]:
        """Per (day, device) totals for days >= ``since_day`` (one device, or all but the
        global row), ordered by day then device."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def check_enrollment(
    *,
    existing: DeviceRecord | None,
    used_at: float | None,
    used_by: str | None,
    expires_at: float,
    device_id: str,
    sign_pk: bytes,
    box_pk: bytes,
    now: float,
) -> EnrollOutcome | None:
    """The enrollment rule every backend applies inside its transaction.

    Returns REPEATED when this exact enrollment already happened (the device lost our answer),
    None when the token may be consumed now, and raises InvalidToken / DeviceExists otherwise.
    """
    same_keys = (
        existing is not None
        and existing.sign_pk == sign_pk
        and existing.box_pk == box_pk
        and not existing.revoked
    )
    if used_at is not None:
        if used_by == device_id and same_keys:
            return EnrollOutcome.REPEATED
        raise InvalidToken("the enrollment token was already used")
    if expires_at <= now:
        raise InvalidToken("the enrollment token has expired")
    if existing is not None and not same_keys:
        raise DeviceExists(
            f"device id {device_id!r} is already enrolled"
            + (" and revoked" if existing.revoked else " with other keys")
        )
    return None
