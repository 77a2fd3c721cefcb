"""chatd.fairselect: in a storm of websocket events, other descriptors first,
at most per_turn websockets per select, every event delivered once. Real
sockets (socketpairs) and asyncio's own loop on the selector."""

from __future__ import annotations

import asyncio
import collections
import selectors
import socket
import time

from chatd import fairselect


def pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        a.setblocking(False)
        out.append((a, b))
    return out


def close_all(ps) -> None:
    for a, b in ps:
        a.close()
        b.close()


def test_a_storm_is_handed_out_per_turn_with_other_descriptors_first():
    sel = fairselect.FairSelector(per_turn=4, budget=None)
    bulk = pairs(30)
    other = pairs(1)
    try:
        for a, _ in bulk:
            sel.register(a, selectors.EVENT_READ, "ws")
            sel.mark_bulk(a.fileno())
        sel.register(other[0][0], selectors.EVENT_READ, "http")
        for _, b in bulk:
            b.close()  # end-of-file on every websocket at once
        seen: list[int] = []

        def handle(batch) -> list[str]:
            # As Tornado does on an end-of-file: the stream is unregistered.
            for key, _ in batch:
                if key.data == "ws":
                    seen.append(key.fd)
                    sel.unregister(key.fileobj)
            return [k.data for k, _ in batch]

        assert handle(sel.select(0)).count("ws") == 4
        # A request arriving during the storm: handed out in the next select,
        # ahead of the 26 websockets still waiting.
        other[0][1].send(b"GET /healthz")
        second = handle(sel.select(0))
        assert second.count("http") == 1
        assert second.count("ws") == 4
        for _ in range(20):
            assert handle(sel.select(0)).count("ws") <= 4
        # Each end-of-file handed out exactly once, although the waiting ones
        # stayed ready (level-triggered) the whole time.
        assert sorted(seen) == sorted(a.fileno() for a, _ in bulk)
        assert sel.storm_turns == 7  # 4 per select while more waited: 7 times
    finally:
        sel.close()
        close_all(bulk + other)


def test_few_events_pass_unchanged_and_unmarked_descriptors_never_wait():
    sel = fairselect.FairSelector(per_turn=4, budget=None)
    ps = pairs(10)
    try:
        for a, _ in ps:
            sel.register(a, selectors.EVENT_READ)
        for _, b in ps:
            b.send(b"x")
        assert len(sel.select(0)) == 10  # none marked bulk: all at once
        assert sel.storm_turns == 0
        for a, _ in ps[:3]:
            sel.mark_bulk(a.fileno())
        assert len(sel.select(0)) == 10  # 3 bulk events fit in a turn
        assert sel.storm_turns == 0
        # A mark outlives asyncio's unregister/register of a paused reader
        # (Tornado between reads); it goes only with unmark_bulk.
        for a, _ in ps:
            sel.unregister(a)
            sel.register(a, selectors.EVENT_READ)
            sel.mark_bulk(a.fileno())
        assert len(sel.select(0)) == 4
        assert sel.storm_turns == 1
        for a, _ in ps:
            sel.unmark_bulk(a.fileno())
        for _ in range(3):
            sel.select(0)  # the 6 waiting ones come back
        assert len(sel.select(0)) == 10  # unmarked: all at once again
        assert sel.storm_turns == 1
    finally:
        sel.close()
        close_all(ps)


def test_a_waiting_descriptor_unregistered_or_modified_meanwhile():
    sel = fairselect.FairSelector(per_turn=1, budget=None)
    ps = pairs(4)
    try:
        for a, _ in ps:
            sel.register(a, selectors.EVENT_READ)
            sel.mark_bulk(a.fileno())
        for _, b in ps:
            b.send(b"x")
        first = sel.select(0)
        assert len(first) == 1
        waiting = [a for a, _ in ps if a.fileno() != first[0][0].fd]
        gone, changed, kept = waiting
        sel.unregister(gone)  # closed while it waited: never handed out
        gone.close()
        # Modified while it waited (now also for writing): back in the
        # kernel's set, reported by it (once, not also from the queue).
        sel.modify(changed, selectors.EVENT_READ | selectors.EVENT_WRITE)
        fds = []
        for _ in range(6):
            fds += [k.fd for k, _ in sel.select(0)]
        assert gone.fileno() == -1
        assert kept.fileno() in fds
        assert changed.fileno() in fds
    finally:
        sel.close()
        close_all([p for p in ps if p[0].fileno() != -1])


