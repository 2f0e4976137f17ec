"""``edgekeeper device ...``: the device's side of the secure link from the command line.

* ``device keys``    - create the device's keys if it has none; print the public halves.
* ``device enroll --cloud URL --token=TOKEN`` - register the keys with the cloud, pin its keys.
* ``device status``  - outbox depth, dead letters, oldest event age, last upload, drops.
* ``device upload``  - run the uploader and the results client until SIGINT/SIGTERM (under
  edgekeeper.runtime); ``--burst`` drains the outbox once and exits (0 when empty, 1 when
  events remain).

Handlers return exit codes; errors the user can fix are raised as EdgekeeperError and printed
by edgekeeper.cli with their fix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from edgekeeper import install, runtime
from edgekeeper.errors import ConfigError

MIB = 1024 * 1024


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    device = sub.add_parser("device", help="device identity, enrollment and the cloud link")
    cmds = device.add_subparsers(dest="device_command", metavar="DEVICE_COMMAND")
    device.set_defaults(handler=_help(device))

    p = cmds.add_parser("keys", help="create this device's keys (if missing) and show them")
    p.set_defaults(handler=cmd_keys)

    p = cmds.add_parser("enroll", help="register with a cloud using a one-time token")
    p.add_argument("--cloud", required=True, metavar="URL", help="the cloud ingest base URL")
    p.add_argument(
        "--token", required=True, metavar="TOKEN",
        help="token from `edgekeeper cloud token`, written --token=TOKEN ('-' reads it from "
             "stdin, off the process list)",
    )
    # argparse has no hook for one option's message: this parser's error() is wrapped in place.
    p.error = _token_hint(p.error)  # type: ignore[assignment]
    p.add_argument("--timeout", type=float, default=30.0, metavar="S")
    p.set_defaults(handler=cmd_enroll)

    # install / uninstall as a systemd service (edgekeeper/install.py, systemd/README.md).
    p = install.add_commands(cmds, install.DEVICE, cmd_install)
    p.add_argument("--cloud", metavar="URL", help="enroll with this cloud after installing")
    p.add_argument("--token", metavar="TOKEN", help="with --cloud: --token=TOKEN ('-': stdin)")

    p = cmds.add_parser("status", help="outbox depth, oldest event age, last upload")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_status)

    p = cmds.add_parser("models", help="the model each gate runs, the two update slots, "
                        "the trial (docs/model-updates.md)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_models)

    p = cmds.add_parser("upload", help="send the outbox to the cloud (and handle results)")
    p.add_argument("--burst", action="store_true", help="drain the outbox once, then exit")
    p.add_argument(
        "--give-up-after", type=float, default=None, metavar="S",
        help="with --burst: stop after S seconds of consecutive failures (default: never)",
    )
    p.set_defaults(handler=cmd_upload)


def _token_hint(error: Callable[[str], NoReturn]) -> Callable[[str], NoReturn]:
    """argparse reads a value starting with '-' as an option: `--token -x...` ends in "expected
    one argument". Say how to pass it (tokens issued before the 'ekt_' prefix may start so)."""

    def error_with_hint(message: str) -> NoReturn:
        if message.startswith("argument --token"):
            message += ("; a token that starts with '-' must be joined to the option: "
                        "--token=TOKEN")
        error(message)

    return error_with_hint


def _models(args: argparse.Namespace, config: Any) -> int:
    from edgekeeper.device.update.status import cmd_models

    return cmd_models(args, config)


def _help(parser: argparse.ArgumentParser) -> Any:
    def show(args: argparse.Namespace, config: Any) -> int:
        parser.print_help()
        return 2

    return show


def cmd_keys(args: argparse.Namespace, config: Any) -> int:
    from edgekeeper.device import identity
    from edgekeeper.protocol.keys import b64e

    keys, created = identity.load_or_create_keys(config.device.state_dir)
    print(f"device id:   {config.device.id}")
    print(f"keys:        {identity.keys_dir(config.device.state_dir)} "
          f"({'created now' if created else 'existing'}; private, mode 0600)")
    print(f"sign_pk:     {b64e(keys.sign_pk)}")
    print(f"box_pk:      {b64e(keys.box_pk)}")
    return 0


