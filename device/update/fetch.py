"""The device's client of the cloud's release endpoints (docs/protocol.md, docs/model-updates.md).

* ``GET /v1/releases/{model}``: the current release.json (strong ETag; 304 on If-None-Match, 204
  when there is none);
* ``GET /v1/releases/{model}/{version}/{path}``: one file of it;
* ``POST /v1/releases/report``: what the device did with a release.

Every request is signed by the device like the results long-poll (``sign_request``). A file is
read up to the length its signed release declares and no further: a longer answer is refused
(``file_mismatch``), a stalled one (no byte for ``stall_seconds``) or a slow one (over
``deadline_seconds`` in all) is a ``TimedOut`` the updater retries later. Bytes are hashed and
written (on a thread) as they arrive, so a 64 MB file never sits in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from edgekeeper import compat
from edgekeeper.backoff import parse_retry_after
from edgekeeper.errors import PermanentError, RetryableError, TimedOut, classified
from edgekeeper.fs import open_private
from edgekeeper.protocol.envelope import sign_request
from edgekeeper.protocol.keys import DeviceKeys
from edgekeeper.protocol.release import MAX_RELEASE_BYTES, FileEntry, ReleaseRefused

_CHUNK = 64 * 1024
_MAX_ANSWER = 64 * 1024


class ReleasesUnavailable(RetryableError, ConnectionError):
    """The cloud answered but cannot serve the release now (5xx, 429, a cut-short file)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, fix="nothing to do: the device asks again later")
        self.retry_after = retry_after


class ReleasesRefused(PermanentError):
    """The cloud refuses this device's release requests (not enrolled, revoked)."""


class ReleaseFetcher:
    def __init__(self, cloud_url: str, *, keys: DeviceKeys, device_id: str,
                 stall_seconds: float = 10.0, deadline_seconds: float = 600.0,
                 connect_timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.base = URL(cloud_url.rstrip("/"))
        self.keys = keys
        self.device_id = device_id
        self.stall_seconds = stall_seconds
        self.deadline_seconds = deadline_seconds
        self.connect_timeout = connect_timeout
        self._ssl = ssl_context
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ReleaseFetcher:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(ssl=self._ssl or True))
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _request(self, method: str, path: str, body: bytes = b"") -> tuple[URL, dict[str, str]]:
        full = self.base.path.rstrip("/") + path
        headers = sign_request(self.keys, device_id=self.device_id, method=method, path=full,
                               query="", body=body, timestamp=self._clock())
        return self.base.with_path(full, encoded=True), headers

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use `async with ReleaseFetcher(...)`")
        return self._session

    async def release(self, model: str, etag: str | None) -> tuple[bytes, str | None] | None:
        """(release.json bytes, ETag), or None when unchanged (304) or there is none (204)."""
        url, headers = self._request("GET", f"/v1/releases/{model}")
        if etag:
            headers["If-None-Match"] = etag
        what = f"GET /v1/releases/{model}"
        with classified(what):
            async with compat.timeout(self.stall_seconds * 3), self.session.get(
                url, headers=headers
            ) as resp:
                if resp.status in (204, 304, 404):  # 404: an ingest that serves no releases
                    return None
                data = await resp.content.read(MAX_RELEASE_BYTES + 1)
                _raise_for(resp.status, data, resp.headers, what)
                return data, resp.headers.get("ETag")

    async def download(self, model: str, version: str, entry: FileEntry, dest: Path) -> None:
        """Fetch one file of a release into ``dest`` (0600, fsynced), exactly as declared."""
        url, headers = self._request("GET", f"/v1/releases/{model}/{version}/{entry.path}")
        what = f"GET {url.path}"
        h = hashlib.sha256()
        fd = await asyncio.to_thread(open_private, dest, os.O_WRONLY | os.O_TRUNC)
        try:
            with classified(what):
                try:
                    async with compat.timeout(self.deadline_seconds):
                        await self._read_into(url, headers, entry, fd, h, what)
                except TimeoutError:
                    raise TimedOut(f"{what}: not complete within {self.deadline_seconds:g} s",
                                   fix="the download is tried again later") from None
            await asyncio.to_thread(os.fsync, fd)
        finally:
            await asyncio.to_thread(os.close, fd)
        if h.hexdigest() != entry.sha256:
            raise ReleaseRefused("file_mismatch", f"{entry.path}: sha256 differs from the "
                                                  "signed release")

    async def _read_into(self, url: URL, headers: dict[str, str], entry: FileEntry, fd: int,
                         h: Any, what: str) -> None:
        async with self.session.get(url, headers=headers) as resp:
            if resp.status != 200:
                data = await resp.content.read(_MAX_ANSWER)
                _raise_for(resp.status if resp.status >= 300 else 502, data, resp.headers, what)
            declared = resp.content_length
            if declared is not None and declared != entry.length:
                raise ReleaseRefused("file_mismatch", f"{entry.path}: the server sends {declared}"
                                                      f" bytes, the release says {entry.length}")
            n = 0
            while n < entry.length:
                chunk = await self._stall_guarded(resp, min(_CHUNK, entry.length - n), what)
                if not chunk:
                    raise ReleasesUnavailable(f"{what}: the answer ended after {n} of "
                                              f"{entry.length} bytes")
                await asyncio.to_thread(_write_hashed, fd, h, chunk)
                n += len(chunk)
            # Declared length reached: anything more means the file is not the signed one.
            if await self._stall_guarded(resp, 1, what):
                raise ReleaseRefused("file_mismatch", f"{entry.path}: the server sends more "
                                                      f"than the {entry.length} bytes declared")

    async def _stall_guarded(self, resp: aiohttp.ClientResponse, n: int, what: str) -> bytes:
        try:
            async with compat.timeout(self.stall_seconds):
                return await resp.content.read(n)
        except TimeoutError:
            raise TimedOut(f"{what}: no byte for {self.stall_seconds:g} s",
                           fix="the download is tried again later") from None

    async def report(self, model: str, version: str, outcome: str, reason: str,
                     at: float, running: str | None = None) -> None:
        doc: dict[str, Any] = {"model": model, "version": version, "outcome": outcome,
                               "reason": reason[:1000], "at": at}
        if running is not None:
            doc["running"] = running  # the version the device runs now
        body = json.dumps(doc).encode()
        url, headers = self._request("POST", "/v1/releases/report", body)
        headers["Content-Type"] = "application/json"
        with classified("POST /v1/releases/report"):
            async with compat.timeout(self.stall_seconds * 3), self.session.post(
                url, data=body, headers=headers
            ) as resp:
                data = await resp.content.read(_MAX_ANSWER)
                _raise_for(resp.status, data, resp.headers, "POST /v1/releases/report")


def _write_hashed(fd: int, h: Any, chunk: bytes) -> None:
    h.update(chunk)
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]


def _raise_for(status: int, data: bytes, headers: Any, what: str) -> None:
    if 200 <= status < 300:
        return
    text = data[:300].decode("utf-8", "replace")
    if status in (400, 401, 403, 405, 415):
        raise ReleasesRefused(f"{what}: the cloud refused the request ({status}): {text}",
                              fix="check the device's enrollment (edgekeeper device status)")
    raise ReleasesUnavailable(f"{what}: HTTP {status}: {text}",
                              parse_retry_after(headers.get("Retry-After")))
