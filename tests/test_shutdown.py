"""SIGTERM/SIGINT with real processes: systemd hears READY=1 and STOPPING=1,
in-flight requests finish (every 201 is in the database), sockets are closed
so that clients reconnect, and the exit status is 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import aiohttp
import psycopg2
import pytest
import socketio

from .helpers import Api, token


def _notify_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    return sock


def _received(sock: socket.socket, until: str, timeout: float = 30) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        if any(until in m.split("\n") for m in got):
            return got
    return got


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_ready_then_stopping_on_sigterm(spawn, tmp_path, kind):
    if kind == "path":
        address = str(tmp_path / "notify.sock")
        sock = _notify_socket(address)
    else:
        name = f"chatd-test-notify-{time.monotonic_ns()}"
        address = "@" + name
        sock = _notify_socket("\0" + name)
    try:
        proc = spawn(NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
        ready = _received(sock, "READY=1")
        assert any("READY=1" in m.split("\n") for m in ready), ready
        # WatchdogSec=0.4s: a WATCHDOG=1 ping every 0.2 s.
        assert "WATCHDOG=1" in _received(sock, "WATCHDOG=1", timeout=5)
        proc.signal(signal.SIGTERM)
        stopping = _received(sock, "STOPPING=1")
        assert "STOPPING=1" in stopping, stopping
        assert proc.wait(30) == 0
    finally:
        sock.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_sigterm_finishes_in_flight_sends_and_closes_sockets(
    spawn, database_url, chat_id, unused_port
):
    proc = spawn(CHATPORT=unused_port, SHUTDOWN_TIMEOUT="20")
    api = Api(proc.url)
    # One chat per send: a chat's concurrent sends queue behind its one
    # transaction in flight (group commit); separate chats go to PostgreSQL.
    chats = [f"{chat_id}-{i}" for i in range(8)]
    for c in chats:
        await api.create_chat(c, members=["bob"])

    # A socket client that reconnects by itself, as socket.io-client does.
    client = socketio.AsyncClient(reconnection=True, reconnection_delay=0.2)
    connects: list[float] = []
    reasons: list = []
    client.on("connect", lambda: connects.append(time.monotonic()))
    client.on("disconnect", lambda reason=None: reasons.append(reason))
    await client.connect(proc.url, auth={"token": token("bob")}, transports=["websocket"])

    # Hold the chats' row locks so that every send waits in PostgreSQL: they
    # are all in flight when SIGTERM arrives, deterministically.
    blocker = psycopg2.connect(database_url)
    cur = blocker.cursor()
    cur.execute("SELECT 1 FROM chats WHERE id = ANY(%s) FOR UPDATE", (chats,))
    # aiohttp keeps connections alive (Tornado's client always asks to close).
    session = aiohttp.ClientSession()
    headers = {"Authorization": f"Bearer {token('alice')}"}

    async def send(i: int):
        async with session.post(
            f"{proc.url}/chats/{chats[i]}/messages", json={"content": f"in flight {i}"},
            headers=headers,
        ) as resp:  # fmt: skip
            return resp.status, resp.headers.get("Connection"), await resp.json()

    sends = [asyncio.ensure_future(send(i)) for i in range(8)]
    try:
        # Sends to different chats made at the same moment may share one
        # statement (chatd.storage._Sends): at least one waits in PostgreSQL,
        # and chatd counts all 8 in flight when SIGTERM arrives.
        await _until(lambda: _waiting_on_lock(database_url) >= 1)
        await asyncio.sleep(0.5)  # the rest have long arrived (loopback)
        proc.signal(signal.SIGTERM)
        await _until(lambda: "for 8 request(s) in flight" in proc.log())
        await asyncio.sleep(0.5)  # SIGTERM handled; the sends still wait on the lock
        assert not any(s.done() for s in sends)
    finally:
        blocker.rollback()  # let them commit
        blocker.close()
    try:
        answers = await asyncio.gather(*sends)
    finally:
        await session.close()
    assert [status for status, _c, _b in answers] == [201] * 8, answers
    # Answered while draining: keep-alive clients are told to go elsewhere.
    assert [conn for _s, conn, _b in answers] == ["close"] * 8
    assert await asyncio.to_thread(proc.wait, 30) == 0

    ids = sorted(body["id"] for _s, _c, body in answers)
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as c:
            c.execute("SELECT id FROM messages WHERE chat_id = ANY(%s) ORDER BY id", (chats,))
            assert [r[0] for r in c.fetchall()] == ids
    finally:
        conn.close()

    # The socket was closed by the server at the transport level ...
    await _until(lambda: reasons, timeout=10)
    assert reasons[0] != "io server disconnect", reasons  # that one forbids reconnecting
    # ... so the client reconnects on its own to whatever serves the address next.
    spawn(CHATPORT=unused_port)
    await _until(lambda: len(connects) >= 2, timeout=20)
    await client.disconnect()


def _waiting_on_lock(database_url: str) -> int:
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as c:
            c.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return c.fetchone()[0]
    finally:
        conn.close()


async def _until(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_sigint_stops_cleanly_too(spawn):
    proc = spawn()
    assert (await Api(proc.url).get("/healthz")).status == 200
    proc.signal(signal.SIGINT)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert "stopped" in proc.log()
