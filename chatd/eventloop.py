"""chatd's event loop: uvloop, made safe for aiopg; asyncio's own on request.

uvloop runs Tornado and python-socketio unchanged and does the loop's own
work (polling, callbacks, timers) in C: ~5-7% more requests per second on
the REST scenarios of docs/PERFORMANCE.md.

One thing needs care. uvloop keeps one poll handle per file descriptor
*number*, and when a poll operation fails it closes the handle but leaves it
in its table. That happens when a descriptor is closed under a registered
poll, which is what psycopg2 does when PostgreSQL drops a connection: libpq
closes the socket, and aiopg then unregisters a descriptor that is already
gone. The next socket given that number (a client connection Tornado
accepts, a new PostgreSQL connection) then fails to register with "unable to
perform operation on <UVPoll closed=True>", for good: each request on it
answers 500. :class:`Loop` drops such a dead handle and registers again.

Another: writing to a transport whose connection was lost raises
RuntimeError ("the handler is closed") where asyncio's transports drop the
data and let the reader see the loss (uvloop issue #506). redis-py expects
OSError there; a RuntimeError escaped it as a 500 while Redis was cut off.
The transports :class:`Loop` makes for outgoing connections (redis-py's)
raise ConnectionResetError instead, which redis-py turns into its
ConnectionError.

tests/test_faults.py resets, cuts and restarts PostgreSQL and Redis under
load to prove both.

``CHATD_EVENT_LOOP=asyncio`` runs on asyncio's own loop instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

try:
    import uvloop
except ImportError:  # pragma: no cover - a dependency; absent only in odd installs
    uvloop = None

log = logging.getLogger("chatd")

CHOICES = ("uvloop", "asyncio")  # CHATD_EVENT_LOOP (chatd.config)


if uvloop is not None:

    class Loop(uvloop.Loop):
        """uvloop's loop, which forgets a poll handle it closed on an error."""

        def add_reader(self, fd, callback, *args) -> None:
            try:
                super().add_reader(fd, callback, *args)
            except RuntimeError:  # a dead handle for this number: drop it, retry once
                self._forget(fd)
                super().add_reader(fd, callback, *args)

        def add_writer(self, fd, callback, *args) -> None:
            try:
                super().add_writer(fd, callback, *args)
            except RuntimeError:
                self._forget(fd)
                super().add_writer(fd, callback, *args)

        def remove_reader(self, fd) -> bool:
            try:
                return super().remove_reader(fd)
            except OSError:  # the descriptor was closed: uvloop closed its handle
                self._forget(fd)
                raise

        def remove_writer(self, fd) -> bool:
            try:
                return super().remove_writer(fd)
            except OSError:
                self._forget(fd)
                raise

        async def create_connection(self, *args, **kwargs):
            transport, protocol = await super().create_connection(*args, **kwargs)
            return _Transport(transport), protocol

        async def create_unix_connection(self, *args, **kwargs):
            transport, protocol = await super().create_unix_connection(*args, **kwargs)
            return _Transport(transport), protocol

        def _forget(self, fd) -> None:
            # A closed handle has no callbacks left; removing both directions
            # takes it out of uvloop's table. (Any other RuntimeError, such as
            # a closed loop, is raised again by the retry.)
            for remove in (super().remove_reader, super().remove_writer):
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    remove(fd)


class _Transport:
    """A uvloop transport whose writes after the connection is lost raise
    ConnectionResetError (an OSError, as the callers expect) instead of
    RuntimeError. Everything else is the transport's own."""

    __slots__ = ("_transport",)

    def __init__(self, transport) -> None:
        self._transport = transport

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def write(self, data) -> None:
        try:
            self._transport.write(data)
        except RuntimeError as exc:
            raise ConnectionResetError(f"connection lost ({exc})") from exc

    def writelines(self, data) -> None:
        try:
            self._transport.writelines(data)
        except RuntimeError as exc:
            raise ConnectionResetError(f"connection lost ({exc})") from exc


def run(coro, which: str = "uvloop") -> None:
    """Run ``coro`` to completion on the loop ``which`` names (CHOICES);
    asyncio's own when uvloop is not installed."""
    if which == "uvloop" and uvloop is not None:
        log.debug("event loop: uvloop %s", uvloop.__version__)
        with asyncio.Runner(loop_factory=Loop) as runner:
            runner.run(coro)
    else:
        log.debug("event loop: asyncio's own")
        asyncio.run(coro)
