"""Group commit: concurrent sends to one chat share transactions, and every
rule of a single send still holds (gapless seq in commit order, idempotency,
membership, one event per message, each sender answered with its own
message)."""

import asyncio

import psycopg2
import pytest

from .helpers import SocketClient


def _rows_of(database_url, chat_ids):
    """(chat_id, id, seq, sender_id, content, client_id, xmin) of the chats' messages."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT chat_id, id, seq, sender_id, content, client_id, xmin::text::bigint"
                " FROM messages WHERE chat_id = ANY(%s) ORDER BY chat_id, seq",
                (list(chat_ids),),
            )
            return cur.fetchall()
    finally:
        conn.close()


def _rows(database_url, chat_id):
    """(id, seq, sender_id, content, client_id, xmin) of one chat's messages, by seq."""
    return [r[1:] for r in _rows_of(database_url, [chat_id])]


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


@pytest.mark.gen_test(timeout=60)
async def test_sends_to_many_chats_share_transactions_and_keep_every_rule(
    api, chatd, chat_id, database_url
):
    # 12 chats: private ones with bob as member, public ones nobody joined.
    private = [f"{chat_id}-p{i}" for i in range(8)]
    public = [f"{chat_id}-o{i}" for i in range(4)]
    for c in private:
        await api.create_chat(c, members=["bob"])
    for c in public:
        await api.create_chat(c, visibility="public")
    rounds = 6
    sends = []
    for r in range(rounds):
        for c in private:
            sends.append((c, "bob", f"{c}/{r}", None))
            if r == 2:
                sends.append((c, "mallory", "intruder", None))  # not a member: 404
        for c in public:
            sends.append((c, f"p{r}", f"{c}/{r}", f"cid-{r}"))  # joins the chat
    replies = await asyncio.gather(
        *(api.send(c, text, user=u, **({"client_id": cid} if cid else {}))
          for c, u, text, cid in sends)
    )  # fmt: skip
    for (c, u, text, _cid), reply in zip(sends, replies, strict=True):
        if u == "mallory":
            assert reply.status == 404 and reply.error_code == "chat_not_found"
        else:
            assert reply.status == 201, reply
            assert (reply.json["chat_id"], reply.json["sender_id"]) == (c, u)
            assert reply.json["content"] == text
    rows = _rows_of(database_url, private + public)
    for c in private + public:
        mine = [r for r in rows if r[0] == c]
        assert [r[2] for r in mine] == list(range(1, rounds + 1)), c  # gapless
        assert sorted(r[4] for r in mine) == sorted(f"{c}/{r}" for r in range(rounds))
        assert "intruder" not in {r[4] for r in mine}
    # Some transaction wrote to more than one chat.
    chats_per_xact: dict[int, set] = {}
    for r in rows:
        chats_per_xact.setdefault(r[6], set()).add(r[0])
    assert max(len(v) for v in chats_per_xact.values()) > 1
    # The posters of the public chats became members; a repeat is still a repeat.
    chat = (await api.get(f"/chats/{public[0]}")).json
    assert {m["user_id"] for m in chat["members"]} >= {f"p{r}" for r in range(rounds)}
    again = await api.send(public[0], f"{public[0]}/0", user="p0", client_id="cid-0")
    assert again.status == 200 and again.json["seq"] == replies[8].json["seq"]


@pytest.mark.gen_test(timeout=60)
async def test_a_repeat_among_sends_to_many_chats_is_answered_as_a_repeat(
    api, chatd, chat_id, database_url
):
    chats = [f"{chat_id}-{i}" for i in range(6)]
    for c in chats:
        await api.create_chat(c, members=["bob"])
    first = await api.send(chats[0], "original", user="bob", client_id="same")
    assert first.status == 201
    batches = chatd.storage.sends.batches
    for round_ in range(3):  # the repeat to chats[0] aborts a shared statement
        replies = await asyncio.gather(
            *(api.send(c, "again", user="bob", client_id="same") for c in chats)
        )
        assert replies[0].status == 200 and replies[0].json == first.json
        # The others: created in the first round, repeats of that after.
        assert {r.status for r in replies[1:]} == ({201} if round_ == 0 else {200})
    assert chatd.storage.sends.batches > batches
    rows = _rows_of(database_url, chats)
    assert [(r[0], r[2], r[4]) for r in rows if r[0] == chats[0]] == [(chats[0], 1, "original")]
    for c in chats[1:]:
        assert [(r[2], r[4]) for r in rows if r[0] == c] == [(1, "again")]
