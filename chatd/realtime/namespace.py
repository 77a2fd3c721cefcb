"""The default namespace (:class:`ChatNamespace`): the socket event
handlers; and the domain's events turned into emits (:class:`SocketEvents`).

Handlers are thin: parse the payload, take the user from
the handshake (never from the payload), call the domain, answer the ack with
``{"ok": true, ...}`` or ``{"ok": false, "error": {"code", "message"}}``.
"""

from __future__ import annotations

import collections
import contextvars
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import orjson
import socketio
from tornado.httputil import HTTPHeaders

from .. import fairselect, validate
from ..auth import TokenVerifier, bearer
from ..domain import ChatService
from ..errors import ApiError, BadRequest, Forbidden, RateLimited, Unauthorized
from ..presence import LocalPresence, Presence
from ..web import request_id_from
from .managers import ChatManagerMixin
from .rooms import chat_room, emit_message, publication, user_room

log = logging.getLogger("chatd.realtime")

# How many chats one socket may be joined to at once (a frontend shows a few;
# this bounds the work a single connection can cause on every broadcast).
MAX_ROOMS_PER_SOCKET = 200
# A batch of disconnects is logged in one line naming at most this many users
# (all of them in the JSON log's user_ids; each socket's line is at debug).
DISCONNECT_LOG_USERS = 8


# -- run something right after the ack of the current event is sent -----------

_after_ack: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "chatd_after_ack", default=None
)


def after_ack(hook: Callable[[], Awaitable[None]]) -> bool:
    """Run ``hook`` once the ack of the socket event being handled is queued
    to the client (so the client sees the ack first). False when not inside a
    socket event (the caller then runs it itself)."""
    hooks = _after_ack.get()
    if hooks is None:
        return False
    hooks.append(hook)
    return True


# -- domain events -> emits ------------------------------------------------------


class NewMessages:
    """chatd.events.Announcement of new messages over a chat manager: one
    ``new-message`` emit per message, published together (one payload), and
    delivered here through the manager's filters (join hold-back, floors)."""

    __slots__ = ("_sent", "manager", "messages", "remote", "room")

    def __init__(self, manager, messages: list[dict], raws: list[bytes]):
        self.manager = manager
        self.room = chat_room(messages[0]["chat_id"])
        self.messages = messages
        self.remote = None
        self._sent = False
        channel_of = getattr(manager, "channel_of", None)
        if channel_of is not None:
            # The JSON is already made: other processes get it as is, on the
            # chat's channel (one publication for the whole group commit).
            host = manager.host_id
            emits = [emit_message("new-message", orjson.Fragment(r), self.room, host) for r in raws]
            command = manager.relay.publish_command
            self.remote = (channel_of(self.room), publication(emits, host), command)

    async def publish(self) -> None:
        if self.remote is not None:
            self._sent = True  # counted by publish_raw
            await self.manager.publish_raw(self.remote[1], self.remote[0])

    async def deliver(self) -> None:
        if self.remote is not None and not self._sent:
            self.manager.relay.published += 1  # the cache's append script published it
        host = self.manager.host_id
        for message in self.messages:
            await self.manager._handle_emit(emit_message("new-message", message, self.room, host))


