"""Results where people look: the device's results and triggers on an MQTT broker.

``MqttPublisher`` publishes, under ``<topic_prefix>/<device id>/`` (docs/mqtt.md has every
topic and payload):

* ``available``        - ``online`` / ``offline``, retained; the broker publishes ``offline``
  itself (the connection's Last Will) when the device dies without saying goodbye;
* ``result``           - each result the device receives, as JSON (QoS 1);
* ``verdict``          - the last result again, retained (Home Assistant's "last verdict");
* ``trigger/<label>``  - each trigger, as JSON, when ``mqtt.publish_triggers`` is on;
* ``<label>/state``    - ``ON`` when a trigger or result for the label is fresh (Home Assistant
  turns it off ``off_delay_seconds`` later), ``OFF`` retained at each connect;
* ``snapshot``         - the key frame of the last captured event, raw JPEG, retained;

and Home Assistant discovery configs (retained) under ``<discovery_prefix>/``: a binary sensor
per trigger label, a sensor for the last verdict, an image entity for the key frame.

A broker outage never blocks the caller and never loses a result: ``publish_result`` commits
the message to a small SQLite file (``<state_dir>/mqtt.sqlite``, the one SQLite helper
``edgekeeper.sqlite.Database``: WAL, synchronous=FULL, 0600, its own thread) and returns;
the publisher task publishes it with QoS 1 and marks it published only once the broker acked
it. After an outage (or a restart of the device) every unpublished result goes out, in order,
on reconnect. Delivery is at least once: a crash between the broker's ack and the mark (a
millisecond window) sends that result again. Triggers and snapshots are momentary states, not
records: they wait in a bounded memory queue (oldest dropped when it is full) and a trigger
older than ``off_delay_seconds`` no longer turns its sensor on.

``edgekeeper run`` (device/cli.py ``run_device``) wires it in when ``mqtt.host`` is set:
``async with MqttPublisher.from_config(config) as mqtt`` in the run's exit stack,
``mqtt.action`` (``publish_result`` shaped as a results action, device/results.py) last in the
link's actions, so it runs before the ledger records a result, provisional ones included;
``Pipeline(..., on_decision=mqtt.note_decision, on_event=mqtt.event_nowait)`` (synchronous
callbacks that never wait); and ``mqtt.run(stop_mqtt)`` in the run's TaskGroup, stopped only
after the link has drained, so results handled during a drain still go out.

Built on the one runtime: waits are ``runtime.sleep``, reconnects use ``edgekeeper.backoff``,
every task belongs to a TaskGroup, and a store that cannot be written (disk full) raises the
SQLite helper's ``RetryableError``, which the results actions retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import sqlite3
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from edgekeeper import __version__, compat, runtime
from edgekeeper.backoff import Backoff
from edgekeeper.errors import ConfigError, RetryableError
from edgekeeper.log import get_logger
from edgekeeper.sqlite import Database, Pragmas, StorageUnwritable, transaction

if TYPE_CHECKING:
    import aiomqtt

    from edgekeeper.config import Config, MqttSection
    from edgekeeper.device.events import Event
    from edgekeeper.device.trigger import Decision
    from edgekeeper.protocol.messages import ResultBody

log = get_logger(__name__)

ONLINE, OFFLINE = b"online", b"offline"
# Published rows are kept this long so a result delivered twice by the cloud (a lost ack) is
# recognised by its key and not published twice.
_KEEP_PUBLISHED_S = 7 * 86400.0
# Unpublished results kept at most (a broker gone for months at 60 results an hour is about
# 70 days); past it the oldest go, each counted in the log.
_MAX_PENDING = 100_000
_FLUSH_BATCH = 100
_STOP_TIMEOUT_S = 5.0
_TOPIC_SAFE = re.compile(r"[^A-Za-z0-9_-]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- publishing order
    key          TEXT NOT NULL UNIQUE,               -- 'cloud:<seq>' / 'provisional:<seq>'
    topic        TEXT NOT NULL,
    payload      BLOB NOT NULL,
    retain       INTEGER NOT NULL,
    label        TEXT NOT NULL,
    queued_at    REAL NOT NULL,
    published_at REAL                                -- NULL until the broker acked it
);
CREATE INDEX IF NOT EXISTS messages_unpublished ON messages (id) WHERE published_at IS NULL;
"""


