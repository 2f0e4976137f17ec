"""Training examples (cloud/training/examples.py): the examples table in every store backend
(cloudkit.STORE_BACKENDS), what an example teaches (the label mapping and the weight rule),
kept media and its retention, and a real device-to-worker run that turns events into examples."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekeeper.cloud.backends import open_queue, open_store
from edgekeeper.cloud.store.base import Store
from edgekeeper.cloud.training.examples import (
    MEDIA_DIR,
    ExampleRecorder,
    TrainingExample,
    example_from,
    map_label,
    summarise,
    target_of,
    write_media,
)
from edgekeeper.config import MODELS_DIR, Config, TrainingSection
from edgekeeper.protocol.messages import EventBody, ResultBody
from edgekeeper.protocol.release import Scope

from cloudkit import STORE_BACKENDS, make_event
from servers import store_overrides

Opener = Callable[[], Awaitable[Store]]
NOW = 1_790_000_000.0


@pytest.fixture(params=STORE_BACKENDS)
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    opened: list[Store] = []

    async def open_backend() -> Store:
        s = await open_store(request.param, tmp_path / "data",
                             **store_overrides(request, request.param))
        opened.append(s)
        return s

    yield open_backend
    for s in opened:
        await s.close()


def example(device: str, seq: int, *, model: str = "person", group: str = "",
            at: float = NOW, target: str | None = "person", media: str | None = None,
            correct: bool | None = True) -> TrainingExample:
    rng = np.random.default_rng(seq)
    return TrainingExample(
        device_id=device, seq=seq, model=model, model_version="1.1.0",
        modality="vision" if model == "person" else "audio",
        features=rng.standard_normal((3, 64)).astype(np.float32),
        scores={"person": 0.91, "no_person": 0.09}, gate_label="person",
        teacher_label="a man walking", target=target, teacher_confidence=0.8,
        gate_correct=correct, reasoner="anthropic:claude-sonnet-4-6", provisional=False,
        weight=1.0 if target else 0.0, captured_at=at - 5, reasoned_at=at, group=group,
        media_path=media)


def same(a: TrainingExample, b: TrainingExample) -> bool:
    """Equal in every field, features bit for bit (the dataclass leaves them out of ==)."""
    return (dataclasses.replace(a, id=None) == dataclasses.replace(b, id=None)
            and a.features.shape == b.features.shape
            and np.array_equal(a.features, b.features))


# --- the table, in every backend ----------------------------------------------------------------


async def test_examples_round_trip_dedupe_and_scope(make_store: Opener) -> None:
    store = await make_store()
    made = [example("pi-1", 1, group="garden", at=NOW),
            example("pi-1", 2, group="garden", at=NOW + 10, target=None, correct=None),
            example("pi-2", 1, group="door", at=NOW + 20, target="no_person", correct=False),
            example("pi-2", 1, model="sound", group="door", at=NOW + 30)]
    ids = [await store.add_example(e) for e in made]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == 4
    # The same (device, seq, model) again, even with other values: the first row stays.
    assert await store.add_example(dataclasses.replace(made[0], target="no_person")) is None

    fleet = await store.examples(model="person", scope=Scope())
    assert [e.id for e in fleet] == ids[:3]  # oldest first, sound's left out
    assert all(same(a, b) for a, b in zip(fleet, made[:3], strict=True))
    assert fleet[1].target is None and fleet[1].gate_correct is None
    assert fleet[2].gate_correct is False and fleet[0].gate_correct is True

    def seqs(rows: list[TrainingExample]) -> list[tuple[str, int]]:
        return [(e.device_id, e.seq) for e in rows]

    assert seqs(await store.examples(model="person", scope=Scope("group", "garden"))) == [
        ("pi-1", 1), ("pi-1", 2)]
    assert seqs(await store.examples(model="person", scope=Scope("device", "pi-2"))) == [
        ("pi-2", 1)]
    assert await store.examples(model="person", scope=Scope("group", "nobody")) == []
    assert seqs(await store.examples(model="person", scope=Scope(), since=NOW + 10,
                                     until=NOW + 20)) == [("pi-1", 2)]
    assert len(await store.examples(model="person", scope=Scope(), limit=2)) == 2

    # A retrain is reproduced from the ids in its report: exactly those rows.
    again = await store.examples_by_ids([ids[2], ids[0], 999_999])
    assert [e.id for e in again] == [ids[0], ids[2]]
    assert same(again[0], made[0]) and same(again[1], made[2])
    assert await store.examples_by_ids([]) == []

    summary = summarise(await store.example_counts(model=None, scope=Scope()))
    person = summary["person"]
    assert person["examples"] == 3 and person["weighted"] == 2
    assert person["by_target"] == {"person": 1, "no_person": 1, "(none)": 1}
    assert person["by_device"] == {"pi-1": 2, "pi-2": 1}
    assert person["judged"] == 2 and person["gate_precision"] == 0.5
    assert summary["sound"]["examples"] == 1
    door = summarise(await store.example_counts(model="person", scope=Scope("group", "door")))
    assert list(door) == ["person"] and door["person"]["examples"] == 1


async def test_forget_media_deletes_old_files_and_clears_paths(make_store: Opener,
                                                               tmp_path: Path) -> None:
    store = await make_store()
    root = tmp_path / "data" / MEDIA_DIR
    old_body, new_body = make_event("pi-1", 1), make_event("pi-1", 2)
    old = await asyncio.to_thread(write_media, root, old_body)
    new = await asyncio.to_thread(write_media, root, new_body)
    assert old is not None and new is not None
    await store.add_example(example("pi-1", 1, at=NOW, media=old))
    await store.add_example(example("pi-1", 2, at=NOW + 100, media=new))
    await store.add_example(example("pi-1", 3, at=NOW - 100))  # never had media

    assert await store.forget_media(before=NOW + 50) == 1
    assert not Path(old).exists() and (Path(new) / "frame-00.jpg").exists()
    rows = await store.examples(model="person", scope=Scope())
    assert [e.media_path for e in rows] == [None, None, new]
    assert await store.forget_media(before=NOW + 50) == 0  # nothing left to forget
    assert await store.forget_media(before=NOW + 200) == 1 and not Path(new).exists()


async def test_the_retrain_schedule_counts_new_examples_in_the_store(make_store: Opener,
                                                                      tmp_path: Path) -> None:
    """The schedule's count query (count_new_examples) gives what reading every example and
    filtering in Python gave before it: the usable examples reasoned strictly after the mark,
    and the newest example's time (the mark itself when none is newer)."""
    from edgekeeper.cloud.retrain_schedule import RetrainScheduler

    store = await make_store()
    for e in [example("pi-1", 1, at=NOW), example("pi-1", 2, at=NOW + 10, target=None),
              example("pi-2", 1, group="door", at=NOW + 10),
              example("pi-2", 2, at=NOW + 20, target="no_person", correct=False),
              example("pi-2", 3, at=NOW + 30, target=None, correct=None),  # newest, unusable
              example("pi-1", 1, model="sound", at=NOW + 40)]:  # another model
        await store.add_example(e)

    async def by_reading(mark: float | None) -> tuple[int, float | None]:
        rows = await store.examples(model="person", scope=Scope(), since=mark)
        new = [e for e in rows if mark is None or e.reasoned_at > mark]
        newest = max((e.reasoned_at for e in rows), default=mark)
        return sum(1 for e in new if e.target is not None and e.weight > 0), newest

    sched = RetrainScheduler(Config(), store)
    expected = {None: (3, NOW + 30), NOW - 1: (3, NOW + 30), NOW: (2, NOW + 30),
                NOW + 10: (1, NOW + 30), NOW + 20: (0, NOW + 30), NOW + 30: (0, NOW + 30),
                NOW + 99: (0, NOW + 99)}
    for mark, want in expected.items():
        assert await sched.new_examples("person", mark) == want, mark
        assert await by_reading(mark) == want, mark
    assert await store.count_new_examples(model="person", scope=Scope(), after=NOW + 30) == (
        0, None)
    assert await store.count_new_examples(model="person", scope=Scope("group", "door"),
                                          after=None) == (1, NOW + 10)
    assert await store.count_new_examples(model="nothing", scope=Scope(), after=None) == (
        0, None)


