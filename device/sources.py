"""Sources: camera, microphone and recordings, each producing timed frames or audio blocks.

Blocking reads (``cv2.VideoCapture.read``, audio decoding) run in one reader thread per source and
hand items to the event loop through a ``Handoff`` queue, so the loop never blocks:

- live sources use a *lossy* handoff: when the gate falls behind, the oldest frame is dropped
  (freshness beats completeness) and counted; audio overflows are counted and logged, never
  silent;
- replay uses a *lossless* handoff: the reader waits for room, so the same recording and config
  always yield the same frames, decisions and events.

Every item carries ``t``, seconds on the pipeline's clock: media time for recordings (frame index
/ fps, samples / rate), so replays are deterministic; monotonic time since start for a camera,
and the sample count for a microphone (the most stable audio clock there is).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from edgekeeper.errors import InputError
from edgekeeper.log import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(slots=True)
class Frame:
    t: float
    index: int
    image: np.ndarray  # H x W x 3, BGR uint8 (OpenCV's order)
    # Filled in the reader thread by the source's annotate hook (the motion pre-gate), so the
    # per-frame pixel work never runs on the event loop.
    motion: float | None = None


@dataclass(slots=True)
class AudioBlock:
    t: float  # start time of the first sample
    samples: np.ndarray  # float32 mono in [-1, 1] at the source's output rate (the gate's)
    # The same audio at the file's own rate when that is lower than the gate's: events keep it
    # (an 8 kHz recording is not upsampled into its events). None: ``samples`` is what they keep.
    source: np.ndarray | None = None
    source_t: float = 0.0
    source_rate: int = 0

    def for_capture(self, rate: int) -> tuple[float, np.ndarray, int]:
        """(start time, samples, their rate) of the audio an event keeps; ``rate`` is the rate
        of ``samples``."""
        if self.source is None:
            return self.t, self.samples, rate
        return self.source_t, self.source, self.source_rate


@dataclass
class SourceStats:
    produced: int = 0
    dropped: int = 0  # lossy handoff only
    reconnects: int = 0
    bytes_read: int = 0  # encoded size of the input, where known (files)


class Source(Protocol):
    """What the loop needs from any source."""

    kind: Literal["video", "audio"]
    name: str
    stats: SourceStats

    def stream(self) -> AsyncIterator[Any]: ...


class _End:
    """Sentinel the reader thread sends after the last item (or with the error that ended it)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Handoff:
    """Bounded thread-to-loop queue; lossy drops the oldest item, lossless blocks the thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int, lossless: bool) -> None:
        self._loop = loop
        self._items: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()
        self._maxsize = maxsize
        self._credits = threading.Semaphore(maxsize) if lossless else None
        self.dropped = 0
        self.on_drop: Callable[[Any], None] | None = None

    # -- reader thread side ----------------------------------------------------------------
    def put_from_thread(self, item: Any, stop: threading.Event) -> bool:
        if self._credits is not None:
            while not self._credits.acquire(timeout=0.2):
                if stop.is_set():
                    return False
        try:
            self._loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:  # the loop is closed: the consumer is gone
            return False
        return True

    def _put(self, item: Any) -> None:
        full = len(self._items) >= self._maxsize
        if self._credits is None and full and not isinstance(item, _End):
            dropped = self._items.popleft()
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop(dropped)
        self._items.append(item)
        self._ready.set()

    # -- loop side -------------------------------------------------------------------------
    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if self._credits is not None and not isinstance(item, _End):
            self._credits.release()
        return item


class ThreadedSource:
    """Runs ``_produce`` in a reader thread; ``stream()`` yields what it emits, in order."""

    kind: Literal["video", "audio"]

    def __init__(self, name: str, *, lossless: bool, queue_size: int) -> None:
        self.name = name
        self.lossless = lossless
        self.queue_size = queue_size
        self.stats = SourceStats()
        self.annotate: Callable[[Any], None] | None = None
        self._stop = threading.Event()
        self._opened = False

    def _produce(self, emit: Callable[[Any], bool]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def open(self) -> None:
        """Check the source can be read (blocking; called in a thread). Raise InputError."""

    def close(self) -> None:
        """Release the device or file (called in the reader thread when it ends)."""

    def ensure_open(self) -> None:
        """Open once (blocking). Replay calls it early to validate inputs and learn durations."""
        if not self._opened:
            self.open()
            self._opened = True

    def stop(self) -> None:
        self._stop.set()

    def _on_drop(self, _item: Any) -> None:
        self.stats.dropped += 1

    async def stream(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.ensure_open)
        handoff = Handoff(loop, self.queue_size, self.lossless)
        handoff.on_drop = self._on_drop

        def emit(item: Any) -> bool:
            if self._stop.is_set():
                return False
            if self.annotate is not None:
                self.annotate(item)
            self.stats.produced += 1
            return handoff.put_from_thread(item, self._stop)

        def reader() -> None:
            error: BaseException | None = None
            try:
                self._produce(emit)
            except BaseException as err:  # handed to the loop, re-raised there
                error = err
            finally:
                try:
                    self.close()
                finally:
                    handoff.put_from_thread(_End(error), threading.Event())

        thread = threading.Thread(target=reader, name=f"source-{self.name}", daemon=True)
        thread.start()
        try:
            while True:
                item = await handoff.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            self._stop.set()
            # The reader notices the stop flag within one read; don't block the loop on it.
            await asyncio.to_thread(thread.join, 5.0)


# ---------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------


def _capture_args(spec: str) -> tuple[Any, ...]:
    """Map a camera.source string to cv2.VideoCapture arguments."""
    if spec.isdigit():
        return (int(spec),)
    if " ! " in spec:  # a GStreamer pipeline (CSI cameras: nvarguscamerasrc, libcamerasrc)
        return (spec, cv2.CAP_GSTREAMER)
    if "://" in spec:
        # Bound how long a dead RTSP/HTTP camera can hold the reader thread.
        return (
            spec,
            cv2.CAP_FFMPEG,
            [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 10000],
        )
    return (spec,)


class VideoCaptureSource(ThreadedSource):
    """A camera (index, URL, GStreamer pipeline) or a video file, through cv2.VideoCapture.

    ``live=True``: timestamps are monotonic seconds since start and a lost stream is reopened
    every ``reconnect_seconds``. ``live=False`` (a file being replayed): timestamps are media time
    and ``realtime`` paces reading to the file's frame rate.
    """

    kind: Literal["video"] = "video"

    def __init__(
        self,
        spec: str,
        *,
        fps: float = 0.0,
        live: bool = True,
        realtime: bool = False,
        lossless: bool | None = None,
        queue_size: int = 4,
        reconnect_seconds: float = 5.0,
        width: int = 0,
        height: int = 0,
    ) -> None:
        super().__init__(
            f"video:{spec}", lossless=(not live) if lossless is None else lossless,
            queue_size=queue_size,
        )
        self.spec = spec
        self.fps = fps
        self.live = live
        self.realtime = realtime
        self.reconnect_seconds = reconnect_seconds
        self.width, self.height = width, height
        self._cap: Any = None
        self.source_fps = 0.0
        self.frame_count = 0

    @property
    def is_file(self) -> bool:
        return not self.spec.isdigit() and "://" not in self.spec and " ! " not in self.spec

    def _open_capture(self) -> Any:
        cap = cv2.VideoCapture(*_capture_args(self.spec))
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        return cap

    def open(self) -> None:
        if self.is_file:
            path = Path(self.spec)
            if not path.is_file():
                raise InputError(
                    f"video file {path} does not exist",
                    fix="check the path (replay takes video files, image folders, audio files or "
                    "recordings)",
                )
            self.stats.bytes_read = path.stat().st_size
        cap = self._open_capture()
        ok = cap.isOpened()
        first = cap.read() if ok else (False, None)
        if not ok or not first[0]:
            cap.release()
            no_gstreamer = "GStreamer:                   NO" in cv2.getBuildInformation()
            if " ! " in self.spec and no_gstreamer:
                raise InputError(
                    f"camera pipeline {self.spec!r} needs GStreamer, and this OpenCV has none",
                    fix="use an OpenCV built with GStreamer (docs/configuration.md, [camera]), "
                    "or a device index or stream URL as camera.source",
                )
            what = "video file" if self.is_file else "camera"
            raise InputError(
                f"{what} {self.spec!r} cannot be opened or read",
                fix=(
                    "check the file is a video OpenCV's FFmpeg can decode (try: ffprobe FILE)"
                    if self.is_file
                    else "check camera.source (device index, URL or GStreamer pipeline), that the "
                    "camera is connected, and that this user may open it (group 'video')"
                ),
            )
        self._cap = cap
        self._first = first[1]
        self.source_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not (0.5 <= self.source_fps <= 240):
            self.source_fps = self.fps or 10.0
        self.frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    @property
    def duration(self) -> float:
        return self.frame_count / self.source_fps if self.frame_count and self.source_fps else 0.0

    def _produce(self, emit: Callable[[Any], bool]) -> None:
        keep_every = 1.0 / self.fps if self.fps > 0 else 0.0
        next_keep = 0.0
        started = time.monotonic()
        index = 0
        image = self._first
        while not self._stop.is_set():
            if image is None:
                ok, image = self._cap.read()
                if not ok:
                    if not self.live:
                        return  # end of file
                    image = self._reconnect()
                    if image is None:
                        return
            if self.live:
                t = time.monotonic() - started
            else:
                t = index / self.source_fps
                if self.realtime:
                    delay = started + t - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
            index += 1
            if t + 1e-9 >= next_keep:
                next_keep = max(next_keep + keep_every, t) if keep_every else 0.0
                if not emit(Frame(t=t, index=index - 1, image=image)):
                    return
            image = None

    def _reconnect(self) -> Any:
        """A live stream ended or failed: reopen it until it reads again (or we are stopped)."""
        log.warning("camera.lost", source=self.spec, reconnect_every_s=self.reconnect_seconds)
        while not self._stop.wait(self.reconnect_seconds):
            self._cap.release()
            self._cap = self._open_capture()
            ok, image = self._cap.read() if self._cap.isOpened() else (False, None)
            if ok:
                self.stats.reconnects += 1
                log.info("camera.reconnected", source=self.spec)
                return image
        return None


class ImageFolderSource(ThreadedSource):
    """A folder of images replayed as frames at ``fps`` (sorted by file name)."""

    kind: Literal["video"] = "video"

    def __init__(self, folder: Path, *, fps: float = 1.0, realtime: bool = False) -> None:
        super().__init__(f"images:{folder}", lossless=True, queue_size=4)
        self.folder = folder
        self.fps = fps if fps > 0 else 1.0
        self.realtime = realtime
        self.files: list[Path] = []

    def open(self) -> None:
        if not self.folder.is_dir():
            raise InputError(f"image folder {self.folder} does not exist")
        self.files = sorted(
            p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise InputError(
                f"folder {self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
                fix="point replay at a folder of images, a video, an audio file or a recording "
                "folder",
            )
        self.stats.bytes_read = sum(p.stat().st_size for p in self.files)

    @property
    def duration(self) -> float:
        return len(self.files) / self.fps

    def _produce(self, emit: Callable[[Any], bool]) -> None:
        started = time.monotonic()
        for index, path in enumerate(self.files):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise InputError(
                    f"image {path} cannot be decoded",
                    fix="remove or replace the file (is it truncated?)",
                )
            t = index / self.fps
            if self.realtime:
                delay = started + t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if not emit(Frame(t=t, index=index, image=image)):
                return


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------


# What libsndfile reads (soundfile's wheel bundles it; Debian's libsndfile1 on armv7): WAV of
# every common sample format (8/16/24/32-bit PCM, 32/64-bit float, WAVE_FORMAT_EXTENSIBLE, as
# sox and Audacity write them), FLAC, OGG (Vorbis, Opus), AIFF, and MP3 with libsndfile >= 1.1.
AUDIO_SUFFIXES = {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".mp3"}


class AudioFileSource(ThreadedSource):
    """An audio file (AUDIO_SUFFIXES, read by libsndfile), mixed to mono and resampled (soxr) to
    the model's rate, in blocks. A file below the model's rate also hands on its own samples
    (``AudioBlock.source``), so events keep the file's rate instead of an upsampled copy."""

    kind: Literal["audio"] = "audio"

    def __init__(
        self,
        path: Path,
        *,
        rate: int = 16000,
        block_seconds: float = 0.1,
        realtime: bool = False,
        queue_size: int = 64,
    ) -> None:
        super().__init__(f"audio:{path}", lossless=True, queue_size=queue_size)
        self.path = path
        self.rate = rate
        self.block_seconds = block_seconds
        self.realtime = realtime
        self.in_rate = 0
        self.frames = 0

    def _refuse(self, why: str) -> InputError:
        return InputError(
            f"audio file {self.path} cannot be read ({why}): expected a WAV, FLAC or OGG file"
            " (or another format libsndfile reads)",
            fix=f"convert it: sox {self.path} -b 16 -c 1 -r {self.rate} out.wav",
        )

    def open(self) -> None:
        import soundfile

        if not self.path.is_file():
            raise InputError(f"audio file {self.path} does not exist")
        try:
            info = soundfile.info(str(self.path))
        except soundfile.SoundFileError as err:
            why = str(err).removeprefix(f"Error opening {str(self.path)!r}: ").rstrip(".")
            raise self._refuse(why) from None
        self.in_rate, self.frames = int(info.samplerate), int(info.frames)
        if info.channels < 1 or self.in_rate < 1000:
            raise self._refuse(f"{info.channels} channels at {self.in_rate} Hz")
        self.stats.bytes_read = self.path.stat().st_size

    @property
    def duration(self) -> float:
        return self.frames / self.in_rate if self.in_rate else 0.0

    def _produce(self, emit: Callable[[Any], bool]) -> None:
        import soundfile
        import soxr  # resampling is soxr's job, not ours

        resampler = None
        if self.in_rate != self.rate:
            resampler = soxr.ResampleStream(self.in_rate, self.rate, 1, dtype="float32")
        keep_source = self.in_rate < self.rate  # never upsample what an event keeps
        started = time.monotonic()
        emitted = read = 0
        block_in = max(1, round(self.block_seconds * self.in_rate))
        try:
            with soundfile.SoundFile(str(self.path)) as f:
                while not self._stop.is_set():
                    data = f.read(block_in, dtype="float32", always_2d=True)
                    last = len(data) < block_in
                    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
                    mono = np.ascontiguousarray(mono, dtype=np.float32)
                    samples = mono
                    if resampler is not None:
                        samples = resampler.resample_chunk(mono, last=last)
                    if len(samples) or len(mono):
                        t = emitted / self.rate
                        if self.realtime:
                            delay = started + t - time.monotonic()
                            if delay > 0:
                                time.sleep(delay)
                        block = AudioBlock(t=t, samples=samples)
                        if keep_source:
                            block.source, block.source_t = mono, read / self.in_rate
                            block.source_rate = self.in_rate
                        if not emit(block):
                            return
                        emitted += len(samples)
                        read += len(mono)
                    if last:
                        return
        except soundfile.SoundFileError as err:
            # a file that opens but breaks further in (truncated, corrupt frames)
            raise self._refuse(str(err)) from None


