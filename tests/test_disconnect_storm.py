"""Many sockets dropped at once (issue 11, item 2): presence still ends right.

Disconnects are handled in batches (chatd.realtime.ChatServer._drain):
presence for a whole batch in one Redis script (Presence.leave_many), and the
resulting ``online: false`` events delivered locally and published to the
other processes as one batch. The timing side (10,000 sockets, /healthz and
a send sampled meanwhile) is bench/disconnect_storm.py; this test checks the
outcome with a few hundred real sockets and two real processes."""

from __future__ import annotations

import asyncio
import collections
import json
import time

import pytest
import redis

from .helpers import Api, token
from .rawsocket import RawSocket

SOCKETS = 300
CHATS = 3


@pytest.mark.gen_test(timeout=120)
async def test_hundreds_of_sockets_dropped_at_once_leave_presence_exact(
    spawn, chat_id, private_redis, redis_prefix
):
    """...and in a few Redis round trips: one presence script and one publish
    per batch of disconnects (before: one of each per socket, 300 + 297)."""
    redis_client = redis.Redis.from_url(private_redis.url)
    a = spawn(REDIS_URL=private_redis.url, LOG_LEVEL="info", LOG_FORMAT="json")
    b = spawn(REDIS_URL=private_redis.url)
    api = Api(a.url)
    chats = [f"{chat_id}-{c}" for c in range(CHATS)]
    for c in chats:
        await api.create_chat(c, visibility="public")
    # On B: a keeper per chat, who stays and watches presence.
    keepers = []
    for c in chats:
        k = await RawSocket.open(b.url, token("keeper"))
        assert (await k.call("join-chat", c))["ok"]
        keepers.append(k)
    # On A: users u0..u299, one socket each in one chat; u0 also has a second
    # socket (on B) that stays, so u0 must stay online.
    stay = await RawSocket.open(b.url, token("u0"))
    assert (await stay.call("join-chat", chats[0]))["ok"]
    dropped = []
    for i in range(SOCKETS):
        s = await RawSocket.open(a.url, token(f"u{i}"))
        assert (await s.call("join-chat", chats[i % CHATS]))["ok"]
        dropped.append(s)
    key = f"{redis_prefix}:{{presence}}:chat:"

    def online(c: str) -> set[str]:
        return {u.decode() for u in redis_client.hkeys(key + c)}

    users_of = collections.defaultdict(set)
    for i in range(SOCKETS):
        users_of[chats[i % CHATS]].add(f"u{i}")
    for c in chats:
        assert online(c) == users_of[c] | {"keeper"}

    def calls(command: str) -> int:
        return redis_client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)

    scripts, publishes = calls("evalsha"), calls("publish")
    # All at once: reset every connection in the same loop turn.
    for s in dropped:
        s.abort()
    deadline = time.monotonic() + 30
    expected = {chats[0]: {"keeper", "u0"}, chats[1]: {"keeper"}, chats[2]: {"keeper"}}
    while {c: online(c) for c in chats} != expected:
        assert time.monotonic() < deadline, {c: online(c) for c in chats}
        await asyncio.sleep(0.1)
    # The keepers, on the other process, heard each user go offline exactly
    # once (batched publications arrive whole), and never u0.
    await asyncio.sleep(0.5)
    for c, k in zip(chats, keepers, strict=True):
        offline = [
            e["user_id"]
            for name, e in k.events
            if name == "presence" and e["chat_id"] == c and not e["online"]
        ]
        assert sorted(offline) == sorted(users_of[c] - {"u0"}), c
    # Batched: 300 disconnects in at most a few batches of 100 (how many
    # depends on how the resets arrive), each one script and one publish.
    assert calls("evalsha") - scripts <= 30, calls("evalsha") - scripts
    assert calls("publish") - publishes <= 30, calls("publish") - publishes
    # Logged: every dropped socket once, by user (and sid), but one line per
    # batch of disconnects rather than one per socket.
    records = [json.loads(line) for line in a.log().splitlines() if line.startswith("{")]
    lone = [r for r in records if r.get("event") == "socket_disconnect"]
    batches = [r for r in records if r.get("event") == "sockets_disconnect"]
    logged = [r["user_id"] for r in lone] + [u for r in batches for u in r["user_ids"]]
    assert sorted(logged) == sorted(f"u{i}" for i in range(SOCKETS))
    assert len({r["sid"] for r in lone} | {s for r in batches for s in r["sids"]}) == SOCKETS
    assert all(r["count"] == len(r["user_ids"]) > 1 for r in batches)
    assert all(r["level"] == "info" for r in lone + batches)
    assert len(lone) + len(batches) <= 30, (len(lone), len(batches))
    # Both processes still serve, and A holds no socket of the storm.
    assert (await api.get("/healthz")).status == 200
    metrics = (await api.get("/metrics")).body.decode()
    assert "chatd_sockets_connected 0.0" in metrics
    for s in [*keepers, stay]:
        await s.close()
    for s in dropped:
        await s.close()
    redis_client.close()
