"""The loop itself: events carry what the config allows, stop drains, live sources drop oldest."""

from __future__ import annotations

import asyncio
import io
import wave
from pathlib import Path

import numpy as np
import pytest

from edgekeeper import config as config_mod
from edgekeeper.device.gate import Gate
from edgekeeper.device.loop import Pipeline
from edgekeeper.device.replay import replay_recording
from edgekeeper.device.sink import LocalSink
from edgekeeper.device.sources import VideoCaptureSource


@pytest.mark.slow
async def test_event_contents_follow_the_event_config(tmp_path: Path, sample_recording: Path,
                                                      make_config) -> None:
    cfg = make_config(event={"key_frames": 2, "pre_roll_seconds": 1.0, "post_roll_seconds": 2.0,
                             "jpeg_width": 320})
    res = await replay_recording(sample_recording, cfg, events_dir=tmp_path / "ev", progress=False)
    assert res.events
    for e in res.events:
        assert 1 <= e["frames"] <= 2
        assert e["end_t"] - e["trigger_t"] == pytest.approx(2.0)
        assert e["trigger_t"] - e["start_t"] <= 1.0 + 1e-9
        folder = tmp_path / "ev" / f"{e['seq']:010d}"
        assert e["features_shape"]
        for jpg in folder.glob("frame-*.jpg"):
            import cv2

            assert cv2.imread(str(jpg)).shape[1] == 320
        if (folder / "audio.wav").exists():
            with wave.open(str(folder / "audio.wav"), "rb") as w:
                assert abs(w.getnframes() / 16000 - (e["end_t"] - e["start_t"])) < 0.2


@pytest.mark.slow
async def test_data_minimisation(tmp_path: Path, sample_recording: Path, make_config) -> None:
    cfg = make_config(event={"include_audio": False, "include_features": False,
                             "thumbnails_only": True, "thumbnail_width": 96})
    res = await replay_recording(sample_recording, cfg, events_dir=tmp_path / "ev", progress=False)
    assert res.events
    import cv2

    for e in res.events:
        folder = tmp_path / "ev" / f"{e['seq']:010d}"
        assert not (folder / "audio.wav").exists() and not (folder / "features.npy").exists()
        assert e["audio_seconds"] == 0 and e["features_shape"] is None
        for jpg in folder.glob("frame-*.jpg"):
            assert cv2.imread(str(jpg)).shape[1] == 96
    cfg = make_config(event={"include_frames": False})
    res = await replay_recording(sample_recording, cfg, events_dir=tmp_path / "ev2", progress=False)
    assert all(e["frames"] == 0 for e in res.events)


@pytest.mark.slow
async def test_pregate_spares_frames_and_counts(tmp_path: Path, sample_recording: Path,
                                                make_config) -> None:
    on = await replay_recording(sample_recording, make_config(), events_dir=tmp_path / "a",
                                progress=False)
    no_pregate = make_config(pregate={"motion": False, "energy": False})
    off = await replay_recording(sample_recording, no_pregate, events_dir=tmp_path / "b",
                                 progress=False)
    assert off.stats.frames_spared == 0 and off.stats.frames_scored == off.stats.frames
    assert on.stats.frames_scored + on.stats.frames_spared == on.stats.frames == off.stats.frames


async def test_stop_drains_pending_events_and_live_drops_are_counted(tmp_path: Path,
                                                                     sample_recording: Path,
                                                                     make_config) -> None:
    """A live run stopped mid-stream: the open event is still delivered, with what it has."""
    cfg = make_config(trigger={"k": 1, "n": 1, "labels": {"person": {"threshold": 0.0,
                                                                     "release": 0.0}}},
                      event={"post_roll_seconds": 60.0}, pregate={"motion": False})
    gate = Gate("vision")
    await gate.load(await asyncio.to_thread(config_mod.resolve_model, "builtin:person"))
    src = VideoCaptureSource(str(sample_recording / "video.avi"), fps=0, live=False,
                             lossless=False, queue_size=1, realtime=True)
    sink = LocalSink(tmp_path / "ev")
    pipe = Pipeline(cfg, sink, video=src, vision_gate=gate)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1.0, stop.set)
    stats = await pipe.run(stop)
    await asyncio.to_thread(gate.close)  # joins the model's thread: off the event loop
    assert stats.events == 1  # the 60 s post-roll never came; the event was not lost
    assert (tmp_path / "ev" / "0000000001" / "meta.json").exists()
    assert stats.frames < 30  # stopped early



