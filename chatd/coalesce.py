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
affects no one else: the batch runs in a task of its own (shielded from the
first caller's cancellation), so the others are answered as usual.
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
        self._sending: set[asyncio.Task] = set()  # batches in flight (kept referenced)

    async def one(self, call):
        raise NotImplementedError

    async def many(self, calls: list) -> list:
        """Results (or exceptions) for ``calls``, in order."""
        raise NotImplementedError

    async def run(self, call):
        if self._open is not None and len(self._open) < MAX_BATCH:
            future = asyncio.get_running_loop().create_future()
            self._open.append((call, future))
            return await future
        batch = self._open = [(call, None)]
        try:
            await asyncio.sleep(0)  # the rest of this iteration's calls join
        except BaseException:  # cancelled while gathering: the others still go
            if self._open is batch:
                self._open = None
            if len(batch) > 1:
                self._launch(batch[1:])
            raise
        if self._open is batch:
            self._open = None
        if len(batch) == 1:
            return await self.one(call)
        results = await asyncio.shield(self._launch(batch))
        if isinstance(results[0], BaseException):
            raise results[0]
        return results[0]

    def _launch(self, batch: list) -> asyncio.Task:
        """Send ``batch`` in a task of its own, which answers its waiting callers."""
        self.batches += 1
        task = asyncio.get_running_loop().create_task(self.many([c for c, _ in batch]))
        self._sending.add(task)

        def answer(done: asyncio.Task) -> None:
            self._sending.discard(done)
            if done.cancelled():
                results = [asyncio.CancelledError()] * len(batch)
            elif done.exception() is not None:
                results = [done.exception()] * len(batch)
            else:
                results = done.result()
            for (_, future), result in zip(batch, results, strict=True):
                if future is None or future.done():  # the first caller, or gone
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

        task.add_done_callback(answer)
        return task
