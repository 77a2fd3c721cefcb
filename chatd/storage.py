"""PostgreSQL, through one aiopg pool per process.

Every query chatd runs is in this module, parameterised, with a note on why it
is shaped the way it is. Rules (who may do what) are not here: the domain
layer asks for facts and decides. Connection trouble of any kind surfaces as
:class:`~chatd.errors.Unavailable` (503), never as a hang: the pool's timeout
bounds both waiting for a connection and each query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiopg
import psycopg2
import psycopg2.errors

from .coalesce import Coalescer
from .errors import Conflict, Unavailable

log = logging.getLogger("chatd.storage")


def _ts(col: str) -> str:
    # ISO-8601 UTC with milliseconds and Z, formatted by PostgreSQL: cheaper than
    # building a datetime per row in Python and formatting it again.
    return f"""to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


# The 9 columns of a message, in model.MESSAGE_KEYS order.
MSG_COLS = (
    "m.id, m.chat_id, m.seq, m.sender_id, m.content, m.client_id, "
    f"{_ts('m.created_at')}, {_ts('m.edited_at')}, m.deleted"
)
CHAT_COLS = f"c.id, c.title, c.visibility, c.created_by, {_ts('c.created_at')}, c.last_seq"
MEMBER_COLS = f"cm.user_id, cm.role, {_ts('cm.joined_at')}, cm.last_read_seq"

_UNAVAILABLE = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class Access:
    """What the domain needs to decide about a caller and a chat."""

    visibility: str
    last_seq: int
    version: int
    role: str | None  # None: not a member


@dataclass(frozen=True, slots=True)
class MessageAccess:
    id: int
    chat_id: str
    seq: int
    sender_id: str
    deleted: bool
    visibility: str
    role: str | None


@dataclass(frozen=True, slots=True)
class Sent:
    """Outcome of a send: created (row, version) or a repeat of client_id (row)."""

    row: tuple
    created: bool
    version: int = 0
    joined: bool = False  # the send made the poster a member (public chat)


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class Stmt:
    """A query that is PREPAREd once per connection and then EXECUTEd by name:
    PostgreSQL parses and plans it once, and each call sends a few bytes
    instead of the whole text. Written with %(name)s placeholders like any
    other query; they become $1..$n in first-use order."""

    def __init__(self, name: str, sql: str):
        self.name = name
        self.sql = sql
        self.order: list[str] = []
        for key in _PLACEHOLDER.findall(sql):
            if key not in self.order:
                self.order.append(key)
        positional = _PLACEHOLDER.sub(lambda m: f"${self.order.index(m.group(1)) + 1}", sql)
        self.prepare = f"PREPARE {name} AS {positional}"
        args = ", ".join(["%s"] * len(self.order))
        self.execute = f"EXECUTE {name} ({args})" if self.order else f"EXECUTE {name}"

    def args(self, params: dict) -> list:
        return [params[key] for key in self.order]


