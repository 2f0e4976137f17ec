"""Scale-out ingest: `cloud serve --workers 2` against `--workers 1`, on the Redis queue.

    python bench/bench_ingest_scale.py [--events 1500] [--kb 50] [--connections 32]
                                       [--rounds 5] [--devices 64]

Two real `edgekeeper cloud serve` commands run side by side on 127.0.0.1 (one process; a parent
with two children sharing one port through SO_REUSEPORT), both on one redis-server of our own
(tests/servers.py: ``appendonly yes``, ``appendfsync always``, as the queue requires) and one
SQLite store (the device registry, read once and cached: no store access per event). They take
turns, interleaved and alternating which goes first, so background load hits both alike.

The load generator is wrk (Debian's ``wrk`` package), one thread, ``--connections`` keep-alive
connections, with a Lua script (written next to the envelopes) that cycles through envelopes
sealed before the round: each request is a new (device, seq), so each one is a real durable
enqueue answered 202. wrk costs ~1/10 of what Python aiohttp clients cost per request, so less
of the two cores goes to the load. SO_REUSEPORT spreads *connections* over the children (a hash
of the 4-tuple), so with keep-alive the split is per connection, as with real devices.

Prints one JSON line: events/s of each (median of rounds), the ratio 2 processes / 1 (median of
the per-round ratios; target 1.8), CPU time per event of the ingest processes, redis-server and
wrk (from /proc and getrusage: all their threads), the events/s one core of ingest serves, and the
fleet each serves at one event per device per minute; also Redis memory per queued event and
Redis commands per event (INFO, around each round). Between rounds the stream is trimmed and
the dedupe keys dropped, so Redis memory stays at one round's events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgekeeper.cloud.ingest import PROCESS_HEADER
from edgekeeper.protocol.envelope import CONTENT_TYPE

from _common import enrolled_in_sqlite

TICK = os.sysconf("SC_CLK_TCK")
PREFIX = "ekbench"

WRK_SCRIPT = """
-- Cycles through the envelopes sealed for this round (EK_BODIES, lengths in EK_LENGTHS);
-- stops after EK_TOTAL answers and prints one JSON line.
-- wrk's own clock runs until its -d deadline even after thread:stop(), so the script times
-- the answers itself (CLOCK_MONOTONIC through LuaJIT's ffi) and leaves a file when done, on
-- which the bench stops wrk with SIGINT.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } ek_timespec;
int clock_gettime(int clk_id, ek_timespec *tp);
]]
local ts = ffi.new("ek_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local requests_ = {}
local n, i = 0, 0
local total = tonumber(os.getenv("EK_TOTAL"))
local started = nil
ok, other, elapsed = 0, 0, 0

function init(args)
  local f = assert(io.open(os.getenv("EK_BODIES"), "rb"))
  local data = f:read("*a")
  f:close()
  local pos = 1
  for line in io.lines(os.getenv("EK_LENGTHS")) do
    local len = tonumber(line)
    n = n + 1
    requests_[n] = wrk.format("POST", "/v1/events", {["Content-Type"] = os.getenv("EK_TYPE")},
                              data:sub(pos, pos + len - 1))
    pos = pos + len
  end
end

function request()
  if started == nil then started = now() end
  if i < n then i = i + 1 end  -- the file holds EK_TOTAL plus one per connection
  return requests_[i]
end

function response(status, headers, body)
  if status == 202 then ok = ok + 1 else other = other + 1 end
  if ok + other == total then
    elapsed = now() - started
    io.open(os.getenv("EK_DONE"), "w"):close()
    wrk.thread:stop()
  end
end

local threads = {}
function setup(thread) table.insert(threads, thread) end

function done(summary, latency, requests)
  local a, b, e = 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("ok"); b = b + t:get("other"); e = math.max(e, t:get("elapsed"))
  end
  io.write(string.format('{"ok": %d, "other": %d, "elapsed_s": %.6f}\\n', a, b, e))
end
"""


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` (all their threads), from /proc."""
    out = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out += (int(fields[11]) + int(fields[12])) / TICK
    return out


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class Server:
    """One `edgekeeper cloud serve --workers N` on its own port."""

    def __init__(self, workers: int, config: Path, port: int) -> None:
        self.workers = workers
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgekeeper.cli", "--config", str(config), "cloud", "serve",
             "--port", str(port), "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def pids(self) -> list[int]:
        """The processes doing the ingest's work: itself, and its children if any."""
        return [self.proc.pid, *(children(self.proc.pid) if self.workers > 1 else [])]

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until every process answers /healthz (its pid, in a header, says which did)."""
        want = self.workers
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < want:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.base} did not start: "
                                 f"{self.proc.communicate()[1].decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=10) as resp:
                    seen.add(int(resp.headers[PROCESS_HEADER]))
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def free_port() -> int:
    from servers import free_port as _free

    return _free()


def seal_round(devices: list[Any], cloud: Any, start_seq: int, n: int, frame: bytes,
               out: Path) -> None:
    """``n`` envelopes, each a new (device, seq), to ``out`` (bytes) and ``out``.len."""
    from edgekeeper.protocol.envelope import seal_event
    from edgekeeper.protocol.messages import EventBody

    now = time.time()
    with open(out, "wb") as data, open(f"{out}.len", "w") as lengths:
        for i in range(n):
            device_id, dk = devices[i % len(devices)]
            body = EventBody(device_id=device_id, seq=start_seq + i // len(devices),
                             captured_at=now, meta={"label": "person",
                                                    "scores": {"person": 0.9}},
                             frames=(frame,))
            env = seal_event(body, device=dk, cloud_box_pk=cloud.box_pk, sent_at=now,
                             model_version="person@1.0.0")
            data.write(env)
            lengths.write(f"{len(env)}\n")


def run_wrk(url: str, script: Path, bodies: Path, total: int, connections: int
            ) -> tuple[dict[str, Any], float]:
    """wrk until ``total`` answers: its JSON line, and its CPU seconds (getrusage)."""
    flag = bodies.with_suffix(".done")
    flag.unlink(missing_ok=True)
    env = {**os.environ, "EK_BODIES": str(bodies), "EK_LENGTHS": f"{bodies}.len",
           "EK_TOTAL": str(total), "EK_TYPE": CONTENT_TYPE, "EK_DONE": str(flag)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped
    proc = subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", "-d120s", "--timeout", "30s", "-s", str(script),
         url], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while proc.poll() is None and not flag.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # wrk then prints its summary and calls done()
    out, err = proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"wrk failed ({proc.returncode}): {out.decode()[-1500:]} "
                         f"{err.decode()[-500:]}")
    return json.loads(lines[-1]), cpu


def redis_info(redis_url: str) -> tuple[int, int]:
    """(used_memory bytes, total commands processed) of the Redis server."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return (int(client.info("memory")["used_memory"]),
                int(client.info("stats")["total_commands_processed"]))
    finally:
        client.close()


