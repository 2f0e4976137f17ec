"""Helpers for tests that run `edgekeeper` as an operator does: a real process started from the
CLI (`edgekeeper run` on a device, `cloud worker` or `cloud serve`), its JSON log read from
stderr as it comes, and, for a device, a network camera on 127.0.0.1 (an MJPEG server playing a
real recording) that the test can make stall.

Used by test_notify (systemd supervision), test_runtime (signals and drains), test_operator and
test_device_status (heartbeats and status of a running device)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
from aiohttp import web

from edgekeeper import compat

from cloudkit import until

# The longest a rendezvous with the process may take (start-up loads models): a guard against
# hanging, not a timing.
WAIT = 60.0


# --- the process ----------------------------------------------------------------------------


@dataclass
class Proc:
    """An `edgekeeper` process whose stderr (one JSON object a line) is read as it comes."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def text(self) -> str:
        """The last lines, for an assertion's message."""
        return "\n".join(self.lines[-40:])

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == name:
                    out.append(doc)
        return out

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def logged(self, name: str, n: int = 1) -> dict[str, object]:
        """Wait for the ``n``-th log line whose event is ``name`` (a rendezvous, not a
        timing); an exit before it fails the test with the process's last lines."""

        async def seen() -> bool:
            assert self.proc.returncode is None, f"exited waiting for {name}\n" + self.text()
            return len(self.events(name)) >= n

        try:
            await until(seen, WAIT)
        except TimeoutError:
            raise AssertionError(f"{name} not logged:\n{self.text()}") from None
        return self.events(name)[n - 1]

    async def exited(self, timeout: float = WAIT) -> int:
        async with compat.timeout(timeout):
            code = await self.proc.wait()
        assert self.reader is not None
        await self.reader
        return code


@contextlib.asynccontextmanager
async def edgekeeper(*args: str, env: dict[str, str] | None = None,
                     preexec_fn: Callable[[], None] | None = None) -> AsyncIterator[Proc]:
    """``python -m edgekeeper.cli ARGS`` with JSON logs; killed on the way out if it still
    runs (a failed test leaves no process behind)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgekeeper.cli", *args,
        env={**os.environ, "EDGEKEEPER_LOG_FORMAT": "json", **(env or {})},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, preexec_fn=preexec_fn)
    p = Proc(proc)

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            p.lines.append(raw.decode(errors="replace").rstrip("\n"))

    p.reader = asyncio.create_task(read())
    try:
        yield p
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await p.reader


def device(config: Path, *args: str, env: dict[str, str] | None = None,
           preexec_fn: Callable[[], None] | None = None
           ) -> contextlib.AbstractAsyncContextManager[Proc]:
    """`edgekeeper --config CONFIG ARGS run`: the device process."""
    return edgekeeper("--config", str(config), *args, "run", env=env, preexec_fn=preexec_fn)


def device_toml(tmp_path: Path, camera_url: str, extra: str = "") -> Path:
    """A device config: the network camera, local-only (``extra`` appended as it is)."""
    cfg = tmp_path / "device.toml"
    cfg.write_text(
        f'[device]\nid = "porch"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[camera]\nsource = "{camera_url}"\nfps = 10\nreconnect_seconds = 1\n'
        "[pregate]\nmax_skip_seconds = 0.5\n"
        '[uplink]\nmode = "local-only"\n' + extra)
    return cfg


# --- a network camera that can stall --------------------------------------------------------


@dataclass
class Camera:
    url: str
    flowing: asyncio.Event
    served: int = 0


@contextlib.asynccontextmanager
async def mjpeg_camera(recording: Path, fps: float = 10.0) -> AsyncIterator[Camera]:
    """The recording's first 40 frames as an MJPEG stream, in a loop; ``flowing.clear()``
    stalls it with the connection open, as a network camera does."""

    def encode() -> list[bytes]:
        cap = cv2.VideoCapture(str(recording / "video.avi"))
        out = []
        for _ in range(40):
            ok, img = cap.read()
            assert ok
            img = cv2.resize(img, (384, 288))
            out.append(cv2.imencode(".jpg", img)[1].tobytes())
        cap.release()
        return out

    jpegs = await asyncio.to_thread(encode)
    flowing = asyncio.Event()
    flowing.set()
    camera = Camera("", flowing)

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame"})
        await resp.prepare(request)
        i = 0
        with contextlib.suppress(ConnectionError):  # the device hung up (it stopped)
            while True:
                await flowing.wait()  # a stalled camera: the connection stays open, silent
                jpg = jpegs[i % len(jpegs)]
                i += 1
                await resp.write(b"--frame\r\nContent-Type: image/jpeg\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n")
                camera.served += 1
                await asyncio.sleep(1 / fps)
        return resp

    app = web.Application()
    app.router.add_get("/cam.mjpg", stream)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    camera.url = f"http://127.0.0.1:{runner.addresses[0][1]}/cam.mjpg"
    try:
        yield camera
    finally:
        flowing.set()
        await runner.cleanup()
