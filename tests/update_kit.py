"""Test kit for model updates: signed releases built from the shipped models, and a release
server on 127.0.0.1 speaking the ingest's release endpoints (GET /v1/releases/{model}, GET
/v1/releases/{model}/{version}/{path}, POST /v1/releases/report), with knobs for misbehaving.

Used by tests/test_update.py, tests/test_update_kill.py (and its child) and bench/bench_swap.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from nacl.signing import SigningKey

from edgekeeper.config import MODELS_DIR
from edgekeeper.protocol.envelope import verify_request
from edgekeeper.protocol.errors import ProtocolError
from edgekeeper.protocol.keys import DevicePublicKeys
from edgekeeper.protocol.release import (
    RELEASE_FILE,
    InputSpec,
    ReleaseBody,
    ReleaseRefused,
    Scope,
    describe_files,
    parse_version,
    sign,
)

DAY = 86400.0
OUTCOMES = {"downloaded", "refused", "shadow_failed", "active", "trial_passed", "rolled_back"}


def build_release(out: Path, family: str, version: str, key: SigningKey, *,
                  created_at: float | None = None, expires_at: float | None = None,
                  rollback: bool = False, variant: str = "int8",
                  vision: dict[str, Any] | None = None, model_file: Path | None = None,
                  sample_rate: int | None = None,
                  edit_body: Callable[[ReleaseBody], ReleaseBody] | None = None,
                  edit_manifest: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A release folder (files + signed release.json) of a shipped model, as ``version``.

    ``vision`` overrides keys of the manifest's vision block (mean/std/width ...); ``model_file``
    replaces the model's .tflite (an audio model given as vision); ``edit_body`` changes the
    body before signing."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    src = MODELS_DIR / family
    manifest = json.loads((src / f"manifest-{variant}.json").read_text())
    manifest["version"] = version
    if vision:
        manifest["vision"].update(vision)
    if sample_rate:
        manifest["audio"]["sample_rate"] = sample_rate
    files = ["labels.txt", f"manifest-{variant}.json"]
    for stage in manifest["stages"]:
        path = (src / stage["model"]).resolve()
        name = stage["model"].replace("../", "")  # ../frontends/x -> frontends/x
        if model_file is not None and name.startswith(family):
            path = model_file
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
        stage["model"] = name
        files.append(name)
    shutil.copy(src / "labels.txt", out / "labels.txt")
    if edit_manifest is not None:
        edit_manifest(manifest)
    (out / f"manifest-{variant}.json").write_text(json.dumps(manifest, indent=1))
    labels = tuple((src / "labels.txt").read_text().split())
    if manifest["modality"] == "vision":
        v = manifest["vision"]
        spec = InputSpec("vision", width=v["width"], height=v["height"], color=v["color"])
    else:
        a = manifest["audio"]
        spec = InputSpec("audio", sample_rate=a["sample_rate"],
                         window_seconds=a["window_seconds"], hop_seconds=a["hop_seconds"])
    now = time.time()
    body = ReleaseBody(
        model=family, version=version, parent=None, scope=Scope(), entry=f"manifest-{variant}.json",
        files=describe_files(out, files), labels=labels, input=spec,
        created_at=now if created_at is None else created_at,
        expires_at=now + DAY if expires_at is None else expires_at, rollback=rollback)
    if edit_body is not None:
        body = edit_body(body)
    (out / RELEASE_FILE).write_bytes(sign(body, key))
    return out


@dataclass
class Served:
    release: bytes  # release.json as served
    files: Path  # where the files are served from
    # Misbehaviour per file path: "extra" (more bytes than the file, no Content-Length),
    # "extra_length" (more bytes, Content-Length says so), "slow" (one byte a second),
    # "stall" (headers, then nothing), "flip" (one bit flipped).
    mode: dict[str, str] = field(default_factory=dict)


class ReleaseServer:
    """The ingest's release endpoints, on 127.0.0.1 (a real aiohttp server)."""

    def __init__(self, *devices: DevicePublicKeys) -> None:
        self.devices = {d.device_id: d for d in devices}
        self.served: dict[str, Served] = {}
        self.folders: dict[tuple[str, str], Path] = {}  # files of every version published
        self.reports: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.chunk_delay = 0.0  # seconds between 16 KiB chunks (the kill test)
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self.url = ""

    def publish(self, family: str, folder: Path, **mode: str) -> bytes:
        raw = (Path(folder) / RELEASE_FILE).read_bytes()
        self.served[family] = Served(raw, Path(folder), dict(mode))
        payload = json.loads(base64.b64decode(json.loads(raw)["payload"]))
        self.folders[(family, payload["version"])] = Path(folder)
        return raw

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/releases/{model}", self._release)
        app.router.add_get("/v1/releases/{model}/{version}/{path:.+}", self._file)
        app.router.add_post("/v1/releases/report", self._report)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _signed(self, request: web.Request) -> None:
        """The ingest's check of a device-signed request (protocol/envelope.verify_request)."""
        body = await request.read()
        try:
            verify_request(request.headers, method=request.method, path=request.raw_path.split(
                "?")[0], query=request.query_string, body=body, lookup=self.devices.get,
                now=time.time(), window_s=300.0)
        except ProtocolError as err:
            raise web.HTTPUnauthorized(text=str(err)) from None

    async def _release(self, request: web.Request) -> web.StreamResponse:
        await self._signed(request)
        self.requests.append(request.path)
        served = self.served.get(request.match_info["model"])
        if served is None:
            return web.Response(status=204)
        etag = '"' + hashlib.sha256(served.release).hexdigest()[:32] + '"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=served.release, headers={"ETag": etag},
                            content_type="application/json")

    async def _file(self, request: web.Request) -> web.StreamResponse:
        await self._signed(request)
        self.requests.append(request.path)
        served = self.served.get(request.match_info["model"])
        if served is None:
            raise web.HTTPNotFound()
        path = request.match_info["path"]
        folder = self.folders.get((request.match_info["model"], request.match_info["version"]),
                                  served.files)
        data = await asyncio.to_thread((folder / path).read_bytes)
        mode = served.mode.get(path, served.mode.get("*", ""))
        if mode == "flip":
            data = bytes([data[0] ^ 0x01]) + data[1:]
        if mode == "extra_length":
            return web.Response(body=data + b"more")
        resp = web.StreamResponse()
        if mode not in ("extra", "slow", "stall"):
            resp.content_length = len(data)
        await resp.prepare(request)
        if mode == "stall":
            await self._closing.wait()  # until the server stops (its cleanup would wait)
            return resp
        if mode == "slow":
            for i in range(len(data)):
                await resp.write(data[i : i + 1])
                await asyncio.sleep(1.0)
        step = 16 * 1024
        try:
            for i in range(0, len(data), step):
                await resp.write(data[i : i + step])
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            if mode == "extra":
                await resp.write(b"and more bytes than the release declares")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the device went away mid-file (the kill test kills it there)
        return resp

    async def _report(self, request: web.Request) -> web.Response:
        """Checked as the ingest documents it (docs/protocol.md, "Model releases")."""
        await self._signed(request)
        doc = await request.json()
        try:
            assert set(doc) <= {"model", "version", "outcome", "reason", "at", "running"}
            assert doc["outcome"] in OUTCOMES and len(doc["reason"]) <= 1000
            parse_version(doc["version"])
        except (AssertionError, KeyError, ReleaseRefused):
            raise web.HTTPBadRequest(text=f"invalid_request: {doc}") from None
        self.reports.append(doc)
        return web.json_response({"recorded": True})


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest): a slot's whole content."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
