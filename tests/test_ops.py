"""Operation: health and readiness, Prometheus metrics, request ids, log
formats, no secrets in logs, CORS and TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import signal
import socket
import ssl

import pytest
import socketio
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from chatd.metrics import Metrics
from chatd.server import Chatd

from .helpers import SECRET, Api, SocketClient, token


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: nothing listens there


# -- health and readiness -------------------------------------------------------


@pytest.mark.gen_test
async def test_healthz_and_readyz_answer_without_a_token(api):
    for path in ("/healthz", "/readyz"):
        resp = await api.get(path, user=None)
        assert resp.status == 200, (path, resp)
        assert resp.json == {"ok": True}


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_readyz_is_503_naming_redis_when_redis_is_down(spawn):
    proc = spawn(REDIS_URL=f"redis://127.0.0.1:{_dead_port()}/0", REDIS_TIMEOUT="0.2")
    api = Api(proc.url)
    assert (await api.get("/healthz", user=None)).status == 200
    resp = await api.get("/readyz", user=None)
    assert resp.status == 503
    assert resp.error_code == "unavailable"
    assert "redis" in resp.json["error"]["message"]
    assert "postgres" not in resp.json["error"]["message"]


# -- metrics --------------------------------------------------------------------


def _samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.gen_test
async def test_metrics_count_routes_by_pattern_messages_sockets_cache_and_pool(chatd, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    assert (await api.send(chat_id, "one")).status == 201
    assert (await api.get(f"/chats/{chat_id}/messages")).status == 200
    assert (await api.get(f"/chats/{chat_id}/messages")).status == 200
    assert (await api.get("/chats/no-such-chat-here/messages")).status == 404
    client = await SocketClient(f"http://127.0.0.1:{chatd.port}", user="bob").connect()
    try:
        assert (await client.call("join-chat", chat_id))["ok"]
        ack = await client.call("send-message", {"chat_id": chat_id, "content": "two"})
        assert ack["ok"]
        # The original string form shows the latest message again: no new one.
        again = await client.call("send-message", chat_id)
        assert again["ok"] and again["message"]["id"] == ack["message"]["id"]
        await client.wait_for("new-message", lambda m: len(client.of("new-message")) >= 2)
        resp = await api.get("/metrics", user=None)
    finally:
        await client.close()
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = resp.body.decode()
    assert chat_id not in text  # route patterns, never raw paths
    got = _samples(text)
    route = "/chats/{chat_id}/messages"
    key = ("chatd_http_requests_total", (("method", "POST"), ("route", route), ("status", "201")))
    assert got[key] == 1
    key = ("chatd_http_requests_total", (("method", "GET"), ("route", route), ("status", "200")))
    assert got[key] == 2
    key = ("chatd_http_requests_total", (("method", "GET"), ("route", route), ("status", "404")))
    assert got[key] == 1
    hist = ("chatd_http_request_duration_seconds_count", (("method", "GET"), ("route", route)))
    assert got[hist] == 3
    # REST and socket alike; the re-emit of the string form is not a message sent.
    assert got[("chatd_messages_sent_total", ())] == 2
    assert got[("chatd_sockets_connected", ())] == 1
    cache = chatd.domain.cache
    assert got[("chatd_cache_hits_total", ())] == cache.hits
    assert got[("chatd_cache_misses_total", ())] == cache.misses
    assert cache.hits + cache.misses >= 2
    assert got[("chatd_db_pool_connections", (("state", "max"),))] == 20
    assert got[("chatd_db_pool_connections", (("state", "size"),))] >= 1
    assert ("chatd_db_pool_in_use", ()) in got


def test_log_lines_mask_tokens_whatever_logged_them():
    from chatd.server import redact

    tok = token("alice")
    line = f"GET /socket.io/?EIO=4&token={tok}&x=1 Authorization: Bearer {tok} {tok}"
    out = redact(line)
    assert tok not in out and tok.split(".")[2] not in out
    assert "token=***&x=1" in out and "Bearer ***" in out


def test_each_app_has_its_own_registry():
    a, b = Metrics(), Metrics()  # the global registry would refuse the second
    a.observe("/chats", "GET", 200, 0.01)
    assert b"chatd_http_requests_total" in a.render()
    assert b'route="/chats"' not in b.render()


# -- request ids and logs -----------------------------------------------------------


@pytest.mark.gen_test
async def test_request_id_is_echoed_when_sane_and_generated_otherwise(api, caplog):
    caplog.set_level(logging.INFO, logger="chatd.access")
    resp = await api.get("/chats", headers={"X-Request-Id": "req-42.abc"})
    assert resp.headers["X-Request-Id"] == "req-42.abc"
    resp = await api.get("/nowhere", headers={"X-Request-Id": "bad id\twith tab"})
    assert resp.status == 404
    generated = resp.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    resp = await api.get("/chats", headers={"X-Request-Id": "x" * 300})
    assert resp.headers["X-Request-Id"] != "x" * 300
    lines = [r.getMessage() for r in caplog.records if r.name == "chatd.access"]
    assert any("GET /chats 200" in m and "rid=req-42.abc" in m for m in lines), lines
    assert any(f"rid={generated}" in m for m in lines), lines


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_json_logs_one_object_per_line_for_requests_and_sockets(spawn, chat_id):
    # debug: Socket.IO's transport requests (the 101 below) are logged at debug.
    proc = spawn(LOG_FORMAT="json", LOG_LEVEL="debug")
    api = Api(proc.url)
    resp = await api.post(
        "/chats", {"id": chat_id, "title": "T"}, headers={"X-Request-Id": "json-test-1"}
    )
    assert resp.status == 201
    client = await SocketClient(proc.url, user="bob", headers={"X-Request-Id": "sock-1"}).connect()
    await client.close()
    await asyncio.sleep(0.3)
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    records = [json.loads(line) for line in proc.log().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    access = [r for r in records if r["logger"] == "chatd.access"]
    created = [r for r in access if r.get("request_id") == "json-test-1"]
    assert created and created[0]["status"] == 201 and created[0]["route"] == "/chats"
    events = {r.get("event"): r for r in records if r.get("request_id") == "sock-1"}
    assert {"socket_connect", "socket_disconnect"} <= set(events), records
    assert events["socket_connect"]["user_id"] == "bob"
    # The websocket's own access line (the 101) keeps the id too: chatd drops
    # the upgrade request's headers only once the socket is connected.
    assert [r for r in access if r.get("request_id") == "sock-1"], access


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_tokens_and_the_secret_never_reach_the_logs(spawn, chat_id):
    proc = spawn(LOG_LEVEL="debug")
    api = Api(proc.url)
    header_token = token("alice")
    query_token = token("bob", ttl=1800)
    auth_token = token("carol", ttl=1200)
    bad_token = header_token[:-4] + "AAAA"
    await api.create_chat(chat_id, members=["bob"], auth=f"Bearer {header_token}")
    assert (await api.get("/chats", auth=f"Bearer {bad_token}")).status == 401
    assert (await api.get("/metrics?token=" + query_token, user=None)).status == 200
    # The token in the handshake's query string, and in the auth payload.
    by_query = SocketClient(proc.url + "?token=" + query_token, user=None)
    await by_query.connect()
    assert (await by_query.call("join-chat", chat_id))["ok"]
    await by_query.close()
    by_auth = await SocketClient(proc.url, user=None, auth={"token": auth_token}).connect()
    await by_auth.close()
    await asyncio.sleep(0.3)
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    log = proc.log()
    assert "socket connect" in log and " DEBUG chatd: event loop:" in log  # at debug level
    assert SECRET not in log
    for secret in (header_token, query_token, auth_token, bad_token):
        assert secret not in log
        assert secret.split(".")[2] not in log  # not even the signature part


# -- CORS -------------------------------------------------------------------------


@pytest.fixture
def cors_chatd(io_loop, settings):
    daemon = Chatd(dataclasses.replace(settings, cors_origins=("https://app.example",)))
    io_loop.run_sync(daemon.start)
    yield daemon
    io_loop.run_sync(daemon.stop)


@pytest.mark.gen_test
async def test_cors_preflight_and_simple_requests_only_for_frontendaddres(cors_chatd, chat_id):
    api = Api(f"http://127.0.0.1:{cors_chatd.port}")
    path = f"/chats/{chat_id}/messages"
    pre = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    ok = await api.request("OPTIONS", path, user=None,
                           headers={"Origin": "https://app.example", **pre})  # fmt: skip
    assert ok.status == 204
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in ok.headers["Access-Control-Allow-Headers"]
    foreign = await api.request("OPTIONS", path, user=None,
                                headers={"Origin": "https://evil.example", **pre})  # fmt: skip
    assert "Access-Control-Allow-Origin" not in foreign.headers
    assert "Access-Control-Allow-Methods" not in foreign.headers

    await api.create_chat(chat_id)
    simple = await api.get(path, headers={"Origin": "https://app.example"})
    assert simple.status == 200
    assert simple.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert simple.headers["Access-Control-Allow-Credentials"] == "true"
    denied = await api.get(path, user=None, headers={"Origin": "https://app.example"})
    assert denied.status == 401  # errors carry it too, so the frontend can read them
    assert denied.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = await api.get(path, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.gen_test
async def test_socketio_polling_handshake_honours_frontendaddres(cors_chatd):
    api = Api(f"http://127.0.0.1:{cors_chatd.port}")
    path = "/socket.io/?EIO=4&transport=polling"
    ok = await api.get(path, user=None, headers={"Origin": "https://app.example"})
    assert ok.status == 200, ok
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert ok.body.startswith(b"0{")  # the engine.io open packet
    foreign = await api.get(path, user=None, headers={"Origin": "https://evil.example"})
    assert foreign.status == 403, foreign  # API.md: JSON, forbidden
    assert foreign.error_code == "forbidden"
    assert "Access-Control-Allow-Origin" not in foreign.headers


# -- TLS --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_tls_serves_https_and_wss_on_one_port(spawn, tmp_path, chat_id):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    proc = spawn(TLS_CERT_FILE=cert_file, TLS_KEY_FILE=key_file)
    assert proc.url.startswith("https://")
    client = AsyncHTTPClient()
    resp = await client.fetch(
        proc.url + "/chats", method="POST", ca_certs=str(ca_file),
        headers={"Authorization": f"Bearer {token('alice')}"},
        body=json.dumps({"id": chat_id, "title": "over TLS"}),
    )  # fmt: skip
    assert resp.code == 201
    # Plain HTTP on the TLS port gets nowhere.
    try:
        plain = await Api(proc.url.replace("https://", "http://")).get("/healthz")
        assert plain.status != 200
    except OSError:
        pass  # reset: as good as refused

    ctx = ssl.create_default_context(cafile=str(ca_file))
    sio = socketio.AsyncClient(reconnection=False, websocket_extra_options={"ssl": ctx})
    got: list = []
    sio.on("new-message", lambda m: got.append(m))
    await sio.connect(proc.url, auth={"token": token("alice")}, transports=["websocket"])
    try:
        assert sio.transport() == "websocket"
        assert (await sio.call("join-chat", chat_id, timeout=10))["ok"]
        ack = await sio.call("send-message", {"chat_id": chat_id, "content": "wss"}, timeout=10)
        assert ack["ok"] and ack["message"]["content"] == "wss"
    finally:
        await sio.disconnect()
    # And a client that does not trust the CA is refused.
    untrusting = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await untrusting.connect(proc.url, auth={"token": token("alice")},
                                 transports=["websocket"], wait_timeout=5)  # fmt: skip


@pytest.mark.gen_test
async def test_socketio_protocol_errors_have_the_json_error_shape(chatd, api):
    for path, message in (
        ("/socket.io/?EIO=4&transport=polling&sid=nope", "Invalid session nope"),
        ("/socket.io/?EIO=4&transport=carrier", "Invalid transport"),
        ("/socket.io/?EIO=3&transport=polling", "unsupported version"),
    ):
        resp = await api.get(path, user=None)
        assert resp.status == 400, (path, resp)
        assert resp.headers["Content-Type"].startswith("application/json"), path
        assert resp.error_code == "validation_error", (path, resp)
        assert message in resp.json["error"]["message"], (path, resp)
