"""Room broadcasts without a task per recipient.

python-socketio's AsyncManager.emit encodes a broadcast once, then creates an
asyncio task per recipient to queue the same packet on each socket, and waits
for them all. Queueing a packet on an engine.io socket is an
``await queue.put()`` on an unbounded queue, which never suspends, so the
tasks buy no concurrency: at 500 sockets and 20 messages/s they were 10,000
task creations a second. chatd's managers (chatd.realtime) queue the packet
on each recipient in turn instead. Every packet still goes through the
socket's own ``send()``, so events and acks keep the order they were sent in.

That ``send()`` is :class:`DirectSocket`'s: when the socket's websocket writer
is idle, the packet is framed and written right there, with no task wake-up
(see the class for why that keeps the order).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import time
from urllib.parse import urlsplit

import engineio
from engineio import exceptions
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket
from socketio import packet

from . import fairselect


async def _deliver(manager, event, data, namespace, room, skip_sid) -> None:
    rooms = manager.rooms.get(namespace)
    if not rooms or (isinstance(room, str) and room not in rooms):
        return  # no socket of that room here: nothing to encode
    if isinstance(data, tuple):
        data = list(data)
    elif data is not None:
        data = [data]
    else:
        data = []
    skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
    encoded = manager.server.packet_class(
        packet.EVENT, namespace=namespace, data=[event, *data]
    ).encode()
    if not isinstance(encoded, list):
        encoded = [encoded]
    eio_pkts = [eio_packet.Packet(eio_packet.MESSAGE, p) for p in encoded]
    # Straight to each engine.io socket's send(): python-socketio's
    # _send_eio_packet and engine.io's send_packet only look the socket up
    # (two coroutines per recipient, under fanout 10,000 a second).
    get_socket = manager.server.eio._get_socket
    # A snapshot: a send that finds its socket timed out closes it, which
    # changes the room while we walk it.
    for sid, eio_sid in list(manager.get_participants(namespace, room)):
        if sid in skip:
            continue
        try:
            sock = get_socket(eio_sid)
        except KeyError:  # gone or closed meanwhile: nothing to send to
            continue
        if not getattr(sock, "_ended", False):
            for pkt in eio_pkts:
                await sock.send(pkt)
            if not getattr(sock, "_ended", False):
                continue
        # Its connection is over (or send() just found its peer gone) and its
        # close waits its turn (a storm): its packets are dropped, and it
        # leaves its rooms now rather than be walked by every broadcast
        # until then (chatd.realtime's managers).
        leave = getattr(manager, "leave_rooms_early", None)
        if leave is not None:
            leave(sid, namespace)


async def deliver_message(manager, message: dict) -> bool:
    """Deliver a pub/sub emit message (python-socketio's format) to this
    process's sockets of its room; False when it needs python-socketio's own
    path (an emit with a callback, or binary data)."""
    if message.get("callback") is not None or message.get("binary"):
        return False
    data = message["data"]
    if isinstance(data, list):
        data = data[0] if len(data) == 1 else tuple(data)
    await _deliver(
        manager,
        message["event"],
        data,
        message.get("namespace") or "/",
        message.get("room"),
        message.get("skip_sid"),
    )
    return True


class HostileLog:
    """One short log line per second at most for input that only a broken
    or hostile client sends (binary frames, unparsable packets): never a
    traceback, and a flood costs one line a second plus a count."""

    def __init__(self, logger: logging.Logger, every: float = 1.0):
        self.logger = logger
        self.every = every
        self._next = 0.0
        self._skipped = 0

    def __call__(self, what: str, sid: str | None) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        self._next = now + self.every
        more = f" (+{self._skipped} more since)" if self._skipped else ""
        self._skipped = 0
        self.logger.warning("refused from socket %s: %s%s", sid, what, more,
                            extra={"event": "socket_refused_input", "sid": sid})  # fmt: skip


# Refused input, logged by chatd.realtime and here (one logger, one rate).
hostile = HostileLog(logging.getLogger("chatd.realtime"))


# -- engine.io sockets that write to an idle websocket at once -----------------


class DirectSocket(AsyncSocket):
    """An engine.io socket whose websocket is driven by callbacks: no reader
    coroutine and no writer task live while the socket is idle.

    engine.io (python-engineio's ``AsyncSocket``) serves a websocket with two
    coroutine chains that last as long as it: the connect (or upgrade)
    request's handling, suspended in ``_websocket_handler``'s reader loop on
    the next frame, and a writer task parked on the socket's queue. Held by
    every idle websocket, with the frames and locals they keep (the request's
    environ, the driver's wrapper), they were most of its memory
    (docs/PERFORMANCE.md, "conns"). Here, once the websocket is the socket's
    transport, ``_websocket_handler`` returns and:

    - **Reading**: each frame comes from Tornado's ``on_message`` (chatd's
      handler, chatd.server, with frames read from callbacks by
      chatd.wsframes) to :meth:`_on_frame`. Frames are handled one after the
      other in arrival order, each ``receive()`` finished before the next
      starts, as engine.io's reader did: by a task that exists only while
      frames are waiting (a socket.io CONNECT waits for its room's
      subscription; an event sent right behind it waits for that). A pong
      with nothing ahead of it is handled in the callback itself. The
      connection's end (``None`` from ``on_close``) is handled in its turn
      after the frames before it, exactly as engine.io's reader ended
      (:meth:`_end`).
    - **Writing, the direct path**: a packet sent while nothing is queued,
      to a websocket that is upgraded and not closing, is encoded and framed
      at once, in the caller's call (``_write`` is the websocket's
      synchronous ``write_message`` while that path is open). Under fanout
      that saves a writer wake-up per socket per event.
    - **Writing, queued**: anything put on the socket's queue (engine.io's
      own packets while it closes, a packet whose direct write failed, what
      was queued during an upgrade) makes the queue call
      :meth:`_schedule_flush`; in a later loop turn :meth:`_flush` writes
      everything queued, in order, and reopens the direct path. Until then
      the queue is not empty, so every packet sent meanwhile is queued
      behind: events, acks and pings of one socket keep the order they were
      sent in. A ``None`` taken off the queue, or a write that fails, ends
      the writing and closes the websocket, as engine.io's writer did.

    Long-polling and the upgrade's probe handshake are engine.io's own.
    engine.io has no factory for its sockets: :class:`EngineServer` makes each
    new socket a DirectSocket (see there).
    """

    # The websocket's write_message while the direct path is open; else None.
    _write = None
    # The Tornado handler of this socket's websocket (once it is served here).
    _ws_handler = None
    # Set when the websocket's connection is over (its reader ended): packets
    # for it are dropped at once instead of written to a dead stream (a mass
    # disconnect: the rooms still hold the sockets waiting for their close).
    _ended = False
    # Frames waiting for the reading task, while it runs (None otherwise).
    _inbox = None
    # The connection's end has been read: later frames are ignored.
    _reading_over = False
    # The loop's handle of a scheduled _flush.
    _flush_handle = None
    # The writing ended (a None was written, or a write failed).
    _writer_over = False

    async def send(self, pkt):
        """Send a packet: written now when the direct path is open, else queued
        (engine.io's send, otherwise unchanged)."""
        # check_ping_timeout() has something to do only for a closed socket or
        # an unanswered ping past ping_timeout: called only then (it is two
        # coroutines per packet otherwise).
        if self._ended:
            return  # the connection is over; its close is only waiting its turn
        if fairselect.storming() and self._peer_gone():
            self._ended = True
            return
        last_ping = self.last_ping
        due = self.closed or (last_ping and time.time() - last_ping > self.server.ping_timeout)
        if due and not await self.check_ping_timeout():
            return
        # _write_now, inline: this is every delivery's path under fanout.
        write = self._write
        if write is not None and not self.closing and self.queue.empty():
            try:
                data = pkt.encode()
                write(data, binary=isinstance(data, bytes))
                self.server.direct_writes += 1
                return
            except Exception:
                self._write = None  # see _write_now
        await self.queue.put(pkt)

    def _write_now(self, pkt) -> bool:
        """Write ``pkt`` on the direct path if it is open (see the class)."""
        write = self._write
        if write is None or self.closing or not self.queue.empty():
            return False
        try:
            data = pkt.encode()
            write(data, binary=isinstance(data, bytes))
        except Exception:
            # A closed websocket, typically. Not raised to the caller (a
            # broadcast would stop short of the other sockets): queued, the
            # packet meets the same failure in _flush, which ends the
            # connection as engine.io's writer does.
            self._write = None
            return False
        self.server.direct_writes += 1
        return True

    def _peer_gone(self) -> bool:
        """During a storm (chatd.fairselect): whether this websocket's
        descriptor is waiting its turn because its client is gone (what the
        kernel has for it to read is the end, or a reset). Its end-of-file
        will be read in its turn; until then, writing to it costs the failed
        write and a close in the broadcaster's turn: presence events and
        messages to the rooms of 10,000 dropped sockets were 2,500-3,200 such
        writes in single turns of 90-230 ms. One peek per such socket: once
        gone, ``_ended`` drops its packets for free. Data sent before the end
        is read first (a peek that finds it says "not gone"), as is a live
        socket's."""
        conn = getattr(self._ws_handler, "ws_connection", None)
        sock = getattr(getattr(conn, "stream", None), "socket", None)
        return sock is not None and fairselect.peer_gone(sock)

    # -- pings: a timer per socket, not a sleeping task ------------------------

    def schedule_ping(self):
        # engine.io sleeps ping_interval in a task of its own per socket (~1.4
        # KB each, held by every idle socket); a timer handle is ~0.2 KB.
        if self.last_ping:
            self.last_ping = None
            asyncio.get_running_loop().call_later(self.server.ping_interval, self._ping_due)

    def _ping_due(self) -> None:
        # engine.io's _send_ping after its sleep; on the direct path without a
        # task when it is open (send() would write it there too).
        if not self.closing and not self.closed:
            self.last_ping = time.time()
            ping = eio_packet.Packet(eio_packet.PING)
            if not self._ended and not fairselect.storming() and self._write_now(ping):
                return
            task = asyncio.ensure_future(self.send(ping))
            _pinging.add(task)
            task.add_done_callback(_pinging.discard)

    async def check_ping_timeout(self):
        if await super().check_ping_timeout():
            return True
        # The client stopped answering pings and engine.io closed the socket.
        # Close its websocket too: nothing else ends a half-open connection's
        # reading, and its end (see _end) finishes the socket.
        handler = self._ws_handler
        if handler is not None:
            handler.close()
        return False

    # -- the websocket ---------------------------------------------------------

    async def _websocket_handler(self, ws):
        """engine.io's AsyncSocket._websocket_handler (python-engineio 4.x) up
        to the websocket becoming the socket's transport (the upgrade's probe
        handshake, unchanged); then, instead of a reader loop and a writer
        task, the callbacks described in the class docstring, and it returns:
        the connect (or upgrade) request's handling ends here."""
        handler = getattr(ws, "tornado_handler", None)
        inbox = getattr(handler, "receive_queue", None)
        if not hasattr(inbox, "sink"):  # pragma: no cover - not chatd's handler
            return await super()._websocket_handler(ws)
        if self._ws_handler is not None:
            # A second websocket while one is being upgraded to (or served):
            # engine.io allows one transport upgrade; this one is refused.
            handler.close()
            return
        self._ws_handler = handler
        if not await self._handshake(ws):
            self._ws_handler = None
            return
        queue = self.queue
        self._write = handler.write_message
        queue.on_put = self._schedule_flush
        if not queue.empty():
            self._schedule_flush()  # the OPEN packet, or what waited for the upgrade
        self.server.logger.info("%s: Upgrade to websocket successful", self.sid)
        served = getattr(handler, "served", None)
        if served is not None:
            served()  # the upgrade request's leftovers go (chatd.server)
        early = inbox.take()
        inbox.sink = self._on_frame
        for data in early:
            self._on_frame(data)

    async def _handshake(self, ws) -> bool:
        """engine.io's: a new connection is connected at once; an upgrade from
        long-polling waits for the client's probe and its UPGRADE packet.
        False when the upgrade did not happen."""
        server = self.server

        async def websocket_wait():
            data = await ws.wait()
            if data and len(data) > server.max_http_buffer_size:
                raise ValueError("packet is too large")
            return data

        if not self.connected:
            self.connected = True
            self.upgraded = True
            return True
        # the socket was already connected, so this is an upgrade
        self.upgrading = True  # hold packet sends during the upgrade
        try:
            pkt = await websocket_wait()
        except OSError:  # pragma: no cover
            return False
        decoded_pkt = eio_packet.Packet(encoded_packet=pkt)
        if decoded_pkt.packet_type != eio_packet.PING or decoded_pkt.data != "probe":
            server.logger.info("%s: Failed websocket upgrade, no PING packet", self.sid)
            self.upgrading = False
            return False
        await ws.send(eio_packet.Packet(eio_packet.PONG, data="probe").encode())
        await self.queue.put(eio_packet.Packet(eio_packet.NOOP))  # end poll
        try:
            pkt = await websocket_wait()
        except OSError:  # pragma: no cover
            self.upgrading = False
            return False
        decoded_pkt = eio_packet.Packet(encoded_packet=pkt)
        if decoded_pkt.packet_type != eio_packet.UPGRADE:
            self.upgraded = False
            server.logger.info(
                "%s: Failed websocket upgrade, expected UPGRADE packet, received %s instead.",
                self.sid, pkt,
            )  # fmt: skip
            self.upgrading = False
            return False
        self.upgraded = True
        self.upgrading = False
        return True

    # -- reading: frames from Tornado's on_message ------------------------------

    def _on_frame(self, data) -> None:
        """A frame's text (or bytes), or None for the connection's end."""
        if self._reading_over:
            return
        inbox = self._inbox
        if inbox is not None:  # the reading task has frames ahead of this one
            inbox.append(data)
            return
        if data == "3":  # a pong with nothing ahead: engine.io's receive() of it
            self.schedule_ping()
            return
        self._inbox = [data]
        task = asyncio.ensure_future(self._read_frames())
        _reading.add(task)
        task.add_done_callback(_reading.discard)

    async def _read_frames(self) -> None:
        inbox = self._inbox
        while inbox:
            data = inbox.pop(0)
            if data is None or not await self._receive_frame(data):
                self._reading_over = True
                self._inbox = None
                await self._end()
                return
        self._inbox = None

    async def _receive_frame(self, p) -> bool:
        """engine.io's reader loop body for one frame; False ends the connection."""
        server = self.server
        if not isinstance(p, (str, bytes)) or len(p) > server.max_http_buffer_size:
            return False  # engine.io: the wait raised, and the reader ended
        try:
            pkt = eio_packet.Packet(encoded_packet=p)
        except Exception:  # not an engine.io packet (engine.io: a traceback)
            hostile("not an engine.io packet", self.sid)
            return False
        try:
            await self.receive(pkt)
        except exceptions.UnknownPacketError:  # pragma: no cover
            pass
        except exceptions.SocketIsClosedError:  # pragma: no cover
            server.logger.info("Receive error -- socket is closed")
            return False
        except Exception as exc:
            # engine.io logged a traceback per frame; chatd's handlers raise
            # nothing on hostile input, so this is one short line, and the end.
            hostile(f"receive error {type(exc).__name__}", self.sid)
            return False
        return True

    async def _end(self) -> None:
        """The connection is over: engine.io's reader end, in the same order
        (what is queued is written and the websocket closed, then the socket
        is closed, which runs the disconnect handlers, then it leaves the
        server's table). When thousands end at once (a load balancer restart),
        closing them all in the same loop turns would hold every request
        behind them: at most CLOSES_PER_TURN go on per turn."""
        self._ended = True
        server = self.server
        await server.closing_turns.wait()
        self.queue.put_nowait(None)  # the writing ends after what is queued
        self._flush()
        await self.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)
        self._write = None
        self._ws_handler = None
        self.queue.on_put = None
        if self.closed and server.sockets.get(self.sid) is self:
            del server.sockets[self.sid]  # as engine.io once its handler returned

    # -- writing: the direct path, and what is queued ---------------------------

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and not self._writer_over:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write everything queued, in order, then reopen the direct path; a
        None or a failed write ends the writing and closes the websocket."""
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
            self._flush_handle = None
        handler = self._ws_handler
        if self._writer_over or handler is None:
            return
        queue = self.queue
        self._write = None
        while not queue.empty():
            pkt = queue.get_nowait()
            queue.task_done()
            if pkt is None:
                break
            try:
                data = pkt.encode()
                handler.write_message(data, binary=isinstance(data, bytes))
            except Exception:
                break
        else:
            self._write = handler.write_message
            return
        self._writer_over = True
        handler.close()


class Turns:
    """``await turns.wait()``: at most ``per_turn`` callers go on per
    event-loop turn, in arrival order; the others wait for later turns."""

    def __init__(self, per_turn: int):
        self.per_turn = per_turn
        self._left = per_turn
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._scheduled = False

    async def wait(self) -> None:
        if self._left > 0 and not self._waiters:
            self._left -= 1
            self._schedule()
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._schedule()
        await fut

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._scheduled = False
        self._left = self.per_turn
        while self._waiters and self._left > 0:
            fut = self._waiters.popleft()
            if not fut.done():  # cancelled meanwhile: its turn goes to the next
                fut.set_result(None)
                self._left -= 1
        if self._waiters or self._left < self.per_turn:
            self._schedule()


# Websockets whose end is processed per event-loop turn (see _serve_websocket).
CLOSES_PER_TURN = 32

# Pings being sent (a task each, kept referenced until it is done).
_pinging: set[asyncio.Task] = set()
# Sockets' reading tasks, while they have frames to handle (referenced until done).
_reading: set[asyncio.Task] = set()


class EngineServer(engineio.AsyncServer):
    """python-engineio's server, with :class:`DirectSocket` sockets.

    engine.io creates its sockets in ``_handle_connect`` as
    ``async_socket.AsyncSocket`` and offers no factory or option to change
    that. Rather than copy that method (and drift from it on upgrades), the
    new socket becomes a DirectSocket (a subclass that adds only methods and
    two class-level defaults, so the instance is unchanged) when engine.io
    announces it with its ``connect`` event: before its first poll or
    websocket exists, and only on this server. python-socketio builds its
    engine.io server from ``AsyncServer._engineio_server_class()``, which
    chatd's server (chatd.realtime.ChatServer) points here."""

    # Packets written by the direct path since start (tests check that it runs).
    direct_writes = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # This server's own copy of the driver table (it is shared by module).
        self._async = {**self._async, "translate_request": translate_request}
        self.closing_turns = Turns(CLOSES_PER_TURN)

    def create_queue(self, *args, **kwargs) -> SocketQueue:
        return SocketQueue()

    async def _trigger_event(self, event, *args, **kwargs):
        if event == "connect":
            sock = self.sockets.get(args[0])
            if sock is not None and type(sock) is AsyncSocket:
                sock.__class__ = DirectSocket
        return await super()._trigger_event(event, *args, **kwargs)


