"""Who is online in which chat, counted across every chatd process, and the
cross-process typing throttle.

Presence (API.md: ``presence`` goes to the room when a user's first socket
joins, or last socket leaves, it) is kept in Redis so that every process
counts the same sockets. ``P`` is ``CHATD_REDIS_PREFIX``; every key carries the
``{presence}`` hash tag so the scripts below touch a single Redis Cluster slot:

    P:{presence}:procs       ZSET  process id -> deadline (Redis clock, ms)
    P:{presence}:chat:ID     HASH  user id -> number of sockets in the room
    P:{presence}:proc:PID    SET   "chat_id\\nsid\\nuser_id", the sockets of
                                   process PID that are counted above

Every change is one Lua script, so a count and the reference that explains it
move together: joining adds the socket's reference to its process's set and
counts +1 only if it was not there (a repeated join-chat counts once); leaving
removes the reference and counts -1 only if it was there.

A process that dies without a goodbye (SIGKILL, power loss) stops refreshing
its deadline. Every process runs a heartbeat every ``PRESENCE_TTL / 4``
seconds that pushes its own deadline three heartbeats (``0.75 x
PRESENCE_TTL``) ahead and collects the processes whose deadline passed; one
script per dead process (atomic, so exactly one survivor gets the list) drops
all its references and returns the users whose count fell to zero, and that
survivor emits ``online: false`` for them. So a killed process's users go
offline within PRESENCE_TTL: its deadline passes at most 0.75 x TTL after its
last heartbeat, and another process looks at most 0.25 x TTL later. A live
process may miss two heartbeats (a pause of up to ~0.5 x TTL) unharmed.

A process that was only stalled past its deadline (a long pause, a Redis
outage) finds its heartbeat re-adding it and registers its sockets again, so
its users come back online; their ``online: false`` in between was the best
anyone could tell.

Redis trouble never fails a socket event: presence is then simply not
updated (and logged), and the next heartbeat repairs what it can. Every call
goes through the client's Batcher, so it is bounded by ``REDIS_TIMEOUT`` and
skipped at once while the shared breaker is open (chatd.redishealth).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import autopipe

log = logging.getLogger("chatd.presence")

Notify = Callable[[str, str, bool], Awaitable[None]]  # (chat_id, user_id, online)

# ARGV: now is Redis' own clock, so hosts with skewed clocks agree on deadlines.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: chat hash, proc set, procs zset. ARGV: user, ref, pid.
# Reply: the user's new count (1: came online), 0 if this socket was already
# counted; negated if this process is not registered (the caller beats at once).
_JOIN = """
if redis.call('SADD', KEYS[2], ARGV[2]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if not redis.call('ZSCORE', KEYS[3], ARGV[3]) then return -n end
return n
"""

# KEYS: chat hash, proc set. ARGV: user, ref.
# Reply: the user's remaining count (0: went offline), -1 if not counted.
_LEAVE = """
if redis.call('SREM', KEYS[2], ARGV[2]) == 0 then return -1 end
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]); return 0 end
return n
"""

# Many sockets leaving at once (a batch of disconnects): _LEAVE for each.
# KEYS: proc set. ARGV: chat hash key prefix, then chat, user, ref per socket.
# Reply: {chat, user, chat, user, ...} whose count fell to zero.
_LEAVE_MANY = """
local gone = {}
for i = 2, #ARGV, 3 do
  if redis.call('SREM', KEYS[1], ARGV[i + 2]) == 1 then
    local key = ARGV[1] .. ARGV[i]
    local n = redis.call('HINCRBY', key, ARGV[i + 1], -1)
    if n <= 0 then
      redis.call('HDEL', key, ARGV[i + 1])
      table.insert(gone, ARGV[i])
      table.insert(gone, ARGV[i + 1])
    end
  end
