"""Issue 12, "the first hour": what a newcomer meets at start-up works as the
README says. One data folder has one owner; /readyz tells the truth about the
embedded stores; start-up problems are one line, exit 2; --help starts nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from chatd.errors import Unavailable

from .conftest import chatd_env
from .helpers import ChatdProcess

ROOT = Path(__file__).resolve().parent.parent

EMBEDDED_ENV = {
    "DATABASE_URL": None,
    "DB_HOST": None,
    "REDIS_URL": None,
    "REDIS_HOST": None,
    "ACCESS_TOKEN_SECRET": None,
    "CHATPORT": "0",
    "CHATD_HOST": "127.0.0.1",
}


@pytest.fixture
def data_dir():
    # Not under pytest's tmp_path: as root, the embedded PostgreSQL runs as the
    # user chatd, which cannot enter /tmp/pytest-of-root (0700).
    folder = Path(tempfile.mkdtemp(prefix="chatd-test-data-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
    for name in ("DATABASE_URL", "ACCESS_TOKEN_SECRET", "CHATD_ENV_FILE"):
        env.pop(name, None)
    env.update({k: v for k, v in overrides.items() if v is not None})
    return env


def _chatd(env: dict, timeout: float = 60, args=()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),  # not the checkout: no developer .env
    )


class _Resp:
    def __init__(self, status: int, text: str):
        self.status, self.text = status, text

    @property
    def json(self):
        return json.loads(self.text)

    def __repr__(self) -> str:
        return f"<{self.status} {self.text[:300]}>"


def _get(base: str, path: str, auth: str | None = None) -> _Resp:
    req = urllib.request.Request(base + path, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return _Resp(resp.status, resp.read().decode())
    except urllib.error.HTTPError as exc:
        return _Resp(exc.code, exc.read().decode())


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _servers(proc: ChatdProcess) -> dict[str, psutil.Process]:
    out = {}
    for child in psutil.Process(proc.proc.pid).children():
        try:
            out[child.name()] = child
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_a_second_chatd_on_the_same_data_folder_is_refused_and_changes_nothing(
    data_dir, unused_port
):
    first = ChatdProcess.start({**EMBEDDED_ENV, "CHATD_DATA_DIR": str(data_dir)}, timeout=90)
    try:
        sock = data_dir / "redis" / "redis.sock"
        before = sock.stat().st_ino
        servers = _servers(first)
        assert {"postgres", "redis-server"} <= set(servers), servers

        second = _chatd(
            _env(CHATD_DATA_DIR=str(data_dir), CHATPORT=str(unused_port), CHATD_HOST="127.0.0.1")
        )
        assert second.returncode == 2, second
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert str(data_dir) in lines[0] and f"pid {first.proc.pid}" in lines[0], lines
        assert "Traceback" not in second.stderr + second.stdout

        # Nothing changed: same Redis socket (not replaced, not removed), the
        # same servers, no port taken, and the first one still fully works.
        assert sock.stat().st_ino == before
        assert _servers(first).keys() == servers.keys()
        assert all(p.is_running() for p in servers.values())
        assert not _listening(unused_port)
        assert "redis.log" in os.listdir(data_dir)
        # the second wrote nothing to the servers' logs (it started no server)
        assert "Address already in use" not in (data_dir / "redis.log").read_text()
        resp = _get(first.url, "/readyz")
        assert resp.status == 200, resp
    finally:
        first.stop()
    # Once the owner has stopped, the folder is free again.
    assert first.proc.returncode == 0
    again = ChatdProcess.start({**EMBEDDED_ENV, "CHATD_DATA_DIR": str(data_dir)}, timeout=90)
    again.stop()
    assert again.proc.returncode == 0


@pytest.mark.slow
def test_readyz_tells_the_truth_about_the_embedded_stores_without_paths(data_dir):
    proc = ChatdProcess.start({**EMBEDDED_ENV, "CHATD_DATA_DIR": str(data_dir)}, timeout=90)
    try:
        assert _get(proc.url, "/readyz").status == 200
        token = _token(data_dir)
        assert _get(proc.url, "/chats", auth=f"Bearer {token}").status == 200

        # Redis's socket file goes (what a second chatd's exit did to the
        # first's): a ping over the pool's open connection still answers, but
        # no new connection can be made, so chatd is not ready.
        servers = _servers(proc)
        (data_dir / "redis" / "redis.sock").unlink()
        resp = _get(proc.url, "/readyz")
        assert resp.status == 503, resp
        assert resp.json["error"] == {"code": "unavailable", "message": "unavailable: redis"}
        servers["redis-server"].kill()  # and its process: still 503
        resp = _until_503(proc.url)
        assert resp.status == 503, resp

        # PostgreSQL stops: /readyz says so, and a request that needs it gets a
        # 503 whose message carries no path of the server's disk.
        servers["postgres"].send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while "postgres" not in resp.json["error"]["message"] and time.monotonic() < deadline:
            time.sleep(0.1)
            resp = _until_503(proc.url)
        assert "postgres" in resp.json["error"]["message"], resp.json
        # Until PostgreSQL is gone its answer is "shutting down"; after, the
        # driver's error quotes the socket's path, which the client must not see.
        messages = set()
        deadline = time.monotonic() + 20
        while not any("socket" in m for m in messages) and time.monotonic() < deadline:
            resp = _get(proc.url, "/chats", auth=f"Bearer {token}")
            assert resp.status == 503, resp
            messages.add(resp.json["error"]["message"])
            time.sleep(0.1)
        assert any("socket" in m for m in messages), messages
        assert not [m for m in messages if "/" in m or "PGSQL" in m], messages
    finally:
        proc.stop()


def _until_503(base: str) -> _Resp:
    """Its children are chatd's to reap: /readyz is asked until it sees them go."""
    deadline = time.monotonic() + 15
    resp = _get(base, "/readyz")
    while resp.status != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
        resp = _get(base, "/readyz")
    return resp


