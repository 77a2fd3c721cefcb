"""A bare websocket Socket.IO client on asyncio streams, for what
python-socketio's client cannot do: thousands of sockets from one process
(the disconnect storm), and hostile frames (binary attachments, bytes that
are not engine.io packets). It speaks just enough engine.io v4 / Socket.IO v5
over one websocket: the handshake, CONNECT with a token, events with ack ids,
and answering pings."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from urllib.parse import urlsplit

import orjson


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client websocket frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + _mask(payload, mask)


class Closed(Exception):
    """The server closed the websocket (or the TCP connection)."""


class RawSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self._next_id = 0
        self.acks: dict[int, asyncio.Future] = {}
        self.events: list[tuple[str, object]] = []
        self.closed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.sid: str | None = None

    # -- opening ---------------------------------------------------------------

    @classmethod
    async def open(cls, base_url: str, token: str | None = None, connect: bool = True):
        """Open the websocket (engine.io handshake done); with ``connect``, also
        Socket.IO CONNECT with ``token`` and wait for its answer."""
        parts = urlsplit(base_url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
                f"Host: {parts.hostname}:{parts.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            writer.close()
            raise Closed(head.decode(errors="replace"))
        sock = cls(reader, writer)
        _, data = await sock.read_frame()
        if not data.startswith(b"0"):
            raise Closed(f"no engine.io open packet: {data[:100]!r}")
        if connect:
            sock.send_text("40" + orjson.dumps({"token": token}).decode())
            while True:
                _, data = await sock.read_frame()
                if data.startswith(b"40"):
                    sock.sid = orjson.loads(data[2:])["sid"]
                    break
                if data.startswith(b"44"):
                    raise Closed(f"connect refused: {data!r}")
            sock.start()
        return sock

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._read_loop())

    # -- frames ------------------------------------------------------------------

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        self.writer.write(client_frame(opcode, payload, fin))

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def send_binary(self, data: bytes) -> None:
        self.send_frame(0x2, data)

    async def read_frame(self) -> tuple[int, bytes]:
        try:
            b1, b2 = await self.reader.readexactly(2)
            n = b2 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
            data = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise Closed(str(exc)) from None
        opcode = b1 & 0x0F
        if opcode == 0x8:
            raise Closed("close frame")
        return opcode, data

    async def _read_loop(self) -> None:
        try:
            while True:
                opcode, data = await self.read_frame()
                if opcode not in (0x1, 0x2):
                    continue
                if data == b"2":  # engine.io ping
                    self.send_text("3")
                elif data.startswith(b"43"):
                    body = data[2:]
                    i = 0
                    while i < len(body) and body[i : i + 1].isdigit():
                        i += 1
                    fut = self.acks.pop(int(body[:i]), None)
                    if fut is not None and not fut.done():
                        fut.set_result(orjson.loads(body[i:])[0])
                elif data.startswith(b"42"):
                    name, *args = orjson.loads(data[2:])
                    self.events.append((name, args[0] if args else None))
        except Closed:
            pass
        except Exception:
            pass
        finally:
            self.closed.set()
            for fut in self.acks.values():
                if not fut.done():
                    fut.set_exception(Closed("socket closed before the ack"))

    # -- Socket.IO -----------------------------------------------------------------

    def emit(self, event: str, data: object = None) -> asyncio.Future:
        """Send an event with an ack id; the future resolves to the ack's payload."""
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.acks[self._next_id] = fut
        self.send_text(f"42{self._next_id}" + orjson.dumps([event, data]).decode())
        return fut

    async def call(self, event: str, data: object = None, timeout: float = 10):
        return await asyncio.wait_for(self.emit(event, data), timeout)

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except Exception:
            pass


def _mask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