def topic_part(text: str) -> str:
    """A label or device id as one topic level / discovery object id (no '/', '+', '#')."""
    return _TOPIC_SAFE.sub("_", text) or "_"


@dataclass(frozen=True)
class Topics:
    prefix: str  # <topic_prefix>/<device id>
    discovery_prefix: str
    node: str  # the device id as a discovery node id

    @classmethod
    def build(cls, section: MqttSection, device_id: str) -> Topics:
        return cls(f"{section.topic_prefix}/{topic_part(device_id)}", section.discovery_prefix,
                   topic_part(device_id))

    @property
    def available(self) -> str:
        return f"{self.prefix}/available"

    @property
    def result(self) -> str:
        return f"{self.prefix}/result"

    @property
    def verdict(self) -> str:
        return f"{self.prefix}/verdict"

    @property
    def snapshot(self) -> str:
        return f"{self.prefix}/snapshot"

    def trigger(self, label: str) -> str:
        return f"{self.prefix}/trigger/{topic_part(label)}"

    def state(self, label: str) -> str:
        return f"{self.prefix}/{topic_part(label)}/state"

    def config(self, component: str, object_id: str) -> str:
        return f"{self.discovery_prefix}/{component}/{self.node}/{topic_part(object_id)}/config"


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False
    label: str = ""  # turns <label>/state on when fresh
    at: float = 0.0  # when it happened (wall clock)
    row: int | None = None  # its row in the pending store (results, read from the disk)


# --- the durable record of unpublished results ----------------------------------------------


class PendingStore:
    """Results not yet acked by the broker: ``mqtt.sqlite`` on the one SQLite helper
    (edgekeeper/sqlite.py: created 0600 in a 0700 directory, WAL, synchronous=FULL, every call
    on the database's own thread). Open with ``await PendingStore.open(path)``.

    A write the disk refuses raises the helper's ``DiskFull`` / ``DiskIOError`` (a
    ``RetryableError`` and an ``OSError``), rolled back: the results actions retry it.
    """

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.path = db.path
        self._clock = clock

    @classmethod
    async def open(cls, path: Path, clock: Callable[[], float] = time.time) -> PendingStore:
        db = await Database.open(path, name="mqtt pending results", schema=_SCHEMA,
                                 pragmas=Pragmas(synchronous="FULL", busy_timeout_s=30.0),
                                 setting="device.state_dir")
        return cls(db, clock)

    async def add(self, key: str, msg: Message) -> int | None:
        """Commit ``msg``; its row id, or None when ``key`` was recorded before (a repeat)."""
        row, dropped = await self.db.run(self._add, key, msg)
        if dropped:
            log.warning("mqtt.pending_dropped", results=dropped, kept=_MAX_PENDING)
        return row

    @staticmethod
    def _add(conn: sqlite3.Connection, key: str, msg: Message) -> tuple[int | None, int]:
        with transaction(conn):
            cur = conn.execute(
                "INSERT INTO messages (key, topic, payload, retain, label, queued_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                (key, msg.topic, msg.payload, int(msg.retain), msg.label, msg.at),
            )
            if cur.rowcount == 0:
                return None, 0
            row = int(cur.lastrowid or 0)
            over = int(conn.execute(
                "SELECT COUNT(*) FROM messages WHERE published_at IS NULL").fetchone()[0])
            dropped = 0
            if over > _MAX_PENDING:
                dropped = conn.execute(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE "
                    "published_at IS NULL ORDER BY id LIMIT ?)", (over - _MAX_PENDING,)
                ).rowcount
            return row, dropped

    async def pending(self, after: int, limit: int = _FLUSH_BATCH) -> list[Message]:
        rows = await self.db.run(lambda conn: conn.execute(
            "SELECT id, topic, payload, retain, label, queued_at FROM messages "
            "WHERE published_at IS NULL AND id > ? ORDER BY id LIMIT ?", (after, limit),
        ).fetchall())
        return [Message(r[1], bytes(r[2]), bool(r[3]), r[4], r[5], r[0]) for r in rows]

    async def mark_published(self, row: int) -> None:
        now = self._clock()
        await self.db.run(lambda conn: conn.execute(
            "UPDATE messages SET published_at = ? WHERE id = ?", (now, row)))

    async def prune(self) -> int:
        """Forget results published more than a week ago; how many went."""
        cutoff = self._clock() - _KEEP_PUBLISHED_S
        try:
            return await self.db.run(lambda conn: conn.execute(
                "DELETE FROM messages WHERE published_at IS NOT NULL AND published_at < ?",
                (cutoff,),
            ).rowcount)
        except StorageUnwritable:
            return 0  # a delete needs room in the WAL too: a full disk must not stop the start

    async def counts(self) -> dict[str, int]:
        unpublished, published = await self.db.run(lambda conn: conn.execute(
            "SELECT COUNT(*) - COUNT(published_at), COUNT(published_at) FROM messages"
        ).fetchone())
        return {"unpublished": int(unpublished), "published": int(published)}

    async def close(self) -> None:
        await self.db.close()


