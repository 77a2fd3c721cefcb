"""An event-loop selector that lets websockets' events wait their turn.

asyncio's loop runs, in one turn, the callback of every descriptor that one
``epoll_wait`` reports ready. When 10,000 websockets end together (a load
balancer restart, a client fleet killed), the kernel reports their 10,000
end-of-files at once, and Tornado handles each in that turn (a read, a close,
futures resolved), then resumes each connection's coroutines in the next
turns: profiled (bench/disconnect_storm.py --turns), five turns of 165-494 ms
in a row, ~160 us per socket, and every HTTP request that arrives meanwhile
waits behind them (a send: 1.1-1.3 s).

:class:`FairSelector` is the selector chatd's loop is built with
(``asyncio.SelectorEventLoop(selector)``, asyncio's own extension point). A
websocket's descriptor is marked *bulk* (:func:`mark_bulk`, by chatd's
websocket handler once the connection is upgraded). While one ``select()``
reports at most ``per_turn`` bulk events and none are waiting, it changes
nothing. Past that, the bulk events beyond ``per_turn`` are taken out of the
kernel's epoll set (``EPOLL_CTL_DEL``: a level-triggered end-of-file would
otherwise be reported again on every call) and queued in arrival order; each
later ``select()`` polls without blocking, returns everything else the kernel
reports (HTTP requests, the listening socket, PostgreSQL and Redis) at once,
and hands back at most ``per_turn`` of the waiting websocket events, putting
each descriptor back in the kernel's set as it does. So a storm costs each
turn ``per_turn`` websockets' worth of work, and a request arriving during it
is answered in the next turn instead of after the whole storm.

The mark is the websocket's: set when its handshake is done, dropped by
:func:`unmark_bulk` when its handler closes (asyncio unregisters and
registers a descriptor again whenever Tornado stops and resumes reading, so
the selector's own unregister cannot tell an end from a pause).

A descriptor's events are never lost: the event it was reported with is
delivered later, and whatever arrived meanwhile is read then (the callback
reads until EAGAIN). A descriptor unregistered or modified while it waits is
simply dropped from the queue (unregistered) or put back in the kernel's set
(modified), so the loop's view and the kernel's always agree.
"""

from __future__ import annotations

import asyncio
import collections
import selectors
import socket
import time

# The most websocket events handed to the loop per select() call while a
# storm lasts. Measured (bench/disconnect_storm.py --turns): 64 made turns of
# ~25 ms, and a request needs several turns (a send ~6-8); 16 keep them at
# ~5-15 ms.
BULK_PER_TURN = 16
# Within that, how much loop time a turn should take while websocket events
# wait: each select() hands out as many as the last turns' measured time per
# websocket event fits in this (at least one). A websocket's end costs ~0.1-0.2
# ms of CPU spread over several turns, more when the machine is busy (the
# kernel tearing 10,000 connections down on the same cores) or when requests
# share the turns; a count alone made turns of 20-60 ms then.
TURN_BUDGET = 0.002
# The turns that estimate: a websocket event's work spreads over the next 3-5
# turns (its end, Tornado's close, engine.io's and python-socketio's).
BUDGET_WINDOW = 8


