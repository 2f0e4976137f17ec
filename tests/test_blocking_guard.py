"""The blocking-call guard of tests/conftest.py: a blocking call on the event loop fails the
async test that made it, whether the test's own helper or our package made the call."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from blockbuster import BlockingError

from edgekeeper.protocol.keys import write_secret


def _nap() -> None:
    """A deliberately blocking helper: fine on a thread, a fault on the event loop."""
    time.sleep(0.001)


async def test_a_sleep_on_the_loop_fails() -> None:
    with pytest.raises(BlockingError, match=r"time\.sleep"):
        _nap()


async def test_sqlite_on_the_loop_fails(tmp_path: Path) -> None:
    with pytest.raises(BlockingError, match=r"sqlite3\.connect"):
        sqlite3.connect(tmp_path / "on-the-loop.sqlite")
    # check_same_thread=False: the only thing that may refuse the call below is the guard (on
    # Python 3.10 SQLite's own thread check would answer first).
    db = await asyncio.to_thread(sqlite3.connect, tmp_path / "on-a-thread.sqlite",
                                 check_same_thread=False)
    try:
        with pytest.raises(BlockingError, match=r"sqlite3\.Connection\.execute"):
            db.execute("SELECT 1")
    finally:
        await asyncio.to_thread(db.close)


async def test_a_blocking_call_inside_our_package_fails(tmp_path: Path) -> None:
    # The package's folders (protocol/ here) map into edgekeeper.*: the guard scans each one.
    with pytest.raises(BlockingError):
        write_secret(tmp_path / "key", b"k" * 32)
    assert not await asyncio.to_thread((tmp_path / "key").exists)


async def test_the_same_calls_on_a_thread_pass(tmp_path: Path) -> None:
    await asyncio.to_thread(_nap)
    await asyncio.to_thread(write_secret, tmp_path / "key", b"k" * 32)
    assert await asyncio.to_thread((tmp_path / "key").read_bytes) == b"k" * 32


def test_sync_tests_are_not_guarded() -> None:
    _nap()  # no event loop runs here: nothing to block
