"""chatctl chats list/show and export: admin views straight from PostgreSQL."""

import asyncio

import orjson
import pytest

import cli.export

from .clitools import chatctl_fixture  # noqa: F401


@pytest.mark.gen_test(timeout=60)
async def test_chats_list_and_show_give_members_roles_and_last_seq(chatctl, api, chat_id):
    await api.create_chat(chat_id, members=["bob", "carol"], visibility="public")
    await api.put(f"/chats/{chat_id}/members/bob", {"role": "admin"})
    for text in ("one", "two"):
        await api.send(chat_id, text)

    listed = await asyncio.to_thread(chatctl, "chats", "list", "--format", "json")
    assert listed.exit_code == 0, listed.output
    chats = {c["id"]: c for c in map(orjson.loads, listed.stdout.splitlines())}
    assert chats[chat_id]["members"] == 3
    assert chats[chat_id]["last_seq"] == 2
    assert chats[chat_id]["visibility"] == "public"
    assert chats[chat_id]["created_at"].endswith("Z")

    table = await asyncio.to_thread(chatctl, "chats", "list")
    row = next(line for line in table.stdout.splitlines() if line.startswith(chat_id))
    assert row.split()[1:4] == ["public", "3", "2"]

    shown = await asyncio.to_thread(chatctl, "chats", "show", chat_id, "--format", "json")
    chat = orjson.loads(shown.stdout)
    assert chat == (await api.get(f"/chats/{chat_id}")).json
    text = await asyncio.to_thread(chatctl, "chats", "show", chat_id)
    assert "last_seq    2" in text.stdout
    roles = {line.split()[0]: line.split()[1] for line in text.stdout.splitlines()[6:]}
    assert roles == {"alice": "owner", "bob": "admin", "carol": "member"}


def test_chats_show_unknown_chat_fails_and_bad_id_is_usage_error(chatctl):
    missing = chatctl("chats", "show", "no-such-chat-here")
    assert missing.exit_code == 1
    assert "not found" in missing.stderr
    assert chatctl("chats", "show", "bad id!").exit_code == 2


@pytest.mark.gen_test(timeout=60)
async def test_export_streams_every_message_by_seq_with_tombstones(
    chatctl, api, chat_id, monkeypatch
):
    await api.create_chat(chat_id, members=["bob"])
    sent = [(await api.send(chat_id, f"m{i}", user="bob")).json for i in range(7)]
    for m in (sent[1], sent[4]):
        assert (await api.delete(f"/messages/{m['id']}")).status == 204
    await api.patch(f"/messages/{sent[2]['id']}", {"content": "m2 edited"}, user="bob")
    expected = (await api.get(f"/chats/{chat_id}/messages?include_deleted=true")).json

    # Tiny keyset pages, so the export crosses several page boundaries.
    monkeypatch.setattr(cli.export, "PAGE", 3)
    result = await asyncio.to_thread(chatctl, "export", "--chat", chat_id)
    assert result.exit_code == 0, result.output
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert rows == expected["messages"]
    assert [r["seq"] for r in rows] == list(range(1, 8))
    assert [r["seq"] for r in rows if r["deleted"]] == [2, 5]
    assert all(r["content"] is None for r in rows if r["deleted"])
    assert rows[2]["content"] == "m2 edited"

    tail = await asyncio.to_thread(chatctl, "export", "--chat", chat_id, "--since-seq", "5")
    assert [orjson.loads(line)["seq"] for line in tail.stdout.splitlines()] == [6, 7]


def test_export_of_unknown_chat_fails(chatctl):
    result = chatctl("export", "--chat", "no-such-chat-here")
    assert result.exit_code == 1
    assert "not found" in result.stderr
    assert chatctl("export").exit_code == 2


@pytest.mark.gen_test(timeout=60)
async def test_export_carries_the_version_2_fields(chatctl, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    parent = (await api.send(chat_id, "q")).json
    await api.send(chat_id, "a", user="bob", reply_to=parent["id"])
    await api.put(f"/messages/{parent['id']}/reactions/%F0%9F%91%8D", user="bob")
    await api.put(f"/chats/{chat_id}/pins/{parent['id']}")
    expected = (await api.get(f"/chats/{chat_id}/messages")).json["messages"]
    result = await asyncio.to_thread(chatctl, "export", "--chat", chat_id)
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert rows == expected
    assert (rows[0]["reply_count"], rows[0]["pinned"], rows[0]["version"]) == (1, True, 5)
    assert rows[0]["reactions"] == [{"emoji": "👍", "count": 1, "users": ["bob"]}]
    assert rows[1]["reply_to"] == parent["id"]


def test_tail_text_shows_replies_reactions_and_pins():
    from cli.tail import format_event

    base = {"chat_id": "c", "seq": 3, "sender_id": "bob", "created_at": "T", "content": "hi",
            "edited_at": None, "deleted": False}  # fmt: skip
    assert format_event("new-message", base, "text") == "T [c] #3 bob: hi"
    full = {**base, "reply_to": 7, "reply_count": 2, "pinned": True,
            "reactions": [{"emoji": "👍", "count": 2, "users": []},
                          {"emoji": ":tada:", "count": 1, "users": []}]}  # fmt: skip
    assert format_event("message-updated", full, "text") == (
        "T [c] #3 bob (updated): hi [reply to 7] [2 replies] [pinned] [👍 2, :tada: 1]"
    )
    edited = {**base, "edited_at": "T2"}
    assert format_event("message-updated", edited, "text") == "T [c] #3 bob (edited): hi"