# --- what an example teaches -----------------------------------------------------------------


@pytest.mark.parametrize(("model", "teacher", "mapped"), [
    ("sound", "music", "background"), ("sound", "TV", "background"),
    ("sound", "chime", "background"), ("sound", "silence", "background"),
    ("sound", "siren", "alarm"), ("sound", "Smoke-Alarm", "alarm"), ("sound", "beep", "alarm"),
    ("sound", "conversation", "speech"), ("sound", "talking", "speech"),
    ("sound", "speech", "speech"), ("person", "people", "person"),
    ("person", "background", "no_person"), ("person", "no person", "no_person"),
    ("person", "cat", "no_person"), ("sound", "a kettle whistling", None),
    ("unknown-model", "person", None),
])
def test_label_mapping_table(model: str, teacher: str, mapped: str | None) -> None:
    assert map_label(model, teacher) == mapped


@pytest.mark.parametrize(("model", "gate", "teacher", "correct", "target"), [
    ("person", "person", "a man walking", True, "person"),  # right: the label it fired on
    ("person", "person", "cat", False, "no_person"),
    ("person", "person", "a fox at night", False, "no_person"),  # unknown: negative class
    ("sound", "alarm", "music", False, "background"),
    ("sound", "alarm", "talking", False, "speech"),
    ("sound", "speech", "kettle", False, "background"),
    ("sound", "alarm", "siren", False, None),  # "wrong" yet names the same label: teaches nothing
    ("sound", "speech", "speech", None, None),  # the teacher could not tell
    ("drone", "bird", "bird", True, None),  # unknown label set
])
def test_target_rule(model: str, gate: str, teacher: str, correct: bool | None,
                     target: str | None) -> None:
    assert target_of(model, gate, teacher, correct) == target


