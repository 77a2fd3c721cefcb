"""Faults with real chatd processes: PostgreSQL cut off and back, Redis stopped
and back (and partitioned), a process killed with SIGKILL under load.

What each test shows is stated in docs/GUARANTEES.md. The shared PostgreSQL
and Redis are never touched: chatd reaches PostgreSQL through a TcpProxy the
test cuts, and Redis faults use a redis-server of the test's own
(tests/faults.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import parse_qs, urlsplit, urlunsplit

import psycopg2
import pytest
import redis

from .faults import BLACKHOLE, RESET
from .helpers import Api, SocketClient

DB_TIMEOUT = 1.0
# A request during an outage must be answered within DB_TIMEOUT plus this
# (connect + query each bounded by it, plus scheduling on a busy 2-core box).
SLACK = 2.5


def pg_target(url: str) -> tuple[str, int | None]:
    """Where a PostgreSQL URL points: (host, port), or (socket path, None) for
    a Unix socket (``?host=/dir``, as the embedded default's URL has it)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    socket_dir = (query.get("host") or [""])[0]
    if socket_dir.startswith("/"):
        port = (query.get("port") or ["5432"])[0]
        return f"{socket_dir}/.s.PGSQL.{port}", None
    return parts.hostname or "127.0.0.1", parts.port or 5432


def via(url: str, port: int) -> str:
    """The same database, reached over TCP at 127.0.0.1:port (the proxy)."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    if parts.password:
        user = f"{parts.username}:{parts.password}@"
    query = "&".join(
        f"{k}={v}" for k, vs in parse_qs(parts.query).items() if k not in ("host", "port")
        for v in vs
    )  # fmt: skip
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}", query=query))


def rows_by_client_id(database_url: str, chat_id: str) -> dict[str, list[int]]:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT client_id, seq FROM messages WHERE chat_id = %s ORDER BY seq", (chat_id,)
        )
        out: dict[str, list[int]] = {}
        for cid, seq in cur.fetchall():
            out.setdefault(cid, []).append(seq)
        return out


def assert_gapless(rows: dict[str, list[int]]) -> None:
    seqs = sorted(s for v in rows.values() for s in v)
    assert seqs == list(range(1, len(seqs) + 1)), "seq has a gap or a repeat"


class Load:
    """Workers that each send messages with fresh client ids, recording every
    outcome and its latency; a failed send is remembered for a retry."""

    def __init__(self, chat_id: str, apis: list[Api], user: str = "alice"):
        self.chat_id = chat_id
        self.apis = apis
        self.user = user
        self.created: set[str] = set()  # answered 201
        self.failed: dict[str, tuple[str, Api]] = {}  # cid -> (content, api it went to)
        self.outcomes: list[tuple[float, int | str, str | None, float]] = []
        self.stop = asyncio.Event()

    async def worker(self, n: int, max_sends: int = 200) -> None:
        api = self.apis[n % len(self.apis)]
        for i in range(max_sends):
            if self.stop.is_set():
                return
            cid = f"w{n}-{i}-{uuid.uuid4().hex[:6]}"
            content = f"load {n}/{i}"
            started = time.monotonic()
            try:
                resp = await api.send(self.chat_id, content, user=self.user, client_id=cid)
                status, code = resp.status, resp.error_code
            except Exception as exc:  # connection refused/reset: a killed process
                status, code = "conn", type(exc).__name__
            elapsed = time.monotonic() - started
            self.outcomes.append((started, status, code, elapsed))
            if status == 201:
                self.created.add(cid)
            else:
                self.failed[cid] = (content, api)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.01)

    async def retry_failed(self, api: Api | None = None, deadline: float = 20.0) -> dict:
        """Resend every failed message with its client id until it is answered
        2xx: 201 (it had not been stored) or 200 (it had, and this is the original)."""
        answers = {}
        end = time.monotonic() + deadline
        for cid, (content, first_api) in self.failed.items():
            while True:
                try:
                    resp = await (api or first_api).send(
                        self.chat_id, content, user=self.user, client_id=cid
                    )
                    status = resp.status
                except Exception:
                    status = 0
                if status in (200, 201):
                    answers[cid] = status
                    break
                assert time.monotonic() < end, f"retry of {cid} still failing: {status}"
                await asyncio.sleep(0.2)
        return answers


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("how", [RESET, BLACKHOLE])
async def test_postgres_outage_fails_fast_then_recovers_without_restart(
    spawn, tcp_proxy, database_url, chat_id, how
):
    proxy = tcp_proxy(*pg_target(database_url))
    proc = spawn(DATABASE_URL=via(database_url, proxy.port), DB_TIMEOUT=DB_TIMEOUT, DB_POOL_SIZE=5)
    api = Api(proc.url)
    await api.create_chat(chat_id)

    sock = await SocketClient(proc.url).connect()
    load = Load(chat_id, [api])
    workers = [asyncio.ensure_future(load.worker(n)) for n in range(3)]
    try:
        await asyncio.sleep(1.0)
        assert load.created, "no send succeeded before the outage"
        cut_at = time.monotonic()
        proxy.cut(how)

        # During the outage: reads, sends and readiness answer 503 fast.
        await asyncio.sleep(0.3)
        started = time.monotonic()
        read = await api.get(f"/chats/{chat_id}/messages")
        assert read.status == 503, read
        assert read.error_code == "unavailable"
        assert time.monotonic() - started < DB_TIMEOUT + SLACK
        ready = await api.get("/readyz", user=None)
        assert ready.status == 503
        assert "postgres" in ready.json["error"]["message"]
        # Sockets get the same answer in their ack, as fast.
        started = time.monotonic()
        ack = await sock.call("send-message", {"chat_id": chat_id, "content": "x"})
        assert ack["ok"] is False
        assert ack["error"]["code"] == "unavailable"
        assert time.monotonic() - started < DB_TIMEOUT + SLACK
        await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - cut_at)))

        proxy.restore()
        restored_at = time.monotonic()
        # chatd recovers by itself: a send succeeds again within seconds.
        while True:
            probe = await api.send(chat_id, "back?", client_id=f"probe-{uuid.uuid4().hex[:8]}")
            if probe.status == 201:
                break
            assert time.monotonic() - restored_at < 10, f"not recovered: {probe}"
            await asyncio.sleep(0.2)
        recovered_in = time.monotonic() - restored_at
        await asyncio.sleep(0.5)
    finally:
        load.stop.set()
        await asyncio.gather(*workers)
        await sock.close()

    assert proc.proc.poll() is None, "chatd exited"
    assert recovered_in < 5, f"took {recovered_in:.1f}s to recover"
    during = [o for o in load.outcomes if cut_at <= o[0] < restored_at - SLACK]
    failures = [o for o in load.outcomes if o[1] != 201]
    assert failures, "the outage did not fail any send"
    # Every failure is a clean 503 unavailable, and none waited much past DB_TIMEOUT.
    assert {(o[1], o[2]) for o in failures} == {(503, "unavailable")}, failures
    slowest = max(o[3] for o in during + failures)
    assert slowest < DB_TIMEOUT + SLACK, f"a request took {slowest:.1f}s during the outage"

    # Clients retry what failed, with the same client ids: no duplicates.
    answers = await load.retry_failed()
    assert set(answers.values()) <= {200, 201}
    rows = rows_by_client_id(database_url, chat_id)
    for cid in load.created | set(load.failed):
        assert len(rows.get(cid, [])) == 1, f"{cid}: {rows.get(cid)}"
    assert_gapless(rows)


async def wait_until(predicate, timeout: float, what: str, step: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(step)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_redis_stopped_sends_and_reads_keep_working(spawn, private_redis, chat_id):
    proc = spawn(REDIS_URL=private_redis.url, REDIS_TIMEOUT="0.5", RATE_LIMIT_SENDS="1000/10s")
    api = Api(proc.url)
    await api.create_chat(chat_id, members=["bob"])
    for i in range(3):
        assert (await api.send(chat_id, f"before {i}")).status == 201
    assert (await api.get(f"/chats/{chat_id}/messages")).status == 200
    listener = await SocketClient(proc.url, user="bob").connect()
    try:
        assert (await listener.call("join-chat", chat_id))["ok"]

        private_redis.stop()
        for i in range(5):
            started = time.monotonic()
            sent = await api.send(chat_id, f"during {i}")
            assert sent.status == 201, sent
            page = await api.get(f"/chats/{chat_id}/messages")
            assert page.status == 200
            assert page.json["messages"][-1]["id"] == sent.json["id"]
            assert time.monotonic() - started < 3, "Redis being down slowed a request"
            # Sockets on this process still get the event (delivered locally
            # before the publish that fails).
            await listener.wait_for("new-message", lambda m, s=sent: m["id"] == s.json["id"], 5)
        ready = await api.get("/readyz", user=None)
        assert ready.status == 503
        assert ready.error_code == "unavailable"
        assert "redis" in ready.json["error"]["message"]
        assert "postgres" not in ready.json["error"]["message"]

        private_redis.start()

        async def ready_again():
            return (await api.get("/readyz", user=None)).status == 200

        await wait_until(ready_again, 10, "/readyz after Redis came back")
        await asyncio.sleep(1.2)  # the breakers' second
        assert (await api.send(chat_id, "after")).status == 201
        page = (await api.get(f"/chats/{chat_id}/messages")).json["messages"]
        assert [m["content"] for m in page][-1] == "after"
        assert len(page) == 3 + 5 + 1
    finally:
        await listener.close()
    assert proc.proc.poll() is None
    log = proc.log()
    assert log.count("Traceback") == 0, log
    # Logged once per outage, not once per request.
    assert log.count("rate limits off") == 1, log
    assert log.count("rate limits on again") == 1, log
    assert log.count("cannot publish to Redis") == 1, log


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_cache_is_never_stale_after_a_redis_partition(
    spawn, private_redis, tcp_proxy, chat_id
):
    proxy = tcp_proxy("127.0.0.1", private_redis.port)
    proc = spawn(REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0", REDIS_TIMEOUT="0.5")
    api = Api(proc.url)
    direct = redis.Redis(port=private_redis.port)
    try:
        await api.create_chat(chat_id)
        ids = [(await api.send(chat_id, f"m{i}")).json["id"] for i in range(4)]
        assert (await api.get(f"/chats/{chat_id}/messages")).status == 200

        async def cached():
            return [k for k in direct.scan_iter(match=f"*{{chat:{chat_id}}}:rows")]

        await wait_until(cached, 5, "the page cache to fill")

        for how in (RESET, BLACKHOLE):
            proxy.cut(how)
            started = time.monotonic()
            # Both writes land in PostgreSQL; the cache cannot hear of them.
            gone = ids.pop(1)
            assert (await api.delete(f"/messages/{gone}")).status == 204
            ids.append((await api.send(chat_id, f"during {how}")).json["id"])
            page = await api.get(f"/chats/{chat_id}/messages")
            assert page.status == 200
            assert [m["id"] for m in page.json["messages"]] == ids
            assert time.monotonic() - started < 6, f"Redis {how} slowed requests down"

            proxy.restore()
            # Redis is back with the page it had before the outage, two
            # versions old: it must never be served.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                page = await api.get(f"/chats/{chat_id}/messages")
                assert page.status == 200
                assert [m["id"] for m in page.json["messages"]] == ids, "stale page served"
                await asyncio.sleep(0.2)
    finally:
        direct.close()
    assert proc.proc.poll() is None


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_sigkill_under_load_loses_nothing_and_socket_catches_up(spawn, database_url, chat_id):
    a, b = spawn(), spawn()
    api_a, api_b = Api(a.url), Api(b.url)
    await api_a.create_chat(chat_id, members=["bob"])

    seen: dict[int, dict] = {}
    sock = await SocketClient(a.url, user="bob").connect()
    assert (await sock.call("join-chat", chat_id))["ok"]

    load = Load(chat_id, [api_a, api_a, api_b])
    workers = [asyncio.ensure_future(load.worker(n)) for n in range(3)]
    try:
        await asyncio.sleep(1.5)
        a.proc.kill()  # SIGKILL: no shutdown, no drain
        a.proc.wait(10)
        await asyncio.sleep(1.0)
    finally:
        load.stop.set()
        await asyncio.gather(*workers)
    for _event, data in list(sock.events):
        if isinstance(data, dict) and "seq" in data:
            seen[data["seq"]] = data
    try:
        await sock.close()
    except Exception:
        pass

    assert any(o[1] == "conn" for o in load.outcomes), "no request hit the killed process"
    assert all(o[1] in (201, "conn") for o in load.outcomes), set(o[1] for o in load.outcomes)

    # The socket reconnects to the other process and asks for what it missed,
    # from the last seq up to which it has everything.
    have = 0
    while have + 1 in seen:
        have += 1
    sock2 = await SocketClient(b.url, user="bob").connect()
    try:
        ack = await sock2.call("join-chat", {"chat_id": chat_id, "since_seq": have})
        assert ack["ok"], ack
        assert not ack["has_more"]
        for m in ack["missed"]:
            seen[m["seq"]] = m
        # The clients retry what failed on the dead process against the live one.
        answers = await load.retry_failed(api=api_b)
        assert set(answers.values()) <= {200, 201}
        created_later = [cid for cid, status in answers.items() if status == 201]
        # Messages created by the retries reach the new socket as events.
        for cid in created_later:
            await sock2.wait_for("new-message", lambda m, c=cid: m["client_id"] == c, 5)
        for _event, data in list(sock2.events):
            if isinstance(data, dict) and "seq" in data:
                seen[data["seq"]] = data
    finally:
        await sock2.close()

    rows = rows_by_client_id(database_url, chat_id)
    for cid in load.created | set(load.failed):
        assert len(rows.get(cid, [])) == 1, f"{cid}: {rows.get(cid)}"
    assert_gapless(rows)
    last_seq = max(s for v in rows.values() for s in v)
    assert sorted(seen) == list(range(1, last_seq + 1)), "the socket has a gap"


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_pool_recovers_at_once_when_postgres_restarted_unnoticed(
    spawn, tcp_proxy, database_url, chat_id
):
    """PostgreSQL restarts and its resets never reach chatd (a failover, or a
    restart during a partition): every pooled connection is dead and looks
    fine. The first request to use one fails (503; it cannot know whether its
    statement ran), and that failure drops the other idle connections too, so
    the next request already works instead of each dead connection failing
    one more request."""
    proxy = tcp_proxy(*pg_target(database_url))
    proc = spawn(DATABASE_URL=via(database_url, proxy.port), DB_TIMEOUT=DB_TIMEOUT, DB_POOL_SIZE=6)
    api = Api(proc.url)
    await api.create_chat(chat_id)
    # Open several pooled connections: concurrent requests each need one.
    # How many a burst opens depends on how fast each is served (reads of one
    # page coalesce, a busy machine serialises): burst until there are three,
    # rather than assuming that three bursts make them.
    deadline = time.monotonic() + 20
    while proxy.open_connections < 3 and time.monotonic() < deadline:
        pages = await asyncio.gather(
            *(api.get(f"/chats/{chat_id}/messages?limit={n}") for n in range(1, 9)),
            *(api.get(f"/chats/{chat_id}/messages?limit={n}&before_seq=5") for n in range(1, 9)),
        )
        assert all(p.status == 200 for p in pages), pages
    assert proxy.open_connections >= 3, proxy.open_connections

    proxy.restart_behind()
    statuses = []
    for i in range(6):
        resp = await api.send(chat_id, f"after restart {i}", client_id=f"r-{i}")
        statuses.append((resp.status, resp.error_code))
    failures = [s for s in statuses if s[0] != 201]
    assert set(failures) <= {(503, "unavailable")}, statuses
    assert len(failures) <= 1, f"each dead pooled connection failed a request: {statuses}"
    assert statuses[-1][0] == 201


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_events_cross_processes_again_soon_after_redis_returns(spawn, private_redis, chat_id):
    """After a Redis outage each process resubscribes within ~2 s (python-socketio
    alone backs off 1, 2, 4, 8... s, so after this 7.5 s outage it would stay
    deaf to other processes for another 7 s)."""
    env = {"REDIS_URL": private_redis.url, "REDIS_TIMEOUT": "0.5"}
    a, b = spawn(**env), spawn(**env)
    api_a = Api(a.url)
    await api_a.create_chat(chat_id, members=["bob"])
    listener = await SocketClient(b.url, user="bob").connect()
    try:
        assert (await listener.call("join-chat", chat_id))["ok"]
        first = (await api_a.send(chat_id, "before")).json
        await listener.wait_for("new-message", lambda m: m["id"] == first["id"], 5)

        private_redis.stop()
        await asyncio.sleep(7.5)
        private_redis.start()
        back = time.monotonic()
        # Send until one crosses from A to B; each send is stored either way.
        while True:
            sent = (await api_a.send(chat_id, "after")).json
            try:
                await listener.wait_for("new-message", lambda m, s=sent: m["id"] == s["id"], 0.5)
                break
            except TimeoutError:
                assert time.monotonic() - back < 5, "B still deaf to A's events 5 s after Redis"
    finally:
        await listener.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_real_postgres_restart_while_clients_send(spawn, private_postgres, chat_id):
    """A real `pg_ctl restart -m fast` of a private cluster: sessions are
    terminated by the server (not by a proxy), chatd answers 503 meanwhile and
    carries on with the same process."""
    proc = spawn(DATABASE_URL=private_postgres.url, DB_TIMEOUT=DB_TIMEOUT, DB_POOL_SIZE=5)
    api = Api(proc.url)
    await api.create_chat(chat_id)
    load = Load(chat_id, [api])
    workers = [asyncio.ensure_future(load.worker(n)) for n in range(3)]
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(1.0)
        before = len(load.created)
        await loop.run_in_executor(None, private_postgres.restart)
        restarted_at = time.monotonic()
        while len(load.created) <= before + 3:
            assert time.monotonic() - restarted_at < 10, "sends did not resume after the restart"
            await asyncio.sleep(0.1)
    finally:
        load.stop.set()
        await asyncio.gather(*workers)

    assert proc.proc.poll() is None
    failures = [o for o in load.outcomes if o[1] != 201]
    assert {(o[1], o[2]) for o in failures} <= {(503, "unavailable")}, failures
    assert max(o[3] for o in load.outcomes) < DB_TIMEOUT + SLACK
    await load.retry_failed()
    rows = rows_by_client_id(private_postgres.url, chat_id)
    for cid in load.created | set(load.failed):
        assert len(rows.get(cid, [])) == 1, f"{cid}: {rows.get(cid)}"
    assert_gapless(rows)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_chatd_starts_and_serves_while_redis_is_down(spawn, private_redis, chat_id):
    private_redis.stop()
    proc = spawn(REDIS_URL=private_redis.url, REDIS_TIMEOUT="0.5")
    api = Api(proc.url)
    await api.create_chat(chat_id)
    assert (await api.send(chat_id, "no redis yet")).status == 201
    assert (await api.get(f"/chats/{chat_id}/messages")).json["messages"][0]["seq"] == 1
    assert "redis" in (await api.get("/readyz", user=None)).json["error"]["message"]

    private_redis.start()

    async def ready():
        return (await api.get("/readyz", user=None)).status == 200

    await wait_until(ready, 10, "/readyz once Redis is up")
    assert (await api.send(chat_id, "with redis")).status == 201
