"""What reasoning costs, and whether a device (or the whole cloud) may spend more today.

Prices come from ``[budget.prices]`` (US$ per million tokens: input, output, cache write, cache
read). Each provider call's usage is priced and recorded in the store (per call, with running
totals per UTC day and device), so a limit check is two point reads however busy the day.

Limits are per UTC day, per device and global, in tokens and in dollars (0: none). They are
checked BEFORE a call, from what is already recorded: calls in flight at that moment may each
still finish, so the overshoot is at most (events in flight across workers) x (cost of one call).

Over a limit, ``budget.over_budget`` decides: ``wait`` puts the event back until the next UTC
midnight (never dropped), ``cheaper`` reasons now with ``reasoner.cheaper_model`` or the
offline teacher, and the result is marked provisional.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Literal

from edgekeeper.cloud.reasoners.base import Usage
from edgekeeper.cloud.store.base import Store, UsageRecord, UsageTotals
from edgekeeper.config import BudgetSection, ModelPrice
from edgekeeper.errors import ConfigError

GLOBAL = "*"  # the store's running total over all devices (no device id can be "*")


def utc_day(ts: float) -> str:
    """'YYYY-MM-DD' of ``ts`` in UTC: the budget day."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")


def next_utc_midnight(ts: float) -> float:
    day = dt.datetime.fromtimestamp(ts, dt.timezone.utc).date() + dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp()


def cost_usd(usage: Usage, price: ModelPrice) -> float:
    return (usage.input_tokens * price.input
            + usage.output_tokens * price.output
            + usage.cache_write_tokens * price.cache_write
            + usage.cache_read_tokens * price.cache_read) / 1_000_000


@dataclass(frozen=True)
class Decision:
    allowed: bool
    scope: Literal["", "device", "global"] = ""  # which limit was reached
    reason: str = ""
    retry_at: float = 0.0  # when the limit resets (next UTC midnight)


ALLOWED = Decision(True)


class Budget:
    """Prices usage and checks the daily limits against the store's running totals."""

    def __init__(self, section: BudgetSection, store: Store) -> None:
        self.section = section
        self.store = store

    def price(self, model: str) -> ModelPrice:
        try:
            return self.section.prices[model]
        except KeyError:
            raise ConfigError(
                f"model {model!r} has no price in [budget.prices], so its cost is unknown",
                fix=f'add [budget.prices."{model}"] with input, output, cache_write and '
                    "cache_read (US$ per million tokens) from the provider's price list",
            ) from None

    def check_prices(self, *models: str) -> None:
        """Refuse to start with a model whose cost could not be counted."""
        for model in models:
            if model:
                self.price(model)

    def cost(self, usage: Usage) -> float:
        return cost_usd(usage, self.price(usage.model)) if usage.model else 0.0

    @property
    def limited(self) -> bool:
        s = self.section
        return any((s.device_daily_usd, s.device_daily_tokens, s.global_daily_usd,
                    s.global_daily_tokens))

    async def check(self, device_id: str, *, now: float) -> Decision:
        """May ``device_id`` spend now? Reads today's running totals."""
        s = self.section
        if not self.limited:
            return ALLOWED
        day = utc_day(now)
        if s.global_daily_usd or s.global_daily_tokens:
            why = _over(await self.store.usage_totals(day=day, device_id=None),
                        s.global_daily_usd, s.global_daily_tokens)
            if why:
                return Decision(False, "global", f"global daily budget spent ({why})",
                                next_utc_midnight(now))
        if s.device_daily_usd or s.device_daily_tokens:
            why = _over(await self.store.usage_totals(day=day, device_id=device_id),
                        s.device_daily_usd, s.device_daily_tokens)
            if why:
                return Decision(False, "device", f"device {device_id} daily budget spent ({why})",
                                next_utc_midnight(now))
        return ALLOWED

    async def record(self, usage: Usage, *, device_id: str, seq: int, reasoner: str,
                     now: float) -> float:
        """Record one call's usage (idempotent on its call id); returns its cost."""
        if usage.tokens == 0:
            return 0.0
        cost = self.cost(usage)
        call_id = usage.call_id or f"{device_id}:{seq}:{now:.6f}:{random.getrandbits(32):08x}"
        await self.store.record_usage(UsageRecord(
            call_id=call_id, device_id=device_id, seq=seq, day=utc_day(now), reasoner=reasoner,
            model=usage.model, input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, cache_write_tokens=usage.cache_write_tokens,
            cache_read_tokens=usage.cache_read_tokens, cost_usd=cost, created_at=now))
        return cost


def _over(totals: UsageTotals, usd: float, tokens: int) -> str:
    if usd and totals.cost_usd >= usd:
        return f"${totals.cost_usd:.4f} of ${usd:g}"
    if tokens and totals.tokens >= tokens:
        return f"{totals.tokens} of {tokens} tokens"
    return ""
