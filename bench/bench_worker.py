"""One worker process against a provider that answers in 1 s: sustained events per second.

    python bench/bench_worker.py [--concurrency 96] [--latency 1.0] [--events 2400]
                                 [--warmup 4] [--window 15]

The provider is the fake Messages API (tests/fake_anthropic.py) in its own process, answering
every call after ``--latency`` seconds. The worker is the real ``edgekeeper cloud worker``
command in its own process: embedded SQLite queue and store (the default deployment), the real
anthropic SDK, ``cloud.worker_concurrency = --concurrency``, budgets off (usage is still priced
and recorded per call). The queue is filled beforehand with sealed events (one 160x120 JPEG
each) from 8 enrolled devices, so the worker never waits for work.

Results stored during ``--window`` seconds after ``--warmup`` seconds are counted. Printed as
one JSON object: events/s, and the ratio to the latency-bound ceiling measured in the same run,
achieved / (concurrency / latency) (1.0: no overhead at all beyond the provider's latency).
The goal: >= 50 events/s with a 1 s provider.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from edgekeeper.cloud.backends import open_queue, open_store  # noqa: E402
from edgekeeper.cloud.keys import CloudKeys  # noqa: E402
from edgekeeper.cloud.queue.base import QueuedEvent  # noqa: E402
from edgekeeper.protocol.envelope import peek_header, seal_event  # noqa: E402
from edgekeeper.protocol.messages import EventBody  # noqa: E402

from _common import enroll_devices, start_fake  # noqa: E402

DEVICES = 8
API_KEY = "fake-key-bench-worker"


def jpeg(seed: int) -> bytes:
    import cv2
    import numpy as np

    img = np.random.default_rng(seed).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return bytes(buf)




async def fill(data_dir: Path, events: int) -> None:
    store = await open_store("sqlite", data_dir)
    queue = await open_queue("sqlite", data_dir)
    keys = await asyncio.to_thread(CloudKeys.ensure, data_dir)
    devices = await enroll_devices(store, DEVICES, ttl_s=60)
    frame = jpeg(1)
    for n in range(events):
        device_id, dk = devices[n % DEVICES]
        seq = n // DEVICES + 1
        body = EventBody(device_id=device_id, seq=seq, captured_at=time.time(),
                         meta={"label": "person", "scores": {"person": 0.9}}, frames=(frame,))
        env = seal_event(body, device=dk, cloud_box_pk=keys.box_pk, sent_at=time.time(),
                         model_version="person@1.0.0")
        await queue.enqueue(QueuedEvent(device_id, seq, peek_header(env).payload_hash, env,
                                        time.time()))
    await queue.close()
    await store.close()


async def count_results(data_dir: Path) -> int:
    store = await open_store("sqlite", data_dir)
    try:
        return await store.results_version()  # ids are 1..n with no gaps here: the count
    finally:
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=96)
    p.add_argument("--latency", type=float, default=1.0)
    p.add_argument("--events", type=int, default=2400)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--window", type=float, default=15.0)
    args = p.parse_args()
    needed = args.concurrency / args.latency * (args.warmup + args.window) * 1.2
    if args.events < needed:
        raise SystemExit(f"--events {args.events} would run dry; use at least {int(needed)}")

    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        data_dir = Path(tmp) / "cloud"
        asyncio.run(fill(data_dir, args.events))
        cfg = Path(tmp) / "cloud.toml"
        cfg.write_text(
            f'[cloud]\ndata_dir = "{data_dir}"\nreasoner = "anthropic"\n'
            f"worker_concurrency = {args.concurrency}\n"
            '[reasoner]\ntranscriber = "none"\n'
            "[budget]\ndevice_daily_usd = 0\nglobal_daily_usd = 0\n"
            '[log]\nlevel = "warning"\n')
        fake, url = start_fake(args.latency)
        env = {**os.environ, "ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": url}
        worker = subprocess.Popen(
            [sys.executable, "-m", "edgekeeper.cli", "--config", str(cfg), "cloud", "worker"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(args.warmup)
            c0, t0 = asyncio.run(count_results(data_dir)), time.monotonic()
            time.sleep(args.window)
            c1, t1 = asyncio.run(count_results(data_dir)), time.monotonic()
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                _, err = worker.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                _, err = worker.communicate()
            fake.send_signal(signal.SIGTERM)
            fake.wait(timeout=10)
        if c1 <= c0:
            raise SystemExit(f"no results were stored; worker said:\n{err[-2000:]}")
    rate = (c1 - c0) / (t1 - t0)
    ceiling = args.concurrency / args.latency
    print(json.dumps({
        "bench": "worker",
        "provider_latency_s": args.latency,
        "concurrency": args.concurrency,
        "events_per_s": round(rate, 1),
        "ceiling_events_per_s": round(ceiling, 1),
        "ratio_to_ceiling": round(rate / ceiling, 3),
        "goal_events_per_s": 50,
        "meets_goal": rate >= 50,
        "window_s": args.window,
        "machine": (f"{platform.machine()}, {os.cpu_count()} CPUs, "
                    f"Python {platform.python_version()}"),
    }, indent=1))


if __name__ == "__main__":
    main()
