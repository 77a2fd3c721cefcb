"""The Redis newest-page cache (chatd/cache.py): it is really used, and it is
coherent after every write, across processes, and after a lost invalidation."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from chatd import cache
from chatd.server import Chatd

from .helpers import Api
from .helpers import pg_query as pg


def keys(settings, chat_id: str) -> tuple[str, str]:
    tag = f"{settings.redis_prefix}:{{chat:{chat_id}}}"
    return f"{tag}:meta", f"{tag}:rows"


async def cached_version(redis_client, settings, chat_id: str, at_least: int = 0) -> int:
    """The version of the cached page once the (background) fill has landed."""
    meta, _ = keys(settings, chat_id)
    for _ in range(200):
        raw = await asyncio.to_thread(redis_client.hget, meta, "version")
        if raw is not None and int(raw) >= at_least:
            return int(raw)
        await asyncio.sleep(0.01)
    raise AssertionError(f"no cached page for {chat_id}")


def pg_version(database_url: str, chat_id: str) -> int:
    return pg(database_url, "SELECT version FROM chats WHERE id = %s", (chat_id,))[0][0]


async def contents(api: Api, chat_id: str, query: str = "") -> list[str | None]:
    resp = await api.get(f"/chats/{chat_id}/messages{query}")
    assert resp.status == 200, resp
    return [m["content"] for m in resp.json["messages"]]


@pytest.mark.gen_test(timeout=60)
async def test_a_read_fills_the_cache_at_the_chats_current_version(
    chatd, api, chat_id, settings, redis_client, database_url
):
    await api.create_chat(chat_id)
    for i in range(3):
        await api.send(chat_id, f"m{i}")
    meta, rows = keys(settings, chat_id)
    await asyncio.to_thread(redis_client.delete, meta, rows)
    assert await contents(api, chat_id) == ["m0", "m1", "m2"]
    version = await cached_version(redis_client, settings, chat_id)
    assert version == pg_version(database_url, chat_id)
    cached = await asyncio.to_thread(redis_client.lrange, rows, 0, -1)
    assert [orjson.loads(r)["content"] for r in cached] == ["m0", "m1", "m2"]
    assert (await asyncio.to_thread(redis_client.hget, meta, "last_seq")) == b"3"


@pytest.mark.gen_test(timeout=60)
async def test_a_page_is_served_from_redis_while_its_version_is_current(
    chatd, api, chat_id, settings, redis_client, database_url
):
    await api.create_chat(chat_id)
    sent = [(await api.send(chat_id, f"m{i}")).json for i in range(2)]
    await contents(api, chat_id)
    await cached_version(redis_client, settings, chat_id, pg_version(database_url, chat_id))
    # Doctor the cached row (version untouched): if the next answer shows it,
    # it came from Redis and not from PostgreSQL.
    _, rows = keys(settings, chat_id)
    doctored = orjson.dumps({**sent[1], "content": "from redis"})
    await asyncio.to_thread(redis_client.lset, rows, -1, doctored)
    hits = chatd.domain.cache.hits
    assert await contents(api, chat_id) == ["m0", "from redis"]
    assert chatd.domain.cache.hits == hits + 1
    # Paging away from the newest page always reads PostgreSQL.
    assert await contents(api, chat_id, "?after_seq=0") == ["m0", "m1"]


def pages_key(settings, chat_id: str) -> str:
    return f"{settings.redis_prefix}:{{chat:{chat_id}}}:pages"


@pytest.mark.gen_test(timeout=60)
async def test_a_built_page_is_stored_read_back_and_dropped_by_every_write(
    chatd, api, chat_id, settings, redis_client, database_url
):
    await api.create_chat(chat_id)
    sent = [(await api.send(chat_id, f"m{i}")).json for i in range(3)]
    await contents(api, chat_id)  # a miss: the rows are filled in the background
    await cached_version(redis_client, settings, chat_id, pg_version(database_url, chat_id))
    assert await contents(api, chat_id) == ["m0", "m1", "m2"]  # built from the rows, stored
    pages = pages_key(settings, chat_id)
    stored = await asyncio.to_thread(redis_client.hget, pages, "50:0")
    version, more, joined = stored.split(b":", 2)
    assert (int(version), more) == (pg_version(database_url, chat_id), b"0")
    assert [m["content"] for m in orjson.loads(b"[" + joined + b"]")] == ["m0", "m1", "m2"]
    assert await asyncio.to_thread(redis_client.pttl, pages) > 0  # it expires

    # Served as stored: a doctored page at the current version shows.
    doctored = orjson.dumps({**sent[2], "content": "stored"})
    await asyncio.to_thread(redis_client.hset, pages, "50:0", version + b":1:" + doctored)
    page = (await api.get(f"/chats/{chat_id}/messages")).json
    assert [m["content"] for m in page["messages"]] == ["stored"] and page["has_more"] is True
    # Not chatd's format: built again from the rows.
    await asyncio.to_thread(redis_client.hset, pages, "50:0", b"garbage")
    assert await contents(api, chat_id) == ["m0", "m1", "m2"]

    # Each write drops the chat's pages in the step that applies it to the rows.
    writes = [
        lambda: api.send(chat_id, "m3"),
        lambda: api.patch(f"/messages/{sent[0]['id']}", {"content": "m0'"}),
        lambda: api.delete(f"/messages/{sent[1]['id']}"),
    ]
    for write, expected in zip(
        writes,
        (["m0", "m1", "m2", "m3"], ["m0'", "m1", "m2", "m3"], ["m0'", "m2", "m3"]),
        strict=True,
    ):
        assert await contents(api, chat_id) != []  # a page is stored before the write
        assert await asyncio.to_thread(redis_client.exists, pages)
        await write()
        after = pg_version(database_url, chat_id)
        await cached_version(redis_client, settings, chat_id, after)
        assert not await asyncio.to_thread(redis_client.exists, pages)
        assert await contents(api, chat_id) == expected

    # A page of another version is never served, whatever it holds.
    current = pg_version(database_url, chat_id)
    old = f"{current - 1}:0:".encode() + doctored
    await asyncio.to_thread(redis_client.hset, pages, "50:0", old)
    assert await contents(api, chat_id) == ["m0'", "m2", "m3"]


@pytest.mark.gen_test(timeout=60)
async def test_a_chat_keeps_a_bounded_number_of_built_pages(
    chatd, api, chat_id, settings, redis_client, database_url
):
    await api.create_chat(chat_id)
    for i in range(12):
        await api.send(chat_id, f"m{i}")
    await contents(api, chat_id)
    await cached_version(redis_client, settings, chat_id, pg_version(database_url, chat_id))
    for limit in range(1, 13):
        for _ in range(2):  # built, then (while there is room) read back
            page = (await api.get(f"/chats/{chat_id}/messages?limit={limit}")).json
            assert [m["content"] for m in page["messages"]] == [
                f"m{i}" for i in range(12 - limit, 12)
            ]
            assert page["has_more"] is (limit < 12)
    pages = pages_key(settings, chat_id)
    assert await asyncio.to_thread(redis_client.hlen, pages) == cache.MAX_PAGES


@pytest.mark.gen_test(timeout=60)
async def test_send_edit_delete_are_never_hidden_by_the_cached_page(
    chatd, api, chat_id, settings, redis_client
):
    await api.create_chat(chat_id)
    a = (await api.send(chat_id, "a")).json
    assert await contents(api, chat_id) == ["a"]
    await cached_version(redis_client, settings, chat_id)

    b = (await api.send(chat_id, "b")).json
    assert await contents(api, chat_id) == ["a", "b"]
    await api.patch(f"/messages/{a['id']}", {"content": "a2"})
    assert await contents(api, chat_id) == ["a2", "b"]
    await api.delete(f"/messages/{b['id']}")
    assert await contents(api, chat_id) == ["a2"]
    assert await contents(api, chat_id, "?include_deleted=true") == ["a2", None]
    page = (await api.get(f"/chats/{chat_id}/messages?limit=1&include_deleted=true")).json
    assert page == {
        "messages": [{**b, "content": None, "deleted": True, "version": 4}],
        "has_more": True,
    }
    c = (await api.send(chat_id, "c")).json
    page = (await api.get(f"/chats/{chat_id}/messages?limit=2")).json
    assert [m["content"] for m in page["messages"]] == ["a2", "c"]
    assert page["has_more"] is False
    assert page["messages"][1] == c


@pytest.mark.gen_test(timeout=60)
async def test_a_second_in_process_chatd_never_serves_the_old_page(
    io_loop, chatd, api, chat_id, settings, redis_client
):
    second = Chatd(settings)
    await second.start()
    try:
        api2 = Api(f"http://127.0.0.1:{second.port}")
        await api.create_chat(chat_id)
        m = (await api.send(chat_id, "one")).json
        assert await contents(api, chat_id) == ["one"]
        assert await contents(api2, chat_id) == ["one"]
        await cached_version(redis_client, settings, chat_id)
        await api2.send(chat_id, "two")
        assert await contents(api, chat_id) == ["one", "two"]
        await api.patch(f"/messages/{m['id']}", {"content": "uno"})
        assert await contents(api2, chat_id) == ["uno", "two"]
        await api2.delete(f"/messages/{m['id']}")
        assert await contents(api, chat_id) == ["two"]
        assert await contents(api2, chat_id) == ["two"]
    finally:
        await second.stop()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_a_real_second_process_never_serves_the_old_page(spawn, api, chat_id):
    proc = spawn()
    other = Api(proc.url)
    await api.create_chat(chat_id)
    m = (await api.send(chat_id, "one")).json
    assert await contents(other, chat_id) == ["one"]  # fills the cache from the process
    assert await contents(api, chat_id) == ["one"]
    await api.send(chat_id, "two")
    assert await contents(other, chat_id) == ["one", "two"]
    await other.patch(f"/messages/{m['id']}", {"content": "uno"})
    assert await contents(api, chat_id) == ["uno", "two"]
    await api.delete(f"/messages/{m['id']}")
    assert await contents(other, chat_id) == ["two"]


@pytest.mark.gen_test(timeout=60)
async def test_a_stale_cached_page_after_a_lost_invalidation_is_not_served(
    chatd, api, chat_id, settings, redis_client, database_url
):
    await api.create_chat(chat_id)
    m = (await api.send(chat_id, "original")).json
    assert await contents(api, chat_id) == ["original"]
    before = await cached_version(redis_client, settings, chat_id)
    # A write Redis never heard of: straight in PostgreSQL, version bumped as
    # every chatd write does.
    pg(
        database_url,
        """UPDATE messages SET content = 'changed behind redis', edited_at = now() WHERE id = %s;
           UPDATE chats SET version = version + 1 WHERE id = %s""",
        (m["id"], chat_id),
    )
    meta, _ = keys(settings, chat_id)
    assert int(await asyncio.to_thread(redis_client.hget, meta, "version")) == before
    assert await contents(api, chat_id) == ["changed behind redis"]
    # ... and the cache is refilled at the new version.
    assert await cached_version(redis_client, settings, chat_id, before + 1) == before + 1
    assert await contents(api, chat_id) == ["changed behind redis"]


@pytest.mark.gen_test(timeout=60)
async def test_pages_with_many_tombstones_are_right_from_the_cache(
    chatd, api, chat_id, settings, redis_client
):
    await api.create_chat(chat_id)
    sent = [(await api.send(chat_id, f"m{i}")).json for i in range(10)]
    for m in sent[1:9]:
        await api.delete(f"/messages/{m['id']}")
    for _ in range(2):  # a miss (fill), then a hit
        page = (await api.get(f"/chats/{chat_id}/messages?limit=5")).json
        assert [m["content"] for m in page["messages"]] == ["m0", "m9"]
        assert page["has_more"] is False
        page = (await api.get(f"/chats/{chat_id}/messages?limit=1")).json
        assert [m["content"] for m in page["messages"]] == ["m9"]
        assert page["has_more"] is True
        page = (await api.get(f"/chats/{chat_id}/messages?limit=3&include_deleted=true")).json
        assert [m["seq"] for m in page["messages"]] == [8, 9, 10]
        assert page["has_more"] is True
        await cached_version(redis_client, settings, chat_id)


@pytest.mark.gen_test(timeout=60)
async def test_cached_page_is_still_access_checked(chatd, api, chat_id, settings, redis_client):
    await api.create_chat(chat_id, members=["bob"])
    await api.send(chat_id, "members only")
    assert await contents(api, chat_id) == ["members only"]
    await cached_version(redis_client, settings, chat_id)
    resp = await api.get(f"/chats/{chat_id}/messages", user="eve")
    assert resp.status == 404 and resp.error_code == "chat_not_found"
    await api.delete(f"/chats/{chat_id}/members/bob")
    resp = await api.get(f"/chats/{chat_id}/messages", user="bob")
    assert resp.status == 404 and resp.error_code == "chat_not_found"


@pytest.mark.gen_test(timeout=60)
async def test_without_redis_everything_is_served_from_postgres(io_loop, settings, chat_id):
    import dataclasses

    from .helpers import SocketClient

    daemon = Chatd(dataclasses.replace(settings, redis_url=None))
    await daemon.start()
    try:
        api = Api(f"http://127.0.0.1:{daemon.port}")
        assert (await api.get("/readyz", user=None)).status == 200
        await api.create_chat(chat_id, members=["bob"])
        bob = await SocketClient(f"http://127.0.0.1:{daemon.port}", user="bob").connect()
        try:
            assert (await bob.call("join-chat", chat_id))["ok"]
            m = (await api.send(chat_id, "no redis")).json
            assert await bob.wait_for("new-message") == m
        finally:
            await bob.close()
        assert await contents(api, chat_id) == ["no redis"]
        await api.patch(f"/messages/{m['id']}", {"content": "still none"})
        assert await contents(api, chat_id) == ["still none"]
        assert daemon.domain.cache.hits == 0
    finally:
        await daemon.stop()


@pytest.mark.gen_test(timeout=90)
async def test_concurrent_writes_and_reads_on_two_processes_end_coherent(
    io_loop, chatd, api, chat_id, settings, database_url
):
    import random

    second = Chatd(settings)
    await second.start()
    try:
        apis = [api, Api(f"http://127.0.0.1:{second.port}")]
        users = [f"s{i}" for i in range(4)]
        await api.create_chat(chat_id, members=users)
        rng = random.Random(7)
        sent: list[dict] = []

        async def writer(user: str):
            for i in range(12):
                client = rng.choice(apis)
                resp = await client.send(chat_id, f"{user}-{i}", user=user)
                assert resp.status == 201
                sent.append(resp.json)
                mine = [m for m in sent if m["sender_id"] == user]
                pick = rng.choice(mine)
                if rng.random() < 0.3:
                    await client.delete(f"/messages/{pick['id']}", user=user)
                elif rng.random() < 0.5:
                    await client.patch(f"/messages/{pick['id']}", {"content": "edited"}, user=user)

        async def reader():
            for _ in range(25):
                for client in apis:
                    q = rng.choice(["", "?include_deleted=true", "?limit=7"])
                    assert (await client.get(f"/chats/{chat_id}/messages{q}")).status == 200

        await asyncio.gather(*(writer(u) for u in users), reader(), reader())

        rows = pg(
            database_url,
            "SELECT seq, content, deleted FROM messages WHERE chat_id = %s ORDER BY seq",
            (chat_id,),
        )
        truth_all = [(s, c, d) for s, c, d in rows]
        truth_visible = [r for r in truth_all if not r[2]]
        for client in apis:
            for _ in range(2):  # a fill, then a hit
                page = (await client.get(f"/chats/{chat_id}/messages?include_deleted=true")).json
                got = [(m["seq"], m["content"], m["deleted"]) for m in page["messages"]]
                assert got == truth_all[-50:]
                page = (await client.get(f"/chats/{chat_id}/messages?limit=10")).json
                got = [(m["seq"], m["content"], m["deleted"]) for m in page["messages"]]
                assert got == truth_visible[-10:]
                assert page["has_more"] is (len(truth_visible) > 10)
    finally:
        await second.stop()


@pytest.mark.gen_test(timeout=120)
async def test_cached_newest_pages_equal_postgres_pages_whatever_is_deleted(
    chatd, api, chat_id, settings, redis_client
):
    # 130 messages (more than the cached window holds), every third and a run
    # near the end deleted: for each limit and both include_deleted values,
    # the newest page from the cache equals the same page read from
    # PostgreSQL (before_seq past the end takes the uncached path).
    await api.create_chat(chat_id)
    sent = [(await api.send(chat_id, f"m{i}")).json for i in range(130)]
    doomed = {m["id"] for m in sent[::3]} | {m["id"] for m in sent[110:125]}
    for mid in doomed:
        await api.delete(f"/messages/{mid}")
    for include in ("false", "true"):
        for limit in (1, 2, 5, 17, 50, 80, 99, 150):
            q = f"limit={limit}&include_deleted={include}"
            await api.get(f"/chats/{chat_id}/messages?{q}")  # fill
            cached = (await api.get(f"/chats/{chat_id}/messages?{q}")).json
            direct = (await api.get(f"/chats/{chat_id}/messages?{q}&before_seq=100000")).json
            assert cached == direct, (include, limit)
    await cached_version(redis_client, settings, chat_id)