class SQL:
    # Access check: one indexed lookup on each table. Returns the chat even when
    # the caller is not a member, so "no such chat" and "not a member of a
    # private chat" can be told apart by the domain (both end as 404).
    ACCESS = """
        SELECT c.visibility, c.last_seq, c.version, cm.role
          FROM chats c
          LEFT JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = %(user_id)s
         WHERE c.id = %(chat_id)s"""

    # The same for many (chat, caller) pairs at once (coalesced access checks,
    # see Storage.access): one row per pair whose chat exists, tagged with the
    # pair's 1-based position.
    ACCESS_MANY = """
        SELECT q.i, c.visibility, c.last_seq, c.version, cm.role
          FROM unnest(%(chat_ids)s::text[], %(user_ids)s::text[])
               WITH ORDINALITY AS q(chat_id, user_id, i)
          JOIN chats c ON c.id = q.chat_id
          LEFT JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = q.user_id"""

    # A send is ONE statement, so one round trip and one implicit transaction:
    # the UPDATE takes the chat row's lock (serialising that chat's senders, so
    # seq is gapless and in commit order) and only matches when the sender may
    # post (a member, or anyone on a public chat, who then becomes a member in
    # the same statement). A repeated client_id violates messages_client_id,
    # which aborts the whole statement, seq bump included.
    SEND = f"""
        WITH c AS (
            UPDATE chats
               SET last_seq = last_seq + 1, version = version + 1
             WHERE id = %(chat_id)s
               AND (visibility = 'public'
                    OR EXISTS (SELECT 1 FROM chat_members
                                WHERE chat_id = %(chat_id)s AND user_id = %(user_id)s))
         RETURNING id, last_seq, version, visibility
        ), j AS (
            INSERT INTO chat_members (chat_id, user_id)
            SELECT id, %(user_id)s FROM c WHERE visibility = 'public'
            ON CONFLICT DO NOTHING
            RETURNING user_id
        ), m AS (
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id)
            SELECT id, last_seq, %(user_id)s, %(content)s, %(client_id)s FROM c
            RETURNING *
        )
        SELECT {MSG_COLS}, c.version, EXISTS (SELECT 1 FROM j)
          FROM m, c"""

    # Group commit: several sends to ONE chat in one statement (one round trip,
    # one transaction, one fsync). Each input row is kept only if its sender
    # may post and its client_id is new; the survivors get consecutive seqs
    # after the chat's last_seq, taken under the chat row's lock by the UPDATE
    # (which re-reads last_seq after waiting for a concurrent writer, so seq
    # stays gapless and in commit order). The duplicate check sees the
    # statement's snapshot; a repeat committed concurrently by another process
    # still hits messages_client_id, and the caller then sends one by one.
    SEND_BATCH = f"""
        WITH input AS (
            SELECT t.sender_id, t.content, t.client_id, t.ord
              FROM unnest(%(senders)s::text[], %(contents)s::text[], %(client_ids)s::text[])
                   WITH ORDINALITY AS t(sender_id, content, client_id, ord)
        ), chat AS (
            SELECT id, visibility FROM chats WHERE id = %(chat_id)s
        ), ok AS (
            SELECT i.*, row_number() OVER (ORDER BY i.ord) AS n
              FROM input i, chat c
             WHERE (c.visibility = 'public'
                    OR EXISTS (SELECT 1 FROM chat_members cm
                                WHERE cm.chat_id = c.id AND cm.user_id = i.sender_id))
               AND (i.client_id IS NULL
                    OR NOT EXISTS (SELECT 1 FROM messages d
                                    WHERE d.chat_id = c.id AND d.sender_id = i.sender_id
                                      AND d.client_id = i.client_id))
        ), bump AS (
            UPDATE chats
               SET last_seq = last_seq + (SELECT count(*) FROM ok), version = version + 1
             WHERE id = %(chat_id)s AND EXISTS (SELECT 1 FROM ok)
         RETURNING last_seq, version, visibility
        ), j AS (
            INSERT INTO chat_members (chat_id, user_id)
            SELECT DISTINCT %(chat_id)s, ok.sender_id FROM ok, bump WHERE bump.visibility = 'public'
            ON CONFLICT DO NOTHING
        ), m AS (
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id)
            SELECT %(chat_id)s, bump.last_seq - (SELECT count(*) FROM ok) + ok.n,
                   ok.sender_id, ok.content, ok.client_id
              FROM ok, bump
            RETURNING *
        )
        SELECT {MSG_COLS}, bump.version FROM m, bump ORDER BY m.seq"""

    # Sends to several chats, one each (the uncontended sends of one loop
    # iteration; see Storage.send), in one statement: one transaction, one
    # WAL flush. Each is exactly SEND's rule for its own chat: its chat's
    # row is locked and bumped by one, and it is kept only if its sender may
    # post. The chats' rows are locked in id order first, so two such
    # statements never wait for each other in a cycle. A repeated client_id
    # aborts the whole statement (the caller then sends one by one). One row
    # per created message: its position in the input, the message, the
    # chat's new version and whether the poster joined a public chat.
    SEND_MANY = f"""
        WITH input AS (
            SELECT t.*
              FROM unnest(%(chat_ids)s::text[], %(senders)s::text[], %(contents)s::text[],
                          %(client_ids)s::text[])
                   WITH ORDINALITY AS t(chat_id, sender_id, content, client_id, ord)
        ), locked AS (
            SELECT c.id FROM chats c WHERE c.id IN (SELECT chat_id FROM input)
             ORDER BY c.id FOR UPDATE
        ), c AS (
            UPDATE chats
               SET last_seq = last_seq + 1, version = version + 1
              FROM locked l JOIN input i ON i.chat_id = l.id
             WHERE chats.id = l.id
               AND (chats.visibility = 'public'
                    OR EXISTS (SELECT 1 FROM chat_members
                                WHERE chat_id = l.id AND user_id = i.sender_id))
         RETURNING chats.id, chats.last_seq, chats.version, chats.visibility,
                   i.sender_id, i.content, i.client_id, i.ord
        ), j AS (
            INSERT INTO chat_members (chat_id, user_id)
            SELECT id, sender_id FROM c WHERE visibility = 'public'
            ON CONFLICT DO NOTHING
            RETURNING chat_id
        ), m AS (
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id)
            SELECT id, last_seq, sender_id, content, client_id FROM c
            RETURNING *
        )
        SELECT c.ord, {MSG_COLS}, c.version, EXISTS (SELECT 1 FROM j WHERE j.chat_id = c.id)
          FROM m JOIN c ON c.id = m.chat_id"""

    BY_CLIENT_IDS = f"""
        SELECT {MSG_COLS} FROM messages m
          JOIN unnest(%(senders)s::text[], %(client_ids)s::text[]) AS k(sender_id, client_id)
            ON m.sender_id = k.sender_id AND m.client_id = k.client_id
         WHERE m.chat_id = %(chat_id)s"""

    BY_CLIENT_ID = f"""
        SELECT {MSG_COLS} FROM messages m
         WHERE m.chat_id = %(chat_id)s AND m.sender_id = %(user_id)s
           AND m.client_id = %(client_id)s"""

    # History pages all walk messages_chat_seq (chat_id, seq) in one direction
    # and stop after limit + 1 rows (the extra row answers has_more).
    NEWEST = f"""
        SELECT {MSG_COLS} FROM messages m
         WHERE m.chat_id = %(chat_id)s {{deleted}}
         ORDER BY m.seq DESC LIMIT %(limit)s"""
    BEFORE = f"""
        SELECT {MSG_COLS} FROM messages m
         WHERE m.chat_id = %(chat_id)s AND m.seq < %(seq)s {{deleted}}
         ORDER BY m.seq DESC LIMIT %(limit)s"""
    AFTER = f"""
        SELECT {MSG_COLS} FROM messages m
         WHERE m.chat_id = %(chat_id)s AND m.seq > %(seq)s {{deleted}}
         ORDER BY m.seq ASC LIMIT %(limit)s"""

    # The newest rows for the page cache, with the chat's version from the same
    # snapshot, so the cached page is exactly the chat as of that version.
    CACHE_FILL = f"""
        SELECT c.version, c.last_seq, {MSG_COLS}
          FROM chats c
          LEFT JOIN LATERAL (
              SELECT * FROM messages
               WHERE chat_id = c.id ORDER BY seq DESC LIMIT %(limit)s) m ON true
         WHERE c.id = %(chat_id)s
         ORDER BY m.seq DESC"""

    LATEST = f"""
        SELECT {MSG_COLS} FROM messages m
         WHERE m.chat_id = %(chat_id)s ORDER BY m.seq DESC LIMIT 1"""

    MESSAGE_ACCESS = """
        SELECT m.id, m.chat_id, m.seq, m.sender_id, m.deleted, c.visibility, cm.role
          FROM messages m
          JOIN chats c ON c.id = m.chat_id
          LEFT JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = %(user_id)s
         WHERE m.id = %(id)s"""

    # Delete and edit bump the chat's version in the same statement, which is
    # what keeps the page cache honest (see sql/001_schema.sql). Deleting erases
    # the content; the row stays as a tombstone so seq stays gapless.
    DELETE = f"""
        WITH m AS (
            UPDATE messages SET deleted = true, content = NULL
             WHERE id = %(id)s AND NOT deleted
         RETURNING *
        ), v AS (
            UPDATE chats c SET version = c.version + 1
              FROM m WHERE c.id = m.chat_id
         RETURNING c.version
        )
        SELECT {MSG_COLS}, v.version FROM m, v"""

    EDIT = f"""
        WITH m AS (
            UPDATE messages SET content = %(content)s, edited_at = now()
             WHERE id = %(id)s AND NOT deleted
         RETURNING *
        ), v AS (
            UPDATE chats c SET version = c.version + 1
              FROM m WHERE c.id = m.chat_id
         RETURNING c.version
        )
        SELECT {MSG_COLS}, v.version FROM m, v"""

    CREATE_CHAT = f"""
        INSERT INTO chats AS c (id, title, visibility, created_by)
        VALUES (%(id)s, %(title)s, %(visibility)s, %(created_by)s)
        RETURNING {CHAT_COLS}"""

    # The creator first (owner), then the listed users (members), in one
    # statement; ordinality keeps the order for the answer.
    ADD_MEMBERS = f"""
        INSERT INTO chat_members AS cm (chat_id, user_id, role)
        SELECT %(chat_id)s, u.user_id, CASE WHEN u.ord = 1 THEN 'owner' ELSE 'member' END
          FROM unnest(%(users)s::text[]) WITH ORDINALITY AS u(user_id, ord)
        RETURNING {MEMBER_COLS}"""

    CHAT = f"SELECT {CHAT_COLS} FROM chats c WHERE c.id = %(chat_id)s"
    MEMBERS = f"""
        SELECT {MEMBER_COLS} FROM chat_members cm
         WHERE cm.chat_id = %(chat_id)s ORDER BY cm.joined_at, cm.user_id"""

    # The caller's chats, most recently active first. unread_count counts only
    # what others sent above the caller's marker (an index range scan on
    # messages_chat_seq per chat); last_message skips tombstones.
    USER_CHATS = f"""
        SELECT {CHAT_COLS}, cm.role, cm.last_read_seq,
               (SELECT count(*) FROM messages u
                 WHERE u.chat_id = c.id AND u.seq > cm.last_read_seq
                   AND u.sender_id <> cm.user_id AND NOT u.deleted) AS unread,
               {MSG_COLS}
          FROM chat_members cm
          JOIN chats c ON c.id = cm.chat_id
          LEFT JOIN LATERAL (
              SELECT * FROM messages
               WHERE chat_id = c.id AND NOT deleted ORDER BY seq DESC LIMIT 1) m ON true
         WHERE cm.user_id = %(user_id)s
         ORDER BY coalesce(m.created_at, c.created_at) DESC, c.id"""

    UPSERT_MEMBER = f"""
        INSERT INTO chat_members AS cm (chat_id, user_id, role)
        VALUES (%(chat_id)s, %(user_id)s, %(role)s)
        ON CONFLICT (chat_id, user_id) DO UPDATE SET role = EXCLUDED.role
        RETURNING {MEMBER_COLS}"""
    MEMBER = f"""
        SELECT {MEMBER_COLS} FROM chat_members cm
         WHERE cm.chat_id = %(chat_id)s AND cm.user_id = %(user_id)s"""
    OWNERS = """
        SELECT count(*) FROM chat_members
         WHERE chat_id = %(chat_id)s AND role = 'owner'"""
    REMOVE_MEMBER = """
        DELETE FROM chat_members
         WHERE chat_id = %(chat_id)s AND user_id = %(user_id)s
        RETURNING role"""

    # chatctl's view of every chat, paged by id (keyset: each page is one index
    # range scan on the primary key, however many chats there are). The member
    # count is a per-chat count on the chat_members primary key.
    ADMIN_CHATS = f"""
        SELECT {CHAT_COLS},
               (SELECT count(*) FROM chat_members cm WHERE cm.chat_id = c.id) AS members
          FROM chats c
         WHERE c.id > %(after_id)s
         ORDER BY c.id LIMIT %(limit)s"""

    # The marker only moves forward, and never past the chat's last seq.
    MARK_READ = """
        UPDATE chat_members cm
           SET last_read_seq = LEAST(%(seq)s, c.last_seq)
          FROM chats c
         WHERE cm.chat_id = %(chat_id)s AND cm.user_id = %(user_id)s AND c.id = cm.chat_id
           AND LEAST(%(seq)s, c.last_seq) > cm.last_read_seq
        RETURNING cm.last_read_seq"""