def cmd_enroll(args: argparse.Namespace, config: Any) -> int:
    from edgekeeper.device import identity
    from edgekeeper.protocol.keys import b64e

    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    enrollment = asyncio.run(
        identity.enroll(
            args.cloud, token, device_id=config.device.id, state_dir=config.device.state_dir,
            timeout=args.timeout, ca_file=config.uplink.ca_file,
        )
    )
    print(f"enrolled {enrollment.device_id} with {enrollment.cloud_url}")
    print(f"pinned cloud box key:     {b64e(enrollment.cloud.box_pk)}")
    print(f"pinned release key:       {b64e(enrollment.cloud.release_pk)}")
    return 0


def cmd_install(args: argparse.Namespace, config: Any) -> int:
    from edgekeeper.device import identity

    def enroller(cloud: str, token: str, state_dir: Path, device_id: str, ca_file: str) -> None:
        asyncio.run(identity.enroll(cloud, token, device_id=device_id, state_dir=state_dir,
                                    ca_file=ca_file))

    return install.run(args, install.DEVICE, enroller)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def cmd_status(args: argparse.Namespace, config: Any) -> int:
    from edgekeeper.device import identity
    from edgekeeper.device.status import enroll_fix, read_status
    from edgekeeper.device.uplink import open_outbox

    now = time.time()
    state = config.device.state_dir
    enrolled: dict[str, Any] | None
    try:
        e = identity.load_enrollment(state, config.device.id)
        enrolled = {"cloud_url": config.uplink.cloud_url or e.cloud_url,
                    "enrolled_at": e.enrolled_at}
    except ConfigError as err:
        enrolled = None
        why = err.message
    if not config.outbox_path.exists():
        st = None
    else:
        with open_outbox(config) as ob:
            st = ob.stats()
    configured_quota = int(config.outbox.quota_mb * MIB)
    service = read_status(config, now)
    doc: dict[str, Any] = {
        "device_id": config.device.id,
        "mode": config.uplink.mode,
        "enrolled": enrolled,
        # uplink.mode = "cloud" without an enrollment: `edgekeeper run` refuses to start.
        "enrollment_missing": enrolled is None and config.uplink.mode == "cloud",
        "service": service,
        "outbox": str(config.outbox_path),
        "pending": st.pending if st else 0,
        "dead_letters": st.dead if st else 0,
        "in_flight": st.leased if st else 0,
        "bytes": st.bytes if st else 0,
        # The quota the outbox applies: the configured one, lowered to what the disk can hold
        # when it opened (device/outbox.py bounded_quota).
        "quota_bytes": st.quota_bytes if st else configured_quota,
        "configured_quota_bytes": configured_quota,
        "oldest_age_seconds": st.oldest_age(now) if st else None,
        "last_upload_at": st.last_upload_at if st else None,
        "delivered_total": st.delivered_total if st else 0,
        "dropped_total": st.dropped_total if st else 0,
        "dropped_bytes": st.dropped_bytes if st else 0,
        "last_seq": st.last_seq if st else 0,
        "disk_free_bytes": _free_bytes(config.outbox_path),
    }
    # The disk cannot hold the configured quota: the outbox lowered it (or will, when it opens).
    free = doc["disk_free_bytes"]
    doc["disk_short"] = (doc["quota_bytes"] < configured_quota if st else
                         free is not None and free < configured_quota)
    if args.json:
        print(json.dumps(doc, sort_keys=True))
        return 0
    print(f"device:        {config.device.id}")
    if enrolled:
        print(f"cloud:         {enrolled['cloud_url']}")
    elif doc["enrollment_missing"]:
        print(f"cloud:         NOT ENROLLED: {why}; `edgekeeper run` refuses to start "
              f"(exit 78)\n  fix: {enroll_fix(config)}")
    else:
        print(f"cloud:         none (uplink.mode local-only; events in {config.sink_dir})")
    _print_service(service, now)
    print(f"outbox:        {doc['outbox']}")
    print(f"pending:       {doc['pending']} events, {doc['bytes'] / MIB:.1f} MiB of "
          f"{doc['quota_bytes'] / MIB:.0f} MiB ({doc['in_flight']} in flight)")
    print(f"oldest event:  {_age(doc['oldest_age_seconds'])}")
    last = doc["last_upload_at"]
    print(f"last upload:   {'never' if last is None else _age(now - last) + ' ago'}")
    print(f"delivered:     {doc['delivered_total']}")
    print(f"dead letters:  {doc['dead_letters']}")
    print(f"dropped:       {doc['dropped_total']} events ({doc['dropped_bytes'] / MIB:.1f} MiB) "
          f"to the quota or a full disk")
    print(f"last seq:      {doc['last_seq']}")
    print(f"disk free:     {'-' if free is None else f'{free / MIB:.0f} MiB'}")
    if doc["disk_short"]:
        print(f"warning: the disk has less free space than the outbox may use: its quota is "
              f"{doc['quota_bytes'] / MIB:.0f} MiB instead of the configured "
              f"{configured_quota / MIB:.0f} MiB; events can be lost to the lower quota; free "
              f"space or lower outbox.quota_mb")
    return 0


