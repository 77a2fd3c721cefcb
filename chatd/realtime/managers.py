"""Socket.IO: the python-socketio server, its event handlers and the emitter
that turns domain events into room broadcasts.

Rooms: ``chat:{chat_id}`` for a chat's events, ``user:{user_id}`` for all the
sockets of one user. Handlers are thin: parse the payload, take the user from
the handshake (never from the payload), call the domain, answer the ack with
``{"ok": true, ...}`` or ``{"ok": false, "error": {"code", "message"}}``.

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

python-socketio offers no public hooks for this, so chatd overrides a few of
its internal methods (stable across 5.x, and every one exercised by
tests/test_cluster.py, so an upgrade that changes them fails loudly there):
``AsyncServer._handle_event_internal`` (after-ack hooks),
``AsyncPubSubManager._handle_emit`` / ``_publish`` / ``_listen`` /
``initialize``, ``AsyncServer.manager_initialized`` and
``AsyncNamespace._set_server``; and
``AsyncServer._engineio_server_class`` for chatd's engine.io server
(chatd.delivery, exercised by tests/test_realtime_delivery.py). Also:

- ``AsyncServer._handle_eio_message`` (refuses binary frames and attachment
  packets, acks unparsable events; python-socketio's dispatch otherwise) and
  ``Packet.decode`` (:class:`ChatPacket`, via ``serializer=``): exercised by
  tests/test_socket_hostile.py;
- ``AsyncServer._handle_eio_disconnect`` (rooms left at once, handlers in
  batches), ``BaseManager.basic_enter_room`` / ``basic_leave_room`` /
  ``basic_disconnect`` / ``get_rooms`` (a sid -> rooms index) and the
  ``pending_connect`` / ``pending_disconnect`` tables (dicts with the list
  methods python-socketio calls): exercised by tests/test_disconnect_storm.py
  and every connect and disconnect in tests/test_realtime*.py and
  tests/test_cluster.py;
- per-room channels (:class:`RedisChatManager`): ``BaseManager.rooms`` (a
  room leaves that dict when its last socket leaves: the subscribe and
  unsubscribe points, in ``basic_enter_room`` / ``basic_leave_room``),
  ``AsyncPubSubManager.enter_room`` (awaited by every join, then the
  subscription's confirmation), the message ``method`` / ``room`` fields
  ``_publish`` routes on, and ``_thread`` reading ``_listen`` (python-socketio
  runs it; chatd's listener yields what chatd.relay's readers received):
  exercised by tests/test_cluster.py (each process receives only its chats'
  traffic, and every cross-process test); ``AsyncRedisManager.redis_url`` /
  ``redis_options`` / ``_get_redis_module`` (the listener's connection to one
  Redis) and ``AsyncPubSubManager.host_id`` / ``channel``: the same tests;
  ``AsyncPubSubManager._publish`` again in chatd.emitter (a write-only
  manager publishing on the room's channel): tests/test_cli_seed.py.

The log
filter :class:`_ClientFaults` recognises engine.io's client-error lines by
the name of the internal method that logs them, ``_log_error_once``
(exercised by tests/test_first_hour.py, the "plain line" test).

Tornado's HTTP layer is overridden likewise in chatd.httpconn (exercised by
tests/test_http_edge.py): ``HTTP1Connection._read_message_inner`` (server
side; it reads ``IOStream._read_buffer_size``), ``write_headers``, ``write``,
``finish``, ``_finish_request``,
``HTTP1ServerConnection._server_request_loop``, ``HTTPServer.handle_stream``
(chatd.server.HTTPServer), ``_HTTPRequestContext._apply_xheaders``
(chatd.httpconn.RequestContext), and ``IOStream.write`` and
``BaseIOStream._handle_events`` (chatd.httpconn.ServerStream: Tornado 6.6's
``_handle_events`` with one condition changed; ``write`` reads
``_write_buffer``, ``_connecting``, ``_closed`` and keeps
``_total_write_index`` / ``_total_write_done_index`` in step; tests:
tests/test_http_edge.py and tests/test_websocket_transport.py, a slow reader
each, and the keep-alive POSTs that stay in epoll).

The event loop is asyncio's, built on chatd.fairselect's selector (through
``SelectorEventLoop(selector)``, asyncio's own hook; the selector extends
``selectors.EpollSelector``'s ``select`` / ``register`` / ``unregister`` /
``modify``): websockets, marked in the Socket.IO handler's ``open`` /
``on_close`` (chatd.server), wait their turn in a storm (exercised by
tests/test_fairselect.py, and by tests/test_disconnect_storm.py's 300 sockets
ending in one turn).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import orjson
import redis.asyncio as aioredis
import socketio
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from socketio import packet
from socketio.async_manager import AsyncManager
from socketio.async_pubsub_manager import AsyncPubSubManager
from tornado.httputil import HTTPHeaders

from .. import autopipe, delivery, relay, validate
from ..auth import TokenVerifier, bearer
from ..domain import ChatService
from ..errors import ApiError, BadRequest, Forbidden, RateLimited, Unauthorized
from ..presence import LocalPresence, Presence
from ..redishealth import RedisUnavailable
from ..web import request_id_from

log = logging.getLogger("chatd.realtime")

# How many chats one socket may be joined to at once (a frontend shows a few;
# this bounds the work a single connection can cause on every broadcast).
MAX_ROOMS_PER_SOCKET = 200
# Disconnect handlers run per event-loop turn (see ChatServer._handle_eio_disconnect).
DISCONNECT_BATCH = 32
# Presence events of a batch of disconnects delivered locally per event-loop
# turn: as many as fit in this many seconds (then the loop runs a turn).
ANNOUNCE_SLICE = 0.002
# A batch of disconnects is logged in one line naming at most this many users
# (all of them in the JSON log's user_ids; each socket's line is at debug).
DISCONNECT_LOG_USERS = 8
# Socket.IO packets above this are refused by engine.io (same cap as REST bodies).
MAX_PACKET = 64 * 1024
# The events that carry a message's version (API.md version 2): held back and
# de-duplicated by version for sockets that joined with since_version.
VERSIONED = frozenset({"new-message", "message-updated", "message-deleted"})
# Internal event: the sockets of room ``user:{user_id}`` leave ``chat:{chat_id}``.
INTERNAL_LEAVE = "chatd:member-removed"
# A pub/sub message carrying several emits, in order (a group commit's new
# messages): one PUBLISH, and one message to read on every process.
BATCH = "chatd:batch"


def chat_room(chat_id: str) -> str:
    return f"chat:{chat_id}"


def user_room(user_id: str) -> str:
    return f"user:{user_id}"


def emit_message(event: str, data, room: str, host_id: str) -> dict:
    """python-socketio's pub/sub message for a plain emit to a room."""
    return {
        "method": "emit", "event": event, "data": [data], "binary": False, "namespace": "/",
        "room": room, "skip_sid": None, "callback": None, "host_id": host_id,
    }  # fmt: skip