class _FullDiskSink:
    """A sink on a disk with no room left (the Sink protocol's answer: no sequence number)."""

    def __init__(self) -> None:
        self.asked = 0

    async def next_seq(self) -> int | None:
        self.asked += 1
        return None

    async def deliver(self, event: object) -> None:
        raise AssertionError("an event without a sequence number must never be delivered")

    async def aclose(self) -> None:
        return None


async def test_a_sink_that_cannot_store_does_not_stop_the_loop(sample_recording: Path,
                                                               make_config) -> None:
    cfg = make_config(trigger={"k": 1, "n": 1,
                               "labels": {"person": {"threshold": 0.0, "release": 0.0,
                                                     "cooldown_seconds": 0.0}}},
                      pregate={"motion": False})
    gate = Gate("vision")
    await gate.load(await asyncio.to_thread(config_mod.resolve_model, "builtin:person"))
    src = VideoCaptureSource(str(sample_recording / "video.avi"), fps=0, live=False,
                             lossless=False, queue_size=4, realtime=False)
    sink = _FullDiskSink()
    stats = await Pipeline(cfg, sink, video=src, vision_gate=gate).run(asyncio.Event())
    await asyncio.to_thread(gate.close)
    fired = sum(1 for d in stats.decisions if d["action"] == "fire")
    assert fired >= 1 and stats.events_lost == fired == sink.asked and stats.events == 0
    assert stats.frames == stats.frames_scored > 0  # it went on to the end of the recording

async def test_sequence_numbers_survive_a_restart(tmp_path: Path) -> None:
    a = LocalSink(tmp_path)
    assert [await a.next_seq() for _ in range(3)] == [1, 2, 3]
    b = LocalSink(tmp_path)  # a new process on the same state
    assert await b.next_seq() == 4
    (tmp_path / ".tmp-0000000009").mkdir()  # a write cut short by a power loss
    c = LocalSink(tmp_path)
    assert await c.next_seq() == 5
    assert not (tmp_path / ".tmp-0000000009").exists()


def test_wav_encoding_roundtrip() -> None:
    from edgekeeper.device.events import encode_wav, wav_seconds

    x = np.sin(np.linspace(0, 100, 16000)).astype(np.float32) * 0.5
    data = encode_wav(x, 16000)
    assert wav_seconds(data) == 1.0
    with wave.open(io.BytesIO(data)) as w:
        back = np.frombuffer(w.readframes(16000), "<i2") / 32767
    assert np.abs(back - x).max() < 1e-3


def test_a_live_runs_history_stays_bounded_while_its_totals_stay_exact() -> None:
    """A board runs for months: the live loop keeps recent decisions and latencies only, while
    the counts the exit line and /metrics report stay exact (a replay keeps everything)."""
    from edgekeeper.device.loop import PipelineStats

    live, replay = PipelineStats(keep=100), PipelineStats()
    for i in range(10_000):
        for s in (live, replay):
            s.note_latency("vision", 1.0 + (i % 7))
            s.note_decision({"action": "fire" if i % 10 == 0 else "hold", "t": i})
    assert len(live.latencies_ms["vision"]) < 200 and len(live.decisions) < 200
    assert len(replay.latencies_ms["vision"]) == 10_000 and len(replay.decisions) == 10_000
    assert live.decisions[-1]["t"] == 9_999  # the most recent are the ones kept
    for s in (live, replay):
        d = s.as_dict()
        assert (d["triggers"], d["held_back"]) == (1_000, 9_000)
        assert d["gate_latency_ms"]["vision"]["n"] == 10_000
        assert s.latency_total_ms["vision"] == sum(1.0 + (i % 7) for i in range(10_000))


def test_gate_latency_buckets_count_every_inference() -> None:
    """/metrics' gate latency histogram comes from these buckets: every inference lands in
    exactly one, by its upper bound, whatever history the live run keeps."""
    from edgekeeper.device.loop import LATENCY_BUCKETS_MS, PipelineStats

    s = PipelineStats(keep=10)
    for ms in (0.5, 1.0, 1.5, 30.0, 999.0, 5000.0):
        s.note_latency("audio", ms)
    counts = s.latency_buckets["audio"]
    assert len(counts) == len(LATENCY_BUCKETS_MS) + 1 and sum(counts) == 6
    assert counts[0] == 2  # 0.5 and 1.0 ms: <= 1 ms
    assert counts[1] == 1 and counts[LATENCY_BUCKETS_MS.index(50.0)] == 1
    assert counts[LATENCY_BUCKETS_MS.index(1000.0)] == 1 and counts[-1] == 1  # > 1 s: +Inf
