"""What the store keeps for model releases (cloud/releases.py, docs/model-updates.md): the
published releases with their rollout stage and file bytes, device groups and canaries, and the
devices' reports of what they did with a release.

The file bytes live in the store (a BLOB / BYTEA per file, each under 2 MB), not only on the
publishing machine's disk: with the PostgreSQL store every ingest process, on any machine, serves
the same files without a shared filesystem, and a release is published in one transaction, so it
is served whole or not at all. ``<data_dir>/releases/`` keeps the operator's copy.

Implementations: cloud/store/sqlite_releases.py and cloud/store/postgres_releases.py, mixed into
the two stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from edgekeeper.errors import InputError

Stage = Literal["canary", "promoted", "halted"]
Outcome = Literal["downloaded", "refused", "shadow_failed", "active", "trial_passed",
                  "rolled_back"]
STAGES: tuple[str, ...] = get_args(Stage)
OUTCOMES: tuple[str, ...] = get_args(Outcome)
# Outcomes after which the reported version is the one the device runs.
RUNNING_OUTCOMES = ("active", "trial_passed")


class ReleaseConflict(InputError):
    """A release of this model and version is already published."""


@dataclass(frozen=True)
class ReleaseRecord:
    id: int  # the store's row id (0 before it is stored)
    model: str
    version: str
    scope: str  # str(protocol.release.Scope): fleet, group:NAME, device:ID
    rollback: bool
    stage: Stage
    created_at: float  # from the signed body
    expires_at: float
    published_at: float  # cloud clock
    stage_at: float  # when the stage last changed
    envelope: bytes  # release.json as signed
    etag: str  # sha256 hex of envelope


@dataclass(frozen=True)
class DeviceGroup:
    device_id: str
    group: str  # "" when the device is in no group (fleet only)
    canary: bool


@dataclass(frozen=True)
class ReleaseReport:
    device_id: str
    model: str
    version: str
    outcome: Outcome
    reason: str
    at: float  # the device's clock
    received_at: float  # the cloud's clock
    running: str | None = None  # the version the device runs after this, when it says


@dataclass(frozen=True)
class DeviceRelease:
    """The latest a device said about a model: what it runs and its last report."""

    device_id: str
    model: str
    running: str | None
    version: str
    outcome: Outcome
    reason: str
    at: float
    received_at: float


def running_after(report: ReleaseReport, before: str | None) -> str | None:
    """What a device runs after ``report``, given what it ran before (both backends use this)."""
    if report.running is not None:
        return report.running
    if report.outcome in RUNNING_OUTCOMES:
        return report.version
    return before


class ReleaseStore(Protocol):
    """Releases, groups and reports. Coroutines only; none blocks the event loop."""

    async def add_release(self, record: ReleaseRecord, files: Mapping[str, bytes]) -> int:
        """Store a release and its files in one transaction; return its id. A second
        non-rollback release of the same (model, version) raises ReleaseConflict."""
        ...

    async def releases_version(self) -> int:
        """Changes whenever a release is added or changes stage, or a device's group changes:
        the ingest re-reads releases and groups only then."""
        ...

    async def releases(self, model: str | None = None) -> list[ReleaseRecord]:
        """Every release (of ``model``), oldest published first."""
        ...

    async def release_file(self, model: str, version: str, path: str) -> bytes | None:
        """One file of a published release (a rollback re-publishes the same bytes)."""
        ...

    async def set_release_stage(self, release_id: int, stage: Stage, *, now: float) -> bool:
        """Change the stage; False if unknown or already in it."""
        ...

    async def set_device_group(self, device_id: str, group: str, *, canary: bool) -> None:
        """Put a device in ``group`` ("" for none) with its canary flag."""
        ...

    async def device_group(self, device_id: str) -> str:
        """The device's group, "" when none."""
        ...

    async def device_groups(self) -> list[DeviceGroup]: ...

    async def add_release_report(self, report: ReleaseReport) -> None:
        """Record a report and, in the same transaction, the device's latest state."""
        ...

    async def release_reports(self, model: str, version: str, *,
                              since: float) -> list[ReleaseReport]:
        """Reports about (model, version) received at or after ``since``, oldest first."""
        ...

    async def device_releases(self, model: str | None = None) -> list[DeviceRelease]:
        """Each device's latest state per model, by device then model."""
        ...
