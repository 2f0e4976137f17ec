"""Ingest throughput on loopback, as a ratio to a bare aiohttp handler.

    python bench/bench_ingest.py [--events 1500] [--kb 50] [--concurrency 16] [--rounds 3]
                                 [--ceiling] [--pin]

Servers, each ONE process on 127.0.0.1, take turns (interleaved rounds, so background load
hits all alike) under the same client, which posts ``--events`` distinct ~50 KB event envelopes
with ``--concurrency`` requests in flight:

* bare: an aiohttp handler that reads the body and answers 202;
* ingest: ``edgekeeper.cloud.ingest`` with the SQLite backends in a temp dir: content type and
  size checks, envelope parse, registry lookup, crypto_box open, freshness, body decode and
  validation, rate limit, dedupe + enqueue with a durable (WAL, synchronous=FULL, fsync'd)
  group commit, then 202;
* with ``--ceiling``, "ingest without a queue": the same ingest whose queue answers QUEUED at
  once and keeps nothing. Not a backend (it would lose every event): it measures what the
  ingest costs before any queue, i.e. the best ratio ANY queue backend could reach here.

``--pin`` puts the client on CPU 0 and every server on CPU 1 (Linux), so the servers do not
compete with the client for cores: closer to production, where the devices are elsewhere.

Envelopes are sealed by the client before each round (sealing is the device's cost, not the
ingest's); every one is a new (device, seq), so every request is a real enqueue.
Prints one JSON line: events/s of each (median over rounds), the ratio to bare (median of
the per-round ratios), and each server's CPU time per event (all its threads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from aiohttp import web

from edgekeeper.config import CloudSection
from edgekeeper.protocol.envelope import CONTENT_TYPE

from _common import enrolled_in_sqlite


class _NoQueue:
    """The ``--ceiling`` queue: answers QUEUED at once and keeps nothing (see the docstring)."""

    max_attempts = 1

    async def enqueue(self, event: Any) -> Any:
        from edgekeeper.cloud.queue.base import EnqueueStatus

        return EnqueueStatus.QUEUED

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _serve(kind: str, data_dir: str, conn: Any, cpu: int | None) -> None:
    """Child process: run one server until the parent closes the pipe."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    async def main() -> None:
        if kind == "bare":
            async def handler(request: web.Request) -> web.Response:
                await request.read()
                return web.Response(status=202)

            app = web.Application(client_max_size=16 * 1024 * 1024)
            app.router.add_post("/v1/events", handler)
        else:
            from edgekeeper.cloud.ingest import create_app

            section = CloudSection(rate_per_second=1e6, rate_burst=1_000_000, max_inflight=10_000)
            queue = _NoQueue() if kind == "ingest-noqueue" else None
            app = create_app(section, Path(data_dir), queue=queue)  # type: ignore[arg-type]
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        conn.send(port)
        loop = asyncio.get_running_loop()
        while (await loop.run_in_executor(None, conn.recv)) == "cpu":
            conn.send(time.process_time())  # this process's CPU seconds, all threads
        await runner.cleanup()

    asyncio.run(main())


def _envelopes(devices: list[Any], cloud: Any, start_seq: int, n: int, kb: float) -> list[bytes]:
    from edgekeeper.protocol.envelope import seal_event
    from edgekeeper.protocol.messages import EventBody

    from cloudkit import jpeg

    frame = jpeg(int(kb * 1000))
    out = []
    now = time.time()
    for i in range(n):
        device_id, dk = devices[i % len(devices)]
        body = EventBody(device_id=device_id, seq=start_seq + i, captured_at=now,
                         meta={"label": "person", "scores": {"person": 0.9}}, frames=(frame,))
        out.append(seal_event(body, device=dk, cloud_box_pk=cloud.box_pk, sent_at=now,
                              model_version="person@1.0.0"))
    return out


async def _drive(url: str, envelopes: list[bytes], concurrency: int) -> float:
    """Post every envelope; return events/s. Every answer must be 202."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    statuses: dict[int, int] = {}
    it = iter(envelopes)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for env in it:
                async with session.post(url, data=env,
                                        headers={"Content-Type": CONTENT_TYPE}) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if set(statuses) != {202}:
        raise SystemExit(f"unexpected answers: {statuses}")
    return len(envelopes) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1500)
    ap.add_argument("--kb", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--ceiling", action="store_true",
                    help="also run the ingest with a queue that keeps nothing (best case)")
    ap.add_argument("--pin", action="store_true",
                    help="client on CPU 0, servers on CPU 1 (needs 2+ CPUs, Linux)")
    args = ap.parse_args()
    server_cpu = None
    if args.pin:
        if (os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"):
            raise SystemExit("--pin needs Linux and at least 2 CPUs")
        os.sched_setaffinity(0, {0})
        server_cpu = 1

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        data_dir = Path(tmp)
        devices, cloud = asyncio.run(enrolled_in_sqlite(data_dir, args.devices))
        servers = {}
        kinds = ["bare", "ingest", *(["ingest-noqueue"] if args.ceiling else [])]
        for kind in kinds:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(kind, str(data_dir), child, server_cpu),
                               daemon=True)
            proc.start()
            servers[kind] = (proc, parent, f"http://127.0.0.1:{parent.recv()}/v1/events")
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        cpu_per_event: dict[str, list[float]] = {k: [] for k in kinds}

        def cpu(kind: str) -> float:
            servers[kind][1].send("cpu")
            return float(servers[kind][1].recv())

        ratios: list[float] = []
        seq = 1
        try:
            # A short warm-up of each (JIT-free Python still has caches: allocator, sockets).
            for kind in kinds:
                warm = _envelopes(devices, cloud, seq, 100, args.kb)
                seq += 100
                asyncio.run(_drive(servers[kind][2], warm, args.concurrency))
            for _ in range(args.rounds):
                for kind in kinds:
                    envs = _envelopes(devices, cloud, seq, args.events, args.kb)
                    seq += args.events
                    before = cpu(kind)
                    rates[kind].append(asyncio.run(_drive(servers[kind][2], envs,
                                                          args.concurrency)))
                    cpu_per_event[kind].append((cpu(kind) - before) / args.events)
                ratios.append(rates["ingest"][-1] / rates["bare"][-1])
        finally:
            for proc, parent, _ in servers.values():
                parent.send("stop")
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
        queue_file = data_dir / "queue.sqlite"
        print(json.dumps({
            "bench": "ingest",
            "event_bytes": len(envs[0]),
            "events_per_round": args.events,
            "concurrency": args.concurrency,
            "bare_events_per_s": round(statistics.median(rates["bare"]), 1),
            "ingest_events_per_s": round(statistics.median(rates["ingest"]), 1),
            "ratio": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios],
            "target_ratio": 0.5,
            # Server CPU (all threads) per event: less sensitive to other load than events/s.
            **{f"{k.replace('-', '_')}_cpu_us_per_event":
               round(statistics.median(v) * 1e6) for k, v in cpu_per_event.items()},
            **({"noqueue_events_per_s": round(statistics.median(rates["ingest-noqueue"]), 1),
                "ratio_noqueue": round(statistics.median(
                    [i / b for i, b in zip(rates["ingest-noqueue"], rates["bare"], strict=True)]
                ), 3)} if args.ceiling else {}),
            "pinned": args.pin,
            "queue_file_mb": round(queue_file.stat().st_size / 1e6, 1),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        }))


if __name__ == "__main__":
    main()
