"""Members: add, re-role and remove (API.md, "REST"; docs/API-NOTES.md,
"Roles"), and what removal does to a member's events."""

from __future__ import annotations

import pytest

from .helpers import SocketClient


async def roles(api, chat_id, user: str = "alice") -> dict:
    chat = (await api.get(f"/chats/{chat_id}", user=user)).json
    return {m["user_id"]: m["role"] for m in chat["members"]}


@pytest.mark.gen_test
async def test_put_member_adds_with_role_member_by_default(api, chat_id):
    await api.create_chat(chat_id)
    resp = await api.put(f"/chats/{chat_id}/members/bob")
    assert resp.status == 200
    member = resp.json
    assert list(member) == ["user_id", "role", "joined_at", "last_read_seq"]
    assert (member["user_id"], member["role"], member["last_read_seq"]) == ("bob", "member", 0)
    resp = await api.put(f"/chats/{chat_id}/members/carol", {})
    assert resp.status == 200 and resp.json["role"] == "member"
    assert await roles(api, chat_id) == {"alice": "owner", "bob": "member", "carol": "member"}


@pytest.mark.gen_test
async def test_put_member_re_roles_and_keeps_the_read_marker(api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    await api.send(chat_id, "x")
    await api.post(f"/chats/{chat_id}/read", {"seq": 1}, user="bob")
    resp = await api.put(f"/chats/{chat_id}/members/bob", {"role": "admin"})
    assert resp.status == 200
    assert (resp.json["role"], resp.json["last_read_seq"]) == ("admin", 1)
    resp = await api.put(f"/chats/{chat_id}/members/bob", {"role": "owner"})
    assert resp.json["role"] == "owner"
    # Now alice is not the last owner and may step down.
    resp = await api.put(f"/chats/{chat_id}/members/alice", {"role": "member"})
    assert resp.status == 200
    assert await roles(api, chat_id) == {"alice": "member", "bob": "owner"}


@pytest.mark.gen_test
async def test_admin_may_manage_members_but_not_owners_or_admins(api, chat_id):
    await api.create_chat(chat_id, members=["adam", "ada2", "bob"])
    await api.put(f"/chats/{chat_id}/members/adam", {"role": "admin"})
    await api.put(f"/chats/{chat_id}/members/ada2", {"role": "admin"})
    as_admin = {"user": "adam"}
    assert (await api.put(f"/chats/{chat_id}/members/dan", **as_admin)).status == 200
    cases = [
        ("PUT", "alice", {"role": "member"}),
        ("PUT", "ada2", {"role": "member"}),
        ("PUT", "bob", {"role": "admin"}),
        ("PUT", "bob", {"role": "owner"}),
        ("DELETE", "alice", None),
        ("DELETE", "ada2", None),
    ]
    for method, target, body in cases:
        resp = await api.request(method, f"/chats/{chat_id}/members/{target}", body, **as_admin)
        assert resp.status == 403, (method, target, body, resp)
        assert resp.error_code == "forbidden"
    assert (await api.delete(f"/chats/{chat_id}/members/bob", **as_admin)).status == 204
    assert await roles(api, chat_id) == {
        "alice": "owner", "adam": "admin", "ada2": "admin", "dan": "member"
    }  # fmt: skip
    # An admin may step down.
    resp = await api.put(f"/chats/{chat_id}/members/adam", {"role": "member"}, **as_admin)
    assert resp.status == 200 and resp.json["role"] == "member"


@pytest.mark.gen_test
async def test_last_owner_cannot_leave_or_step_down(api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    resp = await api.delete(f"/chats/{chat_id}/members/alice")
    assert resp.status == 409 and resp.error_code == "conflict"
    resp = await api.put(f"/chats/{chat_id}/members/alice", {"role": "admin"})
    assert resp.status == 409 and resp.error_code == "conflict"
    await api.put(f"/chats/{chat_id}/members/bob", {"role": "owner"})
    assert (await api.delete(f"/chats/{chat_id}/members/alice")).status == 204
    assert await roles(api, chat_id, user="bob") == {"bob": "owner"}
    # alice is out: the private chat is now hidden from her.
    resp = await api.get(f"/chats/{chat_id}")
    assert resp.status == 404 and resp.error_code == "chat_not_found"


@pytest.mark.gen_test
async def test_removing_a_non_member_is_204(api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    assert (await api.delete(f"/chats/{chat_id}/members/nobody")).status == 204
    assert (await api.delete(f"/chats/{chat_id}/members/bob", user="bob")).status == 204
    assert await roles(api, chat_id) == {"alice": "owner"}


@pytest.mark.gen_test
async def test_anyone_may_join_a_public_chat_as_member_only(api, chat_id):
    await api.create_chat(chat_id, visibility="public")
    resp = await api.put(f"/chats/{chat_id}/members/eve", user="eve")
    assert resp.status == 200 and resp.json["role"] == "member"
    resp = await api.put(f"/chats/{chat_id}/members/eve", {"role": "admin"}, user="eve")
    assert resp.status == 403
    resp = await api.put(f"/chats/{chat_id}/members/zed", user="eve")
    assert resp.status == 403
    assert await roles(api, chat_id) == {"alice": "owner", "eve": "member"}


@pytest.mark.gen_test(timeout=60)
async def test_removed_member_stops_getting_events_at_once(chatd, api, chat_id):
    await api.create_chat(chat_id, members=["bob", "carol"])
    url = f"http://127.0.0.1:{chatd.port}"
    bob = await SocketClient(url, user="bob").connect()
    carol = await SocketClient(url, user="carol").connect()
    try:
        assert (await bob.call("join-chat", chat_id))["ok"]
        assert (await carol.call("join-chat", chat_id))["ok"]
        await api.send(chat_id, "before")
        await bob.wait_for("new-message", lambda d: d["content"] == "before")
        assert (await api.delete(f"/chats/{chat_id}/members/bob")).status == 204
        await api.send(chat_id, "after")
        await carol.wait_for("new-message", lambda d: d["content"] == "after")
        # bob's events are delivered in the same order as carol's: give a
        # marker on bob's own room time to arrive, then check.
        await api.create_chat(chat_id + "-m", members=["bob"])
        assert (await bob.call("join-chat", chat_id + "-m"))["ok"]
        await api.send(chat_id + "-m", "marker")
        await bob.wait_for("new-message", lambda d: d["content"] == "marker")
        assert [e["content"] for e in bob.of("new-message")] == ["before", "marker"]
        ack = await bob.call("join-chat", chat_id)
        assert ack["ok"] is False and ack["error"]["code"] == "chat_not_found"
    finally:
        await bob.close()
        await carol.close()
