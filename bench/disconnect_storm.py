# ruff: noqa: ASYNC220, ASYNC230, ASYNC240 - a benchmark driver: blocking set-up is fine
"""Disconnect storm: N websockets dropped at once, and join-chat vs N.

    .venv/bin/python bench/disconnect_storm.py [--sockets 10000] [--chats 100]
        [--pg postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis redis://127.0.0.1:6379/0] [--senders 3] [--profile out.prof]
        [--turns out.jsonl]

Starts its own chatd (python -m chatd, on a fresh database and Redis prefix),
then:

1. join-chat p50 on a probe socket with ~100 sockets connected;
2. a holder process opens N websockets (user ``u{i}``, each joined to one
   public chat ``c{i % chats}``), and a keeper socket per chat stays (users
   ``k{j}``; ``u0`` also keeps a second socket, to check that a user with a
   socket left stays online);
3. join-chat p50 again, with N sockets connected;
4. the holder is SIGKILLed: the kernel closes its N connections at once.
   Meanwhile /healthz and a REST send to each of the first ``--senders``
   chats (by its keeper) are sampled every 20 ms (each sampler waits for its
   previous answer) until chatd reports the sockets gone: with 3 senders,
   ~200 sends per storm, so the p99 is not just the slowest one;
5. presence in Redis must then hold exactly the keepers (and u0).

Prints one JSON line of figures: the samples' latencies before the storm,
during it (until presence settled) and in its first WINDOW_S seconds (the
same span whatever the storm's length). ``--profile`` runs chatd under
cProfile (written when it stops), for finding where a disconnect's time goes;
``--turns`` times every event-loop turn of the storm instead (see
serve_traced).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg2
import redis
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatd import migrations  # noqa: E402
from chatd.auth import mint  # noqa: E402
from tests.rawsocket import RawSocket  # noqa: E402

PROBE_CHATS = 10
# The window after the kill of the *_first_s figures (seconds).
WINDOW_S = 3.0
# --turns: the turns written one by one (seconds and more).
LONG_TURN_S = 0.01
# --turns: the storm's turns counted by duration, under each of these (ms).
TURN_EDGES_MS = (1, 2, 5, 10, 20, 50, 100)
SECRET = "bench-secret-0123456789abcdef0123456789"


def tok(user: str) -> str:
    return mint(SECRET, user, 3600)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def window(samples: list, since: float) -> list:
    """p50 / p99 / max (ms) of the samples answered within WINDOW_S of ``since``."""
    dts = [dt for ts, _, dt in samples if ts - since <= WINDOW_S]
    return [round(pct(dts, q) * 1000, 1) for q in (0.5, 0.99, 1.0)]


def slowest(samples: list, since: float, n: int = 3) -> list:
    top = sorted(samples, key=lambda s: -s[2])[:n]
    return [[round(ts - since, 2), round(dt * 1000, 1)] for ts, _, dt in top]


# -- the holder: N sockets in a process of their own ------------------------------


async def hold(url: str, n: int, chats: int) -> None:
    sem = asyncio.Semaphore(64)
    socks = []

    async def one(i: int) -> None:
        async with sem:
            s = await RawSocket.open(url, tok(f"u{i}"))
            ack = await s.call("join-chat", f"c{i % chats}", 60)
            assert ack["ok"], ack
            socks.append(s)

    await asyncio.gather(*(one(i) for i in range(n)))
    print("ready", len(socks), flush=True)
    await asyncio.Event().wait()  # until killed


# -- the bench ----------------------------------------------------------------------


class Run:
    def __init__(self, args):
        self.args = args
        # /healthz, /metrics and the senders, each one request at a time
        self.http = AsyncHTTPClient(max_clients=args.senders + 3)
        self.url = ""

    async def req(self, method: str, path: str, body=None, user="k0") -> tuple[int, float]:
        t = time.perf_counter()
        try:
            resp = await self.http.fetch(
                self.url + path, method=method, raise_error=False, request_timeout=60,
                headers={"Authorization": f"Bearer {tok(user)}",
                         "Content-Type": "application/json"},
                body=orjson.dumps(body) if body is not None else None,
            )  # fmt: skip
            code = resp.code
        except HTTPClientError as exc:
            code = exc.code
        return code, time.perf_counter() - t

    async def sockets(self) -> int:
        resp = await self.http.fetch(self.url + "/metrics", raise_error=False, request_timeout=300)
        m = re.search(rb"^chatd_sockets_connected (\S+)", resp.body, re.M)
        return int(float(m.group(1))) if m else -1

    async def join_p50(self, sock: RawSocket, rounds: int = 200) -> float:
        """join-chat (then leave-chat) on chats nobody else is in: the same
        work at any number of sockets, unless something walks them all."""
        times = []
        for i in range(rounds):
            chat = f"p{i % PROBE_CHATS}"
            t = time.perf_counter()
            ack = await sock.call("join-chat", chat)
            times.append(time.perf_counter() - t)
            assert ack["ok"], ack
            await sock.call("leave-chat", chat)
        return statistics.median(times) * 1000

    async def sample(self, stop: asyncio.Event, path: str, body, out: list, user="k0") -> None:
        method = "POST" if body is not None else "GET"
        while not stop.is_set():
            code, dt = await self.req(method, path, body, user)
            out.append((time.monotonic(), code, dt))
            await asyncio.sleep(0.02)

    async def main(self) -> dict:
        a = self.args
        admin = a.pg
        db = f"chatd_bench_{secrets.token_hex(4)}"
        conn = psycopg2.connect(admin)
        conn.autocommit = True
        conn.cursor().execute(f'CREATE DATABASE "{db}"')
        conn.close()
        db_url = urlunsplit(urlsplit(admin)._replace(path="/" + db))
        migrations.migrate(db_url)
        prefix = f"chatd-bench:{secrets.token_hex(4)}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))}
        env.update({
            "DATABASE_URL": db_url, "REDIS_URL": a.redis, "ACCESS_TOKEN_SECRET": SECRET,
            "CHATD_REDIS_PREFIX": prefix, "SOCKETIO_CHANNEL": f"{prefix}:socketio",
            "CHATPORT": "0", "CHATD_HOST": "127.0.0.1", "LOG_LEVEL": a.log_level,
            "RATE_LIMIT_SENDS": "1000000/1s", "RATE_LIMIT_EVENTS": "1000000/1s",
        })  # fmt: skip
        log_path = Path(f"/tmp/chatd-storm-{os.getpid()}.log")
        cmd = [sys.executable, "-m", "chatd"]
        if a.profile:
            cmd = [sys.executable, str(ROOT / "bench" / "disconnect_storm.py"), "--serve-profiled",
                   a.profile]  # fmt: skip
        elif a.turns:
            cmd = [sys.executable, str(ROOT / "bench" / "disconnect_storm.py"), "--serve-traced",
                   a.turns]  # fmt: skip
        log = open(log_path, "wb")  # noqa: SIM115
        chatd = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/tmp")
        holder = None
        r = redis.Redis.from_url(a.redis)
        try:
            for _ in range(600):
                m = re.search(r"listening on http://[^:]+:(\d+)", log_path.read_text())
                if m:
                    break
                if chatd.poll() is not None:
                    raise RuntimeError(log_path.read_text())
                await asyncio.sleep(0.05)
            self.url = f"http://127.0.0.1:{m.group(1)}"
            for c in [f"c{i}" for i in range(a.chats)] + [f"p{i}" for i in range(PROBE_CHATS)]:
                code, _ = await self.req("POST", "/chats", {"id": c, "title": "storm",
                                                           "visibility": "public"})  # fmt: skip
                assert code == 201, code
            keepers = []
            for c in range(a.chats):
                k = await RawSocket.open(self.url, tok(f"k{c}"))
                assert (await k.call("join-chat", f"c{c}"))["ok"]
                keepers.append(k)
            u0 = await RawSocket.open(self.url, tok("u0"))
            assert (await u0.call("join-chat", "c0"))["ok"]
            probe = await RawSocket.open(self.url, tok("probe"))
            join_small = await self.join_p50(probe)
            n_small = await self.sockets()

            t = time.monotonic()
            holder = subprocess.Popen(
                [sys.executable, __file__, "--hold", self.url, str(a.sockets), str(a.chats)],
                stdout=subprocess.PIPE, cwd="/tmp",
            )  # fmt: skip
            loop = asyncio.get_running_loop()
            line = await loop.run_in_executor(None, holder.stdout.readline)
            assert line.startswith(b"ready"), line
            connect_s = time.monotonic() - t
            n_big = await self.sockets()
            join_big = await self.join_p50(probe)

            stop = asyncio.Event()
            health: list = []
            sends: list = []
            samplers = [
                asyncio.ensure_future(self.sample(stop, "/healthz", None, health)),
                *(
                    asyncio.ensure_future(self.sample(
                        stop, f"/chats/c{i}/messages", {"content": "storm"}, sends, f"k{i}"))
                    for i in range(a.senders)
                ),
            ]  # fmt: skip
            await asyncio.sleep(1.0)
            base_h = [dt for _, _, dt in health]
            base_s = [dt for _, _, dt in sends]
            health.clear()
            sends.clear()
            if a.profile or a.turns:  # the storm only
                chatd.send_signal(signal.SIGUSR1)
            killed = time.monotonic()
            holder.send_signal(signal.SIGKILL)
            await loop.run_in_executor(None, holder.wait)
            # Until chatd reports the sockets gone (and presence settled).
            online_key = f"{prefix}:{{presence}}:chat:"
            gone = None
            while time.monotonic() - killed < 120:
                await asyncio.sleep(0.1)
                if await self.sockets() <= n_small:
                    gone = time.monotonic() - killed
                    break
            settled = None
            if gone is not None:
                # Presence: the keepers (and u0, who kept a socket) and nobody else.
                # (In a thread: 100 blocking Redis calls on this loop would
                # delay the samplers' requests and inflate their latencies.)
                def online() -> set[str]:
                    users = set()
                    for c in range(a.chats):
                        users |= {u.decode() for u in r.hkeys(f"{online_key}c{c}")}
                    return users

                while time.monotonic() - killed < 120:
                    users = await loop.run_in_executor(None, online)
                    if users == {f"k{c}" for c in range(a.chats)} | {"u0"}:
                        settled = time.monotonic() - killed
                        break
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            if a.profile or a.turns:
                chatd.send_signal(signal.SIGUSR2)
            stop.set()
            await asyncio.gather(*samplers)
            storm_h = [dt for ts, _, dt in health]
            storm_s = [dt for ts, code, dt in sends]
            bad = [code for _, code, _ in health + sends if code not in (200, 201)]
            result = {
                "sockets": a.sockets, "chats": a.chats, "connect_s": round(connect_s, 1),
                "sockets_small": n_small, "sockets_big": n_big,
                "join_p50_ms_small": round(join_small, 2), "join_p50_ms_big": round(join_big, 2),
                "disconnects_done_s": None if gone is None else round(gone, 2),
                "presence_settled_s": None if settled is None else round(settled, 2),
                "healthz_ms_before": [round(pct(base_h, q) * 1000, 1) for q in (0.5, 0.99)],
                "send_ms_before": [round(pct(base_s, q) * 1000, 1) for q in (0.5, 0.99)],
                "healthz_ms_storm_p50_p99_max": [
                    round(pct(storm_h, q) * 1000, 1) for q in (0.5, 0.99, 1.0)],
                "send_ms_storm_p50_p99_max": [
                    round(pct(storm_s, q) * 1000, 1) for q in (0.5, 0.99, 1.0)],
                # The first WINDOW_S seconds after the kill only: the same
                # span whatever the storm's length (the figures above run
                # until presence settles, so a slower storm adds quiet samples).
                "healthz_ms_first_s_p50_p99_max": window(health, killed),
                "send_ms_first_s_p50_p99_max": window(sends, killed),
                "samples": [len(storm_h), len(storm_s)], "non_2xx": len(bad),
                # The 3 slowest of each: [s after the kill when answered, ms].
                "slowest_healthz": slowest(health, killed), "slowest_send": slowest(sends, killed),
            }  # fmt: skip
            for s in [*keepers, u0, probe]:
                await s.close()
            return result
        finally:
            if holder is not None and holder.poll() is None:
                holder.kill()
            chatd.send_signal(signal.SIGTERM)
            try:
                chatd.wait(60)
            except subprocess.TimeoutExpired:
                chatd.kill()
            for key in r.scan_iter(match=f"{prefix}*", count=1000):
                r.delete(key)
            conn = psycopg2.connect(admin)
            conn.autocommit = True
            conn.cursor().execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.close()
            if not a.keep_log:
                log_path.unlink(missing_ok=True)
            else:
                print(f"chatd log: {log_path}", file=sys.stderr)


def serve_profiled(out: str) -> None:
    """python -m chatd under cProfile; the profile is written on SIGUSR2."""
    import cProfile

    from chatd.server import main as chatd_main

    prof = cProfile.Profile()

    def dump(*_):
        prof.disable()
        prof.dump_stats(out)

    signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
    signal.signal(signal.SIGUSR2, dump)
    chatd_main([])


def serve_traced(out: str) -> None:
    """python -m chatd with every event-loop turn timed (from SIGUSR1 to
    SIGUSR2): the turns longer than LONG_TURN_S (10 ms) are written to ``out``
    as JSON lines, each with its duration (and the CPU time the process had in
    it: less means the machine ran something else meanwhile), the time outside
    its callbacks (select(), parking), how many callbacks it ran and the time
    spent per callback (by function name), longest first; then the garbage
    collections over 5 ms and how many selects left websocket events waiting;
    then one line for every turn of the storm: their number, wall and CPU
    time, a histogram of their durations and the time per callback."""
    import gc
    from asyncio import base_events, events

    from chatd.server import main as chatd_main

    state = {"on": False, "cur": None}
    long_turns: list = []
    # Every turn of the storm: how many, their wall and CPU time, a histogram
    # of their durations, and the time per callback over all of them.
    summary = {"turns": 0, "wall_s": 0.0, "cpu_s": 0.0, "hist": [0] * (len(TURN_EDGES_MS) + 1)}
    callbacks: dict = {}
    run_once = base_events.BaseEventLoop._run_once
    handle_run = events.Handle._run

    def name_of(cb) -> str:
        cb = getattr(cb, "__func__", cb)
        owner = getattr(cb, "__self__", None)
        if owner is not None and hasattr(owner, "get_coro"):  # a Task's __step / __wakeup
            coro = owner.get_coro()
            return f"task:{getattr(coro, '__qualname__', type(coro).__name__)}"
        return getattr(cb, "__qualname__", None) or type(cb).__name__

    def timed_run(self):
        cur = state["cur"]
        if cur is None:
            return handle_run(self)
        t = time.perf_counter()
        try:
            return handle_run(self)
        finally:
            key = name_of(self._callback)
            n, s = cur.get(key, (0, 0.0))
            cur[key] = (n + 1, s + time.perf_counter() - t)

    def timed_run_once(self):
        if not state["on"]:
            return run_once(self)
        state["cur"] = cur = {}
        t = time.perf_counter()
        cpu = time.thread_time()
        try:
            return run_once(self)
        finally:
            dt = time.perf_counter() - t
            cpu = time.thread_time() - cpu
            state["cur"] = None
            summary["turns"] += 1
            summary["wall_s"] += dt
            summary["cpu_s"] += cpu
            for i, edge in enumerate(TURN_EDGES_MS):
                if dt * 1000 < edge:
                    summary["hist"][i] += 1
                    break
            else:
                summary["hist"][-1] += 1
            for k, (n, s) in cur.items():
                tn, ts = callbacks.get(k, (0, 0.0))
                callbacks[k] = (tn + n, ts + s)
            if dt > LONG_TURN_S:
                top = sorted(cur.items(), key=lambda kv: -kv[1][1])[:8]
                long_turns.append({
                    "at": round(time.monotonic(), 3), "ms": round(dt * 1000, 1),
                    "cpu_ms": round(cpu * 1000, 1),
                    "callbacks": sum(n for n, _ in cur.values()),
                    # the turn's own time outside its callbacks (select(),
                    # parking, timers)
                    "select_ms": round((dt - sum(s for _, s in cur.values())) * 1000, 1),
                    "top": [[k, n, round(s * 1000, 1)] for k, (n, s) in top],
                })  # fmt: skip

    gc_times: list = []
    gc_start = [0.0]

    def on_gc(phase, info):
        if not state["on"]:
            return
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            dt = time.perf_counter() - gc_start[0]
            if dt > 0.005:
                gc_times.append([info["generation"], round(dt * 1000, 1), info["collected"]])

    gc.callbacks.append(on_gc)

    def start(*_):
        state["on"] = True

    def dump(*_):
        state["on"] = False
        selector = getattr(asyncio.get_event_loop(), "chatd_selector", None)
        long_turns.append({"storm_turns": getattr(selector, "storm_turns", None),
                           "gc_over_5ms": gc_times})  # fmt: skip
        top = sorted(callbacks.items(), key=lambda kv: -kv[1][1])[:15]
        long_turns.append({
            "turns": summary["turns"], "wall_s": round(summary["wall_s"], 3),
            "cpu_s": round(summary["cpu_s"], 3),
            "turn_ms_histogram": dict(zip(
                [f"<{e}" for e in TURN_EDGES_MS] + [f">={TURN_EDGES_MS[-1]}"], summary["hist"],
                strict=True)),
            "callbacks_top": [[k, n, round(s * 1000, 1)] for k, (n, s) in top],
        })  # fmt: skip
        with open(out, "wb") as f:
            for turn in long_turns:
                f.write(orjson.dumps(turn) + b"\n")

    base_events.BaseEventLoop._run_once = timed_run_once
    events.Handle._run = timed_run
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, dump)
    chatd_main([])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-traced":
        serve_traced(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--hold":
        asyncio.run(hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-profiled":
        serve_profiled(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sockets", type=int, default=10_000)
    p.add_argument("--chats", type=int, default=100)
    p.add_argument(
        "--pg",
        default=os.environ.get(
            "CHATD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    p.add_argument(
        "--redis", default=os.environ.get("CHATD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    p.add_argument(
        "--senders",
        type=int,
        default=3,
        help="REST senders sampling a send meanwhile, each to its own chat",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--profile", default="")
    p.add_argument("--turns", default="", help="write the storm's turns over 10 ms here")
    p.add_argument("--keep-log", action="store_true")
    args = p.parse_args()
    print(orjson.dumps(asyncio.run(Run(args).main())).decode(), flush=True)


if __name__ == "__main__":
    main()