class SocketEvents:
    """chatd.events.Events, delivered to Socket.IO rooms (on every process)."""

    def __init__(self, sio: socketio.AsyncServer):
        self.sio = sio

    def created(self, messages: list[dict], raws: list[bytes]) -> NewMessages:
        return NewMessages(self.sio.manager, messages, raws)

    async def message_resent(self, message: dict, raw: bytes) -> None:
        await self.sio.emit("new-message", message, room=chat_room(message["chat_id"]))

    async def message_updated(self, message: dict, raw: bytes) -> None:
        await self.sio.emit("message-updated", message, room=chat_room(message["chat_id"]))

    async def message_deleted(self, chat_id: str, message_id: int, seq: int, version: int) -> None:
        payload = {"id": message_id, "chat_id": chat_id, "seq": seq, "version": version}
        await self.sio.emit("message-deleted", payload, room=chat_room(chat_id))

    async def member_removed(self, chat_id: str, user_id: str) -> None:
        await self.sio.manager.leave_everywhere(user_id, chat_id)
        await self.sio.emit("chat-removed", {"chat_id": chat_id}, room=user_room(user_id))

    async def chat_added(self, chat: dict, user_ids: list[str]) -> None:
        for user_id in user_ids:
            await self.sio.emit("chat-added", {"chat": chat}, room=user_room(user_id))

    async def mentioned(self, user_id: str, message: dict) -> None:
        payload = {"chat_id": message["chat_id"], "message": message}
        await self.sio.emit("mention", payload, room=user_room(user_id))

    async def read_moved(self, chat_id: str, user_id: str, seq: int) -> None:
        payload = {"chat_id": chat_id, "user_id": user_id, "seq": seq}
        await self.sio.emit("read", payload, room=chat_room(chat_id))

    async def typing(self, chat_id: str, user_id: str) -> None:
        # Every socket in the room but the typist's own, on every process.
        await self.sio.manager.emit(
            "typing", {"chat_id": chat_id, "user_id": user_id}, namespace="/",
            room=chat_room(chat_id), skip_room=user_room(user_id),
        )  # fmt: skip


_ENVIRON_KEEP = frozenset(
    {"REMOTE_ADDR", "HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_USER_AGENT", "HTTP_ORIGIN"}
)


def _error_ack(exc: ApiError) -> dict:
    error = {"code": exc.code, "message": exc.public_message}
    if isinstance(exc, RateLimited):
        error["retry_after"] = exc.retry_after  # seconds, as HTTP's Retry-After
    return {"ok": False, "error": error}


def _chat_id_of(payload: object) -> str:
    if isinstance(payload, dict):
        payload = payload.get("chat_id")
    return validate.chat_id(payload)


