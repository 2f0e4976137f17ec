"""Cloud subcommands: ``edgekeeper cloud serve | worker | status | token | revoke | devices |
results | keys | dlq | usage | release | releases | retrain | examples | install | uninstall``.
``serve`` and ``worker`` run under edgekeeper.runtime; docs/operations.md tells what an operator
reads in them."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import re
import sys
import time
from typing import Any

from edgekeeper import install, runtime
from edgekeeper import log as log_mod
from edgekeeper.config import Config
from edgekeeper.errors import InputError

_OPERATOR_KEY_HELP = ("the operator's secret key that opens result summaries (default: "
                      "<cloud data_dir>/keys/operator.key)")


def _operator_key(args: argparse.Namespace, config: Config, *, required: bool) -> Any:
    """The operator's secret key (--operator-key, default in the keys directory); created on
    first use when this cloud has no operator key at all (nothing was sealed to one yet).
    None when not ``required`` and the file is absent."""
    from pathlib import Path

    from edgekeeper.cloud import keys

    data_dir = config.cloud_data_dir
    default = keys.CloudKeys.directory(data_dir) / keys.OPERATOR_FILE
    path = Path(args.operator_key) if args.operator_key else default
    if keys.operator_public_key(data_dir) is None:
        keys.create_operator_key(data_dir, path)
        print(f"created the operator key {path}; restart the workers so they seal result "
              "summaries to it", file=sys.stderr)
    if not required and not path.exists():
        return None
    return keys.load_operator_key(path, data_dir)


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
    p.add_argument("--workers", type=int, metavar="N",
                   help="ingest processes sharing the port (SO_REUSEPORT), owned by this one: "
                        "about one per core (default: cloud.ingest_processes; "
                        "docs/scaling.md)")
    # One child of --workers N: which one (its log lines say so), sharing the port.
    p.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)

    install.add_commands(csub, install.CLOUD, lambda a, c: install.run(a, install.CLOUD))

    p = _add(csub, "worker", "reason about queued events and store results", _worker)
    p.add_argument("--burst", action="store_true", help="drain what is queued, then exit")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address for --metrics-port (default: 127.0.0.1)")

    p = _add(csub, "status", "show the queue's backlog (and, embedded, its files on disk)",
             _status)
    p.add_argument("--json", action="store_true", help="one JSON object, for monitoring")

    p = _add(csub, "token", "issue a one-time enrollment token (printed once)", _token)
    p.add_argument("--ttl", type=float, metavar="SECONDS",
                   help="seconds the token stays valid (default: cloud.token_ttl_seconds)")

    p = _add(csub, "revoke", "revoke a device: it gets 401 from then on", _revoke)
    p.add_argument("device", metavar="DEVICE")

    devices = _add(csub, "devices", "list enrolled devices: enrolled, last seen, events, "
                   "last result", _devices)
    devices.add_argument("--json", action="store_true", help="one JSON object per line")
    devices.add_argument("--operator-key", metavar="PATH", help=_OPERATOR_KEY_HELP)

    p = _add(csub, "results", "what the workers concluded (time, device, seq, label, "
             "confidence, summary, action, reasoner)", _results)
    p.add_argument("--device", metavar="ID", help="only this device")
    p.add_argument("--since", metavar="WHEN",
                   help="only results produced since WHEN: an ISO 8601 time "
                        "(2026-12-03T08:00Z) or an age (90s, 30m, 12h, 7d); default: all")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="at most the latest N results (default: 100)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--operator-key", metavar="PATH", help=_OPERATOR_KEY_HELP)
    p = _add(csub, "keys", "print the cloud's public keys (generating them on first use); "
             "'keys operator' creates the operator key that opens result summaries", _keys)
    p.add_argument("which", nargs="?", choices=["operator"],
                   help="operator: create the operator key pair")
    p.add_argument("--out", metavar="PATH",
                   help="with 'operator': where to write operator.key (default: "
                        "<data_dir>/keys/operator.key; keep it off the cloud host)")

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
    workers = config.cloud.ingest_processes if args.workers is None else args.workers
    if not 1 <= workers <= MAX_INGEST_PROCESSES:
        raise InputError(f"--workers {workers} is out of range",
                         fix=f"use 1 to {MAX_INGEST_PROCESSES}: about one per core")
    if workers > 1 and args.child is None:
        return _serve_processes(args, config, workers)
    if args.child is not None:
        log_mod.bind_context(process=args.child)
    server = build_server(config, host=args.host, port=args.port,
                          reuse_port=args.child is not None)
    runtime.run(server.run, name="ingest", drain_seconds=args.drain_seconds,
                reload=server.reload)
    return 0


MAX_INGEST_PROCESSES = 64
# A child's drain ends this much before its parent's deadline, so the parent hears how it ended.
CHILD_DRAIN_MARGIN_S = 2.0


def _serve_processes(args: argparse.Namespace, config: Config, workers: int) -> int:
    """``cloud serve --workers N``: N children `cloud serve --child NAME` on one port, owned by
    this process (edgekeeper/processes.py) under the runtime; /metrics adds their values up
    (prometheus_client's multiprocess mode, in a directory this process owns)."""
    import os
    import shutil
    import tempfile

    from edgekeeper.cloud.ingest import claim_port
    from edgekeeper.cloud.keys import CloudKeys
    from edgekeeper.metrics import MULTIPROC_ENV, forget_process
    from edgekeeper.processes import Child, ProcessGroup
    from edgekeeper.tls import server_context

    server_context(config.cloud.tls_cert_file, config.cloud.tls_key_file)  # its error, once
    host = args.host or config.cloud.host
    port = claim_port(host, config.cloud.port if args.port is None else args.port)
    # Made once, here, before any child starts: N children starting at once would race to
    # generate the cloud's keys (two different ones, the last written wins on disk while the
    # other child keeps its own). Opening the backends once says an unreachable or non-durable
    # one here, in one line, instead of N children dying and being restarted.
    CloudKeys.ensure(config.cloud_data_dir)
    asyncio.run(_open_backends(config))
    drain_s = runtime.DRAIN_SECONDS if args.drain_seconds is None else args.drain_seconds
    child_drain = max(1.0, drain_s - CHILD_DRAIN_MARGIN_S)
    common = [sys.executable, "-m", "edgekeeper.cli"]
    if args.config:
        common += ["--config", args.config]
    if args.log_level:
        common += ["--log-level", args.log_level]
    common += ["--drain-seconds", f"{child_drain:g}", "cloud", "serve", "--host", host,
               "--port", str(port)]
    metrics_dir = tempfile.mkdtemp(prefix="edgekeeper-ingest-metrics-")
    env = {**os.environ, MULTIPROC_ENV: metrics_dir}
    children = [Child(f"ingest-{i}", (*common, "--child", f"ingest-{i}"), env)
                for i in range(1, workers + 1)]
    group = ProcessGroup(children, on_exit=lambda pid: forget_process(metrics_dir, pid))
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if config.cloud.tls_cert_file else "http"
    log_mod.get_logger(__name__).info(
        "ingest.processes", processes=workers, url=f"{scheme}://{shown}:{port}",
        backends=f"{config.cloud.queue_backend}+{config.cloud.store_backend}")
    try:
        runtime.run(group.run, name="ingest-processes", drain_seconds=drain_s,
                    reload=group.reload)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


async def _open_backends(config: Config) -> None:
    """Open the queue and the store once (their files or tables are created), then close."""
    from edgekeeper.cloud.backends import open_queue, open_store

    section = config.cloud
    store = await open_store(section.store_backend, config.cloud_data_dir, section=section)
    await store.close()
    queue = await open_queue(section.queue_backend, config.cloud_data_dir,
                             max_attempts=section.queue_max_attempts, section=section)
    await queue.close()


def _worker(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.worker import run_worker

    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise InputError(f"--metrics-port {args.metrics_port} is not a port",
                         fix="use 1-65535 (0: any free port, shown in the log)")
    stats = runtime.run(
        lambda stop: run_worker(config, burst=args.burst, stop=stop,
                                metrics_port=args.metrics_port, metrics_host=args.metrics_host),
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

    async def provider(store: Any) -> dict[str, Any] | None:
        state = await store.provider_state()
        return None if state is None else dataclasses.asdict(state)

    doc = asyncio.run(_with_queue(config, read))
    doc["provider"] = asyncio.run(_with_store(config, provider))
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"queue ({doc['backend']}): {doc['ready']} ready, {doc['leased']} leased, "
          f"{doc['dead']} dead, {doc['dedupe_keys']} dedupe keys")
    prov = doc["provider"]
    if prov is None or prov["state"] == "ok":
        print("provider: ok" if prov else "provider: no worker has reported yet")
    else:
        print(f"provider: REFUSED since {_when(prov['updated_at'])} (worker {prov['worker']}): "
              f"{prov['reason']}; fix: {prov['fix']}")
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


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def _devices(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.keys import open_summary

    sk = _operator_key(args, config, required=False)  # without it: last results stay sealed
    rows = asyncio.run(_with_store(config, lambda store: store.device_activity()))

    def opened(a: Any) -> Any:
        return None if a.last_result is None or sk is None else open_summary(a.last_result, sk)

    def seen(a: Any) -> float | None:  # the latest event or heartbeat
        return max((t for t in (a.last_seen, a.heartbeat_at) if t is not None), default=None)

    def beat(a: Any) -> dict[str, Any]:
        doc = json.loads(a.heartbeat) if a.heartbeat else {}
        return doc if isinstance(doc, dict) else {}

    if args.json:
        for a in rows:
            last = opened(a)
            print(json.dumps({
                "device_id": a.device.device_id, "enrolled_at": a.device.enrolled_at,
                "revoked_at": a.device.revoked_at, "last_seen": seen(a), "events": a.events,
                "heartbeat_at": a.heartbeat_at, "heartbeat": beat(a) or None,
                "last_result": None if last is None else _result_doc(last),
                "last_result_sealed": last is None and a.last_result is not None}))
        return 0
    if not rows:
        print("no devices enrolled")
        return 0
    print(f"{'DEVICE':<24} {'ENROLLED':<25} {'LAST SEEN':<25} {'EVENTS':>6}  "
          f"{'LAST RESULT':<24} {'REVOKED':<25} {'BACKLOG':>7} {'CAMERA':<7} {'MODELS':<28} "
          "LAST ERROR")
    for a in rows:
        last = opened(a)
        what = ("-" if a.last_result is None else "(sealed)" if last is None
                else f"{last.label} ({last.confidence:.2f})")
        hb = beat(a)
        backlog, camera, models = (hb[k] if isinstance(hb.get(k), dict) else {}
                                   for k in ("backlog", "camera", "models"))
        print(f"{a.device.device_id:<24} {_when(a.device.enrolled_at):<25} "
              f"{_when(seen(a)):<25} {a.events:>6}  {what:<24} "
              f"{_when(a.device.revoked_at):<25} {backlog.get('pending', '-')!s:>7} "
              f"{camera.get('state', '-')!s:<7} "
              f"{','.join(f'{k}={v}' for k, v in sorted(models.items())) or '-':<28} "
              f"{' '.join(str(hb.get('last_error') or '-').split())}")
    return 0


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: float) -> float:
    """``--since``: an age (``90s``, ``30m``, ``12h``, ``7d``) or an ISO 8601 time (UTC when
    it names no zone); the epoch seconds it means."""
    age = _AGE.fullmatch(text.strip())
    if age:
        return now - float(age.group(1)) * _UNITS[age.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"--since {text!r} is neither an age nor an ISO 8601 time",
            fix="use an age such as 90s, 30m, 12h or 7d, or a time such as 2026-12-03T08:00Z",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _result_doc(r: Any) -> dict[str, Any]:
    return {"produced_at": r.produced_at, "device_id": r.device_id, "seq": r.seq,
            "label": r.label, "confidence": r.confidence, "summary": r.summary,
            "action": r.action, "reasoner": r.reasoner, "provisional": r.provisional}


def _results(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.protocol.device_id import device_id_problem

    if args.device is not None and (problem := device_id_problem(args.device, "--device")):
        raise InputError(problem, fix="see 'edgekeeper cloud devices' for the ids")
    if not 1 <= args.limit <= 100_000:
        raise InputError(f"--limit {args.limit} is out of range", fix="use 1 to 100000")
    from edgekeeper.cloud.keys import open_summary

    since = 0.0 if args.since is None else parse_since(args.since, time.time())
    sk = _operator_key(args, config, required=True)
    sealed = asyncio.run(_with_store(config, lambda store: store.result_summaries(
        device_id=args.device, since=since, limit=args.limit)))
    rows = [open_summary(r, sk) for r in sealed]
    if args.json:
        for r in rows:
            print(json.dumps(_result_doc(r)))
        return 0
    if not rows:
        print("no results" + (f" for {args.device}" if args.device else "")
              + (f" since {_when(since)}" if args.since else ""))
        return 0
    print(f"{'PRODUCED':<25} {'DEVICE':<20} {'SEQ':>6} {'LABEL':<16} {'CONF':>5} "
          f"{'ACTION':<8} {'REASONER':<24} SUMMARY")
    for r in rows:
        reasoner = r.reasoner + (" (provisional)" if r.provisional else "")
        text = " ".join(r.summary.split())  # one line per result
        print(f"{_when(r.produced_at):<25} {r.device_id:<20} {r.seq:>6} {r.label:<16} "
              f"{r.confidence:>5.2f} {r.action:<8} {reasoner:<24} {text}")
    return 0


def _keys(args: argparse.Namespace, config: Config) -> int:
    from pathlib import Path

    from edgekeeper.cloud.keys import CloudKeys, create_operator_key

    if args.which == "operator":
        out = Path(args.out) if args.out else None
        pk = create_operator_key(config.cloud_data_dir, out)
        where = out or CloudKeys.directory(config.cloud_data_dir) / "operator.key"
        print(f"operator_pk {pk.hex()}")
        print(f"operator.key written to {where}: keep it with the operator, off the cloud host; "
              "restart the workers so they seal result summaries to it")
        return 0
    keys = CloudKeys.ensure(config.cloud_data_dir)
    pub = keys.public().to_json()
    print(f"box_pk     {pub['box_pk']}")
    print(f"release_pk {pub['release_pk']}")
    print(f"release signing key: {'offline' if keys.release_signing_key is None else 'present'}")
    print("operator_pk " + (keys.operator_pk.hex() if keys.operator_pk else
                            "none (edgekeeper cloud keys operator)"))
    return 0
