"""Model updates on the device (device/update/): signed releases from a real aiohttp server on
127.0.0.1, real TFLite models from models/, real files under tmp_path.

Every refusal is checked the same way: the refusal is logged (update.refused or
update.shadow_failed, with its reason) and reported to the server, the gate still runs the model
it ran, and both slots and the active model in the pointer are byte for byte what they were."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from nacl.signing import SigningKey
from structlog.testing import capture_logs

from edgekeeper import config as config_mod
from edgekeeper.config import MODELS_DIR, UpdatesSection
from edgekeeper.device.gate import Gate
from edgekeeper.device.manifest import load_manifest
from edgekeeper.device.update import parse_hint
from edgekeeper.device.update.canary import CanaryRing
from edgekeeper.device.update.fetch import ReleaseFetcher
from edgekeeper.device.update.store import ModelStore, Pointer, Ref, Trial
from edgekeeper.device.update.updater import Updater
from edgekeeper.errors import ConfigError, RetryableError
from edgekeeper.protocol.keys import DeviceKeys
from edgekeeper.protocol.release import RELEASE_FILE
from tests.update_kit import DAY, ReleaseServer, build_release, tree_digest

FAMILIES = {"vision": "person", "audio": "sound"}


def frames(n: int = 40) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(MODELS_DIR / "samples" / "street" / "video.avi"))
    out = []
    while len(out) < n:
        ok, frame = cap.read()
        if not ok:
            break
        out.append(frame)
    cap.release()
    return out


@dataclasses.dataclass
class Device:
    tmp: Path
    key: SigningKey
    server: ReleaseServer
    store: ModelStore
    gate: Gate
    fetcher: ReleaseFetcher
    updater: Updater
    ring: CanaryRing | None

    def snapshot(self) -> tuple[Any, ...]:
        pointer = self.store.read_pointer()
        return (tree_digest(self.store.slot_dir("a")), tree_digest(self.store.slot_dir("b")),
                pointer.active if pointer else self.store.builtin, self.gate.manifest.tag)

    async def release(self, version: str, **kw: Any) -> Path:
        return await asyncio.to_thread(
            build_release, self.tmp / "releases" / version, FAMILIES[self.gate.modality],
            version, kw.pop("key", self.key), **kw)

    async def restart(self, active: Any = None) -> Updater:
        """A new start on the same state: recover, load what the pointer names."""
        active = active or await asyncio.to_thread(self.store.recover)
        await self.gate.swap(active.manifest)
        self.gate.observers.clear()
        self.updater = Updater(store=self.store, gate=self.gate, fetcher=self.fetcher,
                               active=active, settings=self.updater.settings, ring=self.ring,
                               thresholds=self.updater.thresholds)
        return self.updater


@pytest.fixture
async def make_device(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Device] = []

    async def make(modality: str = "vision", *, ring: bool = False,
                   **settings: Any) -> Device:
        family = FAMILIES[modality]
        key = SigningKey.generate()
        keys = await asyncio.to_thread(DeviceKeys.generate)
        server = ReleaseServer(keys.public("test-device"))
        await server.start()
        builtin = MODELS_DIR / family / "manifest-int8.json"
        manifest = await asyncio.to_thread(load_manifest, builtin)
        store = ModelStore(tmp_path / "state", family, release_pk=bytes(key.verify_key),
                           builtin_manifest=builtin, builtin_version=manifest.version)
        active = await asyncio.to_thread(store.recover)
        gate = Gate(modality, 1)
        await gate.load(active.manifest)
        fetcher = await ReleaseFetcher(server.url, keys=keys, device_id="test-device",
                                       stall_seconds=settings.pop("stall_seconds", 5.0),
                                       deadline_seconds=settings.pop("deadline_seconds", 60.0),
                                       ).__aenter__()
        canary = None
        if ring:
            canary = await CanaryRing(tmp_path / "state" / "canary.sqlite",
                                      thresholds={"person": 0.7}).open()
        updater = Updater(store=store, gate=gate, fetcher=fetcher, active=active,
                          settings=UpdatesSection(**{"trial_inferences": 5, **settings}),
                          ring=canary, thresholds={"person": 0.7, "alarm": 0.6, "speech": 0.8})
        device = Device(tmp_path, key, server, store, gate, fetcher, updater, canary)
        made.append(device)
        return device

    yield make
    for d in made:
        await d.fetcher.__aexit__(None, None, None)
        await d.server.stop()
        if d.ring is not None:
            await d.ring.close()
        await asyncio.to_thread(d.gate.close)


async def classify_frames(gate: Gate, n: int) -> list[str]:
    out = []
    for frame in frames(n):
        out.append((await gate.classify(frame)).model)
    return out


# -- the good path ------------------------------------------------------------------------------


async def test_a_newer_signed_release_is_verified_swapped_trialled_and_kept(make_device: Any
                                                                            ) -> None:
    d = await make_device()
    d.server.publish("person", await d.release("1.2.0"))
    assert await d.updater.check_once() == "swapped"
    assert d.gate.manifest.tag == "person@1.2.0"
    pointer = await asyncio.to_thread(d.store.read_pointer)
    assert pointer is not None and pointer.active.slot == "a" and pointer.trial is not None
    assert pointer.fallback is not None and pointer.fallback.slot is None  # the builtin
    assert [r["outcome"] for r in d.server.reports] == ["downloaded", "active"]

    # The trial: 5 inferences on the new model, then it is good.
    assert set(await classify_frames(d.gate, 5)) == {"person@1.2.0"}
    await d.updater.finish_trial()
    pointer = await asyncio.to_thread(d.store.read_pointer)
    assert pointer is not None and pointer.trial is None
    assert d.server.reports[-1]["outcome"] == "trial_passed"
    # The same release again: unchanged (ETag), nothing fetched.
    assert await d.updater.check_once() == "none"
    # A restart verifies slot-a and runs it.
    updater = await d.restart()
    assert updater.active.ref.slot == "a" and d.gate.manifest.tag == "person@1.2.0"
    # The next release goes into slot-b; slot-a becomes the fallback.
    d.server.publish("person", await d.release("1.3.0"))
    assert await updater.check_once() == "swapped"
    pointer = await asyncio.to_thread(d.store.read_pointer)
    assert pointer is not None and pointer.active.slot == "b"
    assert pointer.fallback is not None and pointer.fallback.slot == "a"


async def test_an_audio_release_reuses_the_front_ends_the_device_has(make_device: Any) -> None:
    d = await make_device("audio")
    d.server.publish("sound", await d.release("1.2.0"))
    assert await d.updater.check_once() == "swapped"
    fetched = [p for p in d.server.requests if p.count("/") > 3]
    assert fetched and not [p for p in fetched if "frontends" in p]
    assert d.gate.manifest.tag == "sound@1.2.0"
    slot = d.store.slot_dir("a")
    assert (slot / "frontends" / "melspectrogram.tflite").stat().st_size > 1000
    out = await d.gate.classify(np.zeros(32000, np.float32), 32000)
    assert set(out.scores) == {"alarm", "speech"} or out.scores


async def test_a_signed_rollback_newer_than_the_running_release_goes_back(make_device: Any
                                                                         ) -> None:
    d = await make_device()
    d.server.publish("person", await d.release("1.3.0"))
    assert await d.updater.check_once() == "swapped"
    await classify_frames(d.gate, 5)
    await d.updater.finish_trial()
    d.server.publish("person", await d.release("1.2.0", rollback=True))
    assert await d.updater.check_once() == "swapped"
    assert d.gate.manifest.tag == "person@1.2.0"


# -- refusals ---------------------------------------------------------------------------------


def _flip_signature(raw: bytes) -> bytes:
    env = json.loads(raw)
    sig = bytearray(__import__("base64").b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 0x01
    env["signatures"][0]["sig"] = __import__("base64").b64encode(bytes(sig)).decode()
    return json.dumps(env).encode()


def _flip_payload(raw: bytes) -> bytes:
    import base64
    env = json.loads(raw)
    payload = bytearray(base64.b64decode(env["payload"]))
    i = payload.index(b'"version"')
    payload[i + 12] ^= 0x01  # a bit of the version's digits
    env["payload"] = base64.b64encode(bytes(payload)).decode()
    return json.dumps(env).encode()


REFUSALS = {
    # name: (how to publish, reason logged, reason reported starts with)
    "flipped_bit_in_model_file": ("file_flip", "file_mismatch"),
    "flipped_bit_in_release_signature": ("sig_flip", "bad_signature"),
    "flipped_bit_in_release_payload": ("payload_flip", "bad_signature"),
    "signed_by_an_unknown_key": ("unknown_key", "unknown_key"),
    "older_version": ("older", "not_newer"),
    "manifest_of_one_version_files_of_another": ("mixed", "file_mismatch"),
    "more_bytes_than_declared": ("extra", "file_mismatch"),
    "more_bytes_with_content_length": ("extra_length", "file_mismatch"),
    "expired": ("expired", "expired"),
    "old_rollback_replayed": ("old_rollback", "not_newer"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_bad_release_is_refused_logged_reported_and_changes_nothing(
        make_device: Any, case: str) -> None:
    how, reason = REFUSALS[case]
    d = await make_device()
    # A good 1.2.0 runs (slot-a), trial passed: the refusal must leave it and both slots alone.
    d.server.publish("person", await d.release("1.2.0"))
    assert await d.updater.check_once() == "swapped"
    await classify_frames(d.gate, 5)
    await d.updater.finish_trial()
    before = await asyncio.to_thread(d.snapshot)
    # The manifest names the version: it is the one file not already on the device (the model
    # file is reused from slot-a), so it is the one fetched, and the one the server spoils.
    model = "manifest-int8.json"
    if how == "file_flip":
        # A model file the device does not have (a byte appended), one bit flipped in transit.
        unique = d.tmp / "person-int8-other.tflite"
        unique.write_bytes((MODELS_DIR / "person" / "person-int8.tflite").read_bytes() + b"x")
        d.server.publish("person", await d.release("1.3.0", model_file=unique),
                         **{"person-int8.tflite": "flip"})
    elif how in ("extra", "extra_length"):
        d.server.publish("person", await d.release("1.3.0"), **{model: how})
    elif how == "sig_flip":
        folder = await d.release("1.3.0")
        d.server.publish("person", folder)
        d.server.served["person"].release = _flip_signature(d.server.served["person"].release)
    elif how == "payload_flip":
        d.server.publish("person", await d.release("1.3.0"))
        d.server.served["person"].release = _flip_payload(d.server.served["person"].release)
    elif how == "unknown_key":
        d.server.publish("person", await d.release("1.3.0", key=SigningKey.generate()))
    elif how == "older":
        d.server.publish("person", await d.release("1.1.5"))
    elif how == "mixed":
        # release.json of 1.3.0, files of 1.4.0 (its manifest says 1.4.0: another sha256)
        d.server.publish("person", await d.release("1.4.0"))
        d.server.served["person"].release = (await d.release("1.3.0") / RELEASE_FILE).read_bytes()
    elif how == "expired":
        d.server.publish("person", await d.release("1.3.0", created_at=time.time() - 2 * DAY,
                                             expires_at=time.time() - DAY))
    elif how == "old_rollback":
        d.server.publish("person", await d.release("1.1.0", rollback=True,
                                             created_at=time.time() - 3600))
    with capture_logs() as logs:
        assert await d.updater.check_once() == "refused"
    refused = [e for e in logs if e["event"] == "update.refused"]
    assert refused and refused[0]["reason"] == reason, logs
    assert d.server.reports[-1]["outcome"] == "refused"
    assert d.server.reports[-1]["reason"].startswith(reason)
    assert await asyncio.to_thread(d.snapshot) == before
    # The running model still answers, and a restart runs it too.
    assert set(await classify_frames(d.gate, 2)) == {"person@1.2.0"}
    assert (await asyncio.to_thread(d.store.recover)).ref.version == "1.2.0"
    # Refused once: the same release.json is not fetched or reported again.
    reports = len(d.server.reports)
    assert await d.updater.check_once() in ("unchanged", "none")
    assert len(d.server.reports) == reports


async def test_a_sample_rate_the_microphone_does_not_run_is_refused(make_device: Any) -> None:
    d = await make_device("audio")
    before = await asyncio.to_thread(d.snapshot)
    d.server.publish("sound", await d.release("1.2.0", sample_rate=22050))
    with capture_logs() as logs:
        assert await d.updater.check_once() == "refused"
    assert [e["reason"] for e in logs if e["event"] == "update.refused"] == ["input_mismatch"]
    assert d.server.reports[-1]["reason"].startswith("input_mismatch")
    assert not [p for p in d.server.requests if p.count("/") > 3]  # no file was fetched
    assert await asyncio.to_thread(d.snapshot) == before


SHADOW = {
    # A validly signed model that outputs NaN (its manifest's mean is NaN).
    "nan_output": ({"vision": {"mean": [float("nan")] * 3}, "variant": "float"}, "non_finite"),
    # An audio model given as the person model: the wrong input shape.
    "wrong_input_shape": ({"model_file": MODELS_DIR / "sound" / "sound-int8.tflite"},
                          "load_failed"),
    # A manifest whose model is a file outside the release (here the builtin's, by its path).
    "file_outside_the_release": ({"edit_manifest": lambda m: m["stages"][0].update(
        model=str(MODELS_DIR / "person" / "person-int8.tflite"))}, "wrong_files"),
    # A model that says "no person" to everything the current one sees a person in.
    "disagrees": ({"vision": {"mean": [-3.0] * 3}}, "disagrees"),
}


@pytest.mark.parametrize("case", sorted(SHADOW))
async def test_a_signed_model_that_fails_the_shadow_evaluation_is_refused(
        make_device: Any, case: str) -> None:
    kw, reason = SHADOW[case]
    d = await make_device()
    before = await asyncio.to_thread(d.snapshot)
    d.server.publish("person", await d.release("1.2.0", **kw))
    with capture_logs() as logs:
        assert await d.updater.check_once() == "shadow_failed"
    failed = [e for e in logs if e["event"] == "update.shadow_failed"]
    assert failed and failed[0]["reason"].startswith(reason), failed
    assert [r["outcome"] for r in d.server.reports] == ["downloaded", "shadow_failed"]
    assert d.server.reports[-1]["reason"].startswith(reason)
    assert await asyncio.to_thread(d.snapshot) == before
    assert set(await classify_frames(d.gate, 2)) == {"person@1.1.0"}
    # Remembered across a restart: the same release is not downloaded again.
    updater = await d.restart()
    d.server.requests.clear()
    assert await updater.check_once() == "unchanged"
    assert d.server.requests == ["/v1/releases/person"]


# -- slow servers: the download gives up, inference goes on ------------------------------------


@pytest.mark.parametrize("mode", ["slow", "stall"])
async def test_a_slow_download_times_out_while_inference_continues(make_device: Any,
                                                                  mode: str) -> None:
    d = await make_device(stall_seconds=1.0, deadline_seconds=2.0, download_attempts=2)
    d.server.publish("person", await d.release("1.2.0"), **{"manifest-int8.json": mode})
    before = await asyncio.to_thread(d.snapshot)
    done = asyncio.Event()
    inferences: list[float] = []

    async def infer() -> None:
        images = await asyncio.to_thread(frames, 10)
        while not done.is_set():
            for frame in images:
                out = await d.gate.classify(frame)
                assert out.model == "person@1.1.0"
                inferences.append(time.monotonic())

    task = asyncio.create_task(infer())
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(RetryableError,
                                               match=r"not complete within|no byte"):
        await d.updater.check_once()
    ended = time.monotonic()
    done.set()
    await task
    assert any(e["event"] == "update.download_failed" for e in logs)
    # updates.download_attempts = 2: the file asked twice, then the check gives up.
    assert sum(r.endswith("/manifest-int8.json") for r in d.server.requests) == 2
    # Inference kept completing all along the download (which took seconds): in each quarter.
    assert ended - started >= 1.0
    quarter = (ended - started) / 4
    for q in range(4):
        lo = started + q * quarter
        assert any(lo <= t <= lo + quarter for t in inferences), (q, len(inferences))
    assert await asyncio.to_thread(d.snapshot) == before


# -- swap under load -------------------------------------------------------------------------


async def test_a_swap_under_a_steady_stream_drops_no_frame(make_device: Any) -> None:
    d = await make_device()
    d.server.publish("person", await d.release("1.2.0"))
    images = await asyncio.to_thread(frames, 20)
    sent = 0
    answered: list[str] = []
    stop = asyncio.Event()

    async def stream() -> None:
        nonlocal sent
        pending: list[asyncio.Future[Any]] = []
        while not stop.is_set() or pending:
            if not stop.is_set():
                pending.append(d.gate.submit(images[sent % len(images)]))
                sent += 1
            if len(pending) >= 2 or stop.is_set():
                answered.append((await pending.pop(0)).model)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(stream())
    await asyncio.sleep(0.2)
    assert await d.updater.check_once() == "swapped"
    await asyncio.sleep(0.2)
    stop.set()
    await task
    assert sent == len(answered)
    assert answered[0] == "person@1.1.0" and answered[-1] == "person@1.2.0"
    first_new = answered.index("person@1.2.0")
    assert set(answered[first_new:]) == {"person@1.2.0"}  # one switch, between two inferences


# -- trial and rollback ------------------------------------------------------------------------


async def test_a_regression_during_the_trial_rolls_back(make_device: Any) -> None:
    """The canary ring holds dark frames, on which a model with a tiny std is finite; on the
    street it overflows to NaN: it passes the shadow evaluation and fails its trial."""
    d = await make_device(ring=True, trial_inferences=50)
    assert d.ring is not None
    dark = np.zeros((480, 640, 3), np.uint8)
    for _ in range(3):
        out = await d.gate.classify(dark)
        d.ring._last.clear()  # sample every input (the ring rate-limits by the clock)
        d.ring.offer("vision", dark, out)
        await d.ring._store(*d.ring._queue.popleft())
    assert await d.ring.count("vision") == 3
    d.server.publish("person", await d.release("1.2.0", variant="float",
                                         vision={"std": [1e-45] * 3}))
    assert await d.updater.check_once() == "swapped"
    # The float model overflows on street frames (a RuntimeWarning in numpy, an error under
    # pytest's warnings-as-errors; NaN scores in production): either is a regression.
    for frame in await asyncio.to_thread(frames, 3):
        await asyncio.wait([d.gate.submit(frame)])
    with capture_logs() as logs:
        await d.updater.finish_trial()
    assert d.gate.manifest.tag == "person@1.1.0"
    back = [e for e in logs if e["event"] == "update.rolled_back"]
    assert back and back[0]["version"] == "1.2.0"
    assert d.server.reports[-1]["outcome"] == "rolled_back"
    pointer = await asyncio.to_thread(d.store.read_pointer)
    assert pointer is not None and pointer.active.slot is None and pointer.trial is None
    assert pointer.rejected  # not downloaded again, even after a restart
    assert await (await d.restart()).check_once() == "unchanged"


async def test_a_model_in_trial_at_its_third_start_is_rolled_back(make_device: Any) -> None:
    d = await make_device()
    d.server.publish("person", await d.release("1.2.0"))
    assert await d.updater.check_once() == "swapped"  # in trial
    for boot in (1, 2):
        active = await asyncio.to_thread(d.store.recover)
        assert active.ref.version == "1.2.0" and active.pointer is not None
        assert active.pointer.trial is not None and active.pointer.trial.boots == boot
    with capture_logs() as logs:
        active = await asyncio.to_thread(d.store.recover)
    assert active.ref.slot is None and active.ref.version == "1.1.0"
    assert active.reports and active.reports[0][1] == "rolled_back"
    assert any(e["event"] == "update.rolled_back" for e in logs)
    updater = await d.restart(active)
    await updater._flush_reports()
    assert d.server.reports[-1]["outcome"] == "rolled_back"
    assert d.server.reports[-1]["reason"].startswith("crash_loop")


async def test_a_damaged_active_slot_falls_back_at_start(make_device: Any) -> None:
    d = await make_device()
    d.server.publish("person", await d.release("1.2.0"))
    assert await d.updater.check_once() == "swapped"
    await classify_frames(d.gate, 5)
    await d.updater.finish_trial()
    d.server.publish("person", await d.release("1.3.0"))
    assert await d.updater.check_once() == "swapped"  # slot-b, fallback slot-a
    model = d.store.slot_dir("b") / "person-int8.tflite"
    data = bytearray(model.read_bytes())
    data[100] ^= 0x10
    model.write_bytes(bytes(data))
    with capture_logs() as logs:
        active = await asyncio.to_thread(d.store.recover)
    assert active.ref.slot == "a" and active.ref.version == "1.2.0"
    assert any(e["event"] == "update.slot_damaged" for e in logs)
    # And with slot-a damaged too: the builtin.
    (d.store.slot_dir("a") / RELEASE_FILE).write_bytes(b"{}")
    active = await asyncio.to_thread(d.store.recover)
    assert active.ref.slot is None and active.manifest == d.store.builtin_manifest


def test_download_attempts_is_read_from_the_file_and_a_bad_value_is_refused(
    tmp_path: Path,
) -> None:
    f = tmp_path / "device.toml"
    f.write_text("[updates]\ndownload_attempts = 5\n")
    assert config_mod.load(f, env={}).updates.download_attempts == 5
    assert config_mod.load(None, env={}).updates.download_attempts == 3
    f.write_text("[updates]\ndownload_attempts = 0\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(f, env={})
    assert str(f) in str(err.value) and "download_attempts" in str(err.value)
    assert err.value.fix


def test_a_damaged_pointer_starts_the_builtin(tmp_path: Path) -> None:
    builtin = MODELS_DIR / "person" / "manifest-int8.json"
    store = ModelStore(tmp_path, "person", release_pk=bytes(32), builtin_manifest=builtin,
                       builtin_version="1.1.0")
    store.write_pointer(Pointer(Ref("a", "1.2.0", 1.0, "0" * 64), Trial(1.0)))
    store.pointer_path.write_text("{not json")
    assert store.recover().ref.slot is None
    assert oct(store.pointer_path.stat().st_mode & 0o777) == "0o600"


def test_the_release_hint_names_versions_per_model() -> None:
    assert parse_hint("person=1.2.0, sound=1.1.0,junk") == {"person": "1.2.0", "sound": "1.1.0"}


# -- wired into the device: Updates (edgekeeper run) and `device models` -----------------------


async def test_the_device_runs_the_updater_and_restarts_on_the_new_model(
        tmp_path: Path, make_config: Any) -> None:
    from edgekeeper.device import identity
    from edgekeeper.device.replay import open_gates
    from edgekeeper.device.update import Updates
    from edgekeeper.device.update.status import describe
    from edgekeeper.protocol.keys import CloudPublicKeys

    key = SigningKey.generate()
    config = make_config(microphone={"enabled": False}, updates={"check_seconds": 3600,
                                                                      "trial_inferences": 0})
    state = config.device.state_dir
    keys, _ = await asyncio.to_thread(identity.load_or_create_keys, state)
    server = ReleaseServer(keys.public(config.device.id))
    url = await server.start()
    await asyncio.to_thread(identity.save_enrollment, state, identity.Enrollment(
        config.device.id, url, CloudPublicKeys(bytes(32), bytes(key.verify_key)), time.time()))
    folder = await asyncio.to_thread(build_release, tmp_path / "r", "person", "1.2.0", key)
    server.publish("person", folder)
    try:
        updates = await Updates.prepare(config)
        assert updates is not None
        assert updates.config.gate.vision_model.endswith("person/manifest-int8.json")
        stop = asyncio.Event()
        async with updates, open_gates(updates.config, vision=True, audio=False) as gates:
            models = {"vision": gates.vision.manifest.tag}
            updates.attach(gates, None, models)
            task = asyncio.create_task(updates.run(stop))
            for _ in range(200):  # the first check runs at once
                if gates.vision.manifest.tag == "person@1.2.0":
                    break
                await asyncio.sleep(0.05)
            assert models == {"vision": "person@1.2.0"}  # events name the model now running
            # The trial (0 inferences) passes; then the results long-poll's hint wakes a check
            # at once (nothing new: unchanged).
            for _ in range(100):
                if server.reports and server.reports[-1]["outcome"] == "trial_passed":
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the check right after the trial is done; now it sleeps
            requests = len(server.requests)
            updates.hint("person=1.3.0, sound=1.1.0")
            for _ in range(100):
                if len(server.requests) > requests:
                    break
                await asyncio.sleep(0.05)
            assert server.requests[requests:] == ["/v1/releases/person"]
            stop.set()
            await task
        # The next start loads slot-a's verified model.
        again = await Updates.prepare(config)
        assert again is not None
        assert "slot-a" in again.config.gate.vision_model
        docs = await asyncio.to_thread(describe, config)
        assert docs[0]["model"] == "person" and docs[0]["active"] == "slot-a"
        assert docs[0]["slots"]["a"] == {"state": "verified", "version": "1.2.0",
                                         "created_at": docs[0]["slots"]["a"]["created_at"]}
        assert docs[0]["trial"] is None
    finally:
        await server.stop()


async def test_the_results_long_poll_hands_the_release_hint_on(make_config: Any) -> None:
    """The ingest's Edgekeeper-Releases header on a results answer reaches the updater."""
    from aiohttp import web

    from edgekeeper.device import identity
    from edgekeeper.device.results import ResultActions, ResultsClient

    async def results(request: web.Request) -> web.Response:
        return web.json_response({"results": [], "cursor": 0},
                                 headers={"Edgekeeper-Releases": "person=1.2.0,sound=1.1.0"})

    app = web.Application()
    app.router.add_get("/v1/results", results)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = make_config()
    keys, _ = await asyncio.to_thread(identity.load_or_create_keys, config.device.state_dir)
    actions = ResultActions.from_config(config)
    heard: list[str] = []
    try:
        async with ResultsClient(actions, keys=keys, device_id=config.device.id,
                                 cloud_url=f"http://127.0.0.1:{port}", cloud_box_pk=bytes(32),
                                 section=config.results) as rc:
            rc.on_releases = heard.append
            await rc.poll_once()
    finally:
        await actions.close()
        await runner.cleanup()
    assert heard == ["person=1.2.0,sound=1.1.0"]
    assert parse_hint(heard[0]) == {"person": "1.2.0", "sound": "1.1.0"}


