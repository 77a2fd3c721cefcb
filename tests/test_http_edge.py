"""The HTTP layer's edges, on raw sockets and through a pooling client.

Keep-alive: an answer given before the request body was read (404, 405, 401,
a preflight) leaves the connection usable, the small body read and dropped;
an answer after which chatd must close (413 with a body too large to read)
says ``Connection: close``. Requests Tornado's HTTP parser refuses get the
JSON error shape and a request id like every other answer, and a body that
never finishes is cut after ``BODY_TIMEOUT`` with a 408, without holding a
stop (chatd.httpconn).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import signal
import socket
import time

import aiohttp
import orjson
import pytest

from chatd import server
from chatd.server import Chatd

from .helpers import token

# -- raw HTTP/1.1 -------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.headers} {self.body[:200]!r}>"


async def read_answer(reader: asyncio.StreamReader, timeout: float = 10) -> Answer | None:
    """One response from the stream; None when the server closed it first."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        assert not exc.partial, exc.partial  # closed mid-answer
        return None
    except ConnectionResetError:
        return None
    lines = head.decode("latin1").split("\r\n")
    version, status, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice"
            headers[name.lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
    return Answer(int(status), headers, body)


async def connect(port: int):
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 10) -> bool:
    try:
        rest = await asyncio.wait_for(reader.read(), timeout)
    except (ConnectionResetError, BrokenPipeError):
        return True
    return rest == b""


def assert_json_error(answer: Answer, status: int, code: str) -> None:
    assert answer is not None, "no answer"
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    body = answer.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert len(answer.headers["x-request-id"]) >= 1, answer


def request(method: str, path: str, body: bytes | None = None, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: chatd"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


BAD = "Bearer not-a-token"
EARLY = [
    # (request, status, code): each answered before its body was read
    (request("GET", "/nope"), 404, "not_found"),
    (request("POST", "/nope", b'{"a": 1}', Content_Type="application/json"), 404, "not_found"),
    (request("POST", "/chats/x/messages", b'{"content": "hi"}', Authorization=BAD), 401,
     "unauthorized"),
    (request("PATCH", "/chats", b'{"title": "t"}'), 405, "method_not_allowed"),
    (request("DELETE", "/chats/x/messages", b"x" * 60_000), 405, "method_not_allowed"),
    (request("FOO", "/chats", b"{}"), 405, "method_not_allowed"),
]  # fmt: skip


@pytest.mark.gen_test(timeout=30)
async def test_early_answers_keep_the_connection_usable(chatd):
    """Sequential and pipelined requests on one connection: every one answered,
    none says it closes, and the connection still serves a GET afterwards."""
    reader, writer = await connect(chatd.port)
    try:
        for raw, status, code in EARLY:  # one at a time
            writer.write(raw)
            answer = await read_answer(reader)
            assert_json_error(answer, status, code)
            assert answer.headers.get("connection") is None, answer
        # ... and all at once (pipelined), then a GET on the same connection
        writer.write(b"".join(raw for raw, _s, _c in EARLY) + request("GET", "/healthz"))
        for _raw, status, code in EARLY:
            assert_json_error(await read_answer(reader), status, code)
        health = await read_answer(reader)
        assert health is not None and health.status == 200, health
        assert health.json == {"ok": True}
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_preflight_keeps_the_connection(chatd):
    reader, writer = await connect(chatd.port)
    try:
        writer.write(
            request("OPTIONS", "/chats", Origin="http://x.test") + request("GET", "/healthz")
        )
        pre = await read_answer(reader)
        assert pre is not None and pre.status == 204, pre
        health = await read_answer(reader)
        assert health is not None and health.status == 200, health
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_body_too_large_to_read_is_413_with_connection_close(chatd):
    reader, writer = await connect(chatd.port)
    try:
        body = b"x" * 200_000
        writer.write(request("POST", "/chats", body, Authorization=f"Bearer {token('alice')}"))
        answer = await read_answer(reader)
        assert_json_error(answer, 413, "payload_too_large")
        assert answer.headers["connection"] == "close", answer
        assert await closed_by_server(reader)
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_chunked_body_to_an_unknown_route_says_connection_close(chatd):
    reader, writer = await connect(chatd.port)
    try:
        writer.write(b"POST /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = await read_answer(reader)
        assert_json_error(answer, 404, "not_found")
        assert answer.headers["connection"] == "close", answer
        writer.write(b"4\r\nabcd\r\n0\r\n\r\n")
        assert await closed_by_server(reader)
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=180)
async def test_pooling_client_sees_no_socket_errors_in_a_mix(chatd, chat_id):
    """2,000 requests, half of them answered before their body is read, through
    aiohttp's keep-alive pool of 4 connections: every one gets its answer."""
    base = f"http://127.0.0.1:{chatd.port}"
    good = {"Authorization": f"Bearer {token('alice')}"}
    bad = {"Authorization": BAD}
    kinds = [
        ("GET", "/nope", None, {}, 404),
        ("POST", "/nope", b'{"a":1}', {}, 404),
        ("POST", f"/chats/{chat_id}/messages", b'{"content":"x"}', bad, 401),
        ("GET", f"/chats/{chat_id}/messages", None, bad, 401),
        ("PATCH", "/chats", b'{"title":"t"}', good, 405),
        ("PUT", "/healthz", b"{}", {}, 405),
        ("GET", "/healthz", None, {}, 200),
        ("GET", "/chats", None, good, 200),
        ("POST", f"/chats/{chat_id}/messages", b'{"content":"hello"}', good, 201),
        ("POST", "/chats", b"x" * 70_000, good, 413),
    ]
    rnd = random.Random(11)
    plan = [rnd.choice(kinds) for _ in range(2000)]
    connector = aiohttp.TCPConnector(limit=4, force_close=False)
    errors: list = []
    wrong: list = []
    async with aiohttp.ClientSession(connector=connector) as session:
        created = await session.post(f"{base}/chats", json={"id": chat_id, "title": "t"},
                                     headers=good)  # fmt: skip
        assert created.status == 201
        queue = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)

        async def worker():
            while not queue.empty():
                method, path, body, headers, status = queue.get_nowait()
                try:
                    async with session.request(method, base + path, data=body,
                                               headers=headers) as resp:  # fmt: skip
                        raw = await resp.read()
                        if resp.status != status:
                            wrong.append((method, path, resp.status, raw[:200]))
                        elif status >= 400:
                            assert set(orjson.loads(raw)) == {"error"}
                except aiohttp.ClientError as exc:
                    errors.append((method, path, repr(exc)))

        await asyncio.gather(*(worker() for _ in range(8)))
    assert errors == [], f"{len(errors)} socket errors, e.g. {errors[:5]}"
    assert wrong == [], wrong[:5]


