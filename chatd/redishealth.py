"""One shared view of "Redis is not answering", for every use of Redis.

Every Redis call of chatd (the page cache, the rate limiter, the Socket.IO
publish, presence, the typing throttle, /readyz) goes through the client's
:class:`~chatd.autopipe.Batcher`, which bounds each round trip by
``REDIS_TIMEOUT`` and reports a timeout or a connection error here. The
FIRST such failure opens the breaker for all of them at once:

- every call in flight is failed at that moment (callers waiting in a hung
  pipeline, or queued behind it, do not each wait ``REDIS_TIMEOUT``), and
  their connections are closed (redis-py disconnects a connection whose read
  is cancelled: a reply arriving later must never answer another command);
- from then on every use skips Redis without a round trip (a check of
  :attr:`RedisHealth.up`): reads come from PostgreSQL, sends are stored and
  delivered to this process's sockets, limits fail open;
- a single background probe, on a connection of its own, sends PING (bounded
  by ``REDIS_TIMEOUT``) and, after a failure, again every
  :data:`PROBE_INTERVAL`; the first PONG closes the breaker. A PING in flight
  when a stopped Redis resumes is answered at once, so Redis is used again
  within about ``PROBE_INTERVAL`` of answering.

Nothing costs anything while Redis answers: no probe runs, and a use reads
one attribute. Coherence does not depend on any of this: a page carries its
PostgreSQL version (see chatd.cache), so whatever Redis missed, or executes
late after a hang, is never served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("chatd.redis")

# Between two probes after a failed one (seconds).
PROBE_INTERVAL = 0.25


class RedisUnavailable(RedisConnectionError):
    """Redis is not answering: the call was not made, or was given up on."""


class RedisHealth:
    """Whether Redis answers, shared by every user of one client."""

    def __init__(self, client: aioredis.Redis, timeout: float):
        self._client = client
        self.timeout = timeout
        self.up = True
        self.outages = 0  # times the breaker opened (tests, metrics)
        self._since = 0.0
        self._on_down: list[Callable[[Exception], None]] = []
        self._on_up: list[Callable[[], None]] = []
        self._probe: asyncio.Task | None = None
        self._answering: asyncio.Event | None = None
        self._closed = False

    def on_down(self, callback: Callable[[Exception], None]) -> None:
        """``callback(exc)`` runs (synchronously) when the breaker opens."""
        self._on_down.append(callback)

    def on_up(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs (synchronously) when Redis answers again."""
        self._on_up.append(callback)

    def failed(self, what: str, exc: BaseException) -> None:
        """A call timed out or lost its connection: open the breaker (once)."""
        if not self.up or self._closed:
            return
        self.up = False
        self.outages += 1
        self._since = time.monotonic()
        if self._answering is not None:
            self._answering.clear()
        detail = str(exc) or type(exc).__name__
        reason = RedisUnavailable(f"Redis does not answer ({what}: {detail})")
        log.warning("%s: cache, rate limits, fan-out and presence skip it until it does", reason)
        for callback in self._on_down:
            try:
                callback(reason)
            except Exception:  # pragma: no cover - callbacks are ours and simple
                log.exception("redis down callback failed")
        self._probe = asyncio.ensure_future(self._watch())

    async def wait_up(self, within: float) -> bool:
        """Wait (up to ``within`` s) until Redis answers; whether it does."""
        if self.up:
            return True
        if self._answering is None:
            self._answering = asyncio.Event()
        try:
            async with asyncio.timeout(within):
                await self._answering.wait()
        except TimeoutError:
            pass
        return self.up

    def _set_up(self) -> None:
        self.up = True
        if self._answering is not None:
            self._answering.set()
        down_for = time.monotonic() - self._since
        log.warning("Redis answers again after %.1fs: using it again", down_for)
        for callback in self._on_up:
            try:
                callback()
            except Exception:  # pragma: no cover
                log.exception("redis up callback failed")

    def _probe_client(self) -> aioredis.Redis:
        if isinstance(self._client, RedisCluster):
            # A Redis Cluster: PING the node chatd's client would send a
            # keyless command to (a primary), on a connection of its own.
            node = self._client.get_default_node() or self._client.get_nodes()[0]
            kwargs = {
                k: v for k, v in node.connection_kwargs.items()
                if k in ("username", "password", "ssl", "ssl_ca_certs", "ssl_certfile",
                         "ssl_keyfile")
            }  # fmt: skip
            return aioredis.Redis(
                host=node.host, port=node.port, socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0), **kwargs,
            )  # fmt: skip
        pool = self._client.connection_pool
        kwargs = {
            **pool.connection_kwargs,
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        probe_pool = aioredis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=1, **kwargs
        )
        return aioredis.Redis.from_pool(probe_pool)

    async def _watch(self) -> None:
        """PING on a connection of its own until Redis answers."""
        probe = self._probe_client()
        try:
            while not self.up:
                try:
                    async with asyncio.timeout(self.timeout):
                        await probe.ping()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A PING given up on leaves no reply to read later: the
                    # connection goes (redis-py drops it on a cancelled read;
                    # this makes sure of it).
                    await probe.connection_pool.disconnect()
                    await asyncio.sleep(PROBE_INTERVAL)
                    continue
                self._set_up()
        finally:
            self._probe = None
            try:
                await probe.aclose()
            except Exception:  # pragma: no cover - best effort
                pass

    async def close(self) -> None:
        """Stop the probe; from now on every call fails at once (the client
        is closing: a late call must not open a connection)."""
        self._closed = True
        self.up = False
        probe = self._probe
        if probe is not None:
            probe.cancel()
            try:
                await probe
            except (asyncio.CancelledError, Exception):
                pass


def attach(client: aioredis.Redis, timeout: float) -> RedisHealth:
    """Give ``client`` its RedisHealth (calls bounded by ``timeout`` s)."""
    health = client._chatd_health = RedisHealth(client, timeout)
    return health


def of(client: aioredis.Redis) -> RedisHealth:
    """The RedisHealth of ``client`` (made on first use, bounded by the
    client's socket timeout, else 1 s)."""
    found = getattr(client, "_chatd_health", None)
    if found is None:
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout") or 1.0
        found = attach(client, timeout)
    return found