# The name replay and the tests knew it by, when it read only PCM WAV.
WavSource = AudioFileSource


class MicrophoneSource:
    """A microphone through sounddevice.InputStream.

    PortAudio calls ``callback`` on its own thread with each block; the block is copied and handed
    to the loop with ``call_soon_threadsafe``. ``stream_factory`` is the boundary tests fake (a
    stream object that calls the callback from a thread, like PortAudio does); by default it is
    ``sounddevice.InputStream``, imported only here so boards without a microphone never need
    PortAudio.
    """

    kind: Literal["audio"] = "audio"

    def __init__(
        self,
        *,
        device: str = "",
        rate: int = 16000,
        block_seconds: float = 0.1,
        queue_size: int = 200,
        stream_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.name = f"mic:{device or 'default'}"
        self.device = device
        self.rate = rate
        self.block_seconds = block_seconds
        self.queue_size = queue_size
        self.stats = SourceStats()
        self.overflows = 0
        self._factory = stream_factory
        self._stop = threading.Event()
        self._wake: Callable[[], None] | None = None

    def stop(self) -> None:
        self._stop.set()
        wake = self._wake
        if wake is not None:
            wake()  # a stream waiting for its next block ends now, not at the next block

    def _stream_factory(self) -> Callable[..., Any]:
        if self._factory is not None:
            return self._factory
        try:
            import sounddevice
        except OSError as err:  # PortAudio library missing
            raise InputError(
                f"the microphone needs PortAudio, which cannot be loaded ({err})",
                fix="sudo apt-get install libportaudio2 (or set microphone.enabled = false)",
            ) from None
        return sounddevice.InputStream  # type: ignore[no-any-return]

    async def stream(self) -> AsyncIterator[AudioBlock]:
        loop = asyncio.get_running_loop()
        handoff = Handoff(loop, self.queue_size, lossless=False)
        samples_seen = 0

        def on_drop(item: Any) -> None:
            # Audio is never dropped silently: count it, say it.
            self.stats.dropped += 1
            log.warning("audio.block_dropped", why="the loop fell behind",
                        source=self.name, dropped=self.stats.dropped, t=item.t)

        handoff.on_drop = on_drop

        def wake() -> None:
            loop.call_soon_threadsafe(handoff._put, _End())

        self._wake = wake

        def callback(indata: Any, frames: int, _time: Any, status: Any) -> None:
            nonlocal samples_seen
            if status and getattr(status, "input_overflow", False):
                self.overflows += 1
            block = np.asarray(indata, dtype=np.float32)
            if block.ndim > 1:
                block = block.mean(axis=1)
            t = samples_seen / self.rate
            samples_seen += frames
            self.stats.produced += 1
            handoff.put_from_thread(AudioBlock(t=t, samples=block.copy()), self._stop)

        factory = self._stream_factory()
        device: Any = int(self.device) if self.device.isdigit() else (self.device or None)
        try:
            stream = factory(
                samplerate=self.rate,
                channels=1,
                dtype="float32",
                blocksize=max(1, round(self.block_seconds * self.rate)),
                device=device,
                callback=callback,
            )
        except Exception as err:  # PortAudioError, ValueError for a bad device
            raise InputError(
                f"microphone {self.device or '(default)'} cannot be opened: {err}",
                fix="check microphone.device (python -m sounddevice lists devices)",
            ) from None
        stream.start()
        try:
            while not self._stop.is_set():
                item = await handoff.get()
                if isinstance(item, _End):
                    return
                yield item
        finally:
            self._wake = None
            stream.stop()
            stream.close()
            if self.overflows:
                log.warning("microphone.input_overflows", count=self.overflows)


# ---------------------------------------------------------------------------------------------
# Recordings (what replay reads and record writes)
# ---------------------------------------------------------------------------------------------


@dataclass
class Recording:
    """One replayable input: video and/or audio, plus optional ground-truth labels."""

    path: Path
    video: Any = None
    audio: Any = None
    started_at: float = 0.0  # epoch seconds of t=0 (from recording.json or the file's mtime)
    # Ground truth, when there is any: None means "unknown", [] means "nothing is there".
    labels: list[dict[str, Any]] | None = None

    @property
    def duration(self) -> float:
        return max(
            (getattr(s, "duration", 0.0) for s in (self.video, self.audio) if s is not None),
            default=0.0,
        )

    @property
    def input_bytes(self) -> int:
        return sum(s.stats.bytes_read for s in (self.video, self.audio) if s is not None)


def load_labels(path: Path) -> list[dict[str, Any]]:
    """Ground truth: {"schema": 1, "labels": [{"label", "start", "end"}, ...]} in seconds."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"labels file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"labels file {path} is not valid JSON: {err}") from None
    items = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise InputError(
            f"labels file {path} must be an object with a 'labels' list",
            fix='write {"schema": 1, "labels": [{"label": "person", "start": 0, "end": 5}]}',
        )
    out = []
    for i, item in enumerate(items):
        try:
            label, start, end = str(item["label"]), float(item["start"]), float(item["end"])
        except (KeyError, TypeError, ValueError):
            raise InputError(
                f"labels file {path}: labels[{i}] needs 'label', 'start' and 'end' (seconds)"
            ) from None
        if end < start:
            raise InputError(f"labels file {path}: labels[{i}] ends before it starts")
        out.append({"label": label, "start": start, "end": end})
    return out


def open_recording(
    path: Path,
    *,
    audio_rate: int | None,
    fps: float,
    realtime: bool,
    block_seconds: float = 0.1,
) -> Recording:
    """Resolve a replay PATH: a recording folder, an image folder, an audio file or a video."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"recording {path} does not exist",
            fix="pass a video file, a folder of images, an audio file or a recording folder",
        )

    def video(p: Path) -> VideoCaptureSource:
        return VideoCaptureSource(str(p), fps=fps, live=False, realtime=realtime)

    def audio(p: Path) -> AudioFileSource | None:
        if audio_rate is None:
            return None
        return AudioFileSource(p, rate=audio_rate, block_seconds=block_seconds,
                               realtime=realtime)

    if path.is_dir() and (path / "recording.json").is_file():
        meta_path = path / "recording.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError) as err:
            raise InputError(f"recording manifest {meta_path} is not valid JSON: {err}") from None
        rec = Recording(path=path)
        if meta.get("video"):
            rec.video = video(path / meta["video"])
        if meta.get("audio"):
            rec.audio = audio(path / meta["audio"])
        if meta.get("images"):
            rec.video = ImageFolderSource(path / meta["images"], fps=fps or 1.0, realtime=realtime)
        if rec.video is None and rec.audio is None and not meta.get("audio"):
            raise InputError(
                f"recording manifest {meta_path} names no 'video', 'images' or 'audio'",
                fix="add the media file names to recording.json",
            )
        rec.started_at = _parse_time(meta.get("started_at"), meta_path)
        if (path / "labels.json").is_file():
            rec.labels = load_labels(path / "labels.json")
        return rec
    if path.is_dir():
        return Recording(
            path=path,
            video=ImageFolderSource(path, fps=fps or 1.0, realtime=realtime),
            started_at=path.stat().st_mtime,
        )
    if path.suffix.lower() in AUDIO_SUFFIXES:
        src = audio(path)
        if src is None:
            raise InputError(
                f"{path} is audio but no audio model is configured",
                fix="set gate.audio_model (default builtin:sound)",
            )
        return Recording(path=path, audio=src, started_at=path.stat().st_mtime)
    return Recording(path=path, video=video(path), started_at=path.stat().st_mtime)


def _parse_time(value: Any, where: Path) -> float:
    if value is None:
        return where.stat().st_mtime
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise InputError(
            f"{where}: started_at {value!r} is not an ISO 8601 time",
            fix='write e.g. "2026-11-23T12:00:00Z"',
        ) from None
