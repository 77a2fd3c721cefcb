"""Per-user rate limits, counted in Redis so they hold across chatd processes.

Two budgets (API.md "Configuration", .env.example):

    sends    RATE_LIMIT_SENDS   default 30/10s   REST POST messages, socket send-message
    events   RATE_LIMIT_EVENTS  default 120/10s  every socket event a client emits

Each is a fixed window per user: the first hit creates ``P:rl:{kind}:{user}``
with the window as its TTL, later hits INCR it; above the budget the caller
gets :class:`~chatd.errors.RateLimited` with ``Retry-After`` = the key's
remaining TTL (so the advice is exact, whichever process counted first). One
Lua script does INCR, the TTL read and the PEXPIRE, so a send pays ONE Redis
round trip and no window ever lives without a TTL.

Fail open: rate limiting protects the service, it is not a correctness rule,
so when Redis does not answer within ``REDIS_TIMEOUT`` the hit is allowed,
logged once, and Redis is left alone for a second (the same breaker as the page
cache) so sends keep flowing from PostgreSQL at full speed. With no Redis
configured at all (one process) the windows are counted in this process.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from .errors import RateLimited

log = logging.getLogger("chatd.limits")

# KEYS[1] window key; ARGV[1] window in ms. Reply {count, remaining ms}.
_HIT = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""

SENDS = "sends"
EVENTS = "events"


class RateLimiter:
    def __init__(
        self,
        client,
        prefix: str,
        budgets: dict[str, tuple[int, float] | None],
        timeout: float = 1.0,
    ):
        self._r = client
        self._prefix = prefix
        self.budgets = dict(budgets)
        self._timeout = timeout
        self._down_until = 0.0
        self._failing = False
        self._local: dict[tuple[str, str], tuple[int, float]] = {}
        self.failed_open = 0  # hits allowed because Redis did not answer
        if client is not None:
            self._hit = client.register_script(_HIT)

    async def check(self, kind: str, user_id: str) -> None:
        """Count one ``kind`` action of ``user_id``; RateLimited when over budget.
        A budget that is None (``off``) costs nothing, not even a round trip."""
        budget = self.budgets.get(kind)
        if budget is None:
            return
        limit, period = budget
        if self._r is None:
            count, remaining = self._count_locally(kind, user_id, period)
        else:
            if time.monotonic() < self._down_until:
                self.failed_open += 1
                return
            key = f"{self._prefix}:rl:{kind}:{user_id}"
            try:
                count, remaining_ms = await asyncio.wait_for(
                    self._hit(keys=[key], args=[int(period * 1000)]), self._timeout
                )
            except (RedisError, OSError, TimeoutError) as exc:
                if not self._failing:  # once per outage, not once per request
                    log.warning("rate limits off: Redis does not answer (%s)", exc or "timeout")
                    self._failing = True
                self._down_until = time.monotonic() + 1.0
                self.failed_open += 1
                return
            if self._failing:
                log.warning("rate limits on again: Redis answers")
                self._failing = False
            remaining = int(remaining_ms) / 1000.0
        if int(count) > limit:
            what = "messages" if kind == SENDS else "socket events"
            raise RateLimited(
                f"too many {what}: at most {limit} per {period:g}s, retry in {remaining:.1f}s",
                retry_after=remaining,
            )

    def _count_locally(self, kind: str, user_id: str, period: float) -> tuple[int, float]:
        now = time.monotonic()
        key = (kind, user_id)
        count, ends = self._local.get(key, (0, 0.0))
        if now >= ends:
            count, ends = 0, now + period
            if len(self._local) > 100_000:  # bound the memory: drop finished windows
                self._local = {k: v for k, v in self._local.items() if v[1] > now}
        self._local[key] = (count + 1, ends)
        return count + 1, ends - now
