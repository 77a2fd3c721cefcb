"""The python-socketio server (:class:`ChatServer`, on chatd's engine.io
server), made by :func:`create_server`; the Origin check of every Socket.IO
request (:class:`OriginGuard`); and what python-socketio and engine.io log
(:func:`_library_logger`)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from urllib.parse import urlsplit

import orjson
import socketio
from socketio import packet

from .. import delivery, fairselect
from ..errors import Forbidden
from .managers import LocalChatManager
from .namespace import ChatNamespace, _after_ack

log = logging.getLogger("chatd.realtime")

# Disconnect handlers run per event-loop turn (see ChatServer._handle_eio_disconnect).
DISCONNECT_BATCH = 32
# Socket.IO packets above this are refused by engine.io (same cap as REST bodies).
MAX_PACKET = 64 * 1024


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
                await fairselect.pace()  # let requests and events run between batches
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
