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
import os
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
    p.add_argument("--learn", action="store_true",
                   help="then one learning round: retrain, signed release, the device swaps "
                        "to it, before/after compared (needs edgekeeper[train])")
    p.add_argument("--force-publish", action="store_true",
                   help="DEMO ONLY, with --learn: publish the candidate even if the round "
                        "refused it, to show the device side")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    if getattr(args, "learn", False):
        return cmd_learn(args, config)
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



# ------------------------------------------------------------------- demo --learn


def cmd_learn(args: argparse.Namespace, config: Config) -> int:
    """``edgekeeper demo --learn``: the demo, then one round of the learning loop on its data."""
    from edgekeeper.cloud.training.retrain import require_tensorflow

    require_tensorflow()  # one line: pip install 'edgekeeper[train]'
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ notices bury the story
    if not args.verbose and args.log_level is None:
        from edgekeeper import log as log_mod

        log_mod.configure("warning", config.log.format)
    # Kept afterwards: the summary names the retrain and compare reports inside it.
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edgekeeper-learn-"))
    summary = runtime.run(
        lambda stop: run_learn(config, workdir, args.recording, timeout=args.timeout,
                               force_publish=args.force_publish, stop=stop),
        name="demo", drain_seconds=args.drain_seconds,
    )
    print_learn_summary(summary)
    return 0