def _history_variants() -> dict[tuple[str, bool], Stmt]:
    out = {}
    for kind, sql in (("newest", SQL.NEWEST), ("before", SQL.BEFORE), ("after", SQL.AFTER)):
        for include in (False, True):
            text = sql.format(deleted="" if include else "AND NOT m.deleted")
            out[(kind, include)] = Stmt(f"chatd_{kind}_{'all' if include else 'visible'}", text)
    return out


class Q:
    """The hot queries, prepared on every pooled connection (see Stmt)."""

    ACCESS = Stmt("chatd_access", SQL.ACCESS)
    ACCESS_MANY = Stmt("chatd_access_many", SQL.ACCESS_MANY)
    SEND = Stmt("chatd_send", SQL.SEND)
    SEND_BATCH = Stmt("chatd_send_batch", SQL.SEND_BATCH)
    SEND_MANY = Stmt("chatd_send_many", SQL.SEND_MANY)
    BY_CLIENT_ID = Stmt("chatd_by_client_id", SQL.BY_CLIENT_ID)
    CACHE_FILL = Stmt("chatd_cache_fill", SQL.CACHE_FILL)
    LATEST = Stmt("chatd_latest", SQL.LATEST)
    MESSAGE_ACCESS = Stmt("chatd_message_access", SQL.MESSAGE_ACCESS)
    HISTORY = _history_variants()

    @classmethod
    def all(cls) -> list[Stmt]:
        found = [v for v in vars(cls).values() if isinstance(v, Stmt)]
        return found + list(cls.HISTORY.values())


