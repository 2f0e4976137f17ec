"""Enrollment tokens and the command line: a token never starts with '-' (argparse would read it
as an option), the hint says `--token=TOKEN`, and a token that does start with '-' (issued
before this rule) enrolls through the real CLI as `--token=-...`, or gets one clear error."""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgekeeper.cli import main
from edgekeeper.cloud.enroll import TOKEN_BYTES, TOKEN_PREFIX, issue_token, token_hash

from cloudkit import Cloud, running_cloud

DEVICE = "pi-dash"


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    async with running_cloud(tmp_path) as c:
        yield c


async def test_tokens_never_start_with_a_dash_and_keep_their_entropy(cloud: Cloud) -> None:
    # token_urlsafe starts one token in 64 with '-': 500 without one is (63/64)**500 < 0.0005
    tokens = [await issue_token(cloud.store, ttl_s=60, now=time.time()) for _ in range(500)]
    assert len(set(tokens)) == len(tokens)
    assert [t for t in tokens if not t[0].isalnum()] == []
    # a fixed prefix, then URL-safe base64 of TOKEN_BYTES random bytes: no bit is lost
    for token in tokens:
        assert token.startswith(TOKEN_PREFIX) and token.isascii()
        raw = base64.urlsafe_b64decode(token[len(TOKEN_PREFIX):] + "=")
        assert len(raw) == TOKEN_BYTES == 32


async def _device_cli(cfg: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgekeeper.cli", "--config", str(cfg), "device", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_token_starting_with_a_dash_through_the_real_cli(
    cloud: Cloud, tmp_path: Path
) -> None:
    cfg = tmp_path / "device.toml"
    cfg.write_text(f'[device]\nid = "{DEVICE}"\nstate_dir = "{tmp_path / "dev"}"\n'
                   '[log]\nlevel = "warning"\n')
    # A real token that starts with '-', as token_urlsafe made one in 64 before.
    token = "-" + base64.urlsafe_b64encode(b"\x07" * 32).decode().rstrip("=")
    now = time.time()
    await cloud.store.add_token(token_hash=token_hash(token), created_at=now,
                                expires_at=now + 600)

    # `--token -xyz`: argparse cannot take it; one clear error saying how to write it
    rc, out, err = await _device_cli(cfg, "enroll", "--cloud", cloud.url, "--token", token)
    assert rc == 2 and "Traceback" not in err
    assert "--token=TOKEN" in err and "'-'" in err
    assert token not in out + err  # the secret is not echoed
    assert not (tmp_path / "dev" / "enrollment.json").exists()

    # `--token=-xyz` is taken as it is, and enrolls
    rc, out, err = await _device_cli(cfg, "enroll", "--cloud", cloud.url, f"--token={token}")
    assert rc == 0, err
    assert f"enrolled {DEVICE} with {cloud.url}" in out
    assert (tmp_path / "dev" / "enrollment.json").exists()

    # the help shows the form that always works
    rc, out, _ = await _device_cli(cfg, "enroll", "--help")
    assert rc == 0 and "--token=TOKEN" in out


def test_cloud_token_prints_the_hint_as_token_equals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEKEEPER_CLOUD_DATA_DIR", str(tmp_path / "cloud"))
    monkeypatch.setenv("EDGEKEEPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
    assert main(["cloud", "token", "--ttl", "60"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert not token.startswith("-")
    assert "--token=TOKEN" in err and "--token TOKEN" not in err