def test_asyncio_loop_answers_a_request_arriving_during_a_storm_within_turns():
    """On asyncio's loop: 200 websocket ends ready at once, and a request that
    arrives while the first of them is handled. With a plain selector all 200
    run in that turn and the request after them; here it comes within the
    next turn, after at most two turns' worth (per_turn each)."""
    loop = fairselect.new_loop(per_turn=16)
    ps = pairs(200)
    ((req, client),) = pairs(1)
    order: list[str] = []
    done = loop.create_future()

    def on_ws(a, fd):
        loop.remove_reader(fd)
        assert a.recv(1) == b""  # the end-of-file
        if not order:
            client.send(b"GET /healthz")  # arrives during the storm
        order.append("ws")
        if order.count("ws") == 200:
            done.set_result(None)

    def on_request():
        loop.remove_reader(req.fileno())
        assert req.recv(100) == b"GET /healthz"
        order.append("request")

    try:
        for a, _ in ps:
            loop.add_reader(a.fileno(), on_ws, a, a.fileno())
            fairselect.mark_bulk(loop, a.fileno())
        loop.add_reader(req.fileno(), on_request)
        for _, b in ps:
            b.close()
        loop.run_until_complete(asyncio.wait_for(done, 10))
        assert order.count("ws") == 200
        assert "request" in order[:33], order.index("request")
        assert loop.chatd_selector.storm_turns >= (200 - 16) // 16
    finally:
        loop.close()
        close_all([*ps, (req, client)])


def test_peer_gone_only_for_a_websocket_during_a_storm_whose_peer_ended():
    """What DirectSocket asks before writing during a storm: a websocket with
    only the end to read is gone; one with data first, an idle one, or any
    descriptor not marked bulk is not (and the peek consumes nothing); and
    not before websocket events have waited STORM_RUN selects in a row (a
    burst is not a storm)."""
    loop = fairselect.new_loop(per_turn=1, budget=None)
    sel = loop.chatd_selector
    storm = pairs(10)
    ended, talked, idle = pairs(3)
    ((plain, plain_peer),) = pairs(1)
    try:
        for a, _ in [*storm, ended, talked, idle]:
            sel.register(a, selectors.EVENT_READ)
            sel.mark_bulk(a.fileno())
        sel.register(plain, selectors.EVENT_READ)
        for _, b in storm:
            b.close()
        ended[1].close()
        talked[1].send(b"42")
        talked[1].close()
        plain_peer.close()
        assert not fairselect.storming()
        for _ in range(fairselect.STORM_RUN):
            assert not fairselect.peer_gone(ended[0])  # a burst, not yet a storm
            assert [k.data for k, _ in sel.select(0)].count(None) == 2  # plain + 1 bulk
        assert fairselect.storming()
        assert fairselect.peer_gone(ended[0])
        assert not fairselect.peer_gone(talked[0])
        assert talked[0].recv(10) == b"42"  # the peek took nothing
        assert not fairselect.peer_gone(idle[0])  # nothing to read
        assert not fairselect.peer_gone(plain)  # not a websocket
        for _ in range(20):  # handled as Tornado does an end: unregistered
            for key, _ in sel.select(0):
                sel.unregister(key.fileobj)
        assert not fairselect.storming()  # every end handed out: over
    finally:
        loop.close()
        close_all([*storm, ended, talked, idle, (plain, plain_peer)])
    assert not fairselect.storming()  # the loop's selector is closed


def test_a_waiting_descriptor_closed_without_unregistering_breaks_nothing():
    """The loop must survive a descriptor closed behind its back while it
    waits (asyncio's own selectors tolerate that too): it is simply not
    handed out, and the others are."""
    sel = fairselect.FairSelector(per_turn=1, budget=None)
    ps = pairs(3)
    try:
        for a, _ in ps:
            sel.register(a, selectors.EVENT_READ)
            sel.mark_bulk(a.fileno())
        for _, b in ps:
            b.close()
        first = sel.select(0)
        assert len(first) == 1
        closed = next(a for a, _ in ps if a.fileno() != first[0][0].fd)
        sel.unregister(first[0][0].fileobj)
        closed.close()  # no unregister: the selector's map still has it
        handed = []
        for _ in range(4):
            handed += [k.fd for k, _ in sel.select(0)]
        third = next(a for a, _ in ps if a.fileno() not in (-1, first[0][0].fd))
        assert set(handed) == {third.fileno()}  # (reported again: not read)
    finally:
        sel.close()
        close_all([p for p in ps if p[0].fileno() != -1])


