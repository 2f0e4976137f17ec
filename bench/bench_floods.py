"""An honest device's delivery time while the ingest is flooded, as ratios to no flood.

    python bench/bench_floods.py [--events 16] [--rate 4] [--floods a,b,c,d,e]
                                 [--concurrency 64] [--slow-clients 200] [--phase-timeout 60]

Four processes on 127.0.0.1, each the real thing:

* the ingest (``edgekeeper.cloud.ingest``, SQLite queue and store with fsync, the default
  ``[cloud]`` settings: max_inflight 64, results_max_polls_per_device 2, body_timeout 30 s);
* a worker (``build_worker``, as ``edgekeeper cloud worker``) with the echo reasoner, so no LLM
  latency hides the ingest's;
* the honest device, in this process: its durable outbox, uploader and results long-poll
  (``DeviceLink``), enrolled over HTTP. ``--events`` events at ``--rate``/s per phase, one
  640x480 JPEG each. "accepted" is capture -> the ingest's 202; "result" is capture -> the
  result verified and handled on the device (its last action records the time);
* the flooder, its own process, started for one phase and stopped after it:

  a. uploads under an unknown device id (``--concurrency`` in flight, sealed beforehand);
  b. one signed ``GET /v1/results?wait=30`` of the honest device, captured once and replayed
     from ``--concurrency`` sockets (inside the 300 s freshness window);
  c. ``--slow-clients`` slowloris clients: each sends the headers of a 60 KB upload, then one
     byte a second (no pause reaches body_timeout_seconds); reconnects when answered;
  d. envelopes under the honest device's id: half forged (sealed with another signing key),
     half tampered (a real sealed envelope with one byte flipped);
  e. enrollment token guessing: ``POST /v1/enroll`` with random tokens.

Each phase also prints the CPU seconds per second of every process and how much of the phase
the ingest's event loop spent runnable but waiting for a CPU (/proc/PID/schedstat): on a shared
machine that says whether a slowdown is the ingest's work or the machine's load.

Phases run in one process tree in this order: baseline, each flood, baseline again (the two
baselines show the drift of the shared machine). Printed as one JSON object: per phase the
p50/p99 of "accepted" and "result" in ms, the honest device's 503/429 refusals, the flood's
requests and answers by status, and the ratio of the phase's p50 to the baselines' pooled
p50. A phase whose events are not all in within ``--phase-timeout`` s reports how many were,
and its ratio as a lower bound (">=").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

FLOODS = {
    "a": "uploads under an unknown device id",
    "b": "one signed results long-poll replayed",
    "c": "slowloris (slow request bodies)",
    "d": "forged and tampered envelopes under a known id",
    "e": "enrollment token guessing",
}


def _config(workdir: Path) -> Any:
    from edgekeeper import config as config_mod

    return config_mod.build_from_dict({
        "cloud": {"data_dir": str(workdir / "cloud"), "port": 0, "reasoner": "echo"},
        "device": {"id": "honest", "state_dir": str(workdir / "device")},
        "results": {"jsonl": "", "command": [], "post_url": ""},
    }, source="bench")


async def _until_parent_goes(conn: Any) -> None:
    """Children stop when the parent closes its end of the pipe (no signal handling here)."""
    with contextlib.suppress(EOFError, OSError):
        await asyncio.to_thread(conn.recv)


# --- the cloud: ingest and worker, each its own process -------------------------------------


def _ingest(workdir: str, conn: Any) -> None:
    async def main() -> None:
        from edgekeeper import log
        from edgekeeper.cloud.enroll import issue_token
        from edgekeeper.cloud.ingest import IngestServer, create_app

        log.configure("error", "json")
        cfg = _config(Path(workdir))
        server = IngestServer(create_app(cfg.cloud, cfg.cloud_data_dir))
        url = await server.start()
        try:
            token = await issue_token(server.state.store, ttl_s=600.0, now=time.time())
            conn.send((url, token))
            await _until_parent_goes(conn)
        finally:
            await server.stop()

    asyncio.run(main())


def _worker(workdir: str, conn: Any) -> None:
    async def main() -> None:
        from edgekeeper import log
        from edgekeeper.cloud.backends import open_queue, open_store
        from edgekeeper.cloud.keys import CloudKeys
        from edgekeeper.cloud.worker import build_worker

        log.configure("error", "json")
        cfg = _config(Path(workdir))
        section = cfg.cloud
        async with contextlib.AsyncExitStack() as stack:
            store = await open_store(section.store_backend, cfg.cloud_data_dir, section=section)
            stack.push_async_callback(store.close)
            queue = await open_queue(section.queue_backend, cfg.cloud_data_dir,
                                     max_attempts=section.queue_max_attempts, section=section)
            stack.push_async_callback(queue.close)
            keys = await asyncio.to_thread(CloudKeys.ensure, cfg.cloud_data_dir)
            worker = build_worker(cfg, queue=queue, store=store, keys=keys, stack=stack)
            stop = asyncio.Event()
            conn.send("ready")
            run = asyncio.create_task(worker.run(stop=stop))
            await _until_parent_goes(conn)
            stop.set()
            await run

    asyncio.run(main())


# --- the flooder ----------------------------------------------------------------------------


@dataclasses.dataclass
class FloodCounts:
    requests: int = 0
    connections: int = 0  # slowloris: connections opened (most are never answered)
    answers: Counter[str] = dataclasses.field(default_factory=Counter)

    def saw(self, status: int | str, code: str = "") -> None:
        self.requests += 1
        self.answers[f"{status} {code}".strip()] += 1


async def _hammer(concurrency: int, stop: asyncio.Event, one: Any) -> None:
    async def loop() -> None:
        while not stop.is_set():
            await one()

    await asyncio.gather(*(loop() for _ in range(concurrency)))


def _flood(kind: str, url: str, workdir: str, concurrency: int, slow_clients: int,
           conn: Any) -> None:
    async def main() -> FloodCounts:
        import aiohttp

        from edgekeeper.device import identity
        from edgekeeper.protocol.envelope import CONTENT_TYPE, sign_request
        from edgekeeper.protocol.keys import CloudPublicKeys, DeviceKeys, b64e

        from cloudkit import Device, make_event

        cfg = _config(Path(workdir))
        enrollment = identity.load_enrollment(cfg.device.state_dir, cfg.device.id)
        cloud_pk: CloudPublicKeys = enrollment.cloud
        honest = identity.load_keys(cfg.device.state_dir)
        counts = FloodCounts()
        stop = asyncio.Event()
        rng = random.Random(7)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                        timeout=aiohttp.ClientTimeout(total=120))

        async def send(method: str, path: str, **kw: Any) -> None:
            try:
                async with session.request(method, url + path, **kw) as resp:
                    body = await resp.read()
                    code = ""
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        code = json.loads(body)["error"]["code"]
                    counts.saw(resp.status, code)
            except (aiohttp.ClientError, TimeoutError) as err:
                counts.saw(type(err).__name__)

        envelopes: list[bytes] = []
        if kind == "a":
            ghost = Device("ghost", DeviceKeys.generate(), cloud_pk)
            envelopes = [ghost.seal(make_event("ghost", s)) for s in range(1, 65)]
        elif kind == "d":
            forger = Device(cfg.device.id, DeviceKeys.generate(), cloud_pk)
            real = Device(cfg.device.id, honest, cloud_pk)
            for s in range(1, 33):  # seqs far above the honest device's own
                envelopes.append(forger.seal(make_event(cfg.device.id, 10_000 + s)))
                sealed = bytearray(real.seal(make_event(cfg.device.id, 20_000 + s)))
                sealed[rng.randrange(len(sealed) // 2, len(sealed))] ^= 0x01
                envelopes.append(bytes(sealed))
        query = "cursor=0&wait=30&limit=20"
        replayed = sign_request(honest, device_id=cfg.device.id, method="GET",
                                path="/v1/results", query=query, timestamp=time.time())

        async def upload() -> None:
            await send("POST", "/v1/events", data=rng.choice(envelopes),
                       headers={"Content-Type": CONTENT_TYPE})

        async def replay() -> None:
            await send("GET", f"/v1/results?{query}", headers=replayed)

        async def guess() -> None:
            other = DeviceKeys.generate()
            await send("POST", "/v1/enroll", json={
                "token": b64e(os.urandom(24)), "device_id": f"guess-{rng.randrange(10**9)}",
                "sign_pk": b64e(other.sign_pk), "box_pk": b64e(other.box_pk)})

        host, port = url.removeprefix("http://").rsplit(":", 1)
        head = (f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: 60000\r\n\r\n").encode()

        async def slow_client() -> None:
            await asyncio.sleep(rng.random())  # spread the trickles over the second
            while not stop.is_set():
                try:
                    reader, writer = await asyncio.open_connection(host, int(port))
                except OSError as err:
                    counts.saw(type(err).__name__)
                    await asyncio.sleep(0.5)
                    continue
                counts.connections += 1
                answer = asyncio.ensure_future(reader.read(4096))
                try:
                    writer.write(head)
                    while not stop.is_set() and not answer.done():
                        writer.write(b"x")
                        await writer.drain()
                        await asyncio.wait([answer], timeout=1.0)
                    if answer.done():
                        line = answer.result().split(b"\r\n", 1)[0].split()
                        counts.saw(int(line[1]) if len(line) > 1 else "closed")
                except OSError as err:
                    counts.saw(type(err).__name__)
                finally:
                    answer.cancel()
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()

        jobs = {"a": lambda: _hammer(concurrency, stop, upload),
                "b": lambda: _hammer(concurrency, stop, replay),
                "c": lambda: asyncio.gather(*(slow_client() for _ in range(slow_clients))),
                "d": lambda: _hammer(concurrency, stop, upload),
                "e": lambda: _hammer(concurrency, stop, guess)}
        try:
            flooding = asyncio.ensure_future(jobs[kind]())
            conn.send("flooding")
            await _until_parent_goes_or(conn, "stop")
            stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(flooding), 35.0)
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flooding
        finally:
            await session.close()
        return counts

    counts = asyncio.run(main())
    conn.send({"requests": counts.requests, "connections": counts.connections,
               "answers": dict(counts.answers.most_common())})


async def _until_parent_goes_or(conn: Any, word: str) -> None:
    with contextlib.suppress(EOFError, OSError):
        while await asyncio.to_thread(conn.recv) != word:
            pass


# --- the honest device (this process) --------------------------------------------------------


def _frame() -> bytes:
    import cv2

    img = np.random.default_rng(3).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (9, 9), 3)  # camera-like, not noise: ~40 KB
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return bytes(buf)


def _run_wait_s(pid: int) -> float:
    """Seconds the process's main thread (the ingest's event loop) has spent runnable but
    waiting for a CPU, from /proc/PID/schedstat (ns)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)) * 1000, 1),
            "p99": round(float(np.percentile(values, 99)) * 1000, 1)}


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from edgekeeper import compat
    from edgekeeper.device import identity
    from edgekeeper.device.uplink import DeviceLink, Verdict
    from edgekeeper.protocol.messages import EventBody

    ctx = mp.get_context("spawn")
    cfg = _config(workdir)
    procs: list[Any] = []
    pipes: list[Any] = []

    def start(target: Any, *a: Any) -> Any:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=target, args=(*a, theirs), daemon=True)
        proc.start()
        theirs.close()
        procs.append(proc)
        pipes.append(mine)
        return mine

    phases: list[dict[str, Any]] = []
    pids: dict[str, int] = {"device": os.getpid()}
    try:
        ingest = start(_ingest, str(workdir))
        pids["ingest"] = procs[-1].pid
        url, token = await asyncio.to_thread(ingest.recv)
        await identity.enroll(url, token, device_id=cfg.device.id,
                              state_dir=cfg.device.state_dir)
        worker = start(_worker, str(workdir))
        pids["worker"] = procs[-1].pid
        await asyncio.to_thread(worker.recv)

        device_cfg = dataclasses.replace(cfg, uplink=dataclasses.replace(cfg.uplink,
                                                                         cloud_url=url))
        async with await DeviceLink.open(device_cfg) as link:
            captured: dict[int, float] = {}
            accepted: dict[int, float] = {}
            arrived: dict[int, float] = {}
            expected: set[int] = set()
            all_in = asyncio.Event()
            refusals: Counter[str] = Counter()  # the honest uploads' non-2xx answers, by code
            poll_refusals: Counter[str] = Counter()  # its results long-polls' failures

            async def on_result(doc: dict[str, Any]) -> None:
                arrived.setdefault(int(doc["seq"]), time.time())
                all_in.set()  # the phase looks whether all of its own are in

            link.actions.actions.append(("bench-clock", on_result))
            # The uplink's own attempt, timed: the 202 is the "accepted" instant (a bench hook,
            # the uplink has no callback for it).
            attempt = link.uplink._attempt

            async def timed_attempt(row: Any) -> Any:
                result = await attempt(row)
                if result.verdict is Verdict.DONE:
                    accepted.setdefault(row.seq, time.time())
                else:
                    refusals[result.code] += 1
                return result

            link.uplink._attempt = timed_attempt  # type: ignore[method-assign]
            assert link.results is not None
            poll_once = link.results.poll_once

            async def counted_poll(*, wait: float = 0.0) -> Any:
                try:
                    return await poll_once(wait=wait)
                except Exception as err:
                    poll_refusals[getattr(err, "code", "") or type(err).__name__] += 1
                    raise

            link.results.poll_once = counted_poll  # type: ignore[method-assign]
            jpeg = _frame()

            async def phase(name: str, flood: str | None) -> dict[str, Any]:
                flooder = None
                pids.pop("flooder", None)
                if flood is not None:
                    flooder = start(_flood, flood, url, str(workdir), args.concurrency,
                                    args.slow_clients)
                    pids["flooder"] = procs[-1].pid
                    await asyncio.to_thread(flooder.recv)
                    await asyncio.sleep(args.ramp)  # let it reach its full rate
                refusals.clear()
                poll_refusals.clear()
                seqs = []
                expected.clear()
                cpu_before = {n: _cpu_s(pid) for n, pid in pids.items()}
                wait_before = _run_wait_s(pids["ingest"])
                t_start = time.time()
                for _ in range(args.events):
                    seq = await link.sink.next_seq()
                    t0 = time.time()
                    expected.add(seq)
                    seqs.append(seq)
                    await link.sink.deliver(EventBody(
                        device_id=cfg.device.id, seq=seq, captured_at=t0,
                        meta={"label": "person", "scores": {"person": 0.9}}, frames=(jpeg,)))
                    captured[seq] = t0
                    await asyncio.sleep(max(0.0, 1.0 / args.rate - (time.time() - t0)))
                with contextlib.suppress(TimeoutError):
                    async with compat.timeout(args.phase_timeout):
                        while not expected <= arrived.keys():
                            all_in.clear()
                            await all_in.wait()
                elapsed = time.time() - t_start
                # CPU seconds per wall second of each process during the phase (2 cores: 2.0
                # is the whole machine): shows which process the flood saturates.
                cpu = {n: round((_cpu_s(pid) - cpu_before[n]) / elapsed, 2)
                       for n, pid in pids.items()}
                # The ingest loop's share of the phase spent waiting for a CPU: with its CPU
                # share, how close to saturated it was (running + waiting near 1.0 = busy).
                cpu["ingest_waiting_for_cpu"] = round(
                    (_run_wait_s(pids["ingest"]) - wait_before) / elapsed, 2)
                flood_counts = None
                if flooder is not None:
                    flooder.send("stop")
                    flood_counts = await asyncio.to_thread(flooder.recv)
                    flood_counts["per_s"] = round(flood_counts["requests"] / elapsed, 1)
                acc = [accepted[s] - captured[s] for s in seqs if s in accepted]
                res = [arrived[s] - captured[s] for s in seqs if s in arrived]
                out: dict[str, Any] = {
                    "phase": name, "flood": FLOODS.get(flood or "", "none"),
                    "events": len(seqs), "accepted": len(acc), "results": len(res),
                    "device_upload_refusals": dict(refusals),
                    "device_poll_refusals": dict(poll_refusals),
                    "cpu_share": cpu,
                    # a missing event counts as the whole phase: a lower bound on its time
                    "_acc": acc + [elapsed] * (len(seqs) - len(acc)),
                    "_res": res + [elapsed] * (len(seqs) - len(res)),
                }
                out["accepted_ms"], out["result_ms"] = _pct(out["_acc"]), _pct(out["_res"])
                if flood_counts is not None:
                    out["flood_requests"] = flood_counts
                print(json.dumps({k: v for k, v in out.items() if not k.startswith("_")}),
                      file=sys.stderr, flush=True)
                # whatever the flood left in flight settles before the next phase
                await asyncio.sleep(1.0)
                return out

            stop_link = asyncio.Event()
            async with compat.TaskGroup() as tg:
                tg.create_task(link.run(stop_link))
                try:
                    await phase("warmup", None)
                    phases.append(await phase("baseline", None))
                    for flood in args.floods:
                        phases.append(await phase(flood, flood))
                    phases.append(await phase("baseline-again", None))
                finally:
                    stop_link.set()
    finally:
        for pipe in pipes:
            pipe.close()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    base = [p for p in phases if p["phase"].startswith("baseline")]
    base_acc = float(np.percentile([v for p in base for v in p["_acc"]], 50))
    base_res = float(np.percentile([v for p in base for v in p["_res"]], 50))
    for p in phases:
        partial = p["results"] < p["events"] or p["accepted"] < p["events"]
        prefix = ">=" if partial else ""
        p["ratio_p50"] = {
            "accepted": f"{prefix}{float(np.percentile(p['_acc'], 50)) / base_acc:.2f}",
            "result": f"{prefix}{float(np.percentile(p['_res'], 50)) / base_res:.2f}"}
        del p["_acc"], p["_res"]
    return {
        "bench": "floods",
        "events_per_phase": args.events, "rate_per_s": args.rate,
        "concurrency": args.concurrency, "slow_clients": args.slow_clients,
        "phases": phases,
        "machine": (f"{platform.machine()}, {os.cpu_count()} CPUs, "
                    f"Python {platform.python_version()}"),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=16)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument("--floods", type=lambda s: [f for f in s.split(",") if f], default="a,b,c,d,e")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--slow-clients", type=int, default=200)
    p.add_argument("--ramp", type=float, default=2.0, help="seconds of flood before measuring")
    p.add_argument("--phase-timeout", type=float, default=60.0)
    args = p.parse_args()
    unknown = [f for f in args.floods if f not in FLOODS]
    if unknown:
        p.error(f"--floods {','.join(unknown)}: expected letters among {','.join(FLOODS)}")
    from edgekeeper import log

    log.configure("error", "json")
    with tempfile.TemporaryDirectory(prefix="bench-floods-") as tmp:
        out = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