async def run_learn(
    config: Config, workdir: Path, recording: Path, *, timeout: float = 120.0,
    force_publish: bool = False, stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Events and teacher labels (``run_demo``), then on the same cloud store: retrain the
    person gate, publish it as a signed canary release, let the device's updater fetch, verify,
    shadow-test and swap to it against the real ingest, and compare old and new on footage."""
    from edgekeeper.cloud.ingest import IngestServer, create_app
    from edgekeeper.cloud.retrain_cli import publish_candidate
    from edgekeeper.cloud.training.retrain import RetrainSettings, retrain
    from edgekeeper.protocol.release import Scope

    stop = asyncio.Event() if stop is None else stop
    print("step 1    the device sends events, the teacher labels them")
    first = await run_demo(config, workdir, recording, timeout=timeout, echo=True, stop=stop)
    cloud_cfg, device_cfg = demo_configs(config, workdir)
    out: dict[str, Any] = {"workdir": str(workdir), "events": first["events"],
                           "reasoner": first["reasoner"]}
    server = IngestServer(create_app(cloud_cfg.cloud, cloud_cfg.cloud_data_dir))
    url = await server.start()  # the same SQLite store, again on 127.0.0.1
    store = server.state.store
    try:
        examples = await store.examples(model="person", scope=Scope.parse("fleet"))
        usable = [e for e in examples if e.target is not None and e.weight > 0]
        out["examples"], out["usable"] = len(examples), len(usable)
        print(f"step 2    {len(examples)} training examples in the store, {len(usable)} usable "
              "(a target and weight > 0)")
        folder = cloud_cfg.cloud_data_dir / "candidates" / f"person-fleet-{int(time.time())}"
        await asyncio.to_thread(folder.parent.mkdir, parents=True, exist_ok=True)
        print("step 3    retraining the person gate's head (TensorFlow, about a minute)")
        result = await asyncio.to_thread(
            retrain, examples, RetrainSettings(model="person", current=MODELS_DIR / "person"),
            folder)
        out.update(accepted=result.accepted, reason=result.reason,
                   retrain_report=str(result.folder / "report.html"))
        print(f"          {'ACCEPTED' if result.accepted else 'NOT ACCEPTED'}: {result.reason}")
        if not result.accepted:
            if len(usable) < 50:
                print(f"          (only {len(usable)} usable examples: one short sample is too "
                      "little for a round to prove a better gate)")
            if not force_publish:
                print("          nothing is published; --force-publish (demo only) shows the "
                      "device side anyway")
                return out
            print("          --force-publish: publishing a candidate the round REFUSED "
                  "(demo only; cloud retrain --publish never does)")
        published = await publish_candidate(store, cloud_cfg, result.folder)
        out["release"] = f"{published.model}@{published.version} ({published.stage})"
        print(f"step 4    signed release {published.model}@{published.version} published, "
              f"stage {published.stage}; the demo device is a canary")
        await store.set_device_group(device_cfg.device.id, "demo", canary=True)
        out.update(await _device_update(device_cfg, url, store, published.version, timeout,
                                        stop))
        out.update(await _compare(device_cfg, recording, published.folder,
                                  server.state.keys.release_pk, workdir / "compare"))
    finally:
        await server.stop()
    return out


async def _device_update(device_cfg: Config, url: str, store: Any, version: str,
                         timeout: float, stop: asyncio.Event) -> dict[str, Any]:
    """The device's own Updates (what `edgekeeper run` runs) against the ingest at ``url``;
    what it did is read back from the cloud's store, as the operator sees it."""
    from edgekeeper.device.replay import open_gates
    from edgekeeper.device.update import Updates

    cfg = dataclasses.replace(
        device_cfg, uplink=dataclasses.replace(device_cfg.uplink, cloud_url=url),
        # The demo sends no frames after the swap: the trial passes at once (demo only).
        updates=dataclasses.replace(device_cfg.updates, trial_inferences=0))
    updates = await Updates.prepare(cfg)
    if updates is None:
        return {"device": "updates are off or the device is not enrolled"}
    final = ("trial_passed", "refused", "shadow_failed", "rolled_back")
    outcome, seen = "no report", 0
    deadline = time.monotonic() + timeout
    async with updates, open_gates(updates.config, vision=True, audio=False) as gates:
        vision = gates.vision
        assert vision is not None  # asked for above; a camera config without one fails there
        before = vision.manifest.tag
        updates.attach(gates, None, {"vision": before})
        stop_u = asyncio.Event()
        task = asyncio.create_task(updates.run(stop_u), name="demo-updates")
        while outcome not in final and time.monotonic() < deadline:
            if await runtime.sleep(stop, 0.2):
                break
            reports = await store.release_reports("person", version, since=0)
            for r in reports[seen:]:
                print(f"device    reported {r.outcome} for person@{version}"
                      f"{f' ({r.reason})' if r.reason else ''}")
                outcome = r.outcome
            seen = len(reports)
        stop_u.set()
        await task
        after = vision.manifest.tag
    print(f"device    gate before {before}, after {after}")
    return {"device_outcome": outcome, "model_before": before, "model_after": after}


async def _compare(device_cfg: Config, recording: Path, release: Path, release_pk: bytes,
                   report_dir: Path) -> dict[str, Any]:
    from edgekeeper.device.compare import format_summary, resolve, run_compare
    from edgekeeper.device.report import write_compare_report

    print(f"step 5    replay --compare: the shipped model (A) and the release (B) on {recording}")
    if recording == SAMPLE:
        print("          (the footage the examples came from, so not held out: give a recording "
              "of your own as the demo's argument for a fair test)")
    variant = device_cfg.gate.variant
    a = resolve("A", "builtin:person", variant=variant)
    b = resolve("B", str(release), variant=variant, release_pk=release_pk,
                key_source="the demo cloud's release key")
    comp = await run_compare([recording], device_cfg, a, b, report_dir=report_dir,
                             progress=False)
    paths = await asyncio.to_thread(write_compare_report, comp, device_cfg, report_dir)
    text = format_summary(comp)
    print("\n".join(f"          {line}" for line in text.splitlines()))
    return {"compare": text, "compare_report": str(paths["html"])}


def print_learn_summary(s: dict[str, Any]) -> None:
    print()
    print("learning round")
    print(f"  events reasoned      {s['events']} (teacher: {s['reasoner']})")
    print(f"  training examples    {s.get('examples', 0)} ({s.get('usable', 0)} usable)")
    if "accepted" in s:
        print(f"  retrain              {'accepted' if s['accepted'] else 'NOT accepted'}: "
              f"{s['reason']}")
        print(f"  retrain report       {s['retrain_report']}")
    if "release" in s:
        print(f"  release              {s['release']}")
        print(f"  device               {s.get('device_outcome')}: {s.get('model_before')} -> "
              f"{s.get('model_after')}")
        print(f"  compare report       {s['compare_report']}")
    print(f"  state kept in        {s['workdir']}")
