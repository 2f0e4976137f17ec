"""``edgekeeper demo``: the whole loop on embedded defaults, in one process, on 127.0.0.1.

1. the cloud: ingest API on 127.0.0.1 (SQLite queue and store in a temporary folder) and a
   worker with the configured reasoner (Claude when ANTHROPIC_API_KEY is set, else the offline
   teacher; every result names the one that produced it);
2. a demo device: keys generated, enrolled with a one-time token, the cloud's keys pinned;
3. the bundled sample recording replayed through the device loop into the durable outbox, the
   uplink sealing and sending each event, the worker reasoning about it, and the result coming
   back to the device, decrypted, verified and handed to its actions (a JSONL log);
4. a summary: frames, triggers, bytes that left the device against streaming everything, results.

Every part is the real one (the same classes `edgekeeper run`, `cloud serve` and `cloud worker`
use); only their wiring into one process is the demo's. It runs under edgekeeper.runtime: Ctrl-C
stops waiting for results and shuts everything down in order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgekeeper import compat, runtime
from edgekeeper.config import MODELS_DIR, Config
from edgekeeper.errors import EdgekeeperError, FatalError
from edgekeeper.log import get_logger

log = get_logger(__name__)

SAMPLE = MODELS_DIR / "samples" / "street"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole loop (cloud, device, link, reasoning) on 127.0.0.1",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("recording", nargs="?", type=Path, default=SAMPLE,
                   help="recording to replay (default: the bundled sample)")
    p.add_argument("--workdir", type=Path,
                   help="keep the demo's state here (default: a temporary folder, removed after)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="give up waiting for results after this many seconds")
    p.add_argument("--verbose", action="store_true",
                   help="show every log line (decisions, uploads, results) as well")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    if not args.verbose and args.log_level is None:
        # The demo narrates what happens; the log lines would bury it.
        from edgekeeper import log as log_mod

        log_mod.configure("warning", config.log.format)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgekeeper-demo-"))
    try:
        summary = runtime.run(
            lambda stop: run_demo(config, workdir, args.recording, timeout=args.timeout,
                                  echo=True, stop=stop),
            name="demo", drain_seconds=args.drain_seconds,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(summary)
    if summary["results_received"] != summary["events"]:
        raise EdgekeeperError(
            f"only {summary['results_received']} of {summary['events']} results arrived",
            fix="rerun with a larger --timeout, or with --workdir DIR to inspect the state",
        )
    return 0


def demo_configs(config: Config, workdir: Path) -> tuple[Config, Config]:
    """The cloud's and the device's configs: the user's, rooted in ``workdir``."""
    cloud = dataclasses.replace(
        config,
        cloud=dataclasses.replace(config.cloud, data_dir=str(workdir / "cloud"),
                                  host="127.0.0.1", port=0),
    )
    device = dataclasses.replace(
        config,
        device=dataclasses.replace(config.device, id="demo-device",
                                   state_dir=workdir / "device"),
        outbox=dataclasses.replace(config.outbox, path=""),
        results=dataclasses.replace(config.results, jsonl="results.jsonl", command=(),
                                    post_url="", poll_wait_seconds=2.0),
        uplink=dataclasses.replace(config.uplink, cloud_url=""),
    )
    return cloud, device


