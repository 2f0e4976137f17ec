"""Results on the device: real ingest on 127.0.0.1, real sealed results in its store, real
subprocess and HTTP actions. The only fake is the local HTTP receiver of the POST action."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from nacl.public import PrivateKey
from test_uplink import DEVICE, Cloud, device_config, enrolled, start_cloud, until

from edgekeeper.backoff import Backoff
from edgekeeper.config import Config
from edgekeeper.device import identity
from edgekeeper.device.results import ResultActions, ResultsClient
from edgekeeper.protocol.envelope import seal_result
from edgekeeper.protocol.messages import ResultBody

from cloudkit import captive_portal


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    c = await start_cloud(tmp_path / "cloud", results_poll_seconds=0.05)
    yield c
    await c.close()


def result(seq: int, label: str = "person") -> ResultBody:
    return ResultBody(
        device_id=DEVICE, seq=seq, reasoner="claude", label=label, confidence=0.8,
        summary=f"a {label} at the door", action="notify", gate_correct=True,
        provisional=False, produced_at=time.time(), extra={"tokens": 812},
    )


async def publish(cloud: Cloud, body: ResultBody, *, sealer: Any = None) -> int:
    """What the cloud worker does: seal for the device, store, durably."""
    device = await cloud.store.get_device(body.device_id)
    assert device is not None
    sealed = seal_result(body, cloud_box_sk=sealer or cloud.keys.box_key,
                         device_box_pk=device.box_pk)
    return await cloud.store.put_result(device_id=body.device_id, seq=body.seq,
                                        envelope=sealed, now=time.time())


async def unacked(cloud: Cloud) -> list[int]:
    return [r.seq for r in await cloud.store.results_after(DEVICE, 0, 100)]


def client(config: Config, actions: ResultActions, e: identity.Enrollment,
           **kw: Any) -> ResultsClient:
    return ResultsClient(
        actions,
        keys=identity.load_keys(config.device.state_dir),
        device_id=config.device.id,
        cloud_url=e.cloud_url,
        cloud_box_pk=e.cloud.box_pk,
        section=config.results,
        **kw,
    )


class Receiver:
    """A local HTTP endpoint for the POST action; fails the first ``fail_first`` requests."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.requests: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.requests.append(doc)
        if len(self.requests) <= self.fail_first:
            return web.Response(status=500, text="busy")
        return web.json_response({"ok": True})

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def recorder(out: Path, fail_until: int = 0) -> list[str]:
    """A command that appends its stdin to ``out``; exits 1 on its first ``fail_until`` runs."""
    script = (
        "import sys, pathlib\n"
        f"out = pathlib.Path({str(out)!r})\n"
        "runs = out.with_suffix('.runs')\n"
        "n = int(runs.read_text()) + 1 if runs.exists() else 1\n"
        "runs.write_text(str(n))\n"
        "data = sys.stdin.read()\n"
        f"if n <= {fail_until}:\n"
        "    print('printer on fire', file=sys.stderr); sys.exit(1)\n"
        "with out.open('a') as f: f.write(data + '\\n')\n"
    )
    return [sys.executable, "-c", script]


async def test_all_three_actions_run_then_the_result_is_acked(
    cloud: Cloud, tmp_path: Path
) -> None:
    out = tmp_path / "cmd.out"
    async with Receiver() as hook:
        config = device_config(
            tmp_path, results={"command": recorder(out), "post_url": hook.url}
        )
        e = await enrolled(cloud, config)
        await publish(cloud, result(7))
        await publish(cloud, result(9, "parcel"))
        assert await unacked(cloud) == [7, 9]
        actions = ResultActions.from_config(config)
        async with client(config, actions, e) as rc:
            report = await rc.poll_once()
        await actions.close()
    assert (report.received, report.handled, report.acked) == (2, 2, 2)
    assert await unacked(cloud) == []  # acked only after handling
    lines = [json.loads(x) for x in
             (config.device.state_dir / "results.jsonl").read_text().splitlines()]
    assert [(d["seq"], d["label"], d["provisional"]) for d in lines] == [
        (7, "person", False), (9, "parcel", False)]
    assert lines[0]["summary"] == "a person at the door" and lines[0]["result_id"] >= 1
    from_cmd = [json.loads(x) for x in out.read_text().splitlines()]
    assert [d["seq"] for d in from_cmd] == [7, 9]
    assert [d["seq"] for d in hook.requests] == [7, 9]
    assert (config.device.state_dir / "results.jsonl").stat().st_mode & 0o777 == 0o600