def publication(emits: list[dict], host_id: str) -> bytes:
    """The payload that tells other processes about ``emits`` (in order)."""
    if len(emits) == 1:
        return orjson.dumps(emits[0])
    # host_id last, as in python-socketio's own messages (see RedisChatManager._unbatch)
    return orjson.dumps({"method": BATCH, "messages": emits, "host_id": host_id})


class OrjsonPackets:
    """The json module python-socketio encodes packets with: orjson, so that
    acks can embed messages already serialised (orjson.Fragment) as they are."""

    @staticmethod
    def dumps(obj, *args, **kwargs) -> str:
        return orjson.dumps(obj).decode()

    @staticmethod
    def loads(text, *args, **kwargs):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            # orjson refuses lone UTF-16 surrogates ("\ud800"), which JavaScript
            # sends happily (a string cut inside an emoji). Unparsed, the event
            # would get no ack at all; the standard parser takes them, and
            # validate refuses such a string with a proper error ack.
            try:
                return json.loads(text)
            except RecursionError:
                # Nested deeper than orjson's 1,024 levels: refused (a
                # ValueError, answered by ChatPacket), not a RecursionError.
                raise ValueError("JSON nested too deeply") from None


class ChatPacket(socketio.packet.Packet):
    """python-socketio's packet, whose decoding never raises: a packet whose
    payload does not parse keeps its type, namespace and ack id, with
    ``invalid`` saying why, so that the server can answer the ack with an
    error (:meth:`ChatServer._handle_eio_message`). python-socketio would
    raise from the decode, and engine.io log the traceback with no ack."""

    invalid: str | None = None

    def decode(self, encoded_packet):
        try:
            return super().decode(encoded_packet)
        except Exception as exc:  # ValueError, TypeError: whatever the bytes were
            self.invalid = str(exc)[:100] or type(exc).__name__
            self.data = None
            return 0


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