async def run_demo(
    config: Config, workdir: Path, recording: Path, *, timeout: float = 120.0, echo: bool = False,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    from edgekeeper.cloud.enroll import issue_token
    from edgekeeper.cloud.ingest import IngestServer, create_app
    from edgekeeper.cloud.worker import build_worker
    from edgekeeper.device import identity
    from edgekeeper.device.replay import replay_recording
    from edgekeeper.device.uplink import DeviceLink

    stop = asyncio.Event() if stop is None else stop
    cloud_cfg, device_cfg = demo_configs(config, workdir)
    say = print if echo else (lambda *_a, **_k: None)
    received: list[dict[str, Any]] = []
    all_in = asyncio.Event()
    expected: list[int] = []

    async with contextlib.AsyncExitStack() as stack:
        # -- the cloud ---------------------------------------------------------------------
        server = IngestServer(create_app(cloud_cfg.cloud, cloud_cfg.cloud_data_dir))
        url = await server.start()
        stack.push_async_callback(server.stop)
        state = server.state
        worker = build_worker(cloud_cfg, queue=state.queue, store=state.store, keys=state.keys,
                              stack=stack, poll_s=0.1)
        reasoner = worker.reasoner
        say(f"cloud     ingest on {url}, reasoner: {reasoner.name}")

        # -- the device: enroll with a one-time token, pin the cloud's keys ----------------
        token = await issue_token(state.store, ttl_s=600.0, now=time.time())
        enrollment = await identity.enroll(url, token, device_id=device_cfg.device.id,
                                           state_dir=device_cfg.device.state_dir)
        say(f"device    {enrollment.device_id} enrolled; cloud keys pinned")
        link = await stack.enter_async_context(await DeviceLink.open(device_cfg))

        async def show(doc: dict[str, Any]) -> None:
            received.append(doc)
            say(f"result    seq {doc.get('seq')}: {doc.get('label')} "
                f"(confidence {doc.get('confidence')}, by {doc.get('reasoner')}"
                f"{', provisional' if doc.get('provisional') else ''}): {doc.get('summary')}")
            if expected and len(received) >= expected[0]:
                all_in.set()

        link.actions.actions.append(("demo-print", show))

        stop_link, stop_worker = asyncio.Event(), asyncio.Event()
        stopped: list[FatalError] = []

        async def run_worker() -> None:
            # A worker that stops for good (the provider refuses the key) ends the wait for
            # results at once, and the demo then fails with its fix. It does not cancel the
            # replay half-way: the recording is short, and a replay cut mid-stream can leave
            # a reader thread behind that keeps asyncio.run from returning.
            try:
                await worker.run(stop=stop_worker)
            except FatalError as err:
                stopped.append(err)
                all_in.set()

        async with compat.TaskGroup() as tg:
            tg.create_task(run_worker(), name="demo-worker")
            tg.create_task(link.run(stop_link), name="demo-link")
            say(f"device    replaying {recording} through the device loop")
            try:
                result = await replay_recording(recording, device_cfg,
                                                events_dir=workdir / "events", progress=False,
                                                sink=link.sink)
                expected.append(result.stats.events)
                say(f"device    {result.stats.events} events captured and committed to the "
                    "outbox; waiting for results")
                if len(received) >= result.stats.events:
                    all_in.set()
                # A stopped worker has set all_in: no wait then.
                if not await runtime.sleep(stop, timeout, wake=all_in) and not all_in.is_set():
                    log.warning("demo.timed_out", expected=result.stats.events,
                                received=len(received))
            finally:
                stop_link.set()
                stop_worker.set()
    if stopped:
        raise stopped[0]
    summary = result.summary()
    return {
        "recording": str(recording),
        "reasoner": reasoner.name,
        "frames": summary["frames"],
        "audio_windows": summary["audio_windows"],
        "triggers": summary["triggers"],
        "events": summary["events"],
        "bytes_sent": summary["bytes_sent"],
        "bytes_streaming_everything": summary["bytes_streaming_everything"],
        "uploaded": link.uplink.stats.delivered,
        "results_received": len(received),
        "results": received,
    }


def print_summary(s: dict[str, Any]) -> None:
    everything = s["bytes_streaming_everything"]
    ratio = s["bytes_sent"] / everything if everything else 0
    print()
    print("summary")
    print(f"  recording            {s['recording']}")
    print(f"  frames               {s['frames']} (+ {s['audio_windows']} audio windows)")
    print(f"  triggers             {s['triggers']}")
    print(f"  events sent          {s['events']}")
    print(f"  bytes off the device {s['bytes_sent']:,} vs streaming everything "
          f"{s['bytes_streaming_everything']:,} ({100 * ratio:.1f}%)")
    print(f"  events uploaded      {s['uploaded']} (sealed end to end)")
    print(f"  results received     {s['results_received']} (reasoner: {s['reasoner']})")

