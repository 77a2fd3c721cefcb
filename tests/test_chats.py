"""Chats: create, get, the caller's list with unread counts and last messages,
and the read marker (API.md, "REST"; docs/API-NOTES.md, "Chats and members")."""

from __future__ import annotations

import re

import pytest

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@pytest.mark.gen_test
async def test_create_chat_answers_201_with_defaults_and_the_creator_as_owner(api, chat_id):
    resp = await api.post(
        "/chats",
        {"id": chat_id, "title": "  General ", "members": ["bob", "alice", "bob", "carol"]},
    )
    assert resp.status == 201
    chat = resp.json
    assert list(chat) == [
        "id", "title", "visibility", "created_by", "created_at", "last_seq", "version", "kind",
        "members",
    ]  # fmt: skip
    assert chat["id"] == chat_id
    assert chat["title"] == "General"
    assert chat["visibility"] == "private"
    assert chat["created_by"] == "alice"
    assert TS_RE.match(chat["created_at"])
    assert chat["last_seq"] == 0
    members = chat["members"]
    assert [(m["user_id"], m["role"], m["last_read_seq"]) for m in members] == [
        ("alice", "owner", 0),
        ("bob", "member", 0),
        ("carol", "member", 0),
    ]
    assert all(list(m) == ["user_id", "role", "joined_at", "last_read_seq"] for m in members)
    assert all(TS_RE.match(m["joined_at"]) for m in members)
    got = await api.get(f"/chats/{chat_id}", user="carol")
    assert got.status == 200
    assert got.json == chat


@pytest.mark.gen_test
async def test_create_chat_without_id_gets_a_random_valid_id(api):
    a = (await api.post("/chats", {"title": "t", "visibility": "public"})).json
    b = (await api.post("/chats", {"title": "t"})).json
    assert ID_RE.match(a["id"]) and ID_RE.match(b["id"]) and a["id"] != b["id"]
    assert a["visibility"] == "public"
    assert (await api.get(f"/chats/{a['id']}", user="zed")).status == 200


@pytest.mark.gen_test
async def test_taken_chat_id_is_409_conflict(api, chat_id):
    await api.create_chat(chat_id)
    resp = await api.post("/chats", {"id": chat_id, "title": "again"}, user="bob")
    assert resp.status == 409
    assert resp.error_code == "conflict"
    assert (await api.get(f"/chats/{chat_id}")).json["title"] == "Test chat"


@pytest.mark.gen_test
async def test_unknown_chat_is_chat_not_found(api, chat_id):
    for path in (f"/chats/{chat_id}", f"/chats/{chat_id}/messages"):
        resp = await api.get(path)
        assert resp.status == 404 and resp.error_code == "chat_not_found"


@pytest.mark.gen_test
async def test_get_chat_shows_last_seq(api, chat_id):
    await api.create_chat(chat_id)
    for i in range(3):
        await api.send(chat_id, f"m{i}")
    assert (await api.get(f"/chats/{chat_id}")).json["last_seq"] == 3


@pytest.mark.gen_test(timeout=60)
async def test_chat_list_has_unread_counts_last_message_role_and_order(api, chat_id):
    user = f"lister-{chat_id}"  # a user in no other test's chats
    quiet, busy = chat_id + "-quiet", chat_id + "-busy"
    await api.create_chat(quiet, members=[user])
    await api.create_chat(busy, owner=user, members=["bob"])

    listed = (await api.get("/chats", user=user)).json
    assert set(listed) == {"chats"}
    assert [c["id"] for c in listed["chats"]] == [busy, quiet]  # newest chat first
    item = listed["chats"][0]
    assert "members" not in item
    assert item["role"] == "owner" and item["last_read_seq"] == 0
    assert item["unread_count"] == 0 and item["last_message"] is None

    m1 = (await api.send(quiet, "one")).json
    m2 = (await api.send(quiet, "two")).json
    await api.send(quiet, "mine", user=user)  # own messages are not unread
    m4 = (await api.send(quiet, "four")).json
    await api.delete(f"/messages/{m2['id']}")  # deleted ones are not unread
    by_id = {c["id"]: c for c in (await api.get("/chats", user=user)).json["chats"]}
    assert [c for c in by_id] == [quiet, busy]  # most recently active first
    assert by_id[quiet]["unread_count"] == 2
    assert by_id[quiet]["last_message"] == m4
    assert by_id[quiet]["role"] == "member"
    assert by_id[quiet]["last_seq"] == 4

    # Deleting the newest makes the one before it the last message.
    await api.delete(f"/messages/{m4['id']}")
    item = next(c for c in (await api.get("/chats", user=user)).json["chats"] if c["id"] == quiet)
    assert item["last_message"]["content"] == "mine"
    assert item["unread_count"] == 1

    assert (await api.post(f"/chats/{quiet}/read", {"seq": m1["seq"]}, user=user)).status == 204
    item = next(c for c in (await api.get("/chats", user=user)).json["chats"] if c["id"] == quiet)
    assert item["last_read_seq"] == 1 and item["unread_count"] == 0


@pytest.mark.gen_test
async def test_read_marker_only_moves_forward_and_is_clamped_to_last_seq(api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    for i in range(3):
        await api.send(chat_id, f"m{i}")

    async def marker() -> int:
        chat = (await api.get(f"/chats/{chat_id}")).json
        return next(m["last_read_seq"] for m in chat["members"] if m["user_id"] == "bob")

    assert (await api.post(f"/chats/{chat_id}/read", {"seq": 2}, user="bob")).status == 204
    assert await marker() == 2
    assert (await api.post(f"/chats/{chat_id}/read", {"seq": 1}, user="bob")).status == 204
    assert await marker() == 2
    assert (await api.post(f"/chats/{chat_id}/read", {"seq": 0}, user="bob")).status == 204
    assert await marker() == 2
    resp = await api.post(f"/chats/{chat_id}/read", {"seq": 1000}, user="bob")
    assert resp.status == 204 and resp.body == b""
    assert await marker() == 3
