"""A hung Redis under REST senders: send latency before, during and after.

Starts a private redis-server (tests/faults.py) and one chatd process on it,
then runs SENDERS REST senders (each its own user, all to one chat, so sends
also queue behind each other's transaction) and one history reader:

    before   --before s   Redis answering
    hung     --hang s     redis-server stopped with SIGSTOP (connections
                          open, nothing answers)
    after    --after s    SIGCONT: Redis answering again

and prints p50/p99/max per phase and kind, non-2xx counts, and how long after
SIGCONT the first send was published through Redis again (a socket on a
second chatd process got it) and a read was a cache hit again.

    .venv/bin/python bench/redis_hang.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

The database gets a chat of its own (a fresh id per run); rate limits are on
with a budget no sender reaches (so every send still makes its Redis call).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faults import RedisServer  # noqa: E402
from tests.helpers import SECRET, Api, ChatdProcess, SocketClient  # noqa: E402


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def cache_hits(api: Api) -> float:
    text = (await api.get("/metrics", user=None)).body.decode()
    return float(re.search(r"^chatd_cache_hits_total (\S+)$", text, re.M).group(1))


async def main(args) -> dict:
    redis = RedisServer().start()
    prefix = f"bench-hang-{uuid.uuid4().hex[:8]}"
    env = {
        "DATABASE_URL": args.database_url,
        "REDIS_URL": redis.url,
        "REDIS_TIMEOUT": str(args.redis_timeout),
        "ACCESS_TOKEN_SECRET": SECRET,
        "CHATD_REDIS_PREFIX": prefix,
        "SOCKETIO_CHANNEL": f"{prefix}:socketio",
        "CHATPORT": "0",
        "CHATD_HOST": "127.0.0.1",
        "LOG_LEVEL": "info",  # ChatdProcess.start waits for the "listening" line
        "RATE_LIMIT_SENDS": "1000000/10s",
        "RATE_LIMIT_EVENTS": "1000000/10s",
    }
    procs = [ChatdProcess.start(env), ChatdProcess.start(env)]
    api = Api(procs[0].url)
    chat_id = f"hang-{uuid.uuid4().hex[:12]}"
    users = [f"sender{n}" for n in range(args.senders)]
    listener = None
    try:
        await api.create_chat(chat_id, members=[*users, "watcher"])
        for i in range(5):
            await api.send(chat_id, f"warm {i}")
        await api.get(f"/chats/{chat_id}/messages")
        listener = await SocketClient(procs[1].url, user="watcher").connect()
        assert (await listener.call("join-chat", chat_id))["ok"]

        records: list[tuple[float, float, str, int]] = []  # started, ended, kind, status
        stop = asyncio.Event()

        async def timed(kind: str, call) -> None:
            started = time.monotonic()
            try:
                status = (await call).status
            except Exception:
                status = 0
            records.append((started, time.monotonic(), kind, status))

        async def sender(user: str) -> None:
            i = 0
            while not stop.is_set():
                await timed("send", api.send(chat_id, f"{user} {i}", user=user))
                i += 1
                await asyncio.sleep(args.pause)

        async def reader() -> None:
            while not stop.is_set():
                await timed("read", api.get(f"/chats/{chat_id}/messages"))
                await asyncio.sleep(args.pause * 4)

        tasks = [asyncio.ensure_future(sender(u)) for u in users]
        tasks.append(asyncio.ensure_future(reader()))
        await asyncio.sleep(args.before)
        stopped = time.monotonic()
        os.kill(redis.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(args.hang)
        os.kill(redis.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()

        # How soon after SIGCONT: a send from process 0 reaches the socket on
        # process 1 (published through Redis), and a read is a cache hit.
        fanout_back = cache_back = None
        hits = await cache_hits(api)
        while time.monotonic() - resumed < args.after and None in (fanout_back, cache_back):
            if fanout_back is None:
                sent = (await api.send(chat_id, "probe", user="watcher")).json["id"]
                try:
                    await listener.wait_for("new-message", lambda m, i=sent: m["id"] == i, 0.1)
                    fanout_back = time.monotonic() - resumed
                except TimeoutError:
                    pass
            if cache_back is None and await cache_hits(api) > hits:
                cache_back = time.monotonic() - resumed
            await asyncio.sleep(0.02)
        left = args.after - (time.monotonic() - resumed)
        if left > 0:
            await asyncio.sleep(left)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        if listener is not None:
            await listener.close()
        for proc in procs:
            proc.stop()
        redis.close()

    def phase(started: float, ended: float) -> str:
        # A request in flight when Redis stopped counts as "hung"; one in
        # flight when it resumed too (it may have waited for Redis).
        if ended < stopped:
            return "before"
        return "hung" if started < resumed else "after"

    out = {"redis_timeout": args.redis_timeout, "senders": args.senders, "phases": {}}
    for ph in ("before", "hung", "after"):
        for kind in ("send", "read"):
            mine = [r for r in records if r[2] == kind and phase(r[0], r[1]) == ph]
            took = [r[1] - r[0] for r in mine]
            bad = sum(1 for r in mine if not 200 <= r[3] < 300)
            out["phases"][f"{ph} {kind}"] = {
                "n": len(took),
                "p50_ms": round(pct(took, 50) * 1000, 1),
                "p99_ms": round(pct(took, 99) * 1000, 1),
                "max_ms": round(max(took, default=float("nan")) * 1000, 1),
                "non_2xx": bad,
            }
    out["fanout_back_s"] = None if fanout_back is None else round(fanout_back, 3)
    out["cache_back_s"] = None if cache_back is None else round(cache_back, 3)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"), required=False)
    parser.add_argument("--redis-timeout", type=float, default=1.0)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--before", type=float, default=10.0)
    parser.add_argument("--hang", type=float, default=20.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--pause", type=float, default=0.01, help="pause between sends (s)")
    parsed = parser.parse_args()
    if not parsed.database_url:
        parser.error("--database-url (or DATABASE_URL) is required")
    result = asyncio.run(main(parsed))
    print(json.dumps(result, indent=1))
    print(f"\n{'phase':<12}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'non-2xx':>9}")
    for name, row in result["phases"].items():
        print(f"{name:<12}{row['n']:>6}{row['p50_ms']:>9}{row['p99_ms']:>9}{row['max_ms']:>9}"
              f"{row['non_2xx']:>9}")  # fmt: skip
    print(f"after SIGCONT: fan-out back in {result['fanout_back_s']} s, "
          f"cache hits in {result['cache_back_s']} s")  # fmt: skip
