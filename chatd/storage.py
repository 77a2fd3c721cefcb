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


# The 14 columns of a message, in model.MESSAGE_KEYS order (N_MSG). The
# reactions aggregate comes as its JSON text (model parses it only when it is
# not empty); pinned is whether pinned_at is set.
MSG_COLS = (
    "m.id, m.chat_id, m.seq, m.sender_id, m.content, m.client_id, "
    f"{_ts('m.created_at')}, {_ts('m.edited_at')}, m.version, m.reply_to, m.reply_count, "
    "m.reactions::text, m.pinned_at IS NOT NULL, m.deleted"
)
N_MSG = 14
# The 7 columns of a chat (model.chat), version last.
CHAT_COLS = (
    f"c.id, c.title, c.visibility, c.created_by, {_ts('c.created_at')}, c.last_seq, c.version"
)
N_CHAT = 7
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
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id, version)
            SELECT id, last_seq, %(user_id)s, %(content)s, %(client_id)s, version FROM c
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
               SET last_seq = last_seq + (SELECT count(*) FROM ok),
                   version = version + (SELECT count(*) FROM ok)
             WHERE id = %(chat_id)s AND EXISTS (SELECT 1 FROM ok)
         RETURNING last_seq, version, visibility
        ), j AS (
            INSERT INTO chat_members (chat_id, user_id)
            SELECT DISTINCT %(chat_id)s, ok.sender_id FROM ok, bump WHERE bump.visibility = 'public'
            ON CONFLICT DO NOTHING
            RETURNING user_id
        ), m AS (
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id, version)
            SELECT %(chat_id)s, bump.last_seq - (SELECT count(*) FROM ok) + ok.n,
                   ok.sender_id, ok.content, ok.client_id,
                   bump.version - (SELECT count(*) FROM ok) + ok.n
              FROM ok, bump
            RETURNING *
        )
        SELECT {MSG_COLS}, bump.version, EXISTS (SELECT 1 FROM j WHERE j.user_id = m.sender_id)
          FROM m, bump ORDER BY m.seq"""

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
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id, version)
            SELECT id, last_seq, sender_id, content, client_id, version FROM c
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

    # -- changes to existing messages (version 2) --------------------------
    #
    # Each runs as "LOCK; CHANGE" in ONE round trip (see Storage._change):
    # LOCK takes the chat row's lock, which every change to the chat's
    # messages takes first (sends too), and CHANGE then runs with a snapshot
    # taken under that lock, so what it reads (the reactions, the pin count,
    # the parent of a reply) cannot move underneath it. CHANGE bumps
    # chats.version by the number of messages it changes and sets each
    # changed message's version from it in the same statement (one change,
    # one version), which also keeps the page cache honest (sql/001).
    #
    # Each answers rows of (what, MSG_COLS): 'm' the changed message, 'p' its
    # parent changed with it (reply_count), 'same' the message as it is when
    # nothing changed, 'full' the same when a limit refused the change. No
    # row: no such (live, where it matters) message in that chat.
    LOCK = "SELECT 1 FROM chats WHERE id = %(chat_id)s FOR UPDATE"

    # Deleting erases the content, the reactions, the pin and the edit
    # history; the row stays as a tombstone so seq stays gapless. A deleted
    # reply also changes its parent's reply_count (and so its version).
    DELETE = f"""
        WITH t AS (
            SELECT id, reply_to FROM messages
             WHERE id = %(id)s AND chat_id = %(chat_id)s AND NOT deleted
        ), v AS (
            UPDATE chats c SET version = c.version + 1 + (t.reply_to IS NOT NULL)::int
              FROM t WHERE c.id = %(chat_id)s
         RETURNING c.version, t.reply_to
        ), r AS (
            DELETE FROM reactions WHERE message_id IN (SELECT id FROM t)
        ), e AS (
            DELETE FROM message_edits WHERE message_id IN (SELECT id FROM t)
        ), m AS (
            UPDATE messages m
               SET deleted = true, content = NULL, reactions = '[]', pinned_at = NULL,
                   version = v.version - (v.reply_to IS NOT NULL)::int
              FROM v WHERE m.id = %(id)s
         RETURNING m.*
        ), p AS (
            UPDATE messages m
               SET reply_count = m.reply_count - 1, version = v.version
              FROM v WHERE m.id = v.reply_to
         RETURNING m.*
        )
        SELECT 'm', {MSG_COLS} FROM m
        UNION ALL SELECT 'p', {MSG_COLS} FROM p AS m"""

    # An edit keeps the text it replaces (with when that text was written) in
    # message_edits. The same text again changes nothing.
    EDIT = f"""
        WITH t AS (
            SELECT id, content, coalesce(edited_at, created_at) AS at FROM messages
             WHERE id = %(id)s AND chat_id = %(chat_id)s AND NOT deleted
               AND content <> %(content)s
        ), v AS (
            UPDATE chats c SET version = c.version + 1
              FROM t WHERE c.id = %(chat_id)s
         RETURNING c.version
        ), h AS (
            INSERT INTO message_edits (message_id, content, at) SELECT id, content, at FROM t
        ), m AS (
            UPDATE messages m SET content = %(content)s, edited_at = now(), version = v.version
              FROM v WHERE m.id = %(id)s
         RETURNING m.*
        )
        SELECT 'm', {MSG_COLS} FROM m
        UNION ALL
        SELECT 'same', {MSG_COLS} FROM messages m
         WHERE m.id = %(id)s AND m.chat_id = %(chat_id)s AND NOT m.deleted
           AND NOT EXISTS (SELECT 1 FROM t)"""

    # The aggregate the message JSON shows, from the rows of ``r`` (the
    # message's reactions after the change): per emoji in order of
    # emoji_since, the exact count and the first 20 users by reaction id.
    _AGGREGATE = """
        SELECT coalesce(json_agg(json_build_object('emoji', e.emoji, 'count', e.n,
                                                   'users', e.users) ORDER BY e.since),
                        '[]'::json) AS j
          FROM (SELECT emoji, min(emoji_since) AS since, count(*) AS n,
                       (array_agg(user_id ORDER BY id))[1:20] AS users
                  FROM r GROUP BY emoji) e"""

    # The caller reacts: only to a live message, once per emoji, and with at
    # most 20 different emoji per message ('full' otherwise).
    REACT = f"""
        WITH t AS (
            SELECT id FROM messages
             WHERE id = %(id)s AND chat_id = %(chat_id)s AND NOT deleted
        ), old AS (
            SELECT x.emoji, x.user_id, x.id, x.emoji_since FROM reactions x
             WHERE x.message_id = %(id)s
        ), ok AS (
            SELECT t.id FROM t
             WHERE NOT EXISTS (SELECT 1 FROM old WHERE emoji = %(emoji)s AND user_id = %(user_id)s)
               AND (EXISTS (SELECT 1 FROM old WHERE emoji = %(emoji)s)
                    OR (SELECT count(DISTINCT emoji) FROM old) < %(max_emoji)s)
        ), ins AS (
            INSERT INTO reactions (message_id, emoji, user_id, emoji_since)
            SELECT ok.id, %(emoji)s, %(user_id)s,
                   coalesce((SELECT min(emoji_since) FROM old WHERE emoji = %(emoji)s),
                            nextval('reactions_id_seq'))
              FROM ok
         RETURNING emoji, user_id, id, emoji_since
        ), r AS (
            SELECT * FROM old UNION ALL SELECT * FROM ins
        ), agg AS ({_AGGREGATE}
        ), v AS (
            UPDATE chats c SET version = c.version + 1
              FROM ins WHERE c.id = %(chat_id)s
         RETURNING c.version
        ), m AS (
            UPDATE messages m SET reactions = agg.j, version = v.version
              FROM v, agg WHERE m.id = %(id)s
         RETURNING m.*
        )
        SELECT 'm', {MSG_COLS} FROM m
        UNION ALL
        SELECT CASE WHEN EXISTS (SELECT 1 FROM ok) THEN 'same' ELSE
                    CASE WHEN EXISTS (SELECT 1 FROM old WHERE emoji = %(emoji)s
                                                          AND user_id = %(user_id)s)
                         THEN 'same' ELSE 'full' END END,
               {MSG_COLS}
          FROM messages m
         WHERE m.id = %(id)s AND m.chat_id = %(chat_id)s AND NOT m.deleted
           AND NOT EXISTS (SELECT 1 FROM ins)"""

    # The caller's reaction off (a tombstone has none: 'same').
    UNREACT = f"""
        WITH gone AS (
            DELETE FROM reactions x
             USING messages t
             WHERE x.message_id = %(id)s AND x.emoji = %(emoji)s AND x.user_id = %(user_id)s
               AND t.id = x.message_id AND t.chat_id = %(chat_id)s
         RETURNING x.id
        ), r AS (
            SELECT x.emoji, x.user_id, x.id, x.emoji_since FROM reactions x
             WHERE x.message_id = %(id)s AND x.id NOT IN (SELECT id FROM gone)
        ), agg AS ({_AGGREGATE}
        ), v AS (
            UPDATE chats c SET version = c.version + 1
             WHERE c.id = %(chat_id)s AND EXISTS (SELECT 1 FROM gone)
         RETURNING c.version
        ), m AS (
            UPDATE messages m SET reactions = agg.j, version = v.version
              FROM v, agg WHERE m.id = %(id)s
         RETURNING m.*
        )
        SELECT 'm', {MSG_COLS} FROM m
        UNION ALL
        SELECT 'same', {MSG_COLS} FROM messages m
         WHERE m.id = %(id)s AND m.chat_id = %(chat_id)s AND NOT EXISTS (SELECT 1 FROM gone)"""

    # Pin a live message; at most max_pins pinned per chat ('full').
    PIN = f"""
        WITH t AS (
            SELECT id, pinned_at IS NOT NULL AS pinned FROM messages
             WHERE id = %(id)s AND chat_id = %(chat_id)s AND NOT deleted
        ), room AS (
            SELECT count(*) < %(max_pins)s AS ok FROM messages
             WHERE chat_id = %(chat_id)s AND pinned_at IS NOT NULL
        ), v AS (
            UPDATE chats c SET version = c.version + 1
              FROM t, room WHERE c.id = %(chat_id)s AND NOT t.pinned AND room.ok
         RETURNING c.version
        ), m AS (
            UPDATE messages m SET pinned_at = clock_timestamp(), version = v.version
              FROM v WHERE m.id = %(id)s
         RETURNING m.*
        )
        SELECT 'm', {MSG_COLS} FROM m
        UNION ALL
        SELECT CASE WHEN t.pinned THEN 'same' ELSE 'full' END, {MSG_COLS}
          FROM messages m, t WHERE m.id = t.id AND NOT EXISTS (SELECT 1 FROM v)"""

    # Unpin (a tombstone is never pinned: 'same').
    UNPIN = f"""
        WITH t AS (
            SELECT id FROM messages
             WHERE id = %(id)s AND chat_id = %(chat_id)s AND pinned_at IS NOT NULL
        ), v AS (
            UPDATE chats c SET version = c.version + 1
              FROM t WHERE c.id = %(chat_id)s
         RETURNING c.version
        ), m AS (
            UPDATE messages m SET pinned_at = NULL, version = v.version
              FROM v WHERE m.id = %(id)s
         RETURNING m.*
        )
        SELECT 'm', {MSG_COLS} FROM m
        UNION ALL
        SELECT 'same', {MSG_COLS} FROM messages m
         WHERE m.id = %(id)s AND m.chat_id = %(chat_id)s AND NOT EXISTS (SELECT 1 FROM t)"""

    # A reply: SEND's rule, plus the parent (a live message of the same chat,
    # checked under the chat's lock) gets reply_count + 1. Two versions: the
    # new message the first, its parent the second.
    SEND_REPLY = f"""
        WITH parent AS (
            SELECT id FROM messages
             WHERE id = %(reply_to)s AND chat_id = %(chat_id)s AND NOT deleted
        ), c AS (
            UPDATE chats
               SET last_seq = last_seq + 1, version = version + 2
             WHERE id = %(chat_id)s AND EXISTS (SELECT 1 FROM parent)
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
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id, version, reply_to)
            SELECT id, last_seq, %(user_id)s, %(content)s, %(client_id)s, version - 1,
                   %(reply_to)s
              FROM c
            RETURNING *
        ), p AS (
            UPDATE messages m SET reply_count = m.reply_count + 1, version = c.version
              FROM c WHERE m.id = %(reply_to)s
         RETURNING m.*
        )
        SELECT 'm', {MSG_COLS}, EXISTS (SELECT 1 FROM j) FROM m
        UNION ALL SELECT 'p', {MSG_COLS}, false FROM p AS m
        UNION ALL SELECT 'noparent', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                         NULL, NULL, NULL, NULL, NULL, false
         WHERE NOT EXISTS (SELECT 1 FROM parent)
           AND EXISTS (SELECT 1 FROM chats x
                        WHERE x.id = %(chat_id)s
                          AND (x.visibility = 'public'
                               OR EXISTS (SELECT 1 FROM chat_members
                                           WHERE chat_id = x.id AND user_id = %(user_id)s)))"""

    # Exact sync: the messages changed since a version, ascending, one range
    # read on messages_chat_version, with the chat's version and last_seq
    # from the same snapshot.
    CHANGES = f"""
        SELECT c.version, c.last_seq, {MSG_COLS}
          FROM chats c
          LEFT JOIN LATERAL (
              SELECT * FROM messages
               WHERE chat_id = c.id AND version > %(since)s
               ORDER BY version LIMIT %(limit)s) m ON true
         WHERE c.id = %(chat_id)s
         ORDER BY m.version"""

    REPLIES = f"""
        SELECT {MSG_COLS} FROM messages m
         WHERE m.reply_to = %(id)s AND m.seq > %(after)s AND NOT m.deleted
         ORDER BY m.seq LIMIT %(limit)s"""

    # The texts a message had, oldest first, then its current one.
    HISTORY_OF = f"""
        SELECT content, {_ts("at")} FROM (
            SELECT e.content, e.at, e.id FROM message_edits e WHERE e.message_id = %(id)s
            UNION ALL
            SELECT m.content, coalesce(m.edited_at, m.created_at), 9223372036854775807
              FROM messages m WHERE m.id = %(id)s AND NOT m.deleted) h
         ORDER BY h.id"""

    PINS = f"""
        SELECT {MSG_COLS} FROM messages m
         WHERE m.chat_id = %(chat_id)s AND m.pinned_at IS NOT NULL
         ORDER BY m.pinned_at DESC, m.id DESC LIMIT %(limit)s"""

    # The one message row (MSG_COLS), whatever its state.
    MESSAGE = f"SELECT {MSG_COLS} FROM messages m WHERE m.id = %(id)s"

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
        RETURNING {MEMBER_COLS}, xmax = 0"""
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
    LOCK = Stmt("chatd_lock", SQL.LOCK)
    EDIT = Stmt("chatd_edit", SQL.EDIT)
    DELETE = Stmt("chatd_delete", SQL.DELETE)
    REACT = Stmt("chatd_react", SQL.REACT)
    UNREACT = Stmt("chatd_unreact", SQL.UNREACT)
    PIN = Stmt("chatd_pin", SQL.PIN)
    UNPIN = Stmt("chatd_unpin", SQL.UNPIN)
    SEND_REPLY = Stmt("chatd_send_reply", SQL.SEND_REPLY)
    CHANGES = Stmt("chatd_changes", SQL.CHANGES)
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

    async def delete_message(self, chat_id: str, message_id: int) -> list[tuple]:
        """('m', tombstone) and ('p', parent) when it was a reply; [] if it
        was already deleted."""
        return await self._change(Q.DELETE, {"chat_id": chat_id, "id": message_id})

    async def edit_message(self, chat_id: str, message_id: int, content: str) -> list[tuple]:
        return await self._change(
            Q.EDIT, {"chat_id": chat_id, "id": message_id, "content": content}
        )

    async def react(self, chat_id: str, message_id: int, user_id: str, emoji: str,
                    max_emoji: int) -> list[tuple]:  # fmt: skip
        params = {"chat_id": chat_id, "id": message_id, "user_id": user_id, "emoji": emoji,
                  "max_emoji": max_emoji}  # fmt: skip
        return await self._change(Q.REACT, params)

    async def unreact(self, chat_id: str, message_id: int, user_id: str, emoji: str) -> list:
        params = {"chat_id": chat_id, "id": message_id, "user_id": user_id, "emoji": emoji}
        return await self._change(Q.UNREACT, params)

    async def pin(self, chat_id: str, message_id: int, max_pins: int) -> list[tuple]:
        return await self._change(
            Q.PIN, {"chat_id": chat_id, "id": message_id, "max_pins": max_pins}
        )

    async def unpin(self, chat_id: str, message_id: int) -> list[tuple]:
        return await self._change(Q.UNPIN, {"chat_id": chat_id, "id": message_id})

    async def send_reply(self, chat_id: str, user_id: str, content: str, client_id: str | None,
                         reply_to: int) -> tuple[Sent, tuple | None] | str | None:  # fmt: skip
        """A reply and its parent's new row: (Sent, parent row); a repeated
        client_id: (Sent of the original, None); "noparent" when reply_to is
        not a live message of the chat; None when the sender may not post."""
        params = {"chat_id": chat_id, "user_id": user_id, "content": content,
                  "client_id": client_id, "reply_to": reply_to}  # fmt: skip
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
