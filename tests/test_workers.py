"""CHATD_WORKERS: several processes on one port act as one service."""

import asyncio
import os
import signal
import time

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


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_workers_share_one_port_and_rooms(spawn, chat_id):
    proc = spawn(CHATD_WORKERS=2)
    deadline = time.monotonic() + 20
    while len(_children(proc.proc.pid)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    workers = _children(proc.proc.pid)
    assert len(workers) == 2
    api = Api(proc.url)
    await api.create_chat(chat_id, members=["bob"])
    # Enough sockets that both workers accept some; every one sees every send.
    clients = [await SocketClient(proc.url, user="bob").connect() for _ in range(12)]
    try:
        for c in clients:
            assert (await c.call("join-chat", chat_id))["ok"]
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
    deadline = time.monotonic() + 20
    while len(_children(proc.proc.pid)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    first = _children(proc.proc.pid)
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
