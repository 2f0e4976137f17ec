"""End to end: an event captured on the device -> its result verified on the device, over
loopback, with the provider answering in 1 s. Reports p50/p99 of the overhead beyond that 1 s.

    python bench/bench_e2e_latency.py [--events 60] [--rate 4] [--latency 1.0]
                                      [--results-poll 0.05]

Every part is the real one: the device's durable outbox (OutboxSink.deliver returns after the
commit: that instant is "captured"), its uploader sealing and POSTing the event, the real ingest
(aiohttp on 127.0.0.1, SQLite queue and store with fsync), the real worker with the Claude
reasoner (the anthropic SDK) against the fake Messages API in ANOTHER process answering after
``--latency`` s, the result sealed for the device, the device's results long-poll, verification
and its actions (the last action records the arrival time). Only the wiring into one process
(device + cloud) is the bench's, as in ``edgekeeper demo``.

Events are captured at ``--rate`` per second (under the ingest's per-device rate limit) each
with one 640x480 JPEG. ``--results-poll`` is ``cloud.results_poll_seconds``, how often a
waiting long-poll looks for results written by workers: the default 0.25 s adds up to a quarter
second; the figure is printed for both the given value and what the breakdown shows.

Printed as one JSON object: overhead p50/p99 in ms (end-to-end minus the provider's latency),
its share of the end-to-end time, and where it goes (capture -> result stored by the worker,
stored -> on the device). The goal: p99 overhead < 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekeeper import compat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _common import start_fake  # noqa: E402

API_KEY = "fake-key-bench-e2e"




def frame() -> bytes:
    import cv2

    img = np.random.default_rng(3).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (9, 9), 3)  # camera-like, not noise: ~40 KB
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return bytes(buf)


async def run(args: argparse.Namespace, workdir: Path, url: str) -> dict[str, Any]:
    from edgekeeper import config as config_mod
    from edgekeeper.cloud.budget import Budget
    from edgekeeper.cloud.enroll import issue_token
    from edgekeeper.cloud.ingest import IngestServer, create_app
    from edgekeeper.cloud.reasoners.anthropic import AnthropicReasoner
    from edgekeeper.cloud.worker import Worker
    from edgekeeper.device import identity
    from edgekeeper.device.uplink import DeviceLink
    from edgekeeper.protocol.messages import EventBody

    base = config_mod.build_from_dict({
        "cloud": {"data_dir": str(workdir / "cloud"), "port": 0, "reasoner": "anthropic",
                  "results_poll_seconds": args.results_poll, "worker_concurrency": 32},
        "reasoner": {"transcriber": "none"},
        "budget": {"device_daily_usd": 0, "global_daily_usd": 0},
        "device": {"id": "bench-device", "state_dir": str(workdir / "device")},
        "results": {"jsonl": "", "command": [], "post_url": "", "poll_wait_seconds": 25.0},
    }, source="bench")
    arrived: dict[int, float] = {}
    stored_at: dict[int, float] = {}
    captured: dict[int, float] = {}
    all_in = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        server = IngestServer(create_app(base.cloud, base.cloud_data_dir))
        cloud_url = await server.start()
        stack.push_async_callback(server.stop)
        state = server.state
        reasoner = AnthropicReasoner(config=base, environ={"ANTHROPIC_API_KEY": API_KEY,
                                                           "ANTHROPIC_BASE_URL": url})
        stack.push_async_callback(reasoner.close)
        worker = Worker(queue=state.queue, store=state.store, reasoner=reasoner, keys=state.keys,
                        concurrency=base.cloud.worker_concurrency, poll_s=0.02,
                        budget=Budget(base.budget, state.store))
        token = await issue_token(state.store, ttl_s=600.0, now=time.time())
        await identity.enroll(cloud_url, token, device_id=base.device.id,
                              state_dir=base.device.state_dir)
        device_cfg = dataclasses.replace(base, uplink=dataclasses.replace(base.uplink,
                                                                          cloud_url=""))
        link = await stack.enter_async_context(await DeviceLink.open(device_cfg))

        async def on_result(doc: dict[str, Any]) -> None:
            arrived[int(doc["seq"])] = time.time()
            stored_at[int(doc["seq"])] = float(doc["produced_at"])
            if len(arrived) >= args.events:
                all_in.set()

        link.actions.actions.append(("bench-clock", on_result))
        jpeg = frame()
        stop_link, stop_worker = asyncio.Event(), asyncio.Event()
        async with compat.TaskGroup() as tg:
            tg.create_task(worker.run(stop=stop_worker))
            tg.create_task(link.run(stop_link))
            try:
                for _ in range(args.events):
                    seq = await link.sink.next_seq()
                    t0 = time.time()
                    body = EventBody(device_id=base.device.id, seq=seq, captured_at=t0,
                                     meta={"label": "person", "scores": {"person": 0.9}},
                                     frames=(jpeg,))
                    await link.sink.deliver(body)
                    captured[seq] = t0
                    await asyncio.sleep(max(0.0, 1.0 / args.rate - (time.time() - t0)))
                async with compat.timeout(60 + args.events * args.latency):
                    await all_in.wait()
            finally:
                stop_link.set()
                stop_worker.set()
    seqs = sorted(arrived)
    e2e = np.array([arrived[s] - captured[s] for s in seqs])
    overhead = (e2e - args.latency) * 1000
    to_stored = np.array([stored_at[s] - captured[s] - args.latency for s in seqs]) * 1000
    to_device = np.array([arrived[s] - stored_at[s] for s in seqs]) * 1000

    def pct(a: np.ndarray) -> dict[str, float]:
        return {"p50": round(float(np.percentile(a, 50)), 1),
                "p99": round(float(np.percentile(a, 99)), 1)}

    return {
        "bench": "e2e_latency",
        "events": len(seqs),
        "rate_per_s": args.rate,
        "provider_latency_s": args.latency,
        "results_poll_seconds": args.results_poll,
        "overhead_ms": pct(overhead),
        "overhead_share_of_e2e": {"p50": round(float(np.percentile(overhead, 50)) / 1000
                                               / float(np.percentile(e2e, 50)), 3)},
        "breakdown_ms": {"capture_to_stored_minus_provider": pct(to_stored),
                         "stored_to_device": pct(to_device)},
        "goal_p99_overhead_ms": 200,
        "meets_goal": float(np.percentile(overhead, 99)) < 200,
        "machine": (f"{platform.machine()}, {os.cpu_count()} CPUs, "
                    f"Python {platform.python_version()}"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=60)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--latency", type=float, default=1.0)
    p.add_argument("--results-poll", type=float, default=0.05)
    args = p.parse_args()
    from edgekeeper import log

    log.configure("warning", "json")
    fake, url = start_fake(args.latency)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
            out = asyncio.run(run(args, Path(tmp), url))
    finally:
        fake.send_signal(signal.SIGTERM)
        fake.wait(timeout=10)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
