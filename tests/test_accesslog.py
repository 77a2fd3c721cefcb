"""The access line (chatd.accesslog): formatted directly, written once per loop
turn, in the same format, order and masking as every other log line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from chatd import accesslog, server

from .conftest import chatd_env
from .helpers import Api

_TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: [^\n]*$"
)


@pytest.fixture
def handler():
    """chatd's handler on the root logger, as setup_logging installs it, over
    a real text stream; the previous configuration is put back after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    made = []

    def install(json_format: bool = False) -> accesslog.LogHandler:
        h = accesslog.LogHandler(stream, json_format, server.redact)
        h.setFormatter(
            server.JsonFormatter()
            if json_format
            else server.TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        root.handlers[:] = [h]
        root.setLevel(logging.INFO)
        made.append(h)
        return h

    install.stream = stream
    yield install
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def _through_logging(json_format: bool, extra: dict, message_args: tuple) -> str:
    """The line the logging module itself makes of the same access record."""
    stream = io.StringIO()
    h = logging.StreamHandler(stream)
    h.setFormatter(
        server.JsonFormatter()
        if json_format
        else server.TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    record = logging.getLogger("chatd.access").makeRecord(
        "chatd.access", logging.INFO, __file__, 1, *message_args, None, extra=extra
    )
    h.handle(record)
    return stream.getvalue()


EXTRA = {
    "request_id": "r-1",
    "method": "POST",
    "path": "/chats/c1/messages",
    "route": "/chats/{id}/messages",
    "status": 201,
    "duration_ms": 3.2,
    "remote_ip": "127.0.0.1",
}


def test_the_line_is_the_one_logging_would_write(handler):
    h = handler(json_format=False)
    accesslog.log(logging.INFO, "POST", "/chats/c1/messages", 201, "r-1", dict(EXTRA))
    h.flush()
    ours = handler.stream.getvalue()
    theirs = _through_logging(
        False, EXTRA, ("%s %s %d %.1fms rid=%s", ("POST", "/chats/c1/messages", 201, 3.2, "r-1"))
    )
    # Identical but for the clock: the time stamp's format, then the same text.
    assert _TEXT_LINE.match(ours.rstrip("\n")), ours
    assert ours[23:] == theirs[23:], (ours, theirs)
    assert ours.endswith("INFO chatd.access: POST /chats/c1/messages 201 3.2ms rid=r-1\n")


def test_the_json_object_has_the_keys_logging_would_give(handler):
    h = handler(json_format=True)
    accesslog.log(logging.INFO, "POST", "/chats/c1/messages", 201, "r-1", dict(EXTRA))
    h.flush()
    ours = json.loads(handler.stream.getvalue())
    theirs = json.loads(
        _through_logging(
            True,
            EXTRA,
            ("%s %s %d %.1fms rid=%s", ("POST", "/chats/c1/messages", 201, 3.2, "r-1")),
        )
    )
    assert list(ours) == list(theirs)
    assert {k: v for k, v in ours.items() if k != "ts"} == {
        k: v for k, v in theirs.items() if k != "ts"
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ours["ts"])


def test_secrets_in_a_path_are_masked(handler):
    h = handler()
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJl"
    accesslog.log(logging.INFO, "GET", f"/chats/{jwt}", 404, "r-2", {"status": 404})
    h.flush()
    assert jwt not in handler.stream.getvalue()
    assert "/chats/<jwt>" in handler.stream.getvalue()


def test_lines_wait_for_the_turn_end_and_keep_their_order_with_other_records(handler):
    handler()
    other = logging.getLogger("chatd.test")

    async def turn():
        accesslog.log(logging.INFO, "GET", "/a", 200, "r-a", {})
        accesslog.log(logging.INFO, "GET", "/b", 200, "r-b", {})
        assert handler.stream.getvalue() == ""  # not written yet: the turn goes on
        other.warning("between")  # any other record writes the waiting lines first
        accesslog.log(logging.INFO, "GET", "/c", 200, "r-c", {})
        await asyncio.sleep(0)  # the turn ends: /c is written
        await asyncio.sleep(0)
        return handler.stream.getvalue()

    text = asyncio.run(turn())
    order = [line.split(": ", 1)[1] for line in text.splitlines()]
    assert order == ["GET /a 200 rid=r-a", "GET /b 200 rid=r-b", "between", "GET /c 200 rid=r-c"]


def test_a_log_capture_or_another_handler_gets_ordinary_records(handler):
    h = handler()
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    keep = Keep()
    logging.getLogger().addHandler(keep)  # as pytest's caplog does
    try:
        accesslog.log(logging.INFO, "GET", "/x", 200, "r-x", {"request_id": "r-x", "status": 200})
    finally:
        logging.getLogger().removeHandler(keep)
    assert [r.getMessage() for r in seen] == ["GET /x 200 rid=r-x"]
    assert seen[0].request_id == "r-x" and seen[0].status == 200
    assert "GET /x 200 rid=r-x" in handler.stream.getvalue()  # and chatd's handler too
    assert not h._lines


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_two_processes_on_one_pipe_write_whole_lines_and_lose_none(
    database_url, redis_prefix
):
    """CHATD_WORKERS=2 with stderr a pipe (as under systemd or a log shipper):
    every request has exactly one whole access line, the last ones included
    after SIGTERM, and no two processes' lines are ever mixed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
    env.pop("DATABASE_URL", None)
    env.update(chatd_env(database_url, redis_prefix))
    env.update(CHATD_WORKERS="2", LOG_LEVEL="info")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, read by a thread
        [sys.executable, "-m", "chatd"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd="/tmp",
    )
    lines: list[bytes] = []
    listening = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if b"listening on" in line:
                listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert await asyncio.to_thread(listening.wait, 30), b"".join(lines)
        port = int(re.search(rb"listening on https?://[^:]+:(\d+)", b"".join(lines)).group(1))
        api = Api(f"http://127.0.0.1:{port}")
        # Long paths make long lines, so a turn's lines need several writes.
        long = "x" * 120
        n = 1200

        async def one(i: int):
            resp = await api.get(f"/nope/{long}{i}", headers={"X-Request-Id": f"t-{i}"})
            assert resp.status == 404

        for start in range(0, n, 100):
            await asyncio.gather(*(one(i) for i in range(start, start + 100)))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    text = b"".join(lines).decode()
    assert all(_TEXT_LINE.match(line) for line in text.splitlines()), [
        line for line in text.splitlines() if not _TEXT_LINE.match(line)
    ][:5]
    rids = re.findall(r"GET /nope/x+\d+ 404 [\d.]+ms rid=(t-\d+)$", text, re.M)
    assert sorted(rids) == sorted(f"t-{i}" for i in range(n))
