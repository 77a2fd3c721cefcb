"""Bad input of every kind gets the JSON error shape and the right status,
never a 500 (API.md, "Error")."""

from __future__ import annotations

import asyncio
import socket
import time
import warnings

import jwt
import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from .helpers import SECRET, SocketClient, token

BIG = 64 * 1024


def assert_error(resp, status: int, code: str) -> None:
    assert resp.status == status, resp
    body = resp.json
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert resp.headers["Content-Type"].startswith("application/json")


# -- bodies -------------------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body,code",
    [
        ({"content": 5}, "validation_error"),
        ({"content": ["a"]}, "validation_error"),
        ({"content": None}, "validation_error"),
        ({"content": {"a": 1}}, "validation_error"),
        ({"content": True}, "validation_error"),
        ({}, "validation_error"),
        ({"content": "   \n\t "}, "validation_error"),
        ({"content": "a\x00b"}, "validation_error"),
        ({"content": "x" * 4001}, "validation_error"),
        ({"content": "x", "client_id": 5}, "validation_error"),
        ({"content": "x", "client_id": ""}, "validation_error"),
        ({"content": "x", "client_id": "c" * 65}, "validation_error"),
        ([{"content": "x"}], "validation_error"),
        ("content", "validation_error"),
        (42, "validation_error"),
        (None, "validation_error"),
    ],
)
async def test_bad_send_bodies_are_400(api, chat_id, body, code):
    await api.create_chat(chat_id)
    resp = await api.post(f"/chats/{chat_id}/messages", raw=orjson.dumps(body))
    assert_error(resp, 400, code)
    page = (await api.get(f"/chats/{chat_id}/messages")).json
    assert page["messages"] == []


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "raw",
    [b"", b"   ", b"{", b"{'content': 'x'}", b'{"content": "x"', b"nul\x00", b"\xff\xfe", b"NaN"],
)
async def test_invalid_json_is_invalid_json(api, chat_id, raw):
    await api.create_chat(chat_id)
    resp = await api.post(f"/chats/{chat_id}/messages", raw=raw)
    assert_error(resp, 400, "invalid_json")


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": None},
        {"title": ""},
        {"title": "   "},
        {"title": 5},
        {"title": "x" * 201},
        {"title": "t", "members": "bob"},
        {"title": "t", "members": {"bob": 1}},
        {"title": "t", "members": [5]},
        {"title": "t", "members": [""]},
        {"title": "t", "members": ["x" * 129]},
        {"title": "t", "members": ["a"] * 1001},
        {"title": "t", "visibility": "secret"},
        {"title": "t", "visibility": True},
        {"title": "t", "id": ""},
        {"title": "t", "id": "a/b"},
        {"title": "t", "id": "x" * 65},
        {"title": "t", "id": 5},
        [],
        "t",
    ],
)
async def test_bad_create_chat_bodies_are_400(api, body):
    resp = await api.post("/chats", raw=orjson.dumps(body))
    assert_error(resp, 400, "validation_error")


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body", [{"role": "king"}, {"role": 1}, {"role": ["admin"]}, [], "member", 3]
)
async def test_bad_member_bodies_are_400(api, chat_id, body):
    await api.create_chat(chat_id)
    resp = await api.put(f"/chats/{chat_id}/members/bob", raw=orjson.dumps(body))
    assert_error(resp, 400, "validation_error")


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body",
    [{}, {"seq": "1"}, {"seq": True}, {"seq": 1.0}, {"seq": 1.5}, {"seq": -1}, {"seq": None},
     {"seq": 2**53}, [1], 1],
)  # fmt: skip
async def test_bad_read_marker_bodies_are_400(api, chat_id, body):
    await api.create_chat(chat_id)
    resp = await api.post(f"/chats/{chat_id}/read", raw=orjson.dumps(body))
    assert_error(resp, 400, "validation_error")


