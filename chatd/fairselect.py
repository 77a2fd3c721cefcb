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
websocket handler once the connection is upgraded) and moves to an epoll set
of its own, which is itself registered in the main set: the main poll
reports every other descriptor (HTTP requests, the listening socket,
PostgreSQL, Redis) and, as one readable descriptor, "some websocket has an
event". Each ``select()`` then polls the websockets' set for at most the
turn's *allowance*: the kernel hands out that many, oldest first, and keeps
the rest in its ready list for the next turns (a level-triggered descriptor
reported and still ready goes to the end of it). Nothing is taken out of the
kernel's sets or queued in Python, so a storm costs each ``select()`` only
what it hands out.

The allowance is ``per_turn`` (16) at most, and while websocket events wait
it is what fits ``budget`` (2 ms) of loop time at the time per websocket
event the last turns measured (at least one): a websocket's end costs ~0.1-0.2
ms spread over several turns, more when the machine is busy (the kernel
tearing 10,000 connections down on the same cores) or when requests share
the turns, and a request needs several turns (a send ~6-8).

What the events handed out start goes on in later turns, in background
tasks (a socket's disconnect handlers, presence announcements to its rooms,
the relay's reading): each calls :func:`pace` between two items, which goes
on to the next turn once this one has run ``budget`` since its select()
returned. So every turn of a storm lasts about ``budget``, whatever is
behind, and the allowance above shrinks to one event per turn while the
background is behind: a request, which needs a few turns (a send ~13),
waits that much for each.

The mark is the websocket's: set when its handshake is done, dropped by
:func:`unmark_bulk` when its handler closes (asyncio unregisters and
registers a descriptor again whenever Tornado stops and resumes reading, so
the selector's own unregister cannot tell an end from a pause).

A descriptor's events are never lost: epoll reports what is ready when it is
polled, a descriptor moved between the sets is reported by the one it joins,
and its callback reads until EAGAIN. A descriptor unregistered while it
waits simply leaves the kernel's set (closed, the kernel forgets it).
"""

from __future__ import annotations

import asyncio
import collections
import math
import select
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
# websocket event fits in this (at least one). A count alone made turns of
# 20-60 ms when the machine was busy.
TURN_BUDGET = 0.001
# The turns that estimate: a websocket event's work spreads over the next 3-5
# turns (its end, Tornado's close, engine.io's and python-socketio's).
BUDGET_WINDOW = 8
# (TURN_BUDGET is also what a turn may run before background work goes on
# in the next one: pace().)
# Selects in a row that left websocket events waiting before sends check
# whether a socket's peer is gone (peer_gone): a storm, not a burst of traffic.
STORM_RUN = 4


class FairSelector(selectors.EpollSelector):
    def __init__(self, per_turn: int = BULK_PER_TURN, budget: float | None = TURN_BUDGET):
        super().__init__()
        self.per_turn = per_turn  # the most bulk events per select
        self.budget = budget  # seconds of loop time per turn in a storm (None: a count only)
        # The bulk descriptors' own epoll set, itself in the main set: readable
        # (level-triggered) while any of them has an event.
        self._bulk_ep = select.epoll()
        self._selector.register(self._bulk_ep.fileno(), select.EPOLLIN)
        self._bulk: set[int] = set()  # descriptors marked bulk
        self._in_bulk: set[int] = set()  # registered descriptors in _bulk_ep
        # The last bulk poll filled its allowance (more may be waiting), and
        # for how many selects in a row.
        self._more = False
        self.storm_run = 0
        self.storm_turns = 0  # selects since start that left bulk events waiting
        # While bulk events wait: (seconds, bulk events handed out) of the last
        # turns, and when the last select() polled and how many it handed out.
        self._turns: collections.deque[tuple[float, int]] = collections.deque(maxlen=BUDGET_WINDOW)
        self._polled = 0.0
        self._handed = 0
        self.allowance = per_turn  # bulk events the last select could hand out
        # When the last select() returned: the start of this loop turn (pace()).
        self.turn_start = 0.0

    # -- which set a descriptor is in ---------------------------------------------

    def _kernel_mask(self, events: int) -> int:
        mask = 0
        if events & selectors.EVENT_READ:
            mask |= self._EVENT_READ
        if events & selectors.EVENT_WRITE:
            mask |= self._EVENT_WRITE
        return mask

    def mark_bulk(self, fd: int) -> None:
        self._bulk.add(fd)
        self._move(fd, True)

    def unmark_bulk(self, fd: int) -> None:
        self._bulk.discard(fd)
        self._move(fd, False)

    def _move(self, fd: int, to_bulk: bool) -> None:
        """A registered descriptor into the bulk set or out of it. An event it
        has is not lost: epoll reports a ready descriptor as it is added."""
        if (fd in self._in_bulk) == to_bulk:
            return
        key = self._fd_to_key.get(fd)
        if key is None:
            return  # not registered now: register() will choose
        src, dst = (self._selector, self._bulk_ep) if to_bulk else (self._bulk_ep, self._selector)
        try:
            src.unregister(fd)
        except OSError:
            pass
        self._in_bulk.discard(fd)
        try:
            dst.register(fd, self._kernel_mask(key.events))
        except OSError:
            return  # closed without being unregistered: the kernel forgot it
        if to_bulk:
            self._in_bulk.add(fd)

    def register(self, fileobj, events, data=None):
        key = selectors._BaseSelectorImpl.register(self, fileobj, events, data)
        bulk = key.fd in self._bulk
        try:
            (self._bulk_ep if bulk else self._selector).register(key.fd, self._kernel_mask(events))
        except BaseException:
            selectors._BaseSelectorImpl.unregister(self, fileobj)
            raise
        if bulk:
            self._in_bulk.add(key.fd)
        return key

    def unregister(self, fileobj):
        # The bulk mark stays: asyncio unregisters a descriptor whenever it
        # waits for nothing (Tornado between two reads, around the websocket
        # handshake), and registers it again later. It goes with
        # unmark_bulk(), when the websocket is over.
        key = selectors._BaseSelectorImpl.unregister(self, fileobj)
        ep = self._bulk_ep if key.fd in self._in_bulk else self._selector
        self._in_bulk.discard(key.fd)
        try:
            ep.unregister(key.fd)
        except OSError:
            pass  # closed meanwhile: the kernel forgot it (as selectors does)
        return key

    def modify(self, fileobj, events, data=None):
        fd = self._fileobj_lookup(fileobj)
        key = self._fd_to_key.get(fd)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        if events != key.events:
            ep = self._bulk_ep if fd in self._in_bulk else self._selector
            try:
                ep.modify(fd, self._kernel_mask(events))
            except BaseException:
                selectors._BaseSelectorImpl.unregister(self, fileobj)
                self._in_bulk.discard(fd)
                raise
        if events != key.events or data != key.data:
            key = key._replace(events=events, data=data)
            self._fd_to_key[fd] = key
        return key

    # -- select ---------------------------------------------------------------------

    def _allowance(self, polled: float) -> int:
        """How many bulk events this select hands out: per_turn, or fewer when
        the last turns took more than the time budget per event handed out."""
        if not self._more:  # no storm: nothing to measure
            self._turns.clear()
            return self.per_turn
        if self.budget is None:
            return self.per_turn
        # The last turn was a storm turn: its time, from its poll to this one.
        self._turns.append((polled - self._polled, self._handed))
        handed = sum(n for _, n in self._turns)
        spent = sum(t for t, _ in self._turns)
        if handed == 0 or spent <= 0:
            return self.per_turn
        return max(1, min(self.per_turn, int(self.budget * handed / spent)))

    def _ready(self, fd_event_list, out: list) -> None:
        fd_to_key = self._fd_to_key
        for fd, event in fd_event_list:
            events = 0
            if event & ~select.EPOLLIN:
                events |= selectors.EVENT_WRITE
            if event & ~select.EPOLLOUT:
                events |= selectors.EVENT_READ
            key = fd_to_key.get(fd)
            if key:
                out.append((key, events & key.events))

    def select(self, timeout=None):
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:  # epoll_wait()'s resolution: 1 ms, rounded up (as selectors)
            timeout = math.ceil(timeout * 1e3) * 1e-3
        # Everything but the bulk descriptors, and the bulk set as one.
        max_ev = max(len(self._fd_to_key) - len(self._in_bulk) + 1, 1)
        ready: list = []
        try:
            fd_event_list = self._selector.poll(timeout, max_ev)
        except InterruptedError:
            return ready
        finally:
            self.turn_start = time.perf_counter()
        bulk_fd = self._bulk_ep.fileno()
        bulk_ready = False
        for i, (fd, _) in enumerate(fd_event_list):
            if fd == bulk_fd:
                bulk_ready = True
                del fd_event_list[i]
                break
        self._ready(fd_event_list, ready)
        if not bulk_ready:
            self._more = False
            self.storm_run = 0
            return ready
        # The websocket events: at most the allowance, oldest first. The
        # kernel keeps the rest in its ready list, in order (a descriptor
        # reported and still ready goes to its end).
        polled = time.perf_counter()
        n = self.allowance = self._allowance(polled)
        try:
            bulk_events = self._bulk_ep.poll(0, n)
        except InterruptedError:
            bulk_events = []
        self._ready(bulk_events, ready)
        self._polled = polled
        self._handed = len(bulk_events)
        self._more = len(bulk_events) >= n
        if self._more:
            self.storm_run += 1
            self.storm_turns += 1
        else:
            self.storm_run = 0
        return ready

    def close(self):
        global _current
        if _current is self:
            _current = None
        self._bulk.clear()
        self._in_bulk.clear()
        self._turns.clear()
        self._more = False
        self.storm_run = 0
        self._bulk_ep.close()
        super().close()


# The selector of the running chatd loop (new_loop), for the checks below.
_current: FairSelector | None = None


def storming() -> bool:
    """Whether websocket events have been waiting their turn for a few turns
    in a row: a storm, not a burst (cheap: called for every packet a socket
    sends)."""
    sel = _current
    return sel is not None and sel.storm_run >= STORM_RUN


def waiting(fd: int) -> bool:
    """Whether this descriptor may be waiting its turn: a websocket's, during
    a storm. (The kernel keeps the waiting ones; which they are, only a poll
    would tell.)"""
    sel = _current
    return sel is not None and sel.storm_run >= STORM_RUN and fd in sel._in_bulk


def peer_gone(sock: socket.socket) -> bool:
    """Whether this socket may wait its turn and its peer is gone: what the
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


# pace() on a loop without a FairSelector: when it last went on to a new turn.
_paced = 0.0


async def pace() -> None:
    """Between two items of background work (disconnect handlers, presence
    announcements, relay messages): on to the next loop turn if this one has
    run the selector's ``budget`` since its select() returned, so the turn
    ends and requests waiting on a round trip go on. On a loop that
    :func:`new_loop` did not make (a test's), counted from the last time
    pace() went on."""
    global _paced
    sel = _current
    budget = TURN_BUDGET if sel is None or sel.budget is None else sel.budget
    if time.perf_counter() - (_paced if sel is None else sel.turn_start) > budget:
        await asyncio.sleep(0)
        if sel is None:
            _paced = time.perf_counter()


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
