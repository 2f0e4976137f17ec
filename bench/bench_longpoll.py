"""Store queries per second behind the results long-poll: ``--devices`` devices each holding a
long-poll open, results landing for ``--hot`` of them at ``--rate`` per second (docs/scaling.md,
issue 15).

    python bench/bench_longpoll.py [--devices 1000] [--hot 10] [--rate 10] [--seconds 8]
                                   [--results-poll 0.25]

Two watches in one run, on the same store and the same load: ``main``, the long-poll watch
before issue 15 (kept below verbatim as the baseline: one global ``results_version``, every
result wakes every waiter, each then reads its results), then ``issue15``, the ingest's own
``ResultsWatch`` (a result wakes only its device's polls). The rest is real: the ingest on
127.0.0.1 (aiohttp, SQLite store with fsync), the devices' signed GET /v1/results over HTTP,
each re-polling from its new cursor when answered, results written by a second store
connection (what a worker process does). Only the counting is the bench's: the ingest's store
is wrapped so every store call is counted by name.

Printed as one JSON object: per watch, store queries per second (all, and the long-poll's),
results delivered, queries per result delivered; and main / issue15 for both. The machine is
shared: compare the two figures of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp

from edgekeeper import compat
from edgekeeper.cloud.backends import open_store
from edgekeeper.cloud.enroll import EnrollRequest, enroll, issue_token
from edgekeeper.cloud.ingest import STATE, IngestServer, create_app
from edgekeeper.cloud.store.base import Store
from edgekeeper.config import CloudSection
from edgekeeper.log import get_logger
from edgekeeper.protocol.envelope import sign_request
from edgekeeper.protocol.keys import DeviceKeys, b64e

log = get_logger("bench.longpoll")
RESULTS_QUERIES = ("results_version", "results_since", "results_after")


class MainWatch:
    """main's ResultsWatch before issue 15 (d42ce7b), unchanged but for the signature: the
    device is ignored, and ``version`` is unknown so the request reads the store's, as main's
    get_results did on every round."""

    version = -1

    def __init__(self, store: Store, poll_s: float) -> None:
        self._store = store
        self._poll_s = poll_s
        self._current = -1
        self._changed = asyncio.Event()
        self._polling = False

    def notify(self, version: int | None = None) -> None:
        if version is not None:
            self._current = max(self._current, version)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _poll(self) -> None:
        try:
            version = await self._store.results_version()
        except Exception as err:
            log.warning("ingest.results_poll_failed", error=str(err)[:300])
            return
        if version != self._current:
            self._current = version
            self.notify()

    async def _changed_within(self, seconds: float) -> None:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with compat.timeout(seconds):
                await changed.wait()

    async def wait_newer(self, device_id: str, version: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._current <= version:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self._polling:
                await self._changed_within(remaining)
                continue
            self._polling = True
            try:
                while self._current <= version:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return False
                    await self._changed_within(min(remaining, self._poll_s))
                    if self._current <= version:
                        await self._poll()
            finally:
                self._polling = False
                self.notify()
        return True


class CountingStore:
    """The ingest's store, every call counted by method name (the bench's only instrument)."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or not asyncio.iscoroutinefunction(attr):
            return attr

        async def counted(*args: Any, **kw: Any) -> Any:
            self.calls[name] += 1
            return await cast(Callable[..., Awaitable[Any]], attr)(*args, **kw)

        return counted


async def enroll_all(store: Store, n: int) -> list[tuple[str, DeviceKeys]]:
    devices = []
    for i in range(n):
        device_id, keys = f"pi-{i:05d}", DeviceKeys.generate()
        token = await issue_token(store, ttl_s=600, now=time.time())
        await enroll(store, EnrollRequest.from_json(
            {"token": token, "device_id": device_id, "sign_pk": b64e(keys.sign_pk),
             "box_pk": b64e(keys.box_pk)}), now=time.time())
        devices.append((device_id, keys))
    return devices


