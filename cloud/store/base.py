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
from typing import Literal, Protocol, runtime_checkable

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
class ResultsSince:
    """What one results long-poll check finds (``Store.results_since``): the devices with a
    result newer than the version asked about, and the newest result id (the next version to
    ask about; the one asked about when nothing is newer)."""

    version: int
    device_ids: frozenset[str]


@dataclass(frozen=True)
class ResultSummary:
    """What the cloud operator may read of one result (``edgekeeper cloud results``), once
    opened with the operator key (cloud/keys.py); the result itself stays sealed for its
    device. ``received_at`` is when the ingest took the event (a device's "last seen")."""

    device_id: str
    seq: int
    label: str
    confidence: float
    summary: str
    action: str
    reasoner: str
    provisional: bool
    produced_at: float
    received_at: float


@dataclass(frozen=True)
class SealedSummary:
    """A ResultSummary as stored: ``sealed`` to the operator's public key (cloud/keys.py),
    beside only the columns needed to order and filter it. Stored with the result, in the same
    transaction, in a table of its own that the results' retention does not prune."""

    device_id: str
    seq: int
    produced_at: float
    received_at: float
    sealed: bytes


@dataclass(frozen=True)
class DeviceActivity:
    """One device as ``edgekeeper cloud devices`` shows it: its record, how many of its events
    were concluded, when the latest of them reached the ingest, and its latest result."""

    device: DeviceRecord
    events: int
    last_seen: float | None
    last_result: SealedSummary | None
    # The device's latest heartbeat (POST /v1/heartbeat): when the ingest took it, and its
    # JSON body (metadata only: models, backlog, last error, camera and microphone state).
    heartbeat_at: float | None = None
    heartbeat: str | None = None


ProviderStateName = Literal["ok", "refused"]


@dataclass(frozen=True)
class ProviderState:
    """The reasoning provider as the workers last found it: ``refused`` (the key or the model
    is refused; the worker stopped) or ``ok``. One row, the last writer's: every worker of a
    cloud uses the same key. The ingest's /healthz and ``cloud status`` read it."""

    state: ProviderStateName
    reason: str
    fix: str
    worker: str
    updated_at: float


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
    async def put_result(self, *, device_id: str, seq: int, envelope: bytes, now: float,
                         summary: SealedSummary | None = None) -> int:
        """Store a sealed result; idempotent on (device_id, seq) (a re-run worker keeps the
        first). Returns its id. Durable on return. ``summary``, the operator's sealed view,
        goes in with the result in the same transaction (kept only with the first result)."""
        ...

    async def results_after(self, device_id: str, cursor: int, limit: int) -> list[StoredResult]:
        """This device's unacked results with id > cursor, oldest first."""
        ...

    async def ack_results(self, device_id: str, ids: Sequence[int], *, now: float) -> int:
        """Mark acked; returns how many of ``ids`` were this device's and not yet acked."""
        ...

    async def results_version(self) -> int:
        """The largest result id: a long-poll's starting version (``results_since``)."""
        ...

    async def results_since(self, version: int) -> ResultsSince:
        """The devices with a result whose id is above ``version``, and the newest id, in one
        index-backed query (a range of the id key: the results stored since the last check).
        Ids become visible in increasing order in both stores, so a result not counted here
        has an id above the returned version and is found by the next call."""
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

    # the operator's view (edgekeeper cloud results / devices, /healthz) ------------------
    async def result_summaries(self, *, device_id: str | None = None, since: float = 0.0,
                               limit: int = 100) -> list[SealedSummary]:
        """The latest ``limit`` summaries produced at or after ``since`` (one device, or all),
        oldest first."""
        ...

    async def device_activity(self) -> list[DeviceActivity]:
        """Every enrolled device with its activity, ordered by device id."""
        ...

    async def put_heartbeat(self, device_id: str, *, received_at: float, body: str) -> None:
        """Keep ``body`` (JSON) as the device's latest heartbeat, replacing the previous one."""
        ...

    async def put_provider_state(self, state: ProviderState) -> None:
        """Record the provider's state (replacing the previous one)."""
        ...

    async def provider_state(self) -> ProviderState | None:
        """The provider's last recorded state; None when no worker has recorded one."""
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