# -- what Tornado's parser refuses ----------------------------------------------------------


MALFORMED = [
    # (raw request, status, code)
    (request("GET", "/healthz?" + "&".join(f"a{i}=1" for i in range(1001))), 400,
     "validation_error"),
    (b"GET /healthz\r\n\r\n", 400, "validation_error"),  # HTTP/0.9
    (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 400, "validation_error"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n", 400, "validation_error"),
    (b"POST /chats HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n0\r\n\r\n", 400, "validation_error"),
    (b"POST /chats HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
     "validation_error"),
    (b"POST /chats HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n", 400,
     "validation_error"),
    (b"POST /chats HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "validation_error"),
    (b"POST /chats HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 3\r\n\r\n{}", 400,
     "validation_error"),
    (b"POST /chats HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400,
     "validation_error"),
    (b"POST /chats HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", 413,
     "payload_too_large"),
    (request("GET", "/healthz", X_Big="b" * 100_000), 431, "headers_too_large"),
    (request("GET", "/healthz?q=" + "q" * 79_000), 414, "uri_too_long"),
    (b"GET /healthz HTTP/1.1\r\n" + b"X-Many: y\r\n" * 7000 + b"\r\n", 431, "headers_too_large"),
]  # fmt: skip


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("raw,status,code", MALFORMED, ids=lambda v: repr(v)[:40])
async def test_requests_the_parser_refuses_get_the_json_error(chatd, raw, status, code):
    reader, writer = await connect(chatd.port)
    try:
        writer.write(raw)
        answer = await read_answer(reader)
        assert_json_error(answer, status, code)
        assert answer.headers["connection"] == "close", answer
        assert await closed_by_server(reader)
    finally:
        writer.close()
    # and the server carries on
    reader, writer = await connect(chatd.port)
    writer.write(request("GET", "/healthz"))
    assert (await read_answer(reader)).status == 200
    writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_refusals_keep_the_clients_request_id(chatd):
    reader, writer = await connect(chatd.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc-123\r\nBad line\r\n\r\n")
    answer = await read_answer(reader)
    writer.close()
    assert_json_error(answer, 400, "validation_error")
    assert answer.headers["x-request-id"] == "abc-123"


@pytest.mark.gen_test(timeout=30)
async def test_identical_doubled_content_length_is_one_length(chatd):
    reader, writer = await connect(chatd.port)
    writer.write(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n{}"
                 + request("GET", "/healthz"))  # fmt: skip
    assert_json_error(await read_answer(reader), 404, "not_found")
    assert (await read_answer(reader)).status == 200
    writer.close()


# -- the body timeout -----------------------------------------------------------------------


@pytest.fixture
def quick_chatd(io_loop, settings):
    daemon = Chatd(dataclasses.replace(settings, body_timeout=1.0))
    io_loop.run_sync(daemon.start)
    yield daemon
    io_loop.run_sync(daemon.stop)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("path", ["/chats", "/socket.io/?EIO=4&transport=polling"])
async def test_a_trickling_body_is_cut_with_408(quick_chatd, path):
    reader, writer = await connect(quick_chatd.port)
    try:
        writer.write(request("POST", path, Authorization=f"Bearer {token('alice')}",
                             Content_Length="100") + b'{"title":')  # fmt: skip
        started = time.monotonic()
        answer = await read_answer(reader)
        took = time.monotonic() - started
        assert_json_error(answer, 408, "request_timeout")
        assert answer.headers["connection"] == "close"
        assert 0.8 < took < 5, took
        assert await closed_by_server(reader)
        assert quick_chatd.ctx.inflight.count == 0
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_trickling_body_after_an_early_answer_is_cut_too(quick_chatd):
    """/nope is answered at once; the body it then reads (to keep the
    connection) is subject to the same timeout."""
    reader, writer = await connect(quick_chatd.port)
    try:
        writer.write(request("POST", "/nope", Content_Length="100") + b"{")
        started = time.monotonic()
        assert_json_error(await read_answer(reader), 404, "not_found")
        assert await closed_by_server(reader)
        assert 0.8 < time.monotonic() - started < 5
    finally:
        writer.close()


# -- the idle timeout (chatd.httpconn._IdleSweep) ------------------------------------------


@pytest.fixture
def idle_chatd(io_loop, settings, monkeypatch):
    monkeypatch.setattr(server, "IDLE_CONNECTION_TIMEOUT", 1.5)
    daemon = Chatd(settings)
    io_loop.run_sync(daemon.start)
    yield daemon
    io_loop.run_sync(daemon.stop)


@pytest.mark.gen_test(timeout=60)
async def test_idle_and_trickling_heads_are_closed_and_busy_connections_kept(idle_chatd):
    """A connection that sends nothing, one idle after an answered request,
    and one whose head trickles in a byte at a time are all closed after the
    idle timeout; one that keeps sending requests stays open past it."""
    port = idle_chatd.port
    silent = await connect(port)
    after_one = await connect(port)
    trickle = await connect(port)
    busy = await connect(port)
    try:
        after_one[1].write(request("GET", "/healthz"))
        assert (await read_answer(after_one[0])).status == 200
        started = time.monotonic()

        async def trickling():
            for byte in request("GET", "/healthz")[:30]:  # never a whole head
                trickle[1].write(bytes([byte]))
                await asyncio.sleep(0.25)

        async def busy_requests():
            answered = 0
            while time.monotonic() - started < 4.5:
                busy[1].write(request("GET", "/healthz"))
                assert (await read_answer(busy[0])).status == 200
                answered += 1
                await asyncio.sleep(0.5)
            return answered

        feeding = asyncio.ensure_future(trickling())
        answered = await busy_requests()
        for reader, _ in (silent, after_one, trickle):
            assert await closed_by_server(reader)
        assert time.monotonic() - started < 12
        feeding.cancel()
        # The busy one is still served, well past the 1.5 s timeout.
        busy[1].write(request("GET", "/healthz"))
        assert (await read_answer(busy[0])).status == 200
        assert answered >= 8
    finally:
        for _, writer in (silent, after_one, trickle, busy):
            writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_stop_does_not_wait_for_an_unfinished_body(spawn):
    proc = spawn(SHUTDOWN_TIMEOUT="20", BODY_TIMEOUT="30")
    _reader, writer = await connect(proc.port)
    writer.write(request("POST", "/chats", Authorization=f"Bearer {token('alice')}",
                         Content_Length="100") + b"{")  # fmt: skip
    await writer.drain()
    await asyncio.sleep(0.5)
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30) == 0
    took = time.monotonic() - started
    writer.close()
    assert took < 5, (took, proc.log())
    assert "in flight" not in proc.log()


@pytest.mark.gen_test(timeout=30)
async def test_an_early_answer_to_expect_100_continue_closes(chatd):
    """The client may never send a body it was refused before 100 Continue:
    chatd must not read its next request as that body."""
    reader, writer = await connect(chatd.port)
    try:
        writer.write(request("POST", "/chats", Content_Length="2", Expect="100-continue"))
        answer = await read_answer(reader)
        assert_json_error(answer, 401, "unauthorized")
        assert answer.headers["connection"] == "close", answer
        writer.write(request("GET", "/healthz"))  # not taken as the body
        assert await closed_by_server(reader)
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_head_just_under_the_limit_and_blank_lines_before_it_are_served(chatd):
    reader, writer = await connect(chatd.port)
    try:
        # 60 KB of headers, then (pipelined) a request after stray blank lines
        writer.write(request("GET", "/healthz", X_Big="b" * 60_000))
        writer.write(b"\r\n\r\n" + request("GET", "/healthz?" + "q" * 30_000))
        for _ in range(2):
            answer = await read_answer(reader)
            assert answer is not None and answer.status == 200, answer
            assert answer.headers.get("connection") is None
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_client_still_sending_reads_its_413_instead_of_a_reset(chatd):
    """The client sends its whole 600 KB body before reading (as most do):
    chatd drops what arrives after its 413 for a moment instead of closing on
    unread data, which would reset the connection, answer and all."""
    reader, writer = await connect(chatd.port)
    try:
        writer.write(request("POST", "/chats", Content_Length=str(600_000)))
        for _ in range(600_000 // 60_000):
            writer.write(b"x" * 60_000)
            await writer.drain()
            await asyncio.sleep(0.02)
        answer = await read_answer(reader)
        assert_json_error(answer, 413, "payload_too_large")
        assert answer.headers["connection"] == "close"
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_body_arriving_within_the_timeout_is_served(quick_chatd):
    """Headers first, the body 0.5 s later (BODY_TIMEOUT is 1 s here): the
    body timer runs and does not fire; the connection serves on."""
    reader, writer = await connect(quick_chatd.port)
    try:
        tok = token("alice")
        writer.write(request("POST", "/chats", Authorization=f"Bearer {tok}", Content_Length="14"))
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(b'{"title":"t"}\n' + request("GET", "/healthz"))
        created = await read_answer(reader)
        assert created is not None and created.status == 201, created
        assert (await read_answer(reader)).status == 200
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_keep_alive_connections_closed_between_requests_are_let_go(chatd, caplog):
    """The next request's head is read as soon as an answer is out
    (Connection._arm_next_head): a client that then closes, or sends half a
    head and closes, ends its connection on chatd's side too, quietly."""
    pairs = [await connect(chatd.port) for _ in range(6)]
    for reader, writer in pairs:
        writer.write(request("GET", "/healthz"))
        assert (await read_answer(reader)).status == 200
    pairs[0][1].write(b"GET /heal")  # half a head, then gone
    for _, writer in pairs:
        writer.close()
    deadline = time.monotonic() + 10
    while chatd.http._connections:
        assert time.monotonic() < deadline, chatd.http._connections
        await asyncio.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


@pytest.mark.gen_test(timeout=60)
async def test_a_large_answer_to_a_slow_reader_arrives_whole_and_the_connection_serves_on(
    chatd, api, chat_id
):
    """Answers go straight to the socket while nothing is queued
    (httpconn.ServerStream); what a full socket does not take queues in
    Tornado's stream. A ~400 KB page read slowly through a small receive
    buffer arrives whole, then the next request on the connection is served."""
    await api.create_chat(chat_id)
    for start in range(0, 100, 25):
        await asyncio.gather(
            *(api.send(chat_id, f"{i:03d} " + "y" * 3990) for i in range(start, start + 25))
        )
    reader, writer = await connect(chatd.port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    try:
        auth = {"Authorization": f"Bearer {token('alice')}"}
        writer.write(request("GET", f"/chats/{chat_id}/messages?limit=100", **auth))
        writer.transport.pause_reading()
        await asyncio.sleep(0.5)  # chatd fills the socket and queues the rest
        writer.transport.resume_reading()
        answer = await read_answer(reader, timeout=30)
        assert answer.status == 200, answer
        page = answer.json["messages"]
        assert sorted(m["content"][:3] for m in page) == [f"{i:03d}" for i in range(100)]
        assert [m["seq"] for m in page] == list(range(1, 101))
        assert all(len(m["content"]) == 3994 for m in page)
        writer.write(request("GET", "/healthz"))
        assert (await read_answer(reader)).status == 200
    finally:
        writer.close()


# -- proxy headers (xheaders; chatd.httpconn.RequestContext) -----------------------------


@pytest.mark.gen_test(timeout=30)
async def test_the_logged_client_address_follows_the_proxy_headers_per_request(chatd, caplog):
    """On one keep-alive connection: a request through a proxy is logged with
    the address the proxy names, and the next request without proxy headers
    with the connection's own address again."""
    caplog.set_level(logging.INFO, logger="chatd.access")
    reader, writer = await connect(chatd.port)
    try:
        for rid, headers in (
            ("xh-1", {"X_Forwarded_For": "203.0.113.9, 10.0.0.1"}),
            ("xh-2", {}),
            ("xh-3", {"X_Real_Ip": "198.51.100.7"}),
            ("xh-4", {"X_Real_Ip": "not-an-address"}),
        ):
            writer.write(request("GET", "/healthz", X_Request_Id=rid, **headers))
            assert (await read_answer(reader)).status == 200
    finally:
        writer.close()
    seen = {r.request_id: r.remote_ip for r in caplog.records if r.name == "chatd.access"}
    assert seen == {
        "xh-1": "10.0.0.1",  # the last hop before chatd's proxy
        "xh-2": "127.0.0.1",
        "xh-3": "198.51.100.7",
        "xh-4": "127.0.0.1",
    }, seen


@pytest.mark.gen_test(timeout=30)
async def test_posts_on_a_keep_alive_connection_keep_its_socket_in_epoll(chatd, api, chat_id):
    """POSTs with bodies on one connection, one after the other and then
    twenty pipelined in one write: each answered, in order, and the socket
    stays in the loop's epoll set throughout (httpconn.ServerStream keeps
    reading while a small body waits in its buffer; Tornado took the socket
    out and put it back for every request whose body came with its head)."""
    await api.create_chat(chat_id)
    selector = asyncio.get_running_loop()._selector
    removed: list[int] = []
    unregister = selector.unregister

    def counting(fileobj):
        removed.append(fileobj if isinstance(fileobj, int) else fileobj.fileno())
        return unregister(fileobj)

    selector.unregister = counting
    reader, writer = await connect(chatd.port)
    try:
        auth = {"Authorization": f"Bearer {token('alice')}", "Content_Type": "application/json"}
        path = f"/chats/{chat_id}/messages"
        for i in range(10):
            writer.write(
                request("POST", path, orjson.dumps({"content": f"one by one {i}"}), **auth)
            )
            answer = await read_answer(reader)
            assert answer.status == 201 and answer.json["seq"] == i + 1, answer
        body = [orjson.dumps({"content": f"pipelined {i}"}) for i in range(20)]
        writer.write(b"".join(request("POST", path, b, **auth) for b in body))
        answers = [await read_answer(reader) for _ in body]
        assert [a.status for a in answers] == [201] * 20
        assert [a.json["content"] for a in answers] == [f"pipelined {i}" for i in range(20)]
        assert [a.json["seq"] for a in answers] == list(range(11, 31))
        ours = [c.stream.socket.fileno() for c in chatd.http._connections if c.stream is not None]
        assert ours and not [fd for fd in removed if fd in ours], removed
    finally:
        selector.unregister = unregister
        writer.close()
