"""The operator key (cloud/keys.py): result summaries are sealed to it, so a stolen store --
the SQLite files read byte by byte, or the PostgreSQL table read directly -- holds no label or
summary text, while `edgekeeper cloud results` with the key shows them. Real ingest on
127.0.0.1, real worker, both store backends."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from edgekeeper import log
from edgekeeper.cloud.keys import CloudKeys
from edgekeeper.errors import ConfigError

from cloudkit import cli, cloud_on, make_event, operator_shell, reason_queued, running_cloud

# Distinctive enough that finding it in the bytes can only mean the plaintext is there.
LABEL = "zebra-okapi-7q"


async def stolen_bytes(cloud: Any, backend: str) -> bytes:
    """Everything a thief of the store gets: every file under the data dir but the keys
    directory (SQLite and its WAL), or every row of the summaries table (PostgreSQL)."""
    if backend == "postgres":
        import psycopg

        async with await psycopg.AsyncConnection.connect(cloud.section.postgres_dsn) as conn:
            cur = await conn.execute("SELECT * FROM sealed_summaries")
            rows = await cur.fetchall()
            assert rows  # the table holds the summaries, sealed
            old = await conn.execute("SELECT to_regclass('result_summaries')")
            assert (await old.fetchone()) == (None,)  # the plaintext table is gone
            return repr(rows).encode()

    def read() -> bytes:
        return b"".join(p.read_bytes() for p in sorted(cloud.data_dir.rglob("*"))
                        if p.is_file() and "keys" not in p.parts)

    return await asyncio.to_thread(read)


async def test_a_stolen_store_reveals_no_summary_and_the_operator_key_opens_them(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with cloud_on(backend, tmp_path=tmp_path, request=request,
                        monkeypatch=monkeypatch) as cloud:
        op_key = tmp_path / "operator" / "operator.key"  # the operator's own machine

        def run(args: list[str]) -> tuple[int, str, str]:
            return cli(args, capsys)

        code, out, err = await asyncio.to_thread(
            run, ["cloud", "keys", "operator", "--out", str(op_key)])
        assert code == 0, err
        assert op_key.stat().st_mode & 0o077 == 0
        assert (cloud.data_dir / "keys" / "operator.pub").exists()
        assert not (cloud.data_dir / "keys" / "operator.key").exists()
        # A second pair would orphan what was sealed to the first: refused, clearly.
        code, _, err = await asyncio.to_thread(run, ["cloud", "keys", "operator"])
        assert code == ConfigError.exit_code and "already exists" in err
        assert "Traceback" not in err

        door = await cloud.enroll("pi-door")
        for seq in (1, 2):
            status, _, _ = await cloud.post_envelope(door.seal(make_event("pi-door", seq,
                                                                          label=LABEL)))
            assert status == 202
        keys = await asyncio.to_thread(CloudKeys.load, cloud.data_dir)  # sees operator.pub
        assert keys.operator_pk is not None
        assert await reason_queued(cloud, keys) == 2

        stolen = await stolen_bytes(cloud, backend)
        assert LABEL.encode() not in stolen
        assert b"no reasoner has looked at it" not in stolen  # the echo reasoner's summary

        code, out, err = await asyncio.to_thread(
            run, ["cloud", "results", "--json", "--operator-key", str(op_key)])
        assert code == 0, err
        docs = [json.loads(line) for line in out.splitlines()]
        assert [(d["seq"], d["label"]) for d in docs] == [(1, LABEL), (2, LABEL)]
        assert all("no reasoner has looked at it" in d["summary"] for d in docs)
        code, out, _ = await asyncio.to_thread(
            run, ["cloud", "devices", "--json", "--operator-key", str(op_key)])
        (device,) = map(json.loads, out.splitlines())
        assert device["last_result"]["label"] == LABEL and device["events"] == 2

        # Without the key (the default path holds none): one clear error naming the fix.
        code, out, err = await asyncio.to_thread(run, ["cloud", "results"])
        assert code == ConfigError.exit_code and out == ""
        assert "operator.key" in err and "--operator-key" in err and "Traceback" not in err
        # The devices list still works, its last results shown as sealed.
        code, out, _ = await asyncio.to_thread(run, ["cloud", "devices"])
        assert code == 0 and "(sealed)" in out and LABEL not in out
        # Another operator's key is refused before anything is opened.
        code, _, err = await asyncio.to_thread(run, ["cloud", "keys", "operator", "--out",
                                                     str(tmp_path / "x.key")])
        assert code == ConfigError.exit_code
        from nacl.public import PrivateKey

        from edgekeeper.protocol.keys import write_secret
        wrong = tmp_path / "wrong.key"
        await asyncio.to_thread(write_secret, wrong, bytes(PrivateKey.generate()))
        code, _, err = await asyncio.to_thread(
            run, ["cloud", "results", "--operator-key", str(wrong)])
        assert code == ConfigError.exit_code and "does not match" in err


async def test_without_an_operator_key_the_worker_stores_no_summary_and_says_so_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_cloud(tmp_path) as cloud:
        assert cloud.keys.operator_pk is None
        door = await cloud.enroll("pi-door")
        for seq in (1, 2, 3):
            status, _, _ = await cloud.post_envelope(door.seal(make_event("pi-door", seq)))
            assert status == 202
        log.configure("info", "json")  # worker.reasoned is an INFO line (conftest resets it)
        with capture_logs() as logs:
            assert await reason_queued(cloud) == 3
        told = [e for e in logs if e["event"] == "worker.no_operator_key"]
        assert len(told) == 1 and "cloud keys operator" in told[0]["fix"]
        done = [e for e in logs if e["event"] == "worker.reasoned"]
        assert [e["seq"] for e in done] == [1, 2, 3] and all(e["log_level"] == "info"
                                                            for e in done)
        assert await cloud.store.result_summaries() == []
        assert len(await cloud.store.results_after("pi-door", 0, 10)) == 3  # results still go

        # The first `cloud results` of a cloud without any operator key creates the pair.
        operator_shell(monkeypatch, cloud.data_dir)
        code, out, err = await asyncio.to_thread(cli, ["cloud", "results"], capsys)
        assert code == 0 and out.strip() == "no results"
        assert "created the operator key" in err
        assert (cloud.data_dir / "keys" / "operator.key").exists()
        loaded = await asyncio.to_thread(CloudKeys.load, cloud.data_dir)
        assert loaded.operator_pk is not None


async def test_a_device_heartbeat_reaches_cloud_devices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_uplink import device_config, enrolled, start_cloud

    from edgekeeper.device.uplink import DeviceLink
    from edgekeeper.protocol.envelope import sign_request

    cloud = await start_cloud(tmp_path / "cloud")
    try:
        config = device_config(tmp_path, uplink={"heartbeat_seconds": 5},
                               results={"poll_wait_seconds": 2})
        await enrolled(cloud, config)
        beat = {"models": {"person": "1.2.0"}, "backlog": {"pending": 3, "bytes": 6144},
                "last_error": "camera: no frame for 12 s",
                "camera": {"state": "down", "age_s": 12.0},
                "microphone": {"state": "off", "age_s": None}}
        async with await DeviceLink.open(config) as link:
            assert link.results is not None and link.results.heartbeat_s == 5
            link.results.heartbeat = lambda: beat
            stop = asyncio.Event()
            running = asyncio.create_task(link.run(stop))

            async def arrived() -> bool:
                (a,) = await cloud.store.device_activity()
                return a.heartbeat is not None

            from cloudkit import until
            await until(arrived)
            stop.set()
            await running
        (activity,) = await cloud.store.device_activity()
        assert json.loads(activity.heartbeat or "") == beat
        assert activity.heartbeat_at is not None and activity.last_seen is None  # no events

        operator_shell(monkeypatch, cloud.data_dir)
        code, out, err = await asyncio.to_thread(cli, ["cloud", "devices", "--json"], capsys)
        assert code == 0, err
        (doc,) = map(json.loads, out.splitlines())
        assert doc["heartbeat"] == beat and doc["last_seen"] == activity.heartbeat_at
        code, out, _ = await asyncio.to_thread(cli, ["cloud", "devices"], capsys)
        header, row = out.splitlines()
        assert "BACKLOG" in header and "CAMERA" in header
        assert "person=1.2.0" in row and " down " in row and row.endswith(
            "camera: no frame for 12 s")

        # The same signature as the results requests: an unsigned or oversized one is refused.
        import aiohttp

        from edgekeeper.device import identity
        keys = await asyncio.to_thread(identity.load_keys, config.device.state_dir)
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"{cloud.url}/v1/heartbeat", json=beat)
            assert resp.status == 401
            big = json.dumps({"models": {}, "pad": "x" * 9000}).encode()
            headers = sign_request(keys, device_id=config.device.id, method="POST",
                                   path="/v1/heartbeat", query="", body=big,
                                   timestamp=time.time())
            headers["Content-Type"] = "application/json"
            resp = await session.post(f"{cloud.url}/v1/heartbeat", data=big, headers=headers)
            assert resp.status == 413
    finally:
        await cloud.close()


@pytest.mark.slow
async def test_a_running_device_sends_its_state_as_a_heartbeat(
    tmp_path: Path, sample_recording: Path,
) -> None:
    """A real `edgekeeper run` process (camera: an MJPEG server on 127.0.0.1) enrolled with a
    real ingest: its heartbeat carries its models, backlog and camera state."""
    from test_uplink import start_cloud

    from edgekeeper import compat
    from edgekeeper import config as config_mod
    from edgekeeper.device import identity

    from devicekit import device, device_toml, mjpeg_camera

    cloud = await start_cloud(tmp_path / "cloud")
    try:
        cfg = device_toml(tmp_path, "CAMERA", "heartbeat_seconds = 5\n")
        cfg.write_text(cfg.read_text().replace('mode = "local-only"', 'mode = "cloud"'))
        config = await asyncio.to_thread(config_mod.load, cfg)
        await identity.enroll(cloud.url, await cloud.token(), device_id=config.device.id,
                              state_dir=config.device.state_dir)
        async with mjpeg_camera(sample_recording) as cam:
            cfg.write_text(cfg.read_text().replace("CAMERA", cam.url))
            async with device(cfg) as p:

                async def camera_up() -> dict[str, Any]:
                    while True:  # the first heartbeat may go before the first frame
                        (a,) = await cloud.store.device_activity()
                        doc = json.loads(a.heartbeat) if a.heartbeat else {}
                        if doc.get("camera", {}).get("state") == "up":
                            return doc
                        assert p.proc.returncode is None, p.text()
                        await asyncio.sleep(0.2)

                async with compat.timeout(60):
                    beat = await camera_up()
        assert beat["models"]["vision"].startswith("person@")
        assert beat["camera"]["age_s"] < 30 and beat["microphone"]["state"] == "off"
        assert set(beat["backlog"]) == {"pending", "bytes"}
        assert set(beat) == {"sent_at", "models", "backlog", "last_error", "camera",
                             "microphone"}  # metadata only
    finally:
        await cloud.close()
