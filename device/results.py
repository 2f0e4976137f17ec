"""Results on the device: fetched from the cloud, verified, handed to actions, acknowledged.

The client long-polls ``GET /v1/results`` (a signed request, docs/protocol.md), opens every
result envelope against the cloud key pinned at enrollment (``open_result``: only the cloud can
have sealed it, and only for this device), then runs the configured actions in order:

* ``jsonl``   - append the result as one JSON line (fsynced) to a file;
* ``command`` - run an argv (no shell) with the result as JSON on stdin; exit 0 is success;
* ``post_url`` - POST the result as JSON to a local URL; a 2xx is success.

An action that fails is retried (``results.retries`` times, delays doubling from
``results.retry_delay_seconds``, with ``stamina``), then recorded as failed; the other actions
still run. Each
result's outcome is committed to a ledger (``<state_dir>/results.sqlite``) *before* it is acked,
so a result redelivered after a crash or a lost ack is recognised (by its seq) and only acked
again. The window between "actions ran" and "ledger committed" is the one place an action can
run twice, so actions should tolerate a repeat (at-least-once, as the cloud documents).

A result that does not verify (forged, altered, for another device) never reaches an action: it
is recorded as ``rejected``, logged as an error, and acked so it does not come back forever.

The edge fallback (device/uplink.py) hands provisional results to the same actions through
``ResultActions.handle_provisional``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import stamina
from yarl import URL

from edgekeeper import compat, runtime
from edgekeeper.backoff import Backoff, parse_retry_after
from edgekeeper.errors import EdgekeeperError, PermanentError, RetryableError, classified
from edgekeeper.fs import open_private
from edgekeeper.log import get_logger
from edgekeeper.protocol.envelope import open_result, sign_request
from edgekeeper.protocol.errors import ProtocolError
from edgekeeper.protocol.keys import DeviceKeys, b64d
from edgekeeper.protocol.messages import ResultBody
from edgekeeper.sqlite import Database, Pragmas, StorageUnwritable

if TYPE_CHECKING:
    from edgekeeper.config import Config, ResultsSection

log = get_logger(__name__)

Outcome = Literal["handled", "failed", "rejected", "already"]
_MAX_ANSWER = 16 * 1024 * 1024
_MAX_STDERR = 2000

_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key        TEXT PRIMARY KEY,      -- 'cloud:<seq>' or 'provisional:<seq>'
    seq        INTEGER NOT NULL,
    result_id  INTEGER,               -- the cloud's id (the ack handle), NULL if provisional
    status     TEXT NOT NULL,         -- handled | failed | rejected
    error      TEXT,
    result     TEXT,                  -- the JSON the actions received
    at         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_at ON results (at);
"""


class ActionFailed(RetryableError):
    """One try of one action did not succeed (the message says why); it is tried again."""


@dataclass(frozen=True)
class LedgerEntry:
    key: str
    seq: int
    result_id: int | None
    status: str
    error: str | None
    result: dict[str, Any] | None


