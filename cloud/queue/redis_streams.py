"""The shared queue: a Redis Stream with one consumer group, for ingest processes and workers on
several machines. The contract is cloud/queue/base.py; why each piece is built as it is (Lua
scripts, fsync'd AOF, per-lease deadlines, receipts, dead letters, replication) is in
docs/architecture.md.

Every key is ``{prefix}:name`` (one Redis Cluster hash slot, a prefix per deployment); times in
the sorted sets are microseconds of the Redis server's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from edgekeeper.cloud.queue.base import (
    DEFAULT_SEEN_RETENTION_S,
    DeadLetter,
    EnqueueStatus,
    Lease,
    QueuedEvent,
    QueueStats,
)
from edgekeeper.errors import ConfigError, Unreachable
from edgekeeper.log import get_logger

log = get_logger(__name__)

GROUP = "workers"
# Connections one process keeps to Redis at most.
MAX_CONNECTIONS = 32
# Consumers (one per worker process ever started) holding nothing and idle this long are removed
# at open, so XINFO CONSUMERS stays readable after many restarts.
STALE_CONSUMER_MS = 86_400_000

# Shared Lua pieces. KEYS are always passed in this order (see RedisStreamsQueue._keys), so each
# script can use any of them.
_K = """
local K_EVENTS, K_DUE, K_HOLDER, K_ERRORS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_DEAD, K_DEADIDX, K_SEEN, K_SEENEXP = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_FREE = KEYS[9]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function fields(list)
  local f = {}
  for i = 1, #list, 2 do f[list[i]] = list[i + 1] end
  return f
end

local function forget_later(key, retention_us)
  redis.call('ZADD', K_SEENEXP, now + retention_us, key)
end

local function prune_seen()
  local old = redis.call('ZRANGEBYSCORE', K_SEENEXP, '-inf', now, 'LIMIT', 0, 16)
  for _, key in ipairs(old) do
    redis.call('HDEL', K_SEEN, key)
    redis.call('ZREM', K_SEENEXP, key)
  end
end

-- Move entry `id` (fields `f`) to the dead-letter stream.
local function bury(group, id, f, attempts, reason, retention_us)
  local did = redis.call('XADD', K_DEAD, '*', 'd', f.d, 's', f.s, 'h', f.h, 'e', f.e, 'r', f.r,
                         'k', f.k, 'a', attempts, 'why', reason, 't', now)
  redis.call('HSET', K_DEADIDX, f.k, did)
  redis.call('XACK', K_EVENTS, group, id)
  redis.call('XDEL', K_EVENTS, id)
  redis.call('ZREM', K_DUE, id)
  redis.call('HDEL', K_HOLDER, id)
  redis.call('HDEL', K_ERRORS, id)
  redis.call('HDEL', K_FREE, id)
  forget_later(f.k, retention_us)
end

local function deliveries(group, id)
  local p = redis.call('XPENDING', K_EVENTS, group, id, id, 1)
  if #p == 0 then return nil end
  return tonumber(p[1][4])
end

-- Deliveries that count as attempts: all of them but the released ones.
local function charged(id, n)
  return n - tonumber(redis.call('HGET', K_FREE, id) or '0')
end
"""

# ARGV: key, payload hash, device, seq, envelope, received_at -> 0 queued, 1 duplicate, 2 conflict
_ENQUEUE = _K + """
local old = redis.call('HGET', K_SEEN, ARGV[1])
if old then
  if old == ARGV[2] then return 1 end
  return 2
end
redis.call('HSET', K_SEEN, ARGV[1], ARGV[2])
redis.call('XADD', K_EVENTS, '*', 'd', ARGV[3], 's', ARGV[4], 'h', ARGV[2], 'e', ARGV[5],
           'r', ARGV[6], 'k', ARGV[1])
prune_seen()
return 0
"""

# ARGV: group, consumer, count, visibility_us, max_attempts, retention_us
# -> {now_us, until_us, {id, deliveries, attempts, d, s, h, e, r}...}
_LEASE = _K + """
local group, consumer = ARGV[1], ARGV[2]
local count, deadline = tonumber(ARGV[3]), now + tonumber(ARGV[4])
local max_attempts, retention = tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {now, deadline}
local n_out = 0

