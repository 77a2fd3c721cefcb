# ruff: noqa: ASYNC220, ASYNC230, ASYNC240 - a benchmark driver: blocking set-up is fine
"""The Socket.IO relay across N chatd processes (issue 16): publications
received per process, CPU per process, send -> socket latency.

    .venv/bin/python bench/relay_scale.py [--procs 1,2,4,8] [--chats 64]
        [--rate 128] [--duration 10] [--cluster] [--code DIR] [--label after]
        [--pg postgresql://postgres@127.0.0.1:5432/postgres]

For each N: a fresh database, a private redis-server (or, with ``--cluster``, a
private 3-master Redis Cluster: tests/faults.py), N chatd processes
(``python -m chatd``, the code in ``--code``, default this checkout), 64 chats
with one socket each, the socket of chat i on process i % N (each process holds
1/N of the chats). Then ``--rate`` messages/s in total for ``--duration`` s,
round-robin over the chats, each sent over REST to the NEXT process ((i + 1) %
N), so that with N > 1 every message crosses processes through Redis.

Per process: publications received from Redis during the send phase (chatd's
``chatd_relay_received_total``; a build without it, such as main's one-channel
relay, receives every publication of the channel, counted by Redis as the
PUBLISH calls, scripts included), CPU (user + system, /proc) per second of the
phase, and the p50/p99 from the POST being sent to the socket getting the
message. Prints one JSON line per N. To compare with the one-channel relay:

    git archive main | tar -x -C /tmp/chatd-main
    .venv/bin/python bench/relay_scale.py --code /tmp/chatd-main --label before
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg2
import redis
from tornado.httpclient import AsyncHTTPClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatd import migrations  # noqa: E402
from chatd.auth import mint  # noqa: E402
from tests.faults import RedisClusterServers, RedisServer  # noqa: E402
from tests.rawsocket import RawSocket  # noqa: E402

SECRET = "bench-secret-0123456789abcdef0123456789"
TICK = os.sysconf("SC_CLK_TCK")


def tok(user: str) -> str:
    return mint(SECRET, user, 3600)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


class Timed(list):
    """RawSocket.events that also notes when each event arrived."""

    def append(self, item) -> None:
        super().append((time.perf_counter(), item))


def publish_calls(clients: list[redis.Redis]) -> int:
    """PUBLISH + SPUBLISH calls so far (scripts' included), over every node."""
    total = 0
    for client in clients:
        stats = client.info("commandstats")
        for name in ("cmdstat_publish", "cmdstat_spublish"):
            total += stats.get(name, {}).get("calls", 0)
    return total


async def relay_metrics(http: AsyncHTTPClient, url: str) -> dict[str, float]:
    body = (await http.fetch(url + "/metrics", request_timeout=30)).body.decode()
    return {
        m.group(1): float(m.group(2)) for m in re.finditer(r"^(chatd_relay_\w+) (\S+)$", body, re.M)
    }


async def run(a, n: int) -> dict:
    admin = a.pg
    db = f"chatd_bench_{secrets.token_hex(4)}"
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{db}"')
    conn.close()
    db_url = urlunsplit(urlsplit(admin)._replace(path="/" + db))
    migrations.migrate(db_url)
    prefix = f"chatd-bench:{secrets.token_hex(4)}"
    if a.cluster:
        store = RedisClusterServers().start()
        redis_env = {"REDIS_CLUSTER_NODES": store.nodes}
        nodes = [redis.Redis(port=s.port) for s in store.servers]
    else:
        store = RedisServer().start()
        redis_env = {"REDIS_URL": store.url}
        nodes = [redis.Redis(port=store.port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
    env.update({
        "DATABASE_URL": db_url, "ACCESS_TOKEN_SECRET": SECRET, **redis_env,
        "CHATD_REDIS_PREFIX": prefix, "SOCKETIO_CHANNEL": f"{prefix}:socketio",
        "CHATPORT": "0", "CHATD_HOST": "127.0.0.1", "LOG_LEVEL": "warning",
        "RATE_LIMIT_SENDS": "1000000/1s", "RATE_LIMIT_EVENTS": "1000000/1s",
        "PYTHONPATH": str(Path(a.code).resolve()),
    })  # fmt: skip
    procs: list[tuple[subprocess.Popen, Path]] = []
    http = AsyncHTTPClient(max_clients=64)
    socks: list[RawSocket] = []
    try:
        for i in range(n):
            log_path = Path(f"/tmp/chatd-relay-{os.getpid()}-{i}.log")
            log = open(log_path, "wb")  # noqa: SIM115
            cmd = [sys.executable, "-m", "chatd"]
            proc = subprocess.Popen(
                cmd, env={**env, "LOG_LEVEL": "info"}, stdout=log, stderr=subprocess.STDOUT,
                cwd="/tmp",
            )  # fmt: skip
            procs.append((proc, log_path))
        urls = []
        for proc, log_path in procs:
            for _ in range(600):
                m = re.search(r"listening on http://[^:]+:(\d+)", log_path.read_text())
                if m:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(log_path.read_text())
                await asyncio.sleep(0.05)
            urls.append(f"http://127.0.0.1:{m.group(1)}")

        async def post(url: str, path: str, body: dict, user: str) -> int:
            try:
                resp = await http.fetch(
                    url + path, method="POST", raise_error=False, request_timeout=60,
                    headers={"Authorization": f"Bearer {tok(user)}",
                             "Content-Type": "application/json"},
                    body=orjson.dumps(body),
                )  # fmt: skip
            except Exception:  # a timeout on an overloaded machine: counted as not ok
                return 599
            return resp.code

        for c in range(a.chats):
            code = await post(urls[0], "/chats", {"id": f"c{c}", "title": "relay"}, f"r{c}")
            assert code == 201, code
            s = await RawSocket.open(urls[c % n], tok(f"r{c}"))
            s.events = Timed()
            assert (await s.call("join-chat", f"c{c}"))["ok"]
            socks.append(s)
        await asyncio.sleep(1.0)  # the joins' presence events are through

        pids = [p.pid for p, _ in procs]
        has_metrics = bool(await relay_metrics(http, urls[0]))
        before_m = [await relay_metrics(http, u) for u in urls]
        before_cpu = [cpu_seconds(p) for p in pids]
        before_pub = publish_calls(nodes)
        t_start = time.perf_counter()

        total = int(a.rate * a.duration)
        sent_at: dict[str, float] = {}
        codes: list[int] = []
        pending: set[asyncio.Future] = set()
        for k in range(total):
            due = t_start + k / a.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            c = k % a.chats
            content = f"b{k}"
            sent_at[content] = time.perf_counter()
            fut = asyncio.ensure_future(
                post(urls[(c + 1) % n], f"/chats/c{c}/messages", {"content": content}, f"r{c}")
            )
            fut.add_done_callback(lambda f: codes.append(f.result()))
            pending.add(fut)
            fut.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
        elapsed = time.perf_counter() - t_start

        def arrived() -> dict[str, float]:
            got = {}
            for s in socks:
                for t, (name, data) in s.events:
                    if name == "new-message" and isinstance(data, dict):
                        got.setdefault(data.get("content"), t)
            return got

        deadline = time.perf_counter() + 10
        while len(arrived()) < total and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        phase = time.perf_counter() - t_start
        after_cpu = [cpu_seconds(p) for p in pids]
        after_m = [await relay_metrics(http, u) for u in urls]
        after_pub = publish_calls(nodes)
        got = arrived()
        lat = [(got[c] - sent_at[c]) * 1000 for c in sent_at if c in got]
        publications = after_pub - before_pub
        if has_metrics:
            received = [
                after_m[i]["chatd_relay_received_total"] - before_m[i]["chatd_relay_received_total"]
                for i in range(n)
            ]
            channels = [after_m[i]["chatd_relay_channels"] for i in range(n)]
        else:  # one channel: every process receives every publication
            received = [publications] * n
            channels = [1] * n
        cpu = [(after_cpu[i] - before_cpu[i]) / phase * 1000 for i in range(n)]
        return {
            "label": a.label, "store": "cluster" if a.cluster else "redis", "procs": n,
            "chats": a.chats, "sent": total, "send_s": round(elapsed, 2),
            "ok": sum(1 for x in codes if x == 201), "delivered": len(lat),
            "publications": publications,
            "received_per_proc_mean": round(statistics.mean(received), 1),
            "received_per_proc_max": max(received),
            "received_share": round(statistics.mean(received) / max(publications, 1), 3),
            "channels_per_proc": channels,
            "cpu_ms_per_s_per_proc": round(statistics.mean(cpu), 1),
            "cpu_ms_per_s_max": round(max(cpu), 1),
            "p50_ms": round(pct(lat, 0.5), 1), "p99_ms": round(pct(lat, 0.99), 1),
            "load": Path("/proc/loadavg").read_text().split()[0],
        }  # fmt: skip
    finally:
        for s in socks:
            s.abort()
        for proc, _ in procs:
            proc.terminate()
        for proc, log_path in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            log_path.unlink(missing_ok=True)
        for client in nodes:
            client.close()
        store.close()
        conn = psycopg2.connect(admin)
        conn.autocommit = True
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2,4,8")
    p.add_argument("--chats", type=int, default=64)
    p.add_argument("--rate", type=float, default=128.0, help="messages per second, in total")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--cluster", action="store_true", help="a private 3-master Redis Cluster")
    p.add_argument("--code", default=str(ROOT), help="the chatd checkout the processes run")
    p.add_argument("--label", default="after")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    a = p.parse_args()
    for n in [int(x) for x in a.procs.split(",")]:
        print(orjson.dumps(await run(a, n)).decode(), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
