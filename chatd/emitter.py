"""A write-only Socket.IO emitter: :class:`~chatd.events.Events` for tools that
change chats without running a server (chatctl seed).

It publishes on the same Redis channels as chatd's ``RedisChatManager`` (the
room's channel, see chatd.relay; SPUBLISH, or PUBLISH on Redis 6), in the
same packet shape, so every running chatd
process delivers the events to the sockets in the room, exactly as if one of
them had made the change. Publishing is best effort, as in chatd: PostgreSQL
holds the truth and a client that misses an event sees the gap in ``seq``.
"""

from __future__ import annotations

import orjson
import socketio
from redis.asyncio.cluster import RedisCluster

from . import autopipe, cache, relay
from .realtime import OrjsonPackets, chat_room, emit_message, publication, user_room


class _Published:
    """chatd.events.Announcement for a process without sockets: publish only."""

    __slots__ = ("_payload", "manager", "remote", "room")

    def __init__(self, manager, room: str, payload: bytes):
        self.manager = manager
        self.room = room
        # Not published by the cache's script: the command is known only once
        # connected (publish below).
        self.remote = None
        self._payload = payload

    async def publish(self) -> None:
        payload, self._payload = self._payload, None
        if payload is not None:
            await _publish(self.manager, self.room, payload)

    async def deliver(self) -> None:
        await self.publish()  # unless already published (no remote: nobody else did)


async def _publish(manager, room: str | None, payload: bytes | str) -> None:
    """Publish on the room's channel, as chatd does; best effort (see above)."""
    try:
        if manager.chatd_redis is None:
            manager.chatd_redis = cache.connect(manager.redis_url, manager.chatd_timeout)
        client = manager.chatd_redis
        batch = autopipe.batcher(client)  # bounded by the timeout, as in chatd
        if manager.chatd_command is None:
            if isinstance(client, RedisCluster):
                manager.chatd_command = "SPUBLISH"
            else:
                info = await batch.run(None, (), ("INFO", "server"))
                sharded = relay.redis_major(info) >= 7
                manager.chatd_command = "SPUBLISH" if sharded else "PUBLISH"
        channel = relay.room_channel(manager.channel, room) or manager.channel
        await batch.run(None, (), (manager.chatd_command, channel, payload))
    except Exception:
        pass


class _WriteOnly(socketio.AsyncRedisManager):
    """python-socketio's write-only manager, publishing through a chatd Redis
    client (one Redis or a Redis Cluster: REDIS_CLUSTER_NODES)."""

    chatd_command: str | None = None
    chatd_redis = None
    chatd_timeout = 1.0

    async def _publish(self, data):
        room = data.get("room") if data.get("method") in ("emit", "close_room") else None
        await _publish(self, room, self.json.dumps(data))


class RedisEmitter:
    """chatd.events.Events over a write-only ``socketio.AsyncRedisManager``."""

    def __init__(self, redis_url: str, channel: str, timeout: float = 1.0):
        self.manager = _WriteOnly(
            redis_url,
            channel=channel,
            write_only=True,
            json=OrjsonPackets,
            redis_options={"socket_connect_timeout": timeout, "socket_timeout": timeout},
        )
        self.manager.chatd_timeout = timeout

    async def _emit(self, event: str, data: dict, chat_id: str) -> None:
        await self.manager.emit(event, data, room=chat_room(chat_id), namespace="/")

    def created(self, messages: list[dict], raws: list[bytes]) -> _Published:
        room = chat_room(messages[0]["chat_id"])
        host = self.manager.host_id
        emits = [emit_message("new-message", orjson.Fragment(r), room, host) for r in raws]
        return _Published(self.manager, room, publication(emits, host))

    async def message_resent(self, message: dict, raw: bytes) -> None:
        await self._emit("new-message", message, message["chat_id"])

    async def message_updated(self, message: dict, raw: bytes) -> None:
        await self._emit("message-updated", message, message["chat_id"])

    async def message_deleted(self, chat_id: str, message_id: int, seq: int, version: int) -> None:
        payload = {"id": message_id, "chat_id": chat_id, "seq": seq, "version": version}
        await self._emit("message-deleted", payload, chat_id)

    async def chat_added(self, chat: dict, user_ids: list[str]) -> None:
        for user_id in user_ids:
            await self.manager.emit(
                "chat-added", {"chat": chat}, room=user_room(user_id), namespace="/"
            )

    async def mentioned(self, user_id: str, message: dict) -> None:
        payload = {"chat_id": message["chat_id"], "message": message}
        await self.manager.emit("mention", payload, room=user_room(user_id), namespace="/")

    async def member_removed(self, chat_id: str, user_id: str) -> None:
        # Not possible from outside a server: making a user's sockets leave a
        # room needs the process that holds them (their sids). No chatctl
        # command removes members; one that does must go through chatd.
        pass

    async def read_moved(self, chat_id: str, user_id: str, seq: int) -> None:
        payload = {"chat_id": chat_id, "user_id": user_id, "seq": seq}
        await self._emit("read", payload, chat_id)

    async def close(self) -> None:
        redis = self.manager.chatd_redis
        if redis is not None:
            await cache.disconnect(redis)
