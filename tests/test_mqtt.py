"""MQTT and Home Assistant: results, triggers and key frames on a real Mosquitto.

Every test talks to a real broker on 127.0.0.1 (tests/servers.py: the usual one on 1883 when
it answers, else one started here; the outage, TLS and restart tests start their own) and
checks what a real subscriber receives. Each test uses its own topic and discovery prefixes,
so tests never see each other's retained messages on a shared broker.

The device modules are imported here, not inside a test: importing cv2 inside a running loop
is a blocking call (tests/conftest.py's guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgekeeper import compat
from edgekeeper import config as config_mod
from edgekeeper.backoff import Backoff
from edgekeeper.cloud.reasoners.echo import EchoReasoner
from edgekeeper.cloud.worker import Worker
from edgekeeper.device import identity
from edgekeeper.device.events import Event
from edgekeeper.device.gate import Gate
from edgekeeper.device.loop import Pipeline
from edgekeeper.device.mqtt import MqttPublisher
from edgekeeper.device.results import ResultActions
from edgekeeper.device.sink import LocalSink
from edgekeeper.device.sources import VideoCaptureSource
from edgekeeper.errors import ConfigError
from edgekeeper.protocol.messages import ResultBody

import servers
from cloudkit import running_cloud

aiomqtt = pytest.importorskip("aiomqtt", reason="the mqtt extra is not installed")

DEVICE = "porch-pi"
WAIT = 20.0  # seconds: a bound that only a hang reaches, not a timing


@pytest.fixture(scope="module")
def broker() -> Iterator[servers.MosquittoServer]:
    """The usual broker on 127.0.0.1:1883 when it answers, else one of our own."""
    usual = servers.MosquittoServer(*servers.USUAL_MQTT)
    if os.environ.get("EDGEKEEPER_TEST_START_SERVERS") != "1" and usual.answers():
        yield usual
        return
    own = servers.start_mosquitto()
    yield own
    own.remove()


@pytest.fixture
def own_broker() -> Iterator[servers.MosquittoServer]:
    """A broker this test may stop and restart."""
    server = servers.start_mosquitto()
    yield server
    server.remove()


@pytest.fixture
async def prefixes(broker: servers.MosquittoServer) -> AsyncIterator[dict[str, str]]:
    """Topic prefixes of this test alone; what it left retained on the shared broker is
    cleared afterwards (a developer's own broker should not collect test topics)."""
    tag = uuid.uuid4().hex[:10]
    out = {"topic_prefix": f"ektest-{tag}", "discovery_prefix": f"ektest-ha-{tag}"}
    yield out
    with contextlib.suppress(aiomqtt.MqttError, OSError):
        async with subscribed(broker, *(f"{p}/#" for p in out.values())) as sub:
            # The broker sends retained messages right after the subscription; one marker
            # published after it comes back behind them.
            marker = f"{out['topic_prefix']}/cleanup"
            await sub.client.publish(marker, b"x")
            await sub.until(lambda: sub.on(marker), "the marker")
            for topic in {t for t, _, retained in sub.got if retained}:
                await sub.client.publish(topic, b"", qos=1, retain=True)


def make_config(tmp_path: Path, broker: servers.MosquittoServer, prefixes: dict[str, str],
                **mqtt: Any) -> config_mod.Config:
    return config_mod.build_from_dict({
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        # The default rules are laid under these (config.py): speech is switched off.
        "trigger": {"labels": {"person": {}, "alarm": {}, "speech": {"enabled": False}}},
        "mqtt": {"host": broker.host, "port": broker.port, **prefixes, **mqtt},
    }, source="test")


def result(seq: int, label: str = "person", **changes: Any) -> ResultBody:
    fields: dict[str, Any] = dict(
        device_id=DEVICE, seq=seq, reasoner="offline", label=label, confidence=0.875,
        summary=f"someone at the door ({seq})", action="notify", gate_correct=True,
        provisional=False, produced_at=1_700_000_000.5, extra={"n": seq})
    fields.update(changes)
    return ResultBody(**fields)


@contextlib.asynccontextmanager
async def running(publisher: MqttPublisher) -> AsyncIterator[asyncio.Event]:
    """The publisher's task, as the device runs it; stopped (set, then awaited) on exit."""
    stop = asyncio.Event()
    async with publisher:
        task = asyncio.create_task(publisher.run(stop))
        try:
            yield stop
        finally:
            stop.set()
            async with compat.timeout(WAIT):
                await task


class Subscriber:
    """A real MQTT client collecting what arrives, by topic."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.got: list[tuple[str, bytes, bool]] = []
        self._new = asyncio.Event()

    async def pump(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for m in self.client.messages:
                self.got.append((str(m.topic), bytes(m.payload), bool(m.retain)))
                self._new.set()

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.got if t == topic]

    async def until(self, check: Callable[[], Any], what: str) -> Any:
        try:
            async with compat.timeout(WAIT):
                while not (out := check()):
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:  # compat.timeout raises the builtin on 3.10 too
            raise AssertionError(f"never received {what}; got {self.got}") from None
        return out


@contextlib.asynccontextmanager
async def subscribed(broker: servers.MosquittoServer, *topics: str, **kwargs: Any
                     ) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client(broker.host, broker.port, **kwargs) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        sub = Subscriber(client)
        pump = asyncio.create_task(sub.pump())
        try:
            yield sub
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)


def fast(config: config_mod.Config, **kwargs: Any) -> MqttPublisher:
    publisher = MqttPublisher.from_config(config, **kwargs)
    publisher.backoff = Backoff(0.05, 0.3)  # reconnect quickly: the tests restart brokers
    return publisher


# --- what arrives --------------------------------------------------------------------------


async def test_a_result_arrives_as_documented_json(
    tmp_path: Path, broker: servers.MosquittoServer, prefixes: dict[str, str]
) -> None:
    config = make_config(tmp_path, broker, prefixes)
    base = f"{prefixes['topic_prefix']}/{DEVICE}"
    async with subscribed(broker, f"{base}/#") as sub:
        publisher = fast(config)
        async with running(publisher):
            await sub.until(lambda: sub.on(f"{base}/available") == [b"online"], "online")
            assert await publisher.publish_result(result(7), result_id=41)
            got = await sub.until(lambda: sub.on(f"{base}/result"), "the result")
            await sub.until(lambda: sub.on(f"{base}/verdict"), "the verdict")
            await sub.until(lambda: b"ON" in sub.on(f"{base}/person/state"), "person ON")
    doc = json.loads(got[0])
    assert doc == {"device_id": DEVICE, "seq": 7, "result_id": 41, "reasoner": "offline",
                   "label": "person", "confidence": 0.875, "summary": "someone at the door (7)",
                   "action": "notify", "gate_correct": True, "provisional": False,
                   "produced_at": 1_700_000_000.5, "extra": {"n": 7}}
    assert json.loads(sub.on(f"{base}/verdict")[0]) == doc
    # Each label's sensor starts OFF (retained) at connect; alarm saw no result.
    assert sub.on(f"{base}/alarm/state") == [b"OFF"]
    assert sub.on(f"{base}/available")[-1] == b"offline"  # stopped cleanly


async def test_triggers_and_the_key_frame(
    tmp_path: Path, broker: servers.MosquittoServer, prefixes: dict[str, str]
) -> None:
    config = make_config(tmp_path, broker, prefixes, publish_triggers=True)
    base = f"{prefixes['topic_prefix']}/{DEVICE}"
    event = Event(device_id=DEVICE, seq=3, label="alarm", modality="vision",
                  captured_at=1_700_000_100.0, trigger_t=12.0, start_t=9.0, end_t=15.0,
                  decision={}, scores={"alarm": 0.9}, models={},
                  frames=(b"\xff\xd8early", b"\xff\xd8trigger", b"\xff\xd8late"),
                  frame_times=(9.5, 12.1, 14.0))
    async with subscribed(broker, f"{base}/#") as sub:
        publisher = fast(config)
        async with running(publisher):
            await sub.until(lambda: sub.on(f"{base}/available") == [b"online"], "online")
            publisher.trigger_nowait("alarm", score=0.91234, seq=3, reason="3 of 5 >= 0.6")
            publisher.event_nowait(event)
            trig = await sub.until(lambda: sub.on(f"{base}/trigger/alarm"), "the trigger")
            await sub.until(lambda: b"ON" in sub.on(f"{base}/alarm/state"), "alarm ON")
            snap = await sub.until(lambda: sub.on(f"{base}/snapshot"), "the key frame")
    doc = json.loads(trig[0])
    assert {k: doc[k] for k in ("type", "device_id", "label", "score", "seq", "reason")} == {
        "type": "trigger", "device_id": DEVICE, "label": "alarm", "score": 0.9123, "seq": 3,
        "reason": "3 of 5 >= 0.6"}
    assert snap == [b"\xff\xd8trigger"]  # raw JPEG bytes, the frame nearest the trigger
    # Retained: a dashboard that subscribes later still gets the last key frame.
    async with subscribed(broker, f"{base}/snapshot") as later:
        assert await later.until(lambda: later.on(f"{base}/snapshot"), "retained snapshot") == [
            b"\xff\xd8trigger"]


async def test_triggers_stay_private_unless_asked(
    tmp_path: Path, broker: servers.MosquittoServer, prefixes: dict[str, str]
) -> None:
    config = make_config(tmp_path, broker, prefixes)  # publish_triggers defaults to false
    base = f"{prefixes['topic_prefix']}/{DEVICE}"
    async with subscribed(broker, f"{base}/#") as sub:
        publisher = fast(config)
        async with running(publisher):
            await sub.until(lambda: sub.on(f"{base}/available") == [b"online"], "online")
            publisher.trigger_nowait("alarm", score=0.9)
            publisher.event_nowait(Event(
                device_id=DEVICE, seq=1, label="alarm", modality="vision", captured_at=1.0,
                trigger_t=1.0, start_t=0.0, end_t=2.0, decision={}, scores={}, models={},
                frames=(b"\xff\xd8frame",), frame_times=(1.0,)))
            # Triggers and key frames leave in order: once the frame is here, a trigger would
            # have been too.
            await sub.until(lambda: sub.on(f"{base}/snapshot"), "the key frame")
    assert not any(t.startswith(f"{base}/trigger") for t, _, _ in sub.got)
    assert b"ON" not in sub.on(f"{base}/alarm/state")


async def test_discovery_configs_are_retained_and_complete(
    tmp_path: Path, broker: servers.MosquittoServer, prefixes: dict[str, str]
) -> None:
    config = make_config(tmp_path, broker, prefixes)
    base = f"{prefixes['topic_prefix']}/{DEVICE}"
    disc = prefixes["discovery_prefix"]
    publisher = fast(config)
    async with running(publisher):
        async with subscribed(broker, f"{base}/available") as sub:
            await sub.until(lambda: sub.on(f"{base}/available") == [b"online"], "online")
        # A new subscriber (Home Assistant starting later) gets every config, retained.
        async with subscribed(broker, f"{disc}/#") as ha:
            configs = await ha.until(
                lambda: len({t for t, _, r in ha.got if r}) >= 4 and ha.got, "4 configs")
    by_topic = {t: json.loads(p) for t, p, retained in configs if retained}
    node = DEVICE
    assert set(by_topic) == {f"{disc}/binary_sensor/{node}/person/config",
                             f"{disc}/binary_sensor/{node}/alarm/config",
                             f"{disc}/sensor/{node}/verdict/config",
                             f"{disc}/image/{node}/snapshot/config"}
    uids = set()
    for topic, cfg in by_topic.items():
        uids.add(cfg["unique_id"])
        assert cfg["device"]["identifiers"] == [f"edgekeeper_{DEVICE}"], topic
        assert cfg["availability"] == [{"topic": f"{base}/available",
                                        "payload_available": "online",
                                        "payload_not_available": "offline"}], topic
        assert cfg.get("state_topic") or cfg.get("image_topic"), topic
    assert len(uids) == 4  # unique per entity
    person = by_topic[f"{disc}/binary_sensor/{node}/person/config"]
    assert person["state_topic"] == f"{base}/person/state"
    assert person["off_delay"] == 30 and person["payload_on"] == "ON"
    verdict = by_topic[f"{disc}/sensor/{node}/verdict/config"]
    assert verdict["state_topic"] == verdict["json_attributes_topic"] == f"{base}/verdict"
    image = by_topic[f"{disc}/image/{node}/snapshot/config"]
    assert image["image_topic"] == f"{base}/snapshot" and image["content_type"] == "image/jpeg"
    # Stopped cleanly: availability is retained "offline".
    async with subscribed(broker, f"{base}/available") as after:
        assert await after.until(lambda: after.on(f"{base}/available"), "retained") == [
            b"offline"]


_CHILD = """
import asyncio, sys
from edgekeeper import config as config_mod
from edgekeeper.device.mqtt import MqttPublisher

async def main():
    cfg = config_mod.build_from_dict({
        "device": {"id": sys.argv[1], "state_dir": sys.argv[2]},
        "mqtt": {"host": "127.0.0.1", "port": int(sys.argv[3]), "topic_prefix": sys.argv[4],
                 "discovery": False, "keepalive": 5}}, source="child")
    async with MqttPublisher.from_config(cfg) as publisher:
        await publisher.run(asyncio.Event())

asyncio.run(main())
"""


async def test_a_dead_device_shows_offline_through_its_last_will(
    tmp_path: Path, broker: servers.MosquittoServer, prefixes: dict[str, str]
) -> None:
    base = f"{prefixes['topic_prefix']}/{DEVICE}"
    async with subscribed(broker, f"{base}/available") as sub:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, DEVICE, str(tmp_path / "state"), str(broker.port),
            prefixes["topic_prefix"], stdin=subprocess.DEVNULL)
        try:
            await sub.until(lambda: sub.on(f"{base}/available") == [b"online"], "online")
        finally:
            child.send_signal(signal.SIGKILL)  # no goodbye: only the broker can say it
            await child.wait()
        await sub.until(lambda: sub.on(f"{base}/available")[-1:] == [b"offline"], "the will")
    async with subscribed(broker, f"{base}/available") as later:
        assert await later.until(lambda: later.on(f"{base}/available"), "retained") == [
            b"offline"]


# --- outages ---------------------------------------------------------------------------------


async def test_results_during_a_broker_outage_are_published_once_after_it(
    tmp_path: Path, own_broker: servers.MosquittoServer, prefixes: dict[str, str]
) -> None:
    config = make_config(tmp_path, own_broker, prefixes, discovery=False)
    topic = f"{prefixes['topic_prefix']}/{DEVICE}/result"
    # A persistent QoS 1 session: what is published while this subscriber is away (the broker
    # restarting) is queued for it, so the test sees every message the publisher sent.
    session = {"identifier": f"ektest-sub-{uuid.uuid4().hex[:8]}", "clean_session": False}
    seqs: list[int] = []

    def seen() -> list[int]:
        return [json.loads(p)["seq"] for p in sub.on(topic)]

    publisher = fast(config)
    async with running(publisher):
        async with subscribed(own_broker, topic, **session) as sub:
            await publisher.publish_result(result(0))
            await sub.until(lambda: seen() == [0], "seq 0")
        seqs += seen()
        await asyncio.to_thread(own_broker.stop)
        # The caller never waits on the broker: all five calls return while it is down (a
        # publish that waited for it would sit here until the bound).
        async with compat.timeout(WAIT):
            for seq in range(1, 6):
                assert await publisher.publish_result(result(seq))
        assert (await publisher.counts())["unpublished"] == 5
        await asyncio.to_thread(own_broker.launch)
        async with subscribed(own_broker, topic, **session) as sub:
            await publisher.publish_result(result(6))  # published after the five, in order
            await sub.until(lambda: 6 in seen(), "seq 6")
            seqs += seen()
    assert seqs == [0, 1, 2, 3, 4, 5, 6]  # every one, once, in order (QoS 1: at least once)
    assert (await _counts(publisher))["unpublished"] == 0


async def _counts(publisher: MqttPublisher) -> dict[str, int]:
    async with publisher:
        return await publisher.counts()


async def test_unpublished_results_survive_a_restart_and_repeats_are_not_sent(
    tmp_path: Path, own_broker: servers.MosquittoServer, prefixes: dict[str, str]
) -> None:
    config = make_config(tmp_path, own_broker, prefixes, discovery=False)
    topic = f"{prefixes['topic_prefix']}/{DEVICE}/result"
    await asyncio.to_thread(own_broker.stop)
    first = fast(config)
    async with running(first):  # the broker is down for this whole run
        for seq in (1, 2, 3):
            assert await first.publish_result(result(seq))
        assert not await first.publish_result(result(2))  # redelivered by the cloud: a repeat
        assert (await first.counts())["unpublished"] == 3
    await asyncio.to_thread(own_broker.launch)
    async with subscribed(own_broker, topic) as sub:
        second = fast(config)  # the device restarted
        async with running(second):
            assert not await second.publish_result(result(3))
            await second.publish_result(result(4))
            await sub.until(lambda: len(sub.on(topic)) >= 4, "4 results")
    assert [json.loads(p)["seq"] for p in sub.on(topic)] == [1, 2, 3, 4]


_FULL_DISK_CHILD = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from edgekeeper import config as config_mod
from edgekeeper.device.mqtt import MqttPublisher
from edgekeeper.device.results import ResultActions
from edgekeeper.errors import RetryableError
from edgekeeper.protocol.messages import ResultBody

async def main():
    state = Path(sys.argv[1])
    cfg = config_mod.build_from_dict({
        "device": {"id": "porch-pi", "state_dir": str(state)},
        "mqtt": {"host": "127.0.0.1", "port": 1}}, source="child")
    out = {}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    async with MqttPublisher.from_config(cfg) as mqtt:
        actions = ResultActions(state / "results.sqlite", retries=1, retry_delay=0.01)
        actions.actions.append(("mqtt", mqtt.action))
        await actions.ledger.get("warm-up")  # the ledger exists before the disk "fills"
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG rather than being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))  # a full disk
        added = 0
        try:
            for seq in range(1, 1000):
                await mqtt.publish_result({"seq": seq, "label": "person",
                                           "summary": "x" * 20000}, result_id=seq)
                added += 1
        except Exception as err:
            out["error"] = [c.__name__ for c in type(err).__mro__]
            out["retryable"] = isinstance(err, RetryableError) and isinstance(err, OSError)
        out["added"] = added
        body = ResultBody(device_id="porch-pi", seq=5000, reasoner="offline", label="person",
                          confidence=0.5, summary="y" * 16000, action="notify",
                          gate_correct=None, provisional=False, produced_at=1.0, extra={})
        out["outcome"] = await actions.handle("cloud:5000", body, result_id=5000)
        out["ledger_error"] = (await actions.ledger.get("cloud:5000")).error
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed
        out["after"] = await mqtt.publish_result({"seq": 6000, "label": "person"}, result_id=1)
        out["counts"] = await mqtt.counts()
        await actions.close()
    print(json.dumps(out))

asyncio.run(main())
"""


async def test_a_full_disk_is_a_retryable_error_and_loses_no_stored_result(
    tmp_path: Path,
) -> None:
    """A file size limit stands in for the full disk (as in tests/disk_full_child.py), in a
    child process so the limit binds nothing else."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path / "state"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with compat.timeout(60):
        out, err = await child.communicate()
    assert child.returncode == 0, err.decode()[-3000:]
    got = json.loads(out.decode().strip().splitlines()[-1])  # the last line: logs go before
    # The SQLite helper's classified error: a RetryableError and an OSError, so the result
    # actions retry it.
    assert got["retryable"] and "StorageUnwritable" in got["error"], got["error"]
    assert got["added"] > 0
    # Retried, then recorded as a failed action (not a crash of the results client).
    assert got["outcome"] == "failed" and got["ledger_error"].startswith("mqtt:")
    # Room again: it takes results, and every one committed before is still there.
    assert got["after"] is True
    assert got["counts"] == {"unpublished": got["added"] + 1, "published": 0}


# --- TLS, credentials, config ----------------------------------------------------------------


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[servers.MosquittoServer, Path, Any]]:
    """A broker that takes only TLS with a client certificate from our CA, and a password."""
    trustme = pytest.importorskip("trustme")
    if servers.shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (it comes with the mosquitto package)")
    ca = trustme.CA()
    pki = tmp_path / "pki"
    pki.mkdir()
    ca.cert_pem.write_to_path(str(pki / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(pki / "server.pem"))
    client = ca.issue_cert("porch-pi.example")
    client.private_key_pem.write_to_path(str(pki / "client.key"))
    client.cert_chain_pems[0].write_to_path(str(pki / "client.pem"))
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pki / "passwd"), "edge", "s3cret-pw"],
                   check=True, capture_output=True)
    broker = servers.start_mosquitto((
        f"cafile {pki / 'ca.pem'}", f"certfile {pki / 'server.pem'}",
        f"keyfile {pki / 'server.pem'}", "require_certificate true",
        f"password_file {pki / 'passwd'}", "allow_anonymous false"))
    ctx = ssl.create_default_context()  # the test subscriber's side
    ca.configure_trust(ctx)
    client.configure_cert(ctx)
    yield broker, pki, ctx
    broker.remove()


async def test_tls_with_a_client_certificate_and_a_password(
    tmp_path: Path, prefixes: dict[str, str],
    tls_broker: tuple[servers.MosquittoServer, Path, Any],
) -> None:
    broker, pki, ctx = tls_broker
    tls = {"tls": True, "ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"),
           "key_file": str(pki / "client.key"), "username": "edge",
           "password_env": "EK_TEST_MQTT_PW"}
    config = make_config(tmp_path, broker, prefixes, discovery=False, **tls)
    topic = f"{prefixes['topic_prefix']}/{DEVICE}/result"
    async with subscribed(broker, topic, tls_context=ctx, username="edge",
                          password="s3cret-pw") as sub:
        publisher = fast(config, env={"EK_TEST_MQTT_PW": "s3cret-pw"})
        async with running(publisher):
            await publisher.publish_result(result(9))
            got = await sub.until(lambda: sub.on(topic), "the result over TLS")
    assert json.loads(got[0])["seq"] == 9

    # A wrong password: refused by the broker, nothing lost, the caller not blocked.
    wrong = fast(make_config(tmp_path / "w", broker, prefixes, discovery=False, **tls),
                 env={"EK_TEST_MQTT_PW": "wrong"})
    async with running(wrong):
        async with compat.timeout(WAIT):
            await wrong.publish_result(result(10))
            # The publisher signals nothing for a failed attempt (it only logs and backs off):
            # poll its last_error, bounded by WAIT.
            while "refused" not in (wrong.last_error or ""):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert "authori" in (wrong.last_error or "").lower()
        assert not wrong.connected
        assert (await wrong.counts())["unpublished"] == 1


def test_a_password_variable_that_is_not_set_is_a_config_error(
    tmp_path: Path, prefixes: dict[str, str]
) -> None:
    broker = servers.MosquittoServer("127.0.0.1", 1)
    config = make_config(tmp_path, broker, prefixes, username="u", password_env="EK_NOT_SET")
    with pytest.raises(ConfigError, match="EK_NOT_SET") as err:
        MqttPublisher.from_config(config, env={})
    assert err.value.fix and "EK_NOT_SET" in err.value.fix


async def test_a_missing_ca_file_is_a_config_error(tmp_path: Path,
                                                   prefixes: dict[str, str]) -> None:
    broker = servers.MosquittoServer("127.0.0.1", 1)
    config = make_config(tmp_path, broker, prefixes, tls=True, ca_file=str(tmp_path / "no.pem"))
    with pytest.raises(ConfigError, match=r"mqtt\.ca_file.*no\.pem"):
        async with MqttPublisher.from_config(config):
            pass


@pytest.mark.parametrize(("mqtt", "needle"), [
    ({"topic_prefix": "a/+/b"}, "mqtt"),
    ({"topic_prefix": "/edge"}, "mqtt"),
    ({"ca_file": "/x.pem"}, "mqtt"),
    ({"tls": True, "cert_file": "/c.pem"}, "mqtt"),
    ({"password_env": "hunter 2"}, "mqtt"),
    ({"port": 0}, "mqtt"),
    ({"hots": "x"}, "mqtt.hots"),
])
def test_bad_mqtt_config_names_the_key(mqtt: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        config_mod.build_from_dict({"mqtt": mqtt}, source="device.toml")
    assert "device.toml" in str(err.value) and err.value.fix


# --- the seam: the real loop and the real results actions -----------------------------------


async def test_wired_into_the_loop_and_the_results_actions(
    tmp_path: Path, broker: servers.MosquittoServer, prefixes: dict[str, str],
    sample_recording: Path,
) -> None:
    config = config_mod.build_from_dict({
        "device": {"id": DEVICE, "state_dir": str(tmp_path / "state")},
        "trigger": {"k": 1, "n": 1, "labels": {"person": {"threshold": 0.0, "release": 0.0,
                                                          "cooldown_seconds": 3600.0}}},
        "pregate": {"motion": False},
        "mqtt": {"host": broker.host, "port": broker.port, "publish_triggers": True,
                 **prefixes},
    }, source="test")
    base = f"{prefixes['topic_prefix']}/{DEVICE}"
    gate = Gate("vision")
    await gate.load(await asyncio.to_thread(config_mod.resolve_model, "builtin:person"))
    actions = ResultActions(tmp_path / "state" / "results.sqlite", jsonl=None)
    try:
        async with subscribed(broker, f"{base}/#") as sub:
            publisher = fast(config)
            async with running(publisher):
                await sub.until(lambda: sub.on(f"{base}/available") == [b"online"], "online")
                actions.actions.append(("mqtt", publisher.action))
                src = VideoCaptureSource(
                    str(sample_recording / "video.avi"), fps=0, live=False, lossless=False,
                    queue_size=4, realtime=False)
                pipeline = Pipeline(config, LocalSink(tmp_path / "ev"), video=src,
                                    vision_gate=gate, on_decision=publisher.note_decision,
                                    on_event=publisher.event_nowait)
                stats = await pipeline.run(asyncio.Event())
                assert stats.events == 1
                # The cloud's result for it, delivered twice (a lost ack), and the device's
                # own provisional result for the same event before it.
                await actions.handle_provisional(result(1, provisional=True))
                assert await actions.handle("cloud:1", result(1), result_id=5) == "handled"
                assert await actions.handle("cloud:1", result(1), result_id=5) == "already"
                await publisher.publish_result(result(2), result_id=6)  # a marker: in order
                await sub.until(lambda: len(sub.on(f"{base}/result")) >= 3, "3 results")
                snap = await sub.until(lambda: sub.on(f"{base}/snapshot"), "the key frame")
        trig = json.loads(sub.on(f"{base}/trigger/person")[0])
        assert trig["label"] == "person" and trig["reason"]
        assert snap[0][:2] == b"\xff\xd8"  # a JPEG
        got = [json.loads(p) for p in sub.on(f"{base}/result")]
        assert [(d["seq"], d["result_id"]) for d in got] == [(1, None), (1, 5), (2, 6)]
        assert (await _counts(publisher))["unpublished"] == 0
    finally:
        await asyncio.to_thread(gate.close)  # joins the model's thread: off the event loop
        await actions.close()


async def test_a_full_memory_queue_drops_old_triggers_but_no_result(
    tmp_path: Path, own_broker: servers.MosquittoServer, prefixes: dict[str, str]
) -> None:
    config = make_config(tmp_path, own_broker, prefixes, discovery=False, queue_size=2,
                         publish_triggers=True)
    base = f"{prefixes['topic_prefix']}/{DEVICE}"
    session = {"identifier": f"ektest-sub-{uuid.uuid4().hex[:8]}", "clean_session": False}
    async with subscribed(own_broker, f"{base}/result", f"{base}/trigger/#", **session):
        pass  # the persistent session now exists on the broker
    await asyncio.to_thread(own_broker.stop)
    publisher = fast(config)
    async with running(publisher):
        for seq in range(1, 6):
            assert await publisher.publish_result(result(seq))
            publisher.trigger_nowait("person", seq=seq)
        assert publisher.dropped == 3  # five triggers, room for two
        await asyncio.to_thread(own_broker.launch)
        async with subscribed(own_broker, f"{base}/result", f"{base}/trigger/#",
                              **session) as sub:
            await publisher.publish_result(result(6))
            # Results go out from the disk, triggers from memory: two streams, so wait for
            # both (the first two triggers that arrive must be the newest two).
            await sub.until(lambda: len(sub.on(f"{base}/result")) >= 6
                            and len(sub.on(f"{base}/trigger/person")) >= 2, "6 results, 2 triggers")
    assert [json.loads(p)["seq"] for p in sub.on(f"{base}/result")] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(p)["seq"] for p in sub.on(f"{base}/trigger/person")] == [4, 5]


@pytest.mark.slow
async def test_edgekeeper_run_publishes_and_says_offline_on_sigterm(
    tmp_path: Path, broker: servers.MosquittoServer, prefixes: dict[str, str],
    sample_recording: Path,
) -> None:
    """The real `edgekeeper run` (the sample recording as its camera, enrolled with a local
    ingest whose worker echoes the gate) with [mqtt] set: online, a trigger, the cloud's result,
    then offline once SIGTERM has drained it."""
    base = f"{prefixes['topic_prefix']}/{DEVICE}"
    state = tmp_path / "state"
    config = tmp_path / "device.toml"
    config.write_text(f"""
[device]
id = "{DEVICE}"
state_dir = "{state}"
[camera]
source = "{sample_recording / 'video.avi'}"
[pregate]
motion = false
[trigger]
k = 1
n = 1
[trigger.labels.person]
threshold = 0.0
release = 0.0
cooldown_seconds = 3600.0
[event]
post_roll_seconds = 0.5
[uplink]
backoff_base_seconds = 0.05
backoff_cap_seconds = 0.5
[results]
poll_wait_seconds = 2.0
[mqtt]
host = "{broker.host}"
port = {broker.port}
topic_prefix = "{prefixes['topic_prefix']}"
discovery_prefix = "{prefixes['discovery_prefix']}"
publish_triggers = true
""")
    log_path = tmp_path / "device.log"
    async with running_cloud(tmp_path) as cloud:
        await identity.enroll(cloud.url, await cloud.token(), device_id=DEVICE, state_dir=state)
        worker = Worker(queue=cloud.queue, store=cloud.store, reasoner=EchoReasoner(),
                        keys=cloud.keys, poll_s=0.05)
        stop_worker = asyncio.Event()
        async with compat.TaskGroup() as tg:
            tg.create_task(worker.run(stop=stop_worker), name="test-worker")
            try:
                async with subscribed(broker, f"{base}/#") as sub:
                    with log_path.open("wb") as log_file:
                        device = await asyncio.create_subprocess_exec(
                            sys.executable, "-m", "edgekeeper.cli", "--config", str(config),
                            "run", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=log_file,
                            env={**os.environ, "EDGEKEEPER_LOG_FORMAT": "json"})
                    try:
                        await sub.until(lambda: sub.on(f"{base}/available") == [b"online"],
                                        "online")
                        trig = await sub.until(lambda: sub.on(f"{base}/trigger/person"),
                                               "the trigger")
                        got = await sub.until(lambda: sub.on(f"{base}/result"), "the result")
                        device.send_signal(signal.SIGTERM)
                        await sub.until(
                            lambda: sub.on(f"{base}/available")[-1:] == [b"offline"],
                            "offline after SIGTERM")
                        async with compat.timeout(WAIT):
                            code = await device.wait()
                    finally:
                        if device.returncode is None:
                            device.kill()
                            await device.wait()
            finally:
                stop_worker.set()
    log_text = log_path.read_text(errors="replace")
    assert code == 0, log_text[-3000:]
    assert json.loads(trig[0])["label"] == "person"
    doc = json.loads(got[0])
    # The cloud's result (it has the cloud's result_id), for the event the device sent.
    assert (doc["device_id"], doc["seq"], doc["reasoner"]) == (DEVICE, 1, "echo"), doc
    assert doc["result_id"] is not None and doc["label"] == "person", doc
    assert '"event": "mqtt.stopped"' in log_text or '"event":"mqtt.stopped"' in log_text
