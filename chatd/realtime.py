"""Socket.IO: the python-socketio server, its event handlers and the emitter
that turns domain events into room broadcasts.

Rooms: ``chat:{chat_id}`` for a chat's events, ``user:{user_id}`` for all the
sockets of one user. Handlers are thin: parse the payload, take the user from
the handshake (never from the payload), call the domain, answer the ack with
``{"ok": true, ...}`` or ``{"ok": false, "error": {"code", "message"}}``.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs

import orjson
import socketio

from . import validate
from .auth import TokenVerifier, bearer
from .domain import ChatService
from .errors import ApiError, BadRequest, RateLimited, Unauthorized

log = logging.getLogger("chatd.realtime")

# How many chats one socket may be joined to at once (a frontend shows a few;
# this bounds the work a single connection can cause on every broadcast).
MAX_ROOMS_PER_SOCKET = 200
# Socket.IO packets above this are refused by engine.io (same cap as REST bodies).
MAX_PACKET = 64 * 1024


def chat_room(chat_id: str) -> str:
    return f"chat:{chat_id}"


def user_room(user_id: str) -> str:
    return f"user:{user_id}"


class OrjsonPackets:
    """The json module python-socketio encodes packets with: orjson, so that
    acks can embed messages already serialised (orjson.Fragment) as they are."""

    @staticmethod
    def dumps(obj, *args, **kwargs) -> str:
        return orjson.dumps(obj).decode()

    @staticmethod
    def loads(text, *args, **kwargs):
        return orjson.loads(text)


def create_server(cors_origins: tuple[str, ...], client_manager=None) -> socketio.AsyncServer:
    return socketio.AsyncServer(
        async_mode="tornado",
        client_manager=client_manager,
        # No FRONTENDADDRES: browsers on other origins are refused (clients
        # that send no Origin header, like native apps and tests, are not).
        cors_allowed_origins=list(cors_origins) if cors_origins else [],
        cors_credentials=True,
        json=OrjsonPackets,
        max_http_buffer_size=MAX_PACKET,
        logger=False,
        engineio_logger=False,
    )


class SocketEvents:
    """chatd.events.Events, delivered to Socket.IO rooms."""

    def __init__(self, sio: socketio.AsyncServer):
        self.sio = sio

    async def message_created(self, message: dict, raw: bytes) -> None:
        await self.sio.emit("new-message", message, room=chat_room(message["chat_id"]))

    async def message_updated(self, message: dict, raw: bytes) -> None:
        await self.sio.emit("message-updated", message, room=chat_room(message["chat_id"]))

    async def message_deleted(self, chat_id: str, message_id: int, seq: int) -> None:
        payload = {"id": message_id, "chat_id": chat_id, "seq": seq}
        await self.sio.emit("message-deleted", payload, room=chat_room(chat_id))

    async def member_removed(self, chat_id: str, user_id: str) -> None:
        room = chat_room(chat_id)
        for sid, _eio_sid in list(self.sio.manager.get_participants("/", user_room(user_id))):
            await self.sio.leave_room(sid, room)

    async def read_moved(self, chat_id: str, user_id: str, seq: int) -> None:
        payload = {"chat_id": chat_id, "user_id": user_id, "seq": seq}
        await self.sio.emit("read", payload, room=chat_room(chat_id))


def _error_ack(exc: ApiError) -> dict:
    error = {"code": exc.code, "message": exc.message}
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

    def __init__(self, domain: ChatService, verifier: TokenVerifier):
        super().__init__("/")
        self.domain = domain
        self.verifier = verifier
        self.users: dict[str, str] = {}  # sid -> user id, for this process's sockets
        self.handlers = {
            "join-chat": self.join_chat,
            "leave-chat": self.leave_chat,
            "send-message": self.send_message,
        }

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
        try:
            user_id = self.verifier.verify(token)
        except Unauthorized:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized") from None
        self.users[sid] = user_id
        await self.enter_room(sid, user_room(user_id))
        log.debug("socket %s connected as %s", sid, user_id)

    async def on_disconnect(self, sid: str, reason: object = None):
        user_id = self.users.pop(sid, None)
        log.debug("socket %s (%s) disconnected: %s", sid, user_id, reason)

    async def join_chat(self, sid: str, user_id: str, payload: object) -> dict:
        since_seq = None
        if isinstance(payload, dict) and payload.get("since_seq") is not None:
            since_seq = validate.json_int(payload["since_seq"], "since_seq")
        chat_id = _chat_id_of(payload)
        room = chat_room(chat_id)
        rooms = self.rooms(sid)
        if room not in rooms and len(rooms) > MAX_ROOMS_PER_SOCKET + 1:
            raise BadRequest(f"a socket may join at most {MAX_ROOMS_PER_SOCKET} chats")
        # Check first (a refused socket never enters the room), then join, then
        # read what was missed: whatever commits after that read is emitted to
        # a room the socket is already in, so join-then-listen leaves no hole.
        await self.domain.readable(user_id, chat_id)
        await self.enter_room(sid, room)
        try:
            state = await self.domain.catch_up(user_id, chat_id, since_seq)
        except ApiError:
            await self.leave_room(sid, room)
            raise
        return {
            "ok": True,
            "chat_id": chat_id,
            "last_seq": state.last_seq,
            "missed": state.missed.fragments(),
            "has_more": state.missed.has_more,
        }

    async def leave_chat(self, sid: str, user_id: str, payload: object) -> dict:
        chat_id = _chat_id_of(payload)
        await self.leave_room(sid, chat_room(chat_id))
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
        )
        return {"ok": True, "message": orjson.Fragment(posted.raw)}