class ChatNamespace(socketio.AsyncNamespace):
    """The default namespace. Event names have dashes (``join-chat``), so
    dispatch goes through a table rather than ``on_<name>`` methods."""

    def __init__(
        self,
        domain: ChatService,
        verifier: TokenVerifier,
        presence: Presence | LocalPresence | None = None,
    ):
        super().__init__("/")
        self.domain = domain
        self.verifier = verifier
        self.presence = presence or LocalPresence()
        self.presence.notify = self._announce
        self.presence.notify_many = self._announce_many
        self.users: dict[str, str] = {}  # sid -> user id, for this process's sockets
        # sid -> chat rooms its join-chat calls in flight are joining (the cap).
        self._joining: dict[str, collections.Counter] = {}
        self.request_ids: dict[str, str] = {}  # sid -> the handshake's request id (logs)
        self.handlers = {
            "join-chat": self.join_chat,
            "leave-chat": self.leave_chat,
            "send-message": self.send_message,
            "typing": self.typing,
            "mark-read": self.mark_read,
            "react": self.react,
        }

    def _set_server(self, server):
        super()._set_server(server)
        server.manager.on_removed = self._removed

    @property
    def manager(self) -> ChatManagerMixin:
        return self.server.manager

    def _in_room(self, sid: str, room: str) -> bool:
        # One lookup (self.rooms(sid) walks every room of the namespace).
        return sid in self.manager.rooms.get(self.namespace, {}).get(room, ())

    async def _announce(self, chat_id: str, user_id: str, online: bool) -> None:
        payload = {"chat_id": chat_id, "user_id": user_id, "online": online}
        await self.emit("presence", payload, room=chat_room(chat_id))

    async def _announce_many(self, changes: list[tuple[str, str, bool]]) -> None:
        """Several presence changes: delivered here one by one, published to
        the other processes as one batch (one PUBLISH, not one per user)."""
        manager, host = self.manager, self.manager.host_id
        emits = []
        for chat_id, user_id, online in changes:
            payload = {"chat_id": chat_id, "user_id": user_id, "online": online}
            emit = emit_message("presence", payload, chat_room(chat_id), host)
            await manager._handle_emit(emit)
            emits.append(emit)
            # A storm's batch: each event goes to a room that may still hold
            # ~100 dropped sockets waiting their turn (a peek each, the first
            # time), 28-57 ms for 32 events in one turn.
            await fairselect.pace()
        if emits and getattr(manager, "channel", None) is not None:
            await manager.publish_emits(emits)

    async def trigger_event(self, event: str, *args):
        if event == "connect":
            return await self.on_connect(*args)
        if event == "disconnect":
            return await self.on_disconnect(args[0], args[1] if len(args) > 1 else None)
        sid, payload = args[0], (args[1] if len(args) > 1 else None)
        handler = self.handlers.get(event)
        if handler is None:
            return _error_ack(BadRequest(f"unknown event {event!r}"))
        user_id = self.users.get(sid)
        if user_id is None:  # pragma: no cover - connect always records it
            return _error_ack(Unauthorized("not connected"))
        try:
            if handler != self.send_message:  # counted with the send, one round trip
                await self.domain.socket_event(user_id)
            return await handler(sid, user_id, payload)
        except ApiError as exc:
            return _error_ack(exc)
        except Exception:
            log.exception("socket event %s failed", event)
            return {"ok": False, "error": {"code": "internal", "message": "internal error"}}

    async def on_connect(self, sid: str, environ: dict, auth: object = None):
        token = None
        if isinstance(auth, dict):
            token = auth.get("token")
        if not token:
            token = bearer(environ.get("HTTP_AUTHORIZATION"))
        if not token:
            token = (parse_qs(environ.get("QUERY_STRING", "")).get("token") or [None])[0]
        # One log line per connect and disconnect, with the handshake's request
        # id (X-Request-Id if sane, else the socket id); never the token.
        rid = request_id_from(environ.get("HTTP_X_REQUEST_ID")) or sid
        try:
            user_id = self.verifier.verify(token)
        except Unauthorized as exc:
            reason = exc.message if token else "no token in the handshake"
            log.info("socket refused sid=%s rid=%s reason=%s", sid, rid, reason,
                     extra={"event": "socket_refused", "sid": sid, "request_id": rid,
                            "reason": reason})  # fmt: skip
            raise socketio.exceptions.ConnectionRefusedError("unauthorized") from None
        self.users[sid] = user_id
        self.request_ids[sid] = rid
        # python-socketio keeps the handshake's environ for the connection's
        # life; nothing here reads it again. Dropping the rest (a copy of every
        # header, and the per-request class engine.io's Tornado driver makes)
        # is ~4 KB per idle socket.
        handler = environ.get("tornado.handler")
        if handler is not None and environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            # Tornado keeps the upgrade request, with every header parsed, for
            # the websocket's life; only the handshake (and its access line,
            # written with the 101) read them: ~3 KB per idle socket.
            handler.request.headers = HTTPHeaders()
        # Emptied and refilled, not keys deleted: a dict never shrinks its
        # table on deletes (~0.8 KB per socket kept for nothing).
        kept = {k: v for k, v in environ.items() if k in _ENVIRON_KEEP}
        environ.clear()
        environ.update(kept)
        await self.enter_room(sid, user_room(user_id))
        log.info("socket connect sid=%s user=%s rid=%s", sid, user_id, rid,
                 extra={"event": "socket_connect", "sid": sid, "user_id": user_id,
                        "request_id": rid})  # fmt: skip

    async def on_disconnect(self, sid: str, reason: object = None):
        await self.disconnected([(sid, reason)])

    async def disconnected(self, gone: list[tuple[str, object]]) -> None:
        """Sockets that disconnected (a batch, see ChatServer._drain): their
        presence goes in one Redis round trip, and who went offline is
        announced (and published) together."""
        # One log line per disconnect, except for a batch of several (a storm:
        # 10,000 per-socket lines were 1.9 s of a 33 s profile, all on the
        # loop): then one info line for the batch, with its count, users and
        # reasons, and each socket's own line at debug.
        level = logging.INFO if len(gone) == 1 else logging.DEBUG
        each = log.isEnabledFor(level)
        users: list = []
        reasons: dict[str, int] = {}
        for sid, reason in gone:
            user_id = self.users.pop(sid, None)
            self.manager.forget(sid)
            rid = self.request_ids.pop(sid, sid)
            users.append(user_id)
            reasons[str(reason)] = reasons.get(str(reason), 0) + 1
            if each:
                log.log(level, "socket disconnect sid=%s user=%s rid=%s reason=%s", sid, user_id,
                        rid, reason, extra={"event": "socket_disconnect", "sid": sid,
                                            "user_id": user_id, "request_id": rid,
                                            "reason": str(reason)})  # fmt: skip
        if len(gone) > 1 and log.isEnabledFor(logging.INFO):
            shown = " ".join(str(u) for u in users[:DISCONNECT_LOG_USERS])
            more = (
                f" (+{len(users) - DISCONNECT_LOG_USERS} more)"
                if len(users) > DISCONNECT_LOG_USERS
                else ""
            )
            log.info("sockets disconnect count=%d users=%s%s reasons=%s", len(gone), shown, more,
                     ",".join(f"{r}:{n}" for r, n in reasons.items()),
                     extra={"event": "sockets_disconnect", "count": len(gone),
                            "user_ids": users, "sids": [sid for sid, _ in gone],
                            "reasons": reasons})  # fmt: skip
        await self.presence.leave_many([sid for sid, _ in gone])

    async def _removed(self, sid: str, chat_id: str) -> None:
        """A member removal made this local socket leave the chat's room."""
        await self.presence.leave(chat_id, sid)

    async def join_chat(self, sid: str, user_id: str, payload: object) -> dict:
        since_seq = since_version = None
        if isinstance(payload, dict) and payload.get("since_seq") is not None:
            since_seq = validate.json_int(payload["since_seq"], "since_seq")
        if isinstance(payload, dict) and payload.get("since_version") is not None:
            if since_seq is not None:
                raise BadRequest("give at most one of since_seq and since_version")
            since_version = validate.json_int(payload["since_version"], "since_version")
        chat_id = _chat_id_of(payload)
        room = chat_room(chat_id)
        # The cap counts the chats joined and those being joined: the slot is
        # taken here, before the first await, so 300 join-chat sent at once
        # cannot all pass the check before any of them entered its room.
        reserved = self._joining.setdefault(sid, collections.Counter())
        taken = self.manager.chat_rooms(sid, self.namespace)
        full = len(taken) + len(reserved.keys() - taken) >= MAX_ROOMS_PER_SOCKET
        if full and room not in taken and room not in reserved:
            if not reserved:
                del self._joining[sid]
            raise BadRequest(f"a socket may join at most {MAX_ROOMS_PER_SOCKET} chats")
        reserved[room] += 1
        try:
            if since_version is not None:
                return await self._join_since_version(sid, user_id, chat_id, room, since_version)
            return await self._join(sid, user_id, chat_id, room, since_seq)
        finally:
            reserved[room] -= 1
            if reserved[room] <= 0:
                del reserved[room]
                if not reserved and self._joining.get(sid) is reserved:
                    del self._joining[sid]

    async def _join(
        self, sid: str, user_id: str, chat_id: str, room: str, since_seq: int | None
    ) -> dict:
        # Check first (a refused socket never enters the room), then join, then
        # read what was missed: whatever commits after that read is emitted to
        # a room the socket is already in, so join-then-listen leaves no hole.
        # A message committed between entering and reading would reach the
        # socket twice (in `missed` and as an event), so with since_seq the
        # socket's new-message events of this chat are held back until the ack
        # is out, and then only those above what the ack covered are sent.
        await self.domain.readable(user_id, chat_id)
        if since_seq is not None:
            self.manager.hold(sid, room)
        await self.enter_room(sid, room)
        try:
            state = await self.domain.catch_up(user_id, chat_id, since_seq)
        except BaseException:
            # Not readable any more (removed meanwhile), or the store failed.
            self.manager.forget(sid, room)
            await self.leave_room(sid, room)
            await self.presence.leave(chat_id, sid)
            raise
        if since_seq is not None:

            async def release() -> None:
                await self.manager.release(sid, room, state.covered)

            if not after_ack(release):
                await release()
        await self.presence.join(chat_id, user_id, sid)
        if sid not in self.users:
            # Disconnected while joining: its disconnect could not count this.
            self.manager.forget(sid)
            await self.presence.leave(chat_id, sid)
        return {
            "ok": True,
            "chat_id": chat_id,
            "last_seq": state.last_seq,
            "missed": state.missed.fragments(),
            "has_more": state.missed.has_more,
        }

    async def _join_since_version(
        self, sid: str, user_id: str, chat_id: str, room: str, since: int
    ) -> dict:
        """join-chat {chat_id, since_version} (API.md version 2): as with
        since_seq, check, hold this socket's versioned events of the chat,
        enter, read the changes, and after the ack release the held events
        the ack did not cover. (The cap's slot is taken by join_chat.)"""
        await self.domain.readable(user_id, chat_id)
        self.manager.hold_versions(sid, room)
        await self.enter_room(sid, room)
        try:
            state = await self.domain.catch_up_versions(user_id, chat_id, since)
        except BaseException:
            self.manager.forget(sid, room)
            await self.leave_room(sid, room)
            await self.presence.leave(chat_id, sid)
            raise

        async def release() -> None:
            await self.manager.release_versions(sid, room, state.covered)

        if not after_ack(release):
            await release()
        await self.presence.join(chat_id, user_id, sid)
        if sid not in self.users:
            self.manager.forget(sid)
            await self.presence.leave(chat_id, sid)
        return {
            "ok": True,
            "chat_id": chat_id,
            "last_seq": state.last_seq,
            "version": state.version,
            "changed": state.changed.fragments(),
            "has_more": state.changed.has_more,
        }

    async def react(self, sid: str, user_id: str, payload: object) -> dict:
        if not isinstance(payload, dict):
            raise BadRequest("react takes {message_id, emoji, remove?}")
        remove = payload.get("remove", False)
        if remove is None:
            remove = False
        if not isinstance(remove, bool):
            raise BadRequest("remove must be a boolean")
        posted = await self.domain.react(
            user_id, payload.get("message_id"), payload.get("emoji"), remove
        )
        return {"ok": True, "message": orjson.Fragment(posted.raw)}

    async def leave_chat(self, sid: str, user_id: str, payload: object) -> dict:
        chat_id = _chat_id_of(payload)
        self.manager.forget(sid, chat_room(chat_id))
        await self.leave_room(sid, chat_room(chat_id))
        await self.presence.leave(chat_id, sid)
        return {"ok": True, "chat_id": chat_id}

    async def typing(self, sid: str, user_id: str, payload: object) -> dict:
        if not isinstance(payload, dict):
            raise BadRequest("typing takes {chat_id}")
        chat_id = _chat_id_of(payload)
        # The room is the proof of read access: join-chat lets only readers in,
        # and removing a member takes their sockets out (as the original did).
        if not self._in_room(sid, chat_room(chat_id)):
            raise Forbidden("join the chat first")
        sent = await self.domain.typing(user_id, chat_id)
        return {"ok": True, "chat_id": chat_id, "sent": sent}

    async def mark_read(self, sid: str, user_id: str, payload: object) -> dict:
        if not isinstance(payload, dict):
            raise BadRequest("mark-read takes {chat_id, seq}")
        chat_id = _chat_id_of(payload)
        await self.domain.mark_read(user_id, chat_id, payload.get("seq"))
        return {"ok": True, "chat_id": chat_id}

    async def send_message(self, sid: str, user_id: str, payload: object) -> dict:
        if isinstance(payload, str):
            # The original form: re-emit the chat's latest message to the room.
            await self.domain.socket_event(user_id)
            posted = await self.domain.latest(user_id, payload)
            return {"ok": True, "message": orjson.Fragment(posted.raw) if posted else None}
        if not isinstance(payload, dict):
            await self.domain.socket_event(user_id)
            raise BadRequest("send-message takes a chat id or {chat_id, content, client_id}")
        posted = await self.domain.send(
            user_id,
            payload.get("chat_id"),
            payload.get("content"),
            payload.get("client_id"),
            socket_event=True,
            reply_to=payload.get("reply_to"),
        )
        return {"ok": True, "message": orjson.Fragment(posted.raw)}
