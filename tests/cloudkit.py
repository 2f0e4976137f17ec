"""Helpers for the cloud-half tests: real JPEG frames, real SQLite backends in tmp_path, a real
ingest server on 127.0.0.1 port 0, and a device enrolled over HTTP.

Backends are listed in QUEUE_BACKENDS / STORE_BACKENDS; the queue and store tests run every test
function once per backend, so the Redis/PostgreSQL backends (next issue) join by adding a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from aiohttp import web

from edgekeeper import compat
from edgekeeper.cli import main
from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.enroll import EnrollRequest, enroll, issue_token
from edgekeeper.cloud.ingest import IngestServer, create_app
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.cloud.queue.base import EventQueue
from edgekeeper.cloud.reasoners.echo import EchoReasoner
from edgekeeper.cloud.store.base import Store
from edgekeeper.cloud.worker import Worker
from edgekeeper.config import CloudSection
from edgekeeper.protocol.envelope import CONTENT_TYPE, seal_event, sign_request
from edgekeeper.protocol.keys import CloudPublicKeys, DeviceKeys, b64e
from edgekeeper.protocol.messages import EventBody

# redis / postgres run against real servers that tests/servers.py finds or starts.
QUEUE_BACKENDS = ["sqlite", "redis"]
STORE_BACKENDS = ["sqlite", "postgres"]


async def enroll_device(store: Store, device_id: str) -> DeviceKeys:
    """A fresh device enrolled straight into ``store`` through the real enrollment rule (a
    one-time token, then the request the device would send); returns its keys."""
    device = DeviceKeys.generate()
    token = await issue_token(store, ttl_s=60, now=time.time())
    await enroll(store, EnrollRequest.from_json(
        {"token": token, "device_id": device_id, "sign_pk": b64e(device.sign_pk),
         "box_pk": b64e(device.box_pk)}), now=time.time())
    return device


def jpeg(nbytes: int = 2000, seed: int = 0) -> bytes:
    """A real JPEG of roughly ``nbytes`` (noise compresses badly, so size tracks pixels)."""
    rng = np.random.default_rng(seed)
    side = max(8, int((nbytes / 1.2) ** 0.5))
    while True:
        img = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        if len(buf) >= nbytes * 0.9 or side > 4000:
            return buf.tobytes()
        side = int(side * 1.2) + 1


def make_event(device_id: str, seq: int, *, frame_bytes: int = 2000, label: str = "person",
               priority: int = 0, captured_at: float | None = None) -> EventBody:
    return EventBody(
        device_id=device_id,
        seq=seq,
        captured_at=time.time() if captured_at is None else captured_at,
        meta={"label": label, "scores": {label: 0.91}, "models": {"vision": "person@1.0.0"}},
        frames=(jpeg(frame_bytes, seed=seq),),
        audio_wav=None,
        features=np.arange(8, dtype="<f4").tobytes(),
        features_dtype="float32",
        features_shape=(2, 4),
        priority=priority,
    )


@dataclasses.dataclass
class Device:
    device_id: str
    keys: DeviceKeys
    cloud: CloudPublicKeys

    def seal(self, body: EventBody, *, sent_at: float | None = None,
             model_version: str = "person@1.0.0") -> bytes:
        return seal_event(body, device=self.keys, cloud_box_pk=self.cloud.box_pk,
                          sent_at=time.time() if sent_at is None else sent_at,
                          model_version=model_version)

    def signed(self, method: str, path: str, query: str = "", body: bytes = b"",
               timestamp: float | None = None) -> dict[str, str]:
        return sign_request(self.keys, device_id=self.device_id, method=method, path=path,
                            query=query, body=body,
                            timestamp=time.time() if timestamp is None else timestamp)


@dataclasses.dataclass
class Cloud:
    url: str
    data_dir: Path
    section: CloudSection
    store: Store
    queue: EventQueue
    keys: CloudKeys
    server: IngestServer
    session: aiohttp.ClientSession

    async def token(self, ttl_s: float = 600.0) -> str:
        return await issue_token(self.store, ttl_s=ttl_s, now=time.time())

    async def enroll(self, device_id: str, keys: DeviceKeys | None = None) -> Device:
        keys = keys or DeviceKeys.generate()
        async with self.session.post(
            f"{self.url}/v1/enroll",
            json={"token": await self.token(), "device_id": device_id,
                  "sign_pk": b64e(keys.sign_pk), "box_pk": b64e(keys.box_pk)},
        ) as resp:
            data = await resp.json()
            assert resp.status == 201, data
        return Device(device_id, keys, CloudPublicKeys.from_json(data["cloud"]))

    async def post_envelope(self, data: Any, *, content_type: str = CONTENT_TYPE,
                            headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        hdrs = {"Content-Type": content_type, **(headers or {})}
        async with self.session.post(f"{self.url}/v1/events", data=data, headers=hdrs) as resp:
            return resp.status, await resp.json(), resp.headers


@contextlib.asynccontextmanager
async def running_cloud(tmp_path: Path, **section: Any) -> AsyncIterator[Cloud]:
    """A real ingest on 127.0.0.1:0 over SQLite files in ``tmp_path``."""
    cfg = CloudSection(**{"registry_refresh_seconds": 0.05, "results_poll_seconds": 0.05,
                          **section})
    data_dir = tmp_path / "cloud"
    store = await open_store(cfg.store_backend, data_dir, section=cfg)
    queue = await open_queue(cfg.queue_backend, data_dir, max_attempts=cfg.queue_max_attempts,
                             section=cfg)
    keys = await asyncio.to_thread(CloudKeys.ensure, data_dir)
    server = IngestServer(create_app(cfg, data_dir, store=store, queue=queue, keys=keys))
    url = await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Cloud(url, data_dir, cfg, store, queue, keys, server, session)
    finally:
        await server.stop()
        await queue.close()
        await store.close()


@contextlib.asynccontextmanager
async def cloud_on(backend: str, *, tmp_path: Path, request: pytest.FixtureRequest,
                   monkeypatch: pytest.MonkeyPatch, **section: Any) -> AsyncIterator[Cloud]:
    """``running_cloud`` with its store on ``backend`` ("sqlite", or "postgres": a fresh
    database from tests/servers.py), and the environment an operator's shell would have on
    that machine (``operator_shell``), so `edgekeeper cloud ...` run by ``cli`` reads the same
    store. ``request`` and ``monkeypatch`` are the test's pytest fixtures."""
    section["store_backend"] = backend
    if backend == "postgres":
        section["postgres_dsn"] = request.getfixturevalue("postgres_dsn")
        monkeypatch.setenv("EDGEKEEPER_STORE_BACKEND", "postgres")
        monkeypatch.setenv("EDGEKEEPER_POSTGRES_DSN", section["postgres_dsn"])
    async with running_cloud(tmp_path, **section) as cloud:
        operator_shell(monkeypatch, cloud.data_dir)
        yield cloud


