"""Packet order on a socket (chatd.delivery.DirectSocket): a packet sent to an
idle websocket is written at once, anything else goes through the socket's
queue (written by a flush the queue schedules on the loop, or by engine.io's
long-polling); either way a socket gets its packets in the order they were
sent, on websocket, on long-polling and across the upgrade from one to the
other.

The client here is a minimal Engine.IO 4 / Socket.IO 5 client written for
these tests (:class:`RawClient`): it records every event and ack in the
order the bytes arrived, which python-socketio's client cannot promise (it
handles each packet in a task of its own).
"""

from __future__ import annotations

import asyncio
import random
from urllib.parse import quote

import orjson
import pytest
from engineio import packet as eio_packet
from socketio import packet as sio_packet
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

from chatd.delivery import DirectSocket

from .helpers import token


class RawClient:
    """One Socket.IO connection, by hand: ``packets`` holds ("event", name,
    data) and ("ack", event name, data) in arrival order."""

    def __init__(self, base_url: str, user: str):
        self.base = base_url
        self.user = user
        self.sid: str | None = None
        self.transport: str | None = None
        self.packets: list[tuple[str, str, object]] = []
        self.noops = 0
        self.pings = 0
        self.answer_pings = True  # False: a client that went away without a word
        self._ws = None
        self._http = AsyncHTTPClient(force_instance=True)
        self._polling = False
        self._poll_task: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self._calls: dict[int, str] = {}
        self._acks: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._changed = asyncio.Condition()
        self._connected = asyncio.Event()

    def _url(self, transport: str, scheme: str = "http") -> str:
        url = self.base.replace("http", scheme, 1) + f"/socket.io/?EIO=4&transport={transport}"
        return url + (f"&sid={quote(self.sid)}" if self.sid else "")

    # -- transports -------------------------------------------------------------

    async def connect(self, transport: str = "websocket") -> RawClient:
        if transport == "websocket":
            self._ws = await websocket_connect(self._url("websocket", "ws"))
            self.transport = "websocket"
            self._reader = asyncio.ensure_future(self._read_ws(self._ws))
            while self.sid is None:
                await asyncio.sleep(0.005)
        else:
            resp = await self._http.fetch(self._url("polling"))
            self.transport = "polling"
            await self._on_payload(resp.body.decode())
            self._polling = True
            self._poll_task = asyncio.ensure_future(self._poll())
        await self._send("40" + orjson.dumps({"token": token(self.user)}).decode())
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def _read_ws(self, ws) -> None:
        while True:
            msg = await ws.read_message()
            if msg is None:
                return
            await self._on_packet(msg)

    async def _poll(self) -> None:
        while self._polling:
            resp = await self._http.fetch(self._url("polling"), request_timeout=60)
            await self._on_payload(resp.body.decode())

    async def _on_payload(self, body: str) -> None:
        for part in body.split("\x1e"):
            await self._on_packet(part)

    async def _send(self, text: str) -> None:
        if self.transport == "websocket":
            await self._ws.write_message(text)
        else:
            resp = await self._http.fetch(self._url("polling"), method="POST", body=text)
            assert resp.body.lower() == b"ok"

    async def upgrade(self) -> None:
        """Engine.IO's upgrade, as socket.io-client does it: probe the
        websocket, let the long-poll in flight finish, then switch."""
        assert self.transport == "polling"
        ws = await websocket_connect(self._url("websocket", "ws"))
        await ws.write_message("2probe")
        assert await ws.read_message() == "3probe"
        self._polling = False
        await asyncio.wait_for(self._poll_task, 10)  # the server ends it with a NOOP
        await ws.write_message("5")
        self._ws, self.transport = ws, "websocket"
        self._reader = asyncio.ensure_future(self._read_ws(ws))

    async def close(self) -> None:
        self._polling = False
        if self._ws is not None:
            self._ws.close()
        for task in (self._reader, self._poll_task):
            if task is not None:
                task.cancel()
        self._http.close()

    # -- packets ----------------------------------------------------------------

    async def _on_packet(self, text: str) -> None:
        kind, rest = text[:1], text[1:]
        if kind == "0":
            self.sid = orjson.loads(rest)["sid"]
        elif kind == "2":
            self.pings += 1
            if self.answer_pings:
                await self._send("3")
        elif kind == "6":
            self.noops += 1
        elif kind == "4":
            sio_kind, body = rest[:1], rest[1:]
            digits = len(body) - len(body.lstrip("0123456789"))
            ack_id, data = (int(body[:digits]) if digits else None), body[digits:]
            if sio_kind == "0":
                self._connected.set()
            elif sio_kind == "2":
                name, *args = orjson.loads(data)
                self._record(("event", name, args[0] if args else None))
            elif sio_kind == "3":
                args = orjson.loads(data)
                self._record(("ack", self._calls[ack_id], args[0] if args else None))
                self._acks.pop(ack_id).set_result(args[0] if args else None)

    def _record(self, item) -> None:
        self.packets.append(item)

    async def call(self, event: str, data=None, timeout: float = 10):
        ack_id = self._next_id
        self._next_id += 1
        self._calls[ack_id] = event
        fut = self._acks[ack_id] = asyncio.get_running_loop().create_future()
        await self._send(f"42{ack_id}" + orjson.dumps([event, data]).decode())
        return await asyncio.wait_for(fut, timeout)

    def events(self, name: str) -> list:
        return [data for kind, n, data in self.packets if kind == "event" and n == name]

    async def wait_until(self, predicate, timeout: float = 20) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.01)


