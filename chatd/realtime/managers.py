"""The client managers: python-socketio's pub/sub managers with chatd's
additions, for one process (:class:`LocalChatManager`) or many through Redis
(:class:`RedisChatManager`).

Many processes, one service. With Redis configured every emit goes through
:class:`RedisChatManager` (python-socketio's ``AsyncRedisManager``): the
emitting process delivers to its own sockets and publishes the emit on the
room's channel (chatd.relay: ``SOCKETIO_CHANNEL:{chat:ID}`` or
``SOCKETIO_CHANNEL:{user:ID}``, sharded pub/sub), to which exactly the
processes holding a socket in that room are subscribed; each delivers it to
its sockets. chatd
adds three things to python-socketio's message, all decided where the emit is
delivered (each process knows only its own sockets):

- ``skip_room``: skip every socket in that room, on every process. ``typing``
  skips ``user:{sender}``, so none of the sender's tabs sees its own typing.
- Per-socket de-duplication of ``new-message`` for sockets that joined a chat
  with ``since_seq`` (see :meth:`ChatManagerMixin.hold`), and of every
  versioned event (``new-message``, ``message-updated``, ``message-deleted``)
  by ``version`` for sockets that joined with ``since_version``
  (:meth:`ChatManagerMixin.hold_versions`): API.md promises that
  join-then-listen leaves no hole *and* shows nothing twice.
- Internal events (``INTERNAL_*``) that are never sent to a socket but run a
  hook on every process: a removed member's sockets leave the chat's room
  wherever they are connected.
- Batches: a group commit's new messages go out as one publication
  (``{"method": "chatd:batch", "messages": [emit, ...]}``, unwrapped in
  order by the listener), published by the page cache's append script in the
  same Redis round trip as the cache write (see ``ChatService._announce``).

What these keep per process (held events, floors, sid -> user) is about the
sockets connected to *this* process and dies with them; everything shared
(presence counts, throttles, messages) is in Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
import socketio
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from socketio.async_manager import AsyncManager
from socketio.async_pubsub_manager import AsyncPubSubManager

from .. import autopipe, delivery, fairselect, relay
from ..redishealth import RedisUnavailable
from .rooms import BATCH, chat_room, publication, user_room

log = logging.getLogger("chatd.realtime")

# The events that carry a message's version (API.md version 2): held back and
# de-duplicated by version for sockets that joined with since_version.
VERSIONED = frozenset({"new-message", "message-updated", "message-deleted"})
# Internal event: the sockets of room ``user:{user_id}`` leave ``chat:{chat_id}``.
INTERNAL_LEAVE = "chatd:member-removed"


# -- the client managers ---------------------------------------------------------


class _Pending(dict):
    """The list API python-socketio uses on its pending sids (append,
    remove, in, len), on a dict: O(1) each, in insertion order."""

    def append(self, sid) -> None:
        self[sid] = None

    def remove(self, sid) -> None:
        del self[sid]


class _PendingTable(dict):
    """namespace -> _Pending; python-socketio stores a new ``[]`` there."""

    def __setitem__(self, namespace, value) -> None:
        if not isinstance(value, _Pending):
            pending = _Pending()
            for sid in value:
                pending.append(sid)
            value = pending
        super().__setitem__(namespace, value)


class ChatManagerMixin:
    """chatd's additions to a python-socketio pub/sub manager (see the module
    docstring). Everything is decided in ``_handle_emit``, which
    python-socketio calls for an emit on the emitting process and for each
    emit received from another process, right before it delivers to the
    local sockets of the room."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # room -> sid -> new-message payloads held back while the sid's
        # join-chat (with since_seq) is reading what it missed.
        self.joining: dict[str, dict[str, list]] = {}
        # room -> sid -> the highest seq that sid's join ack covered: a later
        # new-message at or below it is a duplicate (a late publish).
        self.floors: dict[str, dict[str, int]] = {}
        # The same two by version, for join-chat with since_version: every
        # VERSIONED event is held, then those at or below the floor dropped.
        self.vjoining: dict[str, dict[str, list]] = {}
        self.vfloors: dict[str, dict[str, int]] = {}
        # sid -> the rooms it has an entry in above (for forget(sid)).
        self._marked: dict[str, set[str]] = {}
        # async (sid, chat_id) -> None: a local socket was made to leave a
        # chat's room by an internal event (the namespace updates presence).
        self.on_removed: Callable[[str, str], Awaitable[None]] | None = None
        self._tasks: set[asyncio.Task] = set()
        # Ended sockets waiting to leave their rooms (leave_rooms_early).
        self._leaving: collections.deque[tuple[str, str]] = collections.deque()
        self._leaver: asyncio.Task | None = None
        # (namespace, sid) -> the rooms it is in (None and its own sid room
        # included): python-socketio finds a socket's rooms by walking every
        # room of the namespace (get_rooms, basic_disconnect), O(sockets) per
        # join-chat and per disconnect at one room per user.
        self._rooms_of: dict[tuple[str, str], set] = {}
        # python-socketio keeps these as lists (`sid in list`, list.remove):
        # O(n) per connect and disconnect while n are pending.
        self.pending_connect = _PendingTable()
        self.pending_disconnect = _PendingTable()

    # -- a socket's rooms without walking every room -----------------------------

    def basic_enter_room(self, sid, namespace, room, eio_sid=None):
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        self._rooms_of.setdefault((namespace, sid), set()).add(room)

    def basic_leave_room(self, sid, namespace, room):
        super().basic_leave_room(sid, namespace, room)
        rooms = self._rooms_of.get((namespace, sid))
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._rooms_of[(namespace, sid)]

    def basic_disconnect(self, sid, namespace, **kwargs):
        """python-socketio's, leaving only the rooms the socket is in."""
        if namespace not in self.rooms:
            return
        for room in list(self._rooms_of.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self.callbacks.pop(sid, None)
        for table in (self.pending_connect, self.pending_disconnect):
            pending = table.get(namespace)
            if pending is not None and sid in pending:
                pending.remove(sid)
                if not pending:
                    del table[namespace]

    def get_rooms(self, sid, namespace):
        return [r for r in self._rooms_of.get((namespace, sid), ()) if r is not None]

    def leave_rooms_early(self, sid, namespace) -> None:
        """A socket whose connection is over while its close waits its turn
        (chatd.fairselect, in a storm; chatd.delivery drops its packets): out
        of its rooms soon, so broadcasts stop walking it. Profiled, 10,000
        dropped sockets: the presence events of their disconnect batches
        walked ~500,000 room entries of sockets still waiting. The
        connection's own room (None) stays: its disconnect, in its turn,
        needs it (and leaves the rest, if a join re-entered one meanwhile).

        Not in the broadcast that found it: the first presence event to a
        room of 100 dropped sockets would leave 100 sockets' rooms in one
        step (~3 ms, and a broadcast cannot be cut into turns without
        reordering a room's events). A background task leaves them, paced
        with the loop's other background work (fairselect.pace); until then
        a broadcast skips such a socket for the price of a lookup."""
        self._leaving.append((sid, namespace))
        if self._leaver is None:
            self._leaver = asyncio.ensure_future(self._leave_early())

    async def _leave_early(self) -> None:
        try:
            while self._leaving:
                sid, namespace = self._leaving.popleft()
                for room in list(self._rooms_of.get((namespace, sid), ())):
                    if room is not None:
                        self.basic_leave_room(sid, namespace, room)
                await fairselect.pace()
        finally:
            self._leaver = None

    def chat_rooms(self, sid: str, namespace: str = "/") -> set[str]:
        """The chat rooms (``chat:*``) the socket is in."""
        rooms = self._rooms_of.get((namespace, sid), ())
        return {r for r in rooms if isinstance(r, str) and r.startswith("chat:")}

    async def emit(self, event, data, namespace=None, room=None, skip_sid=None,
                   callback=None, to=None, skip_room=None, **kwargs):  # fmt: skip
        if skip_room is None:
            return await super().emit(
                event, data, namespace=namespace, room=room, skip_sid=skip_sid,
                callback=callback, to=to, **kwargs,
            )  # fmt: skip
        # python-socketio's message, plus skip_room (its emit has no such field).
        message = {
            "method": "emit", "event": event, "data": [data], "binary": False,
            "namespace": namespace or "/", "room": to or room, "skip_sid": skip_sid,
            "skip_room": skip_room, "callback": None, "host_id": self.host_id,
        }  # fmt: skip
        await self._handle_emit(message)
        await self._publish(message)

    async def _handle_emit(self, message):
        event = message.get("event")
        namespace = message.get("namespace") or "/"
        room = message.get("room")
        data = message.get("data")
        payload = data[0] if isinstance(data, list) and data else None
        if event == INTERNAL_LEAVE:
            if isinstance(payload, dict):
                await self._leave_chat_locally(namespace, payload)
            return
        skip = message.get("skip_sid")
        skip = list(skip) if isinstance(skip, list) else ([skip] if skip else [])
        if message.get("skip_room"):
            skip.extend(sid for sid, _ in self.get_participants(namespace, message["skip_room"]))
        if (
            event == "new-message"
            and isinstance(room, str)
            and (room in self.joining or room in self.floors)
        ):
            seq = payload.get("seq") if isinstance(payload, dict) else None
            if isinstance(seq, int):
                for sid, held in self.joining.get(room, {}).items():
                    held.append(payload)
                    skip.append(sid)
                for sid, floor in self.floors.get(room, {}).items():
                    if seq <= floor:
                        skip.append(sid)
        if (
            event in VERSIONED
            and isinstance(room, str)
            and (room in self.vjoining or room in self.vfloors)
        ):
            version = payload.get("version") if isinstance(payload, dict) else None
            if isinstance(version, int):
                for sid, held in self.vjoining.get(room, {}).items():
                    held.append((event, payload))
                    skip.append(sid)
                for sid, floor in self.vfloors.get(room, {}).items():
                    if version <= floor:
                        skip.append(sid)
        # A copy: on the emitting process the same dict is published next.
        message = {**message, "skip_sid": skip}
        if not await delivery.deliver_message(self, message):
            await super()._handle_emit(message)

    # -- join-chat with since_seq: no hole, no duplicate ----------------------------

    def hold(self, sid: str, room: str) -> None:
        """From now on, hold back this socket's new-message events of ``room``
        (call before the socket enters the room, then read what it missed)."""
        self.joining.setdefault(room, {})[sid] = []
        self._marked.setdefault(sid, set()).add(room)

    async def release(self, sid: str, room: str, covered: int | None) -> None:
        """The join's ack is out: send the held events the ack did not cover,
        and drop any later one at or below ``covered`` (a late publish)."""
        held = self.joining.get(room, {}).get(sid)
        if held is None:  # left or disconnected meanwhile
            return
        if covered is not None:
            self.floors.setdefault(room, {})[sid] = covered
        # Still holding while sending, so an event arriving meanwhile queues
        # behind the held ones instead of overtaking them.
        while held:
            payload = held.pop(0)
            if covered is None or payload["seq"] > covered:
                # Straight to this one socket, bypassing the queue and the filters.
                await self.server.emit("new-message", payload, to=sid, ignore_queue=True)
        if self.joining.get(room, {}).get(sid) is held:
            self._pop(self.joining, room, sid)

    def hold_versions(self, sid: str, room: str) -> None:
        """:meth:`hold` for join-chat with since_version: every versioned event."""
        self.vjoining.setdefault(room, {})[sid] = []
        self._marked.setdefault(sid, set()).add(room)

    async def release_versions(self, sid: str, room: str, covered: int) -> None:
        """:meth:`release` by version: the held events above ``covered`` go
        out in order; later ones at or below it are dropped."""
        held = self.vjoining.get(room, {}).get(sid)
        if held is None:
            return
        self.vfloors.setdefault(room, {})[sid] = covered
        while held:
            event, payload = held.pop(0)
            if payload["version"] > covered:
                await self.server.emit(event, payload, to=sid, ignore_queue=True)
        if self.vjoining.get(room, {}).get(sid) is held:
            self._pop(self.vjoining, room, sid)

    def forget(self, sid: str, room: str | None = None) -> None:
        """The socket left ``room`` (None: every room)."""
        marked = self._marked.get(sid, set())
        rooms = [room] if room is not None else list(marked)
        for r in rooms:
            self._pop(self.joining, r, sid)
            self._pop(self.floors, r, sid)
            self._pop(self.vjoining, r, sid)
            self._pop(self.vfloors, r, sid)
            marked.discard(r)
        if not marked:
            self._marked.pop(sid, None)

    @staticmethod
    def _pop(table: dict, room: str, sid: str):
        sids = table.get(room)
        if sids is None:
            return None
        value = sids.pop(sid, None)
        if not sids:
            del table[room]
        return value

    # -- internal events ------------------------------------------------------------

    async def leave_everywhere(self, user_id: str, chat_id: str) -> None:
        """Every socket of ``user_id``, on every process, leaves the chat's room."""
        await self.emit(
            INTERNAL_LEAVE, {"chat_id": chat_id, "user_id": user_id}, namespace="/",
            room=user_room(user_id),
        )  # fmt: skip

    async def _leave_chat_locally(self, namespace: str, payload: dict) -> None:
        chat_id, user_id = payload.get("chat_id"), payload.get("user_id")
        if not isinstance(chat_id, str) or not isinstance(user_id, str):
            return
        room = chat_room(chat_id)
        for sid, _ in list(self.get_participants(namespace, user_room(user_id))):
            # At once, before the next emit this process handles.
            self.forget(sid, room)
            await self.leave_room(sid, namespace, room)
            if self.on_removed is not None:
                # Presence talks to Redis: not on the listener's time.
                task = asyncio.ensure_future(self.on_removed(sid, chat_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def start(self, wait: float = 5.0) -> None:
        """Start listening now, not on the first connection as python-socketio
        would: a client that joins right after a restart must not miss events
        published before the subscription existed. Waits (up to ``wait`` s)
        until Redis confirms the subscription; with Redis down it carries on
        and the listener keeps retrying."""
        if not self.server.manager_initialized:
            self.server.manager_initialized = True
            self.initialize()
        ready = getattr(self, "subscribed", None)
        if ready is not None:
            try:
                await asyncio.wait_for(ready.wait(), wait)
            except TimeoutError:
                log.warning("not subscribed to Redis yet; starting anyway (retrying)")

    async def close(self) -> None:
        """Finish the disconnect handlers queued so far, and stop the pubsub
        listener (python-socketio's shutdown leaves it running)."""
        drained = getattr(self.server, "drained", None)
        if drained is not None:
            await drained()
        if self._leaver is not None:
            await asyncio.shield(self._leaver)
        thread = getattr(self, "thread", None)
        if thread is not None and not thread.done():
            thread.cancel()
            try:
                await thread
            except (asyncio.CancelledError, Exception):
                pass


class LocalChatManager(ChatManagerMixin, AsyncPubSubManager):
    """One process, no Redis: the same hooks, and nothing to publish to."""

    name = "chatd-local"
    channel = None  # nothing to publish to

    def initialize(self):
        AsyncManager.initialize(self)  # no listener: there is no queue

    async def _publish(self, data):
        return None

    async def publish_raw(self, payload: bytes, channel: str | None = None) -> None:
        return None

    async def publish_emits(self, emits: list[dict]) -> None:
        return None


class RedisChatManager(ChatManagerMixin, socketio.AsyncRedisManager):
    """python-socketio's Redis manager, on a channel per room (chatd.relay):

    - an emit to ``chat:ID`` or ``user:ID`` is published on that room's
      channel only (``SPUBLISH``), and this process subscribes to a room's
      channel while at least one of its sockets is in the room: it receives
      the traffic of its own chats and users, not everyone's. The rest of
      python-socketio's relay (emits to a sid or to all, ``disconnect`` /
      ``enter_room`` / ``leave_room`` of a remote sid) uses the control
      channel ``SOCKETIO_CHANNEL``, which every process subscribes to;
    - joining a room waits until Redis confirmed its channel's subscription
      (:meth:`enter_room`), so a join-chat's read of what it missed happens
      after every later publication is sure to reach this process;
    - publishing uses chatd's own Redis client (every call bounded by
      REDIS_TIMEOUT, through the shared breaker), never the listener's
      connection; a failed publish is logged and dropped (API.md: clients
      detect the gap by seq and fetch it), it never fails the request;
    - the listener pings an idle connection and reconnects when Redis stops
      answering, with a short backoff, and resubscribes every channel.
    """

    name = "chatd-redis"

    def __init__(self, url: str, channel: str, publisher, connect_timeout: float, json=None):
        super().__init__(
            url,
            channel=channel,
            json=json,
            redis_options={
                "socket_connect_timeout": connect_timeout,
                # Findable in CLIENT LIST (operators, and the tests' hiccup).
                "client_name": f"chatd-sub-{os.getpid()}",
            },
        )
        self.publisher = publisher
        # Publishes share the Redis client's Batcher, hence its breaker
        # (chatd.redishealth): skipped at once while Redis does not answer.
        self._batch = autopipe.batcher(publisher) if publisher is not None else None
        self._publish_failing = False
        self._own_suffix = f'"host_id":"{self.host_id}"}}'.encode()
        self._inbox: asyncio.Queue = asyncio.Queue()
        cluster = isinstance(publisher, RedisCluster)
        self.relay = relay.Relay(
            channel,
            connect=self._node_client,
            node_of=self._node_of if cluster else (lambda _: ""),
            deliver=self._inbox.put_nowait,
            health=self._batch.health if self._batch is not None else None,
            cluster=cluster,
            ack_timeout=connect_timeout,
            resolve=publisher.initialize if cluster else None,
        )
        # Set while Redis has confirmed our control channel's subscription.
        self.subscribed = self.relay.subscribed

    # -- channels -------------------------------------------------------------------

    def _node_of(self, channel: str) -> str:
        return self.publisher.get_node_from_key(channel).name

    def _node_client(self, node: str):
        """A client for the listener's connection to ``node`` (no read timeout)."""
        if not node:
            return self._get_redis_module().Redis.from_url(self.redis_url, **self.redis_options)
        found = self.publisher.get_node(node_name=node)
        kwargs = {
            k: v
            for k, v in found.connection_kwargs.items()
            if k in ("username", "password", "ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
        }  # fmt: skip
        return aioredis.Redis(host=found.host, port=found.port, **kwargs, **self.redis_options)

    def channel_of(self, room: object) -> str:
        """The channel an emit to ``room`` is published on."""
        return relay.room_channel(self.channel, room) or self.channel

    def basic_enter_room(self, sid, namespace, room, eio_sid=None):
        new = room not in self.rooms.get(namespace, {})
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        if new:
            channel = relay.room_channel(self.channel, room)
            if channel is not None:
                self.relay.want(channel)

    def basic_leave_room(self, sid, namespace, room):
        super().basic_leave_room(sid, namespace, room)
        if room not in self.rooms.get(namespace, {}):
            channel = relay.room_channel(self.channel, room)
            if channel is not None:
                self.relay.drop(channel)

    async def enter_room(self, sid, namespace, room, eio_sid=None):
        """python-socketio's, then wait until the room's channel is subscribed."""
        await super().enter_room(sid, namespace, room, eio_sid=eio_sid)
        channel = relay.room_channel(self.channel, room)
        if channel is not None:
            await self.relay.ready(channel)

    # -- publish ------------------------------------------------------------------------

    async def _publish(self, data):
        room = data.get("room") if data.get("method") in ("emit", "close_room") else None
        return await self.publish_raw(self.json.dumps(data), self.channel_of(room))

    async def publish_emits(self, emits: list[dict]) -> None:
        """Emits (to rooms) published one publication per channel, in order,
        all in one round trip: submitted together, they share one pipeline.
        (A batch of disconnects announces users of up to DISCONNECT_BATCH
        chats; awaited one after the other, they were 10,000 sequential
        round trips in a 10,000-socket storm, ~2.6 s of CPU in redis-py.)"""
        by_channel: dict[str, list[dict]] = {}
        for emit in emits:
            by_channel.setdefault(self.channel_of(emit.get("room")), []).append(emit)
        if not self._batch.health.up:
            self._publish_failed(RedisUnavailable("Redis is not answering"))
            return
        command = self.relay.publish_command
        futures = [
            self._batch.submit((None, (), (command, channel, publication(group, self.host_id))))
            for channel, group in by_channel.items()
        ]
        for i, future in enumerate(futures):
            try:
                await future
            except asyncio.CancelledError:
                for rest in futures[i:]:
                    self._batch.discard(rest)
                raise
            except (RedisError, OSError) as exc:
                self._publish_failed(exc)
            else:
                self._published()

    async def publish_raw(self, payload: bytes | str, channel: str | None = None) -> None:
        try:
            if not self._batch.health.up:
                # The shared breaker: emits do not each wait for REDIS_TIMEOUT
                # (the other processes miss the event either way).
                raise RedisUnavailable("Redis is not answering")
            command = (self.relay.publish_command, channel or self.channel, payload)
            await self._batch.run(None, (), command)
        except (RedisError, OSError) as exc:
            self._publish_failed(exc)
            return None
        self._published()

    def _publish_failed(self, exc: BaseException) -> None:
        if not self._publish_failing:  # once per outage
            log.warning("cannot publish to Redis (%s): other processes miss events", exc)
            self._publish_failing = True

    def _published(self) -> None:
        self.relay.published += 1
        if self._publish_failing:
            self._publish_failing = False

    # -- listen ---------------------------------------------------------------------

    def initialize(self):
        super().initialize()  # starts _thread, which reads _listen
        self.relay.start()

    def _unbatch(self, raw: bytes) -> list:
        """A received payload as python-socketio's messages (dicts): a batch is
        its emits, in order. Our own emits and batches come back too and are
        skipped unparsed: every message that python-socketio's listener would
        drop as ours (all but callbacks) ends with our host_id, and no other
        can (a host_id is a random 128-bit id, and a string inside the JSON
        cannot contain an unescaped quote)."""
        if raw.endswith(self._own_suffix):
            return []
        try:
            data = self.json.loads(raw)
        except ValueError:
            return []
        if isinstance(data, dict) and data.get("method") == BATCH:
            messages = data.get("messages")
            if data.get("host_id") == self.host_id or not isinstance(messages, list):
                return []
            return [m for m in messages if isinstance(m, dict)]
        return [data]

    async def _listen(self):
        """What the relay's readers received, in order (python-socketio's
        ``_thread`` handles each message)."""
        while True:
            raw = await self._inbox.get()
            for data in self._unbatch(raw):
                yield data

    async def close(self) -> None:
        await super().close()
        await self.relay.close()
