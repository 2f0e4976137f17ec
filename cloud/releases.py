"""Model releases, the cloud's side (docs/model-updates.md): build a release folder from a model
folder, sign it (anywhere the release key is), publish it into the store, and decide which
release each device gets during a staged rollout.

The format is protocol/release.py (a DSSE-signed ``release.json`` over the body bytes). The steps
are separate so the signing key can stay offline:

* ``build_release``: copy the files one gate manifest needs (its stages' models and its labels;
  the shared audio front ends that live outside the folder go under ``frontends/`` and the copied
  manifest is rewritten to point there), describe them, and write the unsigned body bytes as
  ``release.unsigned.json``. Versions only go up: the default is the next minor version after the
  highest published for the model.
* ``sign_release``: ``release.unsigned.json`` + the key file -> ``release.json``; needs nothing
  but the folder and the key (``edgekeeper cloud release sign DIR --key PATH`` on any machine).
* ``publish_release``: verify the signature against this cloud's release public key and every
  file against the body, refuse a version not above the highest published (a rollback release
  excepted), then keep a copy under ``<data_dir>/releases/`` and store the release, its files'
  bytes included, in the store (cloud/store/releases.py says why the bytes go there).

Rollout: a release starts in the ``canary`` stage (only the canary devices of its scope get it),
is ``promoted`` (everyone in its scope) by hand or once every canary passed its trial and
``cloud.rollout_canary_seconds`` went by with no rollback or refusal (``evaluate_rollouts``, run
lazily by the ingest and by ``edgekeeper cloud releases``), and is ``halted`` (nobody new) by
hand or when a canary rolls it back. ``resolve`` picks the release a device gets: a device scope
beats its group's, which beats the fleet's; within one, the highest version, the latest
published first among equals (a rollback re-publishes an older version).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

import edgekeeper
from edgekeeper.cloud.store.base import Store
from edgekeeper.cloud.store.releases import (
    DeviceGroup,
    ReleaseRecord,
    ReleaseStore,
    Stage,
)
from edgekeeper.device.manifest import load_manifest
from edgekeeper.errors import InputError
from edgekeeper.fs import private_dir, write_private
from edgekeeper.log import get_logger
from edgekeeper.protocol.keys import read_secret
from edgekeeper.protocol.release import (
    MAX_RELEASE_BYTES,
    RELEASE_FILE,
    InputSpec,
    ReleaseBody,
    ReleaseRefused,
    Scope,
    body_from_json,
    check_file,
    describe_files,
    next_version,
    parse_version,
    sign_payload,
    verify,
    verify_files,
)

log = get_logger(__name__)

UNSIGNED_FILE = "release.unsigned.json"
RETRAIN_FILE = "retrain.json"
METRICS_FILE = "metrics.json"
FRONTENDS = "frontends"
# Outcomes that keep a canary-stage release from being promoted (the operator looks first).
HOLDING_OUTCOMES = ("refused", "shadow_failed", "rolled_back")


class ReleaseError(InputError):
    """A release that cannot be built, signed or published as asked."""


def highest(versions: Iterable[str]) -> str | None:
    found = sorted(versions, key=parse_version)
    return found[-1] if found else None


def runtime_version() -> str:
    """This edgekeeper's MAJOR.MINOR.PATCH (a development build's base version)."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", edgekeeper.__version__)
    return ".".join(m.groups()) if m else "0.1.0"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReleaseError(f"{what} {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseError(f"{what} {path} is not valid JSON: {err}",
                           fix="restore the file as the trainer wrote it") from None
    if not isinstance(data, dict):
        raise ReleaseError(f"{what} {path}: the top level must be a JSON object")
    return data


def _refused(err: ReleaseRefused, where: str) -> ReleaseError:
    return ReleaseError(f"{where}: {err.message} ({err.reason})", fix=err.fix)


# ------------------------------------------------------------------------------------- build


