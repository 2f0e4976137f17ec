"""The live camera and microphone a config describes, for ``edgekeeper run`` and ``record``."""

from __future__ import annotations

from typing import Any

from edgekeeper.config import Config


def live_sources(config: Config, audio_rate: int | None) -> tuple[Any, Any]:
    from edgekeeper.device.sources import MicrophoneSource, VideoCaptureSource

    video = audio = None
    if config.camera.enabled:
        cam = config.camera
        video = VideoCaptureSource(cam.source, fps=cam.fps, live=True, queue_size=cam.queue_size,
                                   reconnect_seconds=cam.reconnect_seconds,
                                   width=cam.width, height=cam.height)
    if config.microphone.enabled and audio_rate:
        mic = config.microphone
        audio = MicrophoneSource(device=mic.device, rate=audio_rate,
                                 block_seconds=mic.block_seconds, queue_size=mic.queue_size)
    return video, audio
