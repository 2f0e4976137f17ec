"""`edgekeeper device|cloud install|uninstall` (edgekeeper/install.py) into a throwaway root: the
files and modes the units expect, ExecStart on the chosen venv, the operator's config never
overwritten, a second run that changes nothing, data kept by uninstall unless --purge --yes, and
a board enrolled against a real ingest on 127.0.0.1 into <root>/var/lib/edgekeeper.

Every test passes --root (a tmp_path): nothing here touches the real system, even run as root
(useradd, chown and systemctl happen only for --root /)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgekeeper import install
from edgekeeper.cli import main

from cloudkit import Cloud, running_cloud

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    assert "--root" in args  # never the real system
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def changed(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("changed")]


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    return {str(p.relative_to(root)): (mode(p), p.stat().st_mtime_ns,
                                       p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_device_install_lays_out_the_units_files_and_a_second_run_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    rc, out, _ = run_cli(capsys, "device", "install", "--root", str(root),
                         "--venv-from", "CURRENT")
    assert rc == 0
    assert mode(root / "etc/edgekeeper") == 0o755
    cfg = root / "etc/edgekeeper/device.toml"
    assert mode(cfg) == 0o640
    assert cfg.read_bytes() == (ROOT / "examples/device.toml").read_bytes()
    assert mode(root / "var/lib/edgekeeper") == 0o700
    unit = root / "etc/systemd/system/edgekeeper-device.service"
    assert mode(unit) == 0o644
    exe = Path(sys.prefix) / "bin" / "edgekeeper"
    assert (f"ExecStart={exe} --config /etc/edgekeeper/device.toml run"
            in unit.read_text().splitlines())
    # Not the real system: the user and systemctl are left to the operator, with the command.
    assert "skip    system user edgekeeper" in out and "useradd --system" in out
    assert "systemctl enable edgekeeper-device.service" in out
    assert not (root / "opt").exists()  # --venv-from CURRENT creates no venv
    assert "note    not enrolled: the service will not start" in out

    before = snapshot(root)
    rc, out, _ = run_cli(capsys, "device", "install", "--root", str(root),
                         "--venv-from", "CURRENT")
    assert rc == 0 and changed(out) == [] and "(0 changes)" in out
    assert snapshot(root) == before


def test_the_operators_config_is_never_overwritten_and_a_newer_example_is_pointed_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    cfg = root / "etc/edgekeeper/device.toml"
    assert run_cli(capsys, "device", "install", "--root", str(root), "--no-venv")[0] == 0
    edited = '[device]\nid = "barn-pi"\n'
    cfg.write_text(edited)
    os.utime(cfg, (1_000_000_000, 1_000_000_000))  # older than the shipped example
    rc, out, _ = run_cli(capsys, "device", "install", "--root", str(root), "--no-venv")
    assert rc == 0 and cfg.read_text() == edited and changed(out) == []
    assert f"diff -u {cfg} {ROOT / 'examples/device.toml'}" in out
    # --no-venv: the units start the venv the operator is told to create.
    unit = (root / "etc/systemd/system/edgekeeper-device.service").read_text()
    assert f"ExecStart={install.UNIT_EXE} --config" in unit
    assert "python3 -m venv /opt/edgekeeper/.venv" in out


def test_a_config_that_does_not_parse_stops_the_install_before_the_units(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    cfg = root / "etc/edgekeeper/device.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("[camera]\nfps = 'fast'\n")
    rc, _, err = run_cli(capsys, "device", "install", "--root", str(root), "--no-venv")
    assert rc == 2 and "Traceback" not in err
    assert "camera.fps" in err and "fix:" in err
    assert not (root / "etc/systemd/system/edgekeeper-device.service").exists()


def test_cloud_install_dry_run_then_install_then_uninstall_keeps_data_unless_purged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    rc, out, _ = run_cli(capsys, "cloud", "install", "--root", str(root), "--no-venv",
                         "--dry-run")
    assert rc == 0 and not root.exists() and changed(out) == []
    assert "would   file /etc/edgekeeper/cloud.toml" in out

    assert run_cli(capsys, "cloud", "install", "--root", str(root), "--no-venv")[0] == 0
    data = root / "var/lib/edgekeeper-cloud"
    assert mode(data) == 0o700 and mode(root / "etc/edgekeeper/worker.env") == 0o600
    units = root / "etc/systemd/system"
    for name in ("edgekeeper-cloud.service", "edgekeeper-worker@.service"):
        assert "ExecStart=/opt/edgekeeper/.venv/bin/edgekeeper --config " \
               "/etc/edgekeeper/cloud.toml cloud" in (units / name).read_text()
    (data / "store.sqlite").write_bytes(b"results")

    rc, out, _ = run_cli(capsys, "cloud", "uninstall", "--root", str(root))
    assert rc == 0 and not (units / "edgekeeper-cloud.service").exists()
    assert not (units / "edgekeeper-worker@.service").exists()
    assert (data / "store.sqlite").read_bytes() == b"results"
    assert (root / "etc/edgekeeper/cloud.toml").exists()

    rc, _, err = run_cli(capsys, "cloud", "uninstall", "--root", str(root), "--purge")
    assert rc != 0 and "--yes" in err and "Traceback" not in err
    assert (data / "store.sqlite").exists()

    rc, _, _ = run_cli(capsys, "cloud", "uninstall", "--root", str(root), "--purge", "--yes")
    assert rc == 0 and not data.exists() and not (root / "etc/edgekeeper/cloud.toml").exists()


def test_uninstalling_one_half_keeps_the_venv_the_other_still_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    venv = root / "opt/edgekeeper/.venv/bin"
    venv.mkdir(parents=True)
    (venv / "edgekeeper").write_text("#!/bin/sh\n")  # stands for the venv install would make
    for half in ("device", "cloud"):
        assert run_cli(capsys, half, "install", "--root", str(root))[0] == 0
    assert changed(run_cli(capsys, "cloud", "install", "--root", str(root))[1]) == []
    assert run_cli(capsys, "device", "uninstall", "--root", str(root))[0] == 0
    assert venv.is_dir()
    assert run_cli(capsys, "cloud", "uninstall", "--root", str(root))[0] == 0
    assert not venv.exists() and (root / "var/lib/edgekeeper").is_dir()


def test_half_an_enrollment_is_refused_before_any_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    rc, _, err = run_cli(capsys, "device", "install", "--root", str(root), "--no-venv",
                         "--cloud", "http://127.0.0.1:9")
    assert rc != 0 and "--token=TOKEN" in err and "Traceback" not in err
    assert not root.exists()


def test_a_real_install_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the check is run (never the install itself against /), as a non-root user.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    opts = install.Options(Path("/"), False, ROOT, None, True)
    with pytest.raises(install.InstallError, match="needs root") as err:
        install._check(opts)
    assert "sudo" in (err.value.fix or "")
    install._check(install.Options(Path("/"), True, ROOT, None, True))  # a dry run may


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    async with running_cloud(tmp_path) as c:
        yield c


async def _cli(*args: str) -> tuple[int, str, str]:
    assert "--root" in args
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKEEPER_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgekeeper.cli", *args, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_device_install_enrolls_into_the_services_state_dir(
    cloud: Cloud, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    token = await cloud.token()
    rc, out, err = await _cli("device", "install", "--root", str(root), "--no-venv",
                              "--cloud", cloud.url, f"--token={token}")
    assert rc == 0, err
    assert "not enrolled" not in out
    state = root / "var/lib/edgekeeper"
    enrollment = state / "enrollment.json"
    assert await asyncio.to_thread(mode, enrollment) == 0o600
    assert await asyncio.to_thread(mode, state) == 0o700
    assert "changed enrollment of porch-pi" in out
    assert token not in out + err
    # The cloud knows the board now.
    assert await cloud.store.get_device("porch-pi") is not None

    # Again, with the token already spent: nothing to do, nothing changed.
    rc, out, err = await _cli("device", "install", "--root", str(root), "--no-venv",
                              "--cloud", cloud.url, f"--token={token}")
    assert rc == 0, err
    assert "(0 changes)" in out and "ok      enrolled" in out


async def test_an_unreachable_cloud_at_enroll_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    rc, _, err = await _cli("device", "install", "--root", str(root), "--no-venv",
                            "--cloud", f"http://127.0.0.1:{port}", "--token=ekt_x")
    assert rc != 0 and "Traceback" not in err
    assert f"cannot reach http://127.0.0.1:{port}" in err and "fix:" in err
    assert not await asyncio.to_thread((root / "var/lib/edgekeeper/enrollment.json").exists)
