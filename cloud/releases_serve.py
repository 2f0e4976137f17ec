"""Releases in the ingest (docs/protocol.md, docs/model-updates.md): which release a device gets,
its files, the devices' reports, and the hint on the results long-poll.

Every request is signed by the device exactly as the results long-poll is (the ingest passes its
own ``authenticate``). The releases and device groups are cached per process and re-read only
when the store's ``releases_version`` changes, checked at most every
``cloud.registry_refresh_seconds``: a results poll pays no query for its hint, and a promotion,
halt or group change made elsewhere (the CLI, another ingest) applies within that interval.
Canary-stage releases are evaluated (``releases.evaluate_rollouts``) on the same beat, and at
once when a device reports.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from edgekeeper.cloud.releases import evaluate_rollouts, resolve
from edgekeeper.cloud.store.base import Store
from edgekeeper.cloud.store.releases import OUTCOMES, DeviceGroup, ReleaseRecord, ReleaseReport
from edgekeeper.log import get_logger
from edgekeeper.protocol.errors import InvalidJson, InvalidRequest, UnsupportedMediaType
from edgekeeper.protocol.keys import DevicePublicKeys
from edgekeeper.protocol.release import ReleaseRefused, parse_version, safe_path

log = get_logger(__name__)

HINT_HEADER = "Edgekeeper-Releases"
MAX_REPORT_BYTES = 4 * 1024
MODEL_NAME_MAX = 64

Authenticate = Callable[[web.Request, bytes], Awaitable[DevicePublicKeys]]


@dataclass
class Catalog:
    """This process's copy of the releases and device groups (module docstring)."""

    refresh_s: float
    canary_seconds: float
    clock: Callable[[], float]
    releases: tuple[ReleaseRecord, ...] = ()
    groups: Mapping[str, DeviceGroup] = field(default_factory=dict)
    version: int = -1
    next_check: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def current(self, store: Store) -> Catalog:
        if time.monotonic() < self.next_check:
            return self
        async with self.lock:
            if time.monotonic() >= self.next_check:
                await self._refresh(store)
        return self

    async def _refresh(self, store: Store) -> None:
        try:
            if any(r.stage == "canary" for r in self.releases):
                await evaluate_rollouts(store, now=self.clock(),
                                        canary_seconds=self.canary_seconds)
            version = await store.releases_version()  # before the reads: never miss a change
            if version != self.version:
                now = self.clock()
                self.releases = tuple(r for r in await store.releases() if r.expires_at > now)
                self.groups = {g.device_id: g for g in await store.device_groups()}
                self.version = version
        except Exception as err:  # keep serving what we have; look again on the next beat
            log.warning("releases.refresh_failed", error=str(err)[:300])
        finally:
            self.next_check = time.monotonic() + self.refresh_s

    def invalidate(self) -> None:
        self.next_check = 0.0

    def resolve(self, model: str, device_id: str) -> ReleaseRecord | None:
        return resolve(self.releases, model, device_id, self.groups, self.clock())

    def hint(self, device_id: str) -> str:
        """``person=1.2.0,sound=1.1.0``: the version of each model's release for the device."""
        models = sorted({r.model for r in self.releases})
        found = [(m, self.resolve(m, device_id)) for m in models]
        return ",".join(f"{m}={r.version}" for m, r in found if r is not None)


@dataclass(frozen=True)
class Hooks:
    """What the routes need from the ingest."""

    authenticate: Authenticate
    read_body: Callable[[web.Request, int], Awaitable[bytes]]  # capped, with the body timeouts
    store: Callable[[web.Request], Store]
    catalog: Catalog


HOOKS = web.AppKey("releases", Hooks)


def _model(request: web.Request) -> str:
    model = request.match_info["model"]
    if not (0 < len(model) <= MODEL_NAME_MAX
            and all(c.islower() or c.isdigit() or c in "-_" for c in model)):
        raise InvalidRequest(f"model name {model[:80]!r} is not lowercase letters, digits, - or _")
    return model


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or f'"{etag}"' in tags


