"""The authorisation matrix: each endpoint and socket event, as owner, admin,
member, non-member of a private chat, non-member of a public chat and without
a token, against API.md and docs/API-NOTES.md."""

from __future__ import annotations

import pytest
import socketio

from .helpers import SocketClient

ACTORS = {
    # name: (user, which chat)
    "owner": ("alice", "private"),
    "admin": ("adam", "private"),
    "member": ("bob", "private"),
    "outsider_private": ("eve", "private"),
    "outsider_public": ("eve", "public"),
    "anonymous": (None, "private"),
}
ORDER = list(ACTORS)


def expect(*answers):
    """answers in ORDER: a status, or (status, error code)."""
    out = {}
    for actor, answer in zip(ORDER, answers, strict=True):
        out[actor] = answer if isinstance(answer, tuple) else (answer, None)
    return out


NF = (404, "chat_not_found")
MNF = (404, "message_not_found")
FB = (403, "forbidden")
UA = (401, "unauthorized")
CF = (409, "conflict")


async def _world(api, chat_id):
    """A private and a public chat with the same cast, and a message by carol in each."""
    chats = {}
    for vis in ("private", "public"):
        cid = f"{chat_id}-{vis[:3]}"
        await api.create_chat(cid, visibility=vis, members=["adam", "bob", "carol"])
        resp = await api.put(f"/chats/{cid}/members/adam", {"role": "admin"})
        assert resp.status == 200
        msg = (await api.send(cid, "by carol", user="carol")).json
        chats[vis] = (cid, msg)
    return chats


REST = {
    "get_messages": (
        lambda c, m, u: ("GET", f"/chats/{c}/messages", None),
        expect(200, 200, 200, NF, 200, UA),
    ),
    "post_message": (
        lambda c, m, u: ("POST", f"/chats/{c}/messages", {"content": "hi"}),
        expect(201, 201, 201, NF, 201, UA),
    ),
    "get_chat": (
        lambda c, m, u: ("GET", f"/chats/{c}", None),
        expect(200, 200, 200, NF, 200, UA),
    ),
    "delete_others_message": (
        lambda c, m, u: ("DELETE", f"/messages/{m['id']}", None),
        expect(204, 204, FB, MNF, FB, UA),
    ),
    "legacy_delete_others_message": (
        lambda c, m, u: ("DELETE", f"/message/?id={m['id']}", None),
        expect(204, 204, FB, MNF, FB, UA),
    ),
    "edit_others_message": (
        lambda c, m, u: ("PATCH", f"/messages/{m['id']}", {"content": "changed"}),
        expect(FB, FB, FB, MNF, FB, UA),
    ),
    "add_member": (
        lambda c, m, u: ("PUT", f"/chats/{c}/members/dan", None),
        expect(200, 200, FB, NF, FB, UA),
    ),
    "add_admin": (
        lambda c, m, u: ("PUT", f"/chats/{c}/members/dan", {"role": "admin"}),
        expect(200, FB, FB, NF, FB, UA),
    ),
    "add_self_as_member": (
        lambda c, m, u: ("PUT", f"/chats/{c}/members/{u or 'x'}", {"role": "member"}),
        # the owner would demote the last owner; a member of a private chat may
        # not re-add themselves; an outsider joins a public chat.
        expect(CF, 200, FB, NF, 200, UA),
    ),
    "add_self_as_admin": (
        lambda c, m, u: ("PUT", f"/chats/{c}/members/{u or 'x'}", {"role": "admin"}),
        expect(CF, FB, FB, NF, FB, UA),  # the owner: demoting the last owner
    ),
    "remove_other_member": (
        lambda c, m, u: ("DELETE", f"/chats/{c}/members/carol", None),
        expect(204, 204, FB, NF, FB, UA),
    ),
    "remove_self": (
        lambda c, m, u: ("DELETE", f"/chats/{c}/members/{u or 'x'}", None),
        expect(CF, 204, 204, NF, 204, UA),
    ),
    "mark_read": (
        lambda c, m, u: ("POST", f"/chats/{c}/read", {"seq": 1}),
        expect(204, 204, 204, NF, FB, UA),
    ),
}