async def test_failing_action_is_retried_then_recorded_failed_and_acked(
    cloud: Cloud, tmp_path: Path
) -> None:
    out = tmp_path / "cmd.out"
    config = device_config(
        tmp_path, results={"command": recorder(out, fail_until=100), "retries": 2}
    )
    e = await enrolled(cloud, config)
    await publish(cloud, result(3))
    actions = ResultActions.from_config(config)
    async with client(config, actions, e) as rc:
        report = await rc.poll_once()
    assert (report.failed, report.acked) == (1, 1)
    assert out.with_suffix(".runs").read_text() == "3"  # first try + 2 retries
    entry = await actions.ledger.get("cloud:3")
    assert entry is not None and entry.status == "failed"
    assert entry.error is not None and "printer on fire" in entry.error
    # The other action still ran; the cloud no longer holds the result.
    assert (config.device.state_dir / "results.jsonl").read_text().count("\n") == 1
    assert await unacked(cloud) == []
    await actions.close()


async def test_flaky_post_succeeds_on_retry(cloud: Cloud, tmp_path: Path) -> None:
    async with Receiver(fail_first=2) as hook:
        config = device_config(tmp_path, results={"post_url": hook.url, "retries": 3,
                                                  "jsonl": ""})
        e = await enrolled(cloud, config)
        await publish(cloud, result(4))
        actions = ResultActions.from_config(config)
        async with client(config, actions, e) as rc:
            report = await rc.poll_once()
        await actions.close()
    assert (report.handled, report.acked) == (1, 1)
    assert len(hook.requests) == 3
    assert not (config.device.state_dir / "results.jsonl").exists()  # disabled


async def test_redelivered_result_is_not_handled_twice(cloud: Cloud, tmp_path: Path) -> None:
    config = device_config(tmp_path)
    e = await enrolled(cloud, config)
    await publish(cloud, result(5))
    actions = ResultActions.from_config(config)
    # The device handled it, then died before its ack reached the cloud.
    assert await actions.handle("cloud:5", result(5), result_id=1) == "handled"
    async with client(config, actions, e) as rc:
        report = await rc.poll_once()
    assert (report.already, report.handled, report.acked) == (1, 0, 1)
    assert (config.device.state_dir / "results.jsonl").read_text().count("\n") == 1
    assert await unacked(cloud) == []
    await actions.close()