async def get_release(request: web.Request) -> web.Response:
    hooks = request.app[HOOKS]
    device = await hooks.authenticate(request, b"")
    model = _model(request)
    catalog = await hooks.catalog.current(hooks.store(request))
    release = catalog.resolve(model, device.device_id)
    if release is None:
        return web.Response(status=204)
    headers = {"ETag": f'"{release.etag}"', "Cache-Control": "no-cache"}
    if _etag_matches(request.headers.get("If-None-Match"), release.etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=release.envelope, content_type="application/json",
                        headers=headers)


async def get_release_file(request: web.Request) -> web.Response:
    hooks = request.app[HOOKS]
    await hooks.authenticate(request, b"")
    model, version, path = _model(request), request.match_info["version"], \
        request.match_info["path"]
    try:
        parse_version(version)
        safe_path(path)
    except ReleaseRefused as err:
        raise InvalidRequest(err.message) from None
    data = await hooks.store(request).release_file(model, version, path)
    if data is None:
        raise web.HTTPNotFound(reason=f"no file {path!r} in release {model}@{version}")
    return web.Response(body=data, content_type="application/octet-stream",
                        headers={"Cache-Control": "no-cache"})


def _report(data: object, device_id: str, now: float) -> ReleaseReport:
    if not isinstance(data, dict):
        raise InvalidRequest("the report must be a JSON object")
    known = {"model", "version", "outcome", "reason", "at", "running"}
    if set(data) - known:
        raise InvalidRequest(f"unknown report keys {sorted(set(data) - known)}",
                             fix=f"known keys are {sorted(known)}")
    model, version, outcome = data.get("model"), data.get("version"), data.get("outcome")
    reason, at, running = data.get("reason", ""), data.get("at", now), data.get("running")
    try:
        if not isinstance(model, str) or not isinstance(version, str):
            raise InvalidRequest("'model' and 'version' must be strings")
        parse_version(version)
        if running is not None:
            if not isinstance(running, str):
                raise InvalidRequest("'running' must be a version string")
            parse_version(running)
    except ReleaseRefused as err:
        raise InvalidRequest(err.message) from None
    if outcome not in OUTCOMES:
        raise InvalidRequest(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    if not isinstance(reason, str) or len(reason) > 1000:
        raise InvalidRequest("'reason' must be a string of at most 1000 characters")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 <= at < 1e11:
        raise InvalidRequest("'at' must be a Unix time in seconds")
    if not (0 < len(model) <= MODEL_NAME_MAX):
        raise InvalidRequest("'model' must be a model name")
    return ReleaseReport(device_id, model, version, outcome, reason, float(at), now, running)


async def post_report(request: web.Request) -> web.Response:
    hooks = request.app[HOOKS]
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type {request.content_type or '(none)'!r} is not accepted here",
            fix="send Content-Type: application/json")
    raw = await hooks.read_body(request, MAX_REPORT_BYTES)
    device = await hooks.authenticate(request, raw)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InvalidJson(f"the body is not valid UTF-8 JSON: {err}") from None
    catalog = hooks.catalog
    report = _report(data, device.device_id, catalog.clock())
    store = hooks.store(request)
    await store.add_release_report(report)
    log.info("releases.reported", device_id=device.device_id,
             model=report.model, version=report.version, outcome=report.outcome,
             reason=report.reason[:200])
    if report.outcome in ("rolled_back", "trial_passed"):
        # A canary rolling back halts the release now, not on the next beat.
        changes = await evaluate_rollouts(store, now=catalog.clock(),
                                          canary_seconds=catalog.canary_seconds,
                                          model=report.model)
        if changes:
            catalog.invalidate()
    return web.json_response({"recorded": True})


async def hint_headers(request: web.Request, device_id: str) -> dict[str, str]:
    """The results long-poll's hint: what each model's release is for this device."""
    hooks = request.app.get(HOOKS)
    if hooks is None:
        return {}
    catalog = await hooks.catalog.current(hooks.store(request))
    hint = catalog.hint(device_id)
    return {HINT_HEADER: hint} if hint else {}


def add_routes(app: web.Application, hooks: Hooks) -> None:
    app[HOOKS] = hooks
    app.router.add_post("/v1/releases/report", post_report)
    app.router.add_get("/v1/releases/{model}", get_release)
    app.router.add_get("/v1/releases/{model}/{version}/{path:.+}", get_release_file)
