"""Fixtures: a real PostgreSQL database and a real Redis key prefix per test
run, chatd in-process (for most tests) or as real processes (end-to-end).

Every run creates its own database (``chatd_test_<random>``), migrates it with
the same code chatctl uses, and drops it at the end; Redis keys live under a
run-specific prefix and are removed at the end. So runs never share state and
can run twice in a row or side by side.

Where the stores are: ``CHATD_TEST_PG_URL`` (an admin connection that may
create databases, e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``) and
``CHATD_TEST_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/0``). When neither is
set, the session starts one embedded PostgreSQL and Redis of its own
(chatd.embedded, the same code as chatd's zero-setup default) in a temporary
folder and stops them at the end: the suite needs nothing installed but Python.

Servers are used only when named, never because something happens to listen
on 5432: a run must not depend on, or create databases in, whatever a machine
has running. Set one and not the other and the other is embedded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from chatd import config, embedded, migrations
from chatd.server import Chatd

from .faults import PostgresCluster, RedisServer, TcpProxy
from .helpers import SECRET, Api, ChatdProcess, pg_query

# Set by pytest_configure: the external servers, or the session's embedded ones.
PG_ADMIN_URL = ""
REDIS_URL = ""
_EMBEDDED: embedded.EmbeddedServers | None = None


def pytest_configure(config):
    global PG_ADMIN_URL, REDIS_URL, _EMBEDDED
    PG_ADMIN_URL = os.environ.get("CHATD_TEST_PG_URL", "")
    REDIS_URL = os.environ.get("CHATD_TEST_REDIS_URL", "")
    if PG_ADMIN_URL and REDIS_URL:
        return
    import tempfile

    folder = tempfile.mkdtemp(prefix="chatd-test-embedded-")
    # Only the servers this run lacks; fsync off: a test database need not survive a crash.
    _EMBEDDED = embedded.EmbeddedServers(
        folder, durable=False, with_postgres=not PG_ADMIN_URL, with_redis=not REDIS_URL
    )
    _EMBEDDED.start()
    PG_ADMIN_URL = PG_ADMIN_URL or _EMBEDDED.admin_url()
    REDIS_URL = REDIS_URL or _EMBEDDED.redis_url
    # pytest-xdist's workers start after this (in the controller) and inherit
    # the environment: they use these servers instead of starting their own.
    os.environ["CHATD_TEST_PG_URL"] = PG_ADMIN_URL
    os.environ["CHATD_TEST_REDIS_URL"] = REDIS_URL


def pytest_unconfigure(config):
    global _EMBEDDED
    if _EMBEDDED is not None:
        import shutil

        _EMBEDDED.stop()
        shutil.rmtree(_EMBEDDED.layout.root, ignore_errors=True)
        _EMBEDDED = None


def pytest_report_header(config):
    return f"chatd stores: PostgreSQL {PG_ADMIN_URL}; Redis {REDIS_URL} (unix sockets: embedded)"


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


# Every test sends as alice and bob, all within seconds: the default budgets
# (30 sends/10 s per user) would make unrelated tests flaky. Rate-limit tests
# set their own budgets (tests/test_rate_limits.py).
NO_RATE_LIMITS = {"RATE_LIMIT_SENDS": "1000000/1s", "RATE_LIMIT_EVENTS": "1000000/1s"}


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _admin(sql: str) -> None:
    pg_query(PG_ADMIN_URL, sql)


@contextlib.contextmanager
def fresh_database():
    """A new, empty database; dropped afterwards."""
    name = f"chatd_test_{secrets.token_hex(6)}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(PG_ADMIN_URL, name)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url():
    """The run's migrated database."""
    with fresh_database() as url:
        migrations.migrate(url)
        yield url


@pytest.fixture
def empty_database_url():
    """A database with no schema at all (migration tests)."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_prefix():
    prefix = f"chatd-test:{secrets.token_hex(6)}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_cluster():
    """A real 3-master Redis Cluster, started once for the session
    (tests/faults.py); ``.nodes`` is REDIS_CLUSTER_NODES."""
    from .faults import RedisClusterServers

    servers = RedisClusterServers().start()
    yield servers
    servers.close()


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def deployment_env(database_url: str, redis_prefix: str) -> dict[str, str]:
    """What makes chatd and chatctl one deployment in a test: the run's
    database, secret, Redis prefix and its own Socket.IO channel."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "ACCESS_TOKEN_SECRET": SECRET,
        "CHATD_REDIS_PREFIX": redis_prefix,
        "SOCKETIO_CHANNEL": f"{redis_prefix}:socketio",
    }


def chatd_env(database_url: str, redis_prefix: str) -> dict[str, str]:
    """The environment of a test's chatd: the deployment's settings, a free
    port, no rate limits."""
    return {
        **deployment_env(database_url, redis_prefix),
        "CHATPORT": "0",
        "CHATD_HOST": "127.0.0.1",
        **NO_RATE_LIMITS,
    }


@pytest.fixture
def settings(database_url, redis_prefix) -> config.Settings:
    return config.load(
        {**chatd_env(database_url, redis_prefix), "LOG_LEVEL": "warning"}, use_dotenv=False
    )


@pytest.fixture
def chatd(io_loop, settings):
    """chatd running in this process, on the test's IOLoop, on a free port."""
    daemon = Chatd(settings)
    io_loop.run_sync(daemon.start)
    yield daemon
    io_loop.run_sync(daemon.stop)


@pytest.fixture
def api(chatd) -> Api:
    return Api(f"http://127.0.0.1:{chatd.port}")


@pytest.fixture
def unused_port() -> int:
    """A TCP port free right now (for tests that restart a process on the same port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def chat_id() -> str:
    """A chat id no other test uses."""
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def spawn(request, database_url, redis_prefix):
    """Start real chatd processes: ``spawn(**env_overrides) -> ChatdProcess``.
    Their logs are removed after a passing test and kept (paths printed) after
    a failing one."""
    started: list[ChatdProcess] = []

    def start(**env) -> ChatdProcess:
        base = chatd_env(database_url, redis_prefix)
        base.update({k: (None if v is None else str(v)) for k, v in env.items()})
        proc = ChatdProcess.start(base)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    report = getattr(request.node, "rep_call", None)
    for proc in started:
        if report is not None and report.passed:
            proc.log_path.unlink(missing_ok=True)
        else:
            print(f"chatd log kept: {proc.log_path}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (rep_setup, rep_call, ...), for
    fixtures that act on the outcome (spawn's logs)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def tcp_proxy():
    """``tcp_proxy(host, port) -> TcpProxy``: a proxy the test can cut (tests/faults.py)."""
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def private_redis():
    """A redis-server of this test's own, started; stop()/start() it at will."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def private_postgres():
    """A PostgreSQL cluster of this test's own, migrated, for a real restart."""
    try:
        cluster = PostgresCluster()
    except FileNotFoundError as exc:
        pytest.skip(f"PostgreSQL server binaries are not installed: {exc}")
    try:
        cluster.start()
        migrations.migrate(cluster.url)
        yield cluster
    finally:
        cluster.close()
