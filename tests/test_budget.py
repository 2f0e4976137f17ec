"""Cost and budgets: prices, UTC days, the usage contract of every store backend
(cloudkit.STORE_BACKENDS: SQLite and a real PostgreSQL), limit checks, the circuit's backoff,
the action cap, and ``edgekeeper cloud usage``."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgekeeper import config as config_mod
from edgekeeper.backoff import Backoff, Circuit
from edgekeeper.cli import main
from edgekeeper.cloud.backends import open_store
from edgekeeper.cloud.budget import Budget, cost_usd, next_utc_midnight, utc_day
from edgekeeper.cloud.reasoners.base import Usage
from edgekeeper.cloud.store.base import Store, UsageRecord
from edgekeeper.cloud.worker import cap_action
from edgekeeper.config import BudgetSection, ModelPrice
from edgekeeper.errors import ConfigError

from cloudkit import STORE_BACKENDS
from servers import store_overrides

NOW = dt.datetime(2026, 11, 23, 23, 59, 30, tzinfo=dt.timezone.utc).timestamp()
DAY = "2026-11-23"


def test_cost_is_priced_per_million_tokens() -> None:
    price = ModelPrice(input=3.0, output=15.0, cache_write=3.75, cache_read=0.30)
    usage = Usage(input_tokens=2_000, output_tokens=300, cache_write_tokens=1_500,
                  cache_read_tokens=10_000, model="m")
    assert cost_usd(usage, price) == pytest.approx(
        (2_000 * 3.0 + 300 * 15.0 + 1_500 * 3.75 + 10_000 * 0.30) / 1e6)
    assert usage.tokens == 13_800


def test_days_are_utc() -> None:
    assert utc_day(NOW) == DAY
    assert utc_day(NOW + 31) == "2026-11-24"
    assert next_utc_midnight(NOW) == NOW + 30
    assert next_utc_midnight(NOW + 30) == NOW + 30 + 86400


def test_default_prices_cover_the_default_models() -> None:
    cfg = config_mod.build_from_dict({}, source="test")
    Budget(cfg.budget, None).check_prices(cfg.reasoner.model, "claude-haiku-4-5")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no price"):
        Budget(cfg.budget, None).price("claude-unknown")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[budget.prices."m"]\ninput = 1.0\n', "budget.prices.m"),
        ("[budget]\ndevice_daily_usd = -1\n", "budget"),
        ("[budget]\nover_budget = 'drop'\n", "budget.over_budget"),
        ("[reasoner]\nmax_frames = 50\n", "reasoner"),
        ("[reasoner]\nprovisional_max_action = 'launch'\n", "reasoner.provisional_max_action"),
        ("[cloud]\nreasoner = 'gpt'\n", "cloud.reasoner"),
    ],
)
def test_bad_budget_and_reasoner_config_is_refused(tmp_path: Path, toml: str, needle: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as err:
        config_mod.load(f, env={})
    assert needle in str(err.value) and str(f) in str(err.value) and err.value.fix


@pytest.fixture(params=STORE_BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(request.param, tmp_path / "data",
                         **store_overrides(request, request.param))
    yield s
    await s.close()


def rec(call: str, device: str = "pi-1", seq: int = 1, day: str = DAY, cost: float = 0.01,
        tokens: tuple[int, int, int, int] = (100, 20, 0, 0)) -> UsageRecord:
    return UsageRecord(call, device, seq, day, "anthropic:m", "m", *tokens, cost, NOW)


async def test_usage_contract(store: Store) -> None:
    assert await store.record_usage(rec("c1")) is True
    assert await store.record_usage(rec("c1")) is False  # the same call twice counts once
    await store.record_usage(rec("c2", seq=1, tokens=(10, 5, 200, 300)))  # a retry: same event
    await store.record_usage(rec("c3", device="pi-2", seq=9, cost=0.5))
    await store.record_usage(rec("c4", day="2026-11-22", cost=1.0))
    t = await store.usage_totals(day=DAY, device_id="pi-1")
    assert (t.calls, t.tokens) == (2, 120 + 515) and t.cost_usd == pytest.approx(0.02)
    g = await store.usage_totals(day=DAY)
    assert (g.calls, g.tokens) == (3, 120 + 515 + 120) and g.cost_usd == pytest.approx(0.52)
    zero = await store.usage_totals(day="2026-01-01", device_id="pi-1")
    assert (zero.calls, zero.tokens, zero.cost_usd) == (0, 0, 0.0)
    rows = await store.usage_by_day(since_day="2026-11-22")
    assert [(r.day, r.device_id, r.calls, r.events) for r in rows] == [
        ("2026-11-22", "pi-1", 1, 1), (DAY, "pi-1", 2, 1), (DAY, "pi-2", 1, 1)]
    (mine,) = await store.usage_by_day(since_day=DAY, device_id="pi-1")
    assert (mine.input_tokens, mine.output_tokens, mine.cache_write_tokens,
            mine.cache_read_tokens) == (110, 25, 200, 300)
    assert await store.has_result("pi-1", 1) is False
    await store.put_result(device_id="pi-1", seq=1, envelope=b"sealed", now=NOW)
    assert await store.has_result("pi-1", 1) is True and not await store.has_result("pi-1", 2)


async def test_limits_are_checked_against_todays_totals(store: Store) -> None:
    section = BudgetSection(device_daily_usd=0.05, device_daily_tokens=0,
                            global_daily_usd=0.0, global_daily_tokens=1000)
    budget = Budget(section, store)
    assert (await budget.check("pi-1", now=NOW)).allowed
    await budget.record(Usage(1000, 0, 0, 0, "claude-haiku-4-5", "a"), device_id="pi-1", seq=1,
                        reasoner="anthropic:claude-haiku-4-5", now=NOW)  # $0.001, 1000 tokens
    d = await budget.check("pi-2", now=NOW)
    assert not d.allowed and d.scope == "global" and "1000 of 1000 tokens" in d.reason
    assert d.retry_at == next_utc_midnight(NOW)
    # Tomorrow is a new day.
    assert (await budget.check("pi-2", now=NOW + 60)).allowed
    section2 = BudgetSection(device_daily_usd=0.001, global_daily_usd=0.0)
    d2 = await Budget(section2, store).check("pi-1", now=NOW)
    assert not d2.allowed and d2.scope == "device" and "pi-1" in d2.reason
    assert (await Budget(section2, store).check("pi-2", now=NOW)).allowed
    unlimited = BudgetSection(device_daily_usd=0, global_daily_usd=0)
    assert (await Budget(unlimited, store).check("pi-1", now=NOW)).allowed


class Edge(random.Random):
    """Every jittered draw at the top (or the bottom) of its range."""

    def __init__(self, top: bool) -> None:
        super().__init__(0)
        self.top = top

    def uniform(self, a: float, b: float) -> float:
        return b if self.top else a


def test_circuit_backs_off_and_recovers() -> None:
    t = [0.0]
    c = Circuit(2.0, 10.0, clock=lambda: t[0], rng=Edge(top=True))  # the upper bound
    assert not c.is_open and c.remaining() == 0
    assert c.trip() == 2.0
    # Other in-flight calls failing in the same outage do not lengthen the wait...
    assert c.trip() == 2.0 and c.failures == 1
    # ...unless the provider asked for longer.
    assert c.trip(retry_after=5.0) == 5.0
    t[0] = 5.0
    assert c.remaining() == 0.0
    assert c.probe_failed() == 4.0 and c.probe_failed() == 8.0 and c.probe_failed() == 10.0
    t[0] = 30.0
    assert c.close() == 30.0 and not c.is_open and c.failures == 0
    # One backoff everywhere (edgekeeper/backoff.py): full jitter, down to no wait at all.
    assert Circuit(2.0, 10.0, rng=Edge(top=False)).trip() == pytest.approx(0.0, abs=0.01)


def test_exponential_retry_delays() -> None:
    top = Backoff(5.0, 300.0, Edge(top=True))
    assert [top.delay_for(a) for a in (1, 2, 3, 8, 20)] == [5.0, 10.0, 20.0, 300.0, 300.0]
    assert top.failures == 0  # an event's attempts are counted by the queue, not here
    assert Backoff(5.0, 300.0, Edge(top=False)).delay_for(3) == 0.0  # full jitter
    assert Backoff(0.0, 300.0).delay_for(3) == 0.0


def test_provisional_actions_are_capped() -> None:
    assert cap_action("alert", "notify") == "notify"
    assert cap_action("log", "notify") == "log"
    assert cap_action("none", "none") == "none"
    assert cap_action("open the door", "log") == "log"  # unknown counts as strongest


async def test_usage_command_shows_cost_per_device_per_day(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "cloud"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cloud]\ndata_dir = "{data}"\n[budget]\ndevice_daily_usd = 0.5\n')
    import time

    today = utc_day(time.time())
    s = await open_store("sqlite", data)
    await s.record_usage(rec("a", device="porch-pi", day=today, cost=0.25))
    await s.record_usage(rec("b", device="porch-pi", seq=2, day=today, cost=0.30))
    await s.record_usage(rec("c", device="gate-pi", day=today, cost=0.01))
    await s.record_usage(rec("d", device="gate-pi", day="2020-01-01", cost=9.0))
    await s.close()
    assert await _run(["--config", str(cfg), "cloud", "usage", "--days", "3"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(today)]
    porch = next(ln for ln in lines if "porch-pi" in ln)
    assert porch.split()[2:4] == ["2", "2"] and "0.5500" in porch
    assert "over the daily limit" in porch
    assert any("gate-pi" in ln and "0.0100" in ln for ln in lines)
    assert "2020-01-01" not in out and "total 0.5600 USD" in out
    assert await _run(["--config", str(cfg), "cloud", "usage", "--device", "gate-pi"]) == 0
    out = capsys.readouterr().out
    assert "porch-pi" not in out and "gate-pi" in out
    assert await _run(["--config", str(cfg), "cloud", "usage", "--device", "bad id!"]) == 3
    assert "not a device id" in capsys.readouterr().err


async def _run(argv: list[str]) -> int:
    import asyncio

    import structlog

    saved = structlog.get_config()
    # The CLI runs its own event loop: give it a thread, as a user's shell would a process.
    try:
        return await asyncio.to_thread(main, argv)
    finally:
        # main() pointed the log at this test's captured stderr, which closes after the test.
        structlog.configure(**saved)
