"""Every SQL statement chatd runs, with a note on why it is shaped the way
it is (moved out of chatd/storage.py, which runs them, as it grew with
version 2). Parameterised with %(name)s placeholders; the hot ones are
PREPAREd once per connection (:class:`Stmt`, :class:`Q`).
"""

from __future__ import annotations

import re


def _ts(col: str) -> str:
    # ISO-8601 UTC with milliseconds and Z, formatted by PostgreSQL: cheaper than
    # building a datetime per row in Python and formatting it again.
    return f"""to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""


# The 15 columns of a message, in model.MESSAGE_KEYS order (N_MSG). The
# reactions aggregate comes as its JSON text (model parses it only when it is
# not empty); pinned is whether pinned_at is set.
MSG_COLS = (
    "m.id, m.chat_id, m.seq, m.sender_id, m.content, m.client_id, "
    f"{_ts('m.created_at')}, {_ts('m.edited_at')}, m.version, m.reply_to, m.reply_count, "
    "m.mentions, m.reactions::text, m.pinned_at IS NOT NULL, m.deleted"
)
N_MSG = 15
# The 8 columns of a chat (model.chat), kind last.
CHAT_COLS = (
    f"c.id, c.title, c.visibility, c.created_by, {_ts('c.created_at')}, c.last_seq, c.version, "
    "c.kind"
)
N_CHAT = 8
MEMBER_COLS = f"cm.user_id, cm.role, {_ts('cm.joined_at')}, cm.last_read_seq"


def _mentions(cands: str, chat: str, sender: str) -> str:
    """The mentions of a message being written (API.md "mentions"): of the
    candidates chatd parsed from its content (chatd.text, unique and in
    order, as JSON), those that are members of the chat, at most 50. The
    sender counts as a member (a poster on a public chat joins in the same
    statement, which its own snapshot does not show yet). Read under the
    chat's row lock, which the writing statement holds."""
    return f"""ARRAY(
        SELECT x.u FROM json_array_elements_text({cands}::json) WITH ORDINALITY AS x(u, o)
         WHERE x.u = {sender}
            OR EXISTS (SELECT 1 FROM chat_members mc WHERE mc.chat_id = {chat} AND mc.user_id = x.u)
         ORDER BY x.o LIMIT 50)"""


