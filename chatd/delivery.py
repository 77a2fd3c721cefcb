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
    """An engine.io socket whose packets skip the writer task when they can.

    engine.io (python-engineio's ``AsyncSocket``) sends every packet through
    the socket's queue: ``send()`` puts it there and a writer task per
    websocket wakes up, takes it (``poll()``), encodes it and writes the frame.
    Under fanout that is a wake-up per socket per event (10,000 a second at 500
    sockets and 20 messages/s), and on Python 3.11 ``poll()``'s
    ``asyncio.wait_for`` creates one more Task per wake-up.

    Two changes, each keeping engine.io's order of packets on the socket:

    - **The direct path.** While the writer is parked on an empty queue, with
      nothing in its hands, a packet sent to a websocket that is fully
      upgraded and not closing is encoded and framed at once, in the caller's
      call. ``_write`` is the websocket's (synchronous) ``write_message``
      exactly while that holds: ``poll()`` sets it when it finds the queue
      empty and waits, and clears it as soon as it takes a packet off the
      queue, before it writes anything. So a packet is written directly only
      when nothing is queued ahead of it nor being written, and once one
      packet is queued (an upgrade in progress, a close, a write that
      failed), every later packet is queued behind it until the writer has
      written them all and parks again. Events, acks and pings of one socket
      all take this same ``send()``, so they keep the order they were sent
      in. Long-polling, the upgrade handshake and closing use engine.io's
      own code unchanged (``_write`` is never set for them).
    - **A writer that waits on the queue itself** (only a websocket's writer:
      a long-polling GET keeps engine.io's ``poll()`` and its timeout, which
      ends a poll nobody answers). engine.io's writer gave up after
      ``ping_interval + ping_timeout`` without a packet; since pings may now
      be written directly, its queue can stay empty much longer, and that
      timeout would close a healthy connection. The reader's own timeout
      (the client's pongs stop) and ``check_ping_timeout()`` still end a dead
      connection, and its end wakes the writer with the ``None`` it queues.

    engine.io has no factory for its sockets: :class:`EngineServer` makes each
    new socket a DirectSocket (see there).
    """

    # The websocket's write_message while the writer is parked on an empty
    # queue (the direct path is open); None otherwise.
    _write = None
    # The write_message of the websocket this socket's writer (will) write to.
    _ws_write = None

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
        write = self._write
        if write is not None and not self.closing and self.queue.empty():
            try:
                data = pkt.encode()
                write(data, binary=isinstance(data, bytes))
                self.server.direct_writes += 1
                return
            except Exception:
                # A closed websocket, typically. Not raised to the caller (a
                # broadcast would stop short of the other sockets): queued, the
                # packet meets the same failure in the writer, which ends the
                # connection as engine.io does.
                self._write = None
        await self.queue.put(pkt)

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

    async def poll(self):
        if not self.upgraded:  # long-polling: engine.io's own
            return await super().poll()
        queue = self.queue
        if queue.empty():
            self._write = self._ws_write  # parked, nothing in hand: open
            try:
                first = await queue.get()
            except asyncio.CancelledError:
                raise exceptions.QueueEmpty() from None
            finally:
                self._write = None  # closed before anything is written
        else:
            first = queue.get_nowait()
        queue.task_done()
        if first is None:
            return []
        packets = [first]
        while not queue.empty():
            pkt = queue.get_nowait()
            queue.task_done()
            if pkt is None:
                queue.put_nowait(None)  # the next poll ends the writer
                break
            packets.append(pkt)
        return packets

    # -- pings: a timer per socket, not a sleeping task ------------------------

    def schedule_ping(self):
        # engine.io sleeps ping_interval in a task of its own per socket (~1.4
        # KB each, held by every idle socket); a timer handle is ~0.2 KB.
        if self.last_ping:
            self.last_ping = None
            asyncio.get_running_loop().call_later(self.server.ping_interval, self._ping_due)

    def _ping_due(self) -> None:
        # engine.io's _send_ping after its sleep.
        if not self.closing and not self.closed:
            self.last_ping = time.time()
            task = asyncio.ensure_future(self.send(eio_packet.Packet(eio_packet.PING)))
            _pinging.add(task)
            task.add_done_callback(_pinging.discard)

    async def check_ping_timeout(self):
        if await super().check_ping_timeout():
            return True
        # The client stopped answering pings and engine.io closed the socket.
        # Close its websocket too: the reader (which waits without a timeout
        # of its own, see _websocket_handler) then ends, as a half-open
        # connection gives it nothing else to end on.
        handler = self._ws_handler
        if handler is not None:
            handler.close()
        return False

    # -- the websocket: reader and writer -------------------------------------

    # The Tornado handler of the websocket this socket's writer writes to.
    _ws_handler = None
    # Set when the websocket's connection is over (its reader ended): packets
    # for it are dropped at once instead of written to a dead stream (a mass
    # disconnect: the rooms still hold the sockets waiting for their close).
    _ended = False

    async def _websocket_handler(self, ws):
        """engine.io's AsyncSocket._websocket_handler (python-engineio 4.x),
        with the reader waiting for each message directly: engine.io wraps
        every wait in a task of its own under ``asyncio.wait_for`` (~1.8 KB
        held by every idle socket, and a task per message received). Its
        timeout, which ended a connection that sent nothing for ping_interval
        + ping_timeout, is kept by engine.io's service task instead: it closes
        a socket whose client stopped answering pings, and
        :meth:`check_ping_timeout` then closes the websocket, which ends the
        reader. Everything else is engine.io's, in the same order."""
        # The websocket this socket's writer will write to. Tornado's
        # write_message frames the message and hands it to the stream before
        # it returns (with or without compression; only the returned future,
        # which engine.io never awaits either, completes later), so a direct
        # write has taken its place in the stream when the call returns. Only
        # the first websocket handler of a socket owns it (engine.io refuses a
        # second upgrade once one succeeded).
        handler = getattr(ws, "tornado_handler", None)
        owner = self._ws_write is None and handler is not None
        if owner:
            self._ws_write = handler.write_message
            self._ws_handler = handler
        try:
            return await self._serve_websocket(ws)
        finally:
            if owner:
                self._ws_write = None
                self._write = None
                self._ws_handler = None

    async def _serve_websocket(self, ws):
        server = self.server

        async def websocket_wait():
            data = await ws.wait()
            if data and len(data) > server.max_http_buffer_size:
                raise ValueError("packet is too large")
            return data

        if self.connected:
            # the socket was already connected, so this is an upgrade
            self.upgrading = True  # hold packet sends during the upgrade
            try:
                pkt = await websocket_wait()
            except OSError:  # pragma: no cover
                return
            decoded_pkt = eio_packet.Packet(encoded_packet=pkt)
            if decoded_pkt.packet_type != eio_packet.PING or decoded_pkt.data != "probe":
                server.logger.info("%s: Failed websocket upgrade, no PING packet", self.sid)
                self.upgrading = False
                return
            await ws.send(eio_packet.Packet(eio_packet.PONG, data="probe").encode())
            await self.queue.put(eio_packet.Packet(eio_packet.NOOP))  # end poll
            try:
                pkt = await websocket_wait()
            except OSError:  # pragma: no cover
                self.upgrading = False
                return
            decoded_pkt = eio_packet.Packet(encoded_packet=pkt)
            if decoded_pkt.packet_type != eio_packet.UPGRADE:
                self.upgraded = False
                server.logger.info(
                    "%s: Failed websocket upgrade, expected UPGRADE packet, received %s instead.",
                    self.sid, pkt,
                )  # fmt: skip
                self.upgrading = False
                return
            self.upgraded = True
            self.upgrading = False
        else:
            self.connected = True
            self.upgraded = True

        async def writer():
            while True:
                packets = None
                try:
                    packets = await self.poll()
                except exceptions.QueueEmpty:
                    break
                if not packets:
                    break  # empty packet list returned -> connection closed
                try:
                    for pkt in packets:
                        await ws.send(pkt.encode())
                except Exception:
                    break
            await ws.close()

        writer_task = asyncio.ensure_future(writer())
        server.logger.info("%s: Upgrade to websocket successful", self.sid)

        while True:
            try:
                p = await websocket_wait()
            except asyncio.CancelledError:  # pragma: no cover - as engine.io
                break
            except Exception:
                break
            if p is None:
                break  # connection closed by client
            try:
                pkt = eio_packet.Packet(encoded_packet=p)
            except Exception:  # not an engine.io packet (engine.io: a traceback)
                hostile("not an engine.io packet", self.sid)
                break
            try:
                await self.receive(pkt)
            except exceptions.UnknownPacketError:  # pragma: no cover
                pass
            except exceptions.SocketIsClosedError:  # pragma: no cover
                server.logger.info("Receive error -- socket is closed")
                break
            except Exception as exc:
                # engine.io logged a traceback per frame; chatd's handlers raise
                # nothing on hostile input, so this is one short line, and the end.
                hostile(f"receive error {type(exc).__name__}", self.sid)
                break

        # The connection is over. When thousands end at once (a load balancer
        # restart), closing them all in the same loop turns would hold every
        # request behind them: at most CLOSES_PER_TURN go on per turn.
        self._ended = True
        await server.closing_turns.wait()
        await self.queue.put(None)  # unlock the writer task so it can exit
        await writer_task
        await self.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)


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
    Event; this keeps a list, and futures only while someone waits."""

    __slots__ = ("_getters", "_items", "_joiners", "_unfinished")

    def __init__(self):
        self._items: list = []
        self._getters: list[asyncio.Future] | None = None
        self._joiners: list[asyncio.Future] | None = None
        self._unfinished = 0

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item) -> None:
        self._items.append(item)
        self._unfinished += 1
        self._wake_getter()

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
