"""Sources with real files and a real network stream; bad inputs refused clearly."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import wave
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from aiohttp import web

from edgekeeper.device.sources import (
    ImageFolderSource,
    MicrophoneSource,
    VideoCaptureSource,
    WavSource,
    open_recording,
)
from edgekeeper.errors import InputError


async def collect(source: Any, limit: int = 10_000) -> list[Any]:
    out = []
    async for item in source.stream():
        out.append(item)
        if len(out) >= limit:
            source.stop()
            break
    return out


def write_wav(
    path: Path, samples: np.ndarray, rate: int, width: int = 2, channels: int = 1
) -> None:
    if channels > 1:
        samples = np.repeat(samples[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 1:
            w.writeframes((np.clip(samples, -1, 1) * 127 + 128).astype(np.uint8).tobytes())
        elif width == 2:
            w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
        else:
            w.writeframes((np.clip(samples, -1, 1) * (2**31 - 1)).astype("<i4").tobytes())


async def test_video_file_yields_media_timed_frames(sample_recording: Path) -> None:
    src = VideoCaptureSource(str(sample_recording / "video.avi"), fps=0, live=False)
    frames = await collect(src)
    assert len(frames) == src.frame_count > 50
    fps = src.source_fps
    assert [f.index for f in frames[:5]] == [0, 1, 2, 3, 4]
    assert frames[10].t == pytest.approx(10 / fps)
    assert frames[0].image.ndim == 3 and frames[0].image.shape[2] == 3
    assert src.stats.dropped == 0 and src.stats.bytes_read > 0


async def test_fps_throttle_keeps_every_other_frame(sample_recording: Path) -> None:
    full = await collect(VideoCaptureSource(str(sample_recording / "video.avi"), live=False))
    src = VideoCaptureSource(str(sample_recording / "video.avi"), fps=5.0, live=False)
    half = await collect(src)
    assert abs(len(half) - len(full) * 5.0 / src.source_fps) <= 1


async def test_image_folder(tmp_path: Path, sample_recording: Path) -> None:
    cap = cv2.VideoCapture(str(sample_recording / "video.avi"))
    for i in range(4):
        ok, img = cap.read()
        assert ok
        cv2.imwrite(str(tmp_path / f"img-{i:03d}.{'png' if i % 2 else 'jpg'}"), img)
    (tmp_path / "notes.txt").write_text("not an image")
    frames = await collect(ImageFolderSource(tmp_path, fps=2.0))
    assert [f.t for f in frames] == [0.0, 0.5, 1.0, 1.5]


async def test_image_folder_with_a_corrupt_image_names_it(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match=r"a\.jpg"):
        await collect(ImageFolderSource(tmp_path))


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize(("width", "channels"), [(2, 1), (2, 2), (1, 1), (4, 1)])
async def test_wav_at_any_rate_is_resampled(
    tmp_path: Path, rate: int, width: int, channels: int
) -> None:
    t = np.arange(int(1.5 * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / "tone.wav"
    write_wav(path, tone, rate, width, channels)
    blocks = await collect(WavSource(path, rate=16000, block_seconds=0.1))
    samples = np.concatenate([b.samples for b in blocks])
    assert abs(len(samples) - 24000) <= 2
    assert blocks[1].t == pytest.approx(len(blocks[0].samples) / 16000)
    # Still a 440 Hz tone at the new rate: the spectrum peaks there.
    spectrum = np.abs(np.fft.rfft(samples[2000:18000]))
    peak_hz = np.argmax(spectrum) * 16000 / len(samples[2000:18000])
    assert abs(peak_hz - 440) < 3
    assert 0.3 < np.abs(samples).max() < 0.6


async def test_float_wav_is_read_and_garbage_is_refused_with_the_fix(tmp_path: Path) -> None:
    f32 = tmp_path / "float.wav"
    # A 32-bit IEEE float WAV (format tag 3), written byte by byte: stdlib wave refused it.
    data = (0.25 * np.ones(1600, np.float32)).tobytes()
    header = (b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVEfmt "
              + (16).to_bytes(4, "little") + (3).to_bytes(2, "little") + (1).to_bytes(2, "little")
              + (16000).to_bytes(4, "little") + (64000).to_bytes(4, "little")
              + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
              + b"data" + len(data).to_bytes(4, "little"))
    f32.write_bytes(header + data)
    samples = np.concatenate([b.samples for b in await collect(WavSource(f32))])
    assert len(samples) == 1600 and np.allclose(samples, 0.25)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"definitely not riff")
    with pytest.raises(InputError, match=r"garbage\.wav") as err:
        await collect(WavSource(garbage))
    assert "sox" in (err.value.fix or "")


async def test_unreadable_video_and_missing_camera(tmp_path: Path) -> None:
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"\x00" * 4096)
    with pytest.raises(InputError, match=r"broken\.avi"):
        await collect(VideoCaptureSource(str(bad), live=False))
    with pytest.raises(InputError, match="camera") as err:
        await collect(VideoCaptureSource("97", live=True))
    assert "camera.source" in (err.value.fix or "")
    if "GStreamer:                   NO" in cv2.getBuildInformation():  # the pip wheel
        with pytest.raises(InputError, match="needs GStreamer"):
            await collect(VideoCaptureSource("videotestsrc ! appsink", live=True))


async def test_mjpeg_stream_over_http(sample_recording: Path) -> None:
    """A network camera: MJPEG (multipart/x-mixed-replace) served on 127.0.0.1 by the test."""
    cap = cv2.VideoCapture(str(sample_recording / "video.avi"))
    jpegs = []
    for _ in range(15):
        ok, img = cap.read()
        assert ok
        jpegs.append(cv2.imencode(".jpg", img)[1].tobytes())

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame"}
        )
        await resp.prepare(request)
        for jpg in jpegs:
            await resp.write(
                b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                + jpg + b"\r\n"
            )
            await asyncio.sleep(0.02)
        return resp

    app = web.Application()
    app.router.add_get("/cam.mjpg", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        src = VideoCaptureSource(f"http://127.0.0.1:{port}/cam.mjpg", fps=0, live=True,
                                 lossless=True, reconnect_seconds=0.2)
        frames = await collect(src, limit=12)
        assert len(frames) == 12
        assert frames[0].image.shape == (jpegs and cv2.imdecode(
            np.frombuffer(jpegs[0], np.uint8), cv2.IMREAD_COLOR).shape)
        assert all(b.t >= a.t for a, b in itertools.pairwise(frames))
    finally:
        await runner.cleanup()


async def test_live_source_drops_oldest_and_counts(sample_recording: Path) -> None:
    """A gate slower than the camera: frames are dropped (oldest first) and counted."""
    src = VideoCaptureSource(str(sample_recording / "video.avi"), fps=0, live=False,
                             lossless=False, queue_size=2)
    got = []
    async for frame in src.stream():
        got.append(frame.index)
        await asyncio.sleep(0.02)  # a slow consumer
    assert src.stats.dropped > 0
    assert len(got) + src.stats.dropped == src.stats.produced
    assert got == sorted(got) and got[-1] == src.frame_count - 1  # the newest always arrives


class FakeInputStream:
    """Stands in for sounddevice.InputStream: calls back from its own thread, like PortAudio."""

    def __init__(self, *, samplerate: int, channels: int, dtype: str, blocksize: int,
                 device: Any, callback: Any, source: np.ndarray) -> None:
        self.callback, self.blocksize, self.source = callback, blocksize, source
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()

    def _run(self) -> None:
        for i in range(0, len(self.source) - self.blocksize + 1, self.blocksize):
            if self._stop.is_set():
                return
            self.callback(self.source[i : i + self.blocksize, None], self.blocksize, None, None)
        self.callback(np.zeros((0, 1), np.float32), 0, None, None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        pass


async def test_microphone_blocks_arrive_in_order_with_sample_clock() -> None:
    audio = np.random.default_rng(0).uniform(-0.1, 0.1, 16000).astype(np.float32)
    mic = MicrophoneSource(rate=16000, block_seconds=0.1,
                           stream_factory=lambda **kw: FakeInputStream(**kw, source=audio))
    blocks = []
    async for b in mic.stream():
        if len(b.samples) == 0:
            mic.stop()
            break
        blocks.append(b)
    assert [round(b.t, 3) for b in blocks[:3]] == [0.0, 0.1, 0.2]
    assert np.array_equal(np.concatenate([b.samples for b in blocks]), audio)


def test_recording_folder_and_labels(tmp_path: Path, sample_recording: Path) -> None:
    rec = open_recording(sample_recording, audio_rate=16000, fps=10, realtime=False)
    assert rec.video is not None and rec.audio is not None and rec.labels
    (tmp_path / "recording.json").write_text(json.dumps({"schema": 1}))
    with pytest.raises(InputError, match="names no"):
        open_recording(tmp_path, audio_rate=16000, fps=10, realtime=False)
    (tmp_path / "recording.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        open_recording(tmp_path, audio_rate=16000, fps=10, realtime=False)
