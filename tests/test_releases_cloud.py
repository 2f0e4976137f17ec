"""Model releases, the cloud's side (cloud/releases.py, cloud/releases_serve.py): built from the
shipped model folders, signed with the cloud's real release key (and with a copy of the key file
alone, as on an offline machine), published into a real store, and served by a real ingest on
127.0.0.1 to enrolled devices, whose requests are signed as the device's own client signs them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from edgekeeper.cli import main
from edgekeeper.cloud.releases import (
    ReleaseError,
    build_release,
    evaluate_rollouts,
    publish_release,
    resolve,
    sign_release,
)
from edgekeeper.cloud.store.releases import DeviceGroup, ReleaseRecord, ReleaseReport
from edgekeeper.device.manifest import load_manifest
from edgekeeper.protocol.keys import write_secret
from edgekeeper.protocol.release import (
    RELEASE_FILE,
    InputSpec,
    ReleaseBody,
    check_file,
    check_update,
    verify,
)

from cloudkit import Cloud, Device, running_cloud, until

MODELS = Path(__file__).resolve().parent.parent / "models"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

CloudMaker = Callable[..., AbstractAsyncContextManager[Cloud]]


@pytest.fixture(params=BACKENDS)
def make_cloud(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> CloudMaker:
    """A real ingest over the store backend of this run ([cloud] keys by keyword); the CLI,
    configured through the environment as systemd units do, works on the same store."""
    extra: dict[str, Any] = {}
    monkeypatch.setenv("EDGEKEEPER_CLOUD_DATA_DIR", str(tmp_path / "cloud"))  # running_cloud's
    monkeypatch.setenv("EDGEKEEPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        extra = {"store_backend": "postgres", "postgres_dsn": dsn, "postgres_pool_size": 4}
        monkeypatch.setenv("EDGEKEEPER_STORE_BACKEND", "postgres")
        monkeypatch.setenv("EDGEKEEPER_POSTGRES_DSN", dsn)

    def make(**section: Any) -> AbstractAsyncContextManager[Cloud]:
        return running_cloud(tmp_path, **{**extra, **section})

    return make


@pytest.fixture
async def cloud(make_cloud: CloudMaker) -> AsyncIterator[Cloud]:
    async with make_cloud(rollout_canary_seconds=0) as c:
        yield c


def key_file(cloud: Cloud) -> Path:
    return cloud.data_dir / "keys" / "release-sign.key"


async def built(cloud: Cloud, out: Path, model: str = "person", **kw: Any) -> ReleaseBody:
    """Build and sign a release of ``models/<model>`` as the operator does (versions from the
    store)."""
    published = [r.version for r in await cloud.store.releases(model) if not r.rollback]
    body = await asyncio.to_thread(build_release, MODELS / model, out, published=published, **kw)
    await asyncio.to_thread(sign_release, out, key_file(cloud))
    return body


async def published(cloud: Cloud, out: Path, model: str = "person", stage: str = "promoted",
                    **kw: Any) -> ReleaseRecord:
    await built(cloud, out, model, **kw)
    return await publish_release(cloud.store, cloud.data_dir, out, cloud.keys.release_pk,
                                 stage=stage)  # type: ignore[arg-type]


async def fetch(cloud: Cloud, dev: Device, path: str,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    hdrs = {**dev.signed("GET", path), **(headers or {})}
    async with cloud.session.get(cloud.url + path, headers=hdrs) as resp:
        return resp.status, await resp.read(), resp.headers


async def served_version(cloud: Cloud, dev: Device, model: str = "person") -> str | None:
    status, data, _ = await fetch(cloud, dev, f"/v1/releases/{model}")
    if status == 204:
        return None
    assert status == 200, data
    return verify(data, dev.cloud.release_pk).version


async def report(cloud: Cloud, dev: Device, model: str, version: str, outcome: str,
                 **extra: Any) -> tuple[int, Any]:
    raw = json.dumps({"model": model, "version": version, "outcome": outcome,
                      "reason": "", **extra}).encode()
    hdrs = {**dev.signed("POST", "/v1/releases/report", body=raw),
            "Content-Type": "application/json"}
    async with cloud.session.post(cloud.url + "/v1/releases/report", data=raw,
                                  headers=hdrs) as resp:
        return resp.status, await resp.json()


# ------------------------------------------------------------------------------ round trip


async def test_build_sign_publish_and_serve(cloud: Cloud, tmp_path: Path) -> None:
    out = tmp_path / "sound-rel"
    body = await built(cloud, out, "sound")
    # The shipped manifest shares the audio front ends (../frontends): the release carries
    # them, and its manifest points inside the release, loadable as it is.
    paths = {f.path for f in body.files}
    assert paths == {"manifest-int8.json", "labels.txt", "sound-int8.tflite",
                     "frontends/melspectrogram.tflite", "frontends/embedding_model.tflite"}
    manifest = await asyncio.to_thread(load_manifest, out / body.entry)
    assert manifest.version == body.version == "1.2.0" and body.parent == "1.1.0"
    assert all(s.model.is_relative_to(out) for s in manifest.stages)
    assert body.input == InputSpec("audio", sample_rate=16000, window_seconds=2.0,
                                   hop_seconds=0.48)
    assert body.labels == manifest.labels and body.metrics["model"] == "sound@1.1.0"
    record = await publish_release(cloud.store, cloud.data_dir, out, cloud.keys.release_pk,
                                   stage="promoted")
    assert (cloud.data_dir / "releases" / "sound" / "1.2.0" / RELEASE_FILE).read_bytes() == (
        out / RELEASE_FILE).read_bytes()

    dev = await cloud.enroll("pi-1")
    status, data, headers = await fetch(cloud, dev, "/v1/releases/sound")
    assert status == 200 and data == (out / RELEASE_FILE).read_bytes()
    etag = hashlib.sha256(data).hexdigest()
    assert headers["ETag"] == f'"{etag}"' == f'"{record.etag}"'
    got = verify(data, dev.cloud.release_pk)  # the key the device pinned at enrollment
    check_update(got, model="sound", input=body.input, running_version="1.1.0",
                 running_created_at=None, runtime_version="0.1.0")
    for entry in got.files:
        status, blob, headers = await fetch(cloud, dev,
                                            f"/v1/releases/sound/1.2.0/{entry.path}")
        assert status == 200 and int(headers["Content-Length"]) == entry.length
        check_file(entry, blob)
    # Unchanged: 304 with the same ETag, no body.
    status, data, headers = await fetch(cloud, dev, "/v1/releases/sound",
                                        {"If-None-Match": f'"{etag}"'})
    assert status == 304 and data == b"" and headers["ETag"] == f'"{etag}"'
    status, _, _ = await fetch(cloud, dev, "/v1/releases/sound", {"If-None-Match": '"other"'})
    assert status == 200
    # Nothing for a model without releases; only the release's own files are served.
    assert (await fetch(cloud, dev, "/v1/releases/person"))[0] == 204
    assert (await fetch(cloud, dev, "/v1/releases/sound/1.2.0/metrics.json"))[0] == 404
    assert (await fetch(cloud, dev, "/v1/releases/sound/1.3.0/labels.txt"))[0] == 404
    assert (await fetch(cloud, dev, "/v1/releases/sound/1.2.0/..%2Fkeys"))[0] in (400, 404)
    # Unsigned requests are refused like the results poll's.
    async with cloud.session.get(cloud.url + "/v1/releases/sound") as resp:
        assert resp.status == 401
    # The results poll tells the device which release applies, at no extra request.
    path = "/v1/results"
    async with cloud.session.get(cloud.url + path, headers=dev.signed("GET", path)) as resp:
        assert resp.status == 200 and resp.headers["Edgekeeper-Releases"] == "sound=1.2.0"


async def test_version_must_go_up(cloud: Cloud, tmp_path: Path) -> None:
    await published(cloud, tmp_path / "a")
    with pytest.raises(ReleaseError, match="not above"):
        await asyncio.to_thread(build_release, MODELS / "person", tmp_path / "b",
                                version="1.2.0", published=["1.2.0"])
    # Built without knowing what is published (another machine): publish refuses it.
    await asyncio.to_thread(build_release, MODELS / "person", tmp_path / "c", version="1.2.0")
    await asyncio.to_thread(sign_release, tmp_path / "c", key_file(cloud))
    with pytest.raises(ReleaseError, match=r"not above the highest published person@1\.2\.0"):
        await publish_release(cloud.store, cloud.data_dir, tmp_path / "c", cloud.keys.release_pk)
    assert [r.version for r in await cloud.store.releases("person")] == ["1.2.0"]
    nxt = await built(cloud, tmp_path / "d")
    assert nxt.version == "1.3.0" and nxt.parent == "1.2.0"


async def test_tampered_file_or_foreign_key_is_refused_at_publish(
        cloud: Cloud, tmp_path: Path) -> None:
    out = tmp_path / "rel"
    body = await built(cloud, out)

    def flip_model_byte() -> None:
        victim = out / "person-int8.tflite"
        blob = bytearray(victim.read_bytes())
        blob[len(blob) // 2] ^= 1
        victim.write_bytes(bytes(blob))

    def flip_signed_body() -> None:
        envelope = json.loads((out / RELEASE_FILE).read_text())
        envelope["payload"] = envelope["payload"].replace("A", "B", 1)
        (out / RELEASE_FILE).write_text(json.dumps(envelope))

    await asyncio.to_thread(flip_model_byte)
    with pytest.raises(ReleaseError, match="file_mismatch"):
        await publish_release(cloud.store, cloud.data_dir, out, cloud.keys.release_pk)
    # A flipped byte in the signed body itself breaks the signature.
    await asyncio.to_thread(shutil.rmtree, out)
    await built(cloud, out)
    await asyncio.to_thread(flip_signed_body)
    with pytest.raises(ReleaseError, match=r"bad_signature|malformed"):
        await publish_release(cloud.store, cloud.data_dir, out, cloud.keys.release_pk)
    # Signed by a key that is not this cloud's release key.
    other = tmp_path / "other.key"
    await asyncio.to_thread(write_secret, other, bytes(SigningKey.generate()))
    await asyncio.to_thread(sign_release, out, other)
    with pytest.raises(ReleaseError, match="unknown_key"):
        await publish_release(cloud.store, cloud.data_dir, out, cloud.keys.release_pk)
    assert await cloud.store.releases() == []
    assert not (cloud.data_dir / "releases" / "person" / body.version).exists()


# ------------------------------------------------------------------------------- rollout


async def test_scope_device_beats_group_beats_fleet(cloud: Cloud, tmp_path: Path) -> None:
    devs = {d: await cloud.enroll(d) for d in ("pi-1", "pi-2", "pi-3")}
    await cloud.store.set_device_group("pi-1", "street", canary=False)
    await cloud.store.set_device_group("pi-2", "street", canary=False)
    assert await cloud.store.device_group("pi-1") == "street"
    assert await cloud.store.device_group("pi-3") == ""
    await published(cloud, tmp_path / "fleet")  # 1.2.0
    await published(cloud, tmp_path / "group", scope="group:street")  # 1.3.0
    await published(cloud, tmp_path / "one", scope="device:pi-2")  # 1.4.0
    # A fleet release published later does not displace a narrower scope's.
    await published(cloud, tmp_path / "later")  # 1.5.0
    await until(lambda: served_version(cloud, devs["pi-1"]), timeout=10)
    assert await served_version(cloud, devs["pi-1"]) == "1.3.0"
    assert await served_version(cloud, devs["pi-2"]) == "1.4.0"
    assert await served_version(cloud, devs["pi-3"]) == "1.5.0"


async def release_gauges(cloud: Cloud) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with cloud.session.get(f"{cloud.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.labels["model"], s.labels["stage"]): s.value
            for fam in text_string_to_metric_families(text)
            if fam.name == "edgekeeper_ingest_releases" for s in fam.samples}


async def test_canary_first_then_promoted_when_canaries_pass(
        cloud: Cloud, tmp_path: Path) -> None:
    canary, other = await cloud.enroll("pi-canary"), await cloud.enroll("pi-other")
    await cloud.store.set_device_group("pi-canary", "lab", canary=True)
    record = await published(cloud, tmp_path / "rel", stage="canary")
    assert record.stage == "canary"
    assert await served_version(cloud, canary) == "1.2.0"
    assert await served_version(cloud, other) is None
    for outcome in ("downloaded", "active"):
        assert (await report(cloud, canary, "person", "1.2.0", outcome))[0] == 200
    assert [r.stage for r in await cloud.store.releases("person")] == ["canary"]
    assert await release_gauges(cloud) == {("person", "canary"): 1.0}
    assert await served_version(cloud, other) is None
    assert (await report(cloud, canary, "person", "1.2.0", "trial_passed"))[0] == 200
    assert [r.stage for r in await cloud.store.releases("person")] == ["promoted"]
    # /metrics shows the rollout's state as it is now (the canary series is gone).
    assert await release_gauges(cloud) == {("person", "promoted"): 1.0}
    assert await served_version(cloud, other) == "1.2.0"
    states = {d.device_id: d for d in await cloud.store.device_releases("person")}
    assert states["pi-canary"].running == "1.2.0" and states["pi-canary"].outcome == (
        "trial_passed")


async def test_canary_time_and_refusals_hold_a_release(cloud: Cloud, tmp_path: Path) -> None:
    await cloud.enroll("pi-c")
    await cloud.store.set_device_group("pi-c", "", canary=True)
    record = await published(cloud, tmp_path / "rel", stage="canary")
    now = record.published_at
    ok = ReleaseReport("pi-c", "person", "1.2.0", "trial_passed", "", now, now + 1)
    await cloud.store.add_release_report(ok)
    store = cloud.store
    assert await evaluate_rollouts(store, now=now + 10, canary_seconds=3600) == []
    refused = ReleaseReport("pi-x", "person", "1.2.0", "refused", "input_mismatch", now, now + 2)
    await store.add_release_report(refused)
    assert await evaluate_rollouts(store, now=now + 3601, canary_seconds=3600) == []
    second = await published(cloud, tmp_path / "rel2", stage="canary")
    await store.add_release_report(
        ReleaseReport("pi-c", "person", "1.3.0", "trial_passed", "", now, second.published_at))
    changes = await evaluate_rollouts(store, now=second.published_at + 3601, canary_seconds=3600)
    assert [(c.release.version, c.stage) for c in changes] == [("1.3.0", "promoted")]


async def test_canary_rollback_halts_and_operator_halt(cloud: Cloud, tmp_path: Path) -> None:
    canary, other = await cloud.enroll("pi-canary"), await cloud.enroll("pi-other")
    await cloud.store.set_device_group("pi-canary", "", canary=True)
    await published(cloud, tmp_path / "a")  # 1.2.0 promoted
    await published(cloud, tmp_path / "b", stage="canary")  # 1.3.0
    assert await served_version(cloud, canary) == "1.3.0"
    status, _ = await report(cloud, canary, "person", "1.3.0", "rolled_back",
                             reason="NaN scores", running="1.2.0")
    assert status == 200
    stages = {r.version: r.stage for r in await cloud.store.releases("person")}
    assert stages == {"1.2.0": "promoted", "1.3.0": "halted"}
    await until(lambda: _is(served_version(cloud, canary), "1.2.0"), timeout=10)
    assert await served_version(cloud, other) == "1.2.0"
    # The operator halts 1.2.0 too: nobody gets a release of person any more.
    code = await asyncio.to_thread(main, ["cloud", "releases", "halt", "person", "1.2.0"])
    assert code == 0
    await until(lambda: _is(served_version(cloud, other), None), timeout=10)


async def _is(coro: Any, want: Any) -> bool:
    return bool(await coro == want)


def test_resolve_is_pure_and_skips_expired_and_halted() -> None:
    def rec(i: int, version: str, scope: str, stage: str, expires: float = 1e10,
            rollback: bool = False) -> ReleaseRecord:
        return ReleaseRecord(i, "person", version, scope, rollback, stage,  # type: ignore[arg-type]
                             0.0, expires, float(i), float(i), b"", "")

    groups = {"a": DeviceGroup("a", "g", True), "b": DeviceGroup("b", "g", False)}
    rs = [rec(1, "1.2.0", "fleet", "promoted"), rec(2, "1.3.0", "fleet", "canary"),
          rec(3, "1.4.0", "group:g", "halted"), rec(4, "1.5.0", "fleet", "promoted", expires=5)]
    assert resolve(rs, "person", "a", groups, 10).version == "1.3.0"  # type: ignore[union-attr]
    assert resolve(rs, "person", "b", groups, 10).version == "1.2.0"  # type: ignore[union-attr]
    assert resolve(rs, "sound", "b", groups, 10) is None
    # A rollback re-publishing 1.2.0 wins over the original among equals (later published).
    rs.append(rec(5, "1.2.0", "fleet", "promoted", rollback=True))
    assert resolve(rs, "person", "b", groups, 10).id == 5  # type: ignore[union-attr]


# --------------------------------------------------------------------- operator commands


async def test_operator_commands_and_rollback_release(
        make_cloud: CloudMaker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with make_cloud(rollout_canary_seconds=0) as cloud:
        dev = await cloud.enroll("pi-1")

        async def cli(*args: str) -> tuple[int, str]:
            code = await asyncio.to_thread(main, ["--log-level", "warning", *args])
            out, _ = capsys.readouterr()
            return code, out

        assert (await cli("cloud", "devices", "group", "pi-1", "street", "--canary"))[0] == 0
        assert await cloud.store.device_group("pi-1") == "street"
        assert (await cli("cloud", "devices", "group", "pi-9", "street"))[0] == 3
        for n in (1, 2):
            rel = tmp_path / f"rel{n}"
            assert (await cli("cloud", "release", "build", str(MODELS / "person"),
                              str(rel)))[0] == 0
            assert (await cli("cloud", "release", "sign", str(rel)))[0] == 0
            code, out = await cli("cloud", "release", "publish", str(rel))
            assert code == 0 and "stage canary" in out, out
        code, out = await cli("cloud", "releases", "promote", "person", "1.2.0")
        assert code == 0
        assert (await cli("cloud", "releases", "promote", "person", "1.3.0"))[0] == 0
        await until(lambda: _is(served_version(cloud, dev), "1.3.0"), timeout=10)
        running = verify((tmp_path / "rel2" / RELEASE_FILE).read_bytes(), cloud.keys.release_pk)
        assert (await report(cloud, dev, "person", "1.3.0", "active"))[0] == 200

        code, out = await cli("cloud", "releases", "person", "--json")
        doc = json.loads(out)
        assert [(r["version"], r["stage"]) for r in doc["releases"]] == [
            ("1.2.0", "promoted"), ("1.3.0", "promoted")]
        assert doc["devices"][0] | {"at": 0} == {
            "device_id": "pi-1", "model": "person", "running": "1.3.0", "group": "street",
            "canary": True, "last_version": "1.3.0", "last_outcome": "active", "reason": "",
            "at": 0}
        code, out = await cli("cloud", "releases")
        assert code == 0 and "pi-1" in out and "street *" in out

        # Roll back, key online: a new signed release of 1.2.0's files, marked rollback.
        code, out = await cli("cloud", "releases", "rollback", "person")
        assert code == 0 and "rollback release person@1.2.0" in out, out
        status, data, _ = await fetch(cloud, dev, "/v1/releases/person")
        back = verify(data, dev.cloud.release_pk)
        assert back.rollback and back.version == "1.2.0" and back.created_at > running.created_at
        check_update(back, model="person", input=back.input, running_version="1.3.0",
                     running_created_at=running.created_at, runtime_version="0.1.0")
        for entry in back.files:
            status, blob, _ = await fetch(cloud, dev, f"/v1/releases/person/1.2.0/{entry.path}")
            assert status == 200
            check_file(entry, blob)
        stages = [(r.version, r.rollback, r.stage) for r in await cloud.store.releases()]
        assert stages == [("1.2.0", False, "promoted"), ("1.3.0", False, "halted"),
                          ("1.2.0", True, "promoted")]

        # Key offline: rollback writes the unsigned release and says how to finish.
        await published(cloud, tmp_path / "rel4")  # 1.4.0 promoted
        offline = tmp_path / "offline.key"
        await asyncio.to_thread(shutil.move, key_file(cloud), offline)
        out_dir = tmp_path / "rb"
        code, out = await cli("cloud", "releases", "rollback", "person", "--out", str(out_dir))
        assert code == 0 and "cloud release sign" in out and not (out_dir / RELEASE_FILE).exists()
        assert (await cli("cloud", "release", "sign", str(out_dir), "--key", str(offline)))[0] == 0
        assert (await cli("cloud", "release", "publish", str(out_dir)))[0] == 0
        await until(lambda: _is(served_version(cloud, dev), "1.2.0"), timeout=10)


def test_offline_signing_needs_only_the_key_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Build on the cloud, sign on a machine with no cloud data at all, only the key."""
    key = tmp_path / "usb" / "release-sign.key"
    signing = SigningKey.generate()
    write_secret(key, bytes(signing))
    rel = tmp_path / "rel"
    build_release(MODELS / "person", rel, version="2.0.0", scope="group:street")
    elsewhere = tmp_path / "laptop"
    monkeypatch.setenv("EDGEKEEPER_CLOUD_DATA_DIR", str(elsewhere / "cloud"))
    monkeypatch.setenv("EDGEKEEPER_STATE_DIR", str(elsewhere / "state"))
    monkeypatch.delenv("EDGEKEEPER_CONFIG", raising=False)
    assert main(["cloud", "release", "sign", str(rel), "--key", str(key)]) == 0
    body = verify((rel / RELEASE_FILE).read_bytes(), bytes(signing.verify_key))
    assert body.version == "2.0.0" and str(body.scope) == "group:street"
    assert not elsewhere.exists()  # nothing else was needed, nothing was created
    # A body a device could not parse is never signed.
    (rel / RELEASE_FILE).unlink()
    unsigned = json.loads((rel / "release.unsigned.json").read_text())
    (rel / "release.unsigned.json").write_text(json.dumps({**unsigned, "version": "2.0"}))
    capsys.readouterr()
    assert main(["cloud", "release", "sign", str(rel), "--key", str(key)]) != 0
    assert "MAJOR.MINOR.PATCH" in capsys.readouterr().err
    assert not (rel / RELEASE_FILE).exists()


async def test_bad_reports_are_refused(cloud: Cloud) -> None:
    dev = await cloud.enroll("pi-1")
    assert (await report(cloud, dev, "person", "1.2.0", "exploded"))[0] == 400
    assert (await report(cloud, dev, "person", "1.2", "active"))[0] == 400
    assert (await report(cloud, dev, "person", "1.2.0", "active", extra=1))[0] == 400
    raw = json.dumps({"model": "person", "version": "1.2.0", "outcome": "active"}).encode()
    async with cloud.session.post(cloud.url + "/v1/releases/report", data=raw,
                                  headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 401
    assert await cloud.store.device_releases() == []