class _Payload:
    """A request body as engine.io reads it (``await environ["wsgi.input"].read()``)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes | None):
        self.payload = payload or b""

    async def read(self, length: int | None = None) -> bytes:
        if length is None:
            r, self.payload = self.payload, b""
        else:
            r, self.payload = self.payload[:length], self.payload[length:]
        return r


def translate_request(handler) -> dict:
    """engine.io's Tornado driver's ``translate_request`` (the request as a
    WSGI environ), without the class it defines on every call for the body.
    A class is a reference cycle: each one lived until a full garbage
    collection, ~1.6 KB per websocket connection and per long-poll request,
    and defining it cost CPU on every request."""
    request = handler.request
    full_uri = request.path + ("?" + request.query if request.query else "")
    environ = {
        "wsgi.input": _Payload(request.body),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.async": True,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "SERVER_SOFTWARE": "aiohttp",
        "REQUEST_METHOD": request.method,
        "QUERY_STRING": request.query or "",
        "RAW_URI": full_uri,
        "SERVER_PROTOCOL": f"HTTP/{request.version}",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "0",
        "SERVER_NAME": "aiohttp",
        "SERVER_PORT": "0",
        "tornado.handler": handler,
    }
    for name, value in request.headers.items():
        name = name.upper()
        if name == "CONTENT-TYPE":
            environ["CONTENT_TYPE"] = value
        elif name == "CONTENT-LENGTH":
            environ["CONTENT_LENGTH"] = value
        else:
            environ["HTTP_" + name.replace("-", "_")] = value
    environ["wsgi.url_scheme"] = environ.get("HTTP_X_FORWARDED_PROTO", "http")
    environ["PATH_INFO"] = urlsplit(request.path).path
    environ["SCRIPT_NAME"] = ""
    return environ


class SocketQueue:
    """The part of asyncio.Queue an engine.io socket uses (unbounded: put,
    put_nowait, get, get_nowait, empty, qsize, task_done, join), with the same
    semantics, in a fraction of the memory. Every socket has one, mostly idle:
    asyncio.Queue keeps four deques (~760 B each, even when empty) and an
    Event; this keeps a list, and futures only while someone waits. Plus
    ``on_put``, a callback after every put (a websocket's writing has no task
    waiting on the queue, see DirectSocket)."""

    __slots__ = ("_getters", "_items", "_joiners", "_unfinished", "on_put")

    def __init__(self):
        self._items: list = []
        self._getters: list[asyncio.Future] | None = None
        self._joiners: list[asyncio.Future] | None = None
        self._unfinished = 0
        # Called after every put (DirectSocket: its websocket's writing).
        self.on_put = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item) -> None:
        self._items.append(item)
        self._unfinished += 1
        self._wake_getter()
        if self.on_put is not None:
            self.on_put()

    async def put(self, item) -> None:
        self.put_nowait(item)

    def get_nowait(self):
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    async def get(self):
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()  # as asyncio.Queue: a wake-up it got goes to the next
                if getter in self._getters:
                    self._getters.remove(getter)
                if self._items and not getter.cancelled():
                    self._wake_getter()
                raise
        return self._items.pop(0)

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0 and self._joiners:
            for joiner in self._joiners:
                if not joiner.done():
                    joiner.set_result(None)
            self._joiners = None

    async def join(self) -> None:
        if self._unfinished > 0:
            joiner = asyncio.get_running_loop().create_future()
            if self._joiners is None:
                self._joiners = []
            self._joiners.append(joiner)
            await joiner

    def _wake_getter(self) -> None:
        getters = self._getters
        while getters:
            getter = getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return