local function hand_out(id, n, attempts, f)
  redis.call('HSET', K_HOLDER, id, id .. ':' .. n)
  redis.call('ZADD', K_DUE, deadline, id)
  table.insert(out, {id, n, attempts, f.d, f.s, f.h, f.e, f.r})
  n_out = n_out + 1
end

-- 1. Expired leases and nacked events whose delay is over. Strictly before `now`: an entry
-- handed out in this call gets a deadline >= now, so it is never picked twice here.
while n_out < count do
  local due = redis.call('ZRANGEBYSCORE', K_DUE, '-inf', '(' .. now, 'LIMIT', 0, count - n_out)
  if #due == 0 then break end
  for _, id in ipairs(due) do
    local n = deliveries(group, id)
    local entry = redis.call('XRANGE', K_EVENTS, id, id)
    if n == nil or #entry == 0 then
      -- Not pending any more (cannot happen through this module; be robust to hand edits).
      redis.call('ZREM', K_DUE, id)
      redis.call('HDEL', K_HOLDER, id)
      redis.call('HDEL', K_ERRORS, id)
      redis.call('HDEL', K_FREE, id)
    elseif charged(id, n) >= max_attempts then
      -- Its deliveries all ended without ack, or its last nack came with no attempts left
      -- (then the nack buried it already); a poison event that kills its workers ends here.
      local a = charged(id, n)
      local why = redis.call('HGET', K_ERRORS, id)
      if not why then why = 'lease expired ' .. a .. ' times without ack' end
      bury(group, id, fields(entry[1][2]), a, why, retention)
    else
      local claimed = redis.call('XCLAIM', K_EVENTS, group, consumer, 0, id)
      if #claimed > 0 then hand_out(id, n + 1, charged(id, n) + 1, fields(claimed[1][2])) end
    end
  end
end

-- 2. Events never delivered, oldest first.
if n_out < count then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count - n_out,
                       'STREAMS', K_EVENTS, '>')
  if r then
    for _, entry in ipairs(r[1][2]) do hand_out(entry[1], 1, 1, fields(entry[2])) end
  end
end
return out
"""

# ARGV: group, id, receipt, key, retention_us -> 1 acked, 0 lease lost
_ACK = _K + """
if redis.call('HGET', K_HOLDER, ARGV[2]) ~= ARGV[3] then return 0 end
redis.call('XACK', K_EVENTS, ARGV[1], ARGV[2])
redis.call('XDEL', K_EVENTS, ARGV[2])
redis.call('ZREM', K_DUE, ARGV[2])
redis.call('HDEL', K_HOLDER, ARGV[2])
redis.call('HDEL', K_ERRORS, ARGV[2])
redis.call('HDEL', K_FREE, ARGV[2])
forget_later(ARGV[4], tonumber(ARGV[5]))
prune_seen()
return 1
"""

# ARGV: group, id, receipt, consumer, visibility_us -> 1 extended, 0 lease lost
_EXTEND = _K + """
local group, id, consumer = ARGV[1], ARGV[2], ARGV[4]
if redis.call('HGET', K_HOLDER, id) ~= ARGV[3] then return 0 end
local p = redis.call('XPENDING', K_EVENTS, group, id, id, 1)
if #p == 0 or p[1][2] ~= consumer then return 0 end
redis.call('XCLAIM', K_EVENTS, group, consumer, 0, id, 'JUSTID')
redis.call('ZADD', K_DUE, now + tonumber(ARGV[5]), id)
return 1
"""

# ARGV: group, id, receipt, reason, delay_us, max_attempts, retention_us, bury_now
# -> 1 will be redelivered, 2 dead-lettered, 0 lease lost
_NACK = _K + """
local group, id = ARGV[1], ARGV[2]
if redis.call('HGET', K_HOLDER, id) ~= ARGV[3] then return 0 end
local n = deliveries(group, id)
local entry = redis.call('XRANGE', K_EVENTS, id, id)
if n == nil or #entry == 0 then return 0 end
local attempts = charged(id, n)
if ARGV[8] == '1' or attempts >= tonumber(ARGV[6]) then
  bury(group, id, fields(entry[1][2]), attempts, ARGV[4], tonumber(ARGV[7]))
  return 2
