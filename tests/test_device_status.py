"""`edgekeeper device status` shows what the running service publishes (device/status.py):
camera and microphone, frames/s, last frame, trigger and event, models, outbox, disk and
enrollment; and `edgekeeper run` refuses to start unenrolled unless local-only is set on purpose.
The device is a real `edgekeeper run` process; the camera an MJPEG server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekeeper import compat
from edgekeeper import config as config_mod
from edgekeeper.cli import main
from edgekeeper.device.status import EX_CONFIG, read_status
from edgekeeper.device.uplink import open_outbox

from devicekit import device, device_toml, mjpeg_camera


def status(capsys: pytest.CaptureFixture[str], cfg: Path, *args: str) -> tuple[int, str]:
    code = main(["--config", str(cfg), "device", "status", *args])
    return code, capsys.readouterr().out


def test_an_unenrolled_device_refuses_to_run_and_says_how_to_enroll(
    tmp_path: Path, sample_recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "device.toml"
    state = tmp_path / "state"
    cfg.write_text(f'[device]\nid = "porch"\nstate_dir = "{state}"\n'
                   f'[camera]\nsource = "{sample_recording / "video.avi"}"\n')
    run = subprocess.run([sys.executable, "-m", "edgekeeper.cli", "--config", str(cfg), "run"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EDGEKEEPER_LOG_FORMAT": "json"})
    assert run.returncode == EX_CONFIG == 78, run.stderr
    logged = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    errors = [d for d in logged if d["level"] == "error"]
    assert [d["event"] for d in errors] == ["device.not_enrolled"], run.stderr
    fix = str(errors[0]["fix"])
    assert f"EDGEKEEPER_STATE_DIR={state}" in fix and "device enroll --cloud" in fix
    assert str(cfg) in fix and 'mode = "local-only"' in fix
    assert "gate.loaded" not in run.stderr  # refused before loading anything
    assert "fix:" in run.stderr and "Traceback" not in run.stderr

    code, out = status(capsys, cfg)
    assert code == 0 and "NOT ENROLLED" in out and "refuses to start" in out, out
    assert "device enroll --cloud" in out
    code, out = status(capsys, cfg, "--json")
    doc = json.loads(out)
    assert doc["enrollment_missing"] is True and doc["enrolled"] is None
    assert doc["mode"] == "cloud" and doc["service"] is None

    cfg.write_text(cfg.read_text() + '[uplink]\nmode = "local-only"\n')
    code, out = status(capsys, cfg, "--json")
    assert code == 0 and json.loads(out)["enrollment_missing"] is False


@pytest.mark.slow
async def test_status_shows_what_the_running_service_publishes(
    tmp_path: Path, sample_recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = device_toml(tmp_path, "CAMERA")
    config = await asyncio.to_thread(config_mod.load, cfg)
    async with mjpeg_camera(sample_recording) as cam:
        cfg.write_text(cfg.read_text().replace("CAMERA", cam.url))
        async with device(cfg) as p:
            await p.logged("trigger.fired")  # the street recording shows people

            async def published() -> dict[str, object]:
                while True:
                    doc = await asyncio.to_thread(read_status, config)
                    if doc and doc["running"] and doc["last_trigger"] and doc["frames_per_second"]:
                        return doc
                    assert p.proc.returncode is None, p.text()
                    await asyncio.sleep(0.2)

            async with compat.timeout(60):
                await published()
            code = await asyncio.to_thread(main, ["--config", str(cfg), "device", "status",
                                                  "--json"])
            doc = json.loads(capsys.readouterr().out)
            assert code == 0
            service = doc["service"]
            assert service["running"] and service["healthy"], service
            assert service["pid"] == p.proc.pid and service["mode"] == "local-only"
            assert service["camera"]["state"] == "ok" and service["camera"]["source"] == cam.url
            assert service["microphone"]["state"] == "off"
            assert service["frames_per_second"] > 0
            assert time.time() - service["last_frame_at"] < 30
            assert service["last_trigger"]["label"] == "person"
            assert service["models"]["vision"].startswith("person@")
            assert service["disk"]["free_bytes"] > 0
            assert service["enrollment"] is None and service["counts"]["frames"] > 0

            await asyncio.to_thread(main, ["--config", str(cfg), "device", "status"])
            out = capsys.readouterr().out
            assert "service:       running" in out and "healthy" in out, out
            assert "camera:        ok" in out and "last trigger:  person" in out, out
            assert "models:        vision person@" in out, out

            p.proc.send_signal(signal.SIGTERM)
            assert await p.exited() == 0, p.text()
    await asyncio.to_thread(main, ["--config", str(cfg), "device", "status"])
    out = capsys.readouterr().out
    assert "service:       not running" in out and "stopped" in out, out


def test_status_shows_the_quota_the_outbox_applies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A quota larger than the disk is lowered by the outbox; status shows that one."""
    cfg = tmp_path / "device.toml"
    cfg.write_text(f'[device]\nid = "porch"\nstate_dir = "{tmp_path / "state"}"\n'
                   "[outbox]\nquota_mb = 1000000\n")
    config = config_mod.load(cfg)
    with open_outbox(config) as ob:
        applied = ob.stats().quota_bytes
    code, out = status(capsys, cfg, "--json")
    doc = json.loads(out)
    # The outbox's own figure (it follows the disk's free space, which others change meanwhile),
    # not the configured one.
    assert doc["configured_quota_bytes"] == 1000000 * 1024 ** 2
    assert doc["quota_bytes"] == pytest.approx(applied, rel=0.01)
    assert doc["quota_bytes"] < doc["configured_quota_bytes"] and doc["disk_short"] is True
    code, out = status(capsys, cfg)
    assert code == 0 and "MiB instead of the configured 1000000 MiB" in out, out
    assert "warning: the disk has less" in out
