"""Per-user rate limits (chatd.limits): sends across processes, socket events,
429 + Retry-After on HTTP, the rate_limited ack on sockets.

Each test signs in as users of its own (rl-<random>), because the windows live
in Redis under the run's prefix and every other test sends as alice and bob.
"""

from __future__ import annotations

import dataclasses
import uuid

import psycopg2
import pytest
import redis

from chatd import config
from chatd.errors import RateLimited
from chatd.limits import EVENTS, SENDS, RateLimiter
from chatd.server import Chatd

from .helpers import Api, SocketClient


def fresh_user() -> str:
    return f"rl-{uuid.uuid4().hex[:10]}"


def messages_by(database_url: str, chat_id: str, user: str) -> int:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM messages WHERE chat_id = %s AND sender_id = %s", (chat_id, user)
        )
        return cur.fetchone()[0]


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_send_limit_holds_across_two_processes(spawn, chat_id, database_url):
    user, other = fresh_user(), fresh_user()
    a = spawn(RATE_LIMIT_SENDS="5/10s")
    b = spawn(RATE_LIMIT_SENDS="5/10s")
    api_a, api_b = Api(a.url), Api(b.url)
    await api_a.create_chat(chat_id, owner=user, members=[other])

    # Five sends, alternating processes: all within budget.
    for i in range(5):
        resp = await (api_a if i % 2 == 0 else api_b).send(chat_id, f"m{i}", user=user)
        assert resp.status == 201, resp
    # The sixth is refused by whichever process takes it: the window is shared.
    for api in (api_a, api_b):
        resp = await api.send(chat_id, "one too many", user=user)
        assert resp.status == 429, resp
        assert resp.error_code == "rate_limited"
        retry_after = int(resp.headers["Retry-After"])
        assert 1 <= retry_after <= 10

    # The socket send-message shares the same budget, and says so in its ack.
    sock = await SocketClient(a.url, user=user).connect()
    try:
        ack = await sock.call("send-message", {"chat_id": chat_id, "content": "via socket"})
    finally:
        await sock.close()
    assert ack["ok"] is False
    assert ack["error"]["code"] == "rate_limited"
    assert 1 <= ack["error"]["retry_after"] <= 10

    # Another user is not affected, and nothing refused was stored.
    assert (await api_b.send(chat_id, "hi", user=other)).status == 201
    assert messages_by(database_url, chat_id, user) == 5


@pytest.mark.gen_test(timeout=30)
async def test_retry_after_is_the_time_left_in_the_window(settings, chat_id):
    user = fresh_user()
    daemon = Chatd(dataclasses.replace(settings, rate_limit_sends=(2, 3.0)))
    await daemon.start()
    try:
        api = Api(f"http://127.0.0.1:{daemon.port}")
        await api.create_chat(chat_id, owner=user)
        assert (await api.send(chat_id, "1", user=user)).status == 201
        assert (await api.send(chat_id, "2", user=user)).status == 201
        refused = await api.send(chat_id, "3", user=user)
        assert refused.status == 429
        assert refused.headers["Retry-After"] in ("1", "2", "3")
        assert refused.json["error"]["code"] == "rate_limited"
        # Bad input is refused before it costs budget.
        assert (await api.send(chat_id, "   ", user=user)).status == 400
    finally:
        await daemon.stop()


@pytest.mark.gen_test(timeout=30)
async def test_socket_events_have_their_own_budget(settings, chat_id):
    user, other = fresh_user(), fresh_user()
    daemon = Chatd(dataclasses.replace(settings, rate_limit_events=(5, 10.0)))
    await daemon.start()
    url = f"http://127.0.0.1:{daemon.port}"
    flooder = await SocketClient(url, user=user).connect()
    calm = await SocketClient(url, user=other).connect()
    try:
        acks = [await flooder.call("leave-chat", chat_id) for _ in range(6)]
        assert all(a["ok"] for a in acks[:5]), acks
        assert acks[5]["ok"] is False
        assert acks[5]["error"]["code"] == "rate_limited"
        assert 1 <= acks[5]["error"]["retry_after"] <= 10
        # The socket stays connected (a refusal, not a disconnect), and other
        # users are not affected.
        assert flooder.sio.connected
        assert (await calm.call("leave-chat", chat_id))["ok"] is True
    finally:
        await flooder.close()
        await calm.close()
        await daemon.stop()


