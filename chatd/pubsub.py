"""python-socketio's Redis manager, bounded so a Redis outage never holds a request.

``AsyncRedisManager.emit`` delivers to this process's sockets first, then
publishes for the other processes. Its publish retries once and has no read
timeout of its own: against a Redis that does not answer (a dead host, a
network partition) ``await sio.emit(...)`` would wait for the kernel to give
up, and the REST send that triggered it would wait with it, although its
message is already committed. Events are a fast path (API.md, "Ordering and
gaps": a client notices a lost one by the seq gap), so a publish that cannot
be made within ``REDIS_TIMEOUT`` is dropped, logged once, and publishes are
skipped for a second (a circuit breaker, as in chatd.cache) instead of every
emit paying the timeout again.
"""

from __future__ import annotations

import asyncio
import logging
import time

import socketio

log = logging.getLogger("chatd.pubsub")

RESUBSCRIBE_MAX = 2.0


class BoundedRedisManager(socketio.AsyncRedisManager):
    def __init__(self, *args, publish_timeout: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.publish_timeout = publish_timeout
        self._down_until = 0.0
        self._failing = False
        self.dropped = 0

    async def _publish(self, data):
        # One attempt, bounded: the base class retries (and logs at ERROR per
        # emit); here the breaker stands for the retry.
        if time.monotonic() < self._down_until:
            self.dropped += 1
            return
        try:
            if not self.connected:
                self._redis_connect()
            await asyncio.wait_for(
                self.redis.publish(self.channel, self.json.dumps(data)), self.publish_timeout
            )
        except Exception as exc:  # any failure: the event is dropped, never the request
            self._broken(str(exc) or type(exc).__name__)
            return
        if self._failing:
            log.warning("socket.io publishes to Redis again (%d dropped)", self.dropped)
            self._failing = False

    def _broken(self, why: str) -> None:
        if not self._failing:  # once per outage
            log.warning("socket.io publish to Redis failed (%s); other processes miss events", why)
            self._failing = True
        self.dropped += 1
        # No new client: redis-py drops a failed connection and opens another
        # on the next command (replacing self.redis would leak the old pool).
        self._down_until = time.monotonic() + 1.0

    async def _redis_listen_with_retries(self):
        # The base class doubles its pause after each failed resubscribe up to
        # 60 s, so after a Redis outage of a minute this process would keep
        # missing other processes' events for up to another minute. Here the
        # pause stays at most RESUBSCRIBE_MAX seconds.
        pause = 0.1
        subscribed = False
        while True:
            try:
                if not subscribed:
                    self._redis_connect()
                    await self.pubsub.subscribe(self.channel)
                    subscribed = True
                    pause = 0.1
                    log.info("socket.io subscribed to Redis channel %s", self.channel)
                async for message in self.pubsub.listen():
                    yield message
            except Exception as exc:
                if subscribed:
                    log.warning("socket.io lost its Redis subscription (%s); resubscribing", exc)
                subscribed = False
                await asyncio.sleep(pause)
                pause = min(pause * 2, RESUBSCRIBE_MAX)
