"""A hung Redis (redis-server stopped with SIGSTOP: connections stay open,
nothing answers) must not slow chatd down: the first timeout opens one
breaker shared by every use of Redis, requests run at PostgreSQL speed
meanwhile, and within about 2 s of Redis answering again the page cache,
the fan-out between processes and the rate limits are back, with no stale
page served (docs/GUARANTEES.md, "Redis hung").

Real chatd processes and a redis-server of the test's own (tests/faults.py);
timing asserts are structural (no request waited two timeouts; once the
breaker is open no request waits for Redis at all), the latency figures
belong to bench/redis_hang.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest
import redis

from chatd import autopipe, cache
from chatd.redishealth import RedisUnavailable

from .helpers import Api, SocketClient, pg_query

REDIS_TIMEOUT = 1.0
SENDERS = 4
# Requests that start this long after Redis stopped find the breaker open
# (the first timeout has fired by then) and must not wait for Redis at all.
OPEN_AFTER = REDIS_TIMEOUT + 0.3
# "Not waiting for Redis": well under REDIS_TIMEOUT, far above PostgreSQL
# speed even on a busy machine.
FAST = REDIS_TIMEOUT / 2
# Everything is back within this long after Redis answers again (the
# guarantee says 2 s; a little slack for a busy 2-core box).
BACK_WITHIN = 2.5


def pause(server) -> None:
    os.kill(server.proc.pid, signal.SIGSTOP)


def resume(server) -> None:
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)


def env_for(server) -> dict:
    return {
        "REDIS_URL": server.url,
        "REDIS_TIMEOUT": REDIS_TIMEOUT,
        # Limits on (every send and socket event makes its Redis call); the
        # senders never reach theirs, a socket reaches its event budget soon.
        "RATE_LIMIT_SENDS": "10000/10s",
        "RATE_LIMIT_EVENTS": "10/10s",
    }


def visible_ids(database_url: str, chat_id: str, limit: int = 50) -> list[int]:
    rows = pg_query(
        database_url,
        "SELECT id FROM messages WHERE chat_id = %s AND NOT deleted ORDER BY seq DESC LIMIT %s",
        (chat_id, limit),
    )
    return [r[0] for r in reversed(rows)]


def chat_version(database_url: str, chat_id: str) -> int:
    return pg_query(database_url, "SELECT version FROM chats WHERE id = %s", (chat_id,))[0][0]


async def cache_hits(api: Api) -> float:
    text = (await api.get("/metrics", user=None)).body.decode()
    found = re.search(r"^chatd_cache_hits_total (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


class Traffic:
    """REST senders (one user each, all to one chat) and a reader, recording
    (started, elapsed, status) of every request."""

    def __init__(self, api: Api, chat_id: str):
        self.api = api
        self.chat_id = chat_id
        self.outcomes: list[tuple[float, float, int, str]] = []
        self.stop = asyncio.Event()

    async def _timed(self, what: str, call) -> None:
        started = time.monotonic()
        resp = await call
        self.outcomes.append((started, time.monotonic() - started, resp.status, what))

    async def sender(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            await self._timed("send", self.api.send(self.chat_id, f"s{n} {i}", user=f"s{n}"))
            i += 1
            await asyncio.sleep(0.02)

    async def reader(self) -> None:
        while not self.stop.is_set():
            await self._timed("read", self.api.get(f"/chats/{self.chat_id}/messages"))
            await asyncio.sleep(0.05)

    def run(self) -> list[asyncio.Task]:
        workers = [self.sender(n) for n in range(SENDERS)] + [self.reader()]
        return [asyncio.ensure_future(w) for w in workers]


async def within(seconds: float, what: str, check) -> float:
    """Poll ``check()`` until true; how long that took (fails after ``seconds``)."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("when", ["idle", "mid-pipeline"])