def _storm_on_a_loop(loop, n: int, cost: float, request_at: int | None = None):
    """n websocket ends ready at once on asyncio's loop, each costing ``cost``
    seconds of CPU to handle (busy, as Tornado's close is); a request (an
    unmarked descriptor) arrives while the ``request_at``-th is handled.
    Returns the websockets' descriptors in the order handled, the loop turn
    each was handled in, the turn the request was handled in, and the
    descriptors in the order their ends were made ready."""
    ps = pairs(n)
    ((req, client),) = pairs(1)
    turn = [0]
    handled: list[int] = []
    turns: list[int] = []
    request_turn: list[int] = []
    done = loop.create_future()

    def tick():  # runs first in every turn (scheduled by the turn before)
        turn[0] += 1
        if not done.done():
            loop.call_soon(tick)

    def on_ws(a, fd):
        loop.remove_reader(fd)
        assert a.recv(1) == b""  # the end-of-file, read once
        t = time.perf_counter()
        while time.perf_counter() - t < cost:
            pass
        if len(handled) == request_at:
            client.send(b"GET /healthz")
        handled.append(fd)
        turns.append(turn[0])
        if len(handled) == n:
            done.set_result(None)

    def on_request():
        loop.remove_reader(req.fileno())
        assert req.recv(100) == b"GET /healthz"
        request_turn.append(turn[0])

    try:
        for a, _ in ps:
            loop.add_reader(a.fileno(), on_ws, a, a.fileno())
            fairselect.mark_bulk(loop, a.fileno())
        loop.add_reader(req.fileno(), on_request)
        order = [a.fileno() for a, _ in ps]
        for _, b in ps:
            b.close()
        loop.call_soon(tick)
        loop.run_until_complete(asyncio.wait_for(done, 60))
        return handled, turns, request_turn, order
    finally:
        loop.remove_reader(req.fileno())  # (if no request came)
        close_all([*ps, (req, client)])


def test_a_turn_hands_out_what_fits_its_time_budget_in_order_none_lost():
    """per_turn=64 with 1 ms of work per websocket end and a 3 ms budget: the
    first turn (nothing measured yet) hands out 64, every later one at most
    3 (a count alone: 64 per turn, 64 ms each). Every end is handled exactly
    once, oldest first, and a request arriving meanwhile within a turn."""
    loop = fairselect.new_loop(per_turn=64, budget=0.003)
    try:
        handled, turns, request_turn, order = _storm_on_a_loop(loop, 150, 0.001, request_at=70)
    finally:
        loop.close()
    assert handled == order  # each once, in the order they became ready
    per_turn = collections.Counter(turns)
    counts = [per_turn[t] for t in sorted(per_turn)]
    assert counts[0] == 64, counts
    assert max(counts[1:]) <= 3, counts
    assert len(counts) >= 1 + (150 - 64) // 3, counts
    # The request came while the 71st end was handled: answered in the next
    # turn at the latest, ahead of the ~80 ends still waiting.
    assert request_turn and request_turn[0] <= turns[70] + 1, (request_turn, turns[70])


def test_work_over_the_budget_still_hands_out_one_per_turn():
    """Each end costs more than a whole turn's budget: one per turn, never
    none (the storm ends), and the few that fit unmeasured go first."""
    loop = fairselect.new_loop(per_turn=8, budget=0.001)
    try:
        handled, turns, _, order = _storm_on_a_loop(loop, 30, 0.003)
    finally:
        loop.close()
    assert handled == order
    counts = [n for _, n in sorted(collections.Counter(turns).items())]
    assert counts[0] == 8 and set(counts[1:]) == {1}, counts
    assert loop.chatd_selector.allowance == 1


def test_cheap_work_keeps_the_count_and_the_next_storm_starts_afresh():
    """Work well within the budget: per_turn each turn, as a count alone.
    After a storm of costly work, a later storm is not held to its estimate."""
    loop = fairselect.new_loop(per_turn=8, budget=0.5)
    try:
        handled, turns, _, order = _storm_on_a_loop(loop, 40, 0.0)
        assert handled == order
        assert sorted(collections.Counter(turns).values()) == [8] * 5
        sel = loop.chatd_selector
        sel.budget = 0.001
        _storm_on_a_loop(loop, 20, 0.003)
        assert sel.allowance == 1
        sel.budget = 0.5
        loop.run_until_complete(asyncio.sleep(0.01))  # a quiet turn or two
        handled, turns, _, order = _storm_on_a_loop(loop, 24, 0.0)
        assert handled == order
        assert sorted(collections.Counter(turns).values()) == [8] * 3
    finally:
        loop.close()
