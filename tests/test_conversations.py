"""API.md version 2, "Conversations, exact sync": versions on every change,
GET /changes, join-chat {since_version}, replies, reactions, edit history,
pins and the chat list events, over real HTTP and sockets (one process; the
cross-process cases are in tests/test_conversations_cluster.py)."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from .helpers import SocketClient
from .helpers import pg_query as sql


@pytest.fixture
def url(chatd) -> str:
    return f"http://127.0.0.1:{chatd.port}"


async def connect(url: str, user: str) -> SocketClient:
    return await SocketClient(url, user=user).connect()


async def sent(api, chat_id, content, user="alice", **extra) -> dict:
    resp = await api.send(chat_id, content, user=user, **extra)
    assert resp.status == 201, resp
    return resp.json


async def changes(api, chat_id, since=0, user="alice", **q) -> dict:
    extra = "".join(f"&{k}={v}" for k, v in q.items())
    resp = await api.get(f"/chats/{chat_id}/changes?since_version={since}{extra}", user=user)
    assert resp.status == 200, resp
    return resp.json


async def settle(client: SocketClient, api, chat_id: str) -> dict:
    """Every event emitted so far to the chat has reached ``client`` (a marker
    message through the same room arrives after them); the marker."""
    marker = await sent(api, chat_id, "~marker~")
    await client.wait_for("new-message", lambda d: d["id"] == marker["id"])
    return marker


def r(emoji: str) -> str:
    return quote(emoji, safe="")


# -- versions and changes ------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_every_change_takes_the_chats_next_version_and_changes_returns_current_state(
    database_url, api, chat_id
):
    chat = await api.create_chat(chat_id, members=["bob"])
    assert chat["version"] == 0
    a = await sent(api, chat_id, "a")
    b = await sent(api, chat_id, "b", user="bob")
    assert (a["version"], b["version"]) == (1, 2)
    assert (a["reply_to"], a["reply_count"], a["reactions"], a["pinned"]) == (None, 0, [], False)
    edited = (await api.patch(f"/messages/{a['id']}", {"content": "a2"})).json
    assert edited["version"] == 3
    # An edit to the same text changes nothing: 200, no version, no history.
    same = await api.patch(f"/messages/{a['id']}", {"content": "a2"})
    assert same.status == 200 and same.json == edited
    assert (await api.delete(f"/messages/{b['id']}", user="bob")).status == 204
    got = await changes(api, chat_id)
    # Ascending by version, each message once in its current state, tombstones in.
    assert [(m["id"], m["version"], m["content"]) for m in got["messages"]] == [
        (a["id"], 3, "a2"),
        (b["id"], 4, None),
    ]
    assert got["version"] == 4 and got["has_more"] is False
    assert (await api.get(f"/chats/{chat_id}")).json["version"] == 4
    only = await changes(api, chat_id, since=3)
    assert [m["id"] for m in only["messages"]] == [b["id"]]
    assert only["messages"][0]["deleted"] is True
    assert (await changes(api, chat_id, since=4))["messages"] == []
    # Versions are unique within the chat, straight from PostgreSQL.
    rows = sql(database_url, "SELECT version FROM messages WHERE chat_id = %s", (chat_id,))
    assert sorted(v for (v,) in rows) == [3, 4]


@pytest.mark.gen_test(timeout=60)
async def test_changes_pages_with_limit_and_has_more(api, chat_id):
    await api.create_chat(chat_id)
    msgs = [await sent(api, chat_id, f"m{i}") for i in range(7)]
    page = await changes(api, chat_id, since=0, limit=3)
    assert [m["version"] for m in page["messages"]] == [1, 2, 3]
    assert page["has_more"] is True and page["version"] == 7
    page = await changes(api, chat_id, since=3, limit=3)
    assert [m["version"] for m in page["messages"]] == [4, 5, 6] and page["has_more"] is True
    page = await changes(api, chat_id, since=6, limit=3)
    assert [m["id"] for m in page["messages"]] == [msgs[6]["id"]] and page["has_more"] is False
    default = await changes(api, chat_id)
    assert len(default["messages"]) == 7
    for bad in ("0", "501", "x", "-1"):
        resp = await api.get(f"/chats/{chat_id}/changes?since_version=0&limit={bad}")
        assert (resp.status, resp.error_code) == (400, "validation_error"), bad
    for bad in ("x", "-3", "1e3", "99999999999999999999"):
        resp = await api.get(f"/chats/{chat_id}/changes?since_version={bad}")
        assert (resp.status, resp.error_code) == (400, "validation_error"), bad


@pytest.mark.gen_test(timeout=60)
async def test_a_group_commit_takes_one_version_per_message(api, chat_id):
    await api.create_chat(chat_id)
    burst = await asyncio.gather(*(api.send(chat_id, f"b{i}") for i in range(30)))
    assert all(resp.status == 201 for resp in burst)
    versions = sorted(resp.json["version"] for resp in burst)
    assert versions == list(range(1, 31))
    page = (await api.get(f"/chats/{chat_id}/messages?limit=30")).json["messages"]
    assert sorted(m["version"] for m in page) == versions
    assert (await api.get(f"/chats/{chat_id}")).json["version"] == 30


# -- join-chat since_version ------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_join_since_version_returns_every_change_since_and_events_carry_versions(
    url, api, chat_id
):
    await api.create_chat(chat_id, members=["bob"])
    old = await sent(api, chat_id, "old")
    mark = old["version"]
    await sent(api, chat_id, "new")
    await api.patch(f"/messages/{old['id']}", {"content": "old, edited"})
    bob = await connect(url, "bob")
    try:
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_version": mark})
        assert ack["ok"] is True and ack["chat_id"] == chat_id
        assert (ack["last_seq"], ack["version"], ack["has_more"]) == (2, 3, False)
        # The edit of a message older than the mark comes back (since_seq would not).
        assert [(m["seq"], m["version"], m["content"]) for m in ack["changed"]] == [
            (2, 2, "new"),
            (1, 3, "old, edited"),
        ]
        live = await sent(api, chat_id, "live")
        assert (await bob.wait_for("new-message"))["version"] == live["version"] == 4
        upd = (await api.patch(f"/messages/{live['id']}", {"content": "live!"})).json
        assert (await bob.wait_for("message-updated")) == upd
        await api.delete(f"/messages/{live['id']}")
        gone = await bob.wait_for("message-deleted")
        assert gone == {"id": live["id"], "chat_id": chat_id, "seq": 3, "version": 6}
        bad = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 1, "since_version": 1})
        assert bad["ok"] is False and bad["error"]["code"] == "validation_error"
        bad = await bob.call("join-chat", {"chat_id": chat_id, "since_version": "3"})
        assert bad["ok"] is False and bad["error"]["code"] == "validation_error"
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=90)
async def test_join_since_version_under_concurrent_changes_leaves_no_hole_and_no_repeat(
    url, api, chat_id
):
    """Changes committed while the join reads reach the socket exactly once:
    in ``changed`` or as an event, never both and never neither."""
    await api.create_chat(chat_id, members=["bob"])
    base = [await sent(api, chat_id, f"b{i}") for i in range(20)]
    bob = await connect(url, "bob")
    try:

        async def churn():
            for i in range(40):
                target = base[i % len(base)]
                if i % 2:
                    await api.put(f"/messages/{target['id']}/reactions/{r('👍')}")
                else:
                    await sent(api, chat_id, f"c{i}")

        task = asyncio.ensure_future(churn())
        await asyncio.sleep(0.05)
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_version": 10})
        await task
        marker = await settle(bob, api, chat_id)
        seen = [m["version"] for m in ack["changed"]]
        seen += [
            d["version"]
            for e, d in bob.events
            if e in ("new-message", "message-updated") and d["id"] != marker["id"]
        ]
        assert len(seen) == len(set(seen)), "a change was shown twice"
        final = await changes(api, chat_id, since=10, limit=500)
        expected = {m["version"] for m in final["messages"]} - {marker["version"]}
        # Every message's latest version (what changes says now) was seen.
        assert expected <= set(seen)
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_join_since_version_caps_at_500_and_pages_on_with_changes(
    database_url, url, api, chat_id
):
    await api.create_chat(chat_id, members=["bob"])
    sql(
        database_url,
        """INSERT INTO messages (chat_id, seq, sender_id, content, version)
           SELECT %s, g, 'alice', 'm' || g, g FROM generate_series(1, 520) g;
           UPDATE chats SET last_seq = 520, version = 520 WHERE id = %s""",
        (chat_id, chat_id),
    )
    bob = await connect(url, "bob")
    try:
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_version": 0})
        assert [m["version"] for m in ack["changed"]] == list(range(1, 501))
        assert ack["has_more"] is True and ack["version"] == 520
        rest = await changes(api, chat_id, since=500, user="bob")
        assert [m["version"] for m in rest["messages"]] == list(range(501, 521))
    finally:
        await bob.close()


# -- replies ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_replies_count_on_the_parent_which_moves_and_is_emitted(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    parent = await sent(api, chat_id, "question")
    bob = await connect(url, "bob")
    try:
        assert (await bob.call("join-chat", chat_id))["ok"]
        reply = await sent(api, chat_id, "answer", user="bob", reply_to=parent["id"])
        assert reply["reply_to"] == parent["id"] and reply["version"] == 2
        updated = await bob.wait_for("message-updated", lambda d: d["id"] == parent["id"])
        assert updated["reply_count"] == 1 and updated["version"] == 3
        ack = await bob.call(
            "send-message", {"chat_id": chat_id, "content": "too", "reply_to": parent["id"]}
        )
        assert ack["ok"] is True and ack["message"]["reply_to"] == parent["id"]
        await bob.wait_for("message-updated", lambda d: d.get("reply_count") == 2)
        # Events of the chat arrive in version order.
        versions = [d["version"] for e, d in bob.events if e in ("new-message", "message-updated")]
        assert versions == sorted(versions) == [2, 3, 4, 5]
        page = (await api.get(f"/messages/{parent['id']}/replies")).json
        assert [m["content"] for m in page["messages"]] == ["answer", "too"]
        assert page["has_more"] is False
        one = (await api.get(f"/messages/{parent['id']}/replies?limit=1")).json
        assert [m["id"] for m in one["messages"]] == [reply["id"]] and one["has_more"] is True
        after = (await api.get(f"/messages/{parent['id']}/replies?after_seq={reply['seq']}")).json
        assert [m["content"] for m in after["messages"]] == ["too"]
        # Deleting a reply takes it out of the count (the parent's next version).
        assert (await api.delete(f"/messages/{reply['id']}", user="bob")).status == 204
        updated = await bob.wait_for(
            "message-updated", lambda d: d["reply_count"] == 1 and d["version"] > 5
        )
        assert updated["id"] == parent["id"] and updated["version"] == 7
        page = (await api.get(f"/messages/{parent['id']}/replies")).json
        assert [m["content"] for m in page["messages"]] == ["too"]
        parent_now = (await api.get(f"/chats/{chat_id}/messages")).json["messages"][0]
        assert parent_now["reply_count"] == 1 and parent_now["version"] == 7
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_reply_to_must_be_a_live_message_of_the_same_chat(api, chat_id):
    await api.create_chat(chat_id)
    other = f"{chat_id}-o"
    await api.create_chat(other)
    elsewhere = await sent(api, other, "elsewhere")
    gone = await sent(api, chat_id, "gone")
    await api.delete(f"/messages/{gone['id']}")
    for bad in (elsewhere["id"], gone["id"], 999999999, 0, -1, "1", 1.5, True, 2**60):
        resp = await api.send(chat_id, "x", reply_to=bad)
        assert (resp.status, resp.error_code) == (400, "validation_error"), bad
    # Nothing was sent, no version taken.
    assert (await api.get(f"/chats/{chat_id}")).json["last_seq"] == 1
    # A non-member of a private chat learns nothing: chat_not_found, not 400.
    resp = await api.send(chat_id, "x", user="mallory", reply_to=gone["id"])
    assert (resp.status, resp.error_code) == (404, "chat_not_found")


# -- reactions -------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_reactions_aggregate_exactly_in_first_added_order(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob", "carol"])
    msg = await sent(api, chat_id, "react to me")
    bob = await connect(url, "bob")
    try:
        assert (await bob.call("join-chat", chat_id))["ok"]
        one = await api.put(f"/messages/{msg['id']}/reactions/{r('👍')}", user="bob")
        assert one.status == 200
        assert one.json["reactions"] == [{"emoji": "👍", "count": 1, "users": ["bob"]}]
        assert one.json["version"] == 2
        assert await bob.wait_for("message-updated") == one.json
        again = await api.put(f"/messages/{msg['id']}/reactions/{r('👍')}", user="bob")
        assert again.status == 200 and again.json == one.json  # nothing changes
        await api.put(f"/messages/{msg['id']}/reactions/{r(':tada:')}", user="carol")
        ack = await bob.call("react", {"message_id": msg["id"], "emoji": "👍🏽"})
        assert ack["ok"] is True
        await api.put(f"/messages/{msg['id']}/reactions/{r('👍')}", user="alice")
        # bob leaves 👍: it keeps its place while alice still reacts with it.
        off = await api.delete(f"/messages/{msg['id']}/reactions/{r('👍')}", user="bob")
        assert off.json["reactions"] == [
            {"emoji": "👍", "count": 1, "users": ["alice"]},
            {"emoji": ":tada:", "count": 1, "users": ["carol"]},
            {"emoji": "👍🏽", "count": 1, "users": ["bob"]},
        ]
        # Gone entirely and back: it counts from its return (now last).
        await api.delete(f"/messages/{msg['id']}/reactions/{r('👍')}", user="alice")
        back = await api.put(f"/messages/{msg['id']}/reactions/{r('👍')}", user="carol")
        assert [e["emoji"] for e in back.json["reactions"]] == [":tada:", "👍🏽", "👍"]
        nothing = await api.delete(f"/messages/{msg['id']}/reactions/{r('❤️')}", user="carol")
        assert nothing.status == 200 and nothing.json == back.json
        removed = await bob.call(
            "react", {"message_id": msg["id"], "emoji": "👍🏽", "remove": True}
        )
        assert [e["emoji"] for e in removed["message"]["reactions"]] == [":tada:", "👍"]
        # The page shows the same JSON (one copy for every reader).
        page = (await api.get(f"/chats/{chat_id}/messages", user="carol")).json["messages"]
        assert page == [removed["message"]]
        # 8 changes, 8 events, versions 2..9; the two no-ops emitted nothing.
        await settle(bob, api, chat_id)
        updates = [d["version"] for d in bob.of("message-updated")]
        assert updates == list(range(2, 10))
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=120)
async def test_count_is_exact_users_are_the_first_20_and_at_most_20_emoji(
    database_url, api, chat_id
):
    users = [f"u{i:02d}" for i in range(25)]
    await api.create_chat(chat_id, members=users)
    msg = await sent(api, chat_id, "popular")
    path = f"/messages/{msg['id']}/reactions/{r('🔥')}"
    results = await asyncio.gather(*(api.put(path, user=u) for u in users))
    assert all(res.status == 200 for res in results)
    final = (await api.put(path, user="u00")).json["reactions"]
    assert final[0]["count"] == 25 and len(final[0]["users"]) == 20
    order = sql(
        database_url,
        "SELECT user_id FROM reactions WHERE message_id = %s ORDER BY id",
        (msg["id"],),
    )
    assert final[0]["users"] == [u for (u,) in order][:20]
    # Versions: one per reaction, all distinct.
    got = await changes(api, chat_id)
    assert got["version"] == 1 + 25
    codes = [f":e{i}:" for i in range(19)]
    for code in codes:
        assert (await api.put(f"/messages/{msg['id']}/reactions/{r(code)}")).status == 200
    full = await api.put(f"/messages/{msg['id']}/reactions/{r(':one_more:')}")
    assert (full.status, full.error_code) == (409, "conflict")
    # An emoji already there is still fine.
    assert (await api.put(f"/messages/{msg['id']}/reactions/{r(':e3:')}", user="u01")).status == 200


@pytest.mark.gen_test(timeout=60)
async def test_emoji_validation(api, chat_id):
    await api.create_chat(chat_id)
    msg = await sent(api, chat_id, "x")
    good = ["👍", "👍🏽", "❤️", "🏳️‍🌈", "👨‍👩‍👧", "🇫🇷", "1️⃣", ":+1:", ":a:", ":" + "z" * 32 + ":"]
    for emoji in good:
        resp = await api.put(f"/messages/{msg['id']}/reactions/{r(emoji)}")
        assert resp.status == 200, (emoji, resp)
    bad = ["a", "👍👍", "👍 ", "::", ":" + "z" * 33 + ":", ":Tada:", ":a b:", "👍\u200d", "%00",
           "x" * 5000, "\u202e", "<script>", ":a:b:", "🇫"]  # fmt: skip
    for emoji in bad:
        resp = await api.put(f"/messages/{msg['id']}/reactions/{r(emoji)}")
        assert (resp.status, resp.error_code) == (400, "validation_error"), emoji
    resp = await api.put(f"/messages/{msg['id']}/reactions/%FF%FE")  # not UTF-8
    assert resp.status == 400


@pytest.mark.gen_test(timeout=60)
async def test_react_event_refuses_bad_payloads(url, api, chat_id):
    await api.create_chat(chat_id)
    msg = await sent(api, chat_id, "x")
    alice = await connect(url, "alice")
    try:
        for payload in (
            {"message_id": msg["id"]},
            {"message_id": msg["id"], "emoji": 5},
            {"message_id": "x", "emoji": "👍"},
            {"message_id": msg["id"], "emoji": "👍", "remove": "yes"},
            {"message_id": 2**60, "emoji": "👍"},
            "👍",
            None,
        ):
            ack = await alice.call("react", payload)
            assert ack["ok"] is False and ack["error"]["code"] == "validation_error", payload
        ack = await alice.call("react", {"message_id": 987654321, "emoji": "👍"})
        assert ack["error"]["code"] == "message_not_found"
    finally:
        await alice.close()


@pytest.mark.gen_test(timeout=60)
async def test_tombstones_refuse_reactions_and_pins_but_take_removals_quietly(
    database_url, api, chat_id
):
    await api.create_chat(chat_id)
    msg = await sent(api, chat_id, "soon gone")
    await api.put(f"/messages/{msg['id']}/reactions/{r('👍')}")
    await api.put(f"/chats/{chat_id}/pins/{msg['id']}")
    await api.delete(f"/messages/{msg['id']}")
    tomb = (await api.get(f"/chats/{chat_id}/messages?include_deleted=true")).json["messages"][0]
    assert (tomb["reactions"], tomb["pinned"], tomb["content"]) == ([], False, None)
    assert tomb["version"] == 4
    resp = await api.put(f"/messages/{msg['id']}/reactions/{r('👍')}")
    assert (resp.status, resp.error_code) == (404, "message_not_found")
    resp = await api.put(f"/chats/{chat_id}/pins/{msg['id']}")
    assert (resp.status, resp.error_code) == (404, "message_not_found")
    resp = await api.delete(f"/messages/{msg['id']}/reactions/{r('👍')}")
    assert resp.status == 200 and resp.json == tomb
    resp = await api.delete(f"/chats/{chat_id}/pins/{msg['id']}")
    assert resp.status == 200 and resp.json == tomb
    assert (await changes(api, chat_id))["version"] == 4  # nothing took a version
    assert sql(database_url, "SELECT count(*) FROM reactions WHERE message_id = %s",
               (msg["id"],)) == [(0,)]  # fmt: skip


# -- edit history ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_edit_history_keeps_every_text_and_is_erased_on_delete(database_url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    msg = await sent(api, chat_id, "v1")
    e2 = (await api.patch(f"/messages/{msg['id']}", {"content": "v2"})).json
    await api.patch(f"/messages/{msg['id']}", {"content": "v2"})  # the same: no entry
    e3 = (await api.patch(f"/messages/{msg['id']}", {"content": "v3"})).json
    hist = await api.get(f"/messages/{msg['id']}/history", user="bob")
    assert hist.status == 200
    assert hist.json == {
        "versions": [
            {"content": "v1", "at": msg["created_at"]},
            {"content": "v2", "at": e2["edited_at"]},
            {"content": "v3", "at": e3["edited_at"]},
        ]
    }
    never = await sent(api, chat_id, "never edited")
    assert (await api.get(f"/messages/{never['id']}/history")).json == {
        "versions": [{"content": "never edited", "at": never["created_at"]}]
    }
    await api.delete(f"/messages/{msg['id']}")
    assert (await api.get(f"/messages/{msg['id']}/history")).json == {"versions": []}
    rows = sql(database_url, "SELECT count(*) FROM message_edits WHERE message_id = %s",
               (msg["id"],))  # fmt: skip
    assert rows == [(0,)]


# -- pins ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_pins_by_owners_and_admins_most_recent_first_at_most_50(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob", "carol"])
    await api.put(f"/chats/{chat_id}/members/carol", {"role": "admin"})
    msgs = [await sent(api, chat_id, f"m{i}") for i in range(52)]
    bob = await connect(url, "bob")
    try:
        assert (await bob.call("join-chat", chat_id))["ok"]
        pinned = await api.put(f"/chats/{chat_id}/pins/{msgs[0]['id']}")
        assert pinned.status == 200 and pinned.json["pinned"] is True
        assert (await bob.wait_for("message-updated")) == pinned.json
        again = await api.put(f"/chats/{chat_id}/pins/{msgs[0]['id']}")
        assert again.status == 200 and again.json == pinned.json
        assert (await api.put(f"/chats/{chat_id}/pins/{msgs[1]['id']}", user="carol")).status == 200
        resp = await api.put(f"/chats/{chat_id}/pins/{msgs[2]['id']}", user="bob")
        assert (resp.status, resp.error_code) == (403, "forbidden")
        pins = (await api.get(f"/chats/{chat_id}/pins", user="bob")).json
        assert [m["id"] for m in pins["messages"]] == [msgs[1]["id"], msgs[0]["id"]]
        for m in msgs[2:50]:
            assert (await api.put(f"/chats/{chat_id}/pins/{m['id']}")).status == 200
        full = await api.put(f"/chats/{chat_id}/pins/{msgs[50]['id']}")
        assert (full.status, full.error_code) == (409, "conflict")
        assert len((await api.get(f"/chats/{chat_id}/pins")).json["messages"]) == 50
        off = await api.delete(f"/chats/{chat_id}/pins/{msgs[0]['id']}", user="carol")
        assert off.status == 200 and off.json["pinned"] is False
        assert (await api.put(f"/chats/{chat_id}/pins/{msgs[50]['id']}")).status == 200
        # A message of another chat is message_not_found, whatever its id.
        other = f"{chat_id}-o"
        await api.create_chat(other)
        foreign = await sent(api, other, "foreign")
        resp = await api.put(f"/chats/{chat_id}/pins/{foreign['id']}")
        assert (resp.status, resp.error_code) == (404, "message_not_found")
        resp = await api.delete(f"/chats/{chat_id}/pins/{foreign['id']}")
        assert (resp.status, resp.error_code) == (404, "message_not_found")
    finally:
        await bob.close()


# -- the page cache stays exact --------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_the_cached_page_shows_every_reaction_pin_and_reply_count(chatd, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    msgs = [await sent(api, chat_id, f"m{i}") for i in range(3)]
    path = f"/chats/{chat_id}/messages?limit=10"
    assert len((await api.get(path)).json["messages"]) == 3  # fills the cache
    await asyncio.sleep(0.2)  # the fill is written in the background
    cache = chatd.domain.cache
    misses = cache.misses
    await api.put(f"/messages/{msgs[1]['id']}/reactions/{r('🎉')}", user="bob")
    assert (await api.get(path)).json["messages"][1]["reactions"][0]["emoji"] == "🎉"
    await api.put(f"/chats/{chat_id}/pins/{msgs[2]['id']}")
    assert (await api.get(path)).json["messages"][2]["pinned"] is True
    await sent(api, chat_id, "reply", reply_to=msgs[0]["id"])
    # Each change was applied to the cached page in place: no read missed it.
    assert cache.misses == misses
    for _ in range(2):  # the first read builds the page, the second reads it as built
        page = (await api.get(path)).json["messages"]
        assert page[0]["reply_count"] == 1
        assert page[1]["reactions"] == [{"emoji": "🎉", "count": 1, "users": ["bob"]}]
        assert page[2]["pinned"] is True
        assert page[3]["reply_to"] == msgs[0]["id"]
        fresh = (await changes(api, chat_id))["messages"]
        assert sorted(page, key=lambda m: m["version"]) == fresh


# -- chat list events ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_chat_added_and_removed_reach_the_users_sockets(url, api, chat_id):
    alice = await connect(url, "alice")
    bob = await connect(url, "bob")
    carol = await connect(url, "carol")
    try:
        chat = await api.create_chat(chat_id, members=["bob"])
        added = await bob.wait_for("chat-added")
        expected = {k: v for k, v in chat.items() if k != "members"}
        assert added == {"chat": expected}
        assert await alice.wait_for("chat-added") == {"chat": expected}  # the creator's tabs too
        await api.put(f"/chats/{chat_id}/members/carol")
        assert (await carol.wait_for("chat-added"))["chat"]["id"] == chat_id
        # A role change is not a membership change.
        await api.put(f"/chats/{chat_id}/members/carol", {"role": "admin"})
        await api.delete(f"/chats/{chat_id}/members/bob")
        assert await bob.wait_for("chat-removed") == {"chat_id": chat_id}
        await api.delete(f"/chats/{chat_id}/members/carol", user="carol")  # leaving
        assert await carol.wait_for("chat-removed") == {"chat_id": chat_id}
        assert len(carol.of("chat-added")) == 1
        # Posting to a public chat joins it: chat-added too.
        pub = f"{chat_id}-p"
        await api.create_chat(pub, visibility="public")
        await sent(api, pub, "hi", user="carol")
        assert await carol.wait_for("chat-added", lambda d: d["chat"]["id"] == pub)
        assert [d["chat"]["id"] for d in bob.of("chat-added")] == [chat_id]
    finally:
        for c in (alice, bob, carol):
            await c.close()


# -- who may ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_authorisation_matrix(url, api, chat_id):
    """Every new endpoint and event x owner, admin, member, non-member of a
    private chat, non-member of a public chat, no token."""
    priv, pub = chat_id, f"{chat_id}-pub"
    for cid, vis in ((priv, "private"), (pub, "public")):
        await api.create_chat(cid, members=["mia"], visibility=vis)
        await api.put(f"/chats/{cid}/members/adam", {"role": "admin"})
    msg = {cid: await sent(api, cid, "m") for cid in (priv, pub)}

    def ops(cid):
        mid = msg[cid]["id"]
        return {
            "changes": ("GET", f"/chats/{cid}/changes?since_version=0"),
            "replies": ("GET", f"/messages/{mid}/replies"),
            "history": ("GET", f"/messages/{mid}/history"),
            "pins": ("GET", f"/chats/{cid}/pins"),
            "react": ("PUT", f"/messages/{mid}/reactions/{r('👍')}"),
            "unreact": ("DELETE", f"/messages/{mid}/reactions/{r('👍')}"),
            "pin": ("PUT", f"/chats/{cid}/pins/{mid}"),
            "unpin": ("DELETE", f"/chats/{cid}/pins/{mid}"),
        }

    readers = {"changes", "replies", "history", "pins"}
    want = {}
    for cid in (priv, pub):
        for name in ops(cid):
            want[(cid, "alice", name)] = 200
            want[(cid, "adam", name)] = 200
            want[(cid, "mia", name)] = 403 if name in ("pin", "unpin") else 200
            if cid == priv:
                code = 404
            elif name in readers:
                code = 200
            else:
                code = 403
            want[(cid, "eve", name)] = code
            want[(cid, None, name)] = 401
    got = {}
    for cid in (priv, pub):
        for name, (method, path) in ops(cid).items():
            for user in ("alice", "adam", "mia", "eve", None):
                resp = await api.request(method, path, user=user)
                got[(cid, user, name)] = resp.status
                if resp.status == 404:
                    assert resp.error_code in ("chat_not_found", "message_not_found")
    assert got == want
    # Refused calls changed nothing: 1 send, react + unreact by 3 members, and
    # one pin and one unpin (the admin's second pin / unpin change nothing).
    for cid in (priv, pub):
        assert (await api.get(f"/chats/{cid}")).json["version"] == 1 + 6 + 2
    # The react event, as a non-member of each.
    eve = await connect(url, "eve")
    try:
        ack = await eve.call("react", {"message_id": msg[priv]["id"], "emoji": "👍"})
        assert ack["error"]["code"] == "message_not_found"
        ack = await eve.call("react", {"message_id": msg[pub]["id"], "emoji": "👍"})
        assert ack["error"]["code"] == "forbidden"
        ack = await eve.call("join-chat", {"chat_id": priv, "since_version": 0})
        assert ack["error"]["code"] == "chat_not_found"
        ack = await eve.call("join-chat", {"chat_id": pub, "since_version": 0})
        assert ack["ok"] is True and [m["id"] for m in ack["changed"]] == [msg[pub]["id"]]
    finally:
        await eve.close()
    # A socket with no token never gets that far.
    with pytest.raises(Exception, match=r"unauthorized|failed to connect"):
        await SocketClient(url, user=None).connect()


@pytest.mark.gen_test(timeout=60)
async def test_hostile_paths_and_values_are_json_errors(api, chat_id):
    await api.create_chat(chat_id)
    msg = await sent(api, chat_id, "x")
    cases = [
        ("GET", f"/chats/{chat_id}/changes?since_version=1&since_version=%00"),
        ("GET", f"/chats/{'x' * 65}/changes"),
        ("GET", "/chats/a%2Fb/changes"),
        ("GET", f"/messages/{2**70}/replies"),
        ("GET", "/messages/-1/history"),
        ("GET", f"/messages/{msg['id']}/replies?after_seq=-1"),
        ("GET", f"/messages/{msg['id']}/replies?limit=201"),
        ("PUT", f"/messages/{msg['id']}/reactions/{r('👍' * 40)}"),
        ("PUT", f"/messages/{msg['id']}/reactions/%F0%9F"),
        ("PUT", f"/chats/{chat_id}/pins/abc"),
        ("DELETE", f"/chats/{chat_id}/pins/1.5"),
        ("PUT", f"/messages/{msg['id']}/reactions/{'%41' * 3000}"),
    ]
    for method, path in cases:
        resp = await api.request(method, path)
        assert 400 <= resp.status < 500, (path, resp)
        assert resp.error_code is not None, (path, resp)
    resp = await api.send(chat_id, "x", reply_to={"id": 1})
    assert (resp.status, resp.error_code) == (400, "validation_error")


@pytest.mark.gen_test(timeout=60)
async def test_changes_committed_during_the_join_are_shown_exactly_once(
    chatd, url, api, chat_id, monkeypatch
):
    """Deterministic overlap: one change commits after the socket entered the
    room but before the join's read (so it is in ``changed`` and its event is
    held: dropped), one after the read (not in ``changed``: its held event is
    released after the ack), then a late publish of a covered version."""
    await api.create_chat(chat_id, members=["bob"])
    a = await sent(api, chat_id, "a")
    b = await sent(api, chat_id, "b")
    original = chatd.domain.catch_up_versions

    async def racing(user_id, cid, since):
        await api.put(f"/messages/{a['id']}/reactions/{r('👀')}")  # v3: before the read
        state = await original(user_id, cid, since)
        await api.patch(f"/messages/{b['id']}", {"content": "b2"})  # v4: after it
        return state

    monkeypatch.setattr(chatd.domain, "catch_up_versions", racing)
    bob = await connect(url, "bob")
    try:
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_version": 2})
        assert [(m["id"], m["version"]) for m in ack["changed"]] == [(a["id"], 3)]
        assert ack["version"] == 3
        monkeypatch.setattr(chatd.domain, "catch_up_versions", original)
        await settle(bob, api, chat_id)
        updates = [(d["id"], d["version"]) for d in bob.of("message-updated")]
        assert updates == [(b["id"], 4)]  # v3 not again, v4 not lost

        def remote(message):  # another process's emit, published late
            return {
                "method": "emit", "event": "message-updated", "data": [message],
                "binary": False, "namespace": "/", "room": f"chat:{chat_id}",
                "skip_sid": None, "callback": None, "host_id": "another-process",
            }  # fmt: skip

        await chatd.sio.manager._handle_emit(remote(ack["changed"][0]))
        await settle(bob, api, chat_id)
        assert [(d["id"], d["version"]) for d in bob.of("message-updated")] == [(b["id"], 4)]
    finally:
        await bob.close()


# -- fuzzing the version 2 inputs ------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**62), 2**62)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@pytest.mark.gen_test(timeout=120)
async def test_random_version_2_socket_payloads_get_error_acks_never_internal(url, api, chat_id):
    await api.create_chat(chat_id, visibility="public")
    msg = await sent(api, chat_id, "target")
    payloads: list[tuple[str, object]] = []
    shaped = {
        "react": st.fixed_dictionaries(
            {"message_id": st.just(msg["id"]) | _json},
            optional={"emoji": st.text(max_size=12) | _json, "remove": _json},
        ),
        "join-chat": st.fixed_dictionaries(
            {"chat_id": st.just(chat_id) | _json},
            optional={"since_version": _json, "since_seq": _json},
        ),
        "send-message": st.fixed_dictionaries(
            {"chat_id": st.just(chat_id), "content": st.just("x")},
            optional={"reply_to": st.just(msg["id"]) | _json},
        ),
    }

    @hsettings(max_examples=150, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(data=st.data(), event=st.sampled_from(sorted(shaped)))
    def collect(data, event):
        payloads.append((event, data.draw(shaped[event] | _json)))

    collect()
    client = await connect(url, "alice")
    try:
        for event, payload in payloads:
            ack = await client.call(event, payload)
            assert isinstance(ack, dict) and isinstance(ack.get("ok"), bool), (event, payload)
            if not ack["ok"]:
                assert ack["error"]["code"] in (
                    "validation_error", "chat_not_found", "message_not_found", "conflict"
                ), (event, payload, ack)  # fmt: skip
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=120)
async def test_random_version_2_paths_and_queries_never_make_a_500(api, chat_id):
    await api.create_chat(chat_id, visibility="public")
    msg = await sent(api, chat_id, "target")
    seen: list[tuple[str, str]] = []
    segment = st.text(min_size=1, max_size=60) | st.sampled_from(
        [chat_id, str(msg["id"]), "0", "-1", "👍", ":ok:", "%", "..", "9" * 30]
    )
    value = st.text(max_size=20) | st.integers().map(str)

    @hsettings(max_examples=200, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(
        seg=segment,
        other=segment,
        q=st.dictionaries(
            st.sampled_from(["limit", "since_version", "after_seq"]), value, max_size=2
        ),
        route=st.integers(0, 8),
    )
    def collect(seg, other, q, route):
        s, o = quote(seg, safe=""), quote(other, safe="")
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in q.items())
        seen.append([
            ("GET", f"/chats/{s}/changes?{query}"),
            ("GET", f"/messages/{s}/replies?{query}"),
            ("GET", f"/messages/{s}/history"),
            ("PUT", f"/messages/{s}/reactions/{o}"),
            ("DELETE", f"/messages/{s}/reactions/{o}"),
            ("PUT", f"/chats/{s}/pins/{o}"),
            ("DELETE", f"/chats/{s}/pins/{o}"),
            ("GET", f"/chats/{s}/pins"),
            ("PUT", f"/messages/{msg['id']}/reactions/{s}"),
        ][route])  # fmt: skip

    collect()
    for method, path in seen:
        resp = await api.request(method, path)
        assert resp.status < 500, (method, path, resp)
        if resp.status >= 400:
            assert set(resp.json) == {"error"}, (method, path, resp)


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_changes_of_one_chat_commit_together_each_with_its_own_answer(
    chatd, url, api, chat_id, monkeypatch
):
    """Group commit of changes: a burst of reactions (25 different emoji on one
    message: 20 fit, 5 are 409), edits and a pin commit in few transactions,
    and each caller gets its own answer; versions stay one per change, and
    the room sees them in order."""
    storage = chatd.domain.storage
    together = []
    real = storage.apply_together

    async def counting(cid, changes):
        together.append(len(changes))
        return await real(cid, changes)

    monkeypatch.setattr(storage, "apply_together", counting)
    users = [f"u{i:02d}" for i in range(25)]
    await api.create_chat(chat_id, members=users)
    target = await sent(api, chat_id, "target")
    own = await sent(api, chat_id, "mine", user="u00")
    bob = await connect(url, "u01")
    try:
        assert (await bob.call("join-chat", chat_id))["ok"]
        codes = [f":c{i:02d}:" for i in range(25)]
        calls = [
            api.put(f"/messages/{target['id']}/reactions/{r(code)}", user=u)
            for code, u in zip(codes, users, strict=True)
        ]
        calls.append(api.patch(f"/messages/{own['id']}", {"content": "edited"}, user="u00"))
        calls.append(api.put(f"/chats/{chat_id}/pins/{own['id']}"))
        results = await asyncio.gather(*calls)
        statuses = [res.status for res in results]
        assert statuses[:25].count(200) == 20 and statuses[:25].count(409) == 5
        assert all(res.error_code == "conflict" for res in results[:25] if res.status == 409)
        assert statuses[25:] == [200, 200]
        assert results[25].json["content"] == "edited"
        assert results[26].json["pinned"] is True
        assert together and sum(together) >= 10  # most went in shared transactions
        final = await changes(api, chat_id)
        assert final["version"] == 2 + 20 + 2  # one version per change made
        msg = next(m for m in final["messages"] if m["id"] == target["id"])
        assert len(msg["reactions"]) == 20 and all(e["count"] == 1 for e in msg["reactions"])
        ok = [res.json for res in results[:25] if res.status == 200]
        # Each answer is the message right after its own change.
        assert sorted(len(m["reactions"]) for m in ok) == list(range(1, 21))
        await settle(bob, api, chat_id)
        versions = [d["version"] for d in bob.of("message-updated")]
        assert versions == list(range(3, 25))
    finally:
        await bob.close()