async def test_a_hung_redis_costs_one_timeout_at_most_and_everything_is_back_soon(
    spawn, private_redis, database_url, chat_id, when
):
    a, b = spawn(**env_for(private_redis)), spawn(**env_for(private_redis))
    api_a = Api(a.url)
    members = [f"s{n}" for n in range(SENDERS)] + ["bob"]
    await api_a.create_chat(chat_id, members=members)
    ids = [(await api_a.send(chat_id, f"before {i}")).json["id"] for i in range(3)]
    first = await api_a.get(f"/chats/{chat_id}/messages")
    assert [m["id"] for m in first.json["messages"]] == ids
    direct = redis.Redis(port=private_redis.port)
    listener = await SocketClient(b.url, user="bob").connect()
    typist = await SocketClient(a.url, user="s0").connect()
    try:
        assert (await listener.call("join-chat", chat_id))["ok"]
        assert (await typist.call("join-chat", chat_id))["ok"]
        await within(5, "the page cache to fill", lambda: _has_page(direct, chat_id))

        traffic = Traffic(api_a, chat_id)
        if when == "mid-pipeline":
            tasks = traffic.run()
            await asyncio.sleep(0.5)
            # Redis stops with calls in flight: the senders may all be between
            # two sends at that moment, so one more send is surely on its way
            # (started, not answered: its answer needs a turn of this loop).
            extra = traffic._timed("send", api_a.send(chat_id, "in flight", user="s1"))
            tasks.append(asyncio.ensure_future(extra))
            await asyncio.sleep(0)
            paused = time.monotonic()
            pause(private_redis)
        else:
            paused = time.monotonic()
            pause(private_redis)
            tasks = traffic.run()
        # Socket events that touch Redis (presence, the typing throttle, the
        # event budget) and a delete (publish) while it is hung.
        await asyncio.sleep(OPEN_AFTER)
        socket_calls = []
        for event in ("typing", "leave-chat", "join-chat"):
            started = time.monotonic()
            ack = await typist.call(event, {"chat_id": chat_id})
            socket_calls.append((event, time.monotonic() - started))
            assert ack["ok"], (event, ack)
        gone = ids.pop(0)
        started = time.monotonic()
        assert (await api_a.delete(f"/messages/{gone}")).status == 204
        delete_took = time.monotonic() - started
        await asyncio.sleep(2.0)
        traffic.stop.set()
        await asyncio.gather(*tasks)

        # While still hung: reads are exact (from PostgreSQL).
        page = await api_a.get(f"/chats/{chat_id}/messages")
        assert [m["id"] for m in page.json["messages"]] == visible_ids(database_url, chat_id)

        outcomes = traffic.outcomes
        assert all(200 <= status < 300 for _, _, status, _ in outcomes), outcomes
        during = [o for o in outcomes if o[0] + o[1] > paused]
        worst = max(o[1] for o in during)
        assert worst < 2 * REDIS_TIMEOUT, f"a request waited two timeouts: {worst:.2f} s"
        later = [o for o in during if o[0] > paused + OPEN_AFTER]
        assert len([o for o in later if o[3] == "send"]) >= 20, "too few sends while hung"
        slow = [o for o in later if o[1] >= FAST]
        assert not slow, f"waited for Redis with the breaker open: {slow}"
        assert all(took < FAST for _, took in socket_calls), socket_calls
        assert delete_took < FAST, delete_took
        if when == "mid-pipeline":
            in_flight = [o for o in outcomes if o[0] < paused < o[0] + o[1]]
            assert in_flight, "no request was in flight when Redis stopped"

        # Redis answers again.
        resume(private_redis)
        back = time.monotonic()

        # Fan-out: a send on A reaches B's socket.
        async def crosses() -> bool:
            sent = (await api_a.send(chat_id, "after", user="bob")).json
            try:
                await listener.wait_for("new-message", lambda m: m["id"] == sent["id"], 0.2)
            except TimeoutError:
                return False
            return True

        await within(BACK_WITHIN, "events crossing processes again", crosses)

        # The page cache: reads are hits again, and never stale.
        hits = await cache_hits(api_a)

        async def cache_used() -> bool:
            page = await api_a.get(f"/chats/{chat_id}/messages")
            assert [m["id"] for m in page.json["messages"]] == visible_ids(database_url, chat_id), (
                "stale page served"
            )
            return await cache_hits(api_a) > hits

        await within(BACK_WITHIN - (time.monotonic() - back) + 0.5, "cache hits", cache_used)

        # The rate limits: the socket's events are counted again (its
        # events while Redis was hung were let through uncounted), so it
        # soon gets rate_limited.
        async def limited() -> bool:
            ack = await typist.call("typing", {"chat_id": chat_id})
            return not ack["ok"] and ack["error"]["code"] == "rate_limited"

        await within(BACK_WITHIN, "rate limits on again", limited)
        assert time.monotonic() - back < 2 * BACK_WITHIN
    finally:
        resume(private_redis)
        direct.close()
        await listener.close()
        await typist.close()
    log = a.log()
    assert "Traceback" not in log, log
    assert log.count("chatd.redis: Redis does not answer") == 1, log
    assert log.count("chatd.redis: Redis answers again") == 1, log


def _has_page_sync(direct: redis.Redis, chat_id: str) -> bool:
    return bool(list(direct.scan_iter(match=f"*{{chat:{chat_id}}}:meta")))


