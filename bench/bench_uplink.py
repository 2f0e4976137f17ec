"""Uploader throughput on loopback, as a ratio to a bare client posting pre-sealed envelopes.

    python bench/bench_uplink.py [--events 600] [--kb 50] [--concurrency 2] [--rounds 3]

One ingest (``edgekeeper.cloud.ingest``, SQLite backends, one process) runs in a child process
on 127.0.0.1. Each round, in turn (interleaved, so background load hits both alike):

* bare: an aiohttp client POSTs ``--events`` envelopes, sealed before the clock starts, with
  ``--concurrency`` requests in flight; nothing is read from or written to disk on the device;
* uplink: the real device path: ``Uplink.run_burst`` drains an outbox (SQLite, WAL,
  synchronous=FULL) of the same number of ~50 KB events: lease, seal at send time, POST,
  delete after the 202 (one fsync'd transaction per event), same concurrency.

Both send new (device, seq) keys each round, so every request is a real durable enqueue.
Prints one JSON object: events/s of each (median over rounds) and the ratio uplink/bare: the
share of the link's capacity the device's durability and sealing leave.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from edgekeeper.config import CloudSection, build_from_dict
from edgekeeper.protocol.envelope import CONTENT_TYPE, seal_event
from edgekeeper.protocol.messages import EventBody


def _serve(data_dir: str, conn: Any) -> None:
    async def main() -> None:
        from aiohttp import web

        from edgekeeper.cloud.ingest import create_app

        section = CloudSection(rate_per_second=1e6, rate_burst=1_000_000, max_inflight=10_000)
        runner = web.AppRunner(create_app(section, Path(data_dir)), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await runner.cleanup()

    asyncio.run(main())


def body(device: str, seq: int, kb: int, rng: random.Random) -> EventBody:
    return EventBody(
        device_id=device, seq=seq, captured_at=time.time(),
        meta={"label": "person", "scores": {"person": 0.9}, "models": {"vision": "person@1.0.0"}},
        frames=(b"\xff\xd8" + rng.randbytes(kb * 1024),),
    )


async def bare_round(url: str, envelopes: list[bytes], concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        headers={"Content-Type": CONTENT_TYPE},
    ) as session:

        async def one(env: bytes) -> None:
            async with sem, session.post(f"{url}/v1/events", data=env) as resp:
                await resp.read()
                assert resp.status == 202, resp.status

        t0 = time.perf_counter()
        await asyncio.gather(*(one(e) for e in envelopes))
        return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=600)
    ap.add_argument("--kb", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from edgekeeper import log

    log.configure("warning", "console")  # keep stdout for the JSON figures

    from edgekeeper.device import identity
    from edgekeeper.device.outbox import AsyncOutbox, OutboxSink
    from edgekeeper.device.uplink import Uplink, open_outbox

    rng = random.Random(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-uplink-"))
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_serve, args=(str(tmp / "cloud"), child))
    server.start()
    port = parent.recv()
    url = f"http://127.0.0.1:{port}"
    try:
        # Two enrolled devices: "bare" posts pre-sealed envelopes, "dev" drains its outbox.
        from edgekeeper.cloud.enroll import issue_token
        from edgekeeper.cloud.store.sqlite import SQLiteStore

        store = await SQLiteStore.open(tmp / "cloud" / "store.sqlite")
        configs = {}
        for name in ("bare", "dev"):
            cfg = build_from_dict(
                {"device": {"id": name, "state_dir": str(tmp / name)},
                 "uplink": {"concurrency": args.concurrency,
                            "batch": max(16, args.concurrency * 4)}},
                source="bench",
            )
            token = await issue_token(store, ttl_s=600, now=time.time())
            await identity.enroll(url, token, device_id=name, state_dir=cfg.device.state_dir)
            configs[name] = cfg
        await store.close()
        bare_keys = identity.load_keys(configs["bare"].device.state_dir)
        pinned = identity.load_enrollment(configs["bare"].device.state_dir).cloud.box_pk

        dev = configs["dev"]
        enrollment = identity.load_enrollment(dev.device.state_dir)
        outbox = AsyncOutbox(open_outbox(dev))
        sink = OutboxSink(outbox)
        bare_seq = 0
        results: dict[str, list[float]] = {"bare": [], "uplink": []}
        for _ in range(args.rounds):
            envs = []
            for _ in range(args.events):
                bare_seq += 1
                envs.append(seal_event(body("bare", bare_seq, args.kb, rng), device=bare_keys,
                                       cloud_box_pk=pinned, sent_at=time.time(),
                                       model_version="person@1.0.0"))
            results["bare"].append(args.events / await bare_round(url, envs, args.concurrency))

            for _ in range(args.events):
                seq = await sink.next_seq()
                await sink.deliver(body("dev", seq, args.kb, rng))
            async with Uplink(outbox, keys=identity.load_keys(dev.device.state_dir),
                              device_id="dev", cloud_url=url,
                              cloud_box_pk=enrollment.cloud.box_pk, section=dev.uplink) as up:
                t0 = time.perf_counter()
                report = await up.run_burst()
                elapsed = time.perf_counter() - t0
            assert report.delivered == args.events and report.remaining == 0, report
            results["uplink"].append(args.events / elapsed)
        await outbox.close()
    finally:
        parent.send("stop")
        server.join(timeout=30)
    bare = statistics.median(results["bare"])
    upl = statistics.median(results["uplink"])
    print(json.dumps({
        "bench": "uplink",
        "events": args.events, "kb": args.kb, "concurrency": args.concurrency,
        "rounds": args.rounds,
        "bare_events_per_s": round(bare, 1),
        "uplink_events_per_s": round(upl, 1),
        "ratio_uplink_to_bare": round(upl / bare, 3),
        "all_rounds": {k: [round(v, 1) for v in vs] for k, vs in results.items()},
        "machine": {"python": sys.version.split()[0], "machine": platform.machine(),
                    "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
