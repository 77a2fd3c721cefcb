"""Every size and count limit, at its boundary, on each transport it applies to.

    REST body              64 KiB            413 payload_too_large (before auth)
    Socket.IO packet       64 KiB            websocket closed / polling POST 413
    message content        MAX_MESSAGE_LENGTH characters (after trimming)
    chat id                64 characters of [A-Za-z0-9_-]
    client_id              64 characters
    message id             a JavaScript-safe integer (2**53 - 1)
    history page           limit 1..200
    rooms per socket       MAX_ROOMS_PER_SOCKET chats
    handshake token        8192 characters (auth.MAX_TOKEN_LENGTH)

The whole matrix of bad input is tests/ of the core suite; here each limit is
pinned at max (accepted) and max + 1 (refused), and after the refusal the
server is still serving.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
import socketio
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

from chatd import auth, realtime, validate
from chatd.domain import MAX_PAGE

from .helpers import SocketClient, token


async def still_serving(chatd, api) -> None:
    resp = await api.get("/healthz", user=None)
    assert resp.status == 200
    client = await SocketClient(f"http://127.0.0.1:{chatd.port}", user="alice").connect()
    await client.close()


async def raw_socket(port: int, user: str = "alice"):
    """A websocket speaking engine.io 4 / socket.io 5 by hand, connected to '/'."""
    ws = await websocket_connect(
        f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket",
        max_message_size=1024 * 1024,
    )
    opened = await asyncio.wait_for(ws.read_message(), 5)
    assert opened.startswith("0{")
    await ws.write_message("40" + orjson.dumps({"token": token(user)}).decode())
    connected = await asyncio.wait_for(ws.read_message(), 5)
    assert connected.startswith("40{"), connected
    return ws


async def refused_with(url: str, tok: str, wait: float = 10) -> object:
    """The connect_error payload a handshake with ``tok`` gets (None: accepted)."""
    client = socketio.AsyncClient(reconnection=False)
    errors: list = []
    client.on("connect_error", lambda data=None: errors.append(data))
    try:
        await client.connect(url, transports=["websocket"], auth={"token": tok}, wait_timeout=wait)
    except socketio.exceptions.ConnectionError as exc:
        return errors[0] if errors else str(exc)
    await client.disconnect()
    return None


async def closed_within(ws, seconds: float) -> bool:
    """True when the server closes the websocket (ignoring pings) in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        try:
            msg = await asyncio.wait_for(ws.read_message(), deadline - loop.time())
        except TimeoutError:
            return False
        if msg is None:
            return True
    return False


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("size", [realtime.MAX_PACKET + 1024, 3 * realtime.MAX_PACKET])
async def test_oversized_socket_packet_closes_that_socket_only(chatd, api, chat_id, size):
    await api.create_chat(chat_id)
    ws = await raw_socket(chatd.port)
    # Just under the cap is an ordinary event.
    content = "x" * 1000
    ok_packet = (
        "420" + orjson.dumps(["send-message", {"chat_id": chat_id, "content": content}]).decode()
    )
    await ws.write_message(ok_packet)
    ack = await asyncio.wait_for(ws.read_message(), 5)
    assert ack.startswith("430"), ack
    assert orjson.loads(ack[3:])[0]["ok"] is True

    payload = {"chat_id": chat_id, "content": "y" * size}
    big = "42" + orjson.dumps(["send-message", payload]).decode()
    await ws.write_message(big)
    assert await closed_within(ws, 5), "the server kept a socket that sent an oversized packet"
    await still_serving(chatd, api)


@pytest.mark.gen_test(timeout=30)
async def test_oversized_polling_post_is_refused(chatd, api):
    client = AsyncHTTPClient()
    base = f"http://127.0.0.1:{chatd.port}/socket.io/?EIO=4&transport=polling"
    opened = await client.fetch(base)
    sid = orjson.loads(opened.body[1:])["sid"]
    resp = await client.fetch(
        f"{base}&sid={sid}",
        method="POST",
        body=b"4" + b"z" * (realtime.MAX_PACKET + 10),
        raise_error=False,
    )
    assert resp.code == 413
    await still_serving(chatd, api)


@pytest.mark.gen_test(timeout=30)
async def test_message_length_limit_on_rest_and_socket(chatd, api, chat_id):
    limit = chatd.settings.max_message_length
    await api.create_chat(chat_id)
    assert (await api.send(chat_id, "a" * limit)).status == 201
    # Trimming comes first: surrounding blanks do not count.
    assert (await api.send(chat_id, "  " + "b" * limit + "\n")).status == 201
    too_long = await api.send(chat_id, "c" * (limit + 1))
    assert too_long.status == 400
    assert too_long.error_code == "validation_error"

    client = await SocketClient(f"http://127.0.0.1:{chatd.port}").connect()
    try:
        ok = await client.call("send-message", {"chat_id": chat_id, "content": "d" * limit})
        refused = await client.call(
            "send-message", {"chat_id": chat_id, "content": "e" * (limit + 1)}
        )
    finally:
        await client.close()
    assert ok["ok"] is True
    assert refused["ok"] is False
    assert refused["error"]["code"] == "validation_error"


