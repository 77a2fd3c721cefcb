"""Socket.IO (API.md, "Socket.IO"): join-chat in both forms with since_seq
recovery, leave-chat, send-message in both forms, disconnect, and the
new-message / message-updated / message-deleted events with exact payloads."""

from __future__ import annotations

import asyncio

import psycopg2
import pytest

from .helpers import SocketClient

MESSAGE_KEYS = [
    "id", "chat_id", "seq", "sender_id", "content", "client_id", "created_at", "edited_at",
    # API.md version 2 adds these (additions only; "deleted" stays last).
    "version", "reply_to", "reply_count", "mentions", "reactions", "pinned",
    "deleted",
]  # fmt: skip


@pytest.fixture
def url(chatd) -> str:
    return f"http://127.0.0.1:{chatd.port}"


async def connect(url: str, user: str) -> SocketClient:
    return await SocketClient(url, user=user).connect()


async def settle(client: SocketClient, api, chat_id: str) -> None:
    """Wait until every event emitted so far to ``chat_id`` has reached ``client``:
    a marker message through the same room arrives after all of them."""
    marker = (await api.send(chat_id, "~marker~")).json
    await client.wait_for("new-message", lambda d: d["id"] == marker["id"])


@pytest.mark.gen_test(timeout=60)
async def test_join_chat_both_forms_ack_last_seq_and_no_missed(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    await api.send(chat_id, "one")
    await api.send(chat_id, "two")
    bob = await connect(url, "bob")
    try:
        expected = {"ok": True, "chat_id": chat_id, "last_seq": 2, "missed": [], "has_more": False}
        assert await bob.call("join-chat", chat_id) == expected
        assert await bob.call("join-chat", {"chat_id": chat_id}) == expected
        assert await bob.call("join-chat", {"chat_id": chat_id, "since_seq": None}) == expected
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_join_chat_with_since_seq_returns_exactly_the_missed_messages(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    sent = [(await api.send(chat_id, f"m{i}")).json for i in range(5)]
    await api.delete(f"/messages/{sent[3]['id']}")
    bob = await connect(url, "bob")
    try:
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 2})
        assert ack["ok"] is True and ack["chat_id"] == chat_id
        assert ack["last_seq"] == 5 and ack["has_more"] is False
        assert ack["missed"] == [
            sent[2],
            {**sent[3], "content": None, "deleted": True, "version": 6},
            sent[4],
        ]
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 5})
        assert (ack["missed"], ack["last_seq"], ack["has_more"]) == ([], 5, False)
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 99})
        assert (ack["missed"], ack["last_seq"], ack["has_more"]) == ([], 5, False)
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 0})
        assert [m["seq"] for m in ack["missed"]] == [1, 2, 3, 4, 5]
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_reconnect_with_since_seq_recovers_what_was_sent_while_away(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    bob = await connect(url, "bob")
    assert (await bob.call("join-chat", chat_id))["ok"]
    first = (await api.send(chat_id, "seen")).json
    await bob.wait_for("new-message", lambda d: d["id"] == first["id"])
    seen = max(m["seq"] for m in bob.of("new-message"))
    await bob.close()

    away = [(await api.send(chat_id, f"away {i}", user=u)).json for i, u in
            enumerate(["alice", "bob", "alice", "alice"])]  # fmt: skip
    await api.delete(f"/messages/{away[2]['id']}")
    edited = (await api.patch(f"/messages/{away[0]['id']}", {"content": "away 0 (edited)"})).json

    bob = await connect(url, "bob")
    try:
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": seen})
        assert ack["ok"] is True
        assert ack["last_seq"] == 5 and ack["has_more"] is False
        assert ack["missed"] == [
            edited,
            away[1],
            {**away[2], "content": None, "deleted": True, "version": 6},
            away[3],
        ]
        # And from here on events flow again.
        later = (await api.send(chat_id, "later")).json
        assert await bob.wait_for("new-message", lambda d: d["id"] == later["id"]) == later
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_more_than_500_missed_sets_has_more_and_pages_on_with_after_seq(
    url, api, chat_id, database_url
):
    await api.create_chat(chat_id, members=["bob"])
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            # A fresh chat filled straight in SQL, last_seq and version kept in step.
            cur.execute(
                """INSERT INTO messages (chat_id, seq, sender_id, content, deleted)
                   SELECT %s, g, 'alice', CASE WHEN g %% 100 = 0 THEN NULL ELSE 'm' || g END,
                          g %% 100 = 0
                     FROM generate_series(1, 520) g;
                   UPDATE chats SET last_seq = 520, version = version + 1 WHERE id = %s""",
                (chat_id, chat_id),
            )
    finally:
        conn.close()
    bob = await connect(url, "bob")
    try:
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 0})
        assert ack["ok"] is True and ack["last_seq"] == 520 and ack["has_more"] is True
        assert [m["seq"] for m in ack["missed"]] == list(range(1, 501))
        assert ack["missed"][99]["deleted"] is True and ack["missed"][99]["content"] is None
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 19})
        assert [m["seq"] for m in ack["missed"]] == list(range(20, 520))
        assert ack["has_more"] is True
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 20})
        assert [m["seq"] for m in ack["missed"]] == list(range(21, 521))
        assert ack["has_more"] is False
        rest = (await api.get(f"/chats/{chat_id}/messages?after_seq=500&include_deleted=true",
                              user="bob")).json  # fmt: skip
        assert [m["seq"] for m in rest["messages"]] == list(range(501, 521))
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_join_while_messages_are_being_sent_leaves_no_hole(url, api, chat_id):
    users = [f"w{i}" for i in range(4)]
    await api.create_chat(chat_id, members=["bob", *users])
    bob = await connect(url, "bob")
    try:

        async def sender(u: str):
            for i in range(8):
                assert (await api.send(chat_id, f"{u}-{i}", user=u)).status == 201

        senders = [asyncio.ensure_future(sender(u)) for u in users]
        await asyncio.sleep(0.05)
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 0})
        await asyncio.gather(*senders)
        await settle(bob, api, chat_id)
        got = {m["seq"] for m in ack["missed"]} | {m["seq"] for m in bob.of("new-message")}
        assert got == set(range(1, 34))
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_new_message_reaches_every_socket_in_the_room_once_senders_too(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    alice = await connect(url, "alice")
    bob1 = await connect(url, "bob")
    bob2 = await connect(url, "bob")
    outsider = await connect(url, "carol")
    clients = [alice, bob1, bob2]
    try:
        for c in clients:
            assert (await c.call("join-chat", chat_id))["ok"]
        ack = await alice.call(
            "send-message", {"chat_id": chat_id, "content": " via socket ", "client_id": "s1"}
        )
        assert ack["ok"] is True
        msg = ack["message"]
        assert list(msg) == MESSAGE_KEYS
        assert (msg["content"], msg["sender_id"], msg["client_id"], msg["seq"]) == (
            "via socket", "alice", "s1", 1
        )  # fmt: skip
        # A retry with the same client_id acks the original and emits nothing new.
        retry = await alice.call(
            "send-message", {"chat_id": chat_id, "content": "again", "client_id": "s1"}
        )
        assert retry == {"ok": True, "message": msg}
        marker = (await api.send(chat_id, "~marker~")).json
        for c in clients:
            await c.wait_for("new-message", lambda d: d["id"] == marker["id"])
            assert c.of("new-message")[0] == msg
            assert [m["seq"] for m in c.of("new-message")] == [1, 2]
        assert outsider.of("new-message") == []
    finally:
        for c in [*clients, outsider]:
            await c.close()


@pytest.mark.gen_test(timeout=60)
async def test_rest_send_edit_delete_emit_exact_payloads(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    bob = await connect(url, "bob")
    try:
        assert (await bob.call("join-chat", {"chat_id": chat_id}))["ok"]
        sent = (await api.send(chat_id, "hello", client_id="r1")).json
        assert await bob.wait_for("new-message") == sent
        edited = (await api.patch(f"/messages/{sent['id']}", {"content": "hello!"})).json
        assert await bob.wait_for("message-updated") == edited
        assert edited["content"] == "hello!" and edited["edited_at"] is not None
        assert (await api.delete(f"/messages/{sent['id']}")).status == 204
        deleted = await bob.wait_for("message-deleted")
        # Version 2 adds the tombstone's version (the change after the edit).
        assert deleted == {"id": sent["id"], "chat_id": chat_id, "seq": sent["seq"],
                           "version": edited["version"] + 1}  # fmt: skip
        # Deleting again is 204 and emits nothing more.
        assert (await api.delete(f"/message/?id={sent['id']}")).status == 204
        await settle(bob, api, chat_id)
        assert len(bob.of("message-deleted")) == 1
        assert len(bob.of("message-updated")) == 1
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_leave_chat_stops_the_events_of_that_chat(url, api, chat_id):
    other = chat_id + "-2"
    await api.create_chat(chat_id, members=["bob"])
    await api.create_chat(other, members=["bob"])
    bob = await connect(url, "bob")
    try:
        assert (await bob.call("join-chat", chat_id))["ok"]
        assert (await bob.call("join-chat", other))["ok"]
        assert await bob.call("leave-chat", chat_id) == {"ok": True, "chat_id": chat_id}
        assert await bob.call("leave-chat", {"chat_id": other}) == {"ok": True, "chat_id": other}
        assert (await bob.call("join-chat", other))["ok"]
        await api.send(chat_id, "not for bob")
        await settle(bob, api, other)
        assert [m["chat_id"] for m in bob.of("new-message")] == [other]
        # Leaving a room one is not in is fine.
        assert (await bob.call("leave-chat", chat_id))["ok"] is True
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_send_message_string_form_re_emits_the_latest_message(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    alice = await connect(url, "alice")
    bob = await connect(url, "bob")
    try:
        assert (await bob.call("join-chat", chat_id))["ok"]
        assert await alice.call("send-message", chat_id) == {"ok": True, "message": None}
        await api.send(chat_id, "older")
        latest = (await api.send(chat_id, "latest", user="bob")).json
        await bob.wait_for("new-message", lambda d: d["id"] == latest["id"])
        ack = await alice.call("send-message", chat_id)
        assert ack == {"ok": True, "message": latest}

        def twice(_d) -> bool:
            return sum(e["id"] == latest["id"] for e in bob.of("new-message")) == 2

        await bob.wait_for("new-message", twice)
        assert [m["content"] for m in bob.of("new-message")] == ["older", "latest", "latest"]
        # No new message was created.
        assert (await api.get(f"/chats/{chat_id}")).json["last_seq"] == 2
    finally:
        await alice.close()
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_disconnect_is_clean_and_others_keep_receiving(chatd, url, api, chat_id):
    await api.create_chat(chat_id, members=["bob", "carol"])
    bob = await connect(url, "bob")
    carol = await connect(url, "carol")
    try:
        for c in (bob, carol):
            assert (await c.call("join-chat", chat_id))["ok"]
        sid = bob.sio.get_sid()
        assert chatd.sio.manager.is_connected(sid, "/")
        await bob.close()

        def in_room() -> list[str]:
            return [p[0] for p in chatd.sio.manager.get_participants("/", f"chat:{chat_id}")]

        # python-socketio marks the socket disconnected, runs chatd's
        # disconnect handler (presence, in Redis), then empties its rooms.
        for _ in range(250):
            if sid not in in_room():
                break
            await asyncio.sleep(0.02)
        assert not chatd.sio.manager.is_connected(sid, "/")
        assert sid not in in_room() and carol.sio.get_sid() in in_room()
        msg = (await api.send(chat_id, "after bob left")).json
        assert await carol.wait_for("new-message") == msg
        assert bob.of("new-message") == []
    finally:
        await carol.close()


@pytest.mark.gen_test(timeout=60)
async def test_websocket_client_sees_new_message_with_full_payload_after_rest_send(
    url, api, chat_id
):
    await api.create_chat(chat_id, visibility="public")
    eve = await connect(url, "eve")  # a reader of a public chat, not a member
    try:
        assert eve.sio.transport() == "websocket"
        assert (await eve.call("join-chat", chat_id))["ok"]
        sent = (await api.send(chat_id, "to the public", client_id="pub-1")).json
        event = await eve.wait_for("new-message")
        assert list(event) == MESSAGE_KEYS
        assert event == sent
        assert event["client_id"] == "pub-1" and event["deleted"] is False
    finally:
        await eve.close()


@pytest.mark.gen_test(timeout=60)
async def test_read_marker_moving_forward_emits_read_to_the_room(url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    for i in range(3):
        await api.send(chat_id, f"m{i}")
    alice = await connect(url, "alice")
    try:
        assert (await alice.call("join-chat", chat_id))["ok"]
        assert (await api.post(f"/chats/{chat_id}/read", {"seq": 2}, user="bob")).status == 204
        event = await alice.wait_for("read")
        assert event == {"chat_id": chat_id, "user_id": "bob", "seq": 2}
        # Not forward: no event. Clamped: the event carries the clamped seq.
        assert (await api.post(f"/chats/{chat_id}/read", {"seq": 1}, user="bob")).status == 204
        assert (await api.post(f"/chats/{chat_id}/read", {"seq": 50}, user="bob")).status == 204
        event = await alice.wait_for("read", lambda d: d["seq"] != 2)
        assert event == {"chat_id": chat_id, "user_id": "bob", "seq": 3}
        await settle(alice, api, chat_id)
        assert [e["seq"] for e in alice.of("read")] == [2, 3]
    finally:
        await alice.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_socket_may_join_at_most_200_chats(url, api, chat_id, database_url):
    ids = [f"{chat_id}-{i}" for i in range(201)]
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                """INSERT INTO chats (id, title, visibility, created_by)
                   SELECT unnest(%s::text[]), 'room', 'public', 'alice'""",
                (ids,),
            )
    finally:
        conn.close()
    bob = await connect(url, "bob")
    try:
        for cid in ids[:200]:
            assert (await bob.call("join-chat", cid))["ok"] is True
        ack = await bob.call("join-chat", ids[200])
        assert ack["ok"] is False and ack["error"]["code"] == "validation_error"
        assert (await bob.call("join-chat", ids[0]))["ok"] is True  # already in: fine
        assert (await bob.call("leave-chat", ids[0]))["ok"] is True
        assert (await bob.call("join-chat", ids[200]))["ok"] is True
    finally:
        await bob.close()