@pytest.mark.gen_test
async def test_body_over_64_kib_is_413_even_without_a_token(api, chat_id):
    await api.create_chat(chat_id)
    body = orjson.dumps({"content": "x" * (BIG + 10)})
    for user in ("alice", None):
        resp = await api.post(f"/chats/{chat_id}/messages", raw=body, user=user)
        assert_error(resp, 413, "payload_too_large")
    # Before routing and methods too.
    assert_error(await api.post("/nowhere", raw=body, user=None), 413, "payload_too_large")
    assert_error(await api.put("/chats", raw=body, user=None), 413, "payload_too_large")


@pytest.mark.gen_test
async def test_a_huge_announced_content_length_is_413_without_reading_it(chatd, api, chat_id):
    await api.create_chat(chat_id)
    request = (
        f"POST /chats/{chat_id}/messages HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 50000000\r\nConnection: close\r\n\r\n"
    ).encode() + b"x" * 1000
    status, raw = await asyncio.to_thread(_raw_http, chatd.port, request)
    assert status == 413
    assert orjson.loads(raw)["error"]["code"] == "payload_too_large"


def _raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (chunked bodies, odd paths) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(rest) >= length[0]:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _chunked(path: str, body: bytes, auth: str | None, chunk: int = 8192) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Transfer-Encoding: chunked",
             "Content-Type: application/json", "Connection: close"]  # fmt: skip
    if auth:
        lines.append(f"Authorization: Bearer {auth}")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode()
    for i in range(0, len(body), chunk):
        part = body[i : i + chunk]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


@pytest.mark.gen_test
async def test_chunked_body_over_64_kib_is_413(chatd, api, chat_id):
    await api.create_chat(chat_id)
    body = orjson.dumps({"content": "x" * (BIG + 10)})
    for auth in (token("alice"), None):
        status, raw = await asyncio.to_thread(
            _raw_http, chatd.port, _chunked(f"/chats/{chat_id}/messages", body, auth)
        )
        assert status == 413, (auth is not None, raw)
        assert orjson.loads(raw)["error"]["code"] == "payload_too_large"
    # A small chunked body is fine.
    status, raw = await asyncio.to_thread(
        _raw_http,
        chatd.port,
        _chunked(f"/chats/{chat_id}/messages", b'{"content":"chunky"}', token("alice")),
    )
    assert status == 201 and orjson.loads(raw)["content"] == "chunky"
    # ... but still needs a token.
    for auth in (None, "garbage"):
        status, raw = await asyncio.to_thread(
            _raw_http,
            chatd.port,
            _chunked(f"/chats/{chat_id}/messages", b'{"content":"sneaky"}', auth),
        )
        assert status == 401 and orjson.loads(raw)["error"]["code"] == "unauthorized"
    page = (await api.get(f"/chats/{chat_id}/messages")).json
    assert [m["content"] for m in page["messages"]] == ["chunky"]


# -- ids and query parameters ----------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "bad",
    ["x" * 65, "a.b", "a%20b", "a%2Fb", "%2F", "caf%C3%A9", "a%00b", "a*b", "a%2F..%2Fb", "%FF"],
)
async def test_bad_chat_ids_in_paths_are_400(api, bad):
    for method, path, body in (
        ("GET", f"/chats/{bad}/messages", None),
        ("POST", f"/chats/{bad}/messages", {"content": "x"}),
        ("GET", f"/chats/{bad}", None),
        ("PUT", f"/chats/{bad}/members/bob", {}),
        ("DELETE", f"/chats/{bad}/members/bob", None),
        ("POST", f"/chats/{bad}/read", {"seq": 1}),
    ):
        resp = await api.request(method, path, body)
        assert_error(resp, 400, "validation_error")


@pytest.mark.gen_test
@pytest.mark.parametrize("bad", ["0", "-1", "abc", "1.5", "9007199254740992", "1" * 30, "1e3"])
async def test_bad_message_ids_are_400(api, bad):
    for method, path, body in (
        ("DELETE", f"/messages/{bad}", None),
        ("PATCH", f"/messages/{bad}", {"content": "x"}),
        ("DELETE", f"/message/?id={bad}", None),
    ):
        resp = await api.request(method, path, body)
        assert_error(resp, 400, "validation_error")


