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
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from .coalesce import Coalescer


class Batcher(Coalescer):
    """Sends the script calls made in one event-loop iteration together."""

    def __init__(self, client: aioredis.Redis):
        super().__init__()
        self._client = client

    async def run(self, script: AsyncScript, keys: list, args: list):  # type: ignore[override]
        """``script(keys=keys, args=args)``, in a pipeline with its neighbours.
        (``submit((None, (), command))`` queues a plain command.)"""
        return await super().run((script, keys, args))

    async def one(self, call):
        script, keys, args = call
        if script is None:  # a plain command: args is all of it
            return await self._client.execute_command(*args)
        return await script(keys=keys, args=args)

    async def many(self, calls: list) -> list:
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
                    replies[i] = await self.one(calls[i])
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
