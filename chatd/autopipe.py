"""Redis calls (scripts, or plain commands) made at the same moment share one round trip.

redis-py spends ~40 µs of Python on each command (pool checkout, health
check, timeout, retry wrapper, reply parsing) and concurrent commands each
take a pooled connection of their own; sent as one pipeline, the same calls
cost ~19 µs each on one connection. The calls on chatd's hot paths (the page
cache's reads and appends, the rate limiter) go through :class:`Batcher`, a
:class:`~chatd.coalesce.Coalescer`: the script calls of one event-loop
iteration go out as one pipeline, in call order (ioredis's auto-pipelining,
which the Node service had). A script Redis does not know (after a restart or
SCRIPT FLUSH) is loaded and that call retried.

Every use of Redis goes through the client's one Batcher, so it is also
where Redis trouble is seen (chatd.redishealth): each round trip is bounded
by ``REDIS_TIMEOUT`` (one ``asyncio.timeout`` per batch, not per call); a
timeout or a lost connection opens the shared breaker, which fails every
call still waiting at once; while it is open, calls fail without being sent.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import redishealth
from .coalesce import Coalescer
from .redishealth import RedisUnavailable

# What says "Redis is not answering" (a script error or a wrong type does not).
_TROUBLE = (TimeoutError, RedisTimeoutError, RedisConnectionError, OSError)


class Batcher(Coalescer):
    """Sends the script calls made in one event-loop iteration together."""

    def __init__(self, client: aioredis.Redis):
        super().__init__()
        self._client = client
        self.health = redishealth.of(client)
        self.health.on_down(self.fail_all)

    async def run(self, script: AsyncScript | None, keys, args):  # type: ignore[override]
        """``script(keys=keys, args=args)``, in a pipeline with its neighbours.
        (``run(None, (), command)`` or ``submit((None, (), command))`` sends
        a plain command.) RedisUnavailable at once while Redis is down."""
        return await super().run((script, keys, args))

    def submit(self, call) -> asyncio.Future:
        if not self.health.up:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(RedisUnavailable("Redis is not answering"))
            return future
        return super().submit(call)

    async def close(self) -> None:
        """The client is closing: no call from now on, and none left running
        (a batch still connecting when the event loop ends is never finished)."""
        await self.health.close()
        stopped = self.fail_all(RedisUnavailable("the Redis client is closed"))
        await asyncio.gather(*stopped, return_exceptions=True)

    async def one(self, call):
        return await self._bounded(self._one, call)

    async def many(self, calls: list) -> list:
        return await self._bounded(self._many, calls)

    async def _bounded(self, send, calls):
        try:
            async with asyncio.timeout(self.health.timeout):
                return await send(calls)
        except _TROUBLE as exc:
            if isinstance(exc, RedisUnavailable):
                raise
            if isinstance(exc, TimeoutError):  # callers handle RedisError, not this
                exc = RedisUnavailable(f"no answer within {self.health.timeout:g}s")
            self.health.failed("call", exc)
            raise exc from None

    async def _one(self, call):
        script, keys, args = call
        if script is None:  # a plain command: args is all of it
            return await self._client.execute_command(*args)
        return await script(keys=keys, args=args)

    async def _many(self, calls: list) -> list:
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args in calls:
            if script is None:
                pipe.execute_command(*args)
            else:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        replies = await pipe.execute(raise_on_error=False)
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):  # Redis lost its scripts: load, retry
                try:
                    replies[i] = await self._one(calls[i])
                except Exception as exc:
                    replies[i] = exc
        return replies


def batcher(client: aioredis.Redis) -> Batcher:
    """The one Batcher of ``client`` (shared by the cache and the rate limiter,
    so their calls of one iteration share a pipeline too)."""
    found = getattr(client, "_chatd_batcher", None)
    if found is None:
        found = client._chatd_batcher = Batcher(client)
    return found
