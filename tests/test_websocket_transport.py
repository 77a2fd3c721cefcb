"""The websocket transport driven by callbacks (chatd.wsframes reads frames,
chatd.delivery.DirectSocket handles engine.io packets from on_message and
writes without a writer task): an idle websocket holds no task, and frames
are read whole however the bytes arrive (split at every byte, several in one
read, fragmented around a ping, 16- and 64-bit lengths), with Tornado's
size cap still answered by a 1009 close.

Ordering, the upgrade from polling and ping timeouts are in
tests/test_realtime_delivery.py; hostile frames in tests/test_socket_hostile.py.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct

import orjson
import pytest

from chatd import server as chatd_server
from chatd.delivery import DirectSocket

from .helpers import token
from .rawsocket import RawSocket, client_frame


def _server_tasks() -> set[asyncio.Task]:
    # Every task of the loop but the test clients' own readers.
    return {
        t
        for t in asyncio.all_tasks()
        if not t.done() and "RawSocket" not in getattr(t.get_coro(), "__qualname__", "")
    }


@pytest.mark.gen_test(timeout=60)
async def test_idle_websockets_hold_no_task_and_keep_working(chatd):
    url = f"http://127.0.0.1:{chatd.port}"
    # A first socket, so that engine.io's service task exists before counting.
    first = await RawSocket.open(url, token("alice"))
    await asyncio.sleep(0.2)
    before = _server_tasks()
    n = 30
    socks = [await RawSocket.open(url, token(f"idle{i}")) for i in range(n)]
    try:
        await asyncio.sleep(0.3)
        gc.collect()
        extra = _server_tasks() - before
        # engine.io kept 3 per websocket (Tornado's upgrade request, engine.io's
        # connect request parked in its reader, the writer): 90 here.
        assert len(extra) <= 2, sorted(repr(t.get_coro()) for t in extra)[:5]
        for s in socks:
            eio_sock = chatd.sio.eio.sockets[_eio_sid(chatd, s.sid)]
            assert isinstance(eio_sock, DirectSocket)
            assert eio_sock._inbox is None and eio_sock._write is not None
        # Idle, yet every one is served: events in, acks out.
        acks = await asyncio.gather(*(s.call("join-chat", "nope") for s in socks))
        assert all(a["ok"] is False for a in acks)
    finally:
        for s in [first, *socks]:
            await s.close()
    # Their ends are handled too: the sockets leave engine.io's table.
    for _ in range(200):
        if len(chatd.sio.eio.sockets) == 0:
            break
        await asyncio.sleep(0.02)
    assert len(chatd.sio.eio.sockets) == 0


def _eio_sid(chatd, sid: str) -> str:
    return chatd.sio.manager.eio_sid_from_sid(sid, "/")


_frame = client_frame


async def _read(sock: RawSocket) -> tuple[int, bytes]:
    """The next frame as (opcode, payload), close frames included."""
    b1, b2 = await asyncio.wait_for(sock.reader.readexactly(2), 10)
    n = b2 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", await sock.reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", await sock.reader.readexactly(8))
    return b1 & 0x0F, await sock.reader.readexactly(n)


async def _ack(sock: RawSocket, ack_id: int):
    """Frames until the ack ``ack_id`` (answering engine.io pings)."""
    while True:
        _, data = await _read(sock)
        if data == b"2":
            sock.writer.write(_frame(0x1, b"3"))
        elif data.startswith(f"43{ack_id}[".encode()):
            return orjson.loads(data[2 + len(str(ack_id)) :])[0]


def _event(ack_id: int, name: str, data) -> bytes:
    return f"42{ack_id}".encode() + orjson.dumps([name, data])


@pytest.mark.gen_test(timeout=60)
async def test_frames_are_read_whole_however_the_bytes_arrive(chatd):
    # No reader task: this test reads the frames itself.
    sock = await RawSocket.open(f"http://127.0.0.1:{chatd.port}", connect=False)
    w = sock.writer
    try:
        w.write(_frame(0x1, b"40" + orjson.dumps({"token": token("bob")})))
        while not (await _read(sock))[1].startswith(b"40"):
            pass
        # One frame, a byte at a time.
        for b in _frame(0x1, _event(1, "join-chat", "nope")):
            w.write(bytes([b]))
            await w.drain()
            await asyncio.sleep(0.001)
        assert (await _ack(sock, 1))["ok"] is False
        # Three frames in one write, answered in order.
        w.write(b"".join(_frame(0x1, _event(i, "join-chat", f"c{i}")) for i in (2, 3, 4)))
        assert [(await _ack(sock, i))["ok"] for i in (2, 3, 4)] == [False] * 3
        # A message in three fragments with a websocket ping between them: the
        # ping is answered at once, the message handled once whole.
        text = _event(5, "join-chat", "x" * 200)
        w.write(_frame(0x1, text[:50], fin=False) + _frame(0x9, b"hey"))
        assert await _read(sock) == (0xA, b"hey")
        w.write(_frame(0x0, text[50:120], fin=False))
        await asyncio.sleep(0.05)
        w.write(_frame(0x0, text[120:], fin=True))
        assert (await _ack(sock, 5))["ok"] is False
        # 16-bit and 64-bit lengths (65,536 bytes: engine.io's packet cap).
        w.write(_frame(0x1, _event(6, "join-chat", "y" * 1000)))
        assert (await _ack(sock, 6))["ok"] is False
        big = _event(7, "join-chat", "")
        big = _event(7, "join-chat", "z" * (65536 - len(big)))
        assert len(big) == 65536
        w.write(_frame(0x1, big))
        assert (await _ack(sock, 7))["ok"] is False
        # Over Tornado's cap (twice the packet cap): refused with a 1009 close
        # as soon as the header says so, before any of the payload is sent.
        w.write(bytes([0x81, 0x80 | 127]) + struct.pack(">Q", 200_000) + os.urandom(4))
        while True:
            opcode, data = await _read(sock)
            if opcode == 0x8:
                break
        assert struct.unpack(">H", data[:2])[0] == 1009
        assert await asyncio.wait_for(sock.reader.read(), 10) == b""  # then closed
    finally:
        await sock.close()


def test_small_deque_behaves_as_collections_deque():
    # The same random script against collections.deque and the write queues'
    # stand-in (chatd.server._SmallDeque): a wrong one fails on it.
    import collections
    import random

    rnd = random.Random(7)
    ours, theirs = chatd_server._SmallDeque(), collections.deque()
    for step in range(20_000):
        op = rnd.random()
        if op < 0.5:
            ours.append(step)
            theirs.append(step)
        elif op < 0.95:
            if theirs:
                assert ours.popleft() == theirs.popleft()
            else:
                with pytest.raises(IndexError):
                    ours.popleft()
        elif op < 0.97:
            ours.clear()
            theirs.clear()
        assert len(ours) == len(theirs) and bool(ours) == bool(theirs)
        if theirs:
            assert ours[0] == theirs[0] and ours[-1] == theirs[-1]
        else:
            with pytest.raises(IndexError):
                ours[0]
        if step % 97 == 0:
            assert list(ours) == list(theirs)
    # A backlog of thousands drains, in order.
    backlog = chatd_server._SmallDeque(range(10_000))
    assert [backlog.popleft() for _ in range(10_000)] == list(range(10_000))
    assert not backlog


@pytest.mark.gen_test(timeout=60)
async def test_with_compression_tornados_own_frame_loop_serves_the_socket(io_loop, settings):
    # WS_COMPRESSION=true keeps Tornado's frame loop (chatd.wsframes); the
    # engine.io side is the same callback transport.
    import dataclasses

    from tornado.websocket import websocket_connect

    daemon = chatd_server.Chatd(dataclasses.replace(settings, ws_compression=True))
    await daemon.start()
    try:
        url = f"ws://127.0.0.1:{daemon.port}/socket.io/?EIO=4&transport=websocket"
        ws = await websocket_connect(url, compression_options={})
        assert ws.protocol._compressor is not None  # permessage-deflate agreed
        assert (await ws.read_message()).startswith("0")
        await ws.write_message("40" + orjson.dumps({"token": token("bob")}).decode())
        assert (await ws.read_message()).startswith("40")
        await ws.write_message('421["join-chat","' + "n" * 3000 + '"]')
        while not (msg := await ws.read_message()).startswith("431"):
            assert msg is not None
        assert orjson.loads(msg[3:])[0]["ok"] is False
        ws.close()
        for _ in range(200):
            if not daemon.sio.eio.sockets:
                break
            await asyncio.sleep(0.02)
        assert not daemon.sio.eio.sockets
    finally:
        await daemon.stop()


@pytest.mark.gen_test(timeout=90)
async def test_frames_written_straight_to_the_socket_keep_their_order_when_it_fills(
    chatd, api, chat_id
):
    """A websocket frame goes straight to the socket while nothing is queued
    before it (chatd.httpconn.ServerStream). A client that stops reading
    fills the socket: the rest of a partly sent frame, and every frame after
    it, queue in Tornado's stream and leave in order once it reads again."""
    url = f"http://127.0.0.1:{chatd.port}"
    await api.create_chat(chat_id, members=["bob"])
    sock = await RawSocket.open(url, token("bob"))
    try:
        assert (await sock.call("join-chat", chat_id))["ok"]
        handler = chatd.sio.eio.sockets[_eio_sid(chatd, sock.sid)]._ws_handler
        server_side = handler.ws_connection.stream.socket
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.writer.transport.pause_reading()
        texts = [f"{i:04d} " + "x" * (3000 + 7 * i) for i in range(60)]
        for text in texts:
            await api.send(chat_id, text)
        assert handler.ws_connection.stream._write_buffer  # the socket did fill
        sock.writer.transport.resume_reading()
        deadline = asyncio.get_running_loop().time() + 30
        while len([e for e in sock.events if e[0] == "new-message"]) < len(texts):
            assert asyncio.get_running_loop().time() < deadline, len(sock.events)
            await asyncio.sleep(0.05)
        got = [d["content"] for name, d in sock.events if name == "new-message"]
        assert got == texts
    finally:
        await sock.close()
