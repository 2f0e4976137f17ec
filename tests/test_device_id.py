"""One device-id rule (the protocol's), refused the same way by the config, the enrollment and
every command that takes a device id: one message naming the field, the value, the rule and the
fix, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekeeper import config as config_mod
from edgekeeper.cli import main
from edgekeeper.cloud.enroll import EnrollRequest
from edgekeeper.errors import ConfigError
from edgekeeper.protocol.device_id import DEVICE_ID_RULE, valid_device_id
from edgekeeper.protocol.errors import InvalidRequest

# str.isalnum() takes every one of these; the protocol refuses them all.
NON_ASCII = ["dév", "пи", "٣", "ｐｉ", "ﬁ", "x²"]


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEKEEPER_CLOUD_DATA_DIR", str(tmp_path / "cloud"))
    monkeypatch.setenv("EDGEKEEPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
    monkeypatch.delenv("EDGEKEEPER_DEVICE_ID", raising=False)
    return tmp_path


@pytest.mark.parametrize("device_id", [*NON_ASCII, "", "a" * 65, "has space", "a/b", "a:1"])
def test_config_refuses_what_the_protocol_refuses(tmp_path: Path, device_id: str) -> None:
    assert not valid_device_id(device_id)
    f = tmp_path / "c.toml"
    f.write_text(f'[device]\nid = "{device_id}"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        config_mod.load(f, env={})
    # the file, the field, the value and the rule in one line; the fix after it
    line = err.value.message
    assert "\n" not in line
    assert str(f) in line and "device.id" in line and repr(device_id) in line
    assert DEVICE_ID_RULE in line
    assert err.value.fix and "device.id" in err.value.fix
    # the same through the environment variable systemd units set
    with pytest.raises(ConfigError) as err:
        config_mod.load(None, env={"EDGEKEEPER_DEVICE_ID": device_id})
    assert "device.id" in err.value.message and repr(device_id) in err.value.message


@pytest.mark.parametrize("device_id", ["pi", "porch-pi_2.local", "A" * 64, "0", "-", "."])
def test_config_takes_what_the_protocol_takes(tmp_path: Path, device_id: str) -> None:
    assert valid_device_id(device_id)
    f = tmp_path / "c.toml"
    f.write_text(f'[device]\nid = "{device_id}"\n')
    assert config_mod.load(f, env={}).device.id == device_id


def test_device_status_refuses_a_non_ascii_id(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = cli_env / "c.toml"
    f.write_text('[device]\nid = "dév"\n', encoding="utf-8")
    assert main(["--config", str(f), "device", "status"]) == 2
    err = capsys.readouterr().err
    assert "device.id" in err and "'dév'" in err and DEVICE_ID_RULE in err
    assert "fix:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["cloud", "revoke", "dév"],
        ["cloud", "usage", "--device", "dév"],
        ["cloud", "dlq", "requeue", "dév:1"],
    ],
)
def test_cloud_commands_refuse_a_non_ascii_id(
    cli_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "'dév'" in err and DEVICE_ID_RULE in err
    assert "fix:" in err and "Traceback" not in err
    # nothing was created for a command refused up front
    assert not (cli_env / "cloud").exists()


def test_enrollment_refuses_a_non_ascii_id() -> None:
    with pytest.raises(InvalidRequest) as err:
        EnrollRequest.from_json({"token": "t", "device_id": "dév", "sign_pk": "", "box_pk": ""})
    assert "device_id" in err.value.message and "'dév'" in err.value.message
    assert DEVICE_ID_RULE in err.value.message


def test_a_host_name_that_is_no_device_id_says_to_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # device.id defaults to the host name; a Unicode host name must not slip through either
    monkeypatch.setattr("socket.gethostname", lambda: "café-pi")
    with pytest.raises(ConfigError) as err:
        config_mod.load(None, env={})
    assert "'café-pi'" in err.value.message and "host name" in err.value.message
    assert err.value.fix and "EDGEKEEPER_DEVICE_ID" in err.value.fix
    assert config_mod.load(None, env={"EDGEKEEPER_DEVICE_ID": "cafe-pi"}).device.id == "cafe-pi"