async def _prepare(conn) -> None:
    """aiopg on_connect: PREPARE the hot queries, all in one round trip.

    On a database without chatd's schema (chatctl check before migrate) the
    PREPAREs fail; that connection then runs the same queries as plain text
    (see _run), so tools can still connect and report."""
    async with conn.cursor() as cur:
        try:
            await cur.execute(";\n".join(stmt.prepare for stmt in Q.all()))
        except psycopg2.ProgrammingError:
            conn.chatd_prepared = False
        else:
            conn.chatd_prepared = True


async def _run(cur, sql: str | Stmt, params: dict) -> None:
    if not isinstance(sql, Stmt):
        await cur.execute(sql, params)
    elif getattr(cur.connection, "chatd_prepared", False):
        await cur.execute(sql.execute, sql.args(params))
    else:
        await cur.execute(sql.sql, params)


class _AccessChecks(Coalescer):
    """Access checks of one loop iteration, as one query (chatd.coalesce)."""

    def __init__(self, storage: Storage):
        super().__init__()
        self._storage = storage

    async def one(self, call: tuple[str, str]) -> Access | None:
        row = await self._storage._one(Q.ACCESS, {"chat_id": call[0], "user_id": call[1]})
        return Access(*row) if row else None

    async def many(self, calls: list[tuple[str, str]]) -> list[Access | None]:
        params = {"chat_ids": [c for c, _ in calls], "user_ids": [u for _, u in calls]}
        found = {
            row[0]: Access(*row[1:]) for row in await self._storage._all(Q.ACCESS_MANY, params)
        }
        return [found.get(i) for i in range(1, len(calls) + 1)]


