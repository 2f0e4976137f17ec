"""Shared fixtures: real files, real models, configs rooted in tmp_path, and the blocking-call
guard.

Fakes exist only at the boundary of what cannot exist here (a camera is a video file or an
MJPEG server on 127.0.0.1, a microphone is a stream object calling back from a thread, the LLM
provider is an HTTP server); nothing of ours is patched.

The guard (``blockbuster``, as aiohttp's own tests use it) makes a blocking call on a running
event loop (sqlite3, file I/O, time.sleep, a blocking socket ...) raise ``BlockingError`` when
the call comes from our code or the tests' helpers: such work belongs on a thread
(``asyncio.to_thread``). Allowed calls are listed in ``_allow_known_blocking`` with the reason.
"""

from __future__ import annotations

import dataclasses
import inspect
import sqlite3
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blockbuster import BlockBuster, BlockBusterFunction, blockbuster_ctx

import edgekeeper
import edgekeeper.cloud
import edgekeeper.device
import edgekeeper.models
import edgekeeper.protocol
from edgekeeper import config as config_mod
from edgekeeper import log

import servers  # tests/servers.py: real Redis / PostgreSQL for the backend tests

ROOT = Path(__file__).resolve().parent.parent
MODELS = config_mod.MODELS_DIR
SAMPLE = MODELS / "samples" / "street"


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    # Before every test, not once per session: a test that points the log elsewhere and does
    # not restore it would otherwise leave every later test in its process writing there (with
    # pytest-xdist, which tests those are depends on the run).
    log.configure("warning", "json")


# --- the blocking-call guard ---------------------------------------------------------------


TESTS = Path(__file__).resolve().parent
# Test helpers that run inside the event loop as our code's peers (a fake provider, a proxy, the
# cloud harness), and the guard's own test (its deliberately blocking helper must be caught).
# Plain test bodies are not scanned: writing a fixture file before the code under test runs
# blocks nothing that matters.
_SCANNED_TEST_HELPERS = ("cloudkit.py", "fake_anthropic.py", "tcp_proxy.py",
                         "test_blocking_guard.py")


def _scanned() -> list[types.ModuleType]:
    """Where a blocking call is a fault: every folder of the edgekeeper package (the folders
    map into it, so each subpackage has its own path) and the helpers above."""
    helpers = []
    for name in _SCANNED_TEST_HELPERS:
        helper = types.ModuleType(name)
        helper.__file__ = str(TESTS / name)
        helpers.append(helper)
    return [edgekeeper, edgekeeper.device, edgekeeper.cloud, edgekeeper.protocol,
            edgekeeper.models, *helpers]


# Calls known to block and allowed on the loop: (guarded function or "*" for all of them, file,
# functions in that file), each with the reason.
_ALLOWED: tuple[tuple[str, str, set[str]], ...] = (
    # Libraries reading their own package metadata once (redis-py for CLIENT SETINFO, httpx's
    # transport when the anthropic client is first built): a lookup cached for the process.
    ("*", "importlib/metadata/__init__.py", {"version", "distribution", "metadata"}),
    # TLS contexts read their certificate files once, when a server or client starts, before
    # any request is served (edgekeeper/tls.py).
    ("os.stat", "edgekeeper/tls.py", {"server_context", "client_context"}),
    # Test helpers that build an uplink or a results client from key files already on disk
    # (setup before the code under test runs, as a test body's own file writes are). The
    # device's code reads its keys off the loop (DeviceLink.open), and the guard still catches
    # any other caller of identity.load_keys on the loop.
    ("*", "tests/test_uplink.py", {"make_uplink"}),
    ("*", "tests/test_results.py", {"client"}),
    # The harness finding or starting its servers and making a test's database or key prefix
    # (tests/servers.py): setup, like a test body's own file writes, even when an async fixture
    # or test asks for it first in its process (with pytest-xdist, which one does varies).
    ("*", "tests/servers.py", {"find_or_start_redis", "find_or_start_postgres",
                               "fresh_prefix", "fresh_database"}),
    # A provider that freezes the whole process on purpose, to let its lease expire
    # (tests/test_worker_leases.py, StallingProvider.reason).
    ("*", "tests/test_worker_leases.py", {"reason"}),
)


def _allow_known_blocking(bb: BlockBuster) -> None:
    for name, filename, functions in _ALLOWED:
        for guarded in bb.functions.values() if name == "*" else [bb.functions[name]]:
            guarded.can_block_in(filename, functions)


@pytest.fixture(autouse=True)
def blockbuster(request: pytest.FixtureRequest) -> Iterator[BlockBuster | None]:
    """Fail an async test whose code blocks the event loop (see the module docstring)."""
    if not request.node.get_closest_marker("asyncio") and not _is_async(request):
        yield None
        return
    scanned = _scanned()
    with blockbuster_ctx(scanned) as bb:
        # Opening a database reads and may create files: blockbuster guards only the calls on
        # an open connection. Added here, deactivated with the rest when the context ends.
        bb.functions["sqlite3.connect"] = BlockBusterFunction(
            sqlite3, "connect", scanned_modules=scanned
        ).activate()
        _allow_known_blocking(bb)
        yield bb


def _is_async(request: pytest.FixtureRequest) -> bool:
    function = getattr(request.node, "function", None)
    return function is not None and inspect.iscoroutinefunction(function)


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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """The store backend a whole-cloud test runs on (cloudkit.cloud_on), once each. For
    postgres the test's database is made here, in a plain fixture: finding or starting the
    server blocks, which the guard refuses once the test's event loop runs (asked for from
    inside the test, it failed or passed by which test came first in its process)."""
    if request.param == "postgres":
        request.getfixturevalue("postgres_dsn")
    return str(request.param)
