"""Search, mentions and direct chats across real chatd processes sharing one
PostgreSQL database and one Redis."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from chatd.text import direct_chat_id

from .helpers import Api, SocketClient

pytestmark = pytest.mark.slow

ENV = {"RATE_LIMIT_SENDS": "100000/1s", "LOG_LEVEL": "info"}


@pytest.fixture
def three(spawn):
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda _: spawn(**ENV), range(3)))


@pytest.mark.gen_test(timeout=120)
async def test_a_mention_reaches_all_five_sockets_of_the_user_on_three_processes(three, chat_id):
    a, b, c = three
    tag = uuid.uuid4().hex[:8]
    sender, target, other = f"s{tag}", f"t{tag}", f"o{tag}"
    api = Api(a.url)
    await api.create_chat(chat_id, owner=sender, members=[target, other])
    # Five sockets on three processes; only one of them joined the chat.
    where = [a, b, b, c, c]
    socks = [await SocketClient(p.url, user=target).connect() for p in where]
    bystander = await SocketClient(c.url, user=other).connect()
    try:
        assert (await socks[1].call("join-chat", chat_id))["ok"]
        msg = (await Api(b.url).send(chat_id, f"hey @{target}", user=sender)).json
        assert msg["mentions"] == [target]
        for sock in socks:
            got = await sock.wait_for("mention")
            assert got == {"chat_id": chat_id, "message": msg}
        marker = (await Api(c.url).send(chat_id, f"@{other} marker", user=sender)).json
        await bystander.wait_for("mention", lambda d: d["message"]["id"] == marker["id"])
        await asyncio.sleep(0.3)
        assert [len(s.of("mention")) for s in socks] == [1] * 5
        assert len(bystander.of("mention")) == 1
        # The feed is the same on every process.
        for p in three:
            feed = (await Api(p.url).get("/mentions", user=target)).json
            assert [m["id"] for m in feed["messages"]] == [msg["id"]]
    finally:
        for sock in [*socks, bystander]:
            await sock.close()


@pytest.mark.gen_test(timeout=120)
async def test_both_sides_opening_a_direct_chat_on_different_processes_get_one_chat(three):
    tag = uuid.uuid4().hex[:8]
    x, y = f"x{tag}", f"y{tag}"
    calls = []
    for i in range(12):
        proc = three[i % 3]
        me, them = (x, y) if i % 2 else (y, x)
        calls.append(Api(proc.url).put(f"/direct/{them}", user=me))
    answers = await asyncio.gather(*calls)
    assert sorted(r.status for r in answers) == [200] * 11 + [201]
    assert {r.json["id"] for r in answers} == {direct_chat_id(x, y)}
    # Search on another process finds what was said in it.
    chat = direct_chat_id(x, y)
    sent = (await Api(three[0].url).send(chat, f"Niño {tag}", user=x)).json
    found = (await Api(three[2].url).get(f"/search?q=nino%20{tag}", user=y)).json
    assert [m["id"] for m in found["messages"]] == [sent["id"]]
