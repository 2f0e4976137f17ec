"""``edgekeeper cloud usage [--days N] [--device D]``: what reasoning cost, per device per UTC day.

Read from the store's daily running totals (cloud/budget.py records every provider call, probes
under the pseudo-device "(probe)"), next to the day's limits so an operator sees how close a
device is to ``budget.device_daily_usd``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from edgekeeper.config import Config
from edgekeeper.errors import InputError
from edgekeeper.protocol.device_id import device_id_problem

MAX_DAYS = 366


def register(csub: Any) -> None:
    """Add ``usage`` under ``edgekeeper cloud``."""
    help_ = "show what reasoning cost, per device per UTC day"
    p: argparse.ArgumentParser = csub.add_parser("usage", help=help_, description=help_)
    p.add_argument("--days", type=int, default=7, metavar="N",
                   help="today and the N-1 days before it (default: 7)")
    p.add_argument("--device", metavar="DEVICE", help="only this device")
    p.set_defaults(handler=_usage)


def since_day(days: int, now: float) -> str:
    from edgekeeper.cloud.budget import utc_day

    return utc_day(now - (days - 1) * 86400.0)


def format_table(rows: list[Any], config: Config) -> str:
    """The usage rows as an aligned text table, with a total per day and overall."""
    head = (f"{'DAY':<10}  {'DEVICE':<24} {'EVENTS':>7} {'CALLS':>6} {'INPUT':>10} "
            f"{'OUTPUT':>9} {'CACHE_W':>9} {'CACHE_R':>10} {'COST_USD':>10}")
    lines = [head]
    total = 0.0
    per_day: dict[str, float] = {}
    limit = config.budget.device_daily_usd
    for r in rows:
        flag = "  (over the daily limit)" if limit and r.cost_usd >= limit else ""
        lines.append(
            f"{r.day:<10}  {r.device_id[:24]:<24} {r.events:>7} {r.calls:>6} {r.input_tokens:>10}"
            f" {r.output_tokens:>9} {r.cache_write_tokens:>9} {r.cache_read_tokens:>10}"
            f" {r.cost_usd:>10.4f}{flag}")
        per_day[r.day] = per_day.get(r.day, 0.0) + r.cost_usd
        total += r.cost_usd
    if len(per_day) > 1 or len(rows) > 1:
        for day, cost in per_day.items():
            lines.append(f"{day:<10}  {'(all devices)':<24} {'':>7} {'':>6} {'':>10} {'':>9}"
                         f" {'':>9} {'':>10} {cost:>10.4f}")
    lines.append(f"total {total:.4f} USD; limits per day: device "
                 f"{_limit(config.budget.device_daily_usd)}, all devices "
                 f"{_limit(config.budget.global_daily_usd)}")
    return "\n".join(lines)


def _limit(usd: float) -> str:
    return f"{usd:g} USD" if usd else "none"


def _usage(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.backends import open_store

    if not 1 <= args.days <= MAX_DAYS:
        raise InputError(f"--days {args.days} is out of range", fix=f"use 1 to {MAX_DAYS}")
    problem = device_id_problem(args.device, "--device")
    if args.device is not None and problem and args.device != "(probe)":
        raise InputError(problem, fix="see 'edgekeeper cloud devices' for the ids")

    async def read() -> list[Any]:
        store = await open_store(config.cloud.store_backend, config.cloud_data_dir,
                                 section=config.cloud)
        try:
            rows: list[Any] = await store.usage_by_day(since_day=since_day(args.days, time.time()),
                                                       device_id=args.device)
            return rows
        finally:
            await store.close()

    rows = asyncio.run(read())
    if not rows:
        who = f"device {args.device}" if args.device else "any device"
        print(f"no usage recorded for {who} in the last {args.days} day(s)")
        return 0
    print(format_table(rows, config))
    return 0