@pytest.mark.gen_test
async def test_without_redis_windows_are_counted_in_process():
    limiter = RateLimiter(None, "unused", {SENDS: (3, 60.0), EVENTS: (1, 60.0)})
    for _ in range(3):
        await limiter.check("u1", SENDS)
    with pytest.raises(RateLimited) as refused:
        await limiter.check("u1", SENDS)
    assert 1 <= refused.value.retry_after <= 60
    await limiter.check("u2", SENDS)  # per user
    await limiter.check("u1", EVENTS)  # per kind


@pytest.mark.gen_test(timeout=30)
async def test_send_without_rate_limit_for_operator_tools(settings, chat_id):
    """chatctl seed and other tools call ChatService.send(rate_limited=False)."""
    user = fresh_user()
    daemon = Chatd(dataclasses.replace(settings, rate_limit_sends=(1, 60.0)))
    await daemon.start()
    try:
        api = Api(f"http://127.0.0.1:{daemon.port}")
        await api.create_chat(chat_id, owner=user)
        for i in range(5):
            posted = await daemon.domain.send(user, chat_id, f"seed {i}", rate_limited=False)
            assert posted.created
        assert (await api.send(chat_id, "first", user=user)).status == 201
        assert (await api.send(chat_id, "second", user=user)).status == 429
    finally:
        await daemon.stop()


def test_limits_can_be_turned_off_and_malformed_ones_are_refused():
    base = {"DATABASE_URL": "postgresql://x@127.0.0.1/x", "ACCESS_TOKEN_SECRET": "s"}
    loaded = config.load({**base, "RATE_LIMIT_SENDS": "off", "RATE_LIMIT_EVENTS": "50/5s"},
                         use_dotenv=False)  # fmt: skip
    assert loaded.rate_limit_sends is None
    assert loaded.rate_limit_events == (50, 5.0)
    defaults = config.load(base, use_dotenv=False)
    assert (defaults.rate_limit_sends, defaults.rate_limit_events) == ((30, 10.0), (120, 10.0))
    with pytest.raises(config.ConfigError, match="RATE_LIMIT_EVENTS"):
        config.load({**base, "RATE_LIMIT_EVENTS": "lots"}, use_dotenv=False)


@pytest.mark.gen_test
async def test_a_limit_that_is_off_never_refuses():
    limiter = RateLimiter(None, "unused", {SENDS: None, EVENTS: (1, 60.0)})
    for _ in range(100):
        await limiter.check("u1", SENDS)


@pytest.mark.gen_test(timeout=30)
async def test_socket_send_counts_as_send_and_event_in_one_round_trip(
    settings, private_redis, chat_id
):
    user = fresh_user()
    daemon = Chatd(
        dataclasses.replace(
            settings, redis_url=private_redis.url, rate_limit_events=(4, 30.0),
            rate_limit_sends=(100, 30.0),
        )
    )  # fmt: skip
    await daemon.start()
    stats = redis.Redis(port=private_redis.port)
    sock = await SocketClient(f"http://127.0.0.1:{daemon.port}", user=user).connect()
    try:
        api = Api(f"http://127.0.0.1:{daemon.port}")
        await api.create_chat(chat_id, owner=user)
        assert (await api.send(chat_id, "warm the scripts", user=user)).status == 201

        def scripts_run() -> int:
            info = stats.info("commandstats")
            return sum(info.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))

        before = scripts_run()
        assert (await api.send(chat_id, "rest", user=user)).status == 201
        rest_calls = scripts_run() - before
        before = scripts_run()
        ack = await sock.call("send-message", {"chat_id": chat_id, "content": "socket"})
        assert ack["ok"] is True
        socket_calls = scripts_run() - before
        # The limiter's script and the cache's append: a socket send pays no
        # extra round trip for being counted as an event too.
        assert rest_calls == socket_calls == 2, (rest_calls, socket_calls)

        # Events budget 4: that send, an invalid send, a leave; the 4th is the last.
        bad = await sock.call("send-message", {"chat_id": chat_id, "content": ""})
        assert bad["error"]["code"] == "validation_error"
        assert (await sock.call("leave-chat", chat_id))["ok"] is True
        assert (await sock.call("leave-chat", chat_id))["ok"] is True
        refused = await sock.call("send-message", {"chat_id": chat_id, "content": "5th"})
        assert refused["error"]["code"] == "rate_limited"
    finally:
        await sock.close()
        stats.close()
        await daemon.stop()
