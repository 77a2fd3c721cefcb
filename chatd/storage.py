"""PostgreSQL, through one aiopg pool per process.

Every query chatd runs is in :mod:`chatd.queries`, parameterised, with a note
on why it is shaped the way it is; this module runs them. Rules (who may do
what) are not here: the domain layer asks for facts and decides. Connection
trouble of any kind surfaces as :class:`~chatd.errors.Unavailable` (503),
never as a hang: the pool's timeout bounds both waiting for a connection and
each query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiopg
import psycopg2
import psycopg2.errors

from .coalesce import Coalescer
from .errors import Conflict, Unavailable
from .queries import N_MSG, SQL, Q, Stmt
from .text import candidates_json, fold

log = logging.getLogger("chatd.storage")


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
class Change:
    """A change to a chat's messages, ready to run (Storage.apply)."""

    stmt: Stmt
    params: dict


@dataclass(frozen=True, slots=True)
class Sent:
    """Outcome of a send: created (row, version) or a repeat of client_id (row)."""

    row: tuple
    created: bool
    version: int = 0
    joined: bool = False  # the send made the poster a member (public chat)


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


class _MyChats(Coalescer):
    """The chats each searcher of one loop iteration is a member of, as one
    query (chatd.coalesce): a search reads them first (see queries.SQL's
    SEARCH_MINE for why), so concurrent searches share that round trip."""

    def __init__(self, storage: Storage):
        super().__init__()
        self._storage = storage

    async def one(self, user_id: str) -> list[str]:
        return [r[0] for r in await self._storage._all(Q.MY_CHATS, {"user_id": user_id})]

    async def many(self, user_ids: list[str]) -> list[list[str]]:
        found: list[list[str]] = [[] for _ in user_ids]
        for i, chat_id in await self._storage._all(Q.MY_CHATS_MANY, {"user_ids": user_ids}):
            found[i - 1].append(chat_id)
        return found


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
            "foldeds": [fold(calls[i][2]) for i in together],
            "cands": [candidates_json(calls[i][2]) for i in together],
            "ts_config": self._storage.search_config,
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
                    row=row[1 : N_MSG + 1], created=True, version=row[N_MSG + 1],
                    joined=row[N_MSG + 2],
                )  # fmt: skip
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
    # The text search configuration messages are indexed and searched with
    # (SEARCH_LANGUAGE, checked at start-up by check_search_config).
    search_config = "simple"

    def __init__(self, pool: aiopg.Pool, timeout: float):
        self._pool = pool
        self.timeout = timeout
        self._clearing: asyncio.Future | None = None
        self.access_checks = _AccessChecks(self)
        self.sends = _Sends(self)
        self.my_chats = _MyChats(self)

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

    def _text(self, content: str) -> dict:
        """What a statement that writes ``content`` derives from it: the
        folded text to index and the @mention candidates (chatd.text)."""
        return {"folded": fold(content), "cands": candidates_json(content),
                "ts_config": self.search_config}  # fmt: skip

    async def check_search_config(self, name: str) -> None:
        """ValueError unless ``name`` is a text search configuration of this
        PostgreSQL (SEARCH_LANGUAGE, checked at start-up)."""
        row = await self._one(
            "SELECT count(*) FROM pg_ts_config"
            " WHERE cfgname = %(name)s OR oid::regconfig::text = %(name)s",
            {"name": name},
        )
        if not row or not row[0]:
            raise ValueError(
                f"SEARCH_LANGUAGE {name!r} is not a text search configuration of this PostgreSQL"
            )

    async def search(self, user_id: str, q: str, chat_id: str | None, before: int,
                     limit: int) -> list[tuple]:  # fmt: skip
        params = {"user_id": user_id, "q": fold(q), "chat_id": chat_id, "before": before,
                  "limit": limit, "ts_config": self.search_config}  # fmt: skip
        if chat_id is not None:
            return await self._all(SQL.SEARCH_CHAT, params)
        params["chats"] = await self.my_chats.run(user_id)
        if not params["chats"]:
            return []
        return await self._all(SQL.SEARCH_MINE, params)

    async def mentions(self, user_id: str, before: int, unread: bool, limit: int) -> list[tuple]:
        return await self._all(
            SQL.MENTIONS, {"user_id": user_id, "before": before, "unread": unread, "limit": limit}
        )

    async def open_direct(self, chat_id: str, user_id: str, users: list[str]
                          ) -> tuple[bool, list[str], tuple | None, list[tuple]]:  # fmt: skip
        """Create the direct chat ``chat_id`` of ``users`` or, when it exists,
        bring the caller back into it, in one transaction: (created, users
        who became members, chat row, member rows)."""
        async with self._cursor() as cur, cur.begin():
            await cur.execute(SQL.DIRECT_CREATE, {"chat_id": chat_id, "user_id": user_id})
            created = await cur.fetchone() is not None
            await cur.execute(SQL.CHAT, {"chat_id": chat_id})
            chat = await cur.fetchone()
            joined: list[str] = []
            if chat is not None and chat[7] == "direct":
                await cur.execute(
                    SQL.DIRECT_MEMBERS,
                    {"chat_id": chat_id, "users": users if created else [user_id]},
                )
                joined = [r[0] for r in await cur.fetchall()]
                await cur.execute(SQL.CHAT, {"chat_id": chat_id})
                chat = await cur.fetchone()
            await cur.execute(SQL.MEMBERS, {"chat_id": chat_id})
            members = await cur.fetchall()
        return created, joined, chat, members

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
                  "client_id": client_id, **self._text(content)}  # fmt: skip
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
        return Sent(row=row[:N_MSG], created=True, version=row[N_MSG], joined=row[N_MSG + 1])

    async def send_batch(
        self, chat_id: str, items: list[tuple[str, str, str | None]]
    ) -> tuple[list[tuple], int, dict[tuple[str, str], tuple], set[str]] | None:
        """Insert several (sender, content, client_id) into one chat at once.

        Returns (created rows in seq order, new version, originals of repeated
        client_ids keyed by (sender, client_id), senders the batch made members
        of a public chat); items in neither were refused
        (sender may not post, or no such chat). None when a concurrent repeat
        hit the unique index: the caller falls back to one send per item.
        """
        params = {
            "chat_id": chat_id,
            "senders": [i[0] for i in items],
            "contents": [i[1] for i in items],
            "client_ids": [i[2] for i in items],
            "foldeds": [fold(i[1]) for i in items],
            "cands": [candidates_json(i[1]) for i in items],
            "ts_config": self.search_config,
        }
        try:
            rows = await self._all(Q.SEND_BATCH, params)
        except psycopg2.errors.UniqueViolation:
            return None
        created = [r[:N_MSG] for r in rows]
        version = rows[0][N_MSG] if rows else 0
        joined = {r[3] for r in rows if r[N_MSG + 1]}
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
        return created, version, originals, joined

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

    async def _change(self, stmt: Stmt, params: dict) -> list[tuple]:
        """LOCK then ``stmt`` in one round trip and one transaction (a
        multi-statement query runs as one): rows of (what, MSG_COLS...)."""
        async with self._cursor() as cur:
            if getattr(cur.connection, "chatd_prepared", False):
                await cur.execute(
                    f"{Q.LOCK.execute};{stmt.execute}", [*Q.LOCK.args(params), *stmt.args(params)]
                )
            else:
                await cur.execute(f"{SQL.LOCK};{stmt.sql}", params)
            return await cur.fetchall()

    # A change to one chat's messages, described (see queries.SQL, "changes
    # to existing messages"), to run alone (apply) or with others of the same
    # chat in one transaction (apply_together). Each answers rows of (what,
    # MSG_COLS...): 'm' the changed message, 'p' its parent changed with it,
    # 'same' nothing changed, 'full' a limit refused it; none: no such
    # (live, where it matters) message in that chat.

    @staticmethod
    def delete_change(chat_id: str, message_id: int) -> Change:
        return Change(Q.DELETE, {"chat_id": chat_id, "id": message_id})

    def edit_change(self, chat_id: str, message_id: int, content: str) -> Change:
        return Change(Q.EDIT, {"chat_id": chat_id, "id": message_id, "content": content,
                               **self._text(content)})  # fmt: skip

    @staticmethod
    def react_change(chat_id: str, message_id: int, user_id: str, emoji: str,
                     max_emoji: int) -> Change:  # fmt: skip
        return Change(Q.REACT, {"chat_id": chat_id, "id": message_id, "user_id": user_id,
                                "emoji": emoji, "max_emoji": max_emoji})  # fmt: skip

    @staticmethod
    def unreact_change(chat_id: str, message_id: int, user_id: str, emoji: str) -> Change:
        return Change(Q.UNREACT, {"chat_id": chat_id, "id": message_id, "user_id": user_id,
                                  "emoji": emoji})  # fmt: skip

    @staticmethod
    def pin_change(chat_id: str, message_id: int, max_pins: int) -> Change:
        return Change(Q.PIN, {"chat_id": chat_id, "id": message_id, "max_pins": max_pins})

    @staticmethod
    def unpin_change(chat_id: str, message_id: int) -> Change:
        return Change(Q.UNPIN, {"chat_id": chat_id, "id": message_id})

    async def apply(self, change: Change) -> list[tuple]:
        """One change: LOCK; CHANGE in one round trip and one transaction."""
        return await self._change(change.stmt, change.params)

    async def apply_together(self, chat_id: str, changes: list[Change]) -> list[list[tuple]]:
        """Several changes of one chat in ONE transaction (one commit, one
        fsync): the chat's lock first, then each in order, each with a
        snapshot that sees the ones before it. A failure rolls all back."""
        async with self._cursor() as cur:
            await cur.execute("BEGIN")
            try:
                await _run(cur, Q.LOCK, {"chat_id": chat_id})
                out = []
                for change in changes:
                    await _run(cur, change.stmt, change.params)
                    out.append(await cur.fetchall())
                await cur.execute("COMMIT")
            except BaseException:
                try:
                    await cur.execute("ROLLBACK")
                except Exception:
                    pass  # the connection is gone; _cursor closes it
                raise
            return out

    async def delete_message(self, chat_id: str, message_id: int) -> list[tuple]:
        """('m', tombstone) and ('p', parent) when it was a reply; [] if it
        was already deleted."""
        return await self.apply(self.delete_change(chat_id, message_id))

    async def edit_message(self, chat_id: str, message_id: int, content: str) -> list[tuple]:
        return await self.apply(self.edit_change(chat_id, message_id, content))

    async def send_reply(self, chat_id: str, user_id: str, content: str, client_id: str | None,
                         reply_to: int) -> tuple[Sent, tuple | None] | str | None:  # fmt: skip
        """A reply and its parent's new row: (Sent, parent row); a repeated
        client_id: (Sent of the original, None); "noparent" when reply_to is
        not a live message of the chat; None when the sender may not post."""
        params = {"chat_id": chat_id, "user_id": user_id, "content": content,
                  "client_id": client_id, "reply_to": reply_to,
                  **self._text(content)}  # fmt: skip
        try:
            rows = await self._change(Q.SEND_REPLY, params)
        except psycopg2.errors.UniqueViolation:
            if client_id is None:
                raise
            original = await self._one(Q.BY_CLIENT_ID, params)
            if original is None:  # pragma: no cover - the index just said it exists
                raise
            return Sent(row=original, created=False), None
        if not rows:
            return None
        if rows[0][0] == "noparent":
            return "noparent"
        by = {r[0]: r for r in rows}
        sent = Sent(row=by["m"][1 : N_MSG + 1], created=True, version=by["m"][1 + 8],
                    joined=by["m"][N_MSG + 1])  # fmt: skip
        return sent, by["p"][1 : N_MSG + 1]

    async def changes(self, chat_id: str, since: int, limit: int
                      ) -> tuple[int, int, list[tuple]] | None:  # fmt: skip
        """(chat version, last_seq, messages with version > since ascending)
        from one snapshot; None: no chat."""
        rows = await self._all(Q.CHANGES, {"chat_id": chat_id, "since": since, "limit": limit})
        if not rows:
            return None
        return rows[0][0], rows[0][1], [r[2:] for r in rows if r[2] is not None]

    async def replies(self, message_id: int, after_seq: int, limit: int) -> list[tuple]:
        return await self._all(SQL.REPLIES, {"id": message_id, "after": after_seq, "limit": limit})

    async def edit_history(self, message_id: int) -> list[tuple]:
        return await self._all(SQL.HISTORY_OF, {"id": message_id})

    async def pins(self, chat_id: str, limit: int) -> list[tuple]:
        return await self._all(SQL.PINS, {"chat_id": chat_id, "limit": limit})

    async def message(self, message_id: int) -> tuple | None:
        return await self._one(SQL.MESSAGE, {"id": message_id})

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

    async def upsert_member(self, chat_id: str, user_id: str, role: str) -> tuple[tuple, bool]:
        """(member row, whether the user was not a member before)."""
        row = await self._one(
            SQL.UPSERT_MEMBER, {"chat_id": chat_id, "user_id": user_id, "role": role}
        )
        assert row is not None
        return row[:4], row[4]

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
