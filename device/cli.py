"""Device subcommands: ``run`` (the live loop), ``replay`` (recordings through the same loop) and
``record`` (capture a recording that replay reads)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from edgekeeper import compat, runtime
from edgekeeper.config import Config
from edgekeeper.device.live import live_sources
from edgekeeper.errors import ConfigError, InputError
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
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="run two models (manifest JSON, builtin:NAME[:int8|float] or release "
                   "folder) over the same recordings; one report side by side")
    p.add_argument("--release-key", type=Path, metavar="FILE",
                   help="with --compare: the release public key (hex, or the cloud keys JSON) "
                   "to check release folders' signatures; default: this device's pinned key")
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
    if args.compare:
        from edgekeeper.device.compare import cmd_compare

        return cmd_compare(args, config)

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
    check_enrolled(config)
    device = DeviceService(config, args.config, metrics_port=args.metrics_port,
                           metrics_host=args.metrics_host)

    async def main(stop: asyncio.Event) -> dict[str, Any]:
        if args.seconds > 0:
            asyncio.get_running_loop().call_later(args.seconds, stop.set)
        return await device.run(stop)

    stats = runtime.run(main, name="device", drain_seconds=args.drain_seconds,
                        reload=device.reload, ready="service")
    # One line: the counts of the run (a log line says the same; this is for scripts).
    print(json.dumps(stats, sort_keys=True, separators=(",", ":")))
    return 0


def check_enrolled(config: Config) -> dict[str, Any] | None:
    """The enrollment ``run`` will use, None in local-only mode; NotEnrolled (exit 78, with
    the command that fixes it) when the config wants the cloud and there is no enrollment."""
    from edgekeeper.device import identity
    from edgekeeper.device.status import NotEnrolled, enroll_fix

    if config.uplink.mode == "local-only":
        return None
    try:
        e = identity.load_enrollment(config.device.state_dir, config.device.id)
    except ConfigError as err:
        fix = enroll_fix(config)
        log.error("device.not_enrolled", state_dir=str(config.device.state_dir),
                  error=err.message, fix=fix)
        raise NotEnrolled(f"{err.message}; uplink.mode is \"cloud\"", fix=fix) from None
    return {"cloud_url": config.uplink.cloud_url or e.cloud_url, "enrolled_at": e.enrolled_at}


async def run_device(config: Config, stop: asyncio.Event, *, metrics_port: int | None = None,
                     metrics_host: str = "127.0.0.1") -> dict[str, Any]:
    """The live loop until ``stop`` (see DeviceService.run)."""
    return await DeviceService(config, None, metrics_port=metrics_port,
                               metrics_host=metrics_host).run(stop)


# Decisions and gate latencies a live run keeps for status and percentiles (a replay keeps all):
# at 10 frames/s a list of every latency would grow by ~800 MB a month.
LIVE_HISTORY = 10_000


class DeviceService:
    """`edgekeeper run`: the live loop, its link and MQTT, supervised (device/status.py) and
    reloadable (SIGHUP: trigger rules and log level apply live; other changes are logged as
    needing a restart)."""

    # Sections whose change a reload applies to the running loop; all others need a restart.
    LIVE = ("trigger", "log")

    def __init__(self, config: Config, config_path: str | None, *,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
        self.config = config
        self.config_path = config_path
        self.metrics_port, self.metrics_host = metrics_port, metrics_host  # docs/operations.md
        self.pipeline: Any = None
        self.gates: Any = None  # the loaded models, to check a reloaded file's labels against

    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        """Sources closed first, captured events committed to the outbox, then the link
        stopped (what is still in the outbox is sent on the next start), then MQTT (when
        ``mqtt.host`` is set), so results handled during the link's drain still go out."""
        from edgekeeper.device.loop import Pipeline, PipelineStats
        from edgekeeper.device.replay import open_gates
        from edgekeeper.device.sink import LocalSink
        from edgekeeper.device.status import DeviceMonitor
        from edgekeeper.device.update import Updates
        from edgekeeper.device.uplink import DeviceLink

        config = self.config
        enrolled = await asyncio.to_thread(check_enrolled, config)
        async with contextlib.AsyncExitStack() as stack:
            # Signed model updates: the gates load the model the slots' pointer names (verified).
            updates = await Updates.prepare(config) if enrolled is not None else None
            if updates is not None:
                config = self.config = updates.config
                await stack.enter_async_context(updates)
            gates = await stack.enter_async_context(
                open_gates(config, vision=config.camera.enabled, audio=config.microphone.enabled)
            )
            self.gates = gates
            rate = gates.audio.manifest.sample_rate if gates.audio else None
            video, audio = live_sources(config, rate)
            link = None
            if enrolled is not None:
                # Events go to the durable outbox; the uplink sends them beside the loop.
                link = await stack.enter_async_context(await DeviceLink.open(config))
                sink: Any = link.sink
                where = f"outbox {config.outbox_path} -> {link.uplink.url}"
            else:
                sink = LocalSink(config.sink_dir)
                where = f"local sink {config.sink_dir} (uplink.mode local-only)"
            mqtt = None
            if config.mqtt.host:
                from edgekeeper.device.mqtt import MqttPublisher

                mqtt = await stack.enter_async_context(MqttPublisher.from_config(config))
                if link is not None:
                    # Last: it runs before the ledger records a result, provisional ones too.
                    link.actions.actions.append(("mqtt", mqtt.action))
            pipeline = self.pipeline = Pipeline(
                config, sink, video=video, audio=audio, vision_gate=gates.vision,
                audio_gate=gates.audio, clock_base=time.time(), ordered=False,
                history=LIVE_HISTORY,
                on_decision=mqtt.note_decision if mqtt else None,
                on_event=_each(mqtt and mqtt.event_nowait, updates and updates.on_event))
            if updates is not None:
                updates.attach(gates, link, pipeline.capture.models)
            interval = runtime.supervisor().notifier.watchdog_interval
            monitor = DeviceMonitor(config, pipeline, outbox=link.outbox if link else None,
                                    models=gates.models, events_to=where, enrolled=enrolled,
                                    stall_seconds=2 * interval if interval else None)
            if link is not None:
                link.actions.actions.insert(0, ("status", monitor.note_result))
            runtime.supervisor().watch(monitor.health)
            from edgekeeper import metrics as metrics_mod
            from edgekeeper.device.metrics import DeviceMetrics

            await stack.enter_async_context(metrics_mod.serve(
                DeviceMetrics(pipeline, link).registry, self.metrics_port, self.metrics_host,
                service="device"))
            log.info("device.running", events_to=where, models=gates.models)
            stop_link, stop_mqtt, stop_status = asyncio.Event(), asyncio.Event(), asyncio.Event()
            async with compat.TaskGroup() as tg:
                tg.create_task(monitor.publish(stop_status), name="device-status")
                tg.create_task(monitor.announce_ready(stop_status), name="device-ready")
                if mqtt is not None:
                    tg.create_task(mqtt.run(stop_mqtt), name="device-mqtt")
                if updates is not None:
                    tg.create_task(updates.run(stop), name="device-updates")
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
                        stop_status.set()
                        if link is None:
                            stop_mqtt.set()

                loop_task = tg.create_task(loop_then_link(), name="device-loop")
            stats = loop_task.result().as_dict()
            log.info("device.stopped", frames=stats["frames"], triggers=stats["triggers"],
                     events=stats["events"], events_lost=stats["events_lost"],
                     seconds=round(time.monotonic() - monitor.started_mono, 1))
            return stats

    async def reload(self) -> None:
        """SIGHUP: read the config file again. A bad file raises ConfigError naming the file
        and key (the runtime logs it and the service keeps the config it has)."""
        from edgekeeper import config as config_mod
        from edgekeeper import log as log_mod

        # The same check as at start (a rule for a label no configured model outputs).
        from edgekeeper.device.replay import _check_trigger_labels

        new = await asyncio.to_thread(config_mod.load, self.config_path)
        if self.gates is not None:
            await _check_trigger_labels(new, self.gates)
        old = self.config
        changed = [f.name for f in dataclasses.fields(old) if f.compare
                   and getattr(old, f.name) != getattr(new, f.name)]
        restart = [name for name in changed if name not in self.LIVE]
        # Only the live sections are taken from the new file; the rest stays what is running.
        self.config = dataclasses.replace(old, **{n: getattr(new, n) for n in self.LIVE},
                                          source=new.source)
        if "log" in changed:
            log_mod.configure(new.log.level, new.log.format)
        if self.pipeline is not None:
            self.pipeline.reconfigure(self.config)
        log.info("device.config_reloaded", source=new.source,
                 applied=[n for n in changed if n in self.LIVE] or None,
                 needs_restart=restart or None)


def _each(*callbacks: Any) -> Any:
    """One callback calling each given one (None and False are left out), or None."""
    live = [c for c in callbacks if c]
    if not live:
        return None
    return lambda value: [c(value) for c in live]


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
