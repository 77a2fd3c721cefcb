"""chatd.fairselect.pace(): background work (disconnect handlers, presence
announcements, ended sockets leaving their rooms, the relay's reading) goes
on in the next loop turn once the turn has run its budget, counted from its
select(), whatever else ran in it. So a storm's turns stay short, and a
request, which needs a few turns, waits little for each (issue 11, item 2)."""

from __future__ import annotations

import asyncio
import collections
import time

from chatd import fairselect
from chatd.realtime import LocalChatManager


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _paced_items(loop, items: int, cost: float, burn: float = 0.0) -> list[int]:
    """How many items of ``cost`` seconds a paced background task did in each
    turn; a foreground callback burns ``burn`` seconds at the start of every
    turn (and numbers the turns)."""
    turn = [0]
    done: list[int] = []

    def foreground() -> None:
        turn[0] += 1
        _busy(burn)
        if len(done) < items:
            loop.call_soon(foreground)

    async def background() -> None:
        for _ in range(items):
            _busy(cost)
            done.append(turn[0])
            await fairselect.pace()

    loop.call_soon(foreground)
    loop.run_until_complete(background())
    return [n for _, n in sorted(collections.Counter(done).items())]


def test_background_work_goes_on_in_the_next_turn_once_the_turn_ran_its_budget():
    """Items of 0.4 ms, a 1 ms budget: at most three a turn (the one that
    crosses the budget included), not all 30 in one."""
    loop = fairselect.new_loop(budget=0.001)
    try:
        counts = _paced_items(loop, 30, 0.0004)
    finally:
        loop.close()
    assert sum(counts) == 30
    assert max(counts) <= 3, counts
    assert len(counts) >= 10, counts


def test_the_budget_counts_what_else_ran_in_the_turn():
    """The turn's other work already ran 1.2 ms of a 1 ms budget before the
    background task's step: one item a turn (a clock of the task's own would
    let it run three more ms)."""
    loop = fairselect.new_loop(budget=0.001)
    try:
        counts = _paced_items(loop, 12, 0.0004, burn=0.0012)
    finally:
        loop.close()
    assert counts == [1] * 12, counts


def test_a_loop_without_the_selector_still_paces():
    """On a loop that fairselect.new_loop did not make (a test's), pace()
    counts from the last time it went on: still a few items a turn."""
    loop = asyncio.new_event_loop()
    try:
        counts = _paced_items(loop, 30, 0.0004)
    finally:
        loop.close()
    assert sum(counts) == 30
    assert max(counts) <= 1 + int(fairselect.TURN_BUDGET / 0.0004), counts


def test_ended_sockets_leave_their_rooms_soon_and_paced_not_in_the_broadcast():
    """leave_rooms_early (a broadcast found the socket's peer gone during a
    storm): the socket leaves its chat rooms in a background task, paced;
    its own room (None) stays for its disconnect. 300 sockets of 0.4 ms
    work each would be one 120 ms step in the broadcast that found them."""
    loop = fairselect.new_loop(budget=0.001)

    async def main() -> None:
        manager = LocalChatManager()
        sids = [f"s{i}" for i in range(300)]
        for sid in sids:
            manager.basic_enter_room(sid, "/", None, eio_sid="e" + sid)
            manager.basic_enter_room(sid, "/", "chat:a", eio_sid="e" + sid)
            manager.basic_enter_room(sid, "/", "chat:b", eio_sid="e" + sid)
        manager.basic_enter_room("keeper", "/", "chat:a", eio_sid="ekeeper")
        for sid in sids:
            manager.leave_rooms_early(sid, "/")
        # Nothing yet: the broadcast that found them goes on undisturbed.
        assert len(manager.rooms["/"]["chat:a"]) == 301
        turns = 0
        while manager._leaver is not None:
            await asyncio.sleep(0)
            turns += 1
        rooms = manager.rooms["/"]
        assert set(rooms["chat:a"]) == {"keeper"}
        assert "chat:b" not in rooms
        assert set(rooms[None]) == set(sids)
        assert turns >= 1

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