# --- Home Assistant discovery ---------------------------------------------------------------


def discovery_configs(section: MqttSection, topics: Topics, device_id: str,
                      labels: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """topic -> config for every entity this device announces (retained by the publisher)."""
    uid = f"edgekeeper_{topics.node}"
    common: dict[str, Any] = {
        "availability": [{"topic": topics.available, "payload_available": "online",
                          "payload_not_available": "offline"}],
        "device": {"identifiers": [uid], "name": f"edgekeeper {device_id}",
                   "manufacturer": "edgekeeper", "model": "edgekeeper device",
                   "sw_version": __version__},
        "origin": {"name": "edgekeeper", "sw_version": __version__},
    }
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        cfg = {**common, "name": label, "unique_id": f"{uid}_{topic_part(label)}",
               "state_topic": topics.state(label), "payload_on": "ON", "payload_off": "OFF",
               "off_delay": section.off_delay_seconds}
        if section.publish_triggers:
            cfg["json_attributes_topic"] = topics.trigger(label)
        out[topics.config("binary_sensor", label)] = cfg
    out[topics.config("sensor", "verdict")] = {
        **common, "name": "Last verdict", "unique_id": f"{uid}_verdict",
        "state_topic": topics.verdict, "value_template": "{{ value_json.label | truncate(255) }}",
        "json_attributes_topic": topics.verdict, "icon": "mdi:comment-check-outline",
    }
    if section.snapshots:
        out[topics.config("image", "snapshot")] = {
            **common, "name": "Key frame", "unique_id": f"{uid}_snapshot",
            "image_topic": topics.snapshot, "content_type": "image/jpeg",
        }
    return out


def tls_context(section: MqttSection) -> ssl.SSLContext | None:
    """The broker's TLS context (blocks on reading files: call it in a thread)."""
    if not section.tls:
        return None
    ctx = ssl.create_default_context()  # the system's CAs, hostname checks, TLS >= 1.2
    for key, path in (("ca_file", section.ca_file), ("cert_file", section.cert_file)):
        if not path:
            continue
        full = str(Path(path).expanduser())
        try:
            if key == "ca_file":
                ctx.load_verify_locations(cafile=full)
            else:
                ctx.load_cert_chain(full, str(Path(section.key_file).expanduser()))
        except FileNotFoundError as err:
            raise ConfigError(f"mqtt.{key}: {err.filename or full} does not exist",
                              fix=f"point mqtt.{key} (and key_file) at a PEM file") from None
        except (ssl.SSLError, OSError, ValueError) as err:
            raise ConfigError(
                f"mqtt.{key} {full} cannot be loaded: {err}",
                fix="give PEM files: the CA certificate, and the client certificate with its "
                "unencrypted private key",
            ) from None
    return ctx


# --- the publisher --------------------------------------------------------------------------


class MqttPublisher:
    """Owns the broker connection: one task (``run``), a bounded queue, a pending store."""

    def __init__(
        self,
        section: MqttSection,
        *,
        device_id: str,
        state_dir: Path,
        labels: tuple[str, ...] = (),
        password: str | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.section = section
        self.device_id = device_id
        self.topics = Topics.build(section, device_id)
        self.labels = tuple(labels)
        self.store_path = Path(state_dir) / "mqtt.sqlite"
        self.client_id = section.client_id or f"edgekeeper-{topic_part(device_id)}"
        self._password = password
        self.backoff = backoff or Backoff(1.0, 60.0)
        self._clock = clock
        self._store: PendingStore | None = None
        self._tls: ssl.SSLContext | None = None
        self._queue: asyncio.Queue[Message] = asyncio.Queue(section.queue_size)
        # Results are published from the disk, oldest first: publish_result only says so.
        self._rescan = True  # results may wait there from before
        # Set by whatever gives the publisher work (a result on disk, a message in memory) or
        # ends its session (the connection lost): the session sleeps on it between messages.
        self._wake = asyncio.Event()
        self._carry: Message | None = None  # a memory message whose publish was cut off
        self.connected = False
        self.last_error: str | None = None  # why the last connection failed (for status)
        self.dropped = 0  # memory-only messages dropped because the queue was full

    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str] | None = None) -> MqttPublisher:
        section = config.mqtt
        if importlib.util.find_spec("aiomqtt") is None:
            raise ConfigError(
                f"{config.source}: mqtt.host is set but the MQTT client (aiomqtt) is not "
                "installed",
                fix="pip install 'edgekeeper[mqtt]' in the device's environment, or clear "
                "mqtt.host",
            )
        env = os.environ if env is None else env
        password = None
        if section.password_env:
            password = env.get(section.password_env)
            if password is None:
                raise ConfigError(
                    f"mqtt.password_env names {section.password_env}, which is not set in "
                    "the environment",
                    fix=f"set {section.password_env} in the service's environment (systemd: "
                    "an EnvironmentFile= readable only by the service), or clear "
                    "mqtt.password_env",
                )
        # A label switched off (enabled = false, a default one included) never triggers: no
        # sensor for it.
        labels = tuple(name for name, rule in config.trigger.labels.items() if rule.enabled)
        return cls(section, device_id=config.device.id, state_dir=config.device.state_dir,
                   labels=labels, password=password)

    async def __aenter__(self) -> MqttPublisher:
        self._tls = await asyncio.to_thread(tls_context, self.section)
        self._store = await PendingStore.open(self.store_path, self._clock)
        await self._store.prune()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            await store.close()

    # -- what the device calls -------------------------------------------------------------
    async def publish_result(self, result: ResultBody | Mapping[str, Any], *,
                             result_id: int | None = None, key: str | None = None) -> bool:
        """Record ``result`` for publishing and return at once (the broker may be away).

        ``result`` is the ResultBody or the JSON the result actions got (with ``result_id``).
        ``key`` defaults to the results ledger's name for it: 'cloud:<seq>' when the cloud sent
        it (it has a result_id), 'provisional:<seq>' for the device's own edge fallback. A key
        recorded before is not published again: False when it was a repeat.
        """
        assert self._store is not None, "use `async with MqttPublisher(...)`"
        doc = dict(result) if isinstance(result, Mapping) else {
            "result_id": result_id, **result.to_json()}
        doc.setdefault("result_id", result_id)
        doc.setdefault("device_id", self.device_id)
        if key is None:
            key = f"{'provisional' if doc['result_id'] is None else 'cloud'}:{doc.get('seq')}"
        label = str(doc.get("label", ""))
        msg = Message(self.topics.result, _json(doc), label=label, at=self._clock())
        row = await self._store.add(key, msg)
        if row is None:
            return False
        self._rescan = True
        self._wake.set()
        return True

    async def action(self, doc: dict[str, Any]) -> None:
        """``publish_result`` shaped as a results action (device/results.py ``Action``): it
        runs before the ledger records the result, and never waits for the broker."""
        await self.publish_result(doc)

    async def publish_trigger(self, label: str, **fields: Any) -> None:
        """``trigger_nowait`` for async callers."""
        self.trigger_nowait(label, **fields)

    def trigger_nowait(self, label: str, *, score: float | None = None, seq: int | None = None,
                       reason: str | None = None, at: float | None = None) -> None:
        """A trigger fired: publish it if ``mqtt.publish_triggers`` is on. Never waits."""
        if not self.section.publish_triggers:
            return
        at = self._clock() if at is None else at
        doc = {"type": "trigger", "device_id": self.device_id, "label": label,
               "score": None if score is None else round(float(score), 4), "seq": seq,
               "reason": reason, "at": round(at, 3)}
        self._offer(Message(self.topics.trigger(label), _json(doc), label=label, at=at))

    def note_decision(self, decision: Decision) -> None:
        """The loop's ``on_decision`` callback: a fired decision is a trigger."""
        if decision.fired:
            self.trigger_nowait(decision.label, score=decision.score, reason=decision.reason)

    def event_nowait(self, event: Event) -> None:
        """An event was captured: its key frame (the one nearest the trigger) as the snapshot."""
        if not self.section.snapshots or not event.frames:
            return
        times = event.frame_times or (event.trigger_t,) * len(event.frames)
        best = min(range(len(event.frames)), key=lambda i: abs(times[i] - event.trigger_t))
        self._offer(Message(self.topics.snapshot, bytes(event.frames[best]), retain=True,
                            at=event.captured_at))

    def _offer(self, msg: Message) -> None:
        while True:
            try:
                self._queue.put_nowait(msg)
                break
            except asyncio.QueueFull:
                old = self._queue.get_nowait()
                self.dropped += 1
                log.warning("mqtt.queue_full", dropped=self.dropped, topic=old.topic,
                            label=old.label or None)
        self._wake.set()

    # -- the task --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Connect, publish, reconnect with backoff, until ``stop`` is set; then say offline.

        Broker and network failures are retried for as long as it runs, as is a store the disk
        refuses (a ``RetryableError``); a ``PermanentError`` (a corrupt store) ends it."""
        import aiomqtt

        assert self._store is not None, "use `async with MqttPublisher(...)`"
        while not stop.is_set():
            try:
                async with self._client() as client:
                    await self._session(client, stop)
                return
            except RetryableError as err:  # the pending store: disk full, locked too long
                self._disconnected(err.message)
                delay = self.backoff.next_delay()
                log.warning("mqtt.store_failed", error=err.message, fix=err.fix,
                            seconds=round(delay, 2))
            except aiomqtt.MqttCodeError as err:
                self._disconnected(str(err))
                delay = self.backoff.next_delay()
                if getattr(err, "rc", None) in (4, 5, 134, 135):  # bad credentials / refused
                    self.last_error = f"refused: {err}"
                    log.error("mqtt.refused", host=self.section.host, error=str(err),
                              fix="check mqtt.username and the password in mqtt.password_env,"
                              " and the broker's ACL for this client",
                              seconds=round(delay, 2))
                else:
                    log.warning("mqtt.disconnected", host=self.section.host, error=str(err),
                                seconds=round(delay, 2))
            except (aiomqtt.MqttError, OSError, TimeoutError) as err:
                self._disconnected(str(err) or type(err).__name__)
                delay = self.backoff.next_delay()
                log.warning("mqtt.disconnected", host=self.section.host,
                            error=str(err) or type(err).__name__, seconds=round(delay, 2))
            await runtime.sleep(stop, delay)

    def _client(self) -> aiomqtt.Client:
        import aiomqtt

        s = self.section
        return aiomqtt.Client(
            s.host, s.port, identifier=self.client_id, keepalive=s.keepalive,
            username=s.username or None, password=self._password,
            tls_context=self._tls, timeout=10.0,
            # The Last Will: a device that dies (power, crash, network) shows offline.
            will=aiomqtt.Will(self.topics.available, OFFLINE, qos=1, retain=True),
        )

    def _disconnected(self, error: str) -> None:
        self.connected = False
        self.last_error = error
        # Results from the cut-off session may not be acked yet: look at the disk again.
        self._rescan = True

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """One connection: announce, publish until ``stop`` or the connection drops."""
        await client.publish(self.topics.available, ONLINE, qos=1, retain=True)
        for topic, cfg in (discovery_configs(self.section, self.topics, self.device_id,
                                             self.labels).items()
                           if self.section.discovery else ()):
            await client.publish(topic, _json(cfg), qos=1, retain=True)
        for label in self.labels:
            await client.publish(self.topics.state(label), b"OFF", qos=1, retain=True)
        self.connected = True
        self.last_error = None
        self.backoff.reset()
        log.info("mqtt.connected", host=self.section.host, port=self.section.port,
                 prefix=self.topics.prefix)
        lost = asyncio.Event()
        failure: Exception | None = None
        async with compat.TaskGroup() as tg:
            # Waits for the connection to drop (the messages iterator raises then) and says so.
            watcher = tg.create_task(self._watch(client, lost), name="mqtt-watch")
            try:
                await self._publish(client, stop, lost)
            except Exception as err:
                # Re-raised after the group, not through it: the caller catches the error
                # itself, not a TaskGroup's ExceptionGroup around it.
                failure = err
            finally:
                watcher.cancel()
        if failure is not None:
            raise failure

    async def _watch(self, client: aiomqtt.Client, lost: asyncio.Event) -> None:
        import aiomqtt

        # We subscribe to nothing; the iterator ends (raises MqttError) when the connection
        # drops.
        with contextlib.suppress(aiomqtt.MqttError):
            async for _ in client.messages:
                pass
        lost.set()
        self._wake.set()

    async def _publish(self, client: aiomqtt.Client, stop: asyncio.Event,
                       lost: asyncio.Event) -> None:
        try:
            while True:
                if self._carry is not None:
                    await self._send(client, self._carry)
                    self._carry = None
                if self._rescan:
                    await self._flush(client, stop)
                if stop.is_set():
                    break
                msg = await self._next(stop, lost)
                if msg is not None:
                    self._carry = msg
                    await self._send(client, msg)
                    self._carry = None
            # Stopping: what waits goes out first, for a few seconds (results left over stay
            # on disk for the next start), then a clean goodbye: a clean disconnect fires no
            # Will, so "offline" must be said.
            with contextlib.suppress(TimeoutError):
                async with compat.timeout(_STOP_TIMEOUT_S):
                    if self._rescan:
                        await self._flush(client, None)
                    while not self._queue.empty():
                        await self._send(client, self._queue.get_nowait())
            await client.publish(self.topics.available, OFFLINE, qos=1, retain=True,
                                 timeout=_STOP_TIMEOUT_S)
            self.connected = False
            log.info("mqtt.stopped", unpublished=(await self.counts())["unpublished"])
        except asyncio.CancelledError:
            # Cancelled instead of stopped: still leave "offline" behind (best effort, brief).
            with contextlib.suppress(Exception):
                async with compat.timeout(1.0):
                    await client.publish(self.topics.available, OFFLINE, qos=0, retain=True)
            raise

    async def _next(self, stop: asyncio.Event, lost: asyncio.Event) -> Message | None:
        """The next message from memory; None when results wait on disk or on a stop."""
        while True:
            # No await between the checks and the sleep: nothing can set _wake unseen.
            self._wake.clear()
            if self._rescan:
                return None
            if not self._queue.empty():
                return self._queue.get_nowait()
            if lost.is_set():
                raise _connection_lost()
            if await runtime.sleep(stop, math.inf, wake=self._wake):
                return None

    async def _flush(self, client: aiomqtt.Client, stop: asyncio.Event | None) -> None:
        """Publish every result still on disk, oldest first (a stop leaves the rest there)."""
        assert self._store is not None
        self._rescan = False
        after = 0
        while True:
            batch = await self._store.pending(after)
            if not batch:
                return
            if stop is not None and stop.is_set():
                self._rescan = True
                return
            for msg in batch:
                await self._send(client, msg)
                after = msg.row or after

    async def _send(self, client: aiomqtt.Client, msg: Message) -> None:
        await client.publish(msg.topic, msg.payload, qos=1, retain=msg.retain)
        if msg.row is not None:
            assert self._store is not None
            await self._store.mark_published(msg.row)
            # The last verdict, retained, for dashboards that start after it arrived.
            await client.publish(self.topics.verdict, msg.payload, qos=1, retain=True)
            log.debug("mqtt.published", topic=msg.topic, row=msg.row)
        if msg.label in self.labels and self._clock() - msg.at <= self.section.off_delay_seconds:
            await client.publish(self.topics.state(msg.label), b"ON", qos=1)

    async def counts(self) -> dict[str, int]:
        assert self._store is not None
        return await self._store.counts()


def _connection_lost() -> Exception:
    import aiomqtt

    return aiomqtt.MqttError("connection to the broker lost")


def _json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