class Ledger:
    """Which results were handled: ``results.sqlite`` (edgekeeper/sqlite.py, synchronous=FULL).

    Opened on first use, not before: a device that never handles a result (``device upload
    --burst``, results off) never creates it, so a full disk cannot stop the upload.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._db: Database | None = None
        self._opening = asyncio.Lock()

    async def _database(self) -> Database:
        async with self._opening:
            if self._db is None:
                self._db = await Database.open(
                    self.path, name="results ledger", schema=_LEDGER_SCHEMA,
                    pragmas=Pragmas(busy_timeout_s=30.0), setting="device.state_dir",
                )
            return self._db

    async def get(self, key: str) -> LedgerEntry | None:
        db = await self._database()
        row = await db.run(lambda conn: conn.execute(
            "SELECT key, seq, result_id, status, error, result FROM results WHERE key = ?",
            (key,),
        ).fetchone())
        return None if row is None else _entry(row)

    async def record(self, key: str, seq: int, result_id: int | None, status: str,
                     error: str | None, result: dict[str, Any] | None) -> None:
        """Commit one outcome. On a full disk this raises DiskFull/DiskIOError (an OSError and
        a RetryableError): not recorded, so not acked, and the result comes again later."""
        doc = None if result is None else json.dumps(result)
        db = await self._database()
        await db.run(lambda conn: conn.execute(
            "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
            (key, seq, result_id, status, error, doc, self._clock()),
        ))

    async def prune(self, older_than_s: float) -> int:
        """Delete entries recorded more than ``older_than_s`` ago; how many went."""
        cutoff = self._clock() - older_than_s
        db = await self._database()
        try:
            return await db.run(
                lambda conn: conn.execute("DELETE FROM results WHERE at < ?", (cutoff,)).rowcount
            )
        except StorageUnwritable:
            return 0  # a delete needs room in the WAL too; try again tomorrow

    async def entries(self) -> list[LedgerEntry]:
        db = await self._database()
        rows = await db.run(lambda conn: conn.execute(
            "SELECT key, seq, result_id, status, error, result FROM results ORDER BY at, key"
        ).fetchall())
        return [_entry(r) for r in rows]

    async def counts(self) -> dict[str, int]:
        db = await self._database()
        return await db.run(lambda conn: dict(
            conn.execute("SELECT status, COUNT(*) FROM results GROUP BY status")
        ))

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    return LedgerEntry(key=row[0], seq=row[1], result_id=row[2], status=row[3], error=row[4],
                       result=None if row[5] is None else json.loads(row[5]))


# --- actions --------------------------------------------------------------------------------


Action = Callable[[dict[str, Any]], Awaitable[None]]


def _append_line(path: Path, line: bytes) -> None:
    fd = open_private(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line)
        os.fsync(fd)  # "handled" is recorded next: the line must be on disk first
    finally:
        os.close(fd)


class ResultActions:
    """The configured actions, their retries, and the ledger that makes them run once."""

    def __init__(
        self,
        ledger_path: Path,
        *,
        jsonl: Path | None = None,
        command: tuple[str, ...] = (),
        command_timeout: float = 30.0,
        post_url: str = "",
        retries: int = 3,
        retry_delay: float = 1.0,
        keep_days: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = Ledger(ledger_path, clock)
        self.keep_s = keep_days * 86400.0
        self._clock = clock
        self._pruned_at: float | None = None
        self.jsonl = jsonl
        self.command = tuple(command)
        self.command_timeout = command_timeout
        self.post_url = post_url
        self.retries = retries
        self.retry_delay = retry_delay
        self.actions: list[tuple[str, Action]] = []
        if jsonl is not None:
            self.actions.append(("jsonl", self._jsonl))
        if self.command:
            self.actions.append(("command", self._command))
        if post_url:
            self.actions.append(("post", self._post))

    @classmethod
    def from_config(cls, config: Config) -> ResultActions:
        section = config.results
        state = config.device.state_dir
        jsonl = None
        if section.jsonl:
            p = Path(section.jsonl).expanduser()
            jsonl = p if p.is_absolute() else state / p
        return cls(
            state / "results.sqlite",
            jsonl=jsonl,
            command=section.command,
            command_timeout=section.command_timeout_seconds,
            post_url=section.post_url,
            retries=section.retries,
            retry_delay=section.retry_delay_seconds,
            keep_days=section.ledger_keep_days,
        )

    async def close(self) -> None:
        await self.ledger.close()

    async def handle(self, key: str, result: ResultBody, *, result_id: int | None = None
                     ) -> Outcome:
        """Run every action for ``result`` unless ``key`` was handled before; record it."""
        if await self.ledger.get(key) is not None:
            return "already"
        doc = {"result_id": result_id, **result.to_json()}
        errors: list[str] = []
        for name, action in self.actions:
            error = await self._with_retries(name, action, doc)
            if error is not None:
                errors.append(f"{name}: {error}")
        status: Outcome = "failed" if errors else "handled"
        error_text = "; ".join(errors)[:4000] if errors else None
        await self.ledger.record(key, result.seq, result_id, status, error_text, doc)
        if errors:
            log.error("results.action_failed", key=key, seq=result.seq, errors=error_text)
        else:
            log.info("results.handled", key=key, seq=result.seq, label=result.label,
                     provisional=result.provisional)
        await self._prune_daily()
        return status

    async def _prune_daily(self) -> None:
        # A board left for months would otherwise keep every result it ever handled.
        now = self._clock()
        if not self.keep_s or (self._pruned_at is not None and now - self._pruned_at < 86400.0):
            return
        self._pruned_at = now
        gone = await self.ledger.prune(self.keep_s)
        if gone:
            log.info("results.ledger_pruned", entries=gone, older_than_days=self.keep_s / 86400)

    async def handle_provisional(self, result: ResultBody) -> None:
        await self.handle(f"provisional:{result.seq}", result)

    async def reject(self, key: str, seq: int, result_id: int, reason: str) -> None:
        await self.ledger.record(key, seq, result_id, "rejected", reason, None)
        log.error("results.rejected", key=key, result_id=result_id, reason=reason)

    async def _with_retries(self, name: str, action: Action, doc: dict[str, Any]) -> str | None:
        """None on success, else the last error after every retry.

        A bounded retry of one call is stamina's job (its test mode turns the waits off); the
        long-lived loops keep edgekeeper.backoff, which says why."""
        try:
            async for attempt in stamina.retry_context(
                on=RetryableError, attempts=self.retries + 1, timeout=None,
                wait_initial=self.retry_delay, wait_max=self.retry_delay * 2.0 ** self.retries,
                wait_jitter=0.0, wait_exp_base=2,
            ):
                with attempt:
                    try:
                        with classified(f"result action {name}"):
                            await action(doc)
                    except RetryableError as err:
                        log.warning("results.action_retry", action=name, seq=doc.get("seq"),
                                    attempt=attempt.num, of=self.retries + 1,
                                    error=err.message[:300])
                        raise
        except EdgekeeperError as err:
            return err.message
        return None

    async def _jsonl(self, doc: dict[str, Any]) -> None:
        assert self.jsonl is not None
        line = (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()
        await asyncio.to_thread(_append_line, self.jsonl, line)

    async def _command(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with compat.timeout(self.command_timeout):
                _, stderr = await proc.communicate(data)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ActionFailed(f"{self.command[0]} ran longer than {self.command_timeout:g} s"
                               ) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = stderr[-_MAX_STDERR:].decode("utf-8", "replace").strip()
            raise ActionFailed(f"{self.command[0]} exited {proc.returncode}: {tail}")

    async def _post(self, doc: dict[str, Any]) -> None:
        timeout = aiohttp.ClientTimeout(total=self.command_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
            self.post_url, json=doc
        ) as resp:
            if not 200 <= resp.status < 300:
                text = (await resp.content.read(500)).decode("utf-8", "replace")
                raise ActionFailed(f"POST {self.post_url} answered {resp.status}: {text}")


# --- the client -----------------------------------------------------------------------------


class ResultsRefused(PermanentError):
    """The cloud refuses this device's result requests (not enrolled, revoked, bad signature)."""


