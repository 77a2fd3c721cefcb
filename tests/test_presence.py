"""Presence and the typing gate against a real Redis: two Presence objects
stand for two chatd processes sharing it (the end-to-end version with real
processes is in test_cluster.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets

import pytest
import redis.asyncio as aioredis

from chatd.presence import Gate, Presence
from chatd.server import Chatd

from .conftest import REDIS_URL
from .helpers import Api, SocketClient


class Heard:
    def __init__(self):
        self.events: list[tuple[str, str, bool]] = []

    async def __call__(self, chat_id, user_id, online):
        self.events.append((chat_id, user_id, online))


def process(client, prefix: str, ttl: float = 60) -> tuple[Presence, Heard]:
    p = Presence(client, prefix, ttl)
    p.notify = heard = Heard()
    return p, heard


@pytest.fixture
def prefix(redis_prefix):
    return f"{redis_prefix}:p{secrets.token_hex(3)}"


@pytest.mark.gen_test
async def test_a_user_is_online_until_the_last_socket_on_any_process_leaves(prefix):
    r = aioredis.Redis.from_url(REDIS_URL)
    one, heard1 = process(r, prefix)
    two, heard2 = process(r, prefix)
    try:
        await one.start()
        await two.start()
        await one.join("c1", "bob", "s1")
        await one.join("c1", "bob", "s1")  # the same socket again: counted once
        await two.join("c1", "bob", "s2")
        assert heard1.events == [("c1", "bob", True)] and heard2.events == []
        assert await one.online("c1") == ["bob"]
        await one.leave("c1", "s1")
        assert heard1.events == [("c1", "bob", True)]
        await two.leave_all("s2")
        assert heard2.events == [("c1", "bob", False)]
        assert await two.online("c1") == []
    finally:
        await one.close()
        await two.close()
        await r.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_an_expired_process_is_reaped_once_and_comes_back_if_alive(prefix):
    r = aioredis.Redis.from_url(REDIS_URL)
    stalled, heard_stalled = process(r, prefix, ttl=1)
    survivor, heard_survivor = process(r, prefix, ttl=60)
    third, heard_third = process(r, prefix, ttl=60)
    try:
        await stalled.beat()  # registered, but its heartbeat loop never runs
        await survivor.beat()
        await stalled.join("c1", "bob", "s1")
        await stalled.join("c2", "carol", "s2")
        await survivor.join("c2", "carol", "s3")
        await asyncio.sleep(1.2)  # past the stalled process's deadline
        await survivor.beat()
        await third.beat()  # nothing left for a second reaper
        # bob's only socket was there; carol has another one on the survivor.
        assert heard_survivor.events == [("c1", "bob", False)]
        assert heard_third.events == []
        assert await survivor.online("c1") == []
        # The "dead" process was only stalled: its next beat counts it in again.
        await stalled.beat()
        assert ("c1", "bob", True) in heard_stalled.events
        assert await survivor.online("c1") == ["bob"]
        assert await survivor.online("c2") == ["carol"]
    finally:
        for p in (stalled, survivor, third):
            await p.close()
        await r.aclose()


@pytest.mark.gen_test
async def test_a_leave_that_failed_is_repaired_by_the_next_heartbeat(prefix):
    r = aioredis.Redis.from_url(REDIS_URL)
    one, heard = process(r, prefix)
    try:
        await one.start()
        await one.join("c1", "bob", "s1")
        # The leave never reached Redis (an outage): the socket is gone here
        # but still counted there.
        one._remove("c1", "s1")
        one._dirty = True
        assert await one.online("c1") == ["bob"]
        await one.beat()
        assert heard.events == [("c1", "bob", True), ("c1", "bob", False)]
        assert await one.online("c1") == []
    finally:
        await one.close()
        await r.aclose()


@pytest.mark.gen_test
async def test_the_gate_opens_once_per_interval_across_processes(prefix):
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        one, two = Gate(r, prefix), Gate(r, prefix)
        assert await one.allow("typing:c1:bob", 300)
        assert not await two.allow("typing:c1:bob", 300)
        assert await two.allow("typing:c1:carol", 300)
        await asyncio.sleep(0.35)
        assert await two.allow("typing:c1:bob", 300)
        local = Gate(None, prefix)
        assert await local.allow("k", 300) and not await local.allow("k", 300)
    finally:
        await r.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_without_redis_one_process_has_presence_typing_and_join_dedup(
    io_loop, settings, chat_id
):
    daemon = Chatd(dataclasses.replace(settings, redis_url=None))
    await daemon.start()
    url = f"http://127.0.0.1:{daemon.port}"
    api = Api(url)
    alice = bob = None
    try:
        await api.create_chat(chat_id, members=["bob"])
        await api.send(chat_id, "one")
        alice = await SocketClient(url, user="alice").connect()
        bob = await SocketClient(url, user="bob").connect()
        ack = await alice.call("join-chat", {"chat_id": chat_id, "since_seq": 0})
        assert [m["seq"] for m in ack["missed"]] == [1]
        await bob.call("join-chat", chat_id)
        await alice.wait_for("presence", lambda p: p["user_id"] == "bob" and p["online"])
        assert (await bob.call("typing", {"chat_id": chat_id}))["sent"] is True
        assert (await bob.call("typing", {"chat_id": chat_id}))["sent"] is False
        assert await alice.wait_for("typing") == {"chat_id": chat_id, "user_id": "bob"}
        await api.send(chat_id, "two")
        await alice.wait_for("new-message", lambda m: m["seq"] == 2)
        await bob.close()
        await alice.wait_for("presence", lambda p: p["user_id"] == "bob" and not p["online"])
        assert bob.of("typing") == []
        assert [m["seq"] for m in alice.of("new-message")] == [2]
    finally:
        for c in (alice, bob):
            if c is not None:
                await c.close()
        await daemon.stop()
