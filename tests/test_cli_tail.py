"""chatctl tail against two real chatd processes: it sees what every process
emits, filters by chat, stops quietly on Ctrl-C, and --since-seq joins history
and live events with no gap and no duplicate while messages keep arriving."""

import asyncio
import signal
import time

import orjson
import pytest

from .clitools import chatctl_fixture  # noqa: F401
from .helpers import Api


async def until(predicate, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def started(tail) -> None:
    await until(lambda: any("following" in line for line in tail.err) or tail.proc.poll()
                is not None, what="tail to subscribe")  # fmt: skip
    assert tail.proc.poll() is None, tail.err


def _events(tail) -> list[dict]:
    return [orjson.loads(line) for line in list(tail.out)]


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_tail_prints_sends_edits_and_deletes_from_every_chatd_process(
    chatctl, spawn, chat_id
):
    one, two = spawn(), spawn()
    api1, api2 = Api(one.url), Api(two.url)
    other = chat_id + "-x"
    await api1.create_chat(chat_id, members=["bob"])
    await api2.create_chat(other, members=["bob"])
    as_json = chatctl.spawn("tail", "--chat", chat_id, "--format", "json")
    as_text = chatctl.spawn("tail", "--chat", chat_id)
    try:
        await started(as_json)
        await started(as_text)
        m1 = (await api1.send(chat_id, "hello from one")).json
        m2 = (await api2.send(chat_id, "hello from two", user="bob")).json
        assert (await api2.send(other, "not watched")).status == 201
        edited = (await api2.patch(f"/messages/{m1['id']}", {"content": "edited"})).json
        assert (await api1.delete(f"/messages/{m2['id']}", user="bob")).status == 204

        await until(lambda: len(as_json.out) >= 4, what="4 events")
        await until(lambda: len(as_text.out) >= 4, what="4 text lines")
        await asyncio.sleep(0.3)  # anything else (the other chat) would show by now
        assert _events(as_json) == [
            {"event": "new-message", "data": m1},
            {"event": "new-message", "data": m2},
            {"event": "message-updated", "data": edited},
            {"event": "message-deleted", "data": {"id": m2["id"], "chat_id": chat_id,
                                                  "seq": 2, "version": 4}},
        ]  # fmt: skip
        assert as_text.out[0] == f"{m1['created_at']} [{chat_id}] #1 alice: hello from one"
        assert as_text.out[2].endswith("#1 alice (edited): edited")
        assert as_text.out[3] == f"[{chat_id}] #2 deleted (id {m2['id']})"
    finally:
        codes = [as_json.finish(signal.SIGINT), as_text.finish(signal.SIGINT)]
    assert codes == [0, 0]
    for tail in (as_json, as_text):
        assert [line for line in tail.err if "following" not in line] == [], tail.err


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_tail_prints_every_message_of_a_group_committed_burst(chatctl, spawn, chat_id):
    # Concurrent sends to one chat are committed and published in batches
    # (one chatd:batch publication each): tail prints every message once, in seq order.
    one = spawn()
    api = Api(one.url)
    await api.create_chat(chat_id)
    tail = chatctl.spawn("tail", "--chat", chat_id, "--format", "json")
    try:
        await started(tail)
        n = 60
        replies = await asyncio.gather(*(api.send(chat_id, f"m{i}") for i in range(n)))
        assert {r.status for r in replies} == {201}
        await until(lambda: len(tail.out) >= n, what=f"{n} events")
        await asyncio.sleep(0.3)  # a duplicate would show by now
        seqs = [e["data"]["seq"] for e in _events(tail)]
        assert seqs == list(range(1, n + 1))
    finally:
        assert tail.finish(signal.SIGINT) == 0


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_tail_since_seq_has_no_gap_or_duplicate_while_messages_keep_arriving(
    chatctl, spawn, chat_id
):
    one, two = spawn(), spawn()
    apis = [Api(one.url), Api(two.url)]
    await apis[0].create_chat(chat_id, members=["bob"])
    for i in range(20):
        assert (await apis[i % 2].send(chat_id, f"early {i}")).status == 201

    stop = asyncio.Event()

    async def keep_sending(api: Api, user: str) -> int:
        n = 0
        while not stop.is_set():
            assert (await api.send(chat_id, f"{user} live {n}", user=user)).status == 201
            n += 1
        return n

    # Two senders, one per process, so events also arrive out of seq order.
    senders = [asyncio.ensure_future(keep_sending(apis[0], "alice")),
               asyncio.ensure_future(keep_sending(apis[1], "bob"))]  # fmt: skip
    tail = chatctl.spawn("tail", "--chat", chat_id, "--since-seq", "5", "--format", "json")
    try:
        await started(tail)
        await asyncio.sleep(1.0)  # keep sending after the seam too
        stop.set()
        live_sent = sum(await asyncio.gather(*senders))
        last_seq = (await apis[0].get(f"/chats/{chat_id}")).json["last_seq"]
        assert last_seq == 20 + live_sent

        def seqs() -> list[int]:
            return [e["data"]["seq"] for e in _events(tail)
                    if e["event"] in ("history", "new-message")]  # fmt: skip

        await until(lambda: last_seq in seqs(), what=f"seq {last_seq}")
        await asyncio.sleep(0.5)  # a duplicate would arrive by now
    finally:
        stop.set()
        code = tail.finish(signal.SIGINT)
    assert code == 0, tail.err
    printed = seqs()
    assert sorted(printed) == list(range(6, last_seq + 1)), printed  # no gap, no duplicate
    kinds = [e["event"] for e in _events(tail)]
    history = [e["data"]["seq"] for e in _events(tail) if e["event"] == "history"]
    assert history == list(range(6, len(history) + 6))  # history first, ascending
    assert kinds[: len(history)] == ["history"] * len(history)
    assert "new-message" in kinds  # the seam was crossed while sends went on


def test_tail_needs_redis_and_since_seq_needs_a_chat(chatctl):
    assert chatctl("tail", "--since-seq", "3").exit_code == 2
    result = chatctl("tail", REDIS_URL=None)
    assert result.exit_code == 2
    assert "no Redis configured" in result.stderr
    # No channel carries every chat (chatd.relay): which chats must be said.
    every = chatctl("tail")
    assert every.exit_code == 2
    assert "--chat" in every.stderr
    missing = chatctl("tail", "--chat", "no-such-chat-here", "--since-seq", "0")
    assert missing.exit_code == 1
    assert "not found" in missing.stderr


def test_seen_tells_repeats_from_out_of_order_arrivals():
    from cli.tail import Seen

    seen = Seen(5)
    assert not seen.add(5)  # printed by the history
    assert seen.add(7)  # from another process, ahead of 6
    assert seen.add(6)
    assert not seen.add(6)
    assert not seen.add(7)
    assert seen.upto == 7 and seen.above == set()


def test_decode_keeps_only_message_events_of_watched_rooms():
    from cli.tail import decode

    def packet(**kw):
        base = {"method": "emit", "event": "new-message", "data": [{"seq": 1}],
                "namespace": "/", "room": "chat:a"}  # fmt: skip
        return orjson.dumps({**base, **kw})

    assert decode(packet(), {"chat:a"}) == [("new-message", {"seq": 1})]
    assert decode(packet(), None) == [("new-message", {"seq": 1})]
    assert decode(packet(room="chat:b"), {"chat:a"}) == []
    assert decode(packet(event="typing"), None) == []
    assert decode(packet(method="enter_room"), None) == []
    assert decode(packet(room="user:bob"), None) == []
    assert decode(b"not json", None) == []
    # A group commit's batch: its emits, in order, filtered the same way.
    emits = [orjson.loads(packet(data=[{"seq": n}])) for n in (1, 2)]
    emits.insert(1, orjson.loads(packet(room="chat:b", data=[{"seq": 9}])))
    batch = orjson.dumps({"method": "chatd:batch", "messages": emits, "host_id": "h"})
    assert decode(batch, {"chat:a"}) == [("new-message", {"seq": 1}), ("new-message", {"seq": 2})]