async def test_a_stop_cuts_a_download_short(make_device: Any) -> None:
    """The runtime's drain must not wait for a download (minutes on a slow link)."""
    d = await make_device(stall_seconds=60.0, deadline_seconds=600.0)
    d.server.publish("person", await d.release("1.2.0"), **{"manifest-int8.json": "stall"})
    before = await asyncio.to_thread(d.snapshot)
    stop = asyncio.Event()
    task = asyncio.create_task(d.updater.run(stop))
    for _ in range(200):
        if any("manifest-int8.json" in p for p in d.server.requests):
            break
        await asyncio.sleep(0.05)
    assert any("manifest-int8.json" in p for p in d.server.requests)
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(task, 5.0)
    assert time.monotonic() - started < 2.0
    assert await asyncio.to_thread(d.snapshot) == before


async def test_the_canary_ring_keeps_inputs_and_the_teachers_verdict(tmp_path: Path) -> None:
    """Inputs are kept (bounded per modality), the event's input gets the teacher's verdict,
    and the shadow evaluation leaves out the inputs the teacher says the gate got wrong."""
    from edgekeeper.device.update.canary import shadow_evaluate
    from edgekeeper.protocol.release import verify

    ring = await CanaryRing(tmp_path / "canary.sqlite", size=3,
                            thresholds={"person": 0.7}).open()
    gate = Gate("vision", 1)
    builtin = MODELS_DIR / "person" / "manifest-int8.json"
    await gate.load(builtin)
    try:
        images = await asyncio.to_thread(frames, 5)
        for image in images:
            out = await gate.classify(image)
            ring._last.clear()  # sample every input (the ring rate-limits by the clock)
            ring.offer("vision", image, out)
            await ring._store(*ring._queue.popleft())
        assert await ring.count("vision") == 3  # the newest 3
        ring.event_opened("vision", 7)
        await ring.tag_latest_hit(*ring._tags.popleft())
        await ring.note_result(7, "nobody", False)
        inputs = await ring.inputs("vision")
        assert [i.gate_correct for i in inputs] == [None, None, False]
        assert inputs[0].data.shape == (240, 320, 3)  # stored downscaled, as JPEG
        assert (tmp_path / "canary.sqlite").stat().st_mode & 0o777 == 0o600
        key = SigningKey.generate()
        folder = await asyncio.to_thread(build_release, tmp_path / "r", "person", "1.2.0", key,
                                         vision={"mean": [-3.0] * 3})
        body = verify((folder / RELEASE_FILE).read_bytes(), bytes(key.verify_key))
        report = await asyncio.to_thread(
            shadow_evaluate, builtin, folder / body.entry, body, inputs,
            thresholds={"person": 0.7}, max_flip=0.5)
        assert (report.ok, report.compared, report.flips) == (False, 2, 2)
    finally:
        await ring.close()
        await asyncio.to_thread(gate.close)
