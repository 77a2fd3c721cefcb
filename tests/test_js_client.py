"""The official JavaScript client (socket.io-client v4 from npm, on Node.js)
against real chatd processes, as a frontend uses it: connect with auth
{token}, join-chat, get new-message after a REST send, survive a restart of
the chatd process behind the same port and catch up with join-chat
{since_seq}.

tests/js/client.mjs is the frontend; it prints JSON lines read here. Its
package-lock.json pins the client; ``npm ci`` installs it into the ignored
tests/js/node_modules once per run (and again when the lock file changes).
Without Node.js these tests are skipped, saying so.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import orjson
import pytest

from .helpers import Api, token

JS_DIR = Path(__file__).resolve().parent / "js"


@pytest.fixture(scope="session")
def node() -> str:
    binary = shutil.which("node")
    npm = shutil.which("npm")
    if binary is None or npm is None:
        pytest.skip("Node.js and npm are not installed: the socket.io-client tests need them")
    stamp = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    if not stamp.is_file() or stamp.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return binary


class JsClient:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.lines: list[dict] = []

    @classmethod
    async def start(cls, node: str, url: str, chat_id: str = "", user: str = "bob", **env):
        full_env = dict(os.environ)
        full_env.update({"CHATD_URL": url, "CHATD_TOKEN": token(user), "CHAT_ID": chat_id, **env})
        proc = await asyncio.create_subprocess_exec(
            node,
            str(JS_DIR / "client.mjs"),
            cwd=JS_DIR,
            env=full_env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def next(self, predicate, timeout: float = 10) -> dict:
        """The first line (already read or still to come) that matches."""
        for line in self.lines:
            if predicate(line):
                return line
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no matching line from the JS client; got {self.lines}")
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                continue
            if not raw:
                raise AssertionError(f"the JS client exited; it said {self.lines}")
            line = orjson.loads(raw)
            self.lines.append(line)
            if predicate(line):
                return line

    def messages(self) -> dict[int, dict]:
        return {ln["message"]["seq"]: ln for ln in self.lines if ln["type"] == "message"}

    async def command(self, **cmd) -> None:
        self.proc.stdin.write(orjson.dumps(cmd) + b"\n")
        await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def kind(name: str, **fields):
    return lambda ln: ln["type"] == name and all(ln.get(k) == v for k, v in fields.items())


def message_with(seq: int):
    return lambda ln: ln["type"] == "message" and ln["message"]["seq"] == seq


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_js_client_survives_a_restart_and_catches_up(node, spawn, chat_id):
    a, b = spawn(), spawn()
    api_a, api_b = Api(a.url), Api(b.url)
    await api_a.create_chat(chat_id, members=["bob"])
    # Default transports, as a browser: long-polling first, then the upgrade.
    client = await JsClient.start(node, a.url, chat_id)
    try:
        await client.next(kind("connect"))
        joined = await client.next(kind("joined"))
        assert joined["ack"] == {
            "ok": True, "chat_id": chat_id, "last_seq": 0, "missed": [], "has_more": False
        }  # fmt: skip

        # A REST send on the same process and one on the other (through Redis).
        first = (await api_a.send(chat_id, "hello js")).json
        got = await client.next(message_with(1))
        assert got == {"type": "message", "via": "event", "message": first}
        await api_b.send(chat_id, "from the other process")
        assert (await client.next(message_with(2)))["via"] == "event"
        # Its own send, acked the Socket.IO way.
        await client.command(cmd="send", content="from js", client_id="js-1")
        ack = await client.next(kind("ack"))
        assert ack["ack"]["ok"] is True
        assert ack["ack"]["message"]["client_id"] == "js-1"
        await client.next(message_with(3))

        # Restart the process the client is on; meanwhile others keep talking.
        port = a.port
        a.stop()
        await client.next(kind("disconnect"))
        away = [(await api_b.send(chat_id, f"while away {i}")).json for i in range(3)]
        a2 = spawn(CHATPORT=port)
        assert a2.port == port

        # The client reconnects by itself and asks for what it missed.
        rejoined = await client.next(lambda ln: ln["type"] == "joined" and ln["since_seq"] == 3, 20)
        assert rejoined["ack"]["ok"] is True
        assert [m["seq"] for m in rejoined["ack"]["missed"]] == [4, 5, 6]
        for m in away:
            line = await client.next(message_with(m["seq"]))
            assert line == {"type": "message", "via": "missed", "message": m}

        after = (await Api(a2.url).send(chat_id, "after the restart")).json
        assert (await client.next(message_with(after["seq"])))["message"] == after
        assert sorted(client.messages()) == list(range(1, after["seq"] + 1))
    finally:
        await client.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_js_client_refused_with_bad_token_sees_unauthorized(node, spawn):
    proc = spawn()
    client = await JsClient.start(node, proc.url, CHATD_TOKEN="not-a-jwt", TRANSPORTS="websocket")
    try:
        refused = await client.next(kind("connect_error"))
        assert refused["message"] == "unauthorized"
    finally:
        await client.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_js_client_gets_rate_limited_ack(node, spawn, chat_id):
    user = f"js-{uuid.uuid4().hex[:8]}"
    proc = spawn(RATE_LIMIT_SENDS="2/30s")
    await Api(proc.url).create_chat(chat_id, owner=user)
    client = await JsClient.start(node, proc.url, chat_id, user=user, TRANSPORTS="websocket")
    try:
        await client.next(kind("joined"))
        for i in range(3):
            await client.command(cmd="send", content=f"n{i}")
        acks = []
        for _ in range(3):
            line = await client.next(lambda ln: ln["type"] == "ack" and ln not in acks)
            acks.append(line)
        oks = [a["ack"]["ok"] for a in acks]
        assert sorted(oks) == [False, True, True]
        refused = next(a["ack"] for a in acks if not a["ack"]["ok"])
        assert refused["error"]["code"] == "rate_limited"
        assert 1 <= refused["error"]["retry_after"] <= 30
    finally:
        await client.close()