end
return gone
"""

# KEYS: procs zset. ARGV: pid, ttl_ms.
# Reply: {1 if this process was not registered (new, or reaped), expired pids...}
_BEAT = (
    _NOW
    + """
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 100)
table.insert(dead, 1, added)
return dead
"""
)

# KEYS: procs zset, proc set. ARGV: pid, chat hash key prefix, force (1: our own goodbye).
# Reply: {chat, user, chat, user, ...} whose count fell to zero. Does nothing
# if the process is alive again (its deadline moved while we looked).
_REAP = (
    _NOW
    + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' and score and tonumber(score) >= now then return {} end
redis.call('ZREM', KEYS[1], ARGV[1])
local gone = {}
for _, ref in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local chat, user = string.match(ref, '^([^\\n]*)\\n[^\\n]*\\n(.*)$')
  if chat then
    local key = ARGV[2] .. chat
    local n = redis.call('HINCRBY', key, user, -1)
    if n <= 0 then
      redis.call('HDEL', key, user)
      table.insert(gone, chat)
      table.insert(gone, user)
    end
  end
end
redis.call('DEL', KEYS[2])
return gone
"""
)


def _ref(chat_id: str, sid: str, user_id: str) -> str:
    # chat ids and sids never hold a newline, so the user id can be anything.
    return f"{chat_id}\n{sid}\n{user_id}"


class _Base:
    """What both presence stores share: the local sockets' joins, and the callback."""

    def __init__(self) -> None:
        # This process's own sockets: (chat_id, sid) -> user_id, and sid ->
        # its chats. Local by nature (those sockets live and die with this
        # process); Redis has the totals.
        self.local: dict[tuple[str, str], str] = {}
        self._chats: dict[str, set[str]] = {}
        self.notify: Notify | None = None
        # Several changes at once, [(chat_id, user_id, online)] (optional).
        self.notify_many: Callable[[list[tuple[str, str, bool]]], Awaitable[None]] | None = None

    def _add(self, chat_id: str, sid: str, user_id: str) -> bool:
        """Record a local join; False if it was recorded already."""
        if (chat_id, sid) in self.local:
            return False
        self.local[(chat_id, sid)] = user_id
        self._chats.setdefault(sid, set()).add(chat_id)
        return True

    def _remove(self, chat_id: str, sid: str) -> str | None:
        """Forget a local join; the user id, or None if there was none."""
        user_id = self.local.pop((chat_id, sid), None)
        chats = self._chats.get(sid)
        if chats is not None:
            chats.discard(chat_id)
            if not chats:
                del self._chats[sid]
        return user_id

    async def _tell(self, chat_id: str, user_id: str, online: bool) -> None:
        if self.notify is not None:
            try:
                await self.notify(chat_id, user_id, online)
            except Exception:
                log.exception("presence emit failed")

    async def _tell_many(self, changes: list[tuple[str, str, bool]]) -> None:
        if not changes:
            return
        if self.notify_many is None:
            for change in changes:
                await self._tell(*change)
            return
        try:
            await self.notify_many(changes)
        except Exception:
            log.exception("presence emit failed")

    def chats_of(self, sid: str) -> list[str]:
        return sorted(self._chats.get(sid, ()))

    async def leave_all(self, sid: str) -> None:
        await self.leave_many([sid])

    async def leave_many(self, sids: list[str]) -> None:
        """Every chat of every one of these sockets (disconnected)."""
        for sid in sids:
            for chat_id in self.chats_of(sid):
                await self.leave(chat_id, sid)

    async def join(self, chat_id: str, user_id: str, sid: str) -> None:  # pragma: no cover
        raise NotImplementedError

    async def leave(self, chat_id: str, sid: str) -> None:  # pragma: no cover
        raise NotImplementedError


class LocalPresence(_Base):
    """Presence of one process (no Redis configured, so there is only one)."""

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[tuple[str, str], int] = {}  # (chat, user) -> sockets

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        for chat_id, sid in list(self.local):
            await self.leave(chat_id, sid)

    async def join(self, chat_id: str, user_id: str, sid: str) -> None:
        if not self._add(chat_id, sid, user_id):
            return
        key = (chat_id, user_id)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._counts[key] == 1:
            await self._tell(chat_id, user_id, True)

    async def leave(self, chat_id: str, sid: str) -> None:
        user_id = self._remove(chat_id, sid)
        if user_id is None:
            return
        key = (chat_id, user_id)
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]
            await self._tell(chat_id, user_id, False)


