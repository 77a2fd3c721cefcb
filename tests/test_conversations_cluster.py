"""API.md version 2 across chatd processes: two real processes share one
PostgreSQL database and one Redis; changes made on one reach sockets on the
other with their versions, and a client catches up exactly on either."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from .helpers import Api, SocketClient

pytestmark = pytest.mark.slow

ENV = {"RATE_LIMIT_SENDS": "100000/1s", "LOG_LEVEL": "info"}


@pytest.fixture
def two(spawn):
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: spawn(**ENV), range(2)))


async def connect(proc, user: str) -> SocketClient:
    return await SocketClient(proc.url, user=user).connect()


@pytest.mark.gen_test(timeout=90)
async def test_changes_on_one_process_reach_sockets_on_the_other_in_version_order(two, chat_id):
    a, b = two
    api_a, api_b = Api(a.url), Api(b.url)
    await api_a.create_chat(chat_id, members=["bob"])
    bob = await connect(b, "bob")
    try:
        assert (await bob.call("join-chat", {"chat_id": chat_id, "since_version": 0}))["ok"]
        msg = (await api_a.send(chat_id, "hello")).json
        reply = (await api_b.send(chat_id, "re", user="bob", reply_to=msg["id"])).json
        reacted = (await api_a.put(f"/messages/{msg['id']}/reactions/{quote('👍')}")).json
        pinned = (await api_a.put(f"/chats/{chat_id}/pins/{msg['id']}")).json
        await api_a.delete(f"/messages/{reply['id']}", user="bob")
        last = await bob.wait_for("message-updated", lambda d: d["version"] == 7)
        assert last["reply_count"] == 0 and last["pinned"] is True
        assert last["reactions"] == reacted["reactions"]
        gone = await bob.wait_for("message-deleted")
        assert gone == {"id": reply["id"], "chat_id": chat_id, "seq": 2, "version": 6}
        seen = [
            d["version"]
            for e, d in bob.events
            if e in ("new-message", "message-updated", "message-deleted")
        ]
        assert sorted(seen) == [1, 2, 3, 4, 5, 6, 7] and len(seen) == 7
        assert pinned["version"] == 5
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=90)
async def test_catch_up_on_the_other_process_after_an_absence_is_exact(two, chat_id):
    a, b = two
    api_a, api_b = Api(a.url), Api(b.url)
    await api_a.create_chat(chat_id, members=["bob"])
    msgs = [(await api_a.send(chat_id, f"m{i}")).json for i in range(4)]
    bob = await connect(a, "bob")
    ack = await bob.call("join-chat", {"chat_id": chat_id, "since_version": 0})
    mark = ack["version"]
    await bob.close()
    # While bob is away: old messages edited, reacted to, deleted (on both).
    await api_b.patch(f"/messages/{msgs[0]['id']}", {"content": "m0 edited"})
    await api_a.put(f"/messages/{msgs[1]['id']}/reactions/{quote(':ok:')}", user="bob")
    await api_b.delete(f"/messages/{msgs[2]['id']}")
    bob = await connect(b, "bob")
    try:
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_version": mark})
        got = [(m["id"], m["version"]) for m in ack["changed"]]
        assert got == [(msgs[0]["id"], 5), (msgs[1]["id"], 6), (msgs[2]["id"], 7)]
        assert ack["changed"][0]["content"] == "m0 edited"
        assert ack["changed"][2]["deleted"] is True and ack["version"] == 7
        assert ack["changed"] == (await api_a.get(
            f"/chats/{chat_id}/changes?since_version={mark}", user="bob"
        )).json["messages"]  # fmt: skip
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=90)
async def test_chat_added_and_removed_reach_the_user_on_every_process(two, chat_id):
    a, b = two
    bob_a, bob_b = await connect(a, "bob"), await connect(b, "bob")
    try:
        await Api(a.url).create_chat(chat_id)
        await Api(b.url).put(f"/chats/{chat_id}/members/bob")
        for sock in (bob_a, bob_b):
            assert (await sock.wait_for("chat-added"))["chat"]["id"] == chat_id
        assert (await bob_a.call("join-chat", chat_id))["ok"]
        await Api(a.url).delete(f"/chats/{chat_id}/members/bob")
        for sock in (bob_a, bob_b):
            assert await sock.wait_for("chat-removed") == {"chat_id": chat_id}
        # And the removed member's socket left the room on its process: alice,
        # in the room on the same process, gets the next message; bob does not.
        alice = await connect(a, "alice")
        try:
            assert (await alice.call("join-chat", chat_id))["ok"]
            after = (await Api(b.url).send(chat_id, "after")).json
            await alice.wait_for("new-message", lambda d: d["id"] == after["id"])
            assert bob_a.of("new-message") == []
            ack = await bob_b.call("react", {"message_id": after["id"], "emoji": "👍"})
            assert ack["error"]["code"] == "message_not_found"
        finally:
            await alice.close()
    finally:
        await bob_a.close()
        await bob_b.close()