class ChatServer(socketio.AsyncServer):
    """python-socketio's server, plus :func:`after_ack` hooks, on chatd's
    engine.io server (:class:`chatd.delivery.EngineServer`: packets to an idle
    websocket are written at once instead of through a writer task).

    The handler's return value becomes the ack, sent by python-socketio after
    the handler returns; a join-chat must release the events it held back
    only after that. The event handler runs inside this method's task, so a
    context variable carries the hooks from the handler to here."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Disconnects whose handlers have yet to run (namespace, sid, reason),
        # and the task running them (see _handle_eio_disconnect).
        self._gone: collections.deque = collections.deque()
        self._draining: asyncio.Task | None = None

    def _engineio_server_class(self):
        return delivery.EngineServer

    # -- hostile input: refused in a line, never a traceback -----------------------

    async def _handle_eio_message(self, eio_sid, data):
        """python-socketio's dispatch of an engine.io message, minus what
        chatd's API never carries: a binary frame or a packet announcing
        binary attachments closes the socket (python-socketio would buffer
        every attachment announced, up to 10^10 of them: 234 MiB from one
        socket), and a packet that does not parse is answered with an
        ``invalid_json`` ack when it has an ack id. Never raises: engine.io
        would log each failure with a traceback."""
        if not isinstance(data, str):
            delivery.hostile("binary frame", self._sid_of(eio_sid))
            await self._refuse(eio_sid)
            return
        pkt = self.packet_class(encoded_packet=data)
        kind = pkt.packet_type
        if kind in (packet.BINARY_EVENT, packet.BINARY_ACK):
            delivery.hostile("binary attachments announced", self._sid_of(eio_sid))
            await self._refuse(eio_sid)
            return
        if pkt.invalid is not None:
            sid = self.manager.sid_from_eio_sid(eio_sid, pkt.namespace or "/")
            delivery.hostile(f"unparsable packet ({pkt.invalid})", sid)
            if kind == packet.EVENT and pkt.id is not None and sid is not None:
                error = {"code": "invalid_json", "message": "the event is not valid JSON"}
                await self._send_packet(eio_sid, self.packet_class(
                    packet.ACK, namespace=pkt.namespace or "/", id=pkt.id,
                    data=[{"ok": False, "error": error}],
                ))  # fmt: skip
            elif kind not in (packet.EVENT, packet.ACK):
                await self._refuse(eio_sid)  # not even a packet we know
            return
        if kind == packet.CONNECT:
            await self._handle_connect(eio_sid, pkt.namespace, pkt.data)
        elif kind == packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, pkt.namespace, self.reason.CLIENT_DISCONNECT)
        elif kind == packet.EVENT:
            if not isinstance(pkt.data, list) or not pkt.data or not isinstance(pkt.data[0], str):
                delivery.hostile("event without a name", self._sid_of(eio_sid))
                return
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        elif kind == packet.ACK:
            await self._handle_ack(eio_sid, pkt.namespace, pkt.id, pkt.data or [])
        else:  # CONNECT_ERROR (server to client only) or an unknown type
            delivery.hostile(f"unexpected packet type {kind!r}"[:80], self._sid_of(eio_sid))
            await self._refuse(eio_sid)

    def _sid_of(self, eio_sid: str) -> str:
        return self.manager.sid_from_eio_sid(eio_sid, "/") or eio_sid

    async def _refuse(self, eio_sid: str) -> None:
        """Close the connection: engine.io's disconnect only sends a CLOSE
        packet and waits for the client to hang up, which a hostile client
        does not; the websocket is closed here too."""
        sock = self.eio.sockets.get(eio_sid)
        try:
            await self.eio.disconnect(eio_sid)
        except Exception:  # already gone
            pass
        handler = getattr(sock, "_ws_handler", None)
        if handler is not None:
            handler.close()

    # -- disconnects: O(own rooms) now, handlers in batches -----------------------

    async def _handle_eio_disconnect(self, eio_sid, reason):
        """python-socketio's, in two halves. At once: the socket leaves every
        room (O(its own rooms) with ChatManagerMixin's index; python-socketio
        walked every room of the process, ~1 ms per socket at 10,000 sockets),
        so no broadcast is written to it any more. Later, in batches of
        DISCONNECT_BATCH per event-loop turn: the disconnect handlers (presence
        in one Redis round trip per batch, the log line). A load balancer
        dropping 10,000 sockets at once so costs a series of short turns
        instead of one 10 s freeze."""
        manager = self.manager
        for namespace in list(manager.get_namespaces()):
            sid = manager.sid_from_eio_sid(eio_sid, namespace)
            if sid is None or not manager.is_connected(sid, namespace):
                continue
            manager.pre_disconnect(sid, namespace)
            await manager.disconnect(sid, namespace, ignore_queue=True)
            self._gone.append((namespace, sid, reason or self.reason.CLIENT_DISCONNECT))
        self._binary_packet.pop(eio_sid, None)
        self.environ.pop(eio_sid, None)
        if self._gone and self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self._gone:
                batch: dict[str, list] = {}
                for _ in range(min(DISCONNECT_BATCH, len(self._gone))):
                    namespace, sid, reason = self._gone.popleft()
                    batch.setdefault(namespace, []).append((sid, reason))
                for namespace, gone in batch.items():
                    handler = self.namespace_handlers.get(namespace)
                    try:
                        if isinstance(handler, ChatNamespace):
                            await handler.disconnected(gone)
                        else:  # pragma: no cover - chatd has one namespace
                            for sid, reason in gone:
                                await self._trigger_event("disconnect", namespace, sid, reason)
                    except Exception:
                        log.exception("disconnect handler failed")
                await asyncio.sleep(0)  # let requests and events run between batches
        finally:
            self._draining = None

    async def drained(self) -> None:
        """Until every disconnect so far has had its handler run."""
        while self._draining is not None:
            await asyncio.shield(self._draining)

    async def _handle_event_internal(self, server, sid, eio_sid, data, namespace, id):
        hooks: list = []
        token = _after_ack.set(hooks)
        try:
            await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
        finally:
            _after_ack.reset(token)
            for hook in hooks:
                try:
                    await hook()
                except Exception:
                    log.exception("after-ack hook failed")


class _ClientFaults(logging.Filter):
    """Drops what engine.io logs about a client's bad request (``curl
    /socket.io/``, an unknown session or transport: ERROR the first time), a
    method it does not take, or a handshake chatd refused: the access line
    already shows the 4xx, and chatd logs refused sockets with their reason.
    What python-socketio warns about a client's packets (an ack nobody asked
    for, a packet for a namespace the socket is not in) becomes chatd's
    rate-limited "refused from socket" line: a flood of them costs one line a
    second. Tracebacks (handler errors) and everything else pass."""

    _WARNINGS = ("Method %s not supported", "Application rejected connection")
    _CLIENT_PACKETS = (
        "%s is not connected to namespace %s",
        "Unknown callback received, ignoring.",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return True
        if record.msg in self._CLIENT_PACKETS:
            delivery.hostile(record.getMessage(), None)
            return False
        return record.funcName != "_log_error_once" and record.msg not in self._WARNINGS


def _library_logger(name: str) -> logging.Logger:
    """A logger for python-socketio or engine.io. Given ``False`` they use
    their own logger and add a StreamHandler to it (a second, unformatted copy
    of each line, and one more handler per server made); given a logger they
    use it as it is: warnings and errors, through chatd's handlers."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.WARNING)  # their INFO is per-packet traffic
    if not any(isinstance(f, _ClientFaults) for f in logger.filters):
        logger.addFilter(_ClientFaults())
    return logger