def result(label: str, *, correct: bool | None, provisional: bool = False,
           confidence: float = 0.9, seq: int = 1) -> ResultBody:
    return ResultBody(device_id="pi-1", seq=seq, reasoner="anthropic:claude-sonnet-4-6",
                      label=label, confidence=confidence, summary="s", action="log",
                      gate_correct=correct, provisional=provisional, produced_at=NOW)


def test_example_from_an_event_and_the_weight_rule() -> None:
    body = make_event("pi-1", 7)  # features 2x4 float32, gate label person, person@1.0.0
    ex = example_from(body, result("person", correct=True), "person@1.0.0", "garden")
    assert ex is not None
    assert (ex.model, ex.model_version, ex.gate_label, ex.target) == ("person", "1.0.0",
                                                                      "person", "person")
    assert np.array_equal(ex.features, np.arange(8, dtype=np.float32).reshape(2, 4))
    assert ex.scores == {"person": 0.91} and ex.group == "garden" and ex.reasoned_at == NOW
    assert ex.weight == 0.9  # an LLM's label: its confidence (cloud/reasoners/weighting.py)
    provisional = example_from(body, result("person", correct=True, provisional=True), "")
    unsure = example_from(body, result("person", correct=True, confidence=0.5), "")
    nothing = example_from(body, result("person", correct=None), "")
    assert provisional is not None and provisional.weight == 0.45  # 0.9 x 0.5
    assert unsure is not None and unsure.weight == 0.0
    assert nothing is not None and nothing.target is None and nothing.weight == 0.0
    bare = dataclasses.replace(body, features=None, features_dtype="", features_shape=())
    assert example_from(bare, result("person", correct=True), "") is None
    # float16 features (a device may send them) become float32 of the same values.
    half = np.linspace(-1, 1, 6, dtype=np.float16)
    h = dataclasses.replace(body, features=half.astype("<f2").tobytes(),
                            features_dtype="float16", features_shape=(6,))
    hx = example_from(h, result("person", correct=True), "")
    assert hx is not None and hx.features.dtype == np.float32
    assert np.array_equal(hx.features, half.astype(np.float32))
    # No models in the event's meta: the envelope's tag names the model.
    tagged = dataclasses.replace(body, meta={**body.meta, "models": {}})
    tx = example_from(tagged, result("person", correct=True), "sound@2.0.0,person@1.2.0")
    assert tx is not None and (tx.model, tx.model_version) == ("person", "1.2.0")