end
redis.call('HDEL', K_HOLDER, id)
redis.call('HSET', K_ERRORS, id, ARGV[4])
redis.call('ZADD', K_DUE, now + tonumber(ARGV[5]), id)
return 1
"""

# ARGV: group, id, receipt, delay_us -> 1 released, 0 lease lost
_RELEASE = _K + """
local group, id = ARGV[1], ARGV[2]
if redis.call('HGET', K_HOLDER, id) ~= ARGV[3] then return 0 end
if deliveries(group, id) == nil then return 0 end
-- The delivery just had is not charged; the error of the last real failure stays.
redis.call('HINCRBY', K_FREE, id, 1)
redis.call('HDEL', K_HOLDER, id)
redis.call('ZADD', K_DUE, now + tonumber(ARGV[4]), id)
return 1
"""

# ARGV: dead entry id -> the key requeued, or false
_REQUEUE = _K + """
local entry = redis.call('XRANGE', K_DEAD, ARGV[1], ARGV[1])
if #entry == 0 then return false end
local f = fields(entry[1][2])
redis.call('XADD', K_EVENTS, '*', 'd', f.d, 's', f.s, 'h', f.h, 'e', f.e, 'r', f.r, 'k', f.k)
redis.call('XDEL', K_DEAD, ARGV[1])
if redis.call('HGET', K_DEADIDX, f.k) == ARGV[1] then redis.call('HDEL', K_DEADIDX, f.k) end
-- Queued again: its dedupe key is kept for as long as it waits.
redis.call('HSET', K_SEEN, f.k, f.h)
redis.call('ZREM', K_SEENEXP, f.k)
return f.k
"""

# ARGV: group -> {ready, leased, dead, seen}
_STATS = _K + """
local pending = redis.call('XPENDING', K_EVENTS, ARGV[1])[1]
local ready = redis.call('XLEN', K_EVENTS) - pending
ready = ready + redis.call('ZCOUNT', K_DUE, '-inf', now)
local leased = 0
for _, id in ipairs(redis.call('HKEYS', K_HOLDER)) do
  local at = redis.call('ZSCORE', K_DUE, id)
  if at and tonumber(at) > now then leased = leased + 1 end
