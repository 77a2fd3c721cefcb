"""Zero setup: with no database configured, chatd runs its own PostgreSQL and
Redis under CHATD_DATA_DIR (chatd.embedded), and chatctl finds its secret."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from chatd import config, embedded

from .helpers import Api, ChatdProcess

EMBEDDED_ENV = {
    # Nothing configured: no database, no Redis, no secret.
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


def _children(proc: ChatdProcess) -> list[psutil.Process]:
    return psutil.Process(proc.proc.pid).children()


def _chatctl(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DB_HOST")}
    full.pop("ACCESS_TOKEN_SECRET", None)
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(Path(__file__).resolve().parent.parent),
    )


def _start(data_dir: Path) -> ChatdProcess:
    return ChatdProcess.start({**EMBEDDED_ENV, "CHATD_DATA_DIR": str(data_dir)}, timeout=90)


def test_settings_resolve_to_the_data_dirs_servers_and_secret(data_dir):
    settings = config.load({"CHATD_DATA_DIR": str(data_dir)}, use_dotenv=False)
    assert settings.database_url is None
    unchanged, _ = embedded.resolve(settings)  # chatctl: never writes
    assert unchanged.access_token_secret == ""
    assert not (data_dir / "access_token_secret").exists()
    resolved, created = embedded.resolve(settings, create=True)
    assert created
    assert resolved.database_url.startswith("postgresql://postgres@/chatd?host=")
    assert resolved.redis_url.startswith("unix://")
    secret_file = data_dir / "access_token_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret_file.read_text().strip() == resolved.access_token_secret
    again, created_again = embedded.resolve(settings, create=True)
    assert not created_again and again.access_token_secret == resolved.access_token_secret
    # A configured database is left alone.
    external = config.load(
        {"DATABASE_URL": "postgresql://x@h/db", "ACCESS_TOKEN_SECRET": "s"}, use_dotenv=False
    )
    assert embedded.resolve(external, create=True) == (external, False)


@pytest.mark.slow
@pytest.mark.gen_test(timeout=180)
async def test_zero_setup_start_token_restart_and_no_orphans(data_dir, chat_id):
    proc = _start(data_dir)
    try:
        deadline = time.monotonic() + 10  # the hint line follows the listening line
        while "chatctl token USER" not in proc.log() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        lines = proc.log().splitlines()
        listen = next(i for i, line in enumerate(lines) if "listening on" in line)
        assert "chatctl token USER" in lines[listen + 1], lines
        assert stat.S_IMODE((data_dir / "access_token_secret").stat().st_mode) == 0o600
        servers = {_name(p) for p in _children(proc)}
        assert {"postgres", "redis-server"} <= servers, servers

        # chatctl, given only the data folder, mints a token this chatd accepts.
        out = _chatctl("token", "alice", CHATD_DATA_DIR=str(data_dir))
        assert out.returncode == 0, out.stderr
        tok = out.stdout.strip()
        api = Api(proc.url)
        auth = f"Bearer {tok}"
        resp = await api.post("/chats", {"id": chat_id, "title": "T"}, auth=auth)
        assert resp.status == 201, resp
        resp = await api.post(f"/chats/{chat_id}/messages", {"content": "kept"}, auth=auth)
        assert resp.status == 201, resp
        assert (await api.get("/readyz")).status == 200

        children = _children(proc)
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {alive}"
    finally:
        proc.stop()

    # Same data folder, second start: same secret, the message survived.
    proc = _start(data_dir)
    try:
        api = Api(proc.url)
        resp = await api.get(f"/chats/{chat_id}/messages", auth=auth)
        assert resp.status == 200, resp
        assert [m["content"] for m in resp.json["messages"]] == ["kept"]
        assert "created an access token secret" not in proc.log()

        # Even a chatd killed outright leaves no PostgreSQL or Redis behind.
        children = _children(proc)
        proc.proc.kill()
        proc.wait(10)
        _gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"orphans: {alive}"
    finally:
        proc.stop()


@pytest.mark.slow
def test_chatctl_token_without_any_secret_says_where_it_looked(data_dir):
    out = _chatctl("token", "alice", CHATD_DATA_DIR=str(data_dir))
    assert out.returncode == 2
    assert str(data_dir) in out.stderr


@pytest.mark.slow
def test_interrupted_first_start_is_cleaned_up_on_the_next(data_dir):
    """A PGDATA without PG_VERSION (initdb cut short) is redone, not fatal."""
    (data_dir / "postgres").mkdir(parents=True)
    (data_dir / "postgres" / "junk").write_text("half an initdb")
    servers = embedded.EmbeddedServers(data_dir, durable=False)
    started = time.monotonic()
    servers.start()
    try:
        assert (data_dir / "postgres" / "PG_VERSION").is_file()
        assert time.monotonic() - started < 60
    finally:
        servers.stop()
    assert servers.postgres is None


@pytest.mark.slow
def _name(proc: psutil.Process) -> str | None:
    """The process's name, or None when it exited between listing and asking.

    initdb and pg_ctl start short-lived children, so this race is real."""
    try:
        return proc.name()
    except psutil.NoSuchProcess:  # also covers ZombieProcess
        return None


def test_sigterm_during_the_embedded_start_exits_cleanly(data_dir):
    """Before the event loop runs, SIGTERM still stops what was started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
    for name in ("DATABASE_URL", "ACCESS_TOKEN_SECRET"):
        env.pop(name, None)
    env.update(CHATD_DATA_DIR=str(data_dir), CHATPORT="0", CHATD_HOST="127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatd"], env=env, cwd=str(data_dir.parent),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        children: list[psutil.Process] = []
        while not children and time.monotonic() < deadline and proc.poll() is None:
            children = [c for c in parent.children() if _name(c) == "postgres"]
            time.sleep(0.005)
        assert children, "the embedded PostgreSQL never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"orphans: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (Path(__file__).resolve().parent.parent / ".venv").resolve(),
    reason="scripts/run.sh manages the checkout's .venv, which is not this interpreter's",
)
def test_readme_run_command_starts_the_embedded_default_and_says_how_to_get_a_token(data_dir):
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
    for name in ("DATABASE_URL", "ACCESS_TOKEN_SECRET"):
        env.pop(name, None)
    env.update(CHATD_DATA_DIR=str(data_dir), CHATPORT="0", CHATD_HOST="127.0.0.1")
    log_path = data_dir.parent / f"{data_dir.name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(root / "scripts" / "run.sh")], env=env, cwd=str(data_dir.parent),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "token USER" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
        lines = log_path.read_text().splitlines()
        assert "listening on http://127.0.0.1:" in "\n".join(lines[:3]), lines
        assert "chatctl token USER" in "\n".join(lines[:3]), lines
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0
        assert "embedded PostgreSQL and Redis stopped" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)
