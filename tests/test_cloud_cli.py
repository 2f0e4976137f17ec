"""The `edgekeeper cloud` commands as an operator runs them: token, devices, revoke, keys, worker
--burst in-process through the real CLI entry point, and `cloud serve` as a real process on
127.0.0.1 that enrolls a device, takes an event and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgekeeper.cli import main
from edgekeeper.protocol import envelope as E
from edgekeeper.protocol.keys import CloudPublicKeys, DeviceKeys, b64e

from cloudkit import make_event


@pytest.fixture
def cloud_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "cloud"
    # The CLI reads its config from the environment, as systemd units set it.
    monkeypatch.setenv("EDGEKEEPER_CLOUD_DATA_DIR", str(data))
    monkeypatch.setenv("EDGEKEEPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EDGEKEEPER_REASONER", "echo")  # no LLM here
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
    return data


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, data: bytes, content_type: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_admin_commands(cloud_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["cloud", "keys"], capsys)
    assert code == 0 and "box_pk" in out and "release signing key: present" in out
    for name in ("cloud-box.key", "release-sign.key"):
        assert (cloud_env / "keys" / name).stat().st_mode & 0o777 == 0o600
    code, out, err = run(["cloud", "token", "--ttl", "60"], capsys)
    assert code == 0 and len(out.strip()) >= 40 and "valid once" in err
    assert out.strip() not in err
    code, out, _ = run(["cloud", "devices"], capsys)
    assert (code, out.strip()) == (0, "no devices enrolled")
    code, _, err = run(["cloud", "revoke", "ghost"], capsys)
    assert code == 3 and "no device 'ghost'" in err and "Traceback" not in err
    code, _, err = run(["cloud", "token", "--ttl", "-5"], capsys)
    assert code == 3 and "--ttl" in err
    code, out, _ = run(["cloud", "worker", "--burst"], capsys)
    assert code == 0 and "done 0" in out


def test_serve_enroll_upload_revoke_and_sigterm(
    cloud_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, token, _ = run(["cloud", "token"], capsys)
    assert code == 0
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgekeeper.cli", "cloud", "serve", "--port", str(port)],
        env={**os.environ, "EDGEKEEPER_LOG_FORMAT": "json"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # wait until it listens (a rendezvous, not a timing assertion)
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as resp:
                    assert json.loads(resp.read())["status"] == "ok"
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
        keys = DeviceKeys.generate()
        status, body = post(f"{base}/v1/enroll", json.dumps(
            {"token": token.strip(), "device_id": "pi-cli", "sign_pk": b64e(keys.sign_pk),
             "box_pk": b64e(keys.box_pk)}).encode(), "application/json")
        assert status == 201, body
        cloud = CloudPublicKeys.from_json(body["cloud"])
        env = E.seal_event(make_event("pi-cli", 1), device=keys, cloud_box_pk=cloud.box_pk,
                           sent_at=time.time(), model_version="m@1")
        assert post(f"{base}/v1/events", env, E.CONTENT_TYPE) == (
            202, {"status": "queued", "device_id": "pi-cli", "seq": 1})
        code, out, _ = run(["cloud", "devices"], capsys)
        assert "pi-cli" in out and out.count("\n") == 2
        code, out, _ = run(["cloud", "revoke", "pi-cli"], capsys)
        assert (code, out.strip()) == (0, "pi-cli: revoked")
        env2 = E.seal_event(make_event("pi-cli", 2), device=keys, cloud_box_pk=cloud.box_pk,
                            sent_at=time.time(), model_version="m@1")
        queued = 1
        for _ in range(200):  # the serving process notices within registry_refresh_seconds
            status, body = post(f"{base}/v1/events", env2, E.CONTENT_TYPE)
            if status == 401:
                break
            queued += body["status"] == "queued"  # racing the revocation: accepted once
            time.sleep(0.05)
        assert status == 401 and body["error"]["code"] == "device_revoked"  # type: ignore[index]
        # Port taken: one clear error, no traceback.
        code, _, err = run(["cloud", "serve", "--port", str(port)], capsys)
        assert code == 2 and "cannot listen" in err and "Traceback" not in err
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
    # The queued event survived the shutdown (the worker finds it).
    code, out, _ = run(["cloud", "worker", "--burst"], capsys)
    # Revoked since: every queued event is dead-lettered (kept for inspection), none lost.
    assert code == 0 and f"done 0, retried 0, dead-lettered {queued}" in out


async def test_status_shows_the_backlog_and_the_files_on_disk(
    cloud_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgekeeper.cloud.queue.base import QueuedEvent
    from edgekeeper.cloud.queue.sqlite import SQLiteQueue

    q = await SQLiteQueue.open(cloud_env / "queue.sqlite")
    try:
        for seq in (1, 2, 3):
            envelope = bytes([seq]) * 20_000
            await q.enqueue(QueuedEvent("pi-1", seq, hashlib.sha256(envelope).digest(),
                                        envelope, time.time()))
        (lease,) = await q.lease("w", count=1, visibility_s=60)
        await q.dead_letter(lease, reason="test")
        await q.lease("w", count=1, visibility_s=60)
    finally:
        await q.close()
    code, out, err = await asyncio.to_thread(run, ["cloud", "status", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert {k: doc[k] for k in ("backend", "ready", "leased", "dead", "dedupe_keys")} == {
        "backend": "sqlite", "ready": 1, "leased": 1, "dead": 1, "dedupe_keys": 3}
    assert doc["disk"]["segments"] == 1 and doc["disk"]["segment_bytes"] > 60_000
    code, out, _ = await asyncio.to_thread(run, ["cloud", "status"], capsys)
    assert code == 0
    assert "1 ready, 1 leased, 1 dead, 3 dedupe keys" in out and "1 segment(s)" in out
    assert "edgekeeper cloud dlq" in out
