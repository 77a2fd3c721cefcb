"""Test clients: REST over real HTTP, Socket.IO with python-socketio's
AsyncClient over a real websocket, and real chatd processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psycopg2
import socketio
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from chatd.auth import mint

SECRET = "test-secret-0123456789abcdef0123456789"
ROOT = Path(__file__).resolve().parent.parent


def pg_query(url: str, sql: str, params=()) -> list[tuple]:
    """Run one statement on its own autocommit connection; its rows, if any."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def token(user: str, ttl: float = 3600, **claims) -> str:
    return mint(SECRET, user, ttl, claims or None)


class Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return orjson.loads(self.body) if self.body else None

    @property
    def error_code(self) -> str | None:
        data = self.json
        return data["error"]["code"] if isinstance(data, dict) and "error" in data else None

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


class Api:
    """REST calls as a user: ``await api.post('/chats', {...}, user='alice')``."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.client = AsyncHTTPClient()

    async def request(
        self,
        method: str,
        path: str,
        body=None,
        *,
        user: str | None = "alice",
        raw: bytes | None = None,
        headers: dict | None = None,
        auth: str | None = None,
    ) -> Response:
        hdrs = dict(headers or {})
        if auth is not None:
            hdrs["Authorization"] = auth
        elif user is not None:
            hdrs["Authorization"] = f"Bearer {token(user)}"
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        try:
            resp = await self.client.fetch(
                self.base_url + path,
                method=method,
                body=data,
                headers=hdrs,
                raise_error=False,
                allow_nonstandard_methods=True,
                request_timeout=30,
            )
        except HTTPClientError as exc:  # pragma: no cover - raise_error=False
            resp = exc.response
        return Response(resp.code, resp.headers, resp.body or b"")

    async def get(self, path: str, **kw) -> Response:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body=None, **kw) -> Response:
        return await self.request("POST", path, body, **kw)

    async def put(self, path: str, body=None, **kw) -> Response:
        return await self.request("PUT", path, body, **kw)

    async def patch(self, path: str, body=None, **kw) -> Response:
        return await self.request("PATCH", path, body, **kw)

    async def delete(self, path: str, **kw) -> Response:
        return await self.request("DELETE", path, **kw)

    async def create_chat(self, chat_id: str, owner: str = "alice", **fields) -> dict:
        body = {"id": chat_id, "title": fields.pop("title", "Test chat"), **fields}
        resp = await self.post("/chats", body, user=owner)
        assert resp.status == 201, resp
        return resp.json

    async def send(self, chat_id: str, content: str, user: str = "alice", **extra) -> Response:
        return await self.post(
            f"/chats/{chat_id}/messages", {"content": content, **extra}, user=user
        )


class SocketClient:
    """A python-socketio AsyncClient that records every server event."""

    def __init__(self, base_url: str, user: str | None = "alice", **connect_kw):
        self.base_url = base_url
        self.user = user
        self.connect_kw = connect_kw
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, object]] = []
        self._arrived = asyncio.Condition()

        @self.sio.on("*")
        async def _any(event, data=None):
            async with self._arrived:
                self.events.append((event, data))
                self._arrived.notify_all()

    async def connect(self, transports=("websocket",)) -> SocketClient:
        kw = dict(self.connect_kw)
        if self.user is not None and "auth" not in kw:
            kw["auth"] = {"token": token(self.user)}
        await self.sio.connect(self.base_url, transports=list(transports), wait_timeout=10, **kw)
        return self

    async def call(self, event: str, data=None, timeout: float = 10):
        return await self.sio.call(event, data, timeout=timeout)

    def of(self, event: str) -> list:
        return [d for e, d in self.events if e == event]

    async def wait_for(self, event: str, predicate=lambda d: True, timeout: float = 10):
        """The first recorded ``event`` whose payload satisfies ``predicate``."""

        def find():
            for e, d in self.events:
                if e == event and predicate(d):
                    return d
            return None

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: find() is not None), timeout)
            return find()

    async def close(self) -> None:
        await self.sio.disconnect()


LISTEN_RE = re.compile(r"listening on (https?)://[^:]+:(\d+)")


class ChatdProcess:
    """A real ``chatd`` process (python -m chatd) with its own environment."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, scheme: str = "http"):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.scheme = scheme

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, env: dict, timeout: float = 30) -> ChatdProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
        full_env.pop("DATABASE_URL", None)
        full_env.update(env)
        for name in [k for k, v in full_env.items() if v is None]:
            del full_env[name]  # None: unset it
        full_env.setdefault("LOG_LEVEL", "info")
        log_path = Path(f"/tmp/chatd-test-{os.getpid()}-{time.monotonic_ns()}.log")
        log = open(log_path, "wb")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatd"],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Not the checkout: a developer's .env there must not leak in.
            cwd=str(log_path.parent),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            match = LISTEN_RE.search(text)
            if match:
                return cls(proc, int(match.group(2)), log_path, match.group(1))
            if proc.poll() is not None:
                raise RuntimeError(f"chatd exited with {proc.returncode}:\n{text}")
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"chatd did not start in {timeout}s:\n{log_path.read_text()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LoopTurns:
    """Counts the running event loop's turns (iterations) while in the
    ``with`` block: what a call costs a caller in turns, each of which is one
    more wait behind everything else the loop has to do when it is busy."""

    def __init__(self) -> None:
        self.n = 0

    def __enter__(self) -> LoopTurns:
        self._loop = loop = asyncio.get_running_loop()
        run_once = loop._run_once

        def counted():
            self.n += 1
            return run_once()

        loop._run_once = counted  # an instance attribute: this loop only
        return self

    def __exit__(self, *exc) -> None:
        del self._loop._run_once
