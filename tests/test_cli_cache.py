"""chatctl cache purge: removes only this deployment's page-cache keys, and
chatd keeps serving correctly afterwards."""

import asyncio

import pytest

from .clitools import chatctl_fixture  # noqa: F401


def _keys(redis_client, pattern: str) -> set[bytes]:
    return set(redis_client.scan_iter(match=pattern, count=1000))


async def _warm(api, chat_id: str, n: int) -> list[dict]:
    await api.create_chat(chat_id, members=["bob"])
    for i in range(n):
        assert (await api.send(chat_id, f"m{i}")).status == 201
    page = await api.get(f"/chats/{chat_id}/messages")
    return page.json["messages"]


@pytest.mark.gen_test(timeout=60)
async def test_purge_removes_only_chatd_cache_keys_and_chatd_keeps_serving(
    chatctl, api, chat_id, redis_client, redis_prefix
):
    other_chat = chat_id + "-other"
    before = await _warm(api, chat_id, 3)
    await _warm(api, other_chat, 2)
    await asyncio.sleep(0.2)  # the cache fill runs in the background
    for chat in (chat_id, other_chat):  # read from the cache: the page is built and kept
        assert (await api.get(f"/chats/{chat}/messages")).status == 200
    mine = _keys(redis_client, f"{redis_prefix}:{{chat:{chat_id}}}:*")
    assert len(mine) == 3, mine  # meta, rows and pages

    foreign = [
        f"other-app:{{chat:{chat_id}}}:meta",  # another application's key
        f"{redis_prefix}-staging:{{chat:{chat_id}}}:rows",  # a longer prefix
        f"{redis_prefix}:{{chat:{chat_id}}}:presence",  # not the page cache
    ]
    for key in foreign:
        redis_client.set(key, "keep me", ex=300)
    try:
        one = await asyncio.to_thread(chatctl, "cache", "purge", "--chat", chat_id)
        assert one.exit_code == 0, one.output
        assert "removed 3 cache key(s)" in one.stdout
        assert not mine & _keys(redis_client, f"{redis_prefix}:{{chat:{chat_id}}}:*")
        assert len(_keys(redis_client, f"{redis_prefix}:{{chat:{other_chat}}}:*")) == 3

        everything = await asyncio.to_thread(chatctl, "cache", "purge")
        assert everything.exit_code == 0, everything.output
        assert "removed" in everything.stdout
        assert int(everything.stdout.split()[1]) >= 3  # other tests' chats count too
        assert not _keys(redis_client, f"{redis_prefix}:{{chat:{other_chat}}}:*")
        for key in foreign:
            assert redis_client.get(key) == b"keep me", key
    finally:
        redis_client.delete(*foreign)

    # chatd carries on: the same history, then new sends on top of a refilled cache.
    assert (await api.get(f"/chats/{chat_id}/messages")).json["messages"] == before
    sent = (await api.send(chat_id, "after purge")).json
    page = (await api.get(f"/chats/{chat_id}/messages")).json["messages"]
    assert page == [*before, sent]
    assert (await asyncio.to_thread(chatctl, "cache", "purge", "--chat", "a b")).exit_code == 2


def test_purge_without_redis_is_a_usage_error(chatctl):
    result = chatctl("cache", "purge", REDIS_URL=None)
    assert result.exit_code == 2
    assert "no Redis configured" in result.stderr


def test_purge_with_redis_down_fails_with_one_line(chatctl):
    result = chatctl("cache", "purge", REDIS_URL="redis://127.0.0.1:1/0", REDIS_TIMEOUT="0.5")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Redis is unavailable")