def _token(data_dir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "token", "alice"],
        env=_env(CHATD_DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_store_errors_reach_clients_without_file_paths():
    exc = Unavailable(
        "PostgreSQL is unavailable: connection to server on socket "
        '"/var/lib/chatd/postgres/.s.PGSQL.5432" failed: No such file or directory'
    )
    body = exc.body()["error"]["message"]
    assert "/var/lib" not in body and "PGSQL" not in body, body
    assert body.startswith("PostgreSQL is unavailable: connection to server on socket")
    redis = Unavailable("Error 2 connecting to unix socket: /tmp/x/redis.sock. No such file.")
    assert "/tmp" not in redis.body()["error"]["message"]
    assert "/tmp/x/redis.sock" in redis.message  # logs and chatctl keep the detail


def test_a_busy_port_is_one_line_naming_it_exit_2(database_url, redis_prefix):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = _env(**{**chatd_env(database_url, redis_prefix), "CHATPORT": str(port)})
        out = _chatd(env)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("chatd:")]
    assert len(errors) == 1 and str(port) in errors[0], out.stderr
    assert "listening on" not in out.stderr


def test_a_busy_port_on_the_embedded_default_starts_no_server(data_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        out = _chatd(_env(CHATD_DATA_DIR=str(data_dir), CHATPORT=str(port), CHATD_HOST="127.0.0.1"))
    assert out.returncode == 2, out
    assert out.stderr.strip().splitlines() == [
        f"chatd: cannot listen on 127.0.0.1:{port}: something else listens there "
        "(another chatd?): stop it or set CHATPORT"
    ]
    assert not (data_dir / "postgres").exists()  # no initdb, no server started
    assert time.monotonic() - started < 20


def test_chatd_help_prints_usage_and_starts_nothing(data_dir):
    out = _chatd(_env(CHATD_DATA_DIR=str(data_dir), CHATPORT="0"), args=["--help"], timeout=30)
    assert out.returncode == 0, out
    assert out.stdout.startswith("Usage: chatd")
    for word in ("CHATPORT", "FRONTENDADDRES", "DATABASE_URL", "CHATD_DATA_DIR", ".env.example"):
        assert word in out.stdout, word
    assert out.stderr == ""
    assert list(data_dir.iterdir()) == []  # nothing created, nothing started
    bad = _chatd(_env(CHATD_DATA_DIR=str(data_dir)), args=["--port", "1"], timeout=30)
    assert bad.returncode == 2 and bad.stderr.startswith("chatd: unexpected argument '--port'")


def test_env_example_copied_as_is_changes_nothing(tmp_path):
    """A newcomer copies .env.example to .env to set one thing: as it is, the
    copy must leave every default alone (the embedded default included)."""
    from chatd import config

    defaults = config.load({}, use_dotenv=False)
    copied = config.load({}, env_file=ROOT / ".env.example")
    assert copied.database_url is None and copied.redis_url is None  # embedded default
    assert copied.access_token_secret == ""  # generated in the data folder, not "change-me"
    assert copied == defaults
    # Every setting is still listed (commented out, with its default or an example).
    text = (ROOT / ".env.example").read_text()
    for name in ("DATABASE_URL", "REDIS_URL", "DB_HOST", "FRONTENDADDRES", "CHATD_DATA_DIR"):
        assert f"\n#{name}=" in text, name
    # Uncommenting one line changes that setting only.
    one = tmp_path / ".env"
    one.write_text(text.replace("#FRONTENDADDRES=", "FRONTENDADDRES="))
    changed = config.load({}, env_file=one)
    assert changed.cors_origins == ("http://localhost:3000",)
    assert changed.database_url is None


def _check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tempfile.gettempdir(),
    )


