"""The shipped example configs (examples/*.toml) are what systemd/README.md installs: they must
load with the real validator, and say what they claim to say."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekeeper import config

ROOT = Path(__file__).resolve().parent.parent


def test_device_example_loads_and_keeps_default_labels() -> None:
    cfg = config.load(ROOT / "examples" / "device.toml", env={})
    assert cfg.device.id == "porch-pi"
    assert cfg.microphone.enabled
    # The example tunes person only; the audio labels keep their defaults (they merge by key).
    assert {"person", "speech", "alarm"} <= set(cfg.trigger.labels)
    assert cfg.trigger.labels["person"].cooldown_seconds == 30


def test_cloud_example_loads_and_holds_no_secret() -> None:
    path = ROOT / "examples" / "cloud.toml"
    cfg = config.load(path, env={})
    assert cfg.cloud.queue_backend == "sqlite" and cfg.cloud.store_backend == "sqlite"
    assert cfg.cloud.host == "127.0.0.1"
    text = path.read_text()
    assert "ANTHROPIC_API_KEY=" not in text and "sk-" not in text


@pytest.mark.parametrize("unit", ["edgekeeper-cloud.service", "edgekeeper-worker@.service",
                                  "edgekeeper-device.service"])
def test_every_unit_keeps_its_state_directory_private(unit: str) -> None:
    # The worker shares the ingest's directory: without its own StateDirectoryMode, whichever
    # unit starts first decides the mode (systemd's default is 0755).
    text = (ROOT / "systemd" / unit).read_text()
    assert "StateDirectoryMode=0700" in text


def test_systemd_readme_installs_the_shipped_examples() -> None:
    text = (ROOT / "systemd" / "README.md").read_text()
    for name in ("examples/device.toml", "examples/cloud.toml"):
        assert name in text and (ROOT / name).is_file()
    # Enrollment must land where the unit looks, not under /root.
    assert "EDGEKEEPER_STATE_DIR=/var/lib/edgekeeper" in text
