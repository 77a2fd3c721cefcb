"""chatd.autopipe: script calls made in one loop iteration share a pipeline,
and each caller still gets exactly its own reply or its own error (real Redis)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from chatd import autopipe, cache, coalesce, redishealth

from . import conftest
from .helpers import LoopTurns

# Echoes its key and argument; fails (a script error) when the argument is "boom".
ECHO = """
if ARGV[1] == 'boom' then return redis.error_reply('boom') end
return KEYS[1] .. ':' .. ARGV[1]
"""


@pytest.fixture
def client(redis_prefix):
    return aioredis.Redis.from_url(conftest.REDIS_URL, socket_timeout=2)


@pytest.mark.gen_test(timeout=30)
async def test_calls_of_one_iteration_share_a_pipeline_and_get_their_own_replies(client):
    script = client.register_script(ECHO)
    batcher = autopipe.Batcher(client)
    n = 50
    replies = await asyncio.gather(*(batcher.run(script, [f"k{i}"], [i]) for i in range(n)))
    assert replies == [f"k{i}:{i}".encode() for i in range(n)]
    assert batcher.batches == 1
    # A lone call goes on its own, no pipeline.
    assert await batcher.run(script, ["solo"], ["x"]) == b"solo:x"
    assert batcher.batches == 1
    await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_more_calls_than_a_batch_holds_are_all_answered(client):
    script = client.register_script(ECHO)
    batcher = autopipe.Batcher(client)
    n = coalesce.MAX_BATCH * 2 + 5
    replies = await asyncio.gather(*(batcher.run(script, ["k"], [i]) for i in range(n)))
    assert replies == [f"k:{i}".encode() for i in range(n)]
    assert batcher.batches >= 2
    await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_an_error_reaches_only_its_own_caller(client):
    script = client.register_script(ECHO)
    batcher = autopipe.Batcher(client)
    args = ["a", "boom", "c", "boom"]
    results = await asyncio.gather(
        *(batcher.run(script, ["k"], [a]) for a in args), return_exceptions=True
    )
    assert results[0] == b"k:a" and results[2] == b"k:c"
    for failed in (results[1], results[3]):
        assert isinstance(failed, ResponseError) and "boom" in str(failed)
    await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_scripts_redis_forgot_are_loaded_again(client):
    script = client.register_script(ECHO)
    batcher = autopipe.Batcher(client)
    await client.script_flush()
    replies = await asyncio.gather(*(batcher.run(script, ["k"], [i]) for i in range(5)))
    assert replies == [f"k:{i}".encode() for i in range(5)]
    await client.script_flush()
    assert await batcher.run(script, ["k"], ["solo"]) == b"k:solo"
    await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_fails_every_call_of_the_batch_without_hanging():
    down = aioredis.Redis.from_url(
        "redis://127.0.0.1:1/0", socket_timeout=1, socket_connect_timeout=1
    )
    script = down.register_script(ECHO)
    batcher = autopipe.Batcher(down)
    results = await asyncio.gather(
        *(batcher.run(script, ["k"], [i]) for i in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, (RedisError, OSError)) for r in results), results
    await redishealth.of(down).close()  # its probe, started by the failure
    await down.aclose()


@pytest.mark.parametrize("when", ["gathering", "sending"])
@pytest.mark.gen_test(timeout=30)
async def test_a_cancelled_first_caller_affects_no_other_caller(client, when):
    script = client.register_script(ECHO)
    batcher = autopipe.Batcher(client)

    async def cancel_first() -> None:
        if when == "sending":
            await asyncio.sleep(0)  # the batch has left: its round trip is under way
        first.cancel()

    # All start in one iteration: the first call opens the batch, the next
    # three join it, then the first is cancelled (before or after it sends).
    first = asyncio.ensure_future(batcher.run(script, ["k"], ["first"]))
    others = [asyncio.ensure_future(batcher.run(script, ["k"], [i])) for i in range(3)]
    await asyncio.ensure_future(cancel_first())
    results = await asyncio.gather(*others, return_exceptions=True)
    assert first.cancelled()
    assert results == [b"k:0", b"k:1", b"k:2"]  # each its own reply, as if alone
    assert await batcher.run(script, ["k"], ["after"]) == b"k:after"
    await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_burst_beyond_the_pool_waits_for_connections_instead_of_failing():
    from chatd import cache

    client = cache.connect(conftest.REDIS_URL, 2.0)
    n = cache.MAX_CONNECTIONS * 4
    replies = await asyncio.gather(*(client.ping() for _ in range(n)))
    assert replies == [True] * n
    await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_call_cancelled_before_its_batch_leaves_is_not_sent(client, redis_prefix):
    # Each call adds its argument to a set: what Redis holds is what was sent.
    script = client.register_script("return redis.call('SADD', KEYS[1], ARGV[1])")
    batcher = autopipe.Batcher(client)
    key = f"{redis_prefix}:sent"
    calls = {a: asyncio.ensure_future(batcher.run(script, [key], [a])) for a in "abcd"}
    await asyncio.sleep(0)  # all four have joined this iteration's batch
    calls["b"].cancel()
    calls["d"].cancel()
    assert await asyncio.gather(calls["a"], calls["c"]) == [1, 1]
    assert calls["b"].cancelled() and calls["d"].cancelled()
    assert sorted(await client.smembers(key)) == [b"a", b"c"]
    # A future submitted and then given up on is neither sent nor logged.
    pending = batcher.submit((script, [key], ["e"]))
    batcher.discard(pending)
    assert await batcher.run(script, [key], ["f"]) == 1
    assert sorted(await client.smembers(key)) == [b"a", b"c", b"f"]
    await client.delete(key)
    await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_call_whose_callers_all_gave_up_is_stopped_and_frees_its_connection():
    # A server that accepts and never answers (Redis behind a partition).
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        closed.set()  # the client hung up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(port=port, socket_timeout=20)
    script = client.register_script(ECHO)
    batcher = autopipe.Batcher(client)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batcher.run(script, ["k"], ["lost"]), 0.3)
    # Gone long before the 20 s socket timeout: the round trip was cancelled
    # (redis-py then drops the connection) instead of running on unwatched.
    await asyncio.wait_for(closed.wait(), 10)
    server.close()
    await client.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_a_call_costs_its_caller_four_loop_turns_its_round_trip_included():
    """A lone call on chatd's client: the batch's task sends it (turn 1),
    the reply is read (2), the task answers (3), the caller goes on (4).
    Each turn is a wait behind the rest of a busy loop (a disconnect storm:
    ~1-3 ms each). Before: 8, redis-py's write timeout (asyncio.wait_for, a
    task of its own) and the coalescer's own scheduling and answering taking
    two each; the Batcher bounds each round trip already."""
    client = cache.connect(conftest.REDIS_URL, 2.0)
    batch = autopipe.batcher(client)
    try:
        assert await batch.run(None, (), ("PING",))  # connected
        for _ in range(3):
            with LoopTurns() as turns:
                assert await batch.run(None, (), ("PING",))
            assert turns.n <= 5, turns.n  # 4, and a spare for a stray timer
    finally:
        await cache.disconnect(client)
