"""Helpers shared by the device benchmarks (not a test module)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgekeeper import config as config_mod
from edgekeeper.device.sources import Frame, ThreadedSource

ROOT = Path(__file__).resolve().parent.parent
VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
SAMPLE = config_mod.MODELS_DIR / "samples" / "street"


def video_path() -> Path:
    """vtest.avi (apt install opencv-doc) when present, else the bundled sample."""
    return VTEST if VTEST.is_file() else SAMPLE / "video.avi"


def decode(path: Path, limit: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < limit:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


class MemoryFrames(ThreadedSource):
    """Pre-decoded frames through the real source machinery (reader thread + handoff)."""

    kind = "video"

    def __init__(self, frames: list[np.ndarray], fps: float = 10.0) -> None:
        super().__init__("memory", lossless=True, queue_size=4)
        self.frames, self.fps = frames, fps

    def _produce(self, emit: Callable[[Any], bool]) -> None:
        for i, img in enumerate(self.frames):
            if not emit(Frame(t=i / self.fps, index=i, image=img)):
                return


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def emit(name: str, figures: dict[str, Any]) -> None:
    print(json.dumps({"bench": name, **figures, "machine": machine()}, indent=2))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def chunks(seq: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def start_fake(latency: float) -> tuple[subprocess.Popen[str], str]:
    """The fake Messages API (tests/fake_anthropic.py) in its own process, answering after
    ``latency`` seconds; returns the process and its base URL."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_anthropic.py"), "--latency", str(latency)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("url="):
        proc.kill()
        raise SystemExit(f"the fake provider did not start: {line!r}")
    return proc, line[4:]


async def enroll_devices(store: Any, n: int, *, ttl_s: float = 600.0) -> list[tuple[str, Any]]:
    """Enroll ``n`` fresh devices (bench-0 ...) through the real enrollment rule; return
    (device id, DeviceKeys) pairs for sealing events."""
    from edgekeeper.cloud.enroll import EnrollRequest, enroll, issue_token
    from edgekeeper.protocol.keys import DeviceKeys, b64e

    out = []
    for i in range(n):
        dk = DeviceKeys.generate()
        token = await issue_token(store, ttl_s=ttl_s, now=time.time())
        await enroll(store, EnrollRequest.from_json(
            {"token": token, "device_id": f"bench-{i}", "sign_pk": b64e(dk.sign_pk),
             "box_pk": b64e(dk.box_pk)}), now=time.time())
        out.append((f"bench-{i}", dk))
    return out


async def enrolled_in_sqlite(data_dir: Path, devices: int) -> tuple[list[tuple[str, Any]], Any]:
    """The cloud's keys and an embedded (SQLite) store in ``data_dir`` with ``devices`` enrolled:
    the devices' (id, keys) and the cloud's public key, for sealing events before a run."""
    from edgekeeper.cloud.backends import open_store
    from edgekeeper.cloud.keys import CloudKeys

    keys = CloudKeys.ensure(data_dir)
    store = await open_store("sqlite", data_dir)
    try:
        out = await enroll_devices(store, devices)
    finally:
        await store.close()
    return out, keys.public()
