"""Group commit: concurrent sends to one chat share transactions, and every
rule of a single send still holds (gapless seq in commit order, idempotency,
membership, one event per message, each sender answered with its own
message)."""

import asyncio

import psycopg2
import pytest

from .helpers import SocketClient


def _rows(database_url, chat_id):
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT id, seq, sender_id, content, client_id, xmin::text::bigint"
                " FROM messages WHERE chat_id = %s ORDER BY seq",
                (chat_id,),
            )
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_sends_share_transactions_and_keep_seq_gapless(
    api, chatd, chat_id, database_url
):
    users = [f"u{i}" for i in range(8)]
    await api.create_chat(chat_id, members=users[1:], owner=users[0])
    n = 160
    replies = await asyncio.gather(
        *(api.send(chat_id, f"m{i}", user=users[i % len(users)]) for i in range(n))
    )
    assert [r.status for r in replies] == [201] * n
    # Each sender is answered with its own message.
    for i, r in enumerate(replies):
        assert r.json["content"] == f"m{i}"
        assert r.json["sender_id"] == users[i % len(users)]
    rows = _rows(database_url, chat_id)
    assert [r[1] for r in rows] == list(range(1, n + 1))
    # seq follows commit order: ids (taken at insert) grow with seq.
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    # Rows written by one transaction share xmin: fewer transactions than messages.
    assert len({r[5] for r in rows}) < n
    assert sorted(r.json["seq"] for r in replies) == list(range(1, n + 1))
    # The page cache, appended to by whole batches, matches PostgreSQL twice
    # over (the second read is served from the cache).
    for _ in range(2):
        page = (await api.get(f"/chats/{chat_id}/messages?limit=50", user="u1")).json
        assert [(m["seq"], m["content"]) for m in page["messages"]] == [
            (r[1], r[3]) for r in rows[-50:]
        ]
        assert page["has_more"] is True


@pytest.mark.gen_test(timeout=60)
async def test_repeated_client_id_in_one_burst_creates_one_message(
    api, chatd, chat_id, database_url
):
    await api.create_chat(chat_id, members=["bob"])
    # Keep the chat busy so the repeats queue up and land in one batch.
    filler = [api.send(chat_id, f"f{i}", user="bob") for i in range(20)]
    repeats = [api.send(chat_id, "same", client_id="dup-1") for _ in range(6)]
    replies = await asyncio.gather(*filler, *repeats)
    again = replies[20:]
    assert sorted(r.status for r in again) == [200] * 5 + [201]
    assert len({r.json["id"] for r in again}) == 1
    rows = _rows(database_url, chat_id)
    assert [r[4] for r in rows].count("dup-1") == 1
    assert [r[1] for r in rows] == list(range(1, 22))


@pytest.mark.gen_test(timeout=60)
async def test_non_member_in_a_batch_is_refused_and_others_are_not(
    api, chatd, chat_id, database_url
):
    await api.create_chat(chat_id, members=["bob"])
    sends = []
    for i in range(30):
        sends.append(api.send(chat_id, f"ok{i}", user="bob"))
        if i % 5 == 0:
            sends.append(api.send(chat_id, "intruder", user="mallory"))
    replies = await asyncio.gather(*sends)
    refused = [r for r in replies if r.status == 404]
    assert len(refused) == 6
    assert all(r.error_code == "chat_not_found" for r in refused)
    rows = _rows(database_url, chat_id)
    assert [r[1] for r in rows] == list(range(1, 31))
    assert {r[2] for r in rows} == {"bob"}


@pytest.mark.gen_test(timeout=60)
async def test_batched_sends_reach_sockets_once_each_in_seq_order(api, chatd, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    client = await SocketClient(f"http://127.0.0.1:{chatd.port}", user="bob").connect()
    try:
        await client.call("join-chat", chat_id)
        n = 60
        await asyncio.gather(*(api.send(chat_id, f"m{i}") for i in range(n)))
        await client.wait_for("new-message", lambda m: len(client.of("new-message")) >= n)
        await asyncio.sleep(0.2)  # anything extra would have arrived by now
        seqs = [m["seq"] for m in client.of("new-message")]
        assert seqs == list(range(1, n + 1))
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=60)
async def test_public_chat_batch_makes_posters_members(api, chatd, chat_id):
    await api.create_chat(chat_id, visibility="public")
    posters = [f"p{i}" for i in range(10)]
    replies = await asyncio.gather(*(api.send(chat_id, "hi", user=p) for p in posters * 3))
    assert {r.status for r in replies} == {201}
    chat = (await api.get(f"/chats/{chat_id}")).json
    assert {m["user_id"] for m in chat["members"]} == {"alice", *posters}
    assert chat["last_seq"] == 30