def _check_lines(out: subprocess.CompletedProcess) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in out.stdout.splitlines()}


@pytest.mark.slow
def test_readme_chatctl_check_and_chatd_work_on_the_embedded_default(data_dir, unused_port):
    """README: `chatctl check && chatd`. Before chatd runs, check passes on what
    can be checked; the chatd it lets start then works; with chatd running,
    check looks at the live stores."""
    env = _env(CHATD_DATA_DIR=str(data_dir), CHATPORT=str(unused_port), CHATD_HOST="127.0.0.1")
    log_path = data_dir.parent / f"{data_dir.name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["sh", "-c", f"{sys.executable} -m cli.main check && exec {sys.executable} -m chatd"],
            env=env, cwd=tempfile.gettempdir(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "listening on" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
        text = log_path.read_text()
        offline = {line.split()[1]: line.split()[0] for line in text.splitlines()[:6]}
        assert offline == dict.fromkeys(
            ("config", "data", "binaries", "secret", "port", "schema"), "ok"
        ), text
        live = _check(env)
        assert live.returncode == 0, live.stdout + live.stderr
        assert _check_lines(live) == dict.fromkeys(("config", "postgres", "redis", "schema"), "ok")
        assert f"pid {proc.pid}" in live.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log_path.unlink(missing_ok=True)
    assert proc.returncode == 0


def test_chatctl_check_on_the_embedded_default_fails_when_chatd_could_not_start(data_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _check(_env(CHATD_DATA_DIR=str(data_dir), CHATPORT=str(port), CHATD_HOST="127.0.0.1"))
    assert out.returncode == 1
    lines = _check_lines(out)
    assert lines["port"] == "FAIL" and lines["data"] == "ok", out.stdout
    assert str(port) in out.stdout
    # A data folder that cannot be made (its parent is a file).
    blocker = data_dir / "file"
    blocker.write_text("")
    out = _check(_env(CHATD_DATA_DIR=str(blocker / "chatd"), CHATPORT="0"))
    assert out.returncode == 1
    assert _check_lines(out)["data"] == "FAIL", out.stdout
    assert list(data_dir.iterdir()) == [blocker]  # check wrote nothing


# -- CORS (item 5) ---------------------------------------------------------------


@pytest.fixture
def cors_daemon(io_loop, settings):
    import dataclasses

    from chatd.server import Chatd

    daemon = Chatd(dataclasses.replace(settings, cors_origins=("https://app.example",)))
    io_loop.run_sync(daemon.start)
    yield daemon
    io_loop.run_sync(daemon.stop)


async def _ws_upgrade(port: int, origin: str):
    from tornado.httpclient import AsyncHTTPClient

    return await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket",
        headers={"Origin": origin, "Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"},
        raise_error=False,
    )  # fmt: skip


@pytest.mark.gen_test
async def test_browser_code_can_read_request_id_and_retry_after_on_real_answers(cors_daemon):
    from .helpers import Api

    api = Api(f"http://127.0.0.1:{cors_daemon.port}")
    for user in ("alice", None):  # a 200 and a 401
        resp = await api.get("/chats", user=user, headers={"Origin": "https://app.example"})
        exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"X-Request-Id", "Retry-After"} <= exposed, resp.headers
    other = await api.get("/chats", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Expose-Headers" not in other.headers


@pytest.mark.gen_test
async def test_refused_websocket_origin_is_json_403_logged_once_with_a_hint(cors_daemon, caplog):
    caplog.set_level(logging.INFO, logger="chatd.realtime")
    for _ in range(3):
        resp = await _ws_upgrade(cors_daemon.port, "https://evil.example")
        assert resp.code == 403, resp
        assert resp.headers["Content-Type"].startswith("application/json")
        body = json.loads(resp.body)
        assert body["error"]["code"] == "forbidden", body
        assert "evil.example" in body["error"]["message"]
    await _ws_upgrade(cors_daemon.port, "http://other.example")
    hints = [r.getMessage() for r in caplog.records if "FRONTENDADDRES" in r.getMessage()]
    assert len(hints) == 2, hints  # once per origin
    assert "https://evil.example" in hints[0] and "https://app.example" in hints[0]
    assert "ERROR" not in {r.levelname for r in caplog.records}
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(HTTPRequest(
        f"ws://127.0.0.1:{cors_daemon.port}/socket.io/?EIO=4&transport=websocket",
        headers={"Origin": "https://app.example"},
    ))  # fmt: skip
    try:
        assert (await conn.read_message()).startswith("0{")  # engine.io's open packet
    finally:
        conn.close()


@pytest.mark.gen_test
async def test_without_frontendaddres_foreign_sockets_get_json_403_same_origin_is_fine(chatd):
    resp = await _ws_upgrade(chatd.port, "http://localhost:3000")
    assert resp.code == 403 and json.loads(resp.body)["error"]["code"] == "forbidden"
    from .helpers import Api

    api = Api(f"http://127.0.0.1:{chatd.port}")
    same = f"http://127.0.0.1:{chatd.port}"
    polling = "/socket.io/?EIO=4&transport=polling"
    ok = await api.get(polling, user=None, headers={"Origin": same})
    assert ok.status == 200, ok
    foreign = await api.get(polling, user=None, headers={"Origin": "http://localhost:3000"})
    assert foreign.status == 403 and foreign.error_code == "forbidden"


def test_frontendaddres_entries_are_validated():
    from chatd import config

    def load(value):
        return config.load({"FRONTENDADDRES": value}, use_dotenv=False).cors_origins

    assert load("http://localhost:3000, https://App.Example:443,*") == (
        "http://localhost:3000", "https://app.example", "*",
    )  # fmt: skip
    assert load("capacitor://localhost, http://[::1]:8000") == (
        "capacitor://localhost", "http://[::1]:8000",
    )  # fmt: skip
    for bad, hint in (("localhost:3000", "http://localhost:3000"),
                      ("http://app.example/", "http://app.example"),
                      ("http://app.example/login", ""), ("https://", ""),
                      ("http://a.example:99999", "")):  # fmt: skip
        with pytest.raises(config.ConfigError) as info:
            load(bad)
        assert "FRONTENDADDRES" in str(info.value) and bad in str(info.value)
        assert hint in str(info.value)


def test_a_malformed_frontendaddres_stops_chatd_with_one_line(database_url, redis_prefix):
    env = _env(**{**chatd_env(database_url, redis_prefix), "FRONTENDADDRES": "localhost:3000"})
    out = _chatd(env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "chatd: FRONTENDADDRES entry 'localhost:3000' is not an origin: each must be "
        "scheme://host[:port] as a browser sends it, or * (with its scheme: "
        "http://localhost:3000?)"
    ]


@pytest.mark.slow
def test_start_up_says_which_origins_are_allowed(spawn):
    proc = spawn(FRONTENDADDRES="https://app.example,http://localhost:3000")
    assert (
        "cross-origin browsers allowed (FRONTENDADDRES): https://app.example, "
        "http://localhost:3000" in proc.log()
    )
    bare = spawn()
    assert "cross-origin browsers: none allowed (FRONTENDADDRES is empty" in bare.log()


# -- noise (item 8) ----------------------------------------------------------------

_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_socket_a_refusal_and_a_curl_make_one_plain_line_each(spawn):
    import socketio

    from .helpers import Api, token

    proc = spawn(LOG_LEVEL="info")
    curl = await Api(proc.url).get("/socket.io/", user=None)  # `curl /socket.io/`
    assert curl.status == 400
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(proc.url, auth={"token": token("alice")})  # polling, then upgrade
    await asyncio.sleep(0.3)
    await sio.disconnect()
    bad = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await bad.connect(proc.url, auth={"token": "not-a-token"}, wait_timeout=5)
    deadline = time.monotonic() + 10
    while "socket refused" not in proc.log() or "socket disconnect" not in proc.log():
        assert time.monotonic() < deadline, proc.log()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    lines = proc.log().splitlines()
    assert [line for line in lines if not _LOG_LINE.match(line)] == []  # no unprefixed copies
    assert [line for line in lines if " ERROR " in line] == []
    transport = [line for line in lines if "chatd.access" in line and "/socket.io/" in line]
    assert len(transport) == 1 and " 400 " in transport[0], transport  # only the refusal
    assert sum("socket connect " in line for line in lines) == 1
    assert sum("socket disconnect " in line for line in lines) == 1
    refused = [line for line in lines if "socket refused" in line]
    assert len(refused) == 1 and "reason=invalid access token" in refused[0], refused


def test_a_recorded_redis_pid_now_another_folders_redis_is_not_waited_for(data_dir, tmp_path):
    """After a reboot the pid chatd recorded may belong to another Redis (the
    system's, another folder's): that one is not a leftover of this folder."""
    from chatd import embedded

    servers = embedded.EmbeddedServers(data_dir, with_postgres=False, durable=False)
    rdir = data_dir / "redis"
    rdir.mkdir(mode=0o700)
    other_sock = tmp_path / "other.sock"
    other = subprocess.Popen(
        [str(embedded.redis_server_bin()), "--port", "0", "--unixsocket", str(other_sock),
         "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not other_sock.exists():
            assert time.monotonic() < deadline and other.poll() is None
            time.sleep(0.02)
        (rdir / embedded.REDIS_OWNER_PID).write_text(f"{other.pid}\n")
        started = time.monotonic()
        servers.start()
        try:
            assert time.monotonic() - started < embedded.PREDECESSOR_TIMEOUT / 3
            assert servers.down() == [] and other.poll() is None
        finally:
            servers.stop()
    finally:
        other.kill()
        other.wait()


def test_a_leftover_redis_of_the_folder_is_waited_for_not_raced(data_dir):
    """The race behind the vanished redis.sock: a Redis left by the folder's
    previous chatd, still stopping when the next one starts, removes the
    socket path on exit, after the new Redis has bound it. The new start
    waits for it instead."""
    import threading

    import redis

    from chatd import embedded

    servers = embedded.EmbeddedServers(data_dir, with_postgres=False, durable=False)
    sock = servers.layout.redis_socket
    rdir = data_dir / "redis"
    rdir.mkdir(mode=0o700)
    old = subprocess.Popen(
        [str(embedded.redis_server_bin()), "--port", "0", "--unixsocket", str(sock),
         "--pidfile", str(rdir / "redis.pid"), "--save", "", "--dir", str(rdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # What the previous chatd recorded of it (Redis removes its own pid file
    # before its socket, on the way out).
    (rdir / embedded.REDIS_OWNER_PID).write_text(f"{old.pid}\n")
    try:
        deadline = time.monotonic() + 10
        while not ((rdir / "redis.pid").exists() and sock.exists()):
            assert time.monotonic() < deadline and old.poll() is None
            time.sleep(0.02)
        threading.Timer(1.0, old.terminate).start()  # the leftover is stopping
        started = time.monotonic()
        servers.start()
        waited = time.monotonic() - started
        try:
            assert old.wait(10) == 0
            time.sleep(0.3)
            assert waited >= 0.9  # the new one started only once the old one was gone
            assert sock.exists()
            assert servers.down() == []
            client = redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=2)
            assert client.ping()
            client.close()
        finally:
            servers.stop()
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()


def test_the_lock_outwaits_a_probe_but_not_an_owner(data_dir):
    """`chatctl check` probes the folder's lock for an instant: a chatd
    starting right then still gets the folder. A real owner keeps it."""
    import fcntl
    import threading

    from chatd import embedded

    (data_dir / embedded.LOCK_FILE).write_text("4242\n")
    probe = os.open(data_dir / embedded.LOCK_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.2, os.close, (probe,)).start()  # the probe lets go
    fd = embedded.lock_data_dir(data_dir)
    try:
        assert (data_dir / embedded.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert embedded.data_dir_owner(data_dir) == os.getpid()
        # Held by an owner (here: another open file description): refused.
        with pytest.raises(embedded.DataDirInUse) as info:
            embedded.lock_data_dir(data_dir)
        assert str(data_dir) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
    finally:
        os.close(fd)
    assert embedded.data_dir_owner(data_dir) is None
