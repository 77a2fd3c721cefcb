"""Messages over REST (API.md, "REST"): send, history pages, edit, delete,
gapless seq under concurrency and idempotent retries."""

from __future__ import annotations

import asyncio
import re

import pytest
from tornado.httpclient import AsyncHTTPClient

from .helpers import Api
from .helpers import pg_query as sql

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MESSAGE_KEYS = [
    "id",
    "chat_id",
    "seq",
    "sender_id",
    "content",
    "client_id",
    "created_at",
    "edited_at",
    # API.md version 2 adds these (additions only; "deleted" stays last).
    "version",
    "reply_to",
    "reply_count",
    "mentions",
    "reactions",
    "pinned",
    "deleted",
]


async def send_many(api: Api, chat_id: str, n: int, users=("alice",)) -> list[dict]:
    out = []
    for i in range(n):
        resp = await api.send(chat_id, f"m{i + 1}", user=users[i % len(users)])
        assert resp.status == 201, resp
        out.append(resp.json)
    return out


# -- send ---------------------------------------------------------------------


@pytest.mark.gen_test
async def test_send_returns_201_and_the_full_message(api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    resp = await api.send(chat_id, "  hello\n", user="bob", client_id="c-1")
    assert resp.status == 201
    msg = resp.json
    assert list(msg) == MESSAGE_KEYS
    assert msg["chat_id"] == chat_id
    assert msg["seq"] == 1
    assert msg["sender_id"] == "bob"
    assert msg["content"] == "hello"
    assert msg["client_id"] == "c-1"
    assert TS_RE.match(msg["created_at"])
    assert msg["edited_at"] is None
    assert msg["deleted"] is False
    assert isinstance(msg["id"], int) and 0 < msg["id"] < 2**53
    assert resp.headers["Content-Type"].startswith("application/json")


@pytest.mark.gen_test
async def test_send_without_client_id_has_null_client_id(api, chat_id):
    await api.create_chat(chat_id)
    resp = await api.send(chat_id, "x")
    assert resp.status == 201
    assert resp.json["client_id"] is None


@pytest.mark.gen_test
async def test_content_at_max_length_is_accepted_and_counts_code_points(api, chat_id):
    await api.create_chat(chat_id)
    text = "é" * 3999 + "😀"  # 4000 code points, many more UTF-8 bytes
    resp = await api.send(chat_id, text)
    assert resp.status == 201
    assert resp.json["content"] == text
    resp = await api.send(chat_id, text + "x")
    assert resp.status == 400
    assert resp.error_code == "validation_error"


@pytest.mark.gen_test
async def test_send_to_unknown_chat_is_chat_not_found(api, chat_id):
    resp = await api.send(chat_id, "x")
    assert resp.status == 404
    assert resp.error_code == "chat_not_found"


@pytest.mark.gen_test
async def test_posting_to_a_public_chat_makes_the_poster_a_member(api, chat_id):
    await api.create_chat(chat_id, visibility="public")
    assert (await api.send(chat_id, "hi", user="eve")).status == 201
    chat = (await api.get(f"/chats/{chat_id}")).json
    roles = {m["user_id"]: m["role"] for m in chat["members"]}
    assert roles == {"alice": "owner", "eve": "member"}


# -- gapless seq ----------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_fifty_concurrent_sends_get_seqs_1_to_50_in_commit_order(api, chat_id):
    users = [f"u{i}" for i in range(5)]  # spread over users: stays under any per-user limit
    await api.create_chat(chat_id, members=users)
    # A client of its own that really keeps 50 requests in flight at once.
    api.client = AsyncHTTPClient(force_instance=True, max_clients=50)
    resps = await asyncio.gather(
        *(api.send(chat_id, f"c{i}", user=users[i % 5]) for i in range(50))
    )
    assert [r.status for r in resps] == [201] * 50
    msgs = [r.json for r in resps]
    assert sorted(m["seq"] for m in msgs) == list(range(1, 51))
    by_seq = sorted(msgs, key=lambda m: m["seq"])
    ids = [m["id"] for m in by_seq]
    assert ids == sorted(ids) and len(set(ids)) == 50
    # Every request's content landed under the seq it was answered with.
    page = (await api.get(f"/chats/{chat_id}/messages?limit=50")).json
    assert page["messages"] == by_seq
    chat = (await api.get(f"/chats/{chat_id}")).json
    assert chat["last_seq"] == 50


# -- idempotency ------------------------------------------------------------------


@pytest.mark.gen_test
async def test_retry_with_same_client_id_returns_200_and_the_original(api, chat_id, database_url):
    await api.create_chat(chat_id)
    first = await api.send(chat_id, "once", client_id="retry-1")
    assert first.status == 201
    again = await api.send(chat_id, "different text", client_id="retry-1")
    assert again.status == 200
    assert again.json == first.json
    rows = sql(
        database_url,
        "SELECT count(*) FROM messages WHERE chat_id = %s AND client_id = %s",
        (chat_id, "retry-1"),
    )
    assert rows == [(1,)]
    # The rejected retry consumed no seq.
    nxt = await api.send(chat_id, "next")
    assert nxt.json["seq"] == 2


@pytest.mark.gen_test
async def test_concurrent_duplicate_retries_make_one_message(api, chat_id, database_url):
    await api.create_chat(chat_id)
    resps = await asyncio.gather(*(api.send(chat_id, "dup", client_id="same") for _ in range(10)))
    statuses = sorted(r.status for r in resps)
    assert statuses == [200] * 9 + [201]
    assert len({r.body for r in resps}) == 1
    assert sql(database_url, "SELECT count(*) FROM messages WHERE chat_id = %s", (chat_id,)) == [
        (1,)
    ]
    assert sql(database_url, "SELECT last_seq FROM chats WHERE id = %s", (chat_id,)) == [(1,)]


@pytest.mark.gen_test
async def test_same_client_id_from_another_sender_or_chat_is_a_new_message(api, chat_id):
    other = chat_id + "-2"
    await api.create_chat(chat_id, members=["bob"])
    await api.create_chat(other)
    a = await api.send(chat_id, "a", client_id="k")
    b = await api.send(chat_id, "b", user="bob", client_id="k")
    c = await api.send(other, "c", client_id="k")
    assert (a.status, b.status, c.status) == (201, 201, 201)
    assert len({a.json["id"], b.json["id"], c.json["id"]}) == 3
    assert (b.json["seq"], c.json["seq"]) == (2, 1)


# -- history ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_empty_chat_history_is_empty(api, chat_id):
    await api.create_chat(chat_id)
    resp = await api.get(f"/chats/{chat_id}/messages")
    assert resp.status == 200
    assert resp.json == {"messages": [], "has_more": False}


@pytest.mark.gen_test(timeout=60)
async def test_paging_backwards_and_forwards_with_has_more(api, chat_id):
    await api.create_chat(chat_id)
    sent = await send_many(api, chat_id, 7)
    base = f"/chats/{chat_id}/messages"

    newest = (await api.get(f"{base}?limit=3")).json
    assert [m["seq"] for m in newest["messages"]] == [5, 6, 7]
    assert newest["has_more"] is True
    assert newest["messages"] == sent[4:]

    older = (await api.get(f"{base}?limit=3&before_seq=5")).json
    assert [m["seq"] for m in older["messages"]] == [2, 3, 4]
    assert older["has_more"] is True
    oldest = (await api.get(f"{base}?limit=3&before_seq=2")).json
    assert [m["seq"] for m in oldest["messages"]] == [1]
    assert oldest["has_more"] is False
    exact = (await api.get(f"{base}?limit=3&before_seq=4")).json
    assert [m["seq"] for m in exact["messages"]] == [1, 2, 3]
    assert exact["has_more"] is False

    fwd = (await api.get(f"{base}?limit=3&after_seq=0")).json
    assert [m["seq"] for m in fwd["messages"]] == [1, 2, 3]
    assert fwd["has_more"] is True
    fwd = (await api.get(f"{base}?limit=3&after_seq=4")).json
    assert [m["seq"] for m in fwd["messages"]] == [5, 6, 7]
    assert fwd["has_more"] is False
    assert (await api.get(f"{base}?after_seq=7")).json == {"messages": [], "has_more": False}

    all_ = (await api.get(base)).json
    assert all_["messages"] == sent and all_["has_more"] is False
    assert len((await api.get(f"{base}?limit=1")).json["messages"]) == 1


@pytest.mark.gen_test(timeout=60)
async def test_limit_default_is_50_and_max_is_200(api, chat_id, database_url):
    await api.create_chat(chat_id)
    # 210 rows straight in SQL, with last_seq/version kept consistent.
    sql(
        database_url,
        """INSERT INTO messages (chat_id, seq, sender_id, content)
           SELECT %s, g, 'alice', 'm' || g FROM generate_series(1, 210) g;
           UPDATE chats SET last_seq = 210, version = version + 1 WHERE id = %s""",
        (chat_id, chat_id),
    )
    base = f"/chats/{chat_id}/messages"
    page = (await api.get(base)).json
    assert [m["seq"] for m in page["messages"]] == list(range(161, 211))
    assert page["has_more"] is True
    page = (await api.get(f"{base}?limit=200")).json
    assert [m["seq"] for m in page["messages"]] == list(range(11, 211))
    assert page["has_more"] is True
    page = (await api.get(f"{base}?limit=200&after_seq=10")).json
    assert [m["seq"] for m in page["messages"]] == list(range(11, 211))
    assert page["has_more"] is False
    for bad in ("0", "201", "abc", "-1", "1.5", ""):
        resp = await api.get(f"{base}?limit={bad}")
        assert resp.status == 400, bad
        assert resp.error_code == "validation_error"


@pytest.mark.gen_test(timeout=60)
async def test_deleted_messages_are_hidden_by_default_and_tombstones_with_include_deleted(
    api, chat_id
):
    await api.create_chat(chat_id)
    sent = await send_many(api, chat_id, 5)
    assert (await api.delete(f"/messages/{sent[1]['id']}")).status == 204
    assert (await api.delete(f"/message/?id={sent[3]['id']}")).status == 204
    base = f"/chats/{chat_id}/messages"

    default = (await api.get(base)).json
    assert [m["seq"] for m in default["messages"]] == [1, 3, 5]  # the gaps show
    assert default["has_more"] is False

    full = (await api.get(f"{base}?include_deleted=true")).json
    assert [m["seq"] for m in full["messages"]] == [1, 2, 3, 4, 5]
    tomb = full["messages"][1]
    # Version 2: the delete is the chat's 6th change (5 sends before it).
    assert tomb == {**sent[1], "content": None, "deleted": True, "version": 6}

    # has_more counts what the page would show: only deleted rows beyond it -> False.
    page = (await api.get(f"{base}?limit=2&before_seq=4")).json
    assert [m["seq"] for m in page["messages"]] == [1, 3]
    assert page["has_more"] is False
    page = (await api.get(f"{base}?limit=1&before_seq=3")).json
    assert [m["seq"] for m in page["messages"]] == [1]
    assert page["has_more"] is False
    page = (await api.get(f"{base}?limit=2&before_seq=4&include_deleted=true")).json
    assert [m["seq"] for m in page["messages"]] == [2, 3]
    assert page["has_more"] is True
    page = (await api.get(f"{base}?limit=2&after_seq=1")).json
    assert [m["seq"] for m in page["messages"]] == [3, 5]
    assert page["has_more"] is False
    page = (await api.get(f"{base}?limit=2&after_seq=1&include_deleted=1")).json
    assert [m["seq"] for m in page["messages"]] == [2, 3]
    assert page["has_more"] is True
    newest = (await api.get(f"{base}?limit=2&include_deleted=false")).json
    assert [m["seq"] for m in newest["messages"]] == [3, 5]
    assert newest["has_more"] is True


# -- delete and edit --------------------------------------------------------------------


@pytest.mark.gen_test
async def test_delete_erases_content_in_the_database(api, chat_id, database_url):
    await api.create_chat(chat_id)
    msg = (await api.send(chat_id, "secret")).json
    assert (await api.delete(f"/messages/{msg['id']}")).status == 204
    assert sql(
        database_url, "SELECT content, deleted FROM messages WHERE id = %s", (msg["id"],)
    ) == [(None, True)]


@pytest.mark.gen_test
async def test_deleting_twice_is_204_and_unknown_id_is_404(api, chat_id):
    await api.create_chat(chat_id)
    msg = (await api.send(chat_id, "x")).json
    assert (await api.delete(f"/messages/{msg['id']}")).status == 204
    again = await api.delete(f"/messages/{msg['id']}")
    assert again.status == 204 and again.body == b""
    assert (await api.delete(f"/message/?id={msg['id']}")).status == 204
    assert (await api.delete(f"/message?id={msg['id']}")).status == 204
    for path in ("/messages/999999999999", "/message/?id=999999999999"):
        resp = await api.delete(path)
        assert resp.status == 404
        assert resp.error_code == "message_not_found"


@pytest.mark.gen_test
async def test_edit_changes_content_and_sets_edited_at(api, chat_id):
    await api.create_chat(chat_id)
    msg = (await api.send(chat_id, "typo", client_id="e1")).json
    resp = await api.patch(f"/messages/{msg['id']}", {"content": "  fixed "})
    assert resp.status == 200
    edited = resp.json
    assert edited["content"] == "fixed"
    assert TS_RE.match(edited["edited_at"])
    changed = ("content", "edited_at", "version")  # version: API.md version 2
    assert {k: v for k, v in edited.items() if k not in changed} == {
        k: v for k, v in msg.items() if k not in changed
    }
    assert edited["version"] == msg["version"] + 1
    page = (await api.get(f"/chats/{chat_id}/messages")).json
    assert page["messages"] == [edited]


@pytest.mark.gen_test
async def test_editing_a_deleted_or_unknown_message_is_message_not_found(api, chat_id):
    await api.create_chat(chat_id)
    msg = (await api.send(chat_id, "x")).json
    await api.delete(f"/messages/{msg['id']}")
    resp = await api.patch(f"/messages/{msg['id']}", {"content": "y"})
    assert resp.status == 404 and resp.error_code == "message_not_found"
    resp = await api.patch("/messages/987654321098", {"content": "y"})
    assert resp.status == 404 and resp.error_code == "message_not_found"


@pytest.mark.gen_test
async def test_edit_validates_content_like_send(api, chat_id):
    await api.create_chat(chat_id)
    msg = (await api.send(chat_id, "x")).json
    for body in ({"content": "   "}, {"content": 5}, {}, {"content": "a" * 4001}):
        resp = await api.patch(f"/messages/{msg['id']}", body)
        assert resp.status == 400, body
        assert resp.error_code == "validation_error"