end
return {ready, leased, redis.call('XLEN', K_DEAD), redis.call('HLEN', K_SEEN)}
"""

_STATUS = {0: EnqueueStatus.QUEUED, 1: EnqueueStatus.DUPLICATE, 2: EnqueueStatus.CONFLICT}


class QueueBackendDown(Unreachable):
    """Redis did not answer; the caller retries (the ingest answers 503, the worker waits)."""


def _safe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStreamsQueue:
    """EventQueue on a Redis Stream. Create with ``await RedisStreamsQueue.open(url=...)``."""

    def __init__(
        self,
        client: Any,
        *,
        url: str,
        prefix: str = "edgekeeper",
        max_attempts: int = 5,
        seen_retention_s: float = DEFAULT_SEEN_RETENTION_S,
    ) -> None:
        self.max_attempts = max_attempts
        self.seen_retention_s = seen_retention_s
        self.url = _safe_url(url)
        self.prefix = prefix
        self._r = client
        tag = "{" + prefix + "}"
        self._keys = [f"{tag}:{name}" for name in (
            "events", "due", "holder", "errors", "dead", "dead:index", "seen", "seen:expiry",
            "free")]
        self._lua_enqueue = client.register_script(_ENQUEUE)
        self._lua_lease = client.register_script(_LEASE)
        self._lua_ack = client.register_script(_ACK)
        self._lua_extend = client.register_script(_EXTEND)
        self._lua_nack = client.register_script(_NACK)
        self._lua_release = client.register_script(_RELEASE)
        self._lua_requeue = client.register_script(_REQUEUE)
        self._lua_stats = client.register_script(_STATS)

    @property
    def stream(self) -> str:
        return self._keys[0]

    @property
    def _retention_us(self) -> int:
        return int(self.seen_retention_s * 1e6)

    @classmethod
    async def open(
        cls,
        *,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "edgekeeper",
        max_attempts: int = 5,
        seen_retention_s: float = DEFAULT_SEEN_RETENTION_S,
        fsync_check: Literal["refuse", "warn"] = "refuse",
    ) -> RedisStreamsQueue:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        try:
            # A blocking pool: a burst of uploads waits for a connection instead of failing,
            # and one process never opens more than MAX_CONNECTIONS to Redis.
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=30, decode_responses=False,
                socket_connect_timeout=10.0, health_check_interval=30,
            )
            client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        except ValueError as err:
            raise ConfigError(
                f"cloud.redis_url {_safe_url(url)!r} is not a Redis URL: {err}",
                fix="use redis://[:password@]host:port/db, rediss://... or unix:///path",
            ) from None
        queue = cls(client, url=url, prefix=prefix, max_attempts=max_attempts,
                    seen_retention_s=seen_retention_s)
        try:
            await queue._check_durability(fsync_check)
            await queue._ensure_group()
            await queue._prune_consumers()
        except RedisError as err:
            await client.aclose()
            raise ConfigError(
                f"cannot use Redis at {queue.url}: {err}",
                fix="start redis-server there (see README 'Running the cloud'), or fix "
                    "cloud.redis_url / EDGEKEEPER_REDIS_URL",
            ) from None
        except BaseException:
            await client.aclose()
            raise
        return queue

    async def _check_durability(self, mode: str) -> None:
        from redis.exceptions import ResponseError

        try:
            cfg = await self._r.config_get("append*")
        except ResponseError as err:  # CONFIG disabled or renamed (many managed services)
            problem = f"cannot read its persistence settings ({err})"
        else:
            aof = _text(cfg.get(b"appendonly", cfg.get("appendonly", b"")))
            fsync = _text(cfg.get(b"appendfsync", cfg.get("appendfsync", b"")))
            if aof == "yes" and fsync == "always":
                return
            problem = f"it runs with appendonly={aof or '?'} appendfsync={fsync or '?'}"
        message = (f"Redis at {self.url}: {problem}; an event answered QUEUED could be lost "
                   "if Redis or its machine crashes")
        fix = ("run redis-server with --appendonly yes --appendfsync always (or CONFIG SET "
               "appendonly yes + CONFIG SET appendfsync always, then CONFIG REWRITE); or set "
               "cloud.redis_fsync_check = \"warn\" to accept the risk")
        if mode == "refuse":
            raise ConfigError(message, fix=fix)
        log.warning("queue.redis_not_durable", error=message, fix=fix)

    async def _ensure_group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            # "0": a group created after events were added (a restore) still delivers them.
            await self._r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def _prune_consumers(self) -> None:
        for c in await self._r.xinfo_consumers(self.stream, GROUP):
            name = c.get("name", c.get(b"name"))
            if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > STALE_CONSUMER_MS:
                await self._r.xgroup_delconsumer(self.stream, GROUP, name)

    async def _run(self, script: Any, args: Sequence[Any]) -> Any:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            try:
                return await script(keys=self._keys, args=list(args))
            except ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                # The stream was deleted under us (FLUSHDB, a restore): make it again.
                await self._ensure_group()
                return await script(keys=self._keys, args=list(args))
        except (RedisConnectionError, RedisTimeoutError) as err:
            raise QueueBackendDown(f"Redis at {self.url} did not answer: {err}",
                                   fix="check that redis-server is running and reachable") from err

    # --- the EventQueue protocol ------------------------------------------------------

    async def enqueue(self, event: QueuedEvent) -> EnqueueStatus:
        code = await self._run(self._lua_enqueue, [
            event.key, event.payload_hash, event.device_id, event.seq, event.envelope,
            repr(float(event.received_at)),
        ])
        return _STATUS[int(code)]

    async def lease(self, consumer: str, *, count: int, visibility_s: float) -> list[Lease]:
        if count <= 0:
            return []
        out = await self._run(self._lua_lease, [
            GROUP, consumer, int(count), int(max(0.0, visibility_s) * 1e6), self.max_attempts,
            self._retention_us,
        ])
        until = int(out[1]) / 1e6
        leases = []
        for entry_id, n, attempts, dev, seq, phash, env, received in out[2:]:
            eid = _text(entry_id)
            event = QueuedEvent(_text(dev), int(seq), bytes(phash), bytes(env), float(received))
            leases.append(Lease(f"{eid}:{int(n)}", event, int(attempts), consumer, until))
        return leases

    @staticmethod
    def _entry_id(lease: Lease) -> str:
        return lease.receipt.rsplit(":", 1)[0]

    async def ack(self, lease: Lease) -> bool:
        done = await self._run(self._lua_ack, [
            GROUP, self._entry_id(lease), lease.receipt, lease.event.key, self._retention_us,
        ])
        return int(done) == 1

    async def extend(self, lease: Lease, *, visibility_s: float) -> bool:
        done = await self._run(self._lua_extend, [
            GROUP, self._entry_id(lease), lease.receipt, lease.consumer,
            int(max(0.0, visibility_s) * 1e6),
        ])
        return int(done) == 1

    async def _nack(self, lease: Lease, reason: str, delay_s: float, bury: bool) -> int:
        return int(await self._run(self._lua_nack, [
            GROUP, self._entry_id(lease), lease.receipt, reason[:2000],
            int(max(0.0, delay_s) * 1e6), self.max_attempts, self._retention_us,
            "1" if bury else "0",
        ]))

    async def nack(self, lease: Lease, *, reason: str, delay_s: float = 0.0) -> bool:
        return await self._nack(lease, reason, delay_s, bury=False) == 1

    async def release(self, lease: Lease, *, delay_s: float = 0.0) -> bool:
        done = await self._run(self._lua_release, [
            GROUP, self._entry_id(lease), lease.receipt, int(max(0.0, delay_s) * 1e6),
        ])
        return int(done) == 1

    async def dead_letter(self, lease: Lease, *, reason: str) -> bool:
        return await self._nack(lease, reason, 0.0, bury=True) == 2

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = await self._r.xrange(self._keys[4], count=max(1, limit))
        return [_dead(fields) for _id, fields in rows]

    async def requeue_dead(self, keys: Sequence[str] | None = None) -> list[str]:
        if keys is None:
            ids = [_text(i) for i, _f in await self._r.xrange(self._keys[4])]
        else:
            found = await self._r.hmget(self._keys[5], list(keys)) if keys else []
            ids = [_text(i) for i in found if i is not None]
        moved = []
        for dead_id in ids:
            key = await self._run(self._lua_requeue, [dead_id])
            if key:
                moved.append(_text(key))
        return moved

    async def stats(self) -> QueueStats:
        ready, leased, dead, seen = await self._run(self._lua_stats, [GROUP])
        # Entries leave the stream when acked or buried (XDEL), so the first one left is the
        # oldest still waiting or leased; its ``r`` field is when the ingest received it.
        first = await self._r.xrange(self.stream, count=1)
        oldest = float(first[0][1][b"r"]) if first else None
        return QueueStats(ready=int(ready), leased=int(leased), dead=int(dead), seen=int(seen),
                          oldest_received_at=oldest)

    async def keys(self) -> list[tuple[str, int]]:
        """Every (device_id, seq) waiting or leased, in order (for tests and inspection)."""
        rows = await self._r.xrange(self.stream)
        return [(_text(f[b"d"]), int(f[b"s"])) for _i, f in rows]

    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()

    async def delete_everything(self) -> int:
        """Remove every key of this prefix (tests; a deployment being torn down)."""
        return int(await self._r.delete(*self._keys))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dead(f: dict[bytes, bytes]) -> DeadLetter:
    event = QueuedEvent(_text(f[b"d"]), int(f[b"s"]), bytes(f[b"h"]), bytes(f[b"e"]),
                        float(f[b"r"]))
    return DeadLetter(event, int(f[b"a"]), _text(f[b"why"]), int(f[b"t"]) / 1e6)

