"""What a running device says about itself, and where `edgekeeper device status` reads it.

``DeviceMonitor`` watches the loop's progress (device/loop.py ``Progress``) and turns it into:

* a health verdict for systemd's watchdog (``edgekeeper.runtime.Supervisor``): healthy only
  while camera frames and microphone audio keep arriving, the gate keeps scoring and the last
  event could be stored. A loop that is blocked, a camera that stalls, a gate that hangs or a
  disk that takes no more events stop the WATCHDOG=1 pings, and systemd restarts the service;
* the STATUS= line ``systemctl status`` shows (frames/s, last trigger, outbox backlog);
* ``status.json`` in the state dir, rewritten every PUBLISH_EVERY_S (temp file, fsync, rename),
  which `device status` shows: camera and microphone, frames/s, last frame, trigger, event and
  result, models, outbox, disk, enrollment.

"Recently" is ``stall_seconds``: systemd's WatchdogSec when it set one, else DEFAULT_STALL_S.
The gate may skip frames and audio the pre-gate finds empty, but never for longer than
``pregate.max_skip_seconds``, so scoring gets that much more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from edgekeeper import runtime
from edgekeeper.config import Config
from edgekeeper.device.loop import Pipeline
from edgekeeper.device.outbox import AsyncOutbox, OutboxStats
from edgekeeper.errors import ConfigError, EdgekeeperError
from edgekeeper.fs import write_private
from edgekeeper.log import get_logger

log = get_logger(__name__)

STATUS_FILE = "status.json"
SCHEMA = 1
PUBLISH_EVERY_S = 5.0
# A status file not rewritten for this long belongs to a service that is no longer running.
STALE_AFTER_S = 3 * PUBLISH_EVERY_S
DEFAULT_STALL_S = 60.0
EX_CONFIG = 78  # sysexits.h: "configuration error"; systemd's RestartPreventExitStatus= fits


class NotEnrolled(ConfigError):
    """`edgekeeper run` with ``uplink.mode = "cloud"`` on a device that never enrolled."""

    exit_code = EX_CONFIG


def enroll_fix(config: Config) -> str:
    """How to enroll this device where the service will look (its state dir and config)."""
    where = f"--config {config.source} " if config.source != "defaults" else ""
    return (f"enroll into the service's state dir, as the user the service runs as: "
            f"EDGEKEEPER_STATE_DIR={config.device.state_dir} edgekeeper {where}device enroll "
            f"--cloud URL --token=TOKEN (token from `edgekeeper cloud token`); or, to keep "
            f"events on this machine on purpose, set [uplink] mode = \"local-only\"")


def status_path(config: Config) -> Path:
    return config.device.state_dir / STATUS_FILE


def read_status(config: Config, now: float | None = None) -> dict[str, Any] | None:
    """The running service's last status (with ``running``: fresh and not stopped), or None."""
    try:
        doc = json.loads(status_path(config).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        return None
    now = time.time() if now is None else now
    age = now - float(doc.get("updated_at", 0))
    doc["age_seconds"] = round(age, 1)
    doc["running"] = doc.get("state") == "running" and age <= STALE_AFTER_S
    return doc


class DeviceMonitor:
    def __init__(self, config: Config, pipeline: Pipeline, *, outbox: AsyncOutbox | None,
                 models: dict[str, str], events_to: str, enrolled: dict[str, Any] | None,
                 stall_seconds: float | None = None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.outbox = outbox
        self.models = models
        self.events_to = events_to
        self.enrolled = enrolled
        self.stall_s = stall_seconds or DEFAULT_STALL_S
        self.started_mono = time.monotonic()
        self.started_at = time.time()
        self.backlog: OutboxStats | None = None
        self.last_result: dict[str, Any] | None = None
        self.state_error: str | None = None  # the status file could not be written
        self._rates: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)

    # -- what the loop did ---------------------------------------------------------------
    async def note_result(self, doc: dict[str, Any]) -> None:
        """A result action (device/results.py): remember the last result for `status`."""
        self.last_result = {k: doc.get(k) for k in ("seq", "label", "action", "confidence",
                                                     "reasoner", "provisional", "summary")}
        self.last_result["at"] = time.time()

    def frames_per_second(self) -> float | None:
        """Frames read per second over the last ~10 s."""
        now, frames = time.monotonic(), self.pipeline.stats.frames
        self._rates.append((now, frames))
        while len(self._rates) > 2 and now - self._rates[0][0] > 10.0:
            self._rates.popleft()
        t0, f0 = self._rates[0]
        return None if now - t0 < 0.5 else (frames - f0) / (now - t0)

    # -- health --------------------------------------------------------------------------
    def problems(self) -> list[str]:
        now = time.monotonic()
        p, cfg = self.pipeline.progress, self.config

        def stale(at: float | None, limit: float) -> float | None:
            age = now - (self.started_mono if at is None else at)
            return age if age > limit else None

        out = []
        if self.pipeline.video is not None and (age := stale(p.frame_at, self.stall_s)):
            out.append(f"no camera frame for {age:.0f} s")
        if self.pipeline.audio is not None and (age := stale(p.audio_at, self.stall_s)):
            out.append(f"no microphone audio for {age:.0f} s")
        limit = self.stall_s + cfg.pregate.max_skip_seconds
        if (age := stale(p.inference_at, limit)) is not None:
            out.append(f"the gate has scored nothing for {age:.0f} s")
        if not p.sink_ok:
            out.append("the last event could not be stored (disk full or read-only?)")
        if self.state_error:
            out.append(f"the state dir takes no writes: {self.state_error}")
        return out

    def health(self) -> runtime.Health:
        problems = self.problems()
        return runtime.Health(not problems, self.status_line(), "; ".join(problems))

    def status_line(self) -> str:
        fps = self.frames_per_second()
        parts = [f"{fps:.1f} frames/s" if fps is not None else "starting"]
        trig = self.pipeline.progress.last_trigger
        parts.append("no trigger yet" if trig is None else
                     f"last trigger {trig['label']} {_ago(time.time() - trig['at'])} ago")
        if self.backlog is not None:
            parts.append(f"outbox {self.backlog.pending} pending")
        else:
            parts.append(f"events to {self.events_to}")
        return ", ".join(parts)

    # -- publishing ----------------------------------------------------------------------
    def snapshot(self, state: str = "running",
                 disk: dict[str, int] | None = None) -> dict[str, Any]:
        now, mono = time.time(), time.monotonic()
        p, pl = self.pipeline.progress, self.pipeline

        def wall(at: float | None) -> float | None:
            return None if at is None else now - (mono - at)

        def source(kind: str, src: Any, enabled: bool, spec: str, at: float | None
                   ) -> dict[str, Any]:
            doc: dict[str, Any] = {"enabled": enabled, "source": spec}
            if src is None:
                doc["state"] = "off"
                return doc
            age = None if at is None else mono - at
            doc["state"] = ("starting" if at is None else
                            "stalled" if age is not None and age > self.stall_s else "ok")
            doc["last_at"] = wall(at)
            doc["dropped"] = src.stats.dropped
            doc["reconnects"] = src.stats.reconnects
            doc["read"] = pl.stats.frames if kind == "camera" else pl.stats.audio_blocks
            return doc

        cfg = self.config
        fps = self.frames_per_second()
        problems = self.problems()
        backlog = self.backlog
        return {
            "schema": SCHEMA,
            "state": state,
            "pid": os.getpid(),
            "device_id": cfg.device.id,
            "updated_at": now,
            "started_at": self.started_at,
            "healthy": not problems,
            "problems": problems,
            "status": self.status_line(),
            "mode": cfg.uplink.mode,
            "events_to": self.events_to,
            "enrollment": self.enrolled,
            "camera": source("camera", pl.video, cfg.camera.enabled, cfg.camera.source,
                             p.frame_at),
            "microphone": source("microphone", pl.audio, cfg.microphone.enabled,
                                 cfg.microphone.device or "default", p.audio_at),
            "frames_per_second": None if fps is None else round(fps, 2),
            "last_frame_at": wall(p.frame_at),
            "last_inference_at": wall(p.inference_at),
            "last_trigger": p.last_trigger,
            "last_event": p.last_event,
            "last_result": self.last_result,
            "models": self.models,
            "counts": {k: v for k, v in pl.stats.as_dict().items() if k != "gate_latency_ms"},
            "outbox": None if backlog is None else {
                "pending": backlog.pending, "dead_letters": backlog.dead,
                "bytes": backlog.bytes, "quota_bytes": backlog.quota_bytes,
                "oldest_age_seconds": backlog.oldest_age(now),
                "last_upload_at": backlog.last_upload_at,
            },
            "disk": disk,
        }

    def _write(self, doc: dict[str, Any]) -> None:
        path = status_path(self.config)
        tmp = path.with_name(f".{path.name}.tmp")
        write_private(tmp, json.dumps(doc, sort_keys=True).encode() + b"\n")
        os.replace(tmp, path)

    async def publish_once(self, state: str = "running") -> None:
        if self.outbox is not None:
            try:
                self.backlog = await self.outbox.stats()
            except (EdgekeeperError, OSError) as err:  # a disk error: keep the service up
                log.warning("status.outbox_unreadable", error=str(err))
        # statvfs is a system call that can stall on a sick SD card: never on the loop.
        disk = await asyncio.to_thread(_disk, self.config.device.state_dir)
        try:
            await asyncio.to_thread(self._write, self.snapshot(state, disk))
        except OSError as err:
            if self.state_error is None:
                log.error("status.write_failed", path=str(status_path(self.config)),
                          error=err.strerror or str(err),
                          fix="free space on that filesystem or make the state dir writable")
            self.state_error = err.strerror or str(err)
        else:
            self.state_error = None

    async def publish(self, stop: asyncio.Event) -> None:
        """Rewrite status.json every PUBLISH_EVERY_S until ``stop``; a last one says stopped."""
        while True:
            await self.publish_once()
            if await runtime.sleep(stop, PUBLISH_EVERY_S):
                break
        await self.publish_once("stopped")

    async def announce_ready(self, stop: asyncio.Event) -> None:
        """READY=1 once every source has delivered (sources, gates and sink are up)."""
        started = self.pipeline.progress.started
        await runtime.sleep(stop, math.inf, wake=started)
        if started.is_set():
            runtime.supervisor().ready(self.status_line())


def _disk(path: Path) -> dict[str, int] | None:
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(candidate)
            return {"free_bytes": usage.free, "total_bytes": usage.total}
    return None


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{max(0.0, seconds):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["EX_CONFIG", "DeviceMonitor", "NotEnrolled", "enroll_fix", "read_status"]