def probe(chatd, i: int) -> eio_packet.Packet:
    """A Socket.IO event ``probe`` carrying ``i``, as chatd's delivery sends one."""
    encoded = chatd.sio.packet_class(sio_packet.EVENT, namespace="/", data=["probe", i]).encode()
    return eio_packet.Packet(eio_packet.MESSAGE, encoded)


@pytest.fixture
def url(chatd) -> str:
    return f"http://127.0.0.1:{chatd.port}"


async def idle(sock: DirectSocket) -> None:
    """Until the socket's queue is empty and its writer has had time to park."""
    for _ in range(500):
        if sock.queue.empty():
            await asyncio.sleep(0.05)
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the websocket writer never caught up")


@pytest.mark.gen_test(timeout=60)
async def test_websocket_keeps_send_order_when_packets_are_queued_between_direct_writes(chatd, url):
    client = await RawClient(url, "bob").connect()
    try:
        eio = chatd.sio.eio
        sock = eio.sockets[client.sid]
        assert isinstance(sock, DirectSocket)
        await idle(sock)
        before = eio.direct_writes
        rnd = random.Random(20240607)
        # Sends that may go direct: those with nothing queued since the writer
        # last ran.
        n, may, behind = 3000, 0, False
        for i in range(n):
            if rnd.random() < 0.05:
                # Queued the way engine.io queues its own packets (an upgrade's
                # NOOP, a close): whatever is sent after it must wait its turn.
                sock.queue.put_nowait(probe(chatd, i))
                behind = True
            else:
                await eio.send_packet(client.sid, probe(chatd, i))
                may += not behind
            if rnd.random() < 0.05:
                await asyncio.sleep(0)  # the writer runs, writes what is queued, parks
                behind = False
        await client.wait_until(lambda: len(client.events("probe")) >= n)
        await asyncio.sleep(0.1)  # a duplicate would have arrived by now
        assert client.events("probe") == list(range(n))
        direct = eio.direct_writes - before
        # Both paths were taken: none written directly behind a queued one,
        # and (nearly) all the others were.
        assert 0.9 * may <= direct <= may < n
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=90)
async def test_join_and_leave_acks_keep_their_place_among_new_messages_under_fanout(
    chatd, url, api, chat_id
):
    """bob joins (with since_seq) and leaves over and over while three senders
    post and 30 other sockets of the chat receive every message. In the order
    bob's packets arrived, what he sees (each join ack's ``missed``, then the
    new-message events until his leave ack) must be exactly 1..N: no event
    before its join's ack, none after the leave's ack, none out of seq order,
    none twice, none missing."""
    users = [f"u{i}" for i in range(30)]
    await api.create_chat(chat_id, members=["bob", *users])
    others = [await RawClient(url, u).connect() for u in users]
    bob = await RawClient(url, "bob").connect()
    before = chatd.sio.eio.direct_writes
    try:
        for other in others:
            assert (await other.call("join-chat", chat_id))["ok"]
        senders, each = 3, 40
        n = senders * each

        async def sender(k: int) -> None:
            for i in range(each):
                assert (await api.send(chat_id, f"{k}-{i}")).status == 201

        def seen() -> list[int]:
            seqs, inside = [], False
            for kind, name, data in bob.packets:
                if kind == "ack" and name == "join-chat":
                    assert not inside and data["ok"], data
                    seqs.extend(m["seq"] for m in data["missed"])
                    inside = True
                elif kind == "ack" and name == "leave-chat":
                    inside = False
                elif kind == "event" and name == "new-message":
                    assert inside, f"new-message {data['seq']} outside a join"
                    seqs.append(data["seq"])
            return seqs

        flood = asyncio.ensure_future(asyncio.gather(*(sender(k) for k in range(senders))))
        rounds = 0
        while not flood.done() or rounds < 3:
            got = seen()
            since = got[-1] if got else 0
            assert (await bob.call("join-chat", {"chat_id": chat_id, "since_seq": since}))["ok"]
            await asyncio.sleep(0.03)
            assert (await bob.call("leave-chat", chat_id))["ok"]
            rounds += 1
        await flood
        got = seen()
        assert (await bob.call("join-chat", {"chat_id": chat_id, "since_seq": got[-1]}))["ok"]
        assert seen() == list(range(1, n + 1))
        for other in others:
            await other.wait_until(lambda o=other: len(o.events("new-message")) >= n)
        await asyncio.sleep(0.1)
        for other in others:
            assert [m["seq"] for m in other.events("new-message")] == list(range(1, n + 1))
        assert rounds >= 3
        assert chatd.sio.eio.direct_writes - before >= n * len(others) // 2
    finally:
        for c in [bob, *others]:
            await c.close()