@pytest.mark.gen_test
@pytest.mark.parametrize("actor", ORDER)
@pytest.mark.parametrize("endpoint", list(REST))
async def test_rest_authorisation_matrix(api, chat_id, endpoint, actor):
    world = await _world(api, chat_id)
    user, which = ACTORS[actor]
    cid, msg = world[which]
    build, expected = REST[endpoint]
    method, path, body = build(cid, msg, user)
    resp = await api.request(method, path, body, user=user)
    status, code = expected[actor]
    assert resp.status == status, (endpoint, actor, resp)
    if code is not None:
        assert resp.error_code == code, (endpoint, actor, resp)
    # A refused request changed nothing.
    if status >= 400:
        for vis in ("private", "public"):
            c, m = world[vis]
            page = (await api.get(f"/chats/{c}/messages?include_deleted=true")).json
            assert page["messages"] == [m], (endpoint, actor)
            chat = (await api.get(f"/chats/{c}")).json
            assert {x["user_id"]: x["role"] for x in chat["members"]} == {
                "alice": "owner", "adam": "admin", "bob": "member", "carol": "member"
            }  # fmt: skip


@pytest.mark.gen_test
async def test_sender_may_edit_and_delete_own_message(api, chat_id):
    world = await _world(api, chat_id)
    for vis in ("private", "public"):
        _cid, msg = world[vis]
        resp = await api.patch(f"/messages/{msg['id']}", {"content": "mine"}, user="carol")
        assert resp.status == 200 and resp.json["content"] == "mine"
        assert (await api.delete(f"/messages/{msg['id']}", user="carol")).status == 204


@pytest.mark.gen_test
async def test_every_authenticated_endpoint_refuses_missing_token(api, chat_id):
    await api.create_chat(chat_id)
    for method, path in (
        ("GET", "/chats"),
        ("POST", "/chats"),
        ("GET", f"/chats/{chat_id}/messages"),
        ("POST", f"/chats/{chat_id}/messages"),
        ("DELETE", "/messages/1"),
        ("PATCH", "/messages/1"),
        ("DELETE", "/message/?id=1"),
        ("GET", f"/chats/{chat_id}"),
        ("PUT", f"/chats/{chat_id}/members/bob"),
        ("DELETE", f"/chats/{chat_id}/members/bob"),
        ("POST", f"/chats/{chat_id}/read"),
    ):
        resp = await api.request(method, path, {"content": "x", "title": "t"}, user=None)
        assert resp.status == 401, (method, path, resp)
        assert resp.error_code == "unauthorized"


@pytest.mark.gen_test
async def test_health_endpoints_need_no_token(api):
    for path in ("/healthz", "/readyz"):
        resp = await api.get(path, user=None)
        assert resp.status == 200, resp
        assert resp.json == {"ok": True}


@pytest.mark.gen_test
async def test_chat_list_holds_only_the_callers_chats(api, chat_id):
    await api.create_chat(chat_id + "-a", members=["bob"])
    await api.create_chat(chat_id + "-b", visibility="public")
    mine = {c["id"] for c in (await api.get("/chats", user="bob")).json["chats"]}
    assert chat_id + "-a" in mine and chat_id + "-b" not in mine


# -- sockets ---------------------------------------------------------------------------

