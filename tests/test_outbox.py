"""The durable outbox: real SQLite files, real processes killed with SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edgekeeper.device.outbox import AsyncOutbox, Outbox, OutboxError, OutboxFull
from edgekeeper.sqlite import DatabaseCorrupt

PY = sys.executable


_opened: list[Outbox] = []


def make(tmp_path: Path, **kw: object) -> Outbox:
    kw.setdefault("device_id", "cam-1")
    ob = Outbox(tmp_path / "state" / "outbox.sqlite", **kw)  # type: ignore[arg-type]
    _opened.append(ob)
    return ob


@pytest.fixture(autouse=True)
def _close_outboxes() -> Iterator[None]:
    # Every outbox a test opened is closed (closing twice is harmless): an unclosed SQLite
    # connection is a ResourceWarning, an error under this suite's filterwarnings.
    yield
    while _opened:
        _opened.pop().close()


def test_file_is_private_wal_and_fully_synchronous(tmp_path: Path) -> None:
    ob = make(tmp_path)
    ob.put(b"x", ob.next_seq())
    assert stat.S_IMODE(ob.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ob.path.parent.stat().st_mode) == 0o700
    wal = Path(str(ob.path) + "-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert ob.db.call(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert ob.db.call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
    ob.close()


def test_put_survives_reopen_and_keeps_order(tmp_path: Path) -> None:
    ob = make(tmp_path)
    seqs = [ob.next_seq() for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    for s in reversed(seqs):
        ob.put(f"body-{s}".encode(), s, priority=s % 2)
    ob.close()
    ob = make(tmp_path)
    assert ob.next_seq() == 6  # the counter is persisted, not recomputed from rows
    rows = ob.lease(10, 60)
    assert [r.seq for r in rows] == seqs
    assert [r.body for r in rows] == [f"body-{s}".encode() for s in seqs]
    ob.close()


def test_put_is_idempotent_for_the_same_body_only(tmp_path: Path) -> None:
    ob = make(tmp_path)
    s = ob.next_seq()
    ob.put(b"a", s)
    assert ob.put(b"a", s).stored
    with pytest.raises(ValueError, match="different body"):
        ob.put(b"b", s)
    with pytest.raises(ValueError, match="positive integer"):
        ob.put(b"b", 0)
    assert ob.stats().pending == 1
    ob.close()


def test_outbox_of_another_device_is_refused(tmp_path: Path) -> None:
    make(tmp_path, device_id="cam-1").close()
    with pytest.raises(OutboxError, match="belongs to device 'cam-1'") as err:
        make(tmp_path, device_id="cam-2")
    assert "device.id" in (err.value.fix or "")


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "state" / "outbox.sqlite"
    p.parent.mkdir()
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseCorrupt, match="not a usable SQLite database") as err:
        Outbox(p, device_id="cam-1")
    assert "move" in (err.value.fix or "") and str(p) in (err.value.fix or "")


def test_lease_excludes_leased_rows_until_released_or_expired(tmp_path: Path) -> None:
    now = [1000.0]
    ob = make(tmp_path, clock=lambda: now[0])
    for _ in range(4):
        s = ob.next_seq()
        ob.put(b"e%d" % s, s)
    first = ob.lease(2, 30)
    assert [r.seq for r in first] == [1, 2]
    assert [r.seq for r in ob.lease(10, 30)] == [3, 4]
    assert ob.lease(10, 30) == []
    ob.release(1, "connection reset")
    again = ob.lease(10, 30)
    assert [r.seq for r in again] == [1] and again[0].attempts == 1
    now[0] += 31  # every lease expired
    assert [r.seq for r in ob.lease(10, 30)] == [1, 2, 3, 4]


def test_delete_and_bury(tmp_path: Path) -> None:
    now = [5000.0]
    ob = make(tmp_path, clock=lambda: now[0])
    for _ in range(3):
        s = ob.next_seq()
        ob.put(b"e", s)
    assert ob.stats().last_upload_at is None
    ob.lease(3, 30)
    now[0] = 5005.0
    assert ob.delete(1)
    assert not ob.delete(1)  # a second delete (duplicate 2xx) is harmless
    with capture_logs() as logs:
        ob.bury(2, "seq_conflict: the cloud holds another event under this seq")
    assert any(e["event"] == "outbox.dead_letter" and e["seq"] == 2 for e in logs)
    ob.release(3)
    st = ob.stats()
    assert (st.pending, st.dead, st.delivered_total, st.buried_total) == (1, 1, 1, 1)
    assert st.last_upload_at == 5005.0
    now[0] += 100
    assert [r.seq for r in ob.lease(10, 30)] == [3]  # dead letters are never retried
    assert ob.dead_letters() == [(2, "seq_conflict: the cloud holds another event under this seq")]


def test_quota_evicts_lowest_priority_oldest_counted_and_logged(tmp_path: Path) -> None:
    ob = make(tmp_path, quota_bytes=1000, full_policy="evict_lowest_priority")
    prios = [1, 0, 2, 0, 1]
    for p in prios:
        s = ob.next_seq()
        assert ob.put(bytes(200), s, priority=p).stored
    with capture_logs() as logs:
        r = ob.put(bytes(300), ob.next_seq(), priority=1)
    # 1000 + 300 > 1000: two 200-byte victims, both priority 0, oldest first (seq 2, then 4).
    assert r.stored and [e.seq for e in r.evicted] == [2, 4]
    assert [e["seq"] for e in logs if e["event"] == "outbox.evicted"] == [2, 4]
    assert ob.pending_seqs() == [1, 3, 5, 6]
    # A newcomer less important than everything stored is the one dropped, and says so.
    r = ob.put(bytes(300), ob.next_seq(), priority=0)
    assert not r.stored and [e.seq for e in r.evicted] == [7]
    st = ob.stats()
    assert st.dropped_total == 3 and st.dropped_bytes == 700
    assert st.bytes <= 1000
    ob.close()
    assert make(tmp_path, quota_bytes=1000).stats().dropped_total == 3  # persisted


def test_quota_evicts_dead_letters_first(tmp_path: Path) -> None:
    ob = make(tmp_path, quota_bytes=600, full_policy="evict_lowest_priority")
    for p in (0, 5, 5):
        ob.put(bytes(200), ob.next_seq(), priority=p)
    ob.bury(3, "refused")
    r = ob.put(bytes(200), ob.next_seq(), priority=9)
    assert [e.seq for e in r.evicted] == [3]
    assert ob.pending_seqs() == [1, 2, 4]


def test_quota_evict_oldest_ignores_priority(tmp_path: Path) -> None:
    ob = make(tmp_path, quota_bytes=500, full_policy="evict_oldest")
    for p in (9, 0):
        ob.put(bytes(200), ob.next_seq(), priority=p)
    r = ob.put(bytes(200), ob.next_seq(), priority=0)
    assert r.stored and [e.seq for e in r.evicted] == [1]


def test_quota_reject_new_keeps_stored_events(tmp_path: Path) -> None:
    ob = make(tmp_path, quota_bytes=500, full_policy="reject_new")
    for _ in range(2):
        ob.put(bytes(200), ob.next_seq())
    with capture_logs() as logs, pytest.raises(OutboxFull, match="was not stored") as err:
        ob.put(bytes(200), ob.next_seq(), priority=9)
    assert err.value.fix and "quota_mb" in err.value.fix
    assert any(e["event"] == "outbox.refused" for e in logs)
    assert ob.pending_seqs() == [1, 2]
    assert ob.stats().dropped_total == 1


def test_event_larger_than_quota_is_refused(tmp_path: Path) -> None:
    ob = make(tmp_path, quota_bytes=100)
    with pytest.raises(OutboxFull, match="more than the outbox quota"):
        ob.put(bytes(101), ob.next_seq())
    assert ob.stats().dropped_total == 1


_CHILD = textwrap.dedent(
    """
    import os, sys
    from edgekeeper.device.outbox import Outbox
    ob = Outbox(sys.argv[1], device_id="cam-1")
    mode = sys.argv[2]
    if mode == "lease":
        rows = ob.lease(100, 3600)
        print(len(rows), flush=True)
        sys.stdin.read()
    else:
        while True:
            s = ob.next_seq()
            ob.put(os.urandom(64) + str(s).encode(), s)
            print(s, flush=True)  # printed only after the commit returned
    """
)


@pytest.mark.slow
def test_seq_counter_and_events_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    acknowledged: list[int] = []
    for _round in range(3):
        with subprocess.Popen(
            [PY, "-c", _CHILD, str(path), "capture"], stdout=subprocess.PIPE, text=True
        ) as child:
            assert child.stdout is not None
            for _ in range(30 + 17 * _round):
                acknowledged.append(int(child.stdout.readline()))
            child.send_signal(signal.SIGKILL)
            child.wait()
    ob = Outbox(path, device_id="cam-1")
    stored = set(ob.pending_seqs())
    assert set(acknowledged) <= stored, "an event acknowledged as committed was lost"
    assert len(acknowledged) == len(set(acknowledged)), "a sequence number was handed out twice"
    assert ob.next_seq() > max(stored)
    ob.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


def test_leases_of_a_killed_uploader_are_reclaimed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path, device_id="cam-1")
    for _ in range(3):
        ob.put(b"e", ob.next_seq())
    with subprocess.Popen(
        [PY, "-c", _CHILD, str(path), "lease"],
        stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
    ) as child:
        assert child.stdout is not None and child.stdout.readline().strip() == "3"
        assert ob.lease(10, 60) == []  # the live child holds them for an hour
        child.kill()
        child.wait()
    assert [r.seq for r in ob.lease(10, 60)] == [1, 2, 3]
    ob.close()


async def test_async_outbox_runs_in_threads_and_signals_changes(tmp_path: Path) -> None:
    aob = AsyncOutbox(await asyncio.to_thread(make, tmp_path))
    s = await aob.next_seq()
    assert not aob.changed.is_set()
    await aob.put(b"hello", s)
    assert aob.changed.is_set()
    rows = await aob.lease(5, 30)
    assert rows[0].body == b"hello"
    assert await aob.delete(s)
    assert (await aob.stats()).pending == 0
    await aob.close()


async def test_sink_takes_the_runtimes_events_and_never_crashes_capture(tmp_path: Path) -> None:
    import numpy as np

    from edgekeeper.device.events import Event
    from edgekeeper.device.outbox import OutboxSink
    from edgekeeper.protocol.messages import EventBody

    aob = AsyncOutbox(await asyncio.to_thread(
        make, tmp_path, quota_bytes=6000, full_policy="reject_new"
    ))
    sink = OutboxSink(aob)
    seq = await sink.next_seq()
    event = Event(
        device_id="cam-1", seq=seq, label="person", modality="vision", captured_at=1.8e9,
        trigger_t=3.0, start_t=0.0, end_t=6.0, decision={"rule": "3 of 5"},
        scores={"person": 0.93}, models={"vision": "person@1.0.0"},
        frames=(b"\xff\xd8" + bytes(2000),), frame_times=(3.0,),
        features=np.ones((1, 8), dtype=np.float32), priority=1,
    )
    await sink.deliver(event)
    (row,) = await aob.lease(1, 30)
    body = EventBody.decode(row.body)
    assert (body.seq, body.priority, body.meta["label"]) == (seq, 1, "person")
    assert body.features_shape == (1, 8) and row.tag == "person@1.0.0"
    # Full under reject_new: the event is refused, counted and logged, and capture goes on.
    with capture_logs() as logs:
        for _ in range(3):
            s = await sink.next_seq()
            await sink.deliver(EventBody(device_id="cam-1", seq=s, captured_at=1.8e9,
                                         frames=(b"\xff\xd8" + bytes(2000),)))
    assert any(e["event"] == "outbox.refused" for e in logs)
    st = await aob.stats()
    assert st.pending == 2 and st.dropped_total == 2
    await sink.aclose()
    await aob.close()


def test_quota_is_bounded_by_the_disk_with_a_reserve_kept(tmp_path: Path) -> None:
    import shutil

    from edgekeeper.device.outbox import RESERVE_BYTES

    petabyte = 10**15  # more than this disk holds: the disk decides
    with capture_logs() as logs:
        ob = make(tmp_path, quota_bytes=petabyte)
    free = shutil.disk_usage(tmp_path).free
    held = ob.path.stat().st_size
    assert ob.quota_bytes == pytest.approx((free + held - RESERVE_BYTES) // 2, rel=0.01)
    assert ob.stats().quota_bytes == ob.quota_bytes and ob.configured_quota_bytes == petabyte
    (line,) = [x for x in logs if x["event"] == "outbox.quota_bounded"]
    assert line["quota_bytes"] == ob.quota_bytes and line["reserve_bytes"] == RESERVE_BYTES
    ob.close()
    # A quota the disk can hold is kept as configured, and nothing is logged.
    with capture_logs() as logs:
        assert make(tmp_path, quota_bytes=1000).quota_bytes == 1000
    assert not [x for x in logs if x["event"] == "outbox.quota_bounded"]
