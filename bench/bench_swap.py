"""Hot swap under a steady replay: how long ``Gate.swap`` takes and how many frames it drops.

Frames of vtest.avi (or the bundled sample) are submitted to the person gate at a steady
``--fps``, two in flight as the device loop's video stage does, for ``--seconds``. The first half
runs without swaps (the baseline, same run); in the second half the gate is swapped every
``--every`` seconds between the int8 and the float person model (each a full load of a real
manifest in a new thread while the old model keeps answering). Reported: swap time p50/p99,
frames in and frames answered (dropped = the difference, expected 0), and the inference latency
p50/p99 of the swapping half against the baseline half (``latency_p99_vs_baseline``).

Also timed: one whole update through the updater (device/update/): release.json fetched and
verified, files downloaded from a release server on 127.0.0.1, the folder verified, the shadow
evaluation on the bundled sample, install, pointer and swap (``update_seconds``).

    python bench/bench_swap.py [--seconds 20] [--fps 10] [--every 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from nacl.signing import SigningKey

from edgekeeper import config as config_mod
from edgekeeper.device.gate import Gate

from _common import ROOT, decode, emit, percentiles, video_path

sys.path.insert(0, str(ROOT))


async def steady(gate: Gate, frames: list[np.ndarray], fps: float, seconds: float,
                 every: float, manifests: list[Path]) -> dict[str, Any]:
    sent = answered = 0
    lat: dict[bool, list[float]] = {False: [], True: []}
    swaps: list[float] = []
    start = time.monotonic()
    half = start + seconds / 2
    stop = asyncio.Event()

    async def swapper() -> None:
        await asyncio.sleep(max(0.0, half - time.monotonic()))
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            await gate.swap(manifests[i % 2])
            swaps.append((time.perf_counter() - t0) * 1000.0)
            i += 1
            await asyncio.sleep(every)

    task = asyncio.create_task(swapper())
    pending: list[tuple[bool, asyncio.Future[Any]]] = []
    next_t = start
    while time.monotonic() < start + seconds:
        swapping = time.monotonic() >= half
        pending.append((swapping, gate.submit(frames[sent % len(frames)])))
        sent += 1
        if len(pending) >= 2:
            phase, fut = pending.pop(0)
            out = await fut
            lat[phase].append(out.latency_ms)
            answered += 1
        next_t += 1.0 / fps
        await asyncio.sleep(max(0.0, next_t - time.monotonic()))
    for phase, fut in pending:
        out = await fut
        lat[phase].append(out.latency_ms)
        answered += 1
    stop.set()
    await task
    base, during = percentiles(lat[False]), percentiles(lat[True])
    return {
        "frames_in": sent, "frames_answered": answered, "frames_dropped": sent - answered,
        "swaps": len(swaps), "swap_ms": percentiles(swaps) if swaps else None,
        "latency_ms_baseline": base, "latency_ms_swapping": during,
        "latency_p50_vs_baseline": round(during["p50"] / base["p50"], 3),
        "latency_p99_vs_baseline": round(during["p99"] / base["p99"], 3),
    }


async def one_update(frames_dir: Path) -> float:
    """Seconds for one full update of the person gate from a local release server."""
    from edgekeeper.config import UpdatesSection
    from edgekeeper.device.manifest import load_manifest
    from edgekeeper.device.update.fetch import ReleaseFetcher
    from edgekeeper.device.update.store import ModelStore
    from edgekeeper.device.update.updater import Updater
    from edgekeeper.protocol.keys import DeviceKeys
    from tests.update_kit import ReleaseServer, build_release

    key = SigningKey.generate()
    keys = DeviceKeys.generate()
    server = ReleaseServer(keys.public("bench"))
    await server.start()
    server.publish("person", build_release(frames_dir / "r", "person", "1.2.0", key))
    builtin = config_mod.resolve_model("builtin:person")
    store = ModelStore(frames_dir / "state", "person", release_pk=bytes(key.verify_key),
                       builtin_manifest=builtin, builtin_version=load_manifest(builtin).version)
    active = store.recover()
    gate = Gate("vision", 1)
    await gate.load(active.manifest)
    try:
        async with ReleaseFetcher(server.url, keys=keys, device_id="bench") as fetcher:
            updater = Updater(store=store, gate=gate, fetcher=fetcher, active=active,
                              settings=UpdatesSection(), thresholds={"person": 0.7})
            t0 = time.perf_counter()
            outcome = await updater.check_once()
            took = time.perf_counter() - t0
            assert outcome == "swapped", outcome
    finally:
        gate.close()
        await server.stop()
    return took


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=1.0)
    args = ap.parse_args()
    frames = decode(video_path(), 100)
    manifests = [config_mod.resolve_model("builtin:person", v) for v in ("float", "int8")]
    gate = Gate("vision", config_mod.Config().gate.num_threads)
    await gate.load(manifests[1])
    try:
        result = await steady(gate, frames, args.fps, args.seconds, args.every, manifests)
    finally:
        gate.close()
    with tempfile.TemporaryDirectory() as tmp:
        result["update_seconds"] = round(await one_update(Path(tmp)), 3)
    emit("bench_swap", result)


if __name__ == "__main__":
    asyncio.run(main())