async def _has_page(direct: redis.Redis, chat_id: str) -> bool:
    return _has_page_sync(direct, chat_id)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_redis_back_empty_after_a_hang_serves_nothing_stale_nor_partial(
    spawn, private_redis, database_url, chat_id
):
    proc = spawn(**env_for(private_redis))
    api = Api(proc.url)
    await api.create_chat(chat_id)
    ids = [(await api.send(chat_id, f"m{i}")).json["id"] for i in range(5)]
    assert (await api.get(f"/chats/{chat_id}/messages")).status == 200
    direct = redis.Redis(port=private_redis.port)
    try:
        await within(5, "the page cache to fill", lambda: _has_page(direct, chat_id))

        pause(private_redis)
        started = time.monotonic()
        # The first call waits one timeout and opens the breaker; the rest are fast.
        assert (await api.delete(f"/messages/{ids.pop(1)}")).status == 204
        assert time.monotonic() - started < 2 * REDIS_TIMEOUT
        for i in range(3):
            started = time.monotonic()
            sent = await api.send(chat_id, f"hung {i}")
            assert sent.status == 201
            ids.append(sent.json["id"])
            page = await api.get(f"/chats/{chat_id}/messages")
            assert [m["id"] for m in page.json["messages"]] == ids
            assert time.monotonic() - started < FAST

        # Redis comes back empty: killed while stopped, restarted on the same port.
        private_redis.stop()
        private_redis.start()
        back = time.monotonic()
        direct = redis.Redis(port=private_redis.port)

        # Sends are appended only on top of a page Redis has: none now, so
        # the cache does not start from a partial window.
        async def sent_with_redis() -> bool:
            sent = await api.send(chat_id, "back")
            ids.append(sent.json["id"])
            return (await api.get("/readyz", user=None)).status == 200

        await within(BACK_WITHIN, "Redis in use again", sent_with_redis)
        ids.append((await api.send(chat_id, "after")).json["id"])
        assert not _has_page_sync(direct, chat_id), "a page was built from a partial state"

        # The next read refills the page from one PostgreSQL snapshot; reads are exact.
        hits = await cache_hits(api)
        for _ in range(3):
            page = await api.get(f"/chats/{chat_id}/messages")
            assert [m["id"] for m in page.json["messages"]] == ids, "stale page served"
            await asyncio.sleep(0.1)
        assert await cache_hits(api) > hits, "the cache was not used again"
        meta = {k.decode(): v for k, v in _meta(direct, chat_id).items()}
        assert int(meta["version"]) == chat_version(database_url, chat_id)
        assert time.monotonic() - back < 2 * BACK_WITHIN
    finally:
        resume(private_redis)
        direct.close()
    assert "Traceback" not in proc.log()


def _meta(direct: redis.Redis, chat_id: str) -> dict:
    keys = list(direct.scan_iter(match=f"*{{chat:{chat_id}}}:meta"))
    assert len(keys) == 1, keys
    return direct.hgetall(keys[0])


@pytest.mark.gen_test(timeout=60)
async def test_calls_waiting_on_a_hung_redis_are_released_together_and_never_misread(
    private_redis,
):
    """Two calls on two connections of a hung Redis: the first one's timeout
    releases both (the second does not wait a timeout of its own), later
    calls fail without a round trip, and after SIGCONT no connection that
    was waiting hands its late reply to another call."""
    client = cache.connect(private_redis.url, REDIS_TIMEOUT)
    batcher = autopipe.batcher(client)
    echo = client.register_script("return ARGV[1]")
    assert await batcher.run(echo, [], ["warm"]) == b"warm"
    done: dict[str, float] = {}

    def call(arg: str) -> asyncio.Future:
        future = asyncio.ensure_future(batcher.run(echo, [], [arg]))
        future.add_done_callback(lambda _: done.setdefault(arg, time.monotonic()))
        return future

    pause(private_redis)
    try:
        first = call("a")
        await asyncio.sleep(REDIS_TIMEOUT * 0.6)
        second = call("b")  # its own batch, on another connection
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) for r in results), results
        # Released together: without that, "b" waits its own timeout, 0.6 s later.
        assert abs(done["b"] - done["a"]) < REDIS_TIMEOUT * 0.3, done
        assert not batcher.health.up
        started = time.monotonic()
        with pytest.raises(RedisUnavailable):
            await batcher.run(echo, [], ["c"])
        assert time.monotonic() - started < FAST
    finally:
        resume(private_redis)
    assert await batcher.health.wait_up(BACK_WITHIN), "the probe did not hear Redis again"
    # Redis now answers "a" and "b" too, on connections nobody may read again.
    for round_ in range(3):
        args = [f"{round_}-{i}" for i in range(8)]
        replies = await asyncio.gather(*(batcher.run(echo, [], [a]) for a in args))
        assert replies == [a.encode() for a in args]
        for a in args:
            assert await batcher.run(echo, [], [a]) == a.encode()
    await cache.disconnect(client)