@pytest.mark.gen_test
async def test_legacy_delete_without_id_is_400(api):
    assert_error(await api.delete("/message/"), 400, "validation_error")
    assert_error(await api.delete("/message/?id="), 400, "validation_error")


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=201",
        "limit=abc",
        "limit=-5",
        "limit=99999999999999999999",
        "before_seq=1&after_seq=1",
        "before_seq=x",
        "after_seq=-1",
        "after_seq=1.0",
        "before_seq=true",
        "include_deleted=yes",
        "include_deleted=%FF",
    ],
)
async def test_bad_history_queries_are_400(api, chat_id, query):
    await api.create_chat(chat_id)
    resp = await api.get(f"/chats/{chat_id}/messages?{query}")
    assert_error(resp, 400, "validation_error")


# -- tokens ----------------------------------------------------------------------------


def _jwt(payload: dict, key: str = SECRET, alg: str = "HS256", **headers) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short keys for HS384/HS512 on purpose
        return jwt.encode(payload, key, algorithm=alg, headers=headers or None)


def _none_alg(payload: dict) -> str:
    import base64

    def b64(obj) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


NOW = int(time.time())
BAD_TOKENS = {
    "garbage": "not-a-token",
    "three_dots": "a.b.c",
    "wrong_secret": _jwt({"sub": "alice", "exp": NOW + 3600}, key="another-secret-" + "0" * 32),
    "alg_none": _none_alg({"sub": "alice", "exp": NOW + 3600}),
    "hs512": _jwt({"sub": "alice", "exp": NOW + 3600}, alg="HS512"),
    "hs384": _jwt({"sub": "alice", "exp": NOW + 3600}, alg="HS384"),
    "missing_exp": _jwt({"sub": "alice"}),
    "exp_not_a_number": _jwt({"sub": "alice", "exp": "tomorrow"}),
    "nbf_in_future": _jwt({"sub": "alice", "exp": NOW + 7200, "nbf": NOW + 3600}),
    "no_user_claim": _jwt({"name": "alice", "exp": NOW + 3600}),
    "empty_user_claim": _jwt({"sub": "", "exp": NOW + 3600}),
    "object_user_claim": _jwt({"sub": {"id": "alice"}, "exp": NOW + 3600}),
    "nul_in_user": _jwt({"sub": "a\x00b", "exp": NOW + 3600}),
    "control_char_in_user": _jwt({"sub": "a\nb", "exp": NOW + 3600}),
    "user_too_long": _jwt({"sub": "u" * 129, "exp": NOW + 3600}),
    "huge": _jwt({"sub": "alice", "exp": NOW + 3600, "pad": "x" * 20000}),
}


@pytest.mark.gen_test
@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
async def test_bad_tokens_are_401_unauthorized(api, name):
    resp = await api.get("/chats", auth=f"Bearer {BAD_TOKENS[name]}")
    assert_error(resp, 401, "unauthorized")


@pytest.mark.gen_test
async def test_expired_token_is_401_token_expired(api):
    expired = _jwt({"sub": "alice", "exp": NOW - 60})
    resp = await api.get("/chats", auth=f"Bearer {expired}")
    assert_error(resp, 401, "token_expired")


@pytest.mark.gen_test
@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Basic abc", "Token " + "x" * 10])
async def test_missing_or_malformed_authorization_is_401(api, header):
    resp = await api.get("/chats", auth=header)
    assert_error(resp, 401, "unauthorized")


@pytest.mark.gen_test
async def test_no_authorization_header_is_401(api):
    assert_error(await api.get("/chats", user=None), 401, "unauthorized")


@pytest.mark.gen_test
async def test_user_id_comes_from_first_present_claim_as_a_string(api, chat_id):
    for claims, expected in (
        ({"id": 42}, "42"),
        ({"userId": "carol"}, "carol"),
        ({"sub": "dave", "id": "x"}, "dave"),
    ):
        tok = _jwt({**claims, "exp": NOW + 3600})
        resp = await api.post(
            "/chats", {"id": f"{chat_id}-{expected}", "title": "t"}, auth=f"Bearer {tok}"
        )
        assert resp.status == 201
        assert resp.json["created_by"] == expected