class FairSelector(selectors.EpollSelector):
    def __init__(self, per_turn: int = BULK_PER_TURN, budget: float | None = TURN_BUDGET):
        super().__init__()
        self.per_turn = per_turn  # the most bulk events per select
        self.budget = budget  # seconds of loop time per turn in a storm (None: a count only)
        # While bulk events wait: (seconds, bulk events handed out) of the last
        # turns, and when the last select() was done polling and how many bulk
        # events it handed out.
        self._turns: collections.deque[tuple[float, int]] = collections.deque(maxlen=BUDGET_WINDOW)
        self._polled = 0.0
        self._handed = 0
        self.allowance = per_turn  # bulk events the last storm turn could hand out
        self._bulk: set[int] = set()  # descriptors whose events may wait
        self._parked: set[int] = set()  # bulk descriptors out of the kernel's set
        self._waiting: collections.deque[tuple[int, int]] = collections.deque()
        self.deferred_total = 0  # events that waited a turn since start

    def mark_bulk(self, fd: int) -> None:
        self._bulk.add(fd)

    def unmark_bulk(self, fd: int) -> None:
        self._bulk.discard(fd)

    def _kernel_mask(self, events: int) -> int:
        mask = 0
        if events & selectors.EVENT_READ:
            mask |= self._EVENT_READ
        if events & selectors.EVENT_WRITE:
            mask |= self._EVENT_WRITE
        return mask

    def _unpark(self, fd: int) -> bool:
        """Put a waiting descriptor back in the kernel's set (True if it was out)."""
        if fd not in self._parked:
            return False
        self._parked.discard(fd)
        key = self._fd_to_key.get(fd)
        if key is None:
            return False
        try:
            self._selector.register(fd, self._kernel_mask(key.events))
        except OSError:
            # Closed without being unregistered: the kernel forgets such a
            # descriptor by itself, and nothing is left to hand out.
            return False
        return True

    def register(self, fileobj, events, data=None):
        key = super().register(fileobj, events, data)
        # A new descriptor under a number that a closed one had: not parked.
        self._parked.discard(key.fd)
        return key

    def unregister(self, fileobj):
        # The bulk mark stays: asyncio unregisters a descriptor whenever it
        # waits for nothing (Tornado between two reads, around the websocket
        # handshake), and registers it again later. It goes with
        # unmark_bulk(), when the websocket is over.
        fd = self._fileobj_lookup(fileobj)
        # Out of the kernel's set already: selectors ignores the OSError of
        # removing it twice. Its queued event is skipped (not parked any more).
        self._parked.discard(fd)
        return super().unregister(fileobj)

    def modify(self, fileobj, events, data=None):
        # The kernel must know a descriptor to modify it: a parked one goes
        # back first (its queued event is then skipped; the kernel reports it).
        self._unpark(self._fileobj_lookup(fileobj))
        return super().modify(fileobj, events, data)

    def _allowance(self, polled: float) -> int:
        """How many bulk events this turn hands out: per_turn, or fewer when
        the last turns took more than the time budget per event handed out."""
        if self.budget is None:
            return self.per_turn
        if self._waiting:  # the last turn was a storm turn: measure it
            self._turns.append((polled - self._polled, self._handed))
        handed = sum(n for _, n in self._turns)
        if handed == 0:
            return self.per_turn
        per_event = sum(t for t, _ in self._turns) / handed
        if per_event <= 0:
            return self.per_turn
        return max(1, min(self.per_turn, int(self.budget / per_event)))

    def select(self, timeout=None):
        waiting = self._waiting
        ready = super().select(0 if waiting else timeout)
        if not waiting and len(ready) <= self.per_turn:
            if self._turns:
                self._turns.clear()  # the storm is over: the next starts afresh
            return ready  # the usual case: unchanged
        polled = time.perf_counter()
        out = []
        budget = self.allowance = self._allowance(polled)
        # The oldest waiting websocket events first.
        while waiting and budget > 0:
            fd, events = waiting.popleft()
            if not self._unpark(fd):
                continue  # unregistered or modified meanwhile
            key = self._fd_to_key.get(fd)
            if key is not None and events & key.events:
                out.append((key, events & key.events))
                budget -= 1
        bulk = self._bulk
        for key, events in ready:
            fd = key.fd
            if fd not in bulk:
                out.append((key, events))  # never waits
            elif budget > 0:
                out.append((key, events))
                budget -= 1
            else:
                try:
                    self._selector.unregister(fd)
                except OSError:  # closed meanwhile: the kernel forgot it
                    continue
                self._parked.add(fd)
                waiting.append((fd, events))
                self.deferred_total += 1
        self._handed = self.allowance - budget
        self._polled = polled
        return out

    def close(self):
        global _current
        if _current is self:
            _current = None
        self._waiting.clear()
        self._parked.clear()
        self._bulk.clear()
        super().close()


# The selector of the running chatd loop (new_loop), for the checks below.
_current: FairSelector | None = None


def storming() -> bool:
    """Whether websocket events are waiting their turn now (cheap: called for
    every packet a socket sends)."""
    sel = _current
    return sel is not None and bool(sel._parked)


def waiting(fd: int) -> bool:
    """Whether this descriptor was reported ready and waits its turn."""
    sel = _current
    return sel is not None and fd in sel._parked


def peer_gone(sock: socket.socket) -> bool:
    """Whether this socket waits its turn because its peer is gone: what the
    kernel has for it to read is the end (or a reset). Data sent before the
    end counts as not gone (it is read first, in its turn)."""
    if not waiting(sock.fileno()):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset by the peer
        return True


def mark_bulk(loop, fd: int) -> None:
    """Let this descriptor's events wait their turn in a storm (a no-op on a
    loop that :func:`new_loop` did not make, e.g. a test's)."""
    selector = getattr(loop, "chatd_selector", None)
    if selector is not None:
        selector.mark_bulk(fd)


def unmark_bulk(loop, fd: int) -> None:
    """The websocket on this descriptor is over. Called when its handler
    closes, which may be after the number was given to a new connection: that
    one then loses a mark it should not have had, or (a new websocket) that
    it should have, and is handled as any other descriptor; either way none
    of its events is lost."""
    selector = getattr(loop, "chatd_selector", None)
    if selector is not None:
        selector.unmark_bulk(fd)


def new_loop(
    per_turn: int = BULK_PER_TURN, budget: float | None = TURN_BUDGET
) -> asyncio.AbstractEventLoop:
    """asyncio's selector loop, with a :class:`FairSelector`."""
    global _current
    selector = FairSelector(per_turn, budget)
    loop = asyncio.SelectorEventLoop(selector)
    loop.chatd_selector = selector
    _current = selector
    return loop
