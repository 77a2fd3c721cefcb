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
        self.batches = 0  # batches of more than one call sent (for tests, metrics)
        # The batches in flight (kept referenced), by the futures they answer.
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
            # Callbacks run in the order they were scheduled: this one runs
            # after everything already ready in this iteration (the calls that
            # join the batch), as a task's `await asyncio.sleep(0)` would.
            loop.call_soon(self._send, batch)
        batch.append((call, future))
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
        if sending is not None and all(f.cancelled() for _, f in sending[1]):
            sending[0].cancel()

    def fail_all(self, exc: Exception) -> list[asyncio.Task]:
        """Fail every call not yet answered with ``exc``, now: the ones
        gathering in this iteration (they are not sent) and the ones in
        flight (their batches are stopped, so a hung store holds no caller
        for its timeout). The batch running this (if any) finishes on its
        own. The batches stopped (to wait for, at shutdown)."""
        gathering, self._open = self._open, None
        current = asyncio.current_task()
        stopped = set()
        for _, future in gathering or ():
            if not future.done():
                future.set_exception(exc)
        for future, (task, _) in list(self._sending.items()):
            if not future.done():
                future.set_exception(exc)
            if task is not current and task not in stopped:
                stopped.add(task)
                task.cancel()
        return list(stopped)

    def _send(self, batch: list) -> None:
        if self._open is batch:
            self._open = None
        batch = [entry for entry in batch if not entry[1].done()]  # cancelled: not sent
        if not batch:
            return
        if len(batch) == 1:
            task = asyncio.get_running_loop().create_task(self._alone(batch[0][0]))
        else:
            self.batches += 1
            task = asyncio.get_running_loop().create_task(self.many([c for c, _ in batch]))
        for _, future in batch:
            self._sending[future] = (task, batch)

        def answer(done: asyncio.Task) -> None:
            for _, future in batch:
                del self._sending[future]
            if done.cancelled():
                results = [asyncio.CancelledError()] * len(batch)
            elif done.exception() is not None:
                results = [done.exception()] * len(batch)
            else:
                results = done.result()
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller is gone
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

        task.add_done_callback(answer)

    async def _alone(self, call) -> list:
        return [await self.one(call)]