# -- routes and methods ------------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/console/"),  # (/ itself is the web console, tests/test_console.py)
        ("GET", "/index.html"),
        ("GET", "/nope"),
        ("POST", "/api/chats"),
        ("GET", "/chats/a/b/c"),
        ("GET", "/chats/a/messages/1"),
        ("GET", "/messages"),
        ("DELETE", "/messages/1/x"),
        ("GET", "/healthz/x"),
    ],
)
async def test_unknown_routes_are_404_not_found(api, method, path):
    for user in ("alice", None):
        resp = await api.request(method, path, user=user)
        assert_error(resp, 404, "not_found")


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "method,path",
    [
        ("DELETE", "/chats"),
        ("PUT", "/chats"),
        ("POST", "/chats/x"),
        ("DELETE", "/chats/x"),
        ("PATCH", "/chats/x/messages"),
        ("DELETE", "/chats/x/messages"),
        ("GET", "/messages/1"),
        ("POST", "/messages/1"),
        ("GET", "/message/?id=1"),
        ("GET", "/chats/x/members/bob"),
        ("GET", "/chats/x/read"),
        ("POST", "/healthz"),
        ("DELETE", "/readyz"),
    ],
)
async def test_wrong_methods_are_405_method_not_allowed(api, method, path):
    for user in ("alice", None):
        resp = await api.request(method, path, user=user)
        assert_error(resp, 405, "method_not_allowed")


# -- property: random JSON never makes a 500 -------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
send_bodies = json_values | st.fixed_dictionaries(
    {"content": json_values}, optional={"client_id": json_values, "chat_id": json_values}
)
chat_bodies = json_values | st.fixed_dictionaries(
    {"title": json_values},
    optional={"id": json_values, "visibility": json_values, "members": json_values},
)


@pytest.mark.gen_test(timeout=120)
async def test_random_json_bodies_never_make_a_500(api, chat_id):
    await api.create_chat(chat_id, visibility="public")
    seen: list[tuple[str, object]] = []

    @hsettings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(send=send_bodies, chat=chat_bodies)
    def collect(send, chat):
        seen.append((f"/chats/{chat_id}/messages", send))
        seen.append(("/chats", chat))

    collect()
    for path, body in seen:
        resp = await api.post(path, raw=orjson.dumps(body))
        assert resp.status in (200, 201, 400, 409), (path, body, resp)
        if resp.status >= 400:
            assert set(resp.json) == {"error"}, (path, body, resp)
    # And bodies that are not even JSON text, including lone surrogates.
    for raw in (
        b'{"content": "\\ud800"}',
        b'{"title": "\\udfff"}',
        b'"\\ud83d"',
        b'{"content": 123456789012345678901234567890}',
        b'{"title": 1e400}',
    ):
        for path in (f"/chats/{chat_id}/messages", "/chats"):
            resp = await api.post(path, raw=raw)
            assert resp.status == 400, (path, raw, resp)


