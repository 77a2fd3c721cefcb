"""Hostile sockets (issue 11, items 4, 5, 6): binary attachments, frames
that are not engine.io packets, events nested past any parser, and join-chat
sent faster than its acks. Each one is refused in one short log line at most,
never a traceback, with an ack wherever the event carried an ack id; the
200-chat cap holds under concurrency. Real chatd processes and real sockets
(tests/rawsocket.py: python-socketio's client cannot send such things)."""

from __future__ import annotations

import asyncio

import psycopg2
import pytest

from .helpers import token
from .rawsocket import Closed, RawSocket


async def wait_closed(sock: RawSocket, timeout: float = 5) -> None:
    await asyncio.wait_for(sock.closed.wait(), timeout)


def tracebacks(log: str) -> int:
    return log.count("Traceback")


@pytest.mark.gen_test(timeout=60)
async def test_binary_attachments_close_the_socket_and_are_never_buffered(spawn, chat_id):
    """A packet announcing 999,999,999 attachments, then binary frames:
    python-socketio buffered every frame for the packet it could never
    complete (234 MiB from one socket). chatd's API has no binary payloads:
    the socket is closed at the announcement, and the server keeps nothing."""
    proc = spawn(LOG_LEVEL="info")
    sock = await RawSocket.open(proc.url, token("mallory"))
    try:
        assert (await sock.call("join-chat", "nope-chat"))["ok"] is False  # signed in and served
        sock.send_text('45999999999-["send-message",{"_placeholder":true,"num":0}]')
        for _ in range(50):
            sock.send_binary(b"\x04" + b"x" * 60_000)
        await sock.writer.drain()
        await wait_closed(sock)
    finally:
        await sock.close()
    # A plain binary frame from a connected socket is refused the same way.
    sock = await RawSocket.open(proc.url, token("mallory"))
    try:
        sock.send_binary(b"4" + b"y" * 1000)
        await wait_closed(sock)
    finally:
        await sock.close()
    await asyncio.sleep(0.3)
    log = proc.log()
    assert tracebacks(log) == 0, log
    assert "binary attachments announced" in log


@pytest.mark.gen_test(timeout=60)
async def test_garbage_frames_before_connect_log_one_short_line(spawn):
    """Binary frames whose first byte is >= 0x80, on a websocket that never
    signed in: each wrote an ERROR with a full traceback (5,000 frames, 8.6 MB
    of log). Now the socket is closed at the first, in one line; a flood
    over many sockets is one line a second."""
    proc = spawn(LOG_LEVEL="info")
    before = len(proc.log())
    for _ in range(20):
        sock = await RawSocket.open(proc.url, connect=False)
        sock.start()
        try:
            for _ in range(50):
                sock.send_binary(b"\x80\xff\xfe" * 100)
            await sock.writer.drain()
        except ConnectionError:
            pass
        await wait_closed(sock)
        await sock.close()
    # Events and acks from a socket that never sent CONNECT: nothing to answer
    # (no namespace joined), and not a line each.
    sock = await RawSocket.open(proc.url, connect=False)
    sock.start()
    for i in range(200):
        sock.send_text(f'42{i}["join-chat","x"]')
        sock.send_text(f'43{i}[{{"ok":true}}]')
    assert (await asyncio.wait_for(_ack_or_none(sock), 1)) is None
    await sock.close()
    # Text that is no engine.io packet at all, and a Socket.IO packet type
    # that does not exist: closed too, no traceback.
    for garbage in ("x-not-a-packet", "49junk"):
        sock = await RawSocket.open(proc.url, connect=False)
        sock.start()
        sock.send_text(garbage)
        await wait_closed(sock)
        await sock.close()
    await asyncio.sleep(0.3)
    log = proc.log()[before:]
    assert tracebacks(log) == 0, log[:3000]
    refused = [line for line in log.splitlines() if "refused from socket" in line]
    assert 1 <= len(refused) <= 5, refused  # rate-limited, not one per frame
    assert all(len(line) < 300 for line in refused), refused
    assert len(log) < 10_000, len(log)