async def test_forged_result_never_reaches_an_action(cloud: Cloud, tmp_path: Path) -> None:
    config = device_config(tmp_path)
    e = await enrolled(cloud, config)
    # Someone who can write to the results store but does not hold the cloud's box key.
    await publish(cloud, result(6, "all clear"), sealer=PrivateKey.generate())
    await publish(cloud, result(8))
    actions = ResultActions.from_config(config)
    async with client(config, actions, e) as rc:
        report = await rc.poll_once()
    assert (report.rejected, report.handled, report.acked) == (1, 1, 2)
    lines = (config.device.state_dir / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [8]
    rejected = [x for x in await actions.ledger.entries() if x.status == "rejected"]
    assert len(rejected) == 1 and rejected[0].error and "auth_failed" in rejected[0].error
    await actions.close()


async def test_long_poll_returns_when_a_result_arrives(cloud: Cloud, tmp_path: Path) -> None:
    config = device_config(tmp_path)
    e = await enrolled(cloud, config)
    actions = ResultActions.from_config(config)
    async with client(config, actions, e) as rc:
        poll = asyncio.create_task(rc.poll_once(wait=20))
        await asyncio.sleep(0.1)
        assert not poll.done()  # held open: nothing to return yet
        await publish(cloud, result(11))
        report = await poll
    assert (report.received, report.handled) == (1, 1)
    await actions.close()


async def test_run_handles_results_until_stopped(cloud: Cloud, tmp_path: Path) -> None:
    # Short: the ingest holds an abandoned long-poll open until it expires, even at shutdown.
    config = device_config(tmp_path, results={"poll_wait_seconds": 2})
    e = await enrolled(cloud, config)
    actions = ResultActions.from_config(config)
    jsonl = config.device.state_dir / "results.jsonl"
    stop = asyncio.Event()
    async with client(config, actions, e) as rc:
        task = asyncio.create_task(rc.run(stop))
        for seq in (1, 2, 3):
            await publish(cloud, result(seq))

        def handled() -> bool:
            return jsonl.exists() and jsonl.read_text().count("\n") == 3

        async def all_handled() -> bool:
            return await asyncio.to_thread(handled)

        await until(all_handled)
        stop.set()  # interrupts the long-poll in flight
        await task
    assert await unacked(cloud) == []
    await actions.close()


async def test_revoked_device_is_refused_results(cloud: Cloud, tmp_path: Path) -> None:
    from edgekeeper.device.results import ResultsRefused

    config = device_config(tmp_path)
    e = await enrolled(cloud, config)
    await publish(cloud, result(1))
    await cloud.store.revoke(DEVICE, now=time.time())

    async def revoked() -> bool:
        dev = await cloud.server.state.registry.get(DEVICE)
        return dev is not None and dev.revoked

    await until(revoked)
    actions = ResultActions.from_config(config)
    async with client(config, actions, e) as rc:
        with pytest.raises(ResultsRefused, match="device_revoked"):
            await rc.poll_once()
    assert not (config.device.state_dir / "results.jsonl").exists()
    await actions.close()


async def test_command_timeout_counts_as_failure(tmp_path: Path) -> None:
    actions = ResultActions(
        tmp_path / "ledger.sqlite",
        command=(sys.executable, "-c", "import time; time.sleep(30)"),
        command_timeout=0.3, retries=1, retry_delay=0.0,
    )
    assert await actions.handle("cloud:1", result(1)) == "failed"
    entry = await actions.ledger.get("cloud:1")
    assert entry is not None and entry.error and "longer than 0.3 s" in entry.error
    await actions.close()


async def test_skewed_clock_is_corrected_from_the_cloud_date(cloud: Cloud, tmp_path: Path) -> None:
    from edgekeeper.device.results import ResultsUnavailable

    config = device_config(tmp_path)
    e = await enrolled(cloud, config)
    await publish(cloud, result(2))
    actions = ResultActions.from_config(config)
    async with client(config, actions, e, clock=lambda: time.time() + 7200.0) as rc:
        with pytest.raises(ResultsUnavailable) as err:
            await rc.poll_once()
        assert err.value.code == "stale" and err.value.retry_after == 0.0
        assert rc.clock_offset == pytest.approx(-7200.0, abs=3.0)
        report = await rc.poll_once()  # signed with the cloud's time now
    assert (report.handled, report.acked) == (1, 1)
    await actions.close()


async def test_a_captive_portal_is_backed_off_not_a_crash(cloud: Cloud, tmp_path: Path) -> None:
    """A hotel Wi-Fi answers 200 with a login page: the results channel must treat it like a
    cloud that is not there yet (back off, ask again), not die on the HTML."""
    from edgekeeper.device.results import ResultsUnavailable

    async with captive_portal() as (portal_url, hits):
        config = device_config(tmp_path, results={"poll_wait_seconds": 1})
        e = await enrolled(cloud, config)
        actions = ResultActions.from_config(config)
        portal_e = dataclasses.replace(e, cloud_url=portal_url)
        async with client(config, actions, portal_e) as rc:
            rc.backoff = Backoff(0.02, 0.1)  # the default waits seconds between polls
            with pytest.raises(ResultsUnavailable) as err:
                await rc.poll_once()
            assert err.value.code == "unexpected_answer" and "hotel Wi-Fi" in str(err.value)
            stop = asyncio.Event()
            task = asyncio.create_task(rc.run(stop))

            async def asked_again() -> bool:
                return len(hits) >= 3 or task.done()

            await until(asked_again)
            assert not task.done()  # still polling, not crashed
            stop.set()
            await task
        await actions.close()


async def test_the_ledger_forgets_results_older_than_ledger_keep_days(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    actions = ResultActions(tmp_path / "results.sqlite", jsonl=tmp_path / "r.jsonl",
                            keep_days=30, clock=lambda: now[0])
    assert await actions.handle("cloud:1", result(1)) == "handled"
    now[0] += 10 * 86400
    assert await actions.handle("cloud:2", result(2)) == "handled"
    assert await actions.handle("cloud:1", result(1)) == "already"  # a redelivery: not rerun
    now[0] += 25 * 86400  # 35 days after the first, 25 after the second
    assert await actions.handle("cloud:3", result(3)) == "handled"
    assert [e.key for e in await actions.ledger.entries()] == ["cloud:2", "cloud:3"]
    await actions.close()
    # keep forever
    forever = ResultActions(tmp_path / "forever.sqlite", jsonl=None, keep_days=0,
                            clock=lambda: now[0])
    await forever.handle("cloud:1", result(1))
    now[0] += 1000 * 86400
    await forever.handle("cloud:2", result(2))
    assert len(await forever.ledger.entries()) == 2
    await forever.close()


def test_ledger_keep_days_is_validated() -> None:
    from edgekeeper.config import build_from_dict
    from edgekeeper.errors import ConfigError

    with pytest.raises(ConfigError, match="ledger_keep_days"):
        build_from_dict({"results": {"ledger_keep_days": -1}}, source="t.toml")