# -- sockets ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_bad_socket_payloads_get_error_acks(chatd, api, chat_id):
    await api.create_chat(chat_id)
    client = await SocketClient(f"http://127.0.0.1:{chatd.port}").connect()
    try:
        cases = [
            ("join-chat", None, "validation_error"),
            ("join-chat", 5, "validation_error"),
            ("join-chat", "a/b", "validation_error"),
            ("join-chat", "x" * 65, "validation_error"),
            ("join-chat", {}, "validation_error"),
            ("join-chat", {"chat_id": chat_id, "since_seq": "1"}, "validation_error"),
            ("join-chat", {"chat_id": chat_id, "since_seq": -1}, "validation_error"),
            ("join-chat", {"chat_id": chat_id, "since_seq": 1.5}, "validation_error"),
            ("join-chat", {"chat_id": chat_id, "since_seq": True}, "validation_error"),
            ("join-chat", [chat_id], "validation_error"),
            ("join-chat", "no-such-chat-here", "chat_not_found"),
            ("leave-chat", None, "validation_error"),
            ("leave-chat", {"chat_id": 3}, "validation_error"),
            ("send-message", None, "validation_error"),
            ("send-message", 5, "validation_error"),
            ("send-message", [chat_id, "x"], "validation_error"),
            ("send-message", {"chat_id": chat_id}, "validation_error"),
            ("send-message", {"chat_id": chat_id, "content": 5}, "validation_error"),
            ("send-message", {"chat_id": chat_id, "content": " "}, "validation_error"),
            ("send-message", {"chat_id": chat_id, "content": "x" * 4001}, "validation_error"),
            ("send-message", {"chat_id": chat_id, "content": "x", "client_id": 1},
             "validation_error"),
            ("send-message", {"content": "x"}, "validation_error"),
            ("send-message", {"chat_id": "bad/id", "content": "x"}, "validation_error"),
            ("send-message", "bad/id", "validation_error"),
            ("send-message", {"chat_id": "nope-nope", "content": "x"}, "chat_not_found"),
        ]  # fmt: skip
        for event, payload, code in cases:
            ack = await client.call(event, payload)
            assert ack["ok"] is False, (event, payload, ack)
            assert ack["error"]["code"] == code, (event, payload, ack)
            assert isinstance(ack["error"]["message"], str)
        ack = await client.call("no-such-event", {})
        assert ack["ok"] is False and ack["error"]["code"] == "validation_error"
        # Nothing was sent by any of it.
        assert (await api.get(f"/chats/{chat_id}/messages")).json["messages"] == []
        # The connection is still fine.
        assert (await client.call("join-chat", chat_id))["ok"] is True
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("name", ["garbage", "wrong_secret", "alg_none", "hs512", "missing_exp"])
async def test_bad_handshake_token_gives_connect_error_unauthorized(chatd, name):
    import socketio

    client = SocketClient(
        f"http://127.0.0.1:{chatd.port}", user=None, auth={"token": BAD_TOKENS[name]}
    )
    errors = []
    client.sio.on("connect_error", lambda data=None: errors.append(data))
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect()
    assert errors == [{"message": "unauthorized"}]


def test_audience_and_issuer_are_checked_only_when_configured():
    from chatd.auth import TokenVerifier
    from chatd.errors import Unauthorized

    plain = TokenVerifier(SECRET)
    strict = TokenVerifier(SECRET, audience="chat", issuer="auth")
    good = _jwt({"sub": "a", "exp": NOW + 3600, "aud": "chat", "iss": "auth"})
    assert plain.verify(good) == "a" and strict.verify(good) == "a"
    for claims in (
        {"aud": "other", "iss": "auth"},
        {"aud": "chat", "iss": "other"},
        {"iss": "auth"},
        {"aud": "chat"},
    ):
        tok = _jwt({"sub": "a", "exp": NOW + 3600, **claims})
        assert plain.verify(tok) == "a"
        with pytest.raises(Unauthorized) as info:
            strict.verify(tok)
        assert info.value.code == "unauthorized"


def test_a_cached_token_still_expires():
    from chatd.auth import TokenVerifier
    from chatd.errors import Unauthorized

    verifier = TokenVerifier(SECRET)
    tok = _jwt({"sub": "a", "exp": int(time.time()) + 1})
    assert verifier.verify(tok) == "a"
    time.sleep(1.1)
    with pytest.raises(Unauthorized) as info:
        verifier.verify(tok)
    assert info.value.code == "token_expired"


