"""``edgekeeper record``: capture camera and microphone into a recording folder replay reads.

The folder is written under a temporary name and renamed when complete, so an interrupted
recording never looks like a finished one. Layout: ``recording.json``, ``video.avi`` (MJPG, every
frame a JPEG: robust to cuts and readable by every OpenCV build) and ``audio.wav`` (16-bit PCM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import wave
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgekeeper import compat
from edgekeeper.config import Config
from edgekeeper.device.live import live_sources
from edgekeeper.errors import InputError
from edgekeeper.log import get_logger

log = get_logger(__name__)


async def record(
    config: Config,
    out: Path,
    *,
    seconds: float,
    video: bool = True,
    audio: bool = True,
    mic_factory: Any = None,
    stop: asyncio.Event | None = None,
) -> Path:
    """Record ``seconds`` (or until ``stop`` is set) into ``out``; returns ``out``."""
    if await asyncio.to_thread(out.exists):
        raise InputError(f"recording folder {out} already exists", fix="choose a new folder name")
    if seconds <= 0:
        raise InputError("--seconds must be > 0")
    rate = config.microphone.sample_rate
    vsrc, asrc = live_sources(config, rate if audio else None)
    if not video:
        vsrc = None
    if audio and mic_factory is not None:  # tests fake the microphone at the stream boundary
        from edgekeeper.device.sources import MicrophoneSource

        asrc = MicrophoneSource(device=config.microphone.device, rate=rate,
                                block_seconds=config.microphone.block_seconds,
                                stream_factory=mic_factory)
    if vsrc is None and asrc is None:
        raise InputError(
            "nothing to record: the camera is off (or --no-video) and the microphone is off",
            fix="enable camera.enabled or microphone.enabled in the config",
        )
    tmp = out.with_name(f".{out.name}.partial")
    await asyncio.to_thread(_fresh_dir, tmp)
    # edgekeeper.runtime sets ``stop`` on SIGTERM/SIGINT (`edgekeeper record`).
    stop = asyncio.Event() if stop is None else stop
    loop = asyncio.get_running_loop()
    loop.call_later(seconds, stop.set)
    started = datetime.now(timezone.utc)
    meta: dict[str, Any] = {"schema": 1, "started_at": started.isoformat().replace("+00:00", "Z"),
                            "source": f"edgekeeper record ({config.device.id})"}

    async def record_video() -> None:
        writer = None
        fps = config.camera.fps or 10.0
        try:
            async for frame in vsrc.stream():
                if stop.is_set():
                    break
                if writer is None:
                    h, w = frame.image.shape[:2]
                    writer = await asyncio.to_thread(
                        cv2.VideoWriter, str(tmp / "video.avi"), cv2.VideoWriter.fourcc(*"MJPG"),
                        fps, (w, h))
                    meta["video"] = "video.avi"
                await asyncio.to_thread(writer.write, frame.image)
        finally:
            stop.set()  # a source that ended (a file camera) ends the whole recording
            if writer is not None:
                await asyncio.to_thread(writer.release)

    async def record_audio() -> None:
        # Not a `with`: closing flushes the header to disk, so it runs on a thread (finally).
        w = await asyncio.to_thread(wave.open, str(tmp / "audio.wav"), "wb")
        try:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            meta["audio"] = "audio.wav"
            async for block in asrc.stream():
                if stop.is_set():
                    break
                pcm = np.clip(np.round(block.samples * 32767), -32768, 32767).astype("<i2")
                await asyncio.to_thread(w.writeframes, pcm.tobytes())
        finally:
            stop.set()
            await asyncio.to_thread(w.close)

    async def stopper() -> None:
        await stop.wait()
        for src in (vsrc, asrc):
            if src is not None:
                src.stop()

    t0 = time.monotonic()
    try:
        async with compat.TaskGroup() as tg:
            if vsrc is not None:
                tg.create_task(record_video())
            if asrc is not None:
                tg.create_task(record_audio())
            tg.create_task(stopper())
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)
        raise
    meta["seconds"] = round(time.monotonic() - t0, 3)
    await asyncio.to_thread(_finish, tmp, out, meta)
    log.info("record.written", path=str(out), seconds=meta["seconds"])
    return out


def _fresh_dir(path: Path) -> None:
    """An empty folder at ``path`` (a partial one left by an interrupted recording goes)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _finish(tmp: Path, out: Path, meta: dict[str, Any]) -> None:
    """Write recording.json, then give the folder its final name: complete or not there."""
    with contextlib.suppress(FileNotFoundError):
        (tmp / "recording.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, out)