@pytest.mark.gen_test(timeout=30)
async def test_id_limits(chatd, api):
    longest = "i" * 64
    assert (await api.post("/chats", {"id": longest, "title": "t"})).status == 201
    assert (await api.get(f"/chats/{longest}/messages")).status == 200
    assert (await api.post("/chats", {"id": "j" * 65, "title": "t"})).status == 400
    assert (await api.get(f"/chats/{'j' * 65}/messages")).status == 400

    cid_ok = await api.send(longest, "hello", client_id="k" * validate.MAX_CLIENT_ID)
    assert cid_ok.status == 201
    cid_long = await api.send(longest, "hello", client_id="k" * (validate.MAX_CLIENT_ID + 1))
    assert cid_long.status == 400

    # Message ids: a JavaScript-safe integer or 400, never a 500 from an
    # integer PostgreSQL cannot hold.
    biggest = await api.delete(f"/messages/{validate.MAX_SAFE_INT}")
    assert biggest.status == 404
    assert biggest.error_code == "message_not_found"
    beyond = await api.delete(f"/messages/{validate.MAX_SAFE_INT + 1}")
    assert beyond.status == 400
    huge = await api.patch(f"/messages/{'9' * 40}", {"content": "x"})
    assert huge.status == 400


@pytest.mark.gen_test(timeout=30)
async def test_page_size_limit(chatd, api, chat_id):
    await api.create_chat(chat_id)
    for limit in (1, MAX_PAGE):
        assert (await api.get(f"/chats/{chat_id}/messages?limit={limit}")).status == 200
    for limit in (0, MAX_PAGE + 1, -1, 10**30):
        resp = await api.get(f"/chats/{chat_id}/messages?limit={limit}")
        assert resp.status == 400, (limit, resp)
        assert resp.error_code == "validation_error"


@pytest.mark.gen_test(timeout=60)
async def test_rooms_per_socket_limit(chatd, api, chat_id, monkeypatch):
    # The real limit is 200 chats; the rule is the same at 3 and the test
    # does not need 200 chats.
    monkeypatch.setattr(realtime.namespace, "MAX_ROOMS_PER_SOCKET", 3)
    chats = [f"{chat_id}-{i}" for i in range(4)]
    for c in chats:
        await api.create_chat(c)
    client = await SocketClient(f"http://127.0.0.1:{chatd.port}").connect()
    try:
        for c in chats[:3]:
            assert (await client.call("join-chat", c))["ok"] is True
        refused = await client.call("join-chat", chats[3])
        assert refused["ok"] is False
        assert refused["error"]["code"] == "validation_error"
        # Re-joining a chat it is in is not a new room; leaving frees a place.
        assert (await client.call("join-chat", chats[0]))["ok"] is True
        assert (await client.call("leave-chat", chats[0]))["ok"] is True
        assert (await client.call("join-chat", chats[3]))["ok"] is True
        # A refused join left the socket out of the room: no events from it.
        sent = (await api.send(chats[3], "to the fourth")).json
        assert (await client.wait_for("new-message", lambda m: m["id"] == sent["id"]))["id"]
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=30)
async def test_handshake_token_size_limit(chatd, api):
    url = f"http://127.0.0.1:{chatd.port}"
    padded = token("alice", pad="p" * (auth.MAX_TOKEN_LENGTH * 3 // 4 - 300))
    assert len(padded) <= auth.MAX_TOKEN_LENGTH
    ok = await SocketClient(url, user=None, auth={"token": padded}).connect()
    await ok.close()

    oversized = token("alice", pad="p" * (auth.MAX_TOKEN_LENGTH + 100))
    assert len(oversized) > auth.MAX_TOKEN_LENGTH
    assert await refused_with(url, oversized) == {"message": "unauthorized"}
    # The same token over REST: 401, not a 500.
    resp = await api.get("/chats", user=None, auth=f"Bearer {oversized}")
    assert resp.status == 401
    # A handshake far beyond any token (1 MiB, over the websocket frame cap):
    # the socket is dropped, the client is refused, the server is unharmed.
    assert await refused_with(url, "t" * (1024 * 1024), wait=3) is not None
    await still_serving(chatd, api)
