"""The newest page of each chat, in Redis, as ready JSON.

Layout (``P`` is the key prefix, ``CHATD_REDIS_PREFIX``, default
``chatd:<database name>``; the ``{chat:ID}`` hash tag keeps a chat's keys in
one Redis Cluster slot):

    P:{chat:ID}:meta   HASH  version, last_seq, complete
    P:{chat:ID}:rows   LIST  the newest ``CACHE_ROWS`` messages as JSON,
                             tombstones included, ascending and contiguous by seq
    P:{chat:ID}:pages  HASH  pages already built from the rows, by
                             "<limit>:<include_deleted 0|1>", each
                             "<version>:<has_more 0|1>:<messages joined by commas>"

A page is built from the rows by a Lua script the first time it is asked
for, and then read with a plain HGET: returning a 12 KB page from Lua costs
Redis ~60 µs (copying the rows into Lua, joining them, copying the result
out), an HGET of the same page ~3 µs. Every script that changes the rows
deletes the chat's pages in the same atomic step, so a stored page is always
built from the rows as they are, and carries their version. The price: the
first read of a page after a write takes two round trips (the HGET that
misses, then the script), where the script alone took one.

Coherence comes from PostgreSQL, not from invalidation. Every write to a
chat's messages bumps ``chats.version`` in the same statement, and the cached
page carries the version it was built at. A reader fetches the chat's version
(it needs the access check anyway, run in parallel with the cache read) and
serves the cached rows only when the two are equal. So a reader never sees a
page older than its own PostgreSQL snapshot, whatever Redis missed: a lost
update, an outage, a process killed between commit and cache write.

Writers keep the page warm by applying their change in place when the cached
page is at exactly the previous version (a Lua script each, so it is atomic),
and drop it otherwise; the next reader refills it from one snapshot.

Redis trouble never fails a request: every call is bounded by
``REDIS_TIMEOUT``, and the first timeout opens the breaker shared by every use
of Redis (chatd.redishealth): the cache is then off (reads from PostgreSQL,
writes not applied) until a probe hears Redis again. A page written while it
was off is simply older than PostgreSQL, and never served.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from . import autopipe, config, redishealth

log = logging.getLogger("chatd.cache")

# The newest page, built in Redis. ARGV: limit, include_deleted (0|1).
# Walks the window from the newest row, keeps up to limit + 1 rows (skipping
# tombstones unless asked for them: orjson writes "deleted" last and escapes
# every quote inside strings, so this suffix marks a tombstone and nothing
# else), and returns them joined with commas, ready to go between [ and ].
# Reply: false on a miss; {version, -1} when the window cannot answer (too
# many tombstones in it and older messages exist); else {version, has_more, rows},
# which is also stored in the pages hash under ARGV[3] (while it holds fewer
# than ARGV[4] pages), to expire with the meta hash.
_READ = """
local m = redis.call('HMGET', KEYS[1], 'version', 'complete')
if not m[1] then return false end
local limit = tonumber(ARGV[1])
local all = ARGV[2] == '1'
local picked = {}
-- Newest first, fetching only as many rows as are still wanted (all of
-- them at once unless tombstones are skipped): Redis copies each row it
-- hands to Lua, so a page of 50 must not cost a window of 200.
local stop = redis.call('LLEN', KEYS[2]) - 1
while stop >= 0 and #picked <= limit do
  local start = stop - (limit + 1 - #picked) + 1
  if start < 0 then start = 0 end
  local rows = redis.call('LRANGE', KEYS[2], start, stop)
  local i = #rows
  while i >= 1 and #picked <= limit do
    local r = rows[i]
    if all or string.sub(r, -15) ~= '"deleted":true}' then picked[#picked + 1] = r end
    i = i - 1
  end
  stop = start - 1
end
local more = 0
if #picked > limit then
  more = 1
  picked[#picked] = nil
elseif m[2] ~= '1' then
  return {m[1], -1}
end
local n = #picked
for k = 1, math.floor(n / 2) do picked[k], picked[n - k + 1] = picked[n - k + 1], picked[k] end
local joined = table.concat(picked, ',')
if redis.call('HLEN', KEYS[3]) < tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[3], ARGV[3], m[1] .. ':' .. more .. ':' .. joined)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
end
return {m[1], more, joined}
"""

# ARGV: version, last_seq, complete (0|1), ttl, rows... (ascending).
# Never replaces a page with an older one.
_FILL = """
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
if #ARGV > 4 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 5)) end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'last_seq', ARGV[2], 'complete', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# ARGV: version, first_seq, cap, ttl, channel, payload, command, rows...
# (consecutive seqs from first_seq; each took one version, the last of them
# ``version``). Publishes payload on channel first with
# command (SPUBLISH, or PUBLISH on Redis 6), whatever the page holds (channel
# '': nothing to publish; on a cluster the chat's channel has the chat's hash
# tag, so it is in the keys' slot), so the new messages' announcement to
# the other processes costs no round trip of its own. Applies the rows only on
# top of exactly version - (number of rows) ending at first_seq - 1.
_APPEND = """
if ARGV[5] ~= '' then redis.call(ARGV[7], ARGV[5], ARGV[6]) end
local m = redis.call('HMGET', KEYS[1], 'version', 'last_seq')
if not m[1] then return 0 end
local v = tonumber(ARGV[1])
local first = tonumber(ARGV[2])
if tonumber(m[1]) ~= v - (#ARGV - 7) or tonumber(m[2]) ~= first - 1 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return -1
end
redis.call('DEL', KEYS[3])
local n = redis.call('RPUSH', KEYS[2], unpack(ARGV, 8))
local cap = tonumber(ARGV[3])
if n > cap then
  redis.call('LTRIM', KEYS[2], -cap, -1)
  redis.call('HSET', KEYS[1], 'complete', '0')
end
redis.call('HSET', KEYS[1], 'version', v, 'last_seq', first + #ARGV - 8)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# ARGV: version, seq, row. Replaces the row of seq (if in the window) on top
# of exactly version - 1.
_REPLACE = """
local m = redis.call('HMGET', KEYS[1], 'version', 'last_seq')
if not m[1] then return 0 end
if tonumber(m[1]) ~= tonumber(ARGV[1]) - 1 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return -1
end
redis.call('DEL', KEYS[3])
local len = redis.call('LLEN', KEYS[2])
local idx = len - 1 - (tonumber(m[2]) - tonumber(ARGV[2]))
if idx >= 0 and idx < len then redis.call('LSET', KEYS[2], idx, ARGV[3]) end
redis.call('HSET', KEYS[1], 'version', ARGV[1])
return 1
"""


# Pages (limit and include_deleted combinations) kept built per chat, at most.
MAX_PAGES = 8


@dataclass(slots=True)
class PendingRead:
    built: asyncio.Future  # the stored page (HGET), or None
    keys: list[str]
    args: list  # the read script's, to build the page when it is not stored


@dataclass(slots=True)
class CachedPage:
    version: int
    joined: bytes | None  # the page's messages joined by commas; None: not answerable
    has_more: bool


class PageCache:
    """Coherent newest-page cache; every method swallows Redis trouble."""

    def __init__(self, client: aioredis.Redis | None, prefix: str, rows: int, ttl: int):
        self._r = client
        self._prefix = prefix
        self.rows = rows if client is not None else 0
        self._ttl = ttl
        self._health = redishealth.of(client) if client is not None else None
        self.hits = 0
        self.misses = 0
        if client is not None:
            self._read = client.register_script(_READ)
            self._fill = client.register_script(_FILL)
            self._append = client.register_script(_APPEND)
            self._replace = client.register_script(_REPLACE)
            self._batch = autopipe.batcher(client)

    @property
    def enabled(self) -> bool:
        return self.rows > 0 and self._health.up

    def _keys(self, chat_id: str) -> list[str]:
        tag = f"{self._prefix}:{{chat:{chat_id}}}"
        return [f"{tag}:meta", f"{tag}:rows", f"{tag}:pages"]

    def _failed(self, what: str, exc: Exception) -> None:
        # Timeouts and lost connections open the shared breaker (and are
        # logged there); this is anything else (a script error, say).
        if self._health.up:
            log.warning("redis %s failed (%s); serving from PostgreSQL", what, exc)

    async def read(self, chat_id: str, limit: int, include_deleted: bool) -> CachedPage | None:
        """The newest page as the cache has it (check its version!), or None."""
        return await self.page(self.read_soon(chat_id, limit, include_deleted))

    def read_soon(self, chat_id: str, limit: int, include_deleted: bool) -> PendingRead | None:
        """:meth:`read`, sent with this loop iteration's other Redis calls:
        give what it returns to :meth:`page`, or to :meth:`drop`."""
        if not self.enabled:
            return None
        keys = self._keys(chat_id)
        field = f"{limit}:{1 if include_deleted else 0}"
        built = self._batch.submit((None, (), ("HGET", keys[2], field)))
        return PendingRead(built, keys, [limit, 1 if include_deleted else 0, field, MAX_PAGES])

    async def page(self, pending: PendingRead | None) -> CachedPage | None:
        """The page a :meth:`read_soon` call brought (built now if it was not
        yet), or None."""
        if pending is None:
            return None
        try:
            built = await pending.built
            if built is not None:
                version, more, joined = built.split(b":", 2)
                return CachedPage(int(version), joined, more == b"1")
        except ValueError:  # not a page chatd stored: build it anew
            pass
        except asyncio.CancelledError:
            self._batch.discard(pending.built)
            raise
        except (RedisError, OSError) as exc:
            self._failed("cache read", exc)
            return None
        try:
            reply = await self._batch.run(self._read, pending.keys, pending.args)
        except (RedisError, OSError) as exc:
            self._failed("cache read", exc)
            return None
        if not reply:
            return None
        if reply[1] == -1:
            return CachedPage(int(reply[0]), None, False)
        return CachedPage(int(reply[0]), reply[2], reply[1] == 1)

    def drop(self, pending: PendingRead | None) -> None:
        """Give up on a :meth:`read_soon` call."""
        if pending is not None:
            self._batch.discard(pending.built)

    async def fill(self, chat_id: str, version: int, last_seq: int, complete: bool,
                   rows: list[bytes]) -> None:  # fmt: skip
        if not self.enabled:
            return
        args = [version, last_seq, 1 if complete else 0, self._ttl, *rows]
        try:
            await self._batch.run(self._fill, self._keys(chat_id), args)
        except (RedisError, OSError) as exc:
            self._failed("cache fill", exc)

    async def appended(self, chat_id: str, version: int, first_seq: int, rows: list[bytes],
                       publish: tuple[str, bytes, str] | None = None) -> bool:  # fmt: skip
        """Put newly committed rows on the cached page, and publish
        ``publish`` (channel, payload, command) in the same round trip. False when
        that did not happen (the cache is off or Redis failed): the caller
        publishes on its own."""
        if not self.enabled:
            return False
        channel, payload, command = publish or ("", b"", "")
        try:
            await self._batch.run(
                self._append,
                self._keys(chat_id),
                [version, first_seq, self.rows, self._ttl, channel, payload, command, *rows],
            )
        except (RedisError, OSError) as exc:
            self._failed("cache append", exc)
            return False
        return True

    async def replaced(self, chat_id: str, version: int, seq: int, row: bytes) -> None:
        if not self.enabled:
            return
        try:
            await self._batch.run(self._replace, self._keys(chat_id), [version, seq, row])
        except (RedisError, OSError) as exc:
            self._failed("cache replace", exc)

    async def purge(self, chat_ids: list[str] | None = None) -> int:
        """Remove chatd's cache keys (all of this prefix, or the given chats'); the count."""
        if self._r is None:
            return 0
        if chat_ids is not None:
            keys = [k for c in chat_ids for k in self._keys(c)]
            return int(await self._r.delete(*keys)) if keys else 0
        removed = 0
        pattern = f"{_glob_escape(self._prefix)}:{{chat:*}}:*"
        async for key in self._r.scan_iter(match=pattern, count=500):
            # Only the page cache's own keys: other state may share the chat's
            # hash tag under this prefix (presence, typing) and is not a cache.
            if key.endswith((b":meta", b":rows", b":pages")):
                removed += int(await self._r.delete(key))
        return removed


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


# Connections one chatd process opens to Redis at most. Past this, a call
# waits (up to its timeout) for a free one: redis-py's default pool instead
# fails every call beyond 100 at once ("Too many connections"), which a burst
# of socket connections (presence) reached.
MAX_CONNECTIONS = 64


def connect(url: str, timeout: float) -> aioredis.Redis:
    """A Redis client whose every call is bounded by ``timeout`` seconds (a
    redis-py RedisCluster for a ``redis+cluster://`` URL, REDIS_CLUSTER_NODES).

    Every call goes through the client's Batcher (chatd.autopipe), which
    bounds each round trip, connecting included, by ``timeout``; so the
    connections themselves have no read/write timeout. (redis-py bounds a
    write with ``asyncio.wait_for``, a task and two loop turns per round
    trip: a round trip waits that much longer whenever the loop is busy.)"""
    nodes = config.cluster_nodes(url)
    if nodes is not None:
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            max_connections=MAX_CONNECTIONS,
            socket_timeout=None,  # not redis-py's default of 5 s: see above
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        redishealth.attach(client, timeout)
        return client
    # One retry, on a lost connection only: after a Redis restart the pooled
    # socket is dead and the first attempt fails at once; the retry
    # reconnects. A timeout is not retried (redis-py's default would wait
    # twice): it opens the shared breaker (chatd.redishealth), which the
    # client carries, and the Batcher bounds each round trip, retry included.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout,
        socket_timeout=None,  # not redis-py's default of 5 s: see above
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
    )
    client = aioredis.Redis.from_pool(pool)
    redishealth.attach(client, timeout)
    return client


async def ping(client: aioredis.Redis) -> None:
    """PING through the client's Batcher: bounded by REDIS_TIMEOUT, and
    RedisUnavailable at once while the shared breaker is open."""
    await autopipe.batcher(client).run(None, (), ("PING",))


async def disconnect(client: aioredis.Redis) -> None:
    """Stop the client's calls and probe, and close its connections."""
    await autopipe.batcher(client).close()
    await client.aclose()
