"""The fleet simulator's short run (bench/fleet.py): devices running the real device code against
a real cloud on Redis + PostgreSQL, with one fault of each kind, and the reconciliation.

The simulator runs as the command a user runs, in its own process: its redis-server and
PostgreSQL cluster are its own (tests/servers.py starts them: the faults restart them, which
must never happen to a shared one), as are its two ingest and two worker processes and the fake
Messages API. What is asserted is what the report says: every event captured on every device
has exactly one result on that device (lost = 0, duplicated = 0), each fault happened and is in
the timeline, the skewed device delivered, and the device with the tiny outbox refused events
at capture (counted, not lost) and delivered the rest. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

FAULTS = {"ingest_sigkill", "worker_sigkill", "redis_restart", "postgres_restart", "network_cut"}


@pytest.mark.timeout(280)
def test_fleet_short_run_with_every_fault_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "report"
    # 20 devices, one event each every 10 s: the machine running the suite is shared, and the
    # worker's share of it, not the fleet, would otherwise decide how long the drain takes.
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), "--mode", "redis", "--faults",
         "--devices", "20", "--every", "10", "--duration", "60", "--cut", "12",
         "--llm-ms", "200", "--drain", "120", "--out", str(out)],
        capture_output=True, text=True, timeout=270, check=False,
    )
    report_file = out / "fleet.json"
    assert report_file.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    detail = json.dumps({k: v for k, v in report.items() if k != "series"})[:4000]

    # The reconciliation, as the report states it and as its exit code says.
    assert report["captured"] > 0, detail
    assert report["lost"] == 0 and report["lost_by_device"] == {}, detail
    assert report["duplicated"] == 0 and report["duplicated_by_device"] == {}, detail
    assert report["results_for_unknown_events"] == 0, detail
    assert report["results"] == report["captured"], detail
    assert report["ok"] is True and run.returncode == 0, run.stderr[-3000:]
    assert report["dead_letters"] == 0 and report["queue_at_end"] == 0, detail

    # Every fault happened, in the timeline with its start and end. (A cloud process that
    # exited on its own, e.g. a worker started while PostgreSQL was down, is there too, as
    # "process_exited": restarted as systemd's Restart=always would.)
    timeline = {e["fault"]: e for e in report["timeline"]}
    assert FAULTS <= set(timeline) <= FAULTS | {"process_exited"}, detail
    assert all(e["end_s"] is not None and e["end_s"] >= e["start_s"] for e in timeline.values())
    assert report["processes"]["ingest1"] >= 2 and report["processes"]["worker0"] >= 2, detail

    # The device 10 minutes behind learnt the cloud's time and delivered everything.
    (skewed,) = report["skewed_devices"]
    assert skewed["skew_s"] == -600 and skewed["captured"] > 0, detail
    assert skewed["results"] == skewed["captured"], detail
    assert abs(skewed["uplink_clock_offset_learnt_s"] - 600) < 5, detail

    # The device whose outbox filled behind the cut: what it stored all arrived once; what it
    # could not store is counted by the device, not silently gone.
    (full,) = report["full_outbox_devices"]
    assert full["results"] == full["captured"] > 0, detail
    assert full["refused_at_capture"] > 0, detail
    assert report["refused_at_capture"] == {full["device"]: full["refused_at_capture"]}, detail

    assert (out / "fleet.png").stat().st_size > 10_000