# --- the worker's recorder: privacy switches, retention, failures ------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_media_is_kept_only_when_opted_in_private_and_deleted_after_retention(
        tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path / "data")
    try:
        clock = [NOW]
        off = ExampleRecorder(store, TrainingSection(), tmp_path / "data")
        rid = await off.record(make_event("pi-1", 1), result("person", correct=True),
                               "person@1.0.0")
        assert rid is not None
        assert not (tmp_path / "data" / MEDIA_DIR).exists()
        (row,) = await store.examples_by_ids([rid])
        assert row.media_path is None

        on = ExampleRecorder(store, TrainingSection(keep_media=True, media_retention_days=2),
                             tmp_path / "data", clock=lambda: clock[0])
        body = make_event("pi-1", 2)
        rid = await on.record(body, result("person", correct=True, seq=2), "person@1.0.0")
        assert rid is not None
        (row,) = await store.examples_by_ids([rid])
        assert row.media_path is not None
        folder = Path(row.media_path)
        assert folder == tmp_path / "data" / MEDIA_DIR / "pi-1" / "2"
        assert (folder / "frame-00.jpg").read_bytes() == body.frames[0]
        assert mode(folder) == 0o700 and mode(folder.parent) == 0o700
        assert mode(folder / "frame-00.jpg") == 0o600
        # An orphan folder (its example never stored) goes with the same retention.
        orphan = await asyncio.to_thread(write_media, on.media_root, make_event("pi-9", 5))
        assert orphan is not None

        clock[0] = row.reasoned_at + 86400.0  # one day: within the retention
        assert await on.forget_old_media() == 0 and folder.exists() and Path(orphan).exists()
        clock[0] = time.time() + 3 * 86400.0  # past it
        assert await on.forget_old_media() == 1
        assert not folder.exists() and not Path(orphan).exists()
        (row,) = await store.examples_by_ids([rid])
        assert row.media_path is None and row.features.shape == (2, 4)  # features stay
        assert (await off.record(make_event("pi-1", 3), result("person", correct=True, seq=3),
                                 "person@1.0.0")) is not None
        none = ExampleRecorder(store, TrainingSection(examples=False), tmp_path / "data")
        assert await none.record(make_event("pi-1", 4), result("person", correct=True, seq=4),
                                 "person@1.0.0") is None
        assert len(await store.examples(model="person", scope=Scope())) == 3
    finally:
        await store.close()


def clip_event(sample: Path, seq: int, seconds: float, rate: int = 16000) -> EventBody:
    """An audio event as the device sends it: the trigger window's (16, 96) features and a
    ``seconds`` clip of the bundled sample's real soundtrack."""
    import io
    import wave

    from edgekeeper.cloud.training.features import AudioFrontend

    with wave.open(str(sample / "audio.wav")) as w:
        assert w.getframerate() == 16000 and w.getsampwidth() == 2 and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(int(seconds * 16000)), "<i2")
    trigger = AudioFrontend(MODELS_DIR / "frontends", num_threads=1).features(
        pcm[-32000:].astype(np.float32) / 32768.0)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return EventBody(
        device_id="pi-1", seq=seq, captured_at=NOW,
        meta={"label": "alarm", "modality": "audio", "scores": {"alarm": 0.9},
              "models": {"audio": "sound@1.1.0"}},
        frames=(), audio_wav=buf.getvalue(), features=trigger.astype("<f4").tobytes(),
        features_dtype="float32", features_shape=(16, 96))


async def test_an_audio_event_gives_one_row_per_clip_hop_of_its_clip(
        tmp_path: Path, sample_recording: Path) -> None:
    """The worker's recorder stores, with the trigger window, the head-input window of every
    0.48 s (the gate's hop) of the event's real clip, computed with the shipped front ends; a
    retrain reads them as rows with the event's target and weight (retrain.rows_of)."""
    import io
    import wave

    from edgekeeper.cloud.training.features import AudioFrontend
    from edgekeeper.cloud.training.retrain import rows_of, usable

    store = await open_store("sqlite", tmp_path / "data")
    try:
        recorder = ExampleRecorder(store, TrainingSection(), tmp_path / "data")
        body = await asyncio.to_thread(clip_event, sample_recording, 1, 6.0)
        verdict = result("speech", correct=False)
        rid = await recorder.record(body, verdict, "sound@1.1.0")
        assert rid is not None
        (ex,) = await store.examples_by_ids([rid])
        # floor((6.0 - 2.0) / 0.48) + 1 windows of the clip, ending on its end, after the trigger
        # window.
        assert ex.features.shape == (1 + 9, 16, 96)
        sent = np.frombuffer(body.features or b"", "<f4").reshape(16, 96)
        assert np.array_equal(ex.features[0], sent)

        def fourth_window() -> np.ndarray:  # ends 6.0 - 5 x 0.48 = 3.6 s into the clip
            with wave.open(io.BytesIO(body.audio_wav or b"")) as w:
                pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
            fe = AudioFrontend(MODELS_DIR / "frontends", num_threads=1)
            return fe.features(pcm[25600:57600].astype(np.float32) / 32768)

        assert np.allclose(ex.features[4], await asyncio.to_thread(fourth_window), atol=1e-5)
        # The clip's last window is the trigger window: the device and the cloud agree.
        assert np.allclose(ex.features[-1], sent, atol=1e-4)
        assert ex.target == "speech" and ex.weight > 0

        kept, skipped = usable([ex], "sound", ("background", "speech", "alarm"), (16, 96))
        assert kept == [ex] and skipped == {}
        x, y, w = rows_of(kept, (16, 96), {"background": 0, "speech": 1, "alarm": 2})
        assert x.shape == (10, 16, 96) and set(y) == {1} and np.allclose(w, ex.weight)

        # A clip the front ends cannot read (8 kHz), or with the hop off: the trigger window.
        odd_body = await asyncio.to_thread(clip_event, sample_recording, 2, 6.0, 8000)
        odd = await recorder.record(odd_body,
                                    result("speech", correct=False, seq=2), "sound@1.1.0")
        off = ExampleRecorder(store, TrainingSection(), tmp_path / "data", clip_hop=0)
        none = await off.record(await asyncio.to_thread(clip_event, sample_recording, 3, 6.0),
                                result("speech", correct=False, seq=3), "sound@1.1.0")
        for i in (odd, none):
            assert i is not None
            (row,) = await store.examples_by_ids([i])
            assert row.features.shape == (16, 96)
    finally:
        await store.close()


