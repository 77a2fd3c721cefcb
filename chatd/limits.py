"""Per-user rate limits, counted in Redis so they hold across chatd processes.

Two budgets (API.md "Configuration", .env.example):

    sends    RATE_LIMIT_SENDS   default 30/10s   REST POST messages, socket send-message
    events   RATE_LIMIT_EVENTS  default 120/10s  every socket event a client emits

Each is a fixed window per user: the first hit creates ``P:rl:{user}:kind``
with the window as its TTL, later hits INCR it; above the budget the caller
gets :class:`~chatd.errors.RateLimited` with ``Retry-After`` = the key's
remaining TTL (so the advice is exact, whichever process counted first). One
Lua script does INCR, the TTL read and the PEXPIRE, so a send pays ONE Redis
round trip and no window ever lives without a TTL.

Fail open: rate limiting protects the service, it is not a correctness rule,
so when Redis does not answer within ``REDIS_TIMEOUT`` the hit is allowed and
logged once per outage; while the breaker shared by every use of Redis is open
(chatd.redishealth), every hit is allowed without a round trip, so sends keep
flowing from PostgreSQL at full speed. With no Redis configured at all (one
process) the windows are counted in this process.
"""

from __future__ import annotations

import logging
import time

from redis.exceptions import RedisError

from . import autopipe
from .errors import RateLimited

log = logging.getLogger("chatd.limits")

# KEYS: window keys; ARGV[i]: the window of KEYS[i] in ms. Reply: for each
# key its count and remaining ms, flattened. Several budgets (a socket
# send-message counts as a send and as an event) still cost one round trip.
_HIT = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then
    redis.call('PEXPIRE', key, ARGV[i])
    ttl = tonumber(ARGV[i])
  end
  out[#out + 1] = n
  out[#out + 1] = ttl
end
return out
"""

SENDS = "sends"
EVENTS = "events"


class RateLimiter:
    def __init__(
        self,
        client,
        prefix: str,
        budgets: dict[str, tuple[int, float] | None],
    ):
        self._r = client
        self._prefix = prefix
        self.budgets = dict(budgets)
        self._failing = False
        self._local: dict[tuple[str, str], tuple[int, float]] = {}
        self.failed_open = 0  # hits allowed because Redis did not answer
        if client is not None:
            self._hit = client.register_script(_HIT)
            self._batch = autopipe.batcher(client)

    async def check(self, user_id: str, *kinds: str) -> None:
        """Count one action of ``user_id`` against each budget in ``kinds`` (one
        Redis round trip for all); RateLimited when any is over. A budget that
        is None (``off``) costs nothing."""
        budgets = [(k, self.budgets[k]) for k in kinds if self.budgets.get(k) is not None]
        if not budgets:
            return
        if self._r is None:
            counts = [self._count_locally(k, user_id, b[1]) for k, b in budgets]
        else:
            if not self._batch.health.up:  # the shared breaker: no round trip
                self._fail_open("Redis is not answering")
                return
            # The {user} hash tag keeps one user's windows in one Cluster slot,
            # as a multi-key script needs.
            keys = [f"{self._prefix}:rl:{{{user_id}}}:{k}" for k, _ in budgets]
            windows = [int(b[1] * 1000) for _, b in budgets]
            try:
                # Bounded by REDIS_TIMEOUT (the Batcher), released at once when
                # another call's timeout opens the breaker.
                reply = await self._batch.run(self._hit, keys, windows)
            except (RedisError, OSError) as exc:
                self._fail_open(exc)
                return
            if self._failing:
                log.warning("rate limits on again: Redis answers")
                self._failing = False
            counts = [(int(reply[i]), int(reply[i + 1]) / 1000.0) for i in range(0, len(reply), 2)]
        for (kind, (limit, period)), (count, remaining) in zip(budgets, counts, strict=True):
            if count > limit:
                what = "messages" if kind == SENDS else "socket events"
                raise RateLimited(
                    f"too many {what}: at most {limit} per {period:g}s, retry in {remaining:.1f}s",
                    retry_after=remaining,
                )

    def _fail_open(self, why) -> None:
        if not self._failing:  # once per outage, not once per request
            log.warning("rate limits off: %s", why)
            self._failing = True
        self.failed_open += 1

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