SOCKET = {
    "join_chat_string": (lambda c: ("join-chat", c), (True, True, True, NF, True)),
    "join_chat_object": (
        lambda c: ("join-chat", {"chat_id": c, "since_seq": 0}),
        (True, True, True, NF, True),
    ),
    "send_message_object": (
        lambda c: ("send-message", {"chat_id": c, "content": "hi"}),
        (True, True, True, NF, True),
    ),
    "send_message_string": (lambda c: ("send-message", c), (True, True, True, NF, True)),
    "leave_chat": (lambda c: ("leave-chat", {"chat_id": c}), (True, True, True, True, True)),
}


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("event", list(SOCKET))
async def test_socket_authorisation_matrix(chatd, api, chat_id, event):
    world = await _world(api, chat_id)
    build, expected = SOCKET[event]
    url = f"http://127.0.0.1:{chatd.port}"
    for actor, answer in zip(ORDER[:-1], expected, strict=True):
        user, which = ACTORS[actor]
        cid, _msg = world[which]
        client = await SocketClient(url, user=user).connect()
        try:
            name, payload = build(cid)
            ack = await client.call(name, payload)
            if answer is True:
                assert ack["ok"] is True, (event, actor, ack)
            else:
                assert ack == {
                    "ok": False,
                    "error": {"code": answer[1], "message": ack["error"]["message"]},
                }, (event, actor, ack)
        finally:
            await client.close()
    private_messages = (await api.get(f"/chats/{world['private'][0]}/messages")).json
    assert all(m["sender_id"] != "eve" for m in private_messages["messages"])


@pytest.mark.gen_test(timeout=60)
async def test_socket_without_token_is_refused(chatd):
    client = SocketClient(f"http://127.0.0.1:{chatd.port}", user=None)
    errors = []
    client.sio.on("connect_error", lambda data=None: errors.append(data))
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect()
    assert errors == [{"message": "unauthorized"}]


@pytest.mark.gen_test(timeout=60)
async def test_socket_token_in_header_or_query_is_accepted(chatd, api, chat_id):
    from .helpers import token

    await api.create_chat(chat_id, members=["bob"])
    url = f"http://127.0.0.1:{chatd.port}"
    for kw, target in (
        ({"headers": {"Authorization": f"Bearer {token('bob')}"}}, url),
        ({}, f"{url}?token={token('bob')}"),
    ):
        client = await SocketClient(target, user=None, **kw).connect()
        try:
            ack = await client.call("join-chat", chat_id)
            assert ack["ok"] is True
        finally:
            await client.close()


@pytest.mark.gen_test(timeout=60)
async def test_outsider_refused_join_gets_no_events_of_the_private_chat(chatd, api, chat_id):
    await api.create_chat(chat_id)
    eve = await SocketClient(f"http://127.0.0.1:{chatd.port}", user="eve").connect()
    try:
        ack = await eve.call("join-chat", {"chat_id": chat_id, "since_seq": 0})
        assert ack["ok"] is False and ack["error"]["code"] == "chat_not_found"
        await api.send(chat_id, "private words")
        # A marker event through a public chat eve did join: everything before
        # it has been delivered, so the private message would be here.
        await api.create_chat(chat_id + "-pub", visibility="public")
        assert (await eve.call("join-chat", chat_id + "-pub"))["ok"] is True
        await api.send(chat_id + "-pub", "marker")
        await eve.wait_for("new-message", lambda d: d["content"] == "marker")
        assert [e["content"] for e in eve.of("new-message")] == ["marker"]
    finally:
        await eve.close()


@pytest.mark.gen_test(timeout=60)
async def test_readyz_is_503_naming_the_store_that_does_not_answer(io_loop, settings):
    import dataclasses

    from chatd.server import Chatd

    from .helpers import Api

    # Nothing listens on port 1: Redis is "down" for this process only.
    broken = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0", redis_timeout=0.2)
    daemon = Chatd(broken)
    await daemon.start()
    try:
        resp = await Api(f"http://127.0.0.1:{daemon.port}").get("/readyz", user=None)
        assert resp.status == 503
        assert resp.error_code == "unavailable"
        assert "redis" in resp.json["error"]["message"]
        assert "postgres" not in resp.json["error"]["message"]
        assert (
            await Api(f"http://127.0.0.1:{daemon.port}").get("/healthz", user=None)
        ).status == 200
    finally:
        await daemon.stop()