async def run_watch(kind: str, args: argparse.Namespace, data_dir: Path,
                    devices: list[tuple[str, DeviceKeys]], writer: Store) -> dict[str, Any]:
    section = CloudSection(data_dir=str(data_dir), port=0,
                           results_poll_seconds=args.results_poll)
    inner = await open_store("sqlite", data_dir)
    store = CountingStore(inner)
    app = create_app(section, data_dir, store=cast(Store, store))
    server = IngestServer(app)
    url = await server.start()
    if kind == "main":
        app[STATE].watch = cast(Any, MainWatch(cast(Store, store), args.results_poll))
    start_version = await writer.results_version()
    delivered = 0
    measuring = False
    stop = asyncio.Event()

    async def device_loop(session: aiohttp.ClientSession, device_id: str,
                          keys: DeviceKeys) -> None:
        nonlocal delivered
        cursor = start_version
        while not stop.is_set():
            query = f"cursor={cursor}&wait=30&limit=20"
            headers = sign_request(keys, device_id=device_id, method="GET", path="/v1/results",
                                   query=query, body=b"", timestamp=time.time())
            async with session.get(f"{url}/v1/results?{query}", headers=headers) as resp:
                data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"{device_id}: {resp.status} {data}")
            if data["results"] and measuring:
                delivered += len(data["results"])
            cursor = data["cursor"]

    async def land_results() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            device_id = devices[seq % args.hot][0]
            await writer.put_result(device_id=device_id, seq=seq + start_version,
                                    envelope=b"sealed", now=time.time())
            await asyncio.sleep(1.0 / args.rate)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(device_loop(session, d, k)) for d, k in devices]
        polls_open = app[STATE].metrics.polls_open
        while polls_open._value.get() < len(devices):  # noqa: ASYNC110 - the ingest holds it
            await asyncio.sleep(0.1)
        writer_task = asyncio.create_task(land_results())
        await asyncio.sleep(args.warmup)
        before, t0 = Counter(store.calls), time.monotonic()
        measuring = True
        await asyncio.sleep(args.seconds)
        measuring = False
        calls, elapsed = store.calls - before, time.monotonic() - t0
        stop.set()
        writer_task.cancel()
        await asyncio.gather(writer_task, return_exceptions=True)
        # End every long-poll the way it ends in service, with a result (aiohttp lets a
        # handler run on after its client leaves, so cancelling the clients would not).
        last = await writer.results_version()
        for device_id, _ in devices:
            await writer.put_result(device_id=device_id, seq=last + 1, envelope=b"sealed",
                                    now=time.time())
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    await server.stop()
    await inner.close()
    total = sum(calls.values())
    results = sum(calls[q] for q in RESULTS_QUERIES)
    return {
        "store_queries_per_s": round(total / elapsed, 1),
        "longpoll_queries_per_s": round(results / elapsed, 1),
        "by_query_per_s": {k: round(v / elapsed, 1) for k, v in sorted(calls.items())},
        "results_delivered": delivered,
        "queries_per_result": round(results / max(delivered, 1), 2),
        "seconds": round(elapsed, 2),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-longpoll-") as tmp:
        data_dir = Path(tmp)
        writer = await open_store("sqlite", data_dir)
        try:
            devices = await enroll_all(writer, args.devices)
            out: dict[str, Any] = {
                "devices_waiting": args.devices, "hot_devices": args.hot,
                "results_per_s": args.rate, "results_poll_seconds": args.results_poll,
                "python": platform.python_version(), "cpus": os.cpu_count(),
            }
            for kind in ("main", "issue15"):
                out[kind] = await run_watch(kind, args, data_dir, devices, writer)
            out["main_over_issue15"] = {
                "longpoll_queries_per_s": round(out["main"]["longpoll_queries_per_s"]
                                                / max(out["issue15"]["longpoll_queries_per_s"],
                                                      1e-9), 1),
                "queries_per_result": round(out["main"]["queries_per_result"]
                                            / max(out["issue15"]["queries_per_result"], 1e-9),
                                            1),
            }
            return out
        finally:
            await writer.close()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--hot", type=int, default=10, help="devices that results land for")
    p.add_argument("--rate", type=float, default=10.0, help="results per second, all hot")
    p.add_argument("--seconds", type=float, default=8.0, help="measured window per watch")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--results-poll", type=float, default=0.25,
                   help="cloud.results_poll_seconds")
    return p.parse_args()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse())), indent=2))