# The searchable text of a message: chatd folds it (chatd.text.fold) and
# names the text search configuration (SEARCH_LANGUAGE).
def _search(folded: str) -> str:
    return f"to_tsvector(%(ts_config)s::regconfig, {folded})"


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
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id, version,
                                  search, mentions)
            SELECT id, last_seq, %(user_id)s, %(content)s, %(client_id)s, version,
                   {_search("%(folded)s")}, {_mentions("%(cands)s", "c.id", "%(user_id)s")}
              FROM c
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
            SELECT t.sender_id, t.content, t.client_id, t.folded, t.cands, t.ord
              FROM unnest(%(senders)s::text[], %(contents)s::text[], %(client_ids)s::text[],
                          %(foldeds)s::text[], %(cands)s::text[])
                   WITH ORDINALITY AS t(sender_id, content, client_id, folded, cands, ord)
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
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id, version,
                                  search, mentions)
            SELECT %(chat_id)s, bump.last_seq - (SELECT count(*) FROM ok) + ok.n,
                   ok.sender_id, ok.content, ok.client_id,
                   bump.version - (SELECT count(*) FROM ok) + ok.n,
                   {_search("ok.folded")}, {_mentions("ok.cands", "%(chat_id)s", "ok.sender_id")}
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
                          %(client_ids)s::text[], %(foldeds)s::text[], %(cands)s::text[])
                   WITH ORDINALITY AS t(chat_id, sender_id, content, client_id, folded, cands, ord)
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
                   i.sender_id, i.content, i.client_id, i.folded, i.cands, i.ord
        ), j AS (
            INSERT INTO chat_members (chat_id, user_id)
            SELECT id, sender_id FROM c WHERE visibility = 'public'
            ON CONFLICT DO NOTHING
            RETURNING chat_id
        ), m AS (
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id, version,
                                  search, mentions)
            SELECT id, last_seq, sender_id, content, client_id, version,
                   {_search("c.folded")}, {_mentions("c.cands", "c.id", "c.sender_id")}
              FROM c
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
                   search = NULL, mentions = '{{}}',
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
    # message_edits. The same text again changes nothing. Its 'm' row also
    # carries the mentions it replaced, read under the chat's lock (LOCK runs
    # first): whom the edit newly mentions is exact however edits race.
    EDIT = f"""
        WITH t AS (
            SELECT id, content, coalesce(edited_at, created_at) AS at, mentions FROM messages
             WHERE id = %(id)s AND chat_id = %(chat_id)s AND NOT deleted
               AND content <> %(content)s
        ), v AS (
            UPDATE chats c SET version = c.version + 1
              FROM t WHERE c.id = %(chat_id)s
         RETURNING c.version
        ), h AS (
            INSERT INTO message_edits (message_id, content, at) SELECT id, content, at FROM t
        ), m AS (
            UPDATE messages m
               SET content = %(content)s, edited_at = now(), version = v.version,
                   search = {_search("%(folded)s")},
                   mentions = {_mentions("%(cands)s", "m.chat_id", "m.sender_id")}
              FROM v WHERE m.id = %(id)s
         RETURNING m.*
        )
        SELECT 'm', {MSG_COLS}, (SELECT mentions FROM t) FROM m
        UNION ALL
        SELECT 'same', {MSG_COLS}, NULL FROM messages m
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
            INSERT INTO messages (chat_id, seq, sender_id, content, client_id, version, reply_to,
                                  search, mentions)
            SELECT id, last_seq, %(user_id)s, %(content)s, %(client_id)s, version - 1,
                   %(reply_to)s,
                   {_search("%(folded)s")}, {_mentions("%(cands)s", "c.id", "%(user_id)s")}
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
                         NULL, NULL, NULL, NULL, NULL, NULL, false
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
               (SELECT count(*) FROM mentions mn
                 WHERE mn.user_id = cm.user_id AND mn.chat_id = c.id
                   AND mn.seq > cm.last_read_seq) AS unread_mentions,
               {MSG_COLS}
          FROM chat_members cm
          JOIN chats c ON c.id = cm.chat_id
          LEFT JOIN LATERAL (
              SELECT * FROM messages
               WHERE chat_id = c.id AND NOT deleted ORDER BY seq DESC LIMIT 1) m ON true
         WHERE cm.user_id = %(user_id)s
         ORDER BY coalesce(m.created_at, c.created_at) DESC, c.id"""

    # -- search, mentions, direct chats (version 2) ---------------------------
    #
    # Search: the GIN index on messages.search finds the matches; the scope
    # (the caller's chats, or one chat the caller may read) is part of the
    # same statement, so a message of a chat the caller cannot read is never
    # even a candidate. A tombstone's search is NULL: it never matches. The
    # query text arrives folded by chatd (chatd.text.fold), like the content.
    # Keyset paging on id, newest first; limit is the page size + 1.
    # SEARCH_MINE also gets the caller's chat ids as a constant array (read
    # just before, MY_CHATS): the planner then makes one GIN bitmap AND one
    # bitmap of those chats' rows, rather than one GIN scan per chat
    # (2-4x faster for rare words and phrases over 50 chats, see
    # docs/PERFORMANCE.md). Membership is still checked in the statement
    # itself, so a chat left in between is not searched.
    MY_CHATS = "SELECT cm.chat_id FROM chat_members cm WHERE cm.user_id = %(user_id)s"
    # The same for the searches of one loop iteration (storage._MyChats).
    MY_CHATS_MANY = """
        SELECT q.i, cm.chat_id
          FROM unnest(%(user_ids)s::text[]) WITH ORDINALITY AS q(user_id, i)
          JOIN chat_members cm ON cm.user_id = q.user_id"""
    # A query with no word that must be present (only exclusions, only
    # stop-words, only operators) has no index condition (querytree 'T')
    # and matches nothing, rather than every message the caller can read.
    _QUERY = """
        SELECT t.q, querytree(t.q) <> 'T' AS indexable
          FROM websearch_to_tsquery(%(ts_config)s::regconfig, %(q)s) AS t(q)"""
    SEARCH_MINE = f"""
        WITH q AS ({_QUERY})
        SELECT {MSG_COLS} FROM messages m, q
         WHERE m.search @@ q.q AND q.indexable
           AND m.chat_id = ANY (%(chats)s::text[])
           AND m.chat_id IN (SELECT cm.chat_id FROM chat_members cm
                              WHERE cm.user_id = %(user_id)s)
           AND m.id < %(before)s
         ORDER BY m.id DESC LIMIT %(limit)s"""
    SEARCH_CHAT = f"""
        WITH q AS ({_QUERY})
        SELECT {MSG_COLS} FROM messages m, q
         WHERE m.search @@ q.q AND q.indexable
           AND m.chat_id = %(chat_id)s
           AND EXISTS (SELECT 1 FROM chats c
                        WHERE c.id = %(chat_id)s
                          AND (c.visibility = 'public'
                               OR EXISTS (SELECT 1 FROM chat_members cm
                                           WHERE cm.chat_id = c.id
                                             AND cm.user_id = %(user_id)s)))
           AND m.id < %(before)s
         ORDER BY m.id DESC LIMIT %(limit)s"""

    # The mention feed: a range read on the mentions primary key (user,
    # message id), newest first, joined to the caller's membership (chats
    # they left drop out) and, with unread, to their read marker.
    MENTIONS = f"""
        SELECT {MSG_COLS} FROM mentions mn
          JOIN chat_members cm ON cm.chat_id = mn.chat_id AND cm.user_id = mn.user_id
          JOIN messages m ON m.id = mn.message_id
         WHERE mn.user_id = %(user_id)s AND mn.message_id < %(before)s
           AND (NOT %(unread)s OR mn.seq > cm.last_read_seq)
           AND NOT m.deleted
         ORDER BY mn.message_id DESC LIMIT %(limit)s"""

    # A direct chat: its id is derived from the pair (chatd.text), so the
    # primary key makes concurrent opens from both sides one chat; the loser
    # waits for the winner's commit and inserts nothing.
    DIRECT_CREATE = """
        INSERT INTO chats (id, title, visibility, created_by, kind)
        VALUES (%(chat_id)s, '', 'private', %(user_id)s, 'direct')
        ON CONFLICT (id) DO NOTHING
        RETURNING id"""
    DIRECT_MEMBERS = """
        INSERT INTO chat_members (chat_id, user_id)
        SELECT %(chat_id)s, u FROM unnest(%(users)s::text[]) AS u
        ON CONFLICT DO NOTHING
        RETURNING user_id"""

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
    MY_CHATS = Stmt("chatd_my_chats", SQL.MY_CHATS)
    MY_CHATS_MANY = Stmt("chatd_my_chats_many", SQL.MY_CHATS_MANY)
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
