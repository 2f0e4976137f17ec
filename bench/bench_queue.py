"""The embedded queue's durable enqueue, against the least any durable queue must do.

    python bench/bench_queue.py [--events 4000] [--kb 56.8] [--concurrency 4 16] [--rounds 3]

For each concurrency (enqueues in flight, so about the events per group commit), interleaved
rounds of:

* floor: the same envelopes appended to a plain file in batches of that size, one ``writev``
  + ``fdatasync`` per batch, on one thread: no index, no dedupe, no asyncio hand-off;
* queue: ``SQLiteQueue.enqueue`` from that many coroutines (segment append + fdatasync, then
  the index rows: dedupe, events, segment mark).

Prints one JSON line per concurrency: events/s of each, ``ratio`` = queue / floor (1.0 would
mean the queue costs nothing beyond the disk), CPU per event of each (this process, all
threads), and write amplification = bytes this process caused to be written to disk
(/proc/self/io write_bytes) per envelope byte.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgekeeper.cloud.queue.base import QueuedEvent
from edgekeeper.cloud.queue.sqlite import SQLiteQueue


def _disk_written() -> int:
    """Bytes this process caused to be written to storage so far (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _events(first: int, n: int, size: int) -> list[QueuedEvent]:
    blob = os.urandom(size)
    out = []
    for seq in range(first, first + n):
        env = seq.to_bytes(8, "big") + blob[8:]  # distinct bytes, no per-event random cost
        out.append(QueuedEvent(f"dev-{seq % 8}", seq, hashlib.sha256(env).digest(), env,
                               time.time()))
    return out


def _floor(path: Path, events: list[QueuedEvent], batch: int) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        start = time.perf_counter()
        for i in range(0, len(events), batch):
            os.writev(fd, [e.envelope for e in events[i : i + batch]])
            os.fdatasync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


async def _queue(queue: SQLiteQueue, events: list[QueuedEvent], concurrency: int) -> float:
    it = iter(events)

    async def worker() -> None:
        for ev in it:
            await queue.enqueue(ev)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def _round_floor(path: Path, events: list[QueuedEvent], batch: int) -> dict[str, float]:
    w0, c0 = _disk_written(), time.process_time()
    seconds = _floor(path, events, batch)
    return _figures(events, seconds, time.process_time() - c0, _disk_written() - w0)


async def _round_queue(directory: Path, events: list[QueuedEvent], conc: int) -> dict[str, float]:
    q = await SQLiteQueue.open(directory / "queue.sqlite")
    try:
        w0, c0 = _disk_written(), time.process_time()
        seconds = await _queue(q, events, conc)
        cpu, written = time.process_time() - c0, _disk_written() - w0
    finally:
        await q.close()
    return _figures(events, seconds, cpu, written)


def _figures(
    events: list[QueuedEvent], seconds: float, cpu: float, written: int
) -> dict[str, float]:
    n, nbytes = len(events), sum(len(e.envelope) for e in events)
    return {"eps": n / seconds, "cpu_us": cpu / n * 1e6, "amp": written / nbytes}


def _median(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(x[key] for x in rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--kb", type=float, default=56.8, help="envelope size (the ingest bench's)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to write (default: a temp dir; use the disk you care about)")
    args = ap.parse_args()
    size = int(args.kb * 1000)
    with tempfile.TemporaryDirectory(prefix="bench-queue-", dir=args.dir) as tmp:
        root = Path(tmp)
        seq = 1
        for conc in args.concurrency:
            res: dict[str, list[dict[str, float]]] = {"floor": [], "queue": []}
            for r in range(args.rounds):
                events = _events(seq, args.events, size)
                seq += args.events
                floor_file = root / f"floor-{conc}-{r}.log"
                # Each side starts with nothing dirty in the page cache: on ext4 (data=ordered)
                # an fdatasync that commits the journal also flushes other files' new data.
                os.sync()
                res["floor"].append(_round_floor(floor_file, events, conc))
                floor_file.unlink()
                os.sync()
                res["queue"].append(asyncio.run(_round_queue(root / f"q{conc}-{r}", events, conc)))
                shutil.rmtree(root / f"q{conc}-{r}")
                print(f"  concurrency {conc} round {r + 1}/{args.rounds}: floor "
                      f"{res['floor'][-1]['eps']:.0f} ev/s, queue {res['queue'][-1]['eps']:.0f}"
                      " ev/s", file=sys.stderr, flush=True)

            def med(kind: str, key: str, res: dict[str, list[dict[str, float]]] = res) -> float:
                return _median(res[kind], key)

            ratios = [q["eps"] / f["eps"] for q, f in zip(res["queue"], res["floor"], strict=True)]
            print(json.dumps({
                "bench": "queue",
                "envelope_bytes": size,
                "concurrency": conc,
                "events_per_round": args.events,
                "floor_events_per_s": round(med("floor", "eps")),
                "queue_events_per_s": round(med("queue", "eps")),
                "ratio": round(statistics.median(ratios), 3),
                "ratios": [round(x, 3) for x in ratios],
                "floor_cpu_us_per_event": round(med("floor", "cpu_us")),
                "queue_cpu_us_per_event": round(med("queue", "cpu_us")),
                "floor_write_amplification": round(med("floor", "amp"), 2),
                "queue_write_amplification": round(med("queue", "amp"), 2),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }), flush=True)


if __name__ == "__main__":
    main()