def build_release(
    source: Path,
    out: Path,
    *,
    variant: str = "int8",
    version: str | None = None,
    scope: str | None = None,
    published: Sequence[str] = (),
    expiry_days: float = 30.0,
    notes: str = "",
    now: float | None = None,
) -> ReleaseBody:
    """Build the unsigned release folder ``out`` from the model folder ``source``.

    ``published`` are the versions already published for the model (rollbacks excluded): the
    version must be above all of them. Blocking (file I/O): call it from a thread in async code.
    """
    now = time.time() if now is None else now
    source, out = Path(source), Path(out)
    manifest_path = source / f"manifest-{variant}.json"
    if variant not in ("int8", "float"):
        raise ReleaseError(f"variant {variant!r} is not int8 or float")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out} already exists and is not an empty folder",
                           fix="name a new folder for the release")
    manifest = load_manifest(manifest_path)  # ModelError (an InputError) names what is wrong
    raw = _read_json(manifest_path, "model manifest")
    retrain = _read_json(source / RETRAIN_FILE, "retrain report") if (
        source / RETRAIN_FILE).exists() else None
    try:
        top = highest(published)
        parent = None
        # `cloud retrain` writes parent_version; a hand-made retrain.json may say parent.
        named = None if retrain is None else retrain.get("parent", retrain.get("parent_version"))
        if named is not None:
            parent = str(named)
            parse_version(parent)
        floor = [v for v in (top, parent) if v is not None]
        if retrain is None:
            floor.append(manifest.version)  # releasing a shipped folder: go past its version
            parse_version(manifest.version)
        if version is None:
            version = next_version(highest(floor) or "1.0.0")
        parse_version(version)
        for v in floor:
            if parse_version(version) <= parse_version(v):
                raise ReleaseError(f"version {version} is not above {v} (highest published "
                                   f"{top or 'none'}, parent {parent or 'none'})",
                                   fix="versions only go up: omit --version or give a higher one")
        if parent is None:
            parent = top or (manifest.version if retrain is None else None)
        scope_obj = Scope.parse(scope or str((retrain or {}).get("scope") or "fleet"))
    except ReleaseRefused as err:
        raise _refused(err, str(source)) from None
    except ValueError as err:
        if isinstance(err, ReleaseError):
            raise
        raise ReleaseError(f"{source}: {err}", fix="scope is fleet, group:NAME or device:ID"
                           ) from None

    root = source.resolve()
    copies: dict[str, Path] = {}

    def place(ref: str) -> str:
        src = (source / ref).resolve()
        try:
            rel = src.relative_to(root).as_posix()
        except ValueError:  # outside the folder: the shared audio front ends
            rel = f"{FRONTENDS}/{src.name}"
        if copies.get(rel, src) != src:
            raise ReleaseError(f"{manifest_path}: two files would both be {rel} in the release")
        copies[rel] = src
        return rel

    raw["labels"] = place(str(raw["labels"]))
    for stage in raw["stages"]:
        stage["model"] = place(str(stage["model"]))
    raw["version"] = version  # the gate names its model by this in every event
    entry = manifest_path.name
    manifest_bytes = (json.dumps(raw, indent=2) + "\n").encode("utf-8")

    metrics: dict[str, Any] = {}
    if (source / METRICS_FILE).exists():
        metrics = _read_json(source / METRICS_FILE, "metrics")
    if retrain is not None and isinstance(retrain.get("metrics"), dict):
        metrics = {**metrics, "retrain": retrain["metrics"]}
    if manifest.vision is not None:
        spec = InputSpec("vision", width=manifest.vision.width, height=manifest.vision.height,
                         color=manifest.vision.color)
    else:
        assert manifest.audio is not None  # load_manifest: one or the other
        spec = InputSpec("audio", sample_rate=manifest.audio.sample_rate,
                         window_seconds=manifest.audio.window_seconds,
                         hop_seconds=manifest.audio.hop_seconds)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash of this pid's predecessor
    try:
        private_dir(tmp)
        for rel, src in copies.items():
            private_dir((tmp / rel).parent)
            write_private(tmp / rel, src.read_bytes())
        write_private(tmp / entry, manifest_bytes)
        body = ReleaseBody(
            model=manifest.name, version=version, parent=parent, scope=scope_obj, entry=entry,
            files=describe_files(tmp, [*copies, entry]), labels=manifest.labels, input=spec,
            created_at=now, expires_at=now + expiry_days * 86400.0,
            min_runtime=runtime_version(), metrics=metrics, notes=notes,
        )
        payload = body.encode()
        body_from_json(json.loads(payload))  # what a device would refuse, refused here first
        if len(payload) * 4 // 3 + 1024 > MAX_RELEASE_BYTES:
            raise ReleaseError(f"the release body is {len(payload)} bytes; signed it would be "
                               f"over {MAX_RELEASE_BYTES}", fix=f"shorten {METRICS_FILE}")
        write_private(tmp / UNSIGNED_FILE, payload)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except ReleaseRefused as err:
        raise _refused(err, str(source)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("releases.built", model=body.model, version=body.version, scope=str(body.scope),
             path=str(out))
    return body


# -------------------------------------------------------------------------------------- sign


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_private(tmp, data)
    os.replace(tmp, path)


def sign_release(directory: Path, key_path: Path) -> ReleaseBody:
    """``directory/release.unsigned.json`` + the Ed25519 key file -> ``directory/release.json``.

    Refuses a body that would not parse and files that do not match it. Blocking."""
    directory = Path(directory)
    try:
        payload = (directory / UNSIGNED_FILE).read_bytes()
    except FileNotFoundError:
        raise ReleaseError(f"{directory / UNSIGNED_FILE} does not exist",
                           fix="build the release first: edgekeeper cloud release build") from None
    key = SigningKey(read_secret(Path(key_path)))
    try:
        body = body_from_json(json.loads(payload.decode("utf-8")))
        verify_files(body, directory)
        data = sign_payload(payload, key)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseError(f"{directory / UNSIGNED_FILE} is not valid JSON: {err}",
                           fix="build the release again") from None
    except ReleaseRefused as err:
        raise _refused(err, str(directory)) from None
    _write_atomic(directory / RELEASE_FILE, data)
    log.info("releases.signed", model=body.model, version=body.version, path=str(directory))
    return body


# ----------------------------------------------------------------------------------- publish


def etag_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _load_signed(directory: Path, release_pk: bytes
                 ) -> tuple[bytes, ReleaseBody, dict[str, bytes]]:
    try:
        data = (directory / RELEASE_FILE).read_bytes()
    except FileNotFoundError:
        raise ReleaseError(f"{directory / RELEASE_FILE} does not exist",
                           fix="sign the release first: edgekeeper cloud release sign") from None
    try:
        body = verify(data, release_pk)
        files = {}
        for entry in body.files:
            try:
                blob = (directory / entry.path).read_bytes()
            except FileNotFoundError:
                raise ReleaseRefused("file_mismatch", f"{entry.path} is missing") from None
            check_file(entry, blob)  # the very bytes that are stored
            files[entry.path] = blob
    except ReleaseRefused as err:
        raise _refused(err, str(directory)) from None
    return data, body, files


def release_dir_name(body: ReleaseBody, now: float) -> str:
    return f"{body.version}-rollback-{int(now)}" if body.rollback else body.version


def _archive(data_dir: Path, body: ReleaseBody, data: bytes, files: Mapping[str, bytes],
             now: float) -> Path:
    """The operator's copy, written whole into a temp folder and renamed into place."""
    parent = private_dir(Path(data_dir) / "releases" / body.model)
    final = parent / release_dir_name(body, now)
    tmp = parent / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    private_dir(tmp)
    for path, blob in files.items():
        private_dir((tmp / path).parent)
        write_private(tmp / path, blob)
    write_private(tmp / RELEASE_FILE, data)
    if final.exists():  # a publish that failed after its copy: the store has no row for it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


async def publish_release(
    store: ReleaseStore, data_dir: Path, directory: Path, release_pk: bytes, *,
    stage: Stage = "canary", now: float | None = None,
) -> ReleaseRecord:
    """Verify the signed release in ``directory`` and publish it (module docstring)."""
    now = time.time() if now is None else now
    data, body, files = await asyncio.to_thread(_load_signed, Path(directory), release_pk)
    if body.expires_at <= now:
        raise ReleaseError(f"release {body.tag} expired at {body.expires_at:.0f}",
                           fix="build and sign it again")
    existing = await store.releases(body.model)
    if not body.rollback:
        top = highest(r.version for r in existing if not r.rollback)
        if top is not None and parse_version(body.version) <= parse_version(top):
            raise ReleaseError(f"release {body.tag} is not above the highest published "
                               f"{body.model}@{top}",
                               fix="build it again with a higher version (versions only go up)")
    await asyncio.to_thread(_archive, Path(data_dir), body, data, files, now)
    record = ReleaseRecord(
        id=0, model=body.model, version=body.version, scope=str(body.scope),
        rollback=body.rollback, stage="promoted" if body.rollback else stage,
        created_at=body.created_at, expires_at=body.expires_at, published_at=now,
        stage_at=now, envelope=data, etag=etag_of(data),
    )
    record = replace(record, id=await store.add_release(record, files))
    if body.rollback:
        # Going back: whatever this scope got after the version it returns to stops here.
        for r in existing:
            if (r.scope == record.scope and r.stage != "halted"
                    and parse_version(r.version) > parse_version(body.version)):
                await store.set_release_stage(r.id, "halted", now=now)
                log.warning("releases.halted", model=r.model, version=r.version,
                            reason=f"rollback to {body.version}")
    log.info("releases.published", model=body.model, version=body.version, scope=record.scope,
             stage=record.stage, rollback=body.rollback, files=len(files))
    return record


# ---------------------------------------------------------------------------------- rollback


def rollback_body(target: ReleaseBody, scope: Scope, *, now: float, expiry_days: float,
                  bad_version: str) -> ReleaseBody:
    """A new release that re-publishes ``target``'s files for ``scope``, marked rollback and
    created now (a device accepts a rollback only if it is newer than what it runs)."""
    return replace(target, scope=scope, rollback=True, created_at=now,
                   expires_at=now + expiry_days * 86400.0,
                   notes=f"rollback from {bad_version} to {target.version}")


def rollback_plan(releases: Sequence[ReleaseRecord], model: str, scope: str
                  ) -> tuple[ReleaseRecord, ReleaseRecord]:
    """(the release to leave, the good one to return to) in ``scope``: the highest non-halted
    release, and the highest promoted one below it (of this scope, else of the fleet)."""
    mine = [r for r in releases if r.model == model and r.scope == scope]
    live = [r for r in mine if r.stage != "halted"]
    if not live:
        raise ReleaseError(f"no {model} release is being served to {scope}",
                           fix="see edgekeeper cloud releases")
    bad = max(live, key=lambda r: (parse_version(r.version), r.id))
    for pool in (mine, [r for r in releases if r.model == model and r.scope == "fleet"]):
        good = [r for r in pool if r.stage == "promoted"
                and parse_version(r.version) < parse_version(bad.version)]
        if good:
            return bad, max(good, key=lambda r: (parse_version(r.version), r.id))
    raise ReleaseError(f"no promoted {model} release below {bad.version} to roll back to",
                       fix=f"halt it instead: edgekeeper cloud releases halt {model} "
                           f"{bad.version}")


async def build_rollback(store: ReleaseStore, out: Path, model: str, scope: str, *,
                         release_pk: bytes, expiry_days: float, now: float | None = None
                         ) -> ReleaseBody:
    """Write an unsigned rollback release folder ``out`` (sign it, then publish it)."""
    now = time.time() if now is None else now
    bad, good = rollback_plan(await store.releases(model), model, scope)
    target = verify(good.envelope, release_pk)
    files = {}
    for entry in target.files:
        blob = await store.release_file(model, target.version, entry.path)
        if blob is None:
            raise ReleaseError(f"the store has no {entry.path} of {target.tag}")
        check_file(entry, blob)
        files[entry.path] = blob
    body = rollback_body(target, Scope.parse(scope), now=now, expiry_days=expiry_days,
                         bad_version=bad.version)

    def write() -> None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ReleaseError(f"{out} already exists and is not an empty folder")
        for path, blob in files.items():
            private_dir((out / path).parent)
            write_private(out / path, blob)
        write_private(out / UNSIGNED_FILE, body.encode())

    await asyncio.to_thread(write)
    return body


# ----------------------------------------------------------------------------------- rollout


def scope_rank(scope: str, device_id: str, group: str) -> int | None:
    """How specific ``scope`` is for this device (2 device, 1 group, 0 fleet); None if it does
    not cover the device."""
    if scope == "fleet":
        return 0
    if group and scope == f"group:{group}":
        return 1
    if scope == f"device:{device_id}":
        return 2
    return None


def is_canary(release: ReleaseRecord, device_id: str, groups: Mapping[str, DeviceGroup]) -> bool:
    """A canary of the release's scope. A device-scoped release's one device is its own canary:
    a model trained for one camera is trialled on that camera."""
    if release.scope == f"device:{device_id}":
        return True
    g = groups.get(device_id)
    return (g is not None and g.canary
            and scope_rank(release.scope, device_id, g.group) is not None)


def canary_devices(release: ReleaseRecord, groups: Mapping[str, DeviceGroup]) -> set[str]:
    if release.scope.startswith("device:"):
        return {release.scope.partition(":")[2]}
    return {d for d in groups if is_canary(release, d, groups)}


def applies(release: ReleaseRecord, device_id: str, groups: Mapping[str, DeviceGroup],
            now: float) -> bool:
    g = groups.get(device_id)
    if scope_rank(release.scope, device_id, g.group if g else "") is None:
        return False
    if release.expires_at <= now or release.stage == "halted":
        return False
    return release.stage == "promoted" or is_canary(release, device_id, groups)


def resolve(releases: Iterable[ReleaseRecord], model: str, device_id: str,
            groups: Mapping[str, DeviceGroup], now: float) -> ReleaseRecord | None:
    """The release ``device_id`` gets for ``model`` (module docstring), or None."""
    g = groups.get(device_id)
    group = g.group if g else ""
    best: tuple[int, tuple[int, int, int], int] | None = None
    found = None
    for r in releases:
        if r.model != model or not applies(r, device_id, groups, now):
            continue
        key = (scope_rank(r.scope, device_id, group) or 0, parse_version(r.version), r.id)
        if best is None or key > best:
            best, found = key, r
    return found


@dataclass(frozen=True)
class StageChange:
    release: ReleaseRecord
    stage: Stage
    reason: str


async def evaluate_rollouts(store: Store, *, now: float, canary_seconds: float,
                            model: str | None = None) -> list[StageChange]:
    """Promote or halt canary-stage releases by their canaries' reports; return the changes.

    Halted at once when a canary reported ``rolled_back``. Promoted once every canary (revoked
    devices aside) reported ``trial_passed``, ``canary_seconds`` passed since publication, and
    no device reported ``refused``, ``shadow_failed`` or ``rolled_back``. Cheap when no release
    is in the canary stage (one query). Safe to run from several processes: a stage change is
    idempotent.
    """
    pending = [r for r in await store.releases(model) if r.stage == "canary"]
    if not pending:
        return []
    groups = {g.device_id: g for g in await store.device_groups()}
    changes = []
    for r in pending:
        reports = await store.release_reports(r.model, r.version, since=r.published_at)
        canaries = set()
        for d in canary_devices(r, groups):
            record = await store.get_device(d)
            if record is not None and not record.revoked:
                canaries.add(d)
        rolled = sorted({x.device_id for x in reports
                         if x.outcome == "rolled_back" and x.device_id in canaries})
        passed = {x.device_id for x in reports if x.outcome == "trial_passed"}
        held = [x for x in reports if x.outcome in HOLDING_OUTCOMES]
        if rolled:
            change = StageChange(r, "halted", f"canary {', '.join(rolled)} rolled it back")
        elif held or canaries - passed or now - r.published_at < canary_seconds:
            continue
        else:
            change = StageChange(r, "promoted", f"{len(canaries)} canaries passed their trial")
        if await store.set_release_stage(r.id, change.stage, now=now):
            log.info("releases.stage_changed", model=r.model, version=r.version,
                     stage=change.stage, reason=change.reason)
            changes.append(change)
    return changes