@dataclass
class PollReport:
    received: int = 0
    handled: int = 0
    failed: int = 0
    rejected: int = 0
    already: int = 0
    acked: int = 0


class ResultsClient:
    """Long-polls the cloud for this device's results and acks them once handled."""

    def __init__(
        self,
        actions: ResultActions,
        *,
        keys: DeviceKeys,
        device_id: str,
        cloud_url: str,
        cloud_box_pk: bytes,
        section: ResultsSection,
        connect_timeout: float = 10.0,
        limit: int = 20,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.actions = actions
        self.keys = keys
        self.device_id = device_id
        self.base = URL(cloud_url.rstrip("/"))
        self.cloud_box_pk = bytes(cloud_box_pk)
        self.section = section
        self.connect_timeout = connect_timeout
        self.limit = limit
        self.cursor = 0
        self.backoff = Backoff(1.0, 300.0)
        # The cloud's clock minus ours, learnt from a `stale` answer (signed timestamps must
        # fall inside the cloud's window even when the board's clock is off).
        self.clock_offset = 0.0
        self._clock = clock
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        # True once a poll has results in hand: from then on a stop lets their actions finish
        # and the ack go out. Before (waiting on the long-poll) a stop cuts the poll short.
        self._in_hand = False
        # Called with the Edgekeeper-Releases header ("person=1.2.0,sound=1.1.0") of a poll's
        # answer: the updater looks for a new model now instead of at its next check.
        self.on_releases: Callable[[str], None] | None = None
        # What a heartbeat says (DeviceMonitor.heartbeat), sent every heartbeat_s by
        # run_heartbeats; None or 0: no heartbeats (DeviceLink.run starts none).
        self.heartbeat: Callable[[], dict[str, Any]] | None = None
        self.heartbeat_s = 0.0

    async def __aenter__(self) -> ResultsClient:
        # The read timeout must outlast the long-poll the cloud may hold open.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout,
            sock_read=self.section.poll_wait_seconds + 30.0,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(ssl=self._ssl or True)
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; failures back off (edgekeeper.backoff)."""
        while not stop.is_set():
            try:
                await self._poll_until(stop)
            except ResultsRefused as err:
                # Not enrolled or revoked: nothing works until an operator acts; the device
                # keeps gating and looks again at the cap, as the uploader does.
                log.error("results.refused", error=err.message, fix=err.fix)
                await runtime.sleep(stop, self.backoff.cap)
            except RetryableError as err:
                delay = self.backoff.next_delay(getattr(err, "retry_after", None))
                log.warning("results.poll_failed", error=err.message[:300],
                            seconds=round(delay, 2))
                await runtime.sleep(stop, delay)
            else:
                self.backoff.reset()

    async def _poll_until(self, stop: asyncio.Event) -> None:
        """One ``poll_once``. A stop while it waits on the long-poll cuts it short: nothing was
        received, so nothing is lost (unacked results are fetched again on the next start).
        With results in hand it finishes: their actions run and the ack goes out, bounded by
        the actions' and HTTP timeouts (and the runtime's drain deadline)."""
        failed: list[Exception] = []

        async def poll() -> None:
            try:
                await self.poll_once(wait=self.section.poll_wait_seconds)
            except Exception as err:  # raised below, not wrapped in the group's ExceptionGroup
                failed.append(err)

        async def cut_short(polling: asyncio.Task[None]) -> None:
            await stop.wait()
            if not self._in_hand:
                polling.cancel()

        async with compat.TaskGroup() as tg:
            polling = tg.create_task(poll(), name="results-poll")
            watcher = tg.create_task(cut_short(polling), name="results-stop-watch")
            polling.add_done_callback(lambda _: watcher.cancel())
        if failed:
            raise failed[0]

    def _signed(self, method: str, path: str, query: str, body: bytes) -> dict[str, str]:
        return sign_request(self.keys, device_id=self.device_id, method=method, path=path,
                            query=query, body=body, timestamp=self._clock() + self.clock_offset)

    def _check(self, status: int, text: str, headers: Any) -> None:
        try:
            _raise_for(status, text, headers)
        except ResultsUnavailable as err:
            if err.code == "stale":
                offset = _server_offset(headers, self._clock())
                if offset is not None and abs(offset - self.clock_offset) > 2.0:
                    log.warning("results.clock_skew", seconds=round(offset, 1))
                    self.clock_offset = offset
                    err.retry_after = 0.0
            raise

    async def poll_once(self, *, wait: float = 0.0) -> PollReport:
        """One long-poll: fetch, verify, handle, ack. Raises on transport or auth failure."""
        assert self._session is not None, "use `async with ResultsClient(...)`"
        report = PollReport()
        path = self.base.path.rstrip("/") + "/v1/results"
        query = f"cursor={self.cursor}&wait={int(wait)}&limit={self.limit}"
        url = self.base.with_path(path, encoded=True).with_query(None)
        with classified("GET /v1/results"):
            async with self._session.get(
                URL(f"{url}?{query}", encoded=True), headers=self._signed("GET", path, query, b"")
            ) as resp:
                text = (await resp.content.read(_MAX_ANSWER)).decode("utf-8", "replace")
                self._check(resp.status, text, resp.headers)
                hint = resp.headers.get("Edgekeeper-Releases")
        if hint and self.on_releases is not None:
            self.on_releases(hint)
        self._in_hand = True
        try:
            return await self._handle_all(text, report)
        finally:
            self._in_hand = False

    async def _handle_all(self, text: str, report: PollReport) -> PollReport:
        data = _ingest_json(text, "GET /v1/results")
        items = data.get("results", []) if isinstance(data, dict) else []
        ack: list[int] = []
        for item in items:
            report.received += 1
            outcome = await self._handle_item(item)
            setattr(report, outcome, getattr(report, outcome) + 1)
            if isinstance(item, dict) and type(item.get("id")) is int:
                ack.append(item["id"])
        if isinstance(data, dict) and type(data.get("cursor")) is int:
            self.cursor = max(self.cursor, data["cursor"])
        if ack:
            report.acked = await self._ack(ack)
        return report

    async def _handle_item(self, item: Any) -> Outcome:
        if not isinstance(item, dict) or type(item.get("id")) is not int:
            log.error("results.malformed_item", item=str(item)[:200])
            return "rejected"
        rid = item["id"]
        listed = item.get("seq")
        seq = listed if type(listed) is int else -1  # not a bool, though bool is an int
        key = f"cloud:{seq}"
        try:
            envelope = b64d(str(item.get("envelope", "")), what="envelope")
            opened = await asyncio.to_thread(
                open_result, envelope, device=self.keys, device_id=self.device_id,
                cloud_box_pk=self.cloud_box_pk,
            )
        except (ProtocolError, ValueError) as err:
            reason = f"{getattr(err, 'code', 'invalid')}: {err}"[:1000]
            await self.actions.reject(f"rejected:{rid}", seq, rid, reason)
            return "rejected"
        if opened.seq != seq:
            await self.actions.reject(f"rejected:{rid}", seq, rid,
                                      f"listed as seq {seq}, sealed as seq {opened.seq}")
            return "rejected"
        return await self.actions.handle(key, opened.body, result_id=rid)

    async def send_heartbeat(self, doc: dict[str, Any]) -> None:
        """POST one heartbeat, signed as the results requests are. Raises on failure."""
        await self._post_signed("/v1/heartbeat", doc)

    async def _post_signed(self, endpoint: str, doc: Any) -> str:
        """POST ``doc`` as JSON to ``endpoint``, signed as the results requests are; the
        answer's text. Raises (classified) on a transport failure or a refusal."""
        assert self._session is not None
        path = self.base.path.rstrip("/") + endpoint
        body = json.dumps(doc).encode()
        headers = self._signed("POST", path, "", body)
        headers["Content-Type"] = "application/json"
        url = self.base.with_path(path, encoded=True)
        with classified(f"POST {endpoint}"):
            async with self._session.post(url, data=body, headers=headers) as resp:
                text = (await resp.content.read(_MAX_ANSWER)).decode("utf-8", "replace")
                self._check(resp.status, text, resp.headers)
        return text

    async def run_heartbeats(self, stop: asyncio.Event) -> None:
        """Send a heartbeat every ``heartbeat_s`` until ``stop``. A failed one is logged and
        dropped: the next one says the same, newer (nothing to retry or queue)."""
        while self.heartbeat is not None and self.heartbeat_s > 0:
            try:
                await self.send_heartbeat(self.heartbeat())
            except EdgekeeperError as err:
                log.warning("results.heartbeat_failed", error=err.message[:300])
            if await runtime.sleep(stop, self.heartbeat_s):
                return

    async def _ack(self, ids: list[int]) -> int:
        text = await self._post_signed("/v1/results/ack", {"ids": ids})
        data = _ingest_json(text, "POST /v1/results/ack")
        acked = data.get("acked", 0) if isinstance(data, dict) else 0
        return acked if type(acked) is int else 0


