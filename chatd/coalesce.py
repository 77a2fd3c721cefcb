"""Calls made in the same event-loop iteration, sent to a store together.

Under load, many requests reach the same kind of store call in one event-loop
iteration (one select() wakes several sockets). Each call on its own costs a
round trip, a pooled connection and, in redis-py or aiopg, tens of µs of
Python. A :class:`Coalescer` lets the first call of an iteration wait for the
rest of that iteration, then sends every call made meanwhile at once (a Redis
pipeline, one SQL statement over many inputs), in call order. A lone call
goes out on its own, one loop iteration later than it would have.

Every caller gets its own result or its own exception, as if it had made the
call itself; a failed batch fails each of its calls. A cancelled caller
affects no one else: each batch runs in a task of its own and answers its
callers' futures. A call cancelled before its batch leaves is not sent, and
a batch whose callers were all cancelled is cancelled too (as a call made
alone would be).

:meth:`Coalescer.fail_all` answers every call not yet answered with one
exception at once (a store that stopped answering: chatd.redishealth).

:meth:`Coalescer.submit` queues a call and returns its future at once, so a
request can put two calls (say an access check and a cache read) in one
iteration's batches without a Task for each, as ``asyncio.gather`` needs.
"""

from __future__ import annotations

import asyncio

# More than this many calls in one iteration go out as several batches.
MAX_BATCH = 128


class Coalescer:
    """Subclasses say how to send one call (``one``) and many (``many``)."""

    def __init__(self) -> None:
        self._open: list | None = None  # the batch gathering in this iteration
        self._task: asyncio.Task | None = None  # the task that will send it
        self.batches = 0  # batches of more than one call sent (for tests, metrics)
        # The batches gathering or in flight (their tasks kept referenced), by
        # the futures they answer.
        self._sending: dict[asyncio.Future, tuple[asyncio.Task, list]] = {}

    async def one(self, call):
        raise NotImplementedError

    async def many(self, calls: list) -> list:
        """Results (or exceptions) for ``calls``, in order."""
        raise NotImplementedError

    def submit(self, call) -> asyncio.Future:
        """Queue ``call`` with the others of this loop iteration; the future
        gets its result or its exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        batch = self._open
        if batch is None or len(batch) >= MAX_BATCH:
            batch = self._open = []
            # The batch leaves from a task of its own. A task's first step is
            # scheduled like any callback, after everything already ready in
            # this iteration (the calls that join the batch), as a task's
            # `await asyncio.sleep(0)` would; and the task answers its
            # callers itself, so a call costs no loop turn beyond its round
            # trip's own (each turn is one more wait when the loop is busy).
            self._task = loop.create_task(self._flush(batch))
        batch.append((call, future))
        self._sending[future] = (self._task, batch)
        return future

    async def run(self, call):
        future = self.submit(call)
        try:
            return await future
        except asyncio.CancelledError:
            self.discard(future)
            raise

    def discard(self, future: asyncio.Future) -> None:
        """Give up on a submitted call: it is not sent if its batch has not
        left yet, and a batch whose callers all gave up is stopped (a call
        cut short by a timeout must not hold its connection on). A call that
        failed meanwhile has its exception taken, so asyncio does not log it."""
        future.cancel()
        if not future.cancelled():  # it had finished
            future.exception()
            return
        sending = self._sending.get(future)
        if sending is None:
            return
        task, batch = sending
        # (A batch still gathering stays open: its task sends whoever else
        # joins it, or nothing.)
        if batch is not self._open and all(f.cancelled() for _, f in batch):
            for _, f in batch:
                self._sending.pop(f, None)
            task.cancel()

    def fail_all(self, exc: Exception) -> list[asyncio.Task]:
        """Fail every call not yet answered with ``exc``, now: the ones
        gathering in this iteration (they are not sent) and the ones in
        flight (their batches are stopped, so a hung store holds no caller
        for its timeout). The batch running this (if any) finishes on its
        own. The batches stopped (to wait for, at shutdown)."""
        self._open = None
        current = asyncio.current_task()
        stopped = set()
        for future, (task, _) in list(self._sending.items()):
            if not future.done():
                future.set_exception(exc)
            if task is not current:
                del self._sending[future]
                if task not in stopped:
                    stopped.add(task)
                    task.cancel()
        return list(stopped)

    async def _flush(self, batch: list) -> None:
        if self._open is batch:
            self._open = None
        live = [entry for entry in batch if not entry[1].done()]  # cancelled: not sent
        try:
            if not live:
                return
            if len(live) == 1:
                results = [await self.one(live[0][0])]
            else:
                self.batches += 1
                results = await self.many([call for call, _ in live])
        except BaseException as exc:  # each caller gets it (a cancel: its own)
            _answer(live, [asyncio.CancelledError() if isinstance(exc, asyncio.CancelledError)
                           else exc] * len(live))  # fmt: skip
            if not isinstance(exc, Exception):
                raise
        else:
            _answer(live, results)
        finally:
            for _, future in batch:
                self._sending.pop(future, None)


def _answer(entries: list, results: list) -> None:
    for (_, future), result in zip(entries, results, strict=True):
        if future.done():  # its caller is gone
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
