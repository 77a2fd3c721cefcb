"""Coalesced access checks (chatd.storage._AccessChecks over chatd.coalesce):
the checks of one loop iteration are one SQL statement, and each caller still
gets its own answer, whatever mix of chats and callers shares the batch."""

from __future__ import annotations

import asyncio

import pytest

from chatd.storage import Access, Storage

from .helpers import LoopTurns


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_access_checks_each_get_their_own_answer(api, chatd, chat_id):
    private, public, missing = f"{chat_id}-p", f"{chat_id}-o", f"{chat_id}-none"
    await api.create_chat(private, members=["bob"])  # alice owns, bob member
    await api.create_chat(public, visibility="public", owner="carol")
    await api.send(private, "one")
    pairs = [
        (private, "alice"), (private, "bob"), (private, "mallory"),
        (public, "carol"), (public, "mallory"), (missing, "alice"),
    ] * 5  # fmt: skip
    storage = chatd.storage
    before = storage.access_checks.batches
    got = await asyncio.gather(*(storage.access(c, u) for c, u in pairs))
    assert storage.access_checks.batches > before  # they did share statements
    for (c, u), access in zip(pairs, got, strict=True):
        alone = await storage.access_checks.one((c, u))  # the single-row query
        assert access == alone, (c, u)
    expected = {
        (private, "alice"): ("private", 1, "owner"),
        (private, "bob"): ("private", 1, "member"),
        (private, "mallory"): ("private", 1, None),
        (public, "carol"): ("public", 0, "owner"),
        (public, "mallory"): ("public", 0, None),
    }
    for (c, u), access in zip(pairs, got, strict=True):
        if c == missing:
            assert access is None
        else:
            assert isinstance(access, Access)
            assert (access.visibility, access.last_seq, access.role) == expected[(c, u)]


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_reads_by_members_and_strangers_get_200_and_404(api, chatd, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    await api.send(chat_id, "hello")
    users = ["alice", "bob", "mallory", "eve"] * 8
    replies = await asyncio.gather(*(api.get(f"/chats/{chat_id}/messages", user=u) for u in users))
    for user, reply in zip(users, replies, strict=True):
        if user in ("alice", "bob"):
            assert reply.status == 200, (user, reply)
            assert [m["content"] for m in reply.json["messages"]] == ["hello"]
        else:
            assert reply.status == 404 and reply.error_code == "chat_not_found", (user, reply)


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_searches_share_the_membership_read_and_each_see_their_own_chats(
    api, chatd, chat_id
):
    """storage._MyChats: the chats of each searcher of a loop iteration come
    from one statement, and each search still finds only its caller's chats."""
    one, two = f"{chat_id}-1", f"{chat_id}-2"
    await api.create_chat(one, members=["bob"])  # alice owns both
    await api.create_chat(two, members=["carol"])
    await api.send(one, "needle in one")
    await api.send(two, "needle in two")
    users = ["alice", "bob", "carol", "mallory"] * 4
    storage = chatd.storage
    before = storage.my_chats.batches
    pages = await asyncio.gather(*(api.get("/search?q=needle", user=u) for u in users))
    assert storage.my_chats.batches > before  # they did share statements
    expected = {
        "alice": ["needle in two", "needle in one"],
        "bob": ["needle in one"],
        "carol": ["needle in two"],
        "mallory": [],
    }
    for user, page in zip(users, pages, strict=True):
        assert page.status == 200, page
        found = [m["content"] for m in page.json["messages"] if m["chat_id"] in (one, two)]
        assert found == expected[user], (user, found)
    mine = await storage.my_chats.many(["bob", "nobody", "alice"])
    assert [sorted(c for c in chats if c.startswith(chat_id)) for chats in mine] == [
        [one],
        [],
        [one, two],
    ]


@pytest.mark.gen_test(timeout=30)
async def test_a_coalesced_query_costs_its_caller_five_loop_turns(database_url):
    """A lone access check: the batch's task sends it (turn 1), the answer is
    read (2), aiopg's wait_for lets go of it (3), the task answers (4), the
    caller goes on (5). Before: 7, the coalescer scheduling its batch and
    answering from a callback, a turn each."""
    storage = await Storage.connect(database_url, size=1)
    try:
        await storage.access("nochat", "alice")  # connected
        for _ in range(3):
            with LoopTurns() as turns:
                assert await storage.access("nochat", "alice") is None
            assert turns.n <= 6, turns.n  # 5, and a spare for a stray timer
    finally:
        await storage.close()