def reset_queue(redis_url: str) -> None:
    """Empty the stream (its consumer group stays) and forget the dedupe keys."""
    import redis

    tag = "{" + PREFIX + "}"
    client = redis.Redis.from_url(redis_url)
    try:
        if client.exists(f"{tag}:events"):
            client.xtrim(f"{tag}:events", maxlen=0)
        client.delete(f"{tag}:seen", f"{tag}:seen:expiry", f"{tag}:due", f"{tag}:holder")
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1500, help="events per round and server")
    ap.add_argument("--kb", type=float, default=50.0, help="JPEG bytes per event (thousands)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--devices", type=int, default=64)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    from cloudkit import jpeg
    from servers import start_redis

    load_before = os.getloadavg()
    redis = start_redis()
    redis_pid = redis.proc.pid if redis.proc is not None else 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-scale-"))
    servers: dict[int, Server] = {}
    try:
        data_dir = tmp / "cloud"
        devices, cloud = asyncio.run(enrolled_in_sqlite(data_dir, args.devices))
        config = tmp / "cloud.toml"
        config.write_text(
            f'[cloud]\ndata_dir = "{data_dir}"\nqueue_backend = "redis"\n'
            f'store_backend = "sqlite"\nredis_url = "{redis.url}"\nredis_prefix = "{PREFIX}"\n'
            "rate_per_second = 1000000\nrate_burst = 1000000\nmax_inflight = 10000\n"
            "[log]\nlevel = \"warning\"\n")
        script = tmp / "cycle.lua"
        script.write_text(WRK_SCRIPT)
        for n in (1, 2):  # one after the other: Python starting is heavy on a busy machine
            servers[n] = Server(n, config, free_port())
            servers[n].wait_ready()
        frame = jpeg(int(args.kb * 1000))
        bodies = tmp / "bodies"
        rates: dict[int, list[float]] = {1: [], 2: []}
        cpu: dict[str, dict[int, list[float]]] = {k: {1: [], 2: []}
                                                  for k in ("ingest", "redis", "wrk")}
        ratios: list[float] = []
        redis_bytes: list[float] = []
        redis_commands: list[float] = []
        seq = 1
        env_bytes = 0
        warm = min(200, args.events)
        for n in (1, 2):  # warm-up: connections, caches, the registry
            seal_round(devices, cloud, seq, warm + args.connections, frame, bodies)
            seq += (warm + args.connections) // args.devices + 1
            run_wrk(f"{servers[n].base}/v1/events", script, bodies, warm, args.connections)
        for r in range(args.rounds):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                reset_queue(redis.url)
                seal_round(devices, cloud, seq, args.events + args.connections, frame, bodies)
                env_bytes = bodies.stat().st_size // (args.events + args.connections)
                seq += (args.events + args.connections) // args.devices + 1
                pids = servers[n].pids()
                mem_empty, commands = redis_info(redis.url)
                before = cpu_s(pids), cpu_s([redis_pid])
                result, wrk_cpu = run_wrk(f"{servers[n].base}/v1/events", script, bodies,
                                          args.events, args.connections)
                after = cpu_s(pids), cpu_s([redis_pid])
                mem_full, commands_after = redis_info(redis.url)
                # What one queued event holds in Redis (stream entry + dedupe keys), and the
                # commands the ingest sent per event (the queue's Lua script calls and pings).
                redis_bytes.append((mem_full - mem_empty) / result["ok"])
                redis_commands.append((commands_after - commands - 2) / result["ok"])
                if result["other"] or result["ok"] < args.events:
                    raise SystemExit(f"{n} process(es): not every answer was 202: {result}")
                rates[n].append(result["ok"] / result["elapsed_s"])
                cpu["ingest"][n].append((after[0] - before[0]) / result["ok"])
                cpu["redis"][n].append((after[1] - before[1]) / result["ok"])
                cpu["wrk"][n].append(wrk_cpu / result["ok"])
                print(f"round {r + 1}, {n} process(es): {rates[n][-1]:.0f} events/s, ingest "
                      f"{cpu['ingest'][n][-1] * 1e6:.0f} us CPU/event", file=sys.stderr)
            ratios.append(rates[2][-1] / rates[1][-1])
    finally:
        for server in servers.values():
            server.stop()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    figures: dict[str, Any] = {"bench": "ingest_scale", "event_bytes": env_bytes,
                               "events_per_round": args.events,
                               "connections": args.connections, "rounds": args.rounds}
    for n in (1, 2):
        ingest_us = med(cpu["ingest"][n]) * 1e6
        figures[f"p{n}"] = {
            "events_per_s": round(med(rates[n]), 1),
            "ingest_cpu_us_per_event": round(ingest_us),
            "redis_cpu_us_per_event": round(med(cpu["redis"][n]) * 1e6),
            "wrk_cpu_us_per_event": round(med(cpu["wrk"][n]) * 1e6),
            "events_per_s_per_ingest_core": round(1e6 / ingest_us, 1),
            "fleet_at_1_event_per_min": round(med(rates[n]) * 60),
            "fleet_per_ingest_core_at_1_event_per_min": round(60e6 / ingest_us),
        }
    figures.update({
        "redis_bytes_per_queued_event": round(med(redis_bytes)),
        "redis_commands_per_event": round(med(redis_commands), 2),
        "ratio_2_over_1": round(med(ratios), 3),
        "ratios": [round(x, 3) for x in ratios],
        "target_ratio": 1.8,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    })
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
