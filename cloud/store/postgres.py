"""The shared store: registry, enrolment tokens and sealed results in PostgreSQL, for ingest
processes and workers on several machines. See base.py for the contract; this maps it one to
one onto three tables, like the SQLite store.

Why it is built this way:

* **One pool per process** (psycopg_pool), autocommit for single statements and an explicit
  transaction where several must hold together (enrolment: token + device + registry version).
* **Enrolment races**: the token row is locked (``SELECT ... FOR UPDATE``), so two ingest
  processes given the same token serialise; a device id taken at the same moment through
  another token is caught by the primary key (``ON CONFLICT DO NOTHING`` + a check), and the
  whole transaction, token use included, rolls back.
* **Result ids are handed out in commit order.** The device's long-poll cursor is "results with
  id > the last one I saw". With a plain sequence, two workers may take ids 10 and 11 and commit
  11 first; a device polling in between advances its cursor to 11 and never sees 10. So
  ``put_result`` takes a transaction-scoped advisory lock before drawing the id: ids become
  visible in increasing order, and ``MAX(id)`` is a correct ``results_version`` for long-poll
  wake-ups. The price is that result inserts serialise on one short transaction each (one
  fsync'd commit), some hundreds per second: far above what LLM-bound workers produce.
* **Schema created at open**, under an advisory lock so processes starting together do not race
  on ``CREATE TABLE IF NOT EXISTS``.
* The DSN may hold a password: it is never logged nor put in an error (``_safe_dsn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from edgekeeper.cloud.store.base import (
    DeviceActivity,
    DeviceRecord,
    EnrollOutcome,
    ProviderState,
    ResultsSince,
    SealedSummary,
    StoredResult,
    UsageRecord,
    UsageRow,
    UsageTotals,
    check_enrollment,
)
from edgekeeper.cloud.store.postgres_releases import SCHEMA as RELEASES_SCHEMA
from edgekeeper.cloud.store.postgres_releases import PostgresReleases
from edgekeeper.cloud.training.examples import (
    EXAMPLE_COLUMNS,
    ExampleCount,
    TrainingExample,
    delete_media,
    example_of_row,
    example_row,
    examples_filter,
    scope_filter,
)
from edgekeeper.errors import ConfigError, classified
from edgekeeper.protocol.errors import DeviceExists, InvalidToken
from edgekeeper.protocol.release import Scope

# Advisory lock keys (any 64-bit numbers unique to edgekeeper).
_SCHEMA_LOCK = 0x65646B7301  # "edks" 1
_RESULTS_LOCK = 0x65646B7302

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY,
        sign_pk BYTEA NOT NULL,
        box_pk BYTEA NOT NULL,
        enrolled_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS tokens (
        token_hash BYTEA PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION,
        used_by TEXT
    )""",
    "CREATE SEQUENCE IF NOT EXISTS results_id_seq",
    """CREATE TABLE IF NOT EXISTS results (
        id BIGINT PRIMARY KEY,
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        envelope BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        acked_at DOUBLE PRECISION,
        UNIQUE (device_id, seq)
    )""",
    "CREATE INDEX IF NOT EXISTS results_pending ON results (device_id, id) WHERE acked_at IS NULL",
    # Pruning acked results walks this, oldest ack first (never a table scan); unacked results,
    # never pruned, are not in it. On an existing large table the first open builds it once.
    "CREATE INDEX IF NOT EXISTS results_acked ON results (acked_at) WHERE acked_at IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    )""",
    "INSERT INTO meta (key, value) VALUES ('registry_version', 0) ON CONFLICT DO NOTHING",
    """CREATE TABLE IF NOT EXISTS usage (
        call_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        day TEXT NOT NULL,
        reasoner TEXT NOT NULL,
        model TEXT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cache_write_tokens BIGINT NOT NULL,
        cache_read_tokens BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS usage_event ON usage (device_id, seq)",
    # One row per (event, day) charged: the first call for an event is the one whose row goes
    # in, which a unique key decides safely between concurrent workers without a lock.
    """CREATE TABLE IF NOT EXISTS usage_events (
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        day TEXT NOT NULL,
        PRIMARY KEY (device_id, seq, day)
    )""",
    # Running totals per (day, device) and per (day, '*'): a budget check is a point read.
    """CREATE TABLE IF NOT EXISTS usage_daily (
        day TEXT NOT NULL,
        device_id TEXT NOT NULL,
        calls BIGINT NOT NULL,
        events BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cache_write_tokens BIGINT NOT NULL,
        cache_read_tokens BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (day, device_id)
    )""",
    # What the operator may read of each result, sealed to the operator key (cloud/keys.py);
    # not pruned with the results. result_summaries held it in plaintext in development
    # databases before 2026-12-03: dropped, never migrated.
    "DROP TABLE IF EXISTS result_summaries",
    """CREATE TABLE IF NOT EXISTS sealed_summaries (
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        produced_at DOUBLE PRECISION NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        sealed BYTEA NOT NULL,
        PRIMARY KEY (device_id, seq)
    )""",
    "CREATE INDEX IF NOT EXISTS sealed_summaries_produced ON sealed_summaries (produced_at)",
    # Each device's latest heartbeat (metadata only; docs/protocol.md), replaced on each one.
    """CREATE TABLE IF NOT EXISTS device_heartbeats (
        device_id TEXT PRIMARY KEY,
        received_at DOUBLE PRECISION NOT NULL,
        body TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS provider_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        fix TEXT NOT NULL,
        worker TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
]

