"""``edgekeeper cloud dlq``: list the dead-letter queue and put events back in the queue.

An event lands there when it can never succeed as things stand (its device was unknown or
revoked, its envelope would not open, the reasoner refused it) or when it used up
``cloud.queue_max_attempts`` deliveries (a provider down for long, a poison event that kills
its worker). Each entry keeps its last error. Once the cause is fixed (the device enrolled, the
provider back, a bug fixed), ``requeue`` puts it back with fresh attempts; it keeps its dedupe
key, so the device's own late retries are still answered "duplicate".

Works the same on every queue backend (the ``requeue_dead`` method of cloud/queue/base.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from edgekeeper.config import Config
from edgekeeper.errors import InputError
from edgekeeper.protocol.device_id import device_id_problem

T = TypeVar("T")

# A queue key is "<device id>:<seq>"; the device id follows the protocol's rule.
SEQ_RE = re.compile(r"[0-9]{1,19}")


def _key_problem(key: str) -> str | None:
    device_id, sep, seq = key.rpartition(":")
    if not sep or not SEQ_RE.fullmatch(seq):
        return f"KEY {key!r} is not a queue key: expected DEVICE:SEQ"
    return device_id_problem(device_id, f"the device id in KEY {key!r}")


def register(csub: Any) -> None:
    """Add ``dlq`` under ``edgekeeper cloud``."""
    dlq = csub.add_parser(
        "dlq", help="list dead-lettered events, or requeue them",
        description="Events that failed for good wait here with their last error. "
                    "Without a subcommand: list.",
    )
    dlq.set_defaults(handler=_list, limit=50)
    sub = dlq.add_subparsers(dest="dlq_command", metavar="SUBCOMMAND")

    p = sub.add_parser("list", help="show dead letters, oldest first")
    p.add_argument("--limit", type=int, default=50, help="show at most this many (default 50)")
    p.set_defaults(handler=_list)

    p = sub.add_parser("requeue", help="put dead letters back in the queue with fresh attempts")
    p.add_argument("keys", nargs="*", metavar="KEY", help="DEVICE:SEQ, as 'dlq list' shows")
    p.add_argument("--all", action="store_true", help="requeue every dead letter")
    p.set_defaults(handler=_requeue)


async def _with_queue(config: Config, fn: Callable[[Any], Awaitable[T]]) -> T:
    from edgekeeper.cloud.backends import open_queue

    section = config.cloud
    queue = await open_queue(section.queue_backend, config.cloud_data_dir,
                             max_attempts=section.queue_max_attempts, section=section)
    try:
        return await fn(queue)
    finally:
        await queue.close()


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def _list(args: argparse.Namespace, config: Config) -> int:
    if not 1 <= args.limit <= 100_000:
        raise InputError(f"--limit {args.limit} is out of range", fix="use 1 to 100000")

    async def do(queue: Any) -> tuple[list[Any], int]:
        return await queue.dead_letters(limit=args.limit), (await queue.stats()).dead

    dead, total = asyncio.run(_with_queue(config, do))
    if not dead:
        print("the dead-letter queue is empty")
        return 0
    width = max(24, *(len(d.event.key) for d in dead))
    print(f"{'KEY':<{width}} {'ATTEMPTS':>8}  {'FAILED (UTC)':<25} REASON")
    for d in dead:
        reason = " ".join(d.reason.split())
        print(f"{d.event.key:<{width}} {d.attempts:>8}  {_when(d.failed_at):<25} {reason}")
    shown = f"showing {len(dead)} of {total}" if total > len(dead) else f"{total} in all"
    print(f"({shown}; requeue with: edgekeeper cloud dlq requeue KEY... | --all)")
    return 0


def _requeue(args: argparse.Namespace, config: Config) -> int:
    if args.all and args.keys:
        raise InputError("give KEYs or --all, not both",
                         fix="edgekeeper cloud dlq requeue --all  (or list the keys)")
    if not args.all and not args.keys:
        raise InputError("no KEY given", fix="name keys from 'edgekeeper cloud dlq list', "
                                             "or pass --all")
    problems = [p for p in map(_key_problem, args.keys) if p]
    if problems:
        raise InputError("; ".join(problems),
                         fix="keys look like DEVICE:SEQ (e.g. pi-kitchen:1042), as "
                             "'edgekeeper cloud dlq list' shows them")
    keys = None if args.all else list(dict.fromkeys(args.keys))
    moved: list[str] = asyncio.run(_with_queue(config, lambda q: q.requeue_dead(keys)))
    for key in moved:
        print(f"requeued {key}")
    if keys is not None:
        missing = [k for k in keys if k not in set(moved)]
        if missing:
            raise InputError(
                f"not in the dead-letter queue: {', '.join(missing)}"
                + (f" (requeued {len(moved)} others)" if moved else ""),
                fix="see 'edgekeeper cloud dlq list' for the keys there",
            )
    if not moved:
        print("nothing to requeue: the dead-letter queue is empty")
    return 0