class ResultsUnavailable(RetryableError, ConnectionError):
    """The cloud answered but cannot serve results now (5xx, 429, not the ingest's JSON)."""

    def __init__(self, message: str, retry_after: float | None, code: str = "") -> None:
        super().__init__(message, fix="nothing to do: the results are fetched again later")
        self.retry_after = retry_after
        self.code = code


def _ingest_json(text: str, what: str) -> Any:
    """A 2xx answer's JSON. Anything else (a captive portal's login page, a proxy's own 200)
    means we are not talking to the ingest yet: back off and ask again, like a 5xx."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ResultsUnavailable(
            f"the answer to {what} is not the ingest's JSON: {text[:120]!r}",
            None, "unexpected_answer",
        ) from None


def _server_offset(headers: Any, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(headers.get("Date", ""))
    except (TypeError, ValueError, IndexError):
        return None
    return when.timestamp() - now


def _raise_for(status: int, text: str, headers: Any) -> None:
    if 200 <= status < 300:
        return
    code, message, fix = "", text[:300], None
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError, RecursionError):
        err = json.loads(text)["error"]
        code, message, fix = str(err["code"]), str(err.get("message", "")), err.get("fix")
    if status in (400, 401, 403, 404, 405, 415) and code not in ("stale",):
        raise ResultsRefused(f"the cloud refused the results request ({code or status}): "
                             f"{message}", fix=fix)
    raise ResultsUnavailable(f"HTTP {status} {code}: {message}",
                             parse_retry_after(headers.get("Retry-After")), code)