class _Sends(Coalescer):
    """Sends of one loop iteration, as one statement (chatd.coalesce): one
    transaction and one WAL flush for many chats. The domain sends to a chat
    one transaction at a time (its group-commit lanes), so a batch normally
    holds each chat once; a chat that comes twice is sent on its own after."""

    def __init__(self, storage: Storage):
        super().__init__()
        self._storage = storage

    async def one(self, call: tuple) -> Sent | None:
        return await self._storage.send_one(*call)

    async def many(self, calls: list[tuple]) -> list:
        first: dict[str, int] = {}
        for i, call in enumerate(calls):
            first.setdefault(call[0], i)
        together = sorted(first.values())
        results: list = [None] * len(calls)
        params = {
            "chat_ids": [calls[i][0] for i in together],
            "senders": [calls[i][1] for i in together],
            "contents": [calls[i][2] for i in together],
            "client_ids": [calls[i][3] for i in together],
        }
        try:
            rows = await self._storage._all(Q.SEND_MANY, params)
        except psycopg2.errors.UniqueViolation:
            # A repeated client_id: each on its own, where a repeat is an answer.
            rows = None
        if rows is None:
            for i in together:
                results[i] = await self._call_alone(calls[i])
        else:
            for row in rows:
                results[together[row[0] - 1]] = Sent(
                    row=row[1:10], created=True, version=row[10], joined=row[11]
                )
        for i, call in enumerate(calls):  # the same chat again: after, on its own
            if first[call[0]] != i:
                results[i] = await self._call_alone(call)
        return results

    async def _call_alone(self, call: tuple):
        try:
            return await self.one(call)
        except Exception as exc:  # this caller's own error, not the batch's
            return exc


