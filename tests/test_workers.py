"""CHATD_WORKERS: several processes on one port act as one service."""

import asyncio
import os
import signal
import time

import psutil
import pytest

from .helpers import Api, SocketClient


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _two_workers(proc) -> list[int]:
    deadline = time.monotonic() + 20
    while len(_children(proc.proc.pid)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    workers = _children(proc.proc.pid)
    assert len(workers) == 2
    return workers


def _accepted(pid: int, port: int) -> int:
    """Established connections on chatd's port held by this worker."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    )


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_workers_share_one_port_and_rooms(spawn, chat_id):
    proc = spawn(CHATD_WORKERS=2)
    workers = await _two_workers(proc)
    api = Api(proc.url)
    await api.create_chat(chat_id, members=["bob"])
    # Enough sockets that both workers accept some; every one sees every send.
    # All at once, as after a deploy or a reconnect storm.
    clients = await asyncio.gather(
        *(SocketClient(proc.url, user="bob").connect() for _ in range(16))
    )
    try:
        for c in clients:
            assert (await c.call("join-chat", chat_id))["ok"]
        # Both workers hold connections: with SO_REUSEPORT the kernel spreads
        # them by address (all 16 on one worker: ~1 in 30,000). With one shared
        # socket the first worker to wake took whole bursts (this catches that
        # only sometimes: test clients make small bursts).
        assert all(_accepted(pid, proc.port) > 0 for pid in workers), [
            _accepted(pid, proc.port) for pid in workers
        ]
        sent = [(await api.send(chat_id, f"m{i}")).json for i in range(3)]
        for c in clients:
            await c.wait_for("new-message", lambda m: m["seq"] == 3)
            assert [m["seq"] for m in c.of("new-message")] == [1, 2, 3]
            assert c.of("new-message") == sent
    finally:
        for c in clients:
            await c.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_a_killed_worker_is_replaced_and_sigterm_stops_all(spawn, chat_id):
    proc = spawn(CHATD_WORKERS=2)
    first = await _two_workers(proc)
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = _children(proc.proc.pid)
        if len(now) == 2 and first[0] not in now:
            break
        await asyncio.sleep(0.1)
    now = _children(proc.proc.pid)
    assert len(now) == 2 and first[0] not in now and first[1] in now
    # Still serving on the same port.
    api = Api(proc.url)
    await api.create_chat(chat_id)
    assert (await api.send(chat_id, "still here")).status == 201
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    for pid in now:
        assert not _running(pid)


def test_workers_need_redis():
    from chatd import config

    with pytest.raises(config.ConfigError, match="CHATD_WORKERS"):
        config.load(
            {"DATABASE_URL": "postgresql://x@127.0.0.1/db", "ACCESS_TOKEN_SECRET": "s" * 20,
             "CHATD_WORKERS": "2"},
            use_dotenv=False,
        )  # fmt: skip