class Presence(_Base):
    """Presence counted in Redis across every chatd process sharing it."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl: float):
        super().__init__()
        self._r = client
        self.pid = uuid.uuid4().hex
        self.ttl = ttl
        self.interval = max(0.2, ttl / 4)
        self.deadline_ms = int(ttl * 750)  # three heartbeats ahead
        tag = f"{prefix}:{{presence}}"
        self._chat_prefix = f"{tag}:chat:"
        self._procs = f"{tag}:procs"
        self._proc_prefix = f"{tag}:proc:"
        self._join = client.register_script(_JOIN)
        self._leave = client.register_script(_LEAVE)
        self._leave_many = client.register_script(_LEAVE_MANY)
        self._beat = client.register_script(_BEAT)
        self._reap = client.register_script(_REAP)
        self._batch = autopipe.batcher(client)
        self._task: asyncio.Task | None = None
        self._closed = False
        self._failing_since = 0.0
        # Set when an update could not reach Redis: the next heartbeat makes
        # Redis agree with this process's sockets again.
        self._dirty = False

    def _proc_key(self, pid: str) -> str:
        return self._proc_prefix + pid

    def _failed(self, what: str, exc: Exception) -> None:
        self._dirty = True
        now = time.monotonic()
        if now - self._failing_since > 10:  # one line per 10 s of trouble, not per call
            log.warning("presence %s failed (%s)", what, exc)
            self._failing_since = now

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Goodbye: this process's users are offline now, not after the TTL."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.local.clear()
        self._chats.clear()
        await self.reap(self.pid, force=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - beat() handles Redis errors
                log.exception("presence heartbeat failed")

    async def beat(self) -> None:
        """Refresh this process's deadline and reap the processes that missed theirs."""
        try:
            reply = await self._batch.run(self._beat, [self._procs], [self.pid, self.deadline_ms])
        except (RedisError, OSError) as exc:
            self._failed("heartbeat", exc)
            return
        registered_anew, dead = int(reply[0]), [d.decode() for d in reply[1:]]
        if registered_anew and self.local:
            # We were reaped while alive (stalled past our deadline).
            log.warning("presence: this process had been declared dead; registering again")
            self._dirty = True
        if self._dirty:
            await self._reconcile()
        for pid in dead:
            if pid != self.pid:
                await self.reap(pid)

    async def _reconcile(self) -> None:
        """Make Redis count exactly this process's sockets: count the ones it
        lost (reaped while alive, a join that failed) and drop the ones that
        are gone (a leave that failed), announcing whoever that changes."""
        self._dirty = False
        try:
            members = await self._batch.run(None, (), ("SMEMBERS", self._proc_key(self.pid)))
            counted = {m.decode() for m in members}
        except (RedisError, OSError) as exc:
            self._failed("reconcile", exc)
            return
        local = {_ref(c, s, u): (c, s, u) for (c, s), u in self.local.items()}
        for ref in counted - local.keys():
            chat_id, _, user_id = ref.split("\n", 2)
            await self._count_out(chat_id, user_id, ref)
        for ref in local.keys() - counted:
            chat_id, sid, user_id = local[ref]
            await self._count_in(chat_id, user_id, sid, retry=False)

    async def reap(self, pid: str, force: bool = False) -> None:
        try:
            gone = await self._batch.run(
                self._reap,
                [self._procs, self._proc_key(pid)],
                [pid, self._chat_prefix, 1 if force else 0],
            )
        except (RedisError, OSError) as exc:
            self._failed("reap", exc)
            return
        if gone and not force:
            log.info("presence: process %s expired; %d users offline", pid, len(gone) // 2)
        for i in range(0, len(gone) - 1, 2):
            await self._tell(gone[i].decode(), gone[i + 1].decode(), False)

    # -- sockets ------------------------------------------------------------------

    async def join(self, chat_id: str, user_id: str, sid: str) -> None:
        if self._closed:
            return
        self._add(chat_id, sid, user_id)
        await self._count_in(chat_id, user_id, sid, retry=True)

    async def _count_in(self, chat_id: str, user_id: str, sid: str, retry: bool) -> None:
        try:
            n = await self._batch.run(
                self._join,
                [self._chat_prefix + chat_id, self._proc_key(self.pid), self._procs],
                [user_id, _ref(chat_id, sid, user_id), self.pid],
            )
        except (RedisError, OSError) as exc:
            self._failed("join", exc)
            return
        if n < 0:
            # Counted, but under a process id the others consider dead (or not
            # yet registered): beat now, so this socket cannot be left behind
            # in a set that nobody reaps.
            n = -n
            if retry:
                await self.beat()
        if n == 1:
            await self._tell(chat_id, user_id, True)

    async def leave(self, chat_id: str, sid: str) -> None:
        user_id = self._remove(chat_id, sid)
        if user_id is None or self._closed:
            return
        await self._count_out(chat_id, user_id, _ref(chat_id, sid, user_id))

    async def leave_many(self, sids: list[str]) -> None:
        """Every chat of these sockets, in one Redis round trip (a batch of
        disconnects: one script call instead of one per socket and chat)."""
        args: list[str] = [self._chat_prefix]
        for sid in sids:
            for chat_id in list(self._chats.get(sid, ())):
                user_id = self._remove(chat_id, sid)
                if user_id is not None:
                    args += [chat_id, user_id, _ref(chat_id, sid, user_id)]
        if len(args) == 1 or self._closed:
            return
        try:
            gone = await self._batch.run(self._leave_many, [self._proc_key(self.pid)], args)
        except (RedisError, OSError) as exc:
            self._failed("leave", exc)
            return
        await self._tell_many(
            [(gone[i].decode(), gone[i + 1].decode(), False) for i in range(0, len(gone) - 1, 2)]
        )

    async def _count_out(self, chat_id: str, user_id: str, ref: str) -> None:
        try:
            n = await self._batch.run(
                self._leave,
                [self._chat_prefix + chat_id, self._proc_key(self.pid)],
                [user_id, ref],
            )
        except (RedisError, OSError) as exc:
            self._failed("leave", exc)
            return
        if n == 0:
            await self._tell(chat_id, user_id, False)

    async def online(self, chat_id: str) -> list[str]:
        """The users with at least one socket in the chat's room (any process)."""
        try:
            users = await self._batch.run(None, (), ("HKEYS", self._chat_prefix + chat_id))
        except (RedisError, OSError) as exc:
            self._failed("read", exc)
            return []
        return sorted(u.decode() for u in users)


class Gate:
    """``allow(key, ms)``: true at most once per ``ms`` per key, across processes
    (Redis ``SET NX PX``); per process when there is no Redis. Redis trouble
    opens the gate: a typing indicator too many beats one lost."""

    def __init__(self, client: aioredis.Redis | None, prefix: str):
        self._r = client
        self._batch = autopipe.batcher(client) if client is not None else None
        self._prefix = f"{prefix}:gate:"
        self._local: dict[str, float] = {}  # only without Redis (one process)

    async def allow(self, key: str, ms: int) -> bool:
        if self._batch is not None:
            command = ("SET", self._prefix + key, b"1", "NX", "PX", ms)
            try:
                return bool(await self._batch.run(None, (), command))
            except (RedisError, OSError):
                return True
        now = time.monotonic()
        if len(self._local) > 10_000:
            self._local = {k: t for k, t in self._local.items() if t > now}
        if self._local.get(key, 0.0) > now:
            return False
        self._local[key] = now + ms / 1000
        return True