class Storage:
    def __init__(self, pool: aiopg.Pool, timeout: float):
        self._pool = pool
        self.timeout = timeout
        self._clearing: asyncio.Future | None = None
        self.access_checks = _AccessChecks(self)
        self.sends = _Sends(self)

    @classmethod
    async def connect(cls, dsn: str, size: int = 20, query_timeout: float = 5.0) -> Storage:
        try:
            pool = await aiopg.create_pool(
                dsn,
                minsize=1,
                maxsize=size,
                timeout=query_timeout,
                # chatd formats JSON and timestamps itself: skip the type
                # registrations, each of which costs a query per new connection.
                enable_json=False,
                enable_hstore=False,
                enable_uuid=False,
                application_name="chatd",
                on_connect=_prepare,
            )
        except _UNAVAILABLE as exc:
            raise Unavailable(f"PostgreSQL is unavailable: {_reason(exc)}") from exc
        return cls(pool, query_timeout)

    async def close(self) -> None:
        self._pool.close()
        await self._pool.wait_closed()

    @property
    def pool_stats(self) -> dict:
        return {"size": self._pool.size, "free": self._pool.freesize, "max": self._pool.maxsize}

    # -- plumbing ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _cursor(self) -> AsyncIterator:
        try:
            conn = await self._pool.acquire()
        except _UNAVAILABLE as exc:
            raise Unavailable(f"PostgreSQL is unavailable: {_reason(exc)}") from exc
        broken = False
        try:
            try:
                cur = await conn.cursor()
            except _UNAVAILABLE as exc:  # a connection that died while idle
                broken = True
                raise Unavailable(f"PostgreSQL is unavailable: {_reason(exc)}") from exc
            try:
                yield cur
            except _UNAVAILABLE as exc:
                # A timeout is no sign that the other connections are dead (the
                # server may just be slow); a connection that failed is.
                broken = not isinstance(exc, asyncio.TimeoutError)
                raise Unavailable(f"PostgreSQL is unavailable: {_reason(exc)}") from exc
            finally:
                cur.close()
        finally:
            if not conn.closed and conn.raw.get_transaction_status() not in (
                psycopg2.extensions.TRANSACTION_STATUS_IDLE,
            ):
                conn.close()  # a query cancelled mid-flight: do not reuse
            self._pool.release(conn)
            if broken and conn.closed:
                self._drop_idle()

    def _drop_idle(self) -> None:
        """After a connection failure, close the pool's idle connections too.

        They were opened to the same server, so after a PostgreSQL restart or
        a network cut every one of them is dead, and each would fail one more
        request before the pool noticed. Closing them now means the next
        request opens a fresh connection: chatd recovers with the first
        request after PostgreSQL is back, not after ``DB_POOL_SIZE`` failures.
        """
        if self._clearing is None or self._clearing.done():
            self._clearing = asyncio.ensure_future(self._pool.clear())

    async def _one(self, sql: str | Stmt, params: dict) -> tuple | None:
        async with self._cursor() as cur:
            await _run(cur, sql, params)
            return await cur.fetchone()

    async def _all(self, sql: str | Stmt, params: dict) -> list[tuple]:
        async with self._cursor() as cur:
            await _run(cur, sql, params)
            return await cur.fetchall()

    # -- queries ----------------------------------------------------------------

    async def ping(self) -> None:
        await self._one("SELECT 1", {})

    async def access(self, chat_id: str, user_id: str) -> Access | None:
        """The caller's standing in a chat (None: no such chat). Checks made
        in the same loop iteration go to PostgreSQL as one statement."""
        return await self.access_checks.run((chat_id, user_id))

    async def send(
        self, chat_id: str, user_id: str, content: str, client_id: str | None
    ) -> Sent | None:
        """Insert a message; None when the sender may not post (or no such chat).
        Sends made in the same loop iteration go to PostgreSQL as one statement
        (SEND_MANY) when they are to different chats."""
        return await self.sends.run((chat_id, user_id, content, client_id))

    async def send_one(
        self, chat_id: str, user_id: str, content: str, client_id: str | None
    ) -> Sent | None:
        """:meth:`send`, on its own statement."""
        params = {"chat_id": chat_id, "user_id": user_id, "content": content,
                  "client_id": client_id}  # fmt: skip
        try:
            row = await self._one(Q.SEND, params)
        except psycopg2.errors.UniqueViolation:
            if client_id is None:
                raise
            original = await self._one(Q.BY_CLIENT_ID, params)
            if original is None:  # pragma: no cover - the index just said it exists
                raise
            return Sent(row=original, created=False)
        if row is None:
            return None
        return Sent(row=row[:9], created=True, version=row[9], joined=row[10])

    async def send_batch(
        self, chat_id: str, items: list[tuple[str, str, str | None]]
    ) -> tuple[list[tuple], int, dict[tuple[str, str], tuple]] | None:
        """Insert several (sender, content, client_id) into one chat at once.

        Returns (created rows in seq order, new version, originals of repeated
        client_ids keyed by (sender, client_id)); items in neither were refused
        (sender may not post, or no such chat). None when a concurrent repeat
        hit the unique index: the caller falls back to one send per item.
        """
        params = {
            "chat_id": chat_id,
            "senders": [i[0] for i in items],
            "contents": [i[1] for i in items],
            "client_ids": [i[2] for i in items],
        }
        try:
            rows = await self._all(Q.SEND_BATCH, params)
        except psycopg2.errors.UniqueViolation:
            return None
        created = [r[:9] for r in rows]
        version = rows[0][9] if rows else 0
        originals: dict[tuple[str, str], tuple] = {}
        made = {(r[3], r[5]) for r in created if r[5] is not None}
        wanted = [(s, c) for s, _, c in items if c is not None and (s, c) not in made]
        if wanted:
            found = await self._all(
                SQL.BY_CLIENT_IDS,
                {
                    "chat_id": chat_id,
                    "senders": [w[0] for w in wanted],
                    "client_ids": [w[1] for w in wanted],
                },
            )
            originals = {(r[3], r[5]): r for r in found}
        return created, version, originals

    async def history(
        self,
        chat_id: str,
        *,
        limit: int,
        before_seq: int | None = None,
        after_seq: int | None = None,
        include_deleted: bool = False,
    ) -> list[tuple]:
        """Up to ``limit`` rows, newest-first for newest/before pages, oldest-first for after."""
        if after_seq is not None:
            kind, seq = "after", after_seq
        elif before_seq is not None:
            kind, seq = "before", before_seq
        else:
            kind, seq = "newest", None
        return await self._all(
            Q.HISTORY[(kind, include_deleted)], {"chat_id": chat_id, "seq": seq, "limit": limit}
        )

    async def cache_fill(self, chat_id: str, limit: int) -> tuple[int, int, list[tuple]] | None:
        """(version, last_seq, newest rows newest-first) from one snapshot; None: no chat."""
        rows = await self._all(Q.CACHE_FILL, {"chat_id": chat_id, "limit": limit})
        if not rows:
            return None
        version, last_seq = rows[0][0], rows[0][1]
        return version, last_seq, [r[2:] for r in rows if r[2] is not None]

    async def latest(self, chat_id: str) -> tuple | None:
        return await self._one(Q.LATEST, {"chat_id": chat_id})

    async def message_access(self, message_id: int, user_id: str) -> MessageAccess | None:
        row = await self._one(Q.MESSAGE_ACCESS, {"id": message_id, "user_id": user_id})
        return MessageAccess(*row) if row else None

    async def delete_message(self, message_id: int) -> tuple[tuple, int] | None:
        """(tombstone row, version); None if it was already deleted."""
        row = await self._one(SQL.DELETE, {"id": message_id})
        return (row[:9], row[9]) if row else None

    async def edit_message(self, message_id: int, content: str) -> tuple[tuple, int] | None:
        row = await self._one(SQL.EDIT, {"id": message_id, "content": content})
        return (row[:9], row[9]) if row else None

    async def create_chat(
        self, chat_id: str, title: str, visibility: str, created_by: str, members: list[str]
    ) -> tuple[tuple, list[tuple]]:
        async with self._cursor() as cur, cur.begin():
            try:
                await cur.execute(
                    SQL.CREATE_CHAT,
                    {"id": chat_id, "title": title, "visibility": visibility,
                     "created_by": created_by},
                )  # fmt: skip
            except psycopg2.errors.UniqueViolation:
                raise Conflict(f"chat id {chat_id!r} is already taken") from None
            chat = await cur.fetchone()
            await cur.execute(
                SQL.ADD_MEMBERS, {"chat_id": chat_id, "users": [created_by, *members]}
            )
            members_rows = await cur.fetchall()
        return chat, members_rows

    async def chat(self, chat_id: str) -> tuple | None:
        return await self._one(SQL.CHAT, {"chat_id": chat_id})

    async def members(self, chat_id: str) -> list[tuple]:
        return await self._all(SQL.MEMBERS, {"chat_id": chat_id})

    async def user_chats(self, user_id: str) -> list[tuple]:
        return await self._all(SQL.USER_CHATS, {"user_id": user_id})

    async def member(self, chat_id: str, user_id: str) -> tuple | None:
        return await self._one(SQL.MEMBER, {"chat_id": chat_id, "user_id": user_id})

    async def owner_count(self, chat_id: str) -> int:
        row = await self._one(SQL.OWNERS, {"chat_id": chat_id})
        return row[0] if row else 0

    async def upsert_member(self, chat_id: str, user_id: str, role: str) -> tuple:
        row = await self._one(
            SQL.UPSERT_MEMBER, {"chat_id": chat_id, "user_id": user_id, "role": role}
        )
        assert row is not None
        return row

    async def remove_member(self, chat_id: str, user_id: str) -> bool:
        return (
            await self._one(SQL.REMOVE_MEMBER, {"chat_id": chat_id, "user_id": user_id}) is not None
        )

    async def admin_chats(self, after_id: str = "", limit: int = 500) -> list[tuple]:
        """Up to ``limit`` chats with id above ``after_id``, by id: CHAT_COLS + member count."""
        return await self._all(SQL.ADMIN_CHATS, {"after_id": after_id, "limit": limit})

    async def mark_read(self, chat_id: str, user_id: str, seq: int) -> int | None:
        """The new marker if it moved forward, else None."""
        row = await self._one(SQL.MARK_READ, {"chat_id": chat_id, "user_id": user_id, "seq": seq})
        return row[0] if row else None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