async def test_a_failing_example_write_never_fails_the_event(tmp_path: Path) -> None:
    """The examples table is gone (a real SQLite error): the worker still stores the result and
    acks the event, and logs worker.example_failed."""
    from structlog.testing import capture_logs

    from edgekeeper.cloud.keys import CloudKeys
    from edgekeeper.cloud.queue.base import QueuedEvent
    from edgekeeper.cloud.reasoners.echo import EchoReasoner
    from edgekeeper.cloud.worker import Worker
    from edgekeeper.protocol import envelope as E

    from cloudkit import enroll_device

    data = tmp_path / "data"
    store = await open_store("sqlite", data)
    queue = await open_queue("sqlite", data, max_attempts=3)
    try:
        keys = await asyncio.to_thread(CloudKeys.ensure, data)
        device = await enroll_device(store, "pi-1")

        def drop(path: Path) -> None:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.execute("DROP TABLE examples")
                conn.commit()

        await asyncio.to_thread(drop, data / "store.sqlite")
        for seq in (1, 2):
            sealed = E.seal_event(make_event("pi-1", seq), device=device,
                                  cloud_box_pk=keys.box_pk, sent_at=time.time(),
                                  model_version="person@1.0.0")
            await queue.enqueue(QueuedEvent("pi-1", seq, E.peek_header(sealed).payload_hash,
                                            sealed, time.time()))
        recorder = ExampleRecorder(store, TrainingSection(), data)
        with capture_logs() as logs:
            stats = await Worker(queue=queue, store=store, reasoner=EchoReasoner(), keys=keys,
                                 poll_s=0.05, examples=recorder).run(burst=True)
        assert stats.done == 2 and stats.dead == 0 and stats.retried == 0
        assert recorder.failed == 2 and recorder.added == 0
        assert [e["event"] for e in logs].count("worker.example_failed") == 2
        assert len(await store.results_after("pi-1", 0, 10)) == 2
    finally:
        await queue.close()
        await store.close()


# --- end to end: a device replays the sample, the worker makes examples ------------------------


