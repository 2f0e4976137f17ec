"""Device subcommands: ``run`` (the live loop), ``replay`` (recordings through the same loop) and
``record`` (capture a recording that replay reads)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from edgekeeper import compat, runtime
from edgekeeper.config import Config
from edgekeeper.device.live import live_sources
from edgekeeper.errors import InputError
from edgekeeper.log import get_logger

log = get_logger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the device loop on the configured camera and microphone")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="stop after this many seconds (default: run until SIGTERM/SIGINT)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address for --metrics-port (default: 127.0.0.1)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "replay",
        help="replay recordings through the device loop and write a report",
        description="Replay video files, image folders, WAVs or recording folders through the "
        "same loop the device runs, deterministically, and report what the gate did.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="ground truth (JSON time ranges per label) for precision/recall; "
                   "default: labels.json inside a recording folder")
    p.add_argument("--realtime", action="store_true", help="pace input at its real frame rate")
    p.add_argument("--report", type=Path, default=Path("replay-report"), metavar="DIR",
                   help="where report.json, report.html and events/ go (default ./replay-report)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--verbose", action="store_true",
                   help="log every decision as it happens (they are in the report either way)")
    p.set_defaults(handler=cmd_replay)

    p = sub.add_parser("record", help="record the camera and microphone into a recording folder")
    p.add_argument("out", type=Path, metavar="DIR", help="recording folder to create")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--no-video", action="store_true")
    p.add_argument("--no-audio", action="store_true")
    p.set_defaults(handler=cmd_record)


# -- replay -----------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.device.replay import replay_recording
    from edgekeeper.device.report import write_report
    from edgekeeper.device.sources import load_labels

    labels = load_labels(args.labels) if args.labels else None
    report_dir: Path = args.report
    if not args.verbose and args.log_level is None:
        # Decisions and events go into the report; keep the terminal for the progress bar.
        from edgekeeper import log as log_mod

        log_mod.configure("warning", config.log.format)

    async def main() -> list[Any]:
        results = []
        for i, path in enumerate(args.paths):
            sub = f"{i:02d}-{path.stem}" if len(args.paths) > 1 else ""
            events_dir = report_dir / "events" / sub
            results.append(
                await replay_recording(
                    path,
                    config,
                    events_dir=events_dir,
                    realtime=args.realtime,
                    labels=labels,
                    progress=not args.no_progress,
                )
            )
        return results

    results = asyncio.run(main())
    paths = write_report(results, config, report_dir)
    summaries = [r.summary() for r in results]
    if args.json:
        print(json.dumps(summaries, indent=2, sort_keys=True))
    else:
        for s in summaries:
            print(format_summary(s))
        print(f"report: {paths['html']}  ({paths['json'].name} beside it)")
    return 0


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"{s['recording']}  ({s['media_seconds']:.1f} s; models {', '.join(s['models'].values())})",
        f"  frames {s['frames']} (scored {s['frames_scored']}, spared by pre-gate "
        f"{s['frames_spared_by_pregate']}, dropped {s['frames_dropped']}); audio windows "
        f"{s['audio_windows']} (scored {s['audio_scored']}, spared {s['audio_spared_by_pregate']})",
        f"  triggers {s['triggers']}, held back {s['held_back']}, events {s['events']}",
        f"  bytes that left the device {s['bytes_sent']:,} vs streaming everything "
        f"{s['bytes_streaming_everything']:,}"
        + (f" ({100 * s['bytes_ratio']:.2f}%)" if s["bytes_ratio"] is not None else ""),
    ]
    for label, m in s["metrics"].items():
        lines.append(
            f"  {label}: window precision {m['window_precision']} recall {m['window_recall']}; "
            f"events {m['triggers']} (precision {m['event_precision']}, recall "
            f"{m['event_recall']}), {m['triggers_per_hour']} triggers/hour"
        )
    return "\n".join(lines)


# -- run --------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    if not config.camera.enabled and not config.microphone.enabled:
        raise InputError(
            "both camera and microphone are disabled: nothing to run",
            fix="set camera.enabled or microphone.enabled to true in the config",
        )

    async def main(stop: asyncio.Event) -> dict[str, Any]:
        if args.seconds > 0:
            asyncio.get_running_loop().call_later(args.seconds, stop.set)
        return await run_device(config, stop, metrics_port=args.metrics_port,
                                metrics_host=args.metrics_host)

    stats = runtime.run(main, name="device", drain_seconds=args.drain_seconds)
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


async def run_device(config: Config, stop: asyncio.Event, *, metrics_port: int | None = None,
                     metrics_host: str = "127.0.0.1") -> dict[str, Any]:
    """The live loop until ``stop``: sources closed first, captured events committed to the
    outbox, then the link stopped (what is still in the outbox is sent on the next start), then
    MQTT (when ``mqtt.host`` is set), so results handled during the link's drain still go out."""
    from edgekeeper.device import identity
    from edgekeeper.device.loop import Pipeline, PipelineStats
    from edgekeeper.device.replay import open_gates
    from edgekeeper.device.sink import LocalSink
    from edgekeeper.device.uplink import DeviceLink

    enrolled = await asyncio.to_thread((config.device.state_dir / identity.ENROLLMENT_FILE).exists)
    async with contextlib.AsyncExitStack() as stack:
        gates = await stack.enter_async_context(
            open_gates(config, vision=config.camera.enabled, audio=config.microphone.enabled)
        )
        rate = gates.audio.manifest.sample_rate if gates.audio else None
        video, audio = live_sources(config, rate)
        link = None
        if enrolled:
            # Events go to the durable outbox; the uplink sends them beside the loop.
            link = await stack.enter_async_context(await DeviceLink.open(config))
            sink: Any = link.sink
            where = f"outbox {config.outbox_path} -> {link.uplink.url}"
        else:
            sink = LocalSink(config.sink_dir)
            where = f"local sink {config.sink_dir} (not enrolled: no cloud)"
        mqtt = None
        if config.mqtt.host:
            from edgekeeper.device.mqtt import MqttPublisher

            mqtt = await stack.enter_async_context(MqttPublisher.from_config(config))
            if link is not None:
                # Last: it runs before the ledger records a result, provisional ones too.
                link.actions.actions.append(("mqtt", mqtt.action))
        pipeline = Pipeline(config, sink, video=video, audio=audio,
                            vision_gate=gates.vision, audio_gate=gates.audio,
                            clock_base=time.time(), ordered=False,
                            on_decision=mqtt.note_decision if mqtt else None,
                            on_event=mqtt.event_nowait if mqtt else None)
        from edgekeeper import metrics as metrics_mod
        from edgekeeper.device.metrics import DeviceMetrics

        await stack.enter_async_context(metrics_mod.serve(
            DeviceMetrics(pipeline, link).registry, metrics_port, metrics_host, service="device"))
        log.info("device.running", events_to=where, models=gates.models)
        stop_link, stop_mqtt = asyncio.Event(), asyncio.Event()
        async with compat.TaskGroup() as tg:
            if mqtt is not None:
                tg.create_task(mqtt.run(stop_mqtt), name="device-mqtt")
            if link is not None:

                async def link_then_mqtt() -> None:
                    try:
                        await link.run(stop_link)
                    finally:
                        stop_mqtt.set()  # the link's drain has handled its last result

                tg.create_task(link_then_mqtt(), name="device-link")

            async def loop_then_link() -> PipelineStats:
                try:
                    return await pipeline.run(stop)
                finally:
                    # The loop has committed everything it captured; now stop the link.
                    stop_link.set()
                    if link is None:
                        stop_mqtt.set()

            loop_task = tg.create_task(loop_then_link(), name="device-loop")
        return loop_task.result().as_dict()


# -- record -----------------------------------------------------------------------------------
def cmd_record(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.device.record import record

    out = runtime.run(
        lambda stop: record(config, args.out, seconds=args.seconds, video=not args.no_video,
                            audio=not args.no_audio, stop=stop),
        name="record", drain_seconds=args.drain_seconds,
    )
    print(f"recorded {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from edgekeeper.cli import main

    sys.exit(main(["replay", *sys.argv[1:]]))