def create_server(cors_origins: tuple[str, ...], client_manager=None) -> socketio.AsyncServer:
    return ChatServer(
        async_mode="tornado",
        client_manager=client_manager or LocalChatManager(),
        # No FRONTENDADDRES: browsers on other origins are refused (clients
        # that send no Origin header, like native apps and tests, are not).
        cors_allowed_origins=list(cors_origins) if cors_origins else [],
        cors_credentials=True,
        json=OrjsonPackets,
        serializer=ChatPacket,
        max_http_buffer_size=MAX_PACKET,
        logger=_library_logger("chatd.socketio"),
        engineio_logger=_library_logger("chatd.engineio"),
    )


class OriginGuard:
    """The Origin check of every Socket.IO request (polling and websocket),
    made before engine.io or Tornado see it, so that a refused browser gets
    API.md's JSON 403 (Tornado's own refusal is an HTML page, engine.io's a
    400 logged as an ERROR). Allowed: no Origin (native clients), an origin in
    FRONTENDADDRES, any with ``*``, and the same origin when FRONTENDADDRES is
    empty. Each refused origin is logged once, naming FRONTENDADDRES."""

    MAX_LOGGED = 1000  # distinct origins remembered (a flood logs no more)

    def __init__(self, allowed: tuple[str, ...]):
        self.allowed = allowed
        self._logged: set[str] = set()

    def refusal(self, origin: str | None, host: str | None) -> Forbidden | None:
        allowed = self.allowed
        if not origin or "*" in allowed or origin in allowed:
            return None
        if not allowed and urlsplit(origin).netloc.lower() == (host or "").lower():
            return None
        if origin not in self._logged and len(self._logged) < self.MAX_LOGGED:
            self._logged.add(origin)
            log.warning(
                "socket refused: origin %s is not in FRONTENDADDRES (%s): add it there to let "
                "that frontend connect (logged once per origin)",
                origin, ", ".join(allowed) or "empty: no cross-origin browser",
                extra={"event": "socket_refused", "origin": origin},
            )  # fmt: skip
        return Forbidden(f"origin {origin} is not allowed to connect")


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
        of its rooms now, so broadcasts stop walking it. Profiled, 10,000
        dropped sockets: the presence events of their disconnect batches
        walked ~500,000 room entries of sockets still waiting. The
        connection's own room (None) stays: its disconnect, in its turn,
        needs it (and leaves the rest, if a join re-entered one meanwhile)."""
        for room in list(self._rooms_of.get((namespace, sid), ())):
            if room is not None:
                self.basic_leave_room(sid, namespace, room)

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
        start = time.perf_counter()
        for chat_id, user_id, online in changes:
            payload = {"chat_id": chat_id, "user_id": user_id, "online": online}
            emit = emit_message("presence", payload, chat_room(chat_id), host)
            await manager._handle_emit(emit)
            emits.append(emit)
            if time.perf_counter() - start > ANNOUNCE_SLICE:
                # A storm's batch: each event goes to a room that may still
                # hold ~100 dropped sockets waiting their turn (a peek each,
                # the first time), 28-57 ms for 32 events in one turn.
                await asyncio.sleep(0)
                start = time.perf_counter()
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