def _print_service(service: dict[str, Any] | None, now: float) -> None:
    """What the running `edgekeeper run` last published (device/status.py)."""
    if service is None:
        print("service:       no status published (`edgekeeper run` has not run here)")
        return
    if not service["running"]:
        print(f"service:       not running (last status {_age(service['age_seconds'])} ago, "
              f"{service.get('state')})")
    else:
        health = ("healthy" if service.get("healthy") else
                  "UNHEALTHY: " + "; ".join(service.get("problems") or []))
        print(f"service:       running (pid {service.get('pid')}), {health}")
    print(f"status:        {service.get('status')}")

    def when(at: Any) -> str:
        return "never" if at is None else _age(now - float(at)) + " ago"

    for kind in ("camera", "microphone"):
        src = service.get(kind) or {}
        extra = ("" if src.get("state") in (None, "off") else
                 f", last {when(src.get('last_at'))}, dropped {src.get('dropped', 0)}, "
                 f"reconnects {src.get('reconnects', 0)}")
        print(f"{kind + ':':<15}{src.get('state', '-')} ({src.get('source', '-')}){extra}")
    fps = service.get("frames_per_second")
    print(f"frames/s:      {'-' if fps is None else f'{fps:.1f}'}")
    print(f"last frame:    {when(service.get('last_frame_at'))}")
    trig = service.get("last_trigger")
    print(f"last trigger:  {'none' if not trig else trig['label'] + ', ' + when(trig['at'])}")
    res = service.get("last_result")
    if res:
        what = (f"{res.get('label')} -> {res.get('action')} (seq {res.get('seq')}, "
                f"{res.get('reasoner')}{', provisional' if res.get('provisional') else ''}), "
                f"{when(res.get('at'))}")
    print(f"last result:   {what if res else 'none'}")
    models = service.get("models") or {}
    print(f"models:        {', '.join(f'{k} {v}' for k, v in models.items()) or '-'}")


def _free_bytes(path: Path) -> int | None:
    """Free bytes (for this user) on the filesystem that holds (or will hold) ``path``."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def cmd_upload(args: argparse.Namespace, config: Any) -> int:
    return runtime.run(lambda stop: _upload(args, config, stop), name="upload",
                       drain_seconds=args.drain_seconds)


async def _upload(args: argparse.Namespace, config: Any, stop: asyncio.Event) -> int:
    from edgekeeper.device.uplink import DeviceLink, UplinkUnavailable

    if args.burst:
        async with await DeviceLink.open(config, with_results=False) as link:
            report = await link.uplink.run_burst(give_up_after=args.give_up_after, stop=stop)
        print(f"delivered {report.delivered}, duplicates {report.duplicates}, "
              f"dead letters {report.dead}, remaining {report.remaining}")
        if report.remaining:
            why = (f"last error: {report.last_error}" if report.last_error
                   else "they are leased by another uploader (edgekeeper run?) or the "
                        "upload was stopped")
            raise UplinkUnavailable(
                f"{report.remaining} events remain in the outbox; {why}",
                fix="check the cloud URL and network; the events are kept and sent later",
            )
        return 0
    async with await DeviceLink.open(config) as link:
        await link.run(stop)
    return 0