@pytest.mark.gen_test(timeout=120)
async def test_random_socket_payloads_never_make_an_internal_error(chatd, api, chat_id):
    await api.create_chat(chat_id, visibility="public")
    payloads: list[tuple[str, object]] = []
    events = st.sampled_from(["join-chat", "leave-chat", "send-message"])
    shaped = st.fixed_dictionaries(
        {"chat_id": st.just(chat_id) | json_values},
        optional={"content": json_values, "since_seq": json_values, "client_id": json_values},
    )

    @hsettings(max_examples=120, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(event=events, payload=json_values | shaped)
    def collect(event, payload):
        payloads.append((event, payload))

    collect()
    client = await SocketClient(f"http://127.0.0.1:{chatd.port}").connect()
    try:
        for event, payload in payloads:
            ack = await client.call(event, payload)
            assert isinstance(ack, dict) and isinstance(ack.get("ok"), bool), (event, payload)
            if not ack["ok"]:
                assert ack["error"]["code"] in ("validation_error", "chat_not_found"), (
                    event, payload, ack
                )  # fmt: skip
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=60)
async def test_socket_strings_with_lone_surrogates_get_an_error_ack(chatd, api, chat_id):
    """What a JavaScript client sends after cutting a string inside an emoji,
    written as raw Socket.IO packets (Python clients cannot even encode it)."""
    from tornado.websocket import websocket_connect

    await api.create_chat(chat_id)
    ws = await websocket_connect(
        f"ws://127.0.0.1:{chatd.port}/socket.io/?EIO=4&transport=websocket"
    )
    try:
        assert (await ws.read_message()).startswith("0{")
        await ws.write_message("40" + orjson.dumps({"token": token("alice")}).decode())
        assert (await ws.read_message()).startswith("40{")
        packets = {
            1: {"chat_id": chat_id, "content": "cut \\ud83d"},
            2: {"chat_id": chat_id, "content": "ok", "client_id": "\\udc00"},
            3: {"chat_id": chat_id + "\\ud800", "content": "x"},
        }
        for ack_id, payload in packets.items():
            body = orjson.dumps(["send-message", payload]).decode().replace("\\\\u", "\\u")
            await ws.write_message(f"42{ack_id}{body}")
            reply = await asyncio.wait_for(ws.read_message(), 10)
            assert reply.startswith(f"43{ack_id}["), reply
            ack = orjson.loads(reply[len(f"43{ack_id}") :])[0]
            assert ack["ok"] is False and ack["error"]["code"] == "validation_error", ack
    finally:
        ws.close()
    assert (await api.get(f"/chats/{chat_id}/messages")).json["messages"] == []


@pytest.mark.gen_test(timeout=120)
async def test_random_path_segments_and_queries_never_make_a_500(api, chat_id):
    from urllib.parse import quote

    await api.create_chat(chat_id, visibility="public")
    seen: list[tuple[str, str, object]] = []
    segment = st.text(min_size=1, max_size=80) | st.sampled_from([chat_id, "1", "0", "-1"])
    value = st.text(max_size=30) | st.integers().map(str)

    @hsettings(max_examples=150, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(
        seg=segment,
        other=segment,
        q=st.dictionaries(
            st.sampled_from(["limit", "before_seq", "after_seq", "include_deleted", "id"]),
            value,
            max_size=3,
        ),
        route=st.integers(0, 8),
    )
    def collect(seg, other, q, route):
        s, o = quote(seg, safe=""), quote(other, safe="")
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in q.items())
        method, path, body = [
            ("GET", f"/chats/{s}/messages?{query}", None),
            ("POST", f"/chats/{s}/messages", {"content": other}),
            ("GET", f"/chats/{s}", None),
            ("PUT", f"/chats/{s}/members/{o}", {"role": "member"}),
            ("DELETE", f"/chats/{s}/members/{o}", None),
            ("POST", f"/chats/{s}/read", {"seq": 1}),
            ("DELETE", f"/messages/{s}", None),
            ("PATCH", f"/messages/{s}", {"content": other}),
            ("DELETE", f"/message/?{query}", None),
        ][route]
        seen.append((method, path, body))

    collect()
    for method, path, body in seen:
        resp = await api.request(method, path, body)
        assert resp.status < 500, (method, path, resp)
        if resp.status >= 400:
            assert set(resp.json) == {"error"}, (method, path, resp)
