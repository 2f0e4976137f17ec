"""Shared fixtures: real files, real models, configs rooted in tmp_path.

Fakes exist only at the boundary of what cannot exist here (a camera is a video file or an
MJPEG server on 127.0.0.1, a microphone is a stream object calling back from a thread, the LLM
provider is an HTTP server); nothing of ours is patched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgekeeper import config as config_mod
from edgekeeper import log

import servers  # tests/servers.py: real Redis / PostgreSQL for the backend tests

ROOT = Path(__file__).resolve().parent.parent
MODELS = config_mod.MODELS_DIR
SAMPLE = MODELS / "samples" / "street"


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    log.configure("warning", "json")


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., config_mod.Config]:
    """Build a validated Config whose state lives in tmp_path; sections override by keyword.

    ``make_config(trigger={"k": 1, "n": 1}, event={"key_frames": 2})`` goes through the same
    TOML validation as a user's file.
    """

    def make(**sections: Any) -> config_mod.Config:
        data: dict[str, Any] = {
            "device": {"id": "test-device", "state_dir": str(tmp_path / "state")}
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        cfg = config_mod.build_from_dict(data, source="test")
        return cfg

    return make


@pytest.fixture
def sample_recording() -> Path:
    if not (SAMPLE / "recording.json").is_file():
        pytest.fail(f"the bundled sample recording is missing at {SAMPLE}")
    return SAMPLE


def replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)


# --- real Redis and PostgreSQL (tests/servers.py): found, or started for the session ---------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[servers.RedisServer]:
    server = servers.find_or_start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix(redis_server: servers.RedisServer) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    with servers.fresh_prefix(redis_server) as prefix:
        yield prefix


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[servers.PostgresServer]:
    server = servers.find_or_start_postgres()
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: servers.PostgresServer) -> Iterator[str]:
    """A postgresql:// URL of a database created for this test and dropped afterwards."""
    with servers.fresh_database(postgres_server) as url:
        yield url