@pytest.mark.gen_test(timeout=60)
async def test_deeply_nested_event_gets_an_error_ack_and_no_traceback(spawn):
    """An event with arrays nested 20,000 deep: the parser's recursion error
    escaped as a traceback and the event got no ack. Now it is acked with the
    usual error shape, and the socket goes on working."""
    proc = spawn(LOG_LEVEL="info")
    sock = await RawSocket.open(proc.url, token("mallory"))
    try:
        deep = "[" * 20_000 + "]" * 20_000
        sock.send_text(f'421["send-message",{deep}]')
        ack = await asyncio.wait_for(_ack(sock, 1), 5)
        assert ack == {
            "ok": False,
            "error": {"code": "invalid_json", "message": "the event is not valid JSON"},
        }
        # Within orjson's limit but still not a payload any event takes.
        sock._next_id = 1
        ack = await sock.call("send-message", [[[[]]]])
        assert ack["ok"] is False and ack["error"]["code"] == "validation_error"
        # An event that is no event (not a [name, ...] list): ignored, no traceback.
        sock.send_text('43{"not": "an ack"}')
        sock.send_text('42{"not": "a list"}')
        assert (await sock.call("join-chat", "nope-chat"))["error"]["code"] == "chat_not_found"
    finally:
        await sock.close()
    await asyncio.sleep(0.3)
    log = proc.log()
    assert tracebacks(log) == 0, log[-3000:]


async def _ack_or_none(sock: RawSocket):
    """None once the server has had time to answer (it must not)."""
    await asyncio.sleep(0.5)
    return sock.events or None


async def _ack(sock: RawSocket, ack_id: int):
    fut = asyncio.get_running_loop().create_future()
    sock.acks[ack_id] = fut
    return await fut


@pytest.mark.parametrize("since", [None, "since_version"])
@pytest.mark.gen_test(timeout=120)
async def test_the_chat_cap_holds_under_300_concurrent_join_chat(
    spawn, chat_id, database_url, since
):
    """300 join-chat sent without waiting for any ack all answered ok: every
    one passed the cap check before the first had entered its room. The slot
    is now taken before the first await: exactly 200 succeed, whichever form
    of join-chat (plain, or catching up with since_version)."""
    ids = [f"{chat_id}-{i}" for i in range(300)]
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                """INSERT INTO chats (id, title, visibility, created_by)
                   SELECT unnest(%s::text[]), 'room', 'public', 'alice'""",
                (ids,),
            )
    finally:
        conn.close()

    def payload(cid: str):
        return {"chat_id": cid, "since_version": 0} if since else cid

    proc = spawn()
    sock = await RawSocket.open(proc.url, token("bob"))
    try:
        acks = await asyncio.wait_for(
            asyncio.gather(*(sock.emit("join-chat", payload(cid)) for cid in ids)), 60
        )
        ok = [a for a in acks if a["ok"]]
        refused = [a for a in acks if not a["ok"]]
        assert len(ok) == 200, (len(ok), refused[:3])
        assert {a["error"]["code"] for a in refused} == {"validation_error"}
        assert all("at most 200 chats" in a["error"]["message"] for a in refused)
        # The same 300 again at once: the 200 joined are fine, the rest refused.
        again = await asyncio.gather(*(sock.emit("join-chat", payload(cid)) for cid in ids))
        assert sum(a["ok"] for a in again) == 200
        joined = {a["chat_id"] for a in ok}
        assert {a["chat_id"] for a in again if a["ok"]} == joined
    except Closed as exc:  # pragma: no cover - a failure, with its reason
        pytest.fail(f"socket closed: {exc}")
    finally:
        await sock.close()


@pytest.mark.gen_test(timeout=60)
async def test_announced_attachments_are_never_accumulated(chatd):
    """Structurally, in process: python-socketio keeps a packet awaiting its
    attachments in ``_binary_packet`` and appends every binary frame to it;
    chatd never lets one in there, and the socket is gone."""
    url = f"http://127.0.0.1:{chatd.port}"
    sock = await RawSocket.open(url, token("mallory"))
    try:
        assert chatd.sio.eio.sockets
        sock.send_text('45999999999-["send-message",{"_placeholder":true,"num":0}]')
        for _ in range(20):
            sock.send_binary(b"\x04" + b"z" * 10_000)
        await wait_closed(sock)
        assert chatd.sio._binary_packet == {}
        await asyncio.sleep(0.1)
        assert not chatd.sio.eio.sockets
    finally:
        await sock.close()