@pytest.mark.gen_test(timeout=60)
async def test_polling_only_client_gets_acks_and_new_messages_in_order(chatd, url, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    bob = await RawClient(url, "bob").connect("polling")
    try:
        assert chatd.sio.eio.sockets[bob.sid].upgraded is False
        ack = await bob.call("join-chat", {"chat_id": chat_id, "since_seq": 0})
        assert ack["ok"] and ack["missed"] == []
        n = 60
        sends = asyncio.gather(*(api.send(chat_id, f"m{i}") for i in range(n)))
        # Acks of bob's own sends, interleaved with the stream of events.
        mine = [await bob.call("send-message", {"chat_id": chat_id, "content": f"b{i}"})
                for i in range(10)]  # fmt: skip
        await sends
        total = n + len(mine)
        await bob.wait_until(lambda: len(bob.events("new-message")) >= total)
        await asyncio.sleep(0.1)
        assert [m["seq"] for m in bob.events("new-message")] == list(range(1, total + 1))
        assert bob.transport == "polling"
        # Each ack arrived before bob's next send was even emitted, and in
        # emit order.
        acks = [d for kind, name, d in bob.packets if kind == "ack" and name == "send-message"]
        assert acks == mine and [a["message"]["content"] for a in acks] == [
            f"b{i}" for i in range(10)
        ]
    finally:
        await bob.close()


@pytest.mark.gen_test(timeout=60)
async def test_upgrade_from_polling_while_packets_flow_loses_and_repeats_nothing(chatd, url):
    client = await RawClient(url, "bob").connect("polling")
    eio = chatd.sio.eio
    sock = eio.sockets[client.sid]
    n = 2000
    stop = asyncio.Event()

    async def produce() -> None:
        for i in range(n):
            await eio.send_packet(client.sid, probe(chatd, i))
            if i % 10 == 9:
                await asyncio.sleep(0.001)

    try:
        producer = asyncio.ensure_future(produce())
        await client.wait_until(lambda: len(client.events("probe")) >= 200)
        polled = len(client.events("probe"))
        before = eio.direct_writes
        await client.upgrade()
        assert not producer.done(), "the upgrade should happen while packets flow"
        await producer
        stop.set()
        await client.wait_until(lambda: len(client.events("probe")) >= n)
        await asyncio.sleep(0.1)
        assert client.events("probe") == list(range(n))
        assert client.transport == "websocket" and sock.upgraded and not sock.upgrading
        assert polled < n and client.noops >= 1  # the poll in flight ended with a NOOP
        assert eio.direct_writes > before  # after the upgrade, the direct path runs
        # And the upgraded socket still answers events with acks.
        assert (await client.call("leave-chat", "nowhere"))["ok"] is True
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_failed_direct_write_hands_the_packet_to_the_writer_in_order(chatd, url):
    alice = await RawClient(url, "alice").connect()
    bob = await RawClient(url, "bob").connect()
    try:
        eio = chatd.sio.eio
        sock = eio.sockets[bob.sid]
        await idle(sock)
        await idle(eio.sockets[alice.sid])
        failed = []

        def refuse(data, binary=False):
            failed.append(data)
            raise RuntimeError("the websocket is gone")

        for i in range(10):
            if i == 3:
                sock._write = refuse  # bob's next direct write fails
            # A broadcast: the failure on bob's socket must not stop it.
            for sid in (bob.sid, alice.sid):
                await eio.send_packet(sid, probe(chatd, i))
        assert len(failed) == 1
        for client in (alice, bob):
            await client.wait_until(lambda c=client: len(c.events("probe")) >= 10)
        await asyncio.sleep(0.1)
        # bob's writer wrote packet 3 (its websocket works) and those queued behind it.
        assert bob.events("probe") == alice.events("probe") == list(range(10))
    finally:
        await alice.close()
        await bob.close()


@pytest.mark.gen_test(timeout=10)
async def test_request_environ_equals_engineio_drivers_without_a_class_per_request():
    from types import SimpleNamespace

    from engineio.async_drivers import tornado as driver
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    from chatd import delivery

    def handler(body: bytes, query: str):
        headers = HTTPHeaders(
            {
                "Host": "chat.example",
                "Content-Type": "text/plain;charset=UTF-8",
                "Content-Length": str(len(body)),
                "X-Forwarded-Proto": "https",
                "Origin": "http://x.example",
            }
        )
        start = RequestStartLine("POST", f"/socket.io/?{query}", "HTTP/1.1")
        request = HTTPServerRequest(start_line=start, headers=headers, body=body)
        return SimpleNamespace(request=request)

    h = handler(b'40{"token":"t"}', "EIO=4&transport=polling&sid=abc")
    ours, theirs = delivery.translate_request(h), driver.translate_request(h)
    assert set(ours) == set(theirs)
    for key in ours:
        if key != "wsgi.input":
            assert ours[key] == theirs[key], key
    assert await ours["wsgi.input"].read(2) == await theirs["wsgi.input"].read(2) == b"40"
    assert await ours["wsgi.input"].read() == await theirs["wsgi.input"].read()
    # One class for every request (engine.io's driver defines a new one each time).
    again = delivery.translate_request(handler(b"", "EIO=4&transport=websocket"))
    assert type(again["wsgi.input"]) is type(ours["wsgi.input"])
    assert await again["wsgi.input"].read() == b""


@pytest.mark.parametrize("make", ["asyncio", "chatd"])
@pytest.mark.gen_test(timeout=10)
async def test_socket_queue_behaves_as_asyncio_queue(make):
    # The same script against asyncio.Queue and chatd's SocketQueue (engine.io
    # sockets use the latter): what a wrong queue would get wrong fails on it.
    from chatd import delivery

    q = asyncio.Queue() if make == "asyncio" else delivery.SocketQueue()
    assert q.empty() and q.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()
    # FIFO, with waiting getters woken one per item, in the order they waited.
    got: list = []

    async def getter(tag):
        got.append((tag, await q.get()))

    waiting = [asyncio.ensure_future(getter(t)) for t in "ab"]
    await asyncio.sleep(0)
    await q.put(1)
    q.put_nowait(2)
    await asyncio.gather(*waiting)
    assert got == [("a", 1), ("b", 2)]
    # A getter cancelled after it was woken hands its item to the next one.
    first = asyncio.ensure_future(q.get())
    second = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    q.put_nowait(3)
    first.cancel()
    assert await asyncio.wait_for(second, 1) == 3
    # wait_for on get (engine.io's polling poll) times out cleanly, and leaves
    # no stale waiter behind to swallow the next item.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(q.get(), 0.05)
    q.put_nowait(4)
    assert q.get_nowait() == 4 and q.empty()
    # join waits for task_done of every item put.
    for _ in range(4):
        q.task_done()
    q.put_nowait(5)
    joined = asyncio.ensure_future(q.join())
    await asyncio.sleep(0)
    assert not joined.done()
    assert q.get_nowait() == 5
    q.task_done()
    await asyncio.wait_for(joined, 1)
    with pytest.raises(ValueError):
        q.task_done()
    await asyncio.wait_for(q.join(), 1)  # nothing unfinished: at once


def _ping_tasks() -> list:
    return [t for t in asyncio.all_tasks() if "_send_ping" in repr(t.get_coro())]


@pytest.mark.gen_test(timeout=60)
async def test_pings_keep_coming_from_a_timer_and_keep_the_socket_open(chatd, url):
    eio = chatd.sio.eio
    eio.ping_interval, eio.ping_timeout = 0.2, 1.0  # before the first socket
    client = await RawClient(url, "bob").connect()
    try:
        await client.wait_until(lambda: client.pings >= 5, 10)
        assert client.sid in eio.sockets and not eio.sockets[client.sid].closed
        assert _ping_tasks() == []  # a timer per socket, no sleeping task
        assert (await client.call("join-chat", "nope"))["ok"] is False  # still served
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_stops_answering_pings_is_disconnected(chatd, url):
    eio = chatd.sio.eio
    eio.ping_interval, eio.ping_timeout = 0.2, 0.5  # before the first socket
    gone = await RawClient(url, "bob").connect()
    alive = await RawClient(url, "carol").connect()
    try:
        gone.answer_pings = False
        # The server closes the socket and its websocket: the client's reader
        # sees the connection end (the server's reader has no timeout of its
        # own any more; without the close it would wait forever).
        await asyncio.wait_for(gone._reader, 20)
        await gone.wait_until(lambda: gone.sid not in eio.sockets, 10)
        assert gone.pings >= 1
        # The other socket, which answers, is untouched.
        assert (await alive.call("join-chat", "nope"))["ok"] is False
        assert alive.sid in eio.sockets
    finally:
        await gone.close()
        await alive.close()