_SUMMARY_COLS = "device_id, seq, produced_at, received_at, sealed"


def _summary(row: Sequence[Any]) -> SealedSummary:
    d, s, produced, received, sealed = row
    return SealedSummary(str(d), int(s), float(produced), float(received), bytes(sealed))
# Training examples (cloud/training/examples.py), as in the SQLite store: one row per (event,
# model), features as little-endian float32 bytes and their shape, scores as JSON text.
EXAMPLES_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS examples (
        id BIGSERIAL PRIMARY KEY,
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        model TEXT NOT NULL,
        model_version TEXT NOT NULL,
        modality TEXT NOT NULL,
        features BYTEA NOT NULL,
        features_shape TEXT NOT NULL,
        scores TEXT NOT NULL,
        gate_label TEXT NOT NULL,
        teacher_label TEXT NOT NULL,
        target TEXT,
        teacher_confidence DOUBLE PRECISION NOT NULL,
        gate_correct BOOLEAN,
        reasoner TEXT NOT NULL,
        provisional BOOLEAN NOT NULL,
        weight DOUBLE PRECISION NOT NULL,
        captured_at DOUBLE PRECISION NOT NULL,
        reasoned_at DOUBLE PRECISION NOT NULL,
        group_name TEXT NOT NULL DEFAULT '',
        media_path TEXT,
        UNIQUE (device_id, seq, model)
    )""",
    "CREATE INDEX IF NOT EXISTS examples_model_time ON examples (model, reasoned_at)",
    "CREATE INDEX IF NOT EXISTS examples_device ON examples (device_id, model)",
    "CREATE INDEX IF NOT EXISTS examples_media ON examples (reasoned_at)"
    " WHERE media_path IS NOT NULL",
]
_EXAMPLE_SELECT = f"SELECT id, {', '.join(EXAMPLE_COLUMNS)} FROM examples"
MEDIA_BATCH = 500

_USAGE_SUMS = ("input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens")

_DEVICE_COLS = "device_id, sign_pk, box_pk, enrolled_at, revoked_at"

# Longest wait for a pooled connection. While PostgreSQL is down a request fails after this
# long (the ingest answers 5xx and the device retries) instead of hanging past the device's
# read timeout.
POOL_WAIT_S = 10.0


def _safe_dsn(dsn: str) -> str:
    """The DSN without its password (URL or key=value form), for logs and errors."""
    dsn = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)


def _device(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(row[0], bytes(row[1]), bytes(row[2]), row[3], row[4])


class PostgresStore(PostgresReleases):  # releases, groups, reports: postgres_releases.py
    """Store on PostgreSQL. Create with ``await PostgresStore.open(dsn=...)``."""

    def __init__(self, pool: Any, dsn: str) -> None:
        self._pool = pool
        self.dsn = _safe_dsn(dsn)

    @classmethod
    async def open(
        cls, *, dsn: str = "postgresql://postgres@127.0.0.1:5432/edgekeeper", pool_size: int = 10,
        connect_timeout_s: float = 10.0,
    ) -> PostgresStore:
        import psycopg
        from psycopg_pool import AsyncConnectionPool, PoolTimeout

        pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=max(1, pool_size), open=False, timeout=POOL_WAIT_S,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout_s))},
            name="edgekeeper-store",
        )
        store = cls(pool, dsn)
        try:
            # One direct connection first: a wrong DSN or a missing database fails at once with
            # libpq's own reason (the pool would only retry quietly until it timed out).
            conn = await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout_s)))
            try:
                await store._create_schema(conn)
            finally:
                await conn.close()
            await pool.open(wait=True, timeout=connect_timeout_s)
        except (PoolTimeout, psycopg.Error) as err:
            await pool.close()
            text = str(err).strip()
            detail = " ".join(ln.strip() for ln in text.splitlines()) or type(err).__name__
            raise ConfigError(
                f"cannot use PostgreSQL at {store.dsn}: {detail}",
                fix="start PostgreSQL and create the database (README 'Running the cloud': "
                    "createdb edgekeeper), or fix cloud.postgres_dsn / EDGEKEEPER_POSTGRES_DSN",
            ) from None
        except BaseException:
            await pool.close()
            raise
        return store

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection. PostgreSQL going away (OperationalError, PoolTimeout) becomes
        Unreachable, a RetryableError, here where it enters our code: the worker waits it out,
        the ingest answers 503."""
        with classified(f"PostgreSQL at {self.dsn}"):
            async with self._pool.connection() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def try_session_lock(self, key: int) -> AsyncIterator[bool]:
        """Hold PostgreSQL's session advisory lock ``key`` while inside, if no other session
        holds it (yields False then). The lock dies with the connection, so a crashed holder
        never leaves it taken (the worker's scheduled retrain: one worker of many)."""
        async with self._connection() as conn:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            got = bool((await cur.fetchone())[0])
            try:
                yield got
            finally:
                if got:
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    @staticmethod
    async def _create_schema(conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in (*SCHEMA, *EXAMPLES_SCHEMA, *RELEASES_SCHEMA):
                await conn.execute(statement)

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with self._connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._connection() as conn:
            cur = await conn.execute(sql, params)
            return list(await cur.fetchall())

    # registry ---------------------------------------------------------------------------

    async def enroll(
        self, *, token_hash: bytes, device_id: str, sign_pk: bytes, box_pk: bytes, now: float
    ) -> EnrollOutcome:
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT expires_at, used_at, used_by FROM tokens WHERE token_hash = %s"
                " FOR UPDATE",
                (token_hash,),
            )
            tok = await cur.fetchone()
            if tok is None:
                raise InvalidToken("the enrollment token is not known to this cloud")
            expires_at, used_at, used_by = tok
            cur = await conn.execute(
                f"SELECT {_DEVICE_COLS} FROM devices WHERE device_id = %s", (device_id,)
            )
            row = await cur.fetchone()
            existing = _device(row) if row is not None else None
            repeated = check_enrollment(
                existing=existing, used_at=used_at, used_by=used_by, expires_at=expires_at,
                device_id=device_id, sign_pk=sign_pk, box_pk=box_pk, now=now,
            )
            if repeated is not None:
                return repeated
            await conn.execute(
                "UPDATE tokens SET used_at = %s, used_by = %s WHERE token_hash = %s",
                (now, device_id, token_hash),
            )
            if existing is not None:
                return EnrollOutcome.REPEATED
            cur = await conn.execute(
                "INSERT INTO devices (device_id, sign_pk, box_pk, enrolled_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (device_id) DO NOTHING",
                (device_id, sign_pk, box_pk, now),
            )
            if cur.rowcount != 1:
                # Taken a moment ago through another token: refuse, and the rollback leaves
                # this token unused.
                raise DeviceExists(f"device id {device_id!r} is already enrolled")
            await conn.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'registry_version'"
            )
            return EnrollOutcome.ENROLLED

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        row = await self._fetchone(
            f"SELECT {_DEVICE_COLS} FROM devices WHERE device_id = %s", (device_id,)
        )
        return _device(row) if row is not None else None

    async def list_devices(self) -> list[DeviceRecord]:
        rows = await self._fetchall(f"SELECT {_DEVICE_COLS} FROM devices ORDER BY device_id")
        return [_device(r) for r in rows]

    async def revoke(self, device_id: str, *, now: float) -> bool:
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE devices SET revoked_at = %s WHERE device_id = %s AND revoked_at IS NULL",
                (now, device_id),
            )
            if cur.rowcount != 1:
                return False
            await conn.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'registry_version'"
            )
            return True

    async def registry_version(self) -> int:
        row = await self._fetchone("SELECT value FROM meta WHERE key = 'registry_version'")
        return int(row[0])

    # tokens -----------------------------------------------------------------------------

    async def add_token(self, *, token_hash: bytes, created_at: float, expires_at: float) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO tokens (token_hash, created_at, expires_at) VALUES (%s, %s, %s)",
                (token_hash, created_at, expires_at),
            )

    # results ----------------------------------------------------------------------------

    async def put_result(self, *, device_id: str, seq: int, envelope: bytes, now: float,
                         summary: SealedSummary | None = None) -> int:
        async with self._connection() as conn:
            # Ids in commit order (module docstring), in one round trip: a single statement in
            # autocommit is its own transaction; its CTE takes the lock before nextval() is
            # drawn (the CTE row is produced before the projection that calls nextval), and
            # the lock is held until that transaction commits. The summary goes in with the
            # result in the same statement, and only when the result is new.
            insert = ("INSERT INTO results (id, device_id, seq, envelope, created_at)"
                      " SELECT nextval('results_id_seq'), %s, %s, %s, %s FROM ordered"
                      " ON CONFLICT (device_id, seq) DO NOTHING RETURNING id")
            params: tuple[Any, ...] = (_RESULTS_LOCK, device_id, seq, envelope, now)
            if summary is None:
                sql = f"WITH ordered AS (SELECT pg_advisory_xact_lock(%s)) {insert}"
            else:
                s = summary
                sql = (f"WITH ordered AS (SELECT pg_advisory_xact_lock(%s)), stored AS ({insert}),"
                       f" noted AS (INSERT INTO sealed_summaries ({_SUMMARY_COLS})"
                       " SELECT %s, %s, %s, %s, %s FROM stored"
                       " ON CONFLICT (device_id, seq) DO NOTHING)"
                       " SELECT id FROM stored")
                params += (s.device_id, s.seq, s.produced_at, s.received_at, s.sealed)
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            if row is None:  # stored before (a redelivered event): keep the first
                cur = await conn.execute(
                    "SELECT id FROM results WHERE device_id = %s AND seq = %s", (device_id, seq)
                )
                row = await cur.fetchone()
            return int(row[0])

    async def results_after(self, device_id: str, cursor: int, limit: int) -> list[StoredResult]:
        rows = await self._fetchall(
            "SELECT id, device_id, seq, envelope, created_at FROM results"
            " WHERE device_id = %s AND id > %s AND acked_at IS NULL ORDER BY id LIMIT %s",
            (device_id, cursor, limit),
        )
        return [StoredResult(int(i), d, int(s), bytes(e), c) for i, d, s, e, c in rows]

    async def ack_results(self, device_id: str, ids: Sequence[int], *, now: float) -> int:
        if not ids:
            return 0
        async with self._connection() as conn:
            cur = await conn.execute(
                "UPDATE results SET acked_at = %s WHERE device_id = %s"
                " AND id = ANY(%s::bigint[]) AND acked_at IS NULL",
                (now, device_id, list({int(i) for i in ids})),
            )
            return int(cur.rowcount)

    async def results_version(self) -> int:
        row = await self._fetchone("SELECT COALESCE(MAX(id), 0) FROM results")
        return int(row[0])

    async def results_since(self, version: int) -> ResultsSince:
        # A range of the primary key: only the rows stored since `version`. Ids become visible
        # in increasing order (put_result's advisory lock, module docstring), so a result this
        # misses has an id above the newest one returned and the next call finds it.
        rows = await self._fetchall(
            "SELECT device_id, MAX(id) FROM results WHERE id > %s GROUP BY device_id",
            (version,),
        )
        return ResultsSince(max((int(i) for _, i in rows), default=version),
                            frozenset(str(d) for d, _ in rows))

    async def has_result(self, device_id: str, seq: int) -> bool:
        row = await self._fetchone(
            "SELECT 1 FROM results WHERE device_id = %s AND seq = %s", (device_id, seq)
        )
        return row is not None

    async def prune_results(self, *, acked_before: float, limit: int) -> int:
        # Batched: each call is one short autocommit transaction. Ids come from a sequence and
        # are never reused, so a pruned id never comes back under a device's cursor.
        async with self._connection() as conn:
            cur = await conn.execute(
                "DELETE FROM results WHERE id IN (SELECT id FROM results"
                " WHERE acked_at < %s ORDER BY acked_at LIMIT %s)",
                (acked_before, max(0, limit)),
            )
            return int(cur.rowcount)

    # the operator's view ------------------------------------------------------------------

    async def result_summaries(self, *, device_id: str | None = None, since: float = 0.0,
                               limit: int = 100) -> list[SealedSummary]:
        where = "produced_at >= %s"
        args: list[Any] = [since]
        if device_id is not None:
            where += " AND device_id = %s"
            args.append(device_id)
        rows = await self._fetchall(
            f"SELECT {_SUMMARY_COLS} FROM sealed_summaries WHERE {where}"
            " ORDER BY produced_at DESC, device_id, seq DESC LIMIT %s",
            (*args, max(0, limit)),
        )
        return [_summary(r) for r in reversed(rows)]

    async def device_activity(self) -> list[DeviceActivity]:
        devices = await self.list_devices()
        counts = {d: (int(n), seen) for d, n, seen in await self._fetchall(
            "SELECT device_id, COUNT(*), MAX(received_at) FROM sealed_summaries"
            " GROUP BY device_id")}
        latest = {r[0]: _summary(r) for r in await self._fetchall(
            f"SELECT DISTINCT ON (device_id) {_SUMMARY_COLS} FROM sealed_summaries"
            " ORDER BY device_id, produced_at DESC")}
        beats = {d: (at, body) for d, at, body in await self._fetchall(
            "SELECT device_id, received_at, body FROM device_heartbeats")}
        return [DeviceActivity(d, counts.get(d.device_id, (0, None))[0],
                               counts.get(d.device_id, (0, None))[1],
                               latest.get(d.device_id),
                               *beats.get(d.device_id, (None, None))) for d in devices]

    async def put_heartbeat(self, device_id: str, *, received_at: float, body: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO device_heartbeats (device_id, received_at, body) VALUES (%s, %s, %s)"
                " ON CONFLICT (device_id) DO UPDATE SET received_at = excluded.received_at,"
                " body = excluded.body", (device_id, received_at, body))

    async def put_provider_state(self, state: ProviderState) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO provider_state (id, state, reason, fix, worker, updated_at)"
                " VALUES (1, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                " state = excluded.state, reason = excluded.reason, fix = excluded.fix,"
                " worker = excluded.worker, updated_at = excluded.updated_at",
                (state.state, state.reason, state.fix, state.worker, state.updated_at),
            )

    async def provider_state(self) -> ProviderState | None:
        row = await self._fetchone(
            "SELECT state, reason, fix, worker, updated_at FROM provider_state WHERE id = 1")
        if row is None:
            return None
        return ProviderState(row[0], row[1], row[2], row[3], float(row[4]))

    # usage ------------------------------------------------------------------------------

    async def record_usage(self, record: UsageRecord) -> bool:
        r = record
        sums = ", ".join(_USAGE_SUMS)
        update = ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in _USAGE_SUMS)
        async with self._connection() as conn:
            # One statement (one transaction, one round trip): the call row, then, only if it
            # is new, the event row (new only for the event's first call that day) and both
            # running totals, the device's row before '*' in every transaction (no deadlock).
            cur = await conn.execute(
                "WITH call AS ("
                f" INSERT INTO usage (call_id, device_id, seq, day, reasoner, model, {sums},"
                " cost_usd, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (call_id) DO NOTHING RETURNING 1"
                "), first AS ("
                " INSERT INTO usage_events (device_id, seq, day) SELECT %s, %s, %s FROM call"
                " ON CONFLICT DO NOTHING RETURNING 1"
                "), totals AS ("
                f" INSERT INTO usage_daily (day, device_id, calls, events, {sums}, cost_usd)"
                " SELECT %s, w.who, 1, (SELECT count(*) FROM first), %s, %s, %s, %s, %s"
                " FROM call, (VALUES (1, %s::text), (2, '*')) AS w(n, who) ORDER BY w.n"
                " ON CONFLICT (day, device_id) DO UPDATE SET calls = usage_daily.calls + 1,"
                " events = usage_daily.events + excluded.events,"
                f" {update}, cost_usd = usage_daily.cost_usd + excluded.cost_usd"
                " RETURNING 1"
                ") SELECT (SELECT count(*) FROM call), (SELECT count(*) FROM totals)",
                (r.call_id, r.device_id, r.seq, r.day, r.reasoner, r.model, r.input_tokens,
                 r.output_tokens, r.cache_write_tokens, r.cache_read_tokens, r.cost_usd,
                 r.created_at,
                 r.device_id, r.seq, r.day,
                 r.day, r.input_tokens, r.output_tokens, r.cache_write_tokens,
                 r.cache_read_tokens, r.cost_usd, r.device_id),
            )
            row = await cur.fetchone()
            return row is not None and int(row[0]) == 1

    async def usage_totals(self, *, day: str, device_id: str | None = None) -> UsageTotals:
        row = await self._fetchone(
            f"SELECT calls, {' + '.join(_USAGE_SUMS)}, cost_usd FROM usage_daily"
            " WHERE day = %s AND device_id = %s",
            (day, "*" if device_id is None else device_id),
        )
        if row is None:
            return UsageTotals(0, 0, 0.0)
        return UsageTotals(int(row[0]), int(row[1]), float(row[2]))

    async def usage_by_day(self, *, since_day: str,
                           device_id: str | None = None) -> list[UsageRow]:
        sql = (f"SELECT day, device_id, calls, events, {', '.join(_USAGE_SUMS)}, cost_usd"
               " FROM usage_daily WHERE day >= %s AND device_id ")
        args: tuple[str, ...] = (since_day,)
        if device_id is None:
            sql += "<> '*'"
        else:
            sql += "= %s"
            args += (device_id,)
        rows = await self._fetchall(sql + " ORDER BY day, device_id", args)
        # Columns in UsageRow's order: day, device_id, calls, events, the _USAGE_SUMS, cost.
        return [UsageRow(d, dev, int(calls), int(events), int(i), int(o), int(cw), int(cr),
                         float(cost))
                for d, dev, calls, events, i, o, cw, cr, cost in rows]

    # training examples ------------------------------------------------------------------

    async def add_example(self, example: TrainingExample) -> int | None:
        row = await self._fetchone(
            f"INSERT INTO examples ({', '.join(EXAMPLE_COLUMNS)})"
            f" VALUES ({', '.join(['%s'] * len(EXAMPLE_COLUMNS))})"
            " ON CONFLICT (device_id, seq, model) DO NOTHING RETURNING id",
            example_row(example),
        )
        return None if row is None else int(row[0])

    async def examples(self, *, model: str, scope: Scope, since: float | None = None,
                       until: float | None = None, limit: int = 100_000
                       ) -> list[TrainingExample]:
        where, params = examples_filter(model, scope, since, until)
        sql = f"{_EXAMPLE_SELECT} WHERE {where.replace('?', '%s')}"
        rows = await self._fetchall(sql + " ORDER BY reasoned_at, id LIMIT %s",
                                    (*params, limit))
        return [example_of_row(r) for r in rows]

    async def examples_by_ids(self, ids: Sequence[int]) -> list[TrainingExample]:
        rows = await self._fetchall(f"{_EXAMPLE_SELECT} WHERE id = ANY(%s::bigint[])"
                                    " ORDER BY id", (sorted({int(i) for i in ids}),))
        return [example_of_row(r) for r in rows]

    async def forget_media(self, *, before: float) -> int:
        total = 0
        while rows := await self._fetchall(
                "SELECT id, media_path FROM examples WHERE media_path IS NOT NULL"
                " AND reasoned_at < %s ORDER BY reasoned_at LIMIT %s", (before, MEDIA_BATCH)):
            # Files first, then the paths (as the SQLite store: never a file no row names).
            await asyncio.to_thread(delete_media, [p for _, p in rows])
            async with self._connection() as conn:
                await conn.execute("UPDATE examples SET media_path = NULL"
                                   " WHERE id = ANY(%s::bigint[])", ([int(i) for i, _ in rows],))
            total += len(rows)
        return total

    async def example_counts(self, *, model: str | None, scope: Scope) -> list[ExampleCount]:
        where, args = scope_filter(scope)
        if model is not None:
            where += " AND model = ?"
            args += (model,)
        rows = await self._fetchall(
            "SELECT model, device_id, reasoner, target, gate_correct, provisional, COUNT(*),"
            " COUNT(*) FILTER (WHERE weight > 0) FROM examples WHERE "
            + where.replace("?", "%s") + " GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3", args)
        return [ExampleCount(m, d, r, t, g, bool(p), int(n), int(w))
                for m, d, r, t, g, p, n, w in rows]

    async def count_new_examples(self, *, model: str, scope: Scope, after: float | None
                                 ) -> tuple[int, float | None]:
        where, params = examples_filter(model, scope, None, None)
        if after is not None:
            where, params = where + " AND reasoned_at > ?", (*params, after)
        usable, newest = await self._fetchone(
            "SELECT COUNT(*) FILTER (WHERE target IS NOT NULL AND weight > 0),"
            " MAX(reasoned_at) FROM examples WHERE " + where.replace("?", "%s"), params)
        return int(usable), None if newest is None else float(newest)

    async def ping(self) -> None:
        await self._fetchone("SELECT 1")

    async def close(self) -> None:
        await self._pool.close()