class _Keeping:
    """The device's real outbox sink, keeping what each event carried for the comparison."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bodies: dict[int, EventBody] = {}

    async def next_seq(self) -> int | None:
        seq: int | None = await self.inner.next_seq()
        return seq

    async def deliver(self, event: Any) -> None:
        await self.inner.deliver(event)
        self.bodies[event.seq] = event.to_body()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.slow
async def test_a_real_run_turns_every_reasoned_event_into_an_example(
        tmp_path: Path, sample_recording: Path, make_config: Callable[..., Config],
        capsys: pytest.CaptureFixture[str]) -> None:
    from edgekeeper import compat, runtime
    from edgekeeper.cloud.enroll import issue_token
    from edgekeeper.cloud.ingest import IngestServer, create_app
    from edgekeeper.cloud.worker import build_worker
    from edgekeeper.demo import demo_configs
    from edgekeeper.device import identity
    from edgekeeper.device.replay import replay_recording
    from edgekeeper.device.uplink import DeviceLink

    config = make_config(cloud={"reasoner": "offline"}, reasoner={"transcriber": "none"},
                         training={"keep_media": True, "media_retention_days": 1})
    cloud_cfg, device_cfg = demo_configs(config, tmp_path / "run")
    async with contextlib.AsyncExitStack() as stack:
        server = IngestServer(create_app(cloud_cfg.cloud, cloud_cfg.cloud_data_dir))
        url = await server.start()
        stack.push_async_callback(server.stop)
        state = server.state
        worker = build_worker(cloud_cfg, queue=state.queue, store=state.store, keys=state.keys,
                              stack=stack, poll_s=0.05)
        token = await issue_token(state.store, ttl_s=600.0, now=time.time())
        await identity.enroll(url, token, device_id=device_cfg.device.id,
                              state_dir=device_cfg.device.state_dir)
        link = await stack.enter_async_context(await DeviceLink.open(device_cfg))
        got: list[dict[str, Any]] = []
        arrived = asyncio.Event()
        keeping = _Keeping(link.sink)

        async def collect(doc: dict[str, Any]) -> None:
            got.append(doc)
            arrived.set()

        link.actions.actions.append(("test-collect", collect))
        stop_link, stop_worker = asyncio.Event(), asyncio.Event()
        async with compat.TaskGroup() as tg:
            tg.create_task(worker.run(stop=stop_worker))
            tg.create_task(link.run(stop_link))
            try:
                await replay_recording(sample_recording, device_cfg, events_dir=tmp_path / "ev",
                                       progress=False, sink=keeping)
                deadline = time.monotonic() + 120.0
                while len(got) < len(keeping.bodies) and time.monotonic() < deadline:
                    arrived.clear()
                    await runtime.sleep(asyncio.Event(), 1.0, wake=arrived)
            finally:
                stop_link.set()
                stop_worker.set()
        store = state.store
        assert keeping.bodies and len(got) == len(keeping.bodies)
        stored = {(e.device_id, e.seq): e for model in ("person", "sound")
                  for e in await store.examples(model=model, scope=Scope())}
        with_features = {s: b for s, b in keeping.bodies.items() if b.features is not None}
        assert with_features and set(stored) == {(device_cfg.device.id, s) for s in with_features}
        for seq, body in with_features.items():
            ex = stored[(device_cfg.device.id, seq)]
            sent = np.frombuffer(body.features or b"", "<f4").reshape(body.features_shape)
            # An audio event's example also holds its clip's windows after the trigger's.
            stack = ex.features if ex.modality == "audio" and body.audio_wav else None
            assert np.array_equal(ex.features if stack is None else stack[0], sent)
            assert stack is None or (stack.ndim == 3 and len(stack) > 1)
            assert ex.scores == body.meta["scores"] and ex.gate_label == body.meta["label"]
            assert ex.reasoner.startswith("offline:") and ex.provisional
            assert ex.media_path is not None
            kept = sorted(os.listdir(ex.media_path))
            assert kept == sorted([f"frame-{i:02d}.jpg" for i in range(len(body.frames))] + (
                ["audio.wav"] if body.audio_wav is not None else []))
            if body.audio_wav is not None:
                assert (Path(ex.media_path) / "audio.wav").read_bytes() == body.audio_wav
            assert all(mode(Path(ex.media_path) / f) == 0o600 for f in kept)
        # A person the offline teacher confirmed teaches "person", at the provisional weight.
        # (confidence x 0.5, cloud/reasoners/weighting.py).
        assert any(e.target == "person" and e.weight > 0
                   and e.weight == round(e.teacher_confidence * 0.5, 4)
                   for e in stored.values())

        # The worker's retention task (first run at start, then hourly), two days later:
        # every kept file is deleted, the examples stay without media.
        recorder = worker.examples
        assert recorder is not None
        recorder.clock = lambda: time.time() + 2 * 86400.0
        await worker.run(burst=True)
        media = cloud_cfg.cloud_data_dir / MEDIA_DIR
        assert media.is_dir() and not any(p.is_file() for p in media.rglob("*"))
        after = [e for model in ("person", "sound")
                 for e in await store.examples(model=model, scope=Scope())]
        assert len(after) == len(with_features) and all(e.media_path is None for e in after)

    # The operator's summary of the same store, through the command line.
    from edgekeeper.cli import main

    conf = tmp_path / "cloud.toml"
    conf.write_text(f'[cloud]\ndata_dir = "{cloud_cfg.cloud_data_dir}"\n')
    capsys.readouterr()
    argv = ["--config", str(conf), "cloud", "examples", "--json"]
    assert await asyncio.to_thread(main, argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sum(m["examples"] for m in doc["models"].values()) == len(with_features)
    assert doc["scope"] == "fleet"