def operator_shell(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    """The environment of the cloud's operator: `edgekeeper cloud ...` finds ``data_dir``, and
    no config file of the machine running the tests gets in the way."""
    monkeypatch.setenv("EDGEKEEPER_CLOUD_DATA_DIR", str(data_dir))
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """One `edgekeeper` command in this process: (exit code, stdout, stderr). Blocking: call
    it through ``asyncio.to_thread`` from a test on the event loop."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


async def reason_queued(cloud: Cloud, keys: CloudKeys | None = None) -> int:
    """Every queued event through a real worker with the echo reasoner, one at a time (so
    results are produced in queue order); returns how many were done. ``keys``: the cloud's
    keys as loaded now (after an operator key was made), else those it started with."""
    worker = Worker(queue=cloud.queue, store=cloud.store, reasoner=EchoReasoner(),
                    keys=cloud.keys if keys is None else keys, concurrency=1)
    return (await worker.run(burst=True)).done


async def until(pred: Callable[[], Any], timeout: float = 20.0, every: float = 0.02) -> None:
    """Wait for a condition (a deadline only guards against hanging; nothing is timed)."""
    async with compat.timeout(timeout):
        while not await pred():  # noqa: ASYNC110 - the state lives in another component
            await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def captive_portal() -> AsyncIterator[tuple[str, list[str]]]:
    """A hotel Wi-Fi's login page on 127.0.0.1: every request gets 200 with HTML. Yields its
    base URL and the paths asked so far."""
    hits: list[str] = []

    async def portal(request: web.Request) -> web.Response:
        await request.read()
        hits.append(request.path)
        return web.Response(text="<html>Please log in to the hotel Wi-Fi</html>",
                            content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", portal)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", hits
    finally:
        await runner.cleanup()
