"""Cloud subcommands: ``edgekeeper cloud serve | worker | status | token | revoke | devices |
keys | dlq | usage | release | releases | retrain``. ``serve`` and ``worker`` run under
edgekeeper.runtime."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from typing import Any

from edgekeeper import runtime
from edgekeeper.config import Config
from edgekeeper.errors import InputError


def _add(sub: Any, name: str, help_: str, handler: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    parser.set_defaults(handler=handler)
    return parser


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cloud = sub.add_parser("cloud", help="run and administer the cloud half")

    def show_help(args: argparse.Namespace, config: Config) -> int:
        cloud.print_help()
        return 2

    cloud.set_defaults(handler=show_help)
    csub = cloud.add_subparsers(dest="cloud_command", metavar="SUBCOMMAND")

    p = _add(csub, "serve", "run the ingest (HTTP API) until SIGINT/SIGTERM (SIGHUP: re-read "
             "the device registry)", _serve)
    p.add_argument("--host", help="address to listen on (default: cloud.host)")
    p.add_argument("--port", type=int, help="port to listen on (default: cloud.port)")

    p = _add(csub, "worker", "reason about queued events and store results", _worker)
    p.add_argument("--burst", action="store_true", help="drain what is queued, then exit")

    p = _add(csub, "status", "show the queue's backlog (and, embedded, its files on disk)",
             _status)
    p.add_argument("--json", action="store_true", help="one JSON object, for monitoring")

    p = _add(csub, "token", "issue a one-time enrollment token (printed once)", _token)
    p.add_argument("--ttl", type=float, metavar="SECONDS",
                   help="seconds the token stays valid (default: cloud.token_ttl_seconds)")

    p = _add(csub, "revoke", "revoke a device: it gets 401 from then on", _revoke)
    p.add_argument("device", metavar="DEVICE")

    devices = _add(csub, "devices", "list enrolled devices", _devices)
    _add(csub, "keys", "print the cloud's public keys (generating them on first use)", _keys)

    p = _add(csub, "examples", "summarise training examples: per target label, device and "
             "reasoner, and the gate's precision as the teacher sees it", _examples)
    p.add_argument("--model", help="one model family (person, sound; default: all)")
    p.add_argument("--scope", default="fleet", help="fleet (default), group:NAME or device:ID")
    p.add_argument("--json", action="store_true", help="one JSON object")

    from edgekeeper.cloud import dlq  # light: config and errors only

    dlq.register(csub)

    from edgekeeper.cloud import usage  # light: config and errors only

    usage.register(csub)

    from edgekeeper.cloud import releases_cli  # light: config and errors only

    releases_cli.register(csub, devices)  # release, releases, devices group

    from edgekeeper.cloud import retrain_cli  # light: TensorFlow loads when it runs

    retrain_cli.register(csub)


def _serve(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.ingest import build_server

    if args.port is not None and not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a port", fix="use 0-65535 (0: any free)")
    server = build_server(config, host=args.host, port=args.port)
    runtime.run(server.run, name="ingest", drain_seconds=args.drain_seconds,
                reload=server.reload)
    return 0


def _worker(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.worker import run_worker

    stats = runtime.run(lambda stop: run_worker(config, burst=args.burst, stop=stop),
                        name="worker", drain_seconds=args.drain_seconds)
    print(f"done {stats.done}, retried {stats.retried}, dead-lettered {stats.dead}, "
          f"already done {stats.skipped}, waiting for budget {stats.waiting}, "
          f"cost {stats.cost_usd:.4f} USD")
    return 0


def _status(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.dlq import _with_queue

    async def read(queue: Any) -> dict[str, Any]:
        stats = await queue.stats()
        doc: dict[str, Any] = {
            "backend": config.cloud.queue_backend,
            "ready": stats.ready,
            "leased": stats.leased,
            "dead": stats.dead,
            "dedupe_keys": stats.seen,
        }
        disk_usage = getattr(queue, "disk_usage", None)  # the embedded backend's files
        if disk_usage is not None:
            doc["disk"] = await disk_usage()
        return doc

    doc = asyncio.run(_with_queue(config, read))
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"queue ({doc['backend']}): {doc['ready']} ready, {doc['leased']} leased, "
          f"{doc['dead']} dead, {doc['dedupe_keys']} dedupe keys")
    if "disk" in doc:
        disk = doc["disk"]
        print(f"on disk: index {disk['index_bytes'] / 1e6:.1f} MB, {disk['segments']} "
              f"segment(s) {disk['segment_bytes'] / 1e6:.1f} MB in {disk['segments_dir']}")
    if doc["dead"]:
        print("dead letters: see 'edgekeeper cloud dlq'")
    return 0


async def _with_store(config: Config, fn: Any) -> Any:
    from edgekeeper.cloud.backends import open_store

    store = await open_store(config.cloud.store_backend, config.cloud_data_dir,
                             section=config.cloud)
    try:
        return await fn(store)
    finally:
        await store.close()


def _examples(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.training.examples import summary_command

    return summary_command(args, config, _with_store)


def _token(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.enroll import issue_token

    ttl = config.cloud.token_ttl_seconds if args.ttl is None else args.ttl
    if not 0 < ttl <= 365 * 86400:
        raise InputError(f"--ttl {ttl:g} is out of range", fix="use 1 to 31536000 seconds")
    token = asyncio.run(
        _with_store(config, lambda store: issue_token(store, ttl_s=ttl, now=time.time()))
    )
    until = dt.datetime.fromtimestamp(time.time() + ttl, dt.timezone.utc).isoformat(
        timespec="seconds"
    )
    print(token)
    print(f"valid once, until {until}: edgekeeper device enroll --cloud URL --token=TOKEN",
          file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.enroll import revoke
    from edgekeeper.protocol.device_id import device_id_problem

    problem = device_id_problem(args.device, "DEVICE")
    if problem:
        raise InputError(problem, fix="see 'edgekeeper cloud devices' for the ids")

    async def do(store: Any) -> tuple[bool, Any]:
        changed = await revoke(store, args.device, now=time.time())
        return changed, await store.get_device(args.device)

    changed, record = asyncio.run(_with_store(config, do))
    if record is None:
        raise InputError(f"no device {args.device!r} is enrolled",
                         fix="see 'edgekeeper cloud devices' for the ids")
    print(f"{args.device}: revoked" if changed else f"{args.device}: was already revoked")
    return 0


def _devices(args: argparse.Namespace, config: Config) -> int:
    devices = asyncio.run(_with_store(config, lambda store: store.list_devices()))
    if not devices:
        print("no devices enrolled")
        return 0

    def when(ts: float | None) -> str:
        if ts is None:
            return "-"
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")

    print(f"{'DEVICE':<32} {'ENROLLED':<26} {'REVOKED':<26}")
    for d in devices:
        print(f"{d.device_id:<32} {when(d.enrolled_at):<26} {when(d.revoked_at):<26}")
    return 0


def _keys(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.keys import CloudKeys

    keys = CloudKeys.ensure(config.cloud_data_dir)
    pub = keys.public().to_json()
    print(f"box_pk     {pub['box_pk']}")
    print(f"release_pk {pub['release_pk']}")
    print(f"release signing key: {'offline' if keys.release_signing_key is None else 'present'}")
    return 0
