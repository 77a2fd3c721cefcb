"""The `search` benchmark: GET /search over 1,000,000 messages in 1,000 chats.

    .venv/bin/python bench/search.py --admin-url postgresql://postgres@127.0.0.1:5432/postgres \\
        --redis-url redis://127.0.0.1:6379/0 [--duration 20] [--concurrency 32] [--reuse]

What it does (a benchmark: it prints figures and asserts nothing):

1. Creates the database ``chatd_bench_search`` (``--reuse`` keeps one made
   by an earlier run), migrates it, and fills it in PostgreSQL itself with
   ``generate_series`` (no row crosses the network): 1,000 chats of 1,000
   messages each, 8-14 words per message drawn from a 4,000-word vocabulary
   with a skewed (Zipf-like: rank = 4000 * random()^3) distribution, so a few
   words are in a large share of the messages and most are rare, as in real
   text. The generated text is lower-case ASCII, which chatd's folding
   (chatd.text.fold) leaves as it is, so ``to_tsvector('simple', content)``
   is exactly what chatd writes. The GIN index is dropped for the load and
   built after it (one sort instead of a million index inserts). The user
   ``searcher`` is a member of 50 of the chats (50,000 messages in scope).
2. Starts one chatd process on it and runs ``--concurrency`` searchers for
   ``--duration`` seconds, each sending its next query as soon as the last
   one is answered. Queries mix what people type: one common word, one rare
   word, two words, a phrase, a word with an exclusion, ``or``, and a word
   on page 2 (``before_id``); half of them name one chat (``chat_id``).
3. Prints p50/p99 latency and requests per second, per query kind and in
   total, the size of the GIN index and of the table, and EXPLAIN ANALYZE
   of the search statement for a common and a rare word.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import orjson
import psycopg2
from tornado.httpclient import AsyncHTTPClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatd import migrations  # noqa: E402
from chatd.auth import mint  # noqa: E402
from chatd.queries import SQL  # noqa: E402

DB = "chatd_bench_search"
CHATS, PER_CHAT, MEMBER_OF, VOCAB = 1000, 1000, 50, 4000
SYLLABLES = "ka to ri mu sen lo va de pi na go ru shi te mo ba li fu ne ho".split()  # noqa: SIM905


def vocabulary() -> list[str]:
    rnd = random.Random(7)
    words: list[str] = []
    seen = set()
    while len(words) < VOCAB:
        word = "".join(rnd.choice(SYLLABLES) for _ in range(rnd.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _db_url(admin_url: str, name: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path="/" + name))


def _exec(url: str, sql: str, params=None, fetch=False):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if fetch else None
    finally:
        conn.close()


def generate(admin_url: str, reuse: bool) -> str:
    url = _db_url(admin_url, DB)
    exists = _exec(admin_url, "SELECT 1 FROM pg_database WHERE datname = %s", (DB,), fetch=True)
    if exists and reuse:
        n = _exec(url, "SELECT count(*) FROM messages", fetch=True)[0][0]
        interleaved = _exec(url, "SELECT chat_id FROM messages ORDER BY id LIMIT 2", fetch=True)
        if n == CHATS * PER_CHAT and interleaved[0] != interleaved[1]:
            print(f"reusing {DB} ({n:,} messages)")
            return url
    _exec(admin_url, f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    _exec(admin_url, f'CREATE DATABASE "{DB}"')
    migrations.migrate(url)
    words = vocabulary()
    t0 = time.monotonic()
    _exec(
        url,
        """
        DROP INDEX messages_search;
        INSERT INTO chats (id, title, created_by, last_seq, version)
        SELECT 'bench-' || c, 'Bench ' || c, 'gen', %(per)s, %(per)s
          FROM generate_series(1, %(chats)s) c;
        INSERT INTO chat_members (chat_id, user_id, role)
        SELECT 'bench-' || c, 'searcher', 'member' FROM generate_series(1, %(member_of)s) c;
        INSERT INTO chat_members (chat_id, user_id, role)
        SELECT 'bench-' || c, 'user-' || u, CASE WHEN u = 0 THEN 'owner' ELSE 'member' END
          FROM generate_series(1, %(chats)s) c, generate_series(0, 9) u;
        """,
        {"per": PER_CHAT, "chats": CHATS, "member_of": MEMBER_OF},
    )
    # Messages of all chats interleave in time, as in a real deployment (ids
    # grow with time across chats): one statement per 100 seqs of every
    # chat, rows in (seq, chat) order, which keeps each transaction modest.
    for first in range(1, PER_CHAT + 1, 100):
        last = min(first + 99, PER_CHAT)
        _exec(
            url,
            """
            INSERT INTO messages (chat_id, seq, sender_id, content, version, created_at, search)
            SELECT 'bench-' || c, s, 'user-' || (s %% 10), t.txt, s,
                   now() - make_interval(secs => (%(per)s - s) * 60), to_tsvector('simple', t.txt)
              FROM generate_series(%(first)s, %(last)s) s, generate_series(1, %(chats)s) c,
                   LATERAL (
                       SELECT string_agg(
                                  (%(words)s::text[])[1 + floor(%(vocab)s * random() ^ 3)::int],
                                  ' ') AS txt
                         FROM generate_series(1, 8 + ((c * 7 + s * 13) %% 7)) w
                        WHERE s > 0 AND c > 0) t
             ORDER BY s, c
            """,
            {"first": first, "last": last, "per": PER_CHAT, "chats": CHATS,
             "words": words, "vocab": VOCAB},
        )  # fmt: skip
        print(f"  seq {first}-{last} of every chat loaded", flush=True)
    t1 = time.monotonic()
    _exec(url, "CREATE INDEX messages_search ON messages USING gin (search)")
    t2 = time.monotonic()
    _exec(url, "VACUUM ANALYZE")
    print(f"generated {CHATS * PER_CHAT:,} messages in {t1 - t0:.0f}s, GIN index in {t2 - t1:.0f}s")
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_chatd(url: str, redis_url: str, secret: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": redis_url,
        "ACCESS_TOKEN_SECRET": secret,
        "CHATPORT": str(port),
        "CHATD_HOST": "127.0.0.1",
        "CHATD_REDIS_PREFIX": f"bench-search-{secrets.token_hex(4)}",
        "LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "chatd"], env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("chatd did not start")


def queries(words: list[str]) -> list[tuple[str, str]]:
    """(kind, query string) in the proportions the load sends them."""
    rnd = random.Random(11)
    common, middle, rare = words[:40], words[200:1200], words[2500:]
    out = []
    for i in range(400):
        mine = f"&chat_id=bench-{rnd.randint(1, MEMBER_OF)}" if i % 2 else ""
        kind = ("common", "rare", "two", "phrase", "exclude", "or", "page2")[i % 7]
        if kind == "common":
            q = rnd.choice(common)
        elif kind == "rare":
            q = rnd.choice(rare)
        elif kind == "two":
            q = f"{rnd.choice(middle)} {rnd.choice(common)}"
        elif kind == "phrase":
            q = f'"{rnd.choice(common)} {rnd.choice(common)}"'
        elif kind == "exclude":
            q = f"{rnd.choice(middle)} -{rnd.choice(common)}"
        elif kind == "or":
            q = f"{rnd.choice(rare)} or {rnd.choice(rare)}"
        else:
            q = rnd.choice(middle)
        out.append((kind + ("/chat" if mine else "/all"), f"q={quote(q)}{mine}"))
    return out


async def load(port: int, token: str, concurrency: int, duration: float, qs):
    client = AsyncHTTPClient(max_clients=concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{port}/search?"
    results: list[tuple[str, float]] = []
    errors = 0
    stop = time.monotonic() + duration

    async def worker(n: int) -> None:
        nonlocal errors
        i = n
        while time.monotonic() < stop:
            kind, q = qs[i % len(qs)]
            i += concurrency
            t = time.perf_counter()
            resp = await client.fetch(base + q, headers=headers, raise_error=False)
            if kind.startswith("page2") and resp.code == 200:
                body = orjson.loads(resp.body)
                if body["messages"]:
                    last = body["messages"][-1]["id"]
                    resp = await client.fetch(
                        f"{base}{q}&before_id={last}", headers=headers, raise_error=False
                    )
            elapsed = time.perf_counter() - t
            if resp.code != 200:
                errors += 1
            results.append((kind, elapsed))

    t0 = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return results, errors, time.monotonic() - t0


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] * 1000


def report(results, errors, wall) -> None:
    kinds = sorted({k for k, _ in results})
    print(f"\n{'query':<16}{'n':>7}{'p50 ms':>9}{'p99 ms':>9}")
    for kind in kinds:
        xs = [t for k, t in results if k == kind]
        print(f"{kind:<16}{len(xs):>7}{pct(xs, 50):>9.1f}{pct(xs, 99):>9.1f}")
    xs = [t for _, t in results]
    print(f"{'all':<16}{len(xs):>7}{pct(xs, 50):>9.1f}{pct(xs, 99):>9.1f}")
    print(f"\n{len(xs) / wall:.0f} req/s over {wall:.1f}s, {errors} errors")


def sizes_and_plans(url: str, words: list[str]) -> None:
    rows = _exec(
        url,
        """SELECT pg_size_pretty(pg_relation_size('messages_search')),
                  pg_size_pretty(pg_relation_size('messages')),
                  pg_size_pretty(pg_total_relation_size('messages'))""",
        fetch=True,
    )
    print(
        f"\nGIN index {rows[0][0]}; messages heap {rows[0][1]}; with all indexes/TOAST {rows[0][2]}"
    )
    for label, word in (("common", words[0]), ("rare", words[3000])):
        sql = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + SQL.SEARCH_MINE
        plan = _exec(
            url, sql,
            {"ts_config": "simple", "q": word, "user_id": "searcher",
             "chats": [f"bench-{i}" for i in range(1, MEMBER_OF + 1)],
             "before": 2**63 - 1, "limit": 21},
            fetch=True,
        )  # fmt: skip
        print(f"\nEXPLAIN ANALYZE, {label} word {word!r}:")
        for (line,) in plan:
            print("  " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--admin-url", default=os.environ.get("CHATD_TEST_PG_URL",
                    "postgresql://postgres@127.0.0.1:5432/postgres"))  # fmt: skip
    ap.add_argument("--redis-url", default=os.environ.get("CHATD_TEST_REDIS_URL",
                    "redis://127.0.0.1:6379/0"))  # fmt: skip
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--reuse", action="store_true", help="keep the data of an earlier run")
    args = ap.parse_args()
    url = generate(args.admin_url, args.reuse)
    words = vocabulary()
    secret = secrets.token_urlsafe(32)
    proc, port = start_chatd(url, args.redis_url, secret)
    try:
        token = mint(secret, "searcher", 3600)
        qs = queries(words)
        # Warm-up: the first queries read the index from disk.
        asyncio.run(load(port, token, args.concurrency, 3, qs))
        results, errors, wall = asyncio.run(load(port, token, args.concurrency, args.duration, qs))
        report(results, errors, wall)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    sizes_and_plans(url, words)


if __name__ == "__main__":
    main()
