"""The rules of chatd, in one place.

REST handlers, Socket.IO events and chatctl all call :class:`ChatService`; it
validates input (through :mod:`chatd.validate`), decides who may do what,
keeps the page cache in step and tells :class:`~chatd.events.Events` what
happened after each commit. It imports neither tornado, socketio nor click.

Who may do what (API.md):

    read a chat           members; anyone signed in if the chat is public
    post                  whoever may read (posting to a public chat joins it)
    edit a message        its sender
    delete a message      its sender, the chat's owners and admins
    add / re-role member  owners (any role); admins (role member, not over
                          owners or other admins); anyone for themselves as
                          member of a public chat
    remove a member       owners; admins (not owners or other admins); self
    read marker           members
    react / unreact       members (a non-member of a public chat: forbidden)
    pin / unpin           owners and admins
    read replies, changes, edit history, pins: whoever may read the chat

Every change to a message takes the chat's next version (storage's "one
change, one version"); within this process, a chat's changes are committed,
cached and emitted one at a time (:class:`_Order`), so the events of one chat
leave this process in version order. Changes that queue behind one in flight
commit together in one transaction (group commit, as sends do).

A private chat the caller cannot read is ``chat_not_found`` (and a message in
it ``message_not_found``), so its existence does not leak.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

import orjson

from . import model, validate
from .cache import PageCache
from .errors import BadRequest, Conflict, Forbidden, chat_not_found, message_not_found
from .events import Events, NullEvents
from .limits import EVENTS, SENDS, RateLimiter
from .presence import Gate
from .storage import Access, Change, Storage
from .text import DIRECT_ID_RE, direct_chat_id

log = logging.getLogger("chatd.domain")

DEFAULT_PAGE = 50
MAX_PAGE = 200
# join-chat replays at most this many missed messages (API.md); the client
# pages on with GET .../messages?after_seq=.
MAX_MISSED = 500
PRIVILEGED = ("owner", "admin")
# Group commit: most sends one chat transaction carries. 100-row transactions
# reach ~126,000 rows/s on this PostgreSQL against ~2,200/s for one row each.
MAX_BATCH = 100
# API.md: at most one ``typing`` per user and chat per 2 s (across processes).
TYPING_INTERVAL_MS = 2000
# Version 2 (API.md): join-chat {since_version} returns at most this many
# changed messages; GET /changes pages of 1-500 (default 100); replies pages
# of 1-200 (default 50); at most 20 different emoji per message and 50 pins
# per chat.
MAX_CHANGED = 500
MAX_CHANGES_PAGE = 500
DEFAULT_CHANGES_PAGE = 100
MAX_EMOJI = 20
MAX_PINS = 50
# GET /search and GET /mentions pages (API.md).
DEFAULT_FEED_PAGE = 20
MAX_FEED_PAGE = 100
# The longest search query (docs/API-NOTES.md): long enough for any query a
# person types, short enough that a hostile one costs little to parse.
MAX_QUERY_LENGTH = 500
# The first id no message has: "before_id" absent.
_NO_ID = 9223372036854775807

dumps = orjson.dumps
# orjson writes the keys in model.MESSAGE_KEYS order with no spaces and escapes
# every quote inside strings, so this suffix can only be a tombstone's own key.
_TOMBSTONE_TAIL = b'"deleted":true}'


def is_tombstone(raw: bytes) -> bool:
    return raw.endswith(_TOMBSTONE_TAIL)


class Page:
    """A page of messages as JSON: the rows already serialised, or (from the
    cache) already joined by commas."""

    __slots__ = ("_joined", "_rows", "has_more")

    def __init__(self, rows: list[bytes], has_more: bool):
        self._rows: list[bytes] | None = rows
        self._joined: bytes | None = None
        self.has_more = has_more

    @classmethod
    def joined(cls, joined: bytes, has_more: bool) -> Page:
        page = cls([], has_more)
        page._rows, page._joined = None, joined
        return page

    @property
    def rows(self) -> list[bytes]:
        if self._rows is None:
            self._rows = [] if not self._joined else orjson_split(self._joined)
        return self._rows

    def json(self) -> bytes:
        more = b"true" if self.has_more else b"false"
        body = self._joined if self._joined is not None else b",".join(self._rows or ())
        return b'{"messages":[' + body + b'],"has_more":' + more + b"}"

    def fragments(self) -> list[orjson.Fragment]:
        """The rows for embedding in a larger orjson document (socket acks)."""
        return [orjson.Fragment(r) for r in self.rows]


def orjson_split(joined: bytes) -> list[bytes]:
    """Comma-joined message objects back into one bytes each (rare path)."""
    return [orjson.dumps(m) for m in orjson.loads(b"[" + joined + b"]")]


@dataclass(slots=True)
class Posted:
    message: dict
    raw: bytes
    created: bool  # False: a repeat of an earlier client_id
    replaced_mentions: list | None = None  # an edit's: the mentions it replaced


@dataclass(slots=True)
class _Queued:
    user_id: str
    text: str
    client_id: str | None
    future: asyncio.Future
    reply_to: int | None = None


class _Order:
    """One change at a time per chat in this process, from the statement to
    its events, so that a chat's events leave in version order (API.md:
    "within one process's events of a chat, versions only grow"). PostgreSQL
    serialises the chat's changes anyway (its row lock); this only keeps the
    answers from overtaking each other on the way out."""

    def __init__(self) -> None:
        self._locks: dict[str, list] = {}  # chat id -> [lock, holders and waiters]

    def hold(self, chat_id: str) -> _Held:
        """``async with order.hold(chat_id):`` (a plain context manager class:
        contextlib's generator-based one cost ~2% of a send's CPU)."""
        return _Held(self._locks, chat_id)


class _Held:
    __slots__ = ("_chat_id", "_entry", "_locks")

    def __init__(self, locks: dict[str, list], chat_id: str) -> None:
        self._locks = locks
        self._chat_id = chat_id

    async def __aenter__(self) -> None:
        entry = self._locks.get(self._chat_id)
        if entry is None:
            entry = self._locks[self._chat_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        self._entry = entry
        try:
            await entry[0].acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info) -> None:
        self._entry[0].release()
        self._leave()

    def _leave(self) -> None:
        entry = self._entry
        entry[1] -= 1
        if not entry[1]:
            del self._locks[self._chat_id]


def _resolve(future: asyncio.Future, result: object) -> None:
    if not future.done():  # the waiter may have been cancelled (client gone)
        future.set_result(result)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


async def _settle(future: asyncio.Future, coro) -> None:
    try:
        result = await coro
    except Exception as exc:
        _fail(future, exc)
    else:
        _resolve(future, result)


def _settle_as_repeat(first: asyncio.Future, repeat: asyncio.Future) -> None:
    def copy(done: asyncio.Future) -> None:
        if done.cancelled():
            _fail(repeat, asyncio.CancelledError())
        elif done.exception() is not None:
            _fail(repeat, done.exception())
        else:
            posted = done.result()
            _resolve(repeat, Posted(posted.message, posted.raw, False))

    if first.done():
        copy(first)
    else:
        first.add_done_callback(copy)


@dataclass(slots=True)
class VersionCatchUp:
    """The join-chat {since_version} ack."""

    last_seq: int
    version: int
    changed: Page
    # Live events at or below this version are already in the answer (or
    # superseded by a change in it): duplicates.
    covered: int


@dataclass(slots=True)
class CatchUp:
    last_seq: int
    missed: Page
    # The highest seq the caller has once it holds this answer (everything up
    # to since_seq, then ``missed``): live events at or below it are
    # duplicates. None: no since_seq was given, nothing is replayed.
    covered: int | None = None


class ChatService:
    def __init__(
        self,
        storage: Storage,
        cache: PageCache,
        events: Events | None = None,
        max_message_length: int = 4000,
        gate: Gate | None = None,
        limiter: RateLimiter | None = None,
    ):
        self.storage = storage
        # None: no rate limits (tools that call the domain directly).
        self.limiter = limiter
        self.cache = cache
        self.events: Events = events or NullEvents()
        self.max_message_length = max_message_length
        self.gate = gate or Gate(None, "")
        self._background: set[asyncio.Task] = set()
        # chat id -> sends queued behind the transaction in flight (group commit)
        self._lanes: dict[str, list[_Queued]] = {}
        # chat id -> changes queued behind the change in flight (group commit)
        self._change_lanes: dict[str, list] = {}
        self._order = _Order()

    # -- access ---------------------------------------------------------------

    async def readable(self, user_id: str, chat_id: object) -> Access:
        """The caller's access to a chat they may read; chat_not_found otherwise."""
        access = await self.storage.access(validate.chat_id(chat_id), user_id)
        if access is None or (access.role is None and access.visibility != "public"):
            raise chat_not_found()
        return access

    # -- messages ---------------------------------------------------------------

    async def send(
        self,
        user_id: str,
        chat_id: object,
        content: object,
        client_id: object = None,
        *,
        rate_limited: bool = True,
        socket_event: bool = False,
        reply_to: object = None,
    ) -> Posted:
        """Post a message; answered once it is committed (201), or with the
        original for a repeated client_id (200). ``rate_limited=False`` skips
        the per-user send budget (chatctl seed and other operator tools, never
        a client transport); ``socket_event=True`` also counts it as a socket
        event, in the same Redis round trip.

        Group commit: while one transaction for a chat is in flight in this
        process, further sends to that chat queue in its lane and go together
        in the next one (one statement, one fsync for up to MAX_BATCH
        messages). An uncontended send takes the single-statement path at
        once, so batching adds no latency when there is nothing to batch.
        """
        try:
            chat_id = validate.chat_id(chat_id)
            text = validate.content(content, self.max_message_length)
            cid = validate.client_id(client_id)
            parent = None if reply_to is None else validate.json_int(reply_to, "reply_to", 1)
        except BadRequest:
            if socket_event and rate_limited:  # a bad event is an event all the same
                await self.socket_event(user_id)
            raise
        # After validation (bad input costs no budget), before PostgreSQL (a
        # flood is refused before it queues for a chat's row lock). A retry
        # with the same client_id counts too: it is a request all the same.
        if rate_limited and self.limiter is not None:
            await self.limiter.check(user_id, SENDS, *((EVENTS,) if socket_event else ()))
        lane = self._lanes.get(chat_id)
        if lane is not None:
            future = asyncio.get_running_loop().create_future()
            lane.append(_Queued(user_id, text, cid, future, parent))
            return await future
        self._lanes[chat_id] = lane = []
        try:
            async with self._order.hold(chat_id):
                return await self._send_one(chat_id, user_id, text, cid, parent)
        finally:
            if lane:
                self._spawn(self._drain(chat_id, lane))
            else:
                del self._lanes[chat_id]

    async def _send_one(self, chat_id: str, user_id: str, text: str, cid: str | None,
                        reply_to: int | None = None) -> Posted:  # fmt: skip
        if reply_to is not None:
            return await self._send_reply(chat_id, user_id, text, cid, reply_to)
        sent = await self.storage.send(chat_id, user_id, text, cid)
        if sent is None:
            raise chat_not_found()
        message = model.message(sent.row)
        raw = dumps(message)
        if sent.created:
            await self._announce(chat_id, sent.version, [message], [raw])
            if sent.joined:
                await self._joined(chat_id, [user_id])
        return Posted(message, raw, sent.created)

    async def _send_reply(self, chat_id: str, user_id: str, text: str, cid: str | None,
                          reply_to: int) -> Posted:  # fmt: skip
        """A reply: the new message (its own version), then its parent's new
        reply_count (the next version), each cached and emitted in order."""
        result = await self.storage.send_reply(chat_id, user_id, text, cid, reply_to)
        if result is None:
            raise chat_not_found()
        if result == "noparent":
            raise BadRequest("reply_to must be a message of this chat that is not deleted")
        sent, parent_row = result
        message = model.message(sent.row)
        raw = dumps(message)
        if sent.created:
            await self._announce(chat_id, sent.version, [message], [raw])
            await self._updated(chat_id, parent_row)
            if sent.joined:
                await self._joined(chat_id, [user_id])
        return Posted(message, raw, sent.created)

    async def _updated(self, chat_id: str, row: tuple) -> tuple[dict, bytes]:
        """A changed message reaches the cached page and the room."""
        message = model.message(row)
        raw = dumps(message)
        await self.cache.replaced(chat_id, message["version"], message["seq"], raw)
        await self.events.message_updated(message, raw)
        return message, raw

    async def _joined(self, chat_id: str, user_ids: list[str]) -> None:
        """Users just became members of a chat: chat-added to their sockets."""
        row = await self.storage.chat(chat_id)
        if row is not None:
            await self.events.chat_added(model.chat(row), user_ids)

    async def _announce(self, chat_id: str, version: int, messages: list[dict],
                        raws: list[bytes]) -> None:  # fmt: skip
        """Committed messages reach the cached page, the other processes and
        this process's sockets: one Redis round trip (the cache's append
        script also publishes). The cache first: a client that reacts to
        new-message by re-fetching finds the page warm (correct either way)."""
        news = self.events.created(messages, raws)
        if not await self.cache.appended(chat_id, version, messages[0]["seq"], raws, news.remote):
            await news.publish()
        await news.deliver()
        for message in messages:
            await self._mentioned(message)

    async def _mentioned(self, message: dict, users: list[str] | None = None) -> None:
        """``mention`` to every socket of each user the message mentions."""
        for user_id in message["mentions"] if users is None else users:
            await self.events.mentioned(user_id, message)

    async def _drain(self, chat_id: str, lane: list[_Queued]) -> None:
        """Commit a lane's queued sends in batches until it is empty."""
        try:
            while lane:
                batch = lane[:MAX_BATCH]
                del lane[:MAX_BATCH]
                try:
                    async with self._order.hold(chat_id):
                        await self._send_batch(chat_id, batch)
                except Exception as exc:  # each waiting sender gets the failure
                    for q in batch:
                        _fail(q.future, exc)
        finally:
            del self._lanes[chat_id]

    async def _send_batch(self, chat_id: str, batch: list[_Queued]) -> None:
        if len(batch) == 1 or any(q.reply_to is not None for q in batch):
            # Replies take two versions and change their parent: one by one.
            for q in batch:
                await _settle(
                    q.future, self._send_one(chat_id, q.user_id, q.text, q.client_id, q.reply_to)
                )
            return
        # The same (sender, client_id) twice in one batch: the first is sent,
        # the repeat is answered like any repeat (200, the same message).
        items: list[_Queued] = []
        repeats: list[tuple[_Queued, _Queued]] = []
        firsts: dict[tuple[str, str], _Queued] = {}
        for q in batch:
            if q.client_id is not None:
                key = (q.user_id, q.client_id)
                if key in firsts:
                    repeats.append((q, firsts[key]))
                    continue
                firsts[key] = q
            items.append(q)
        result = await self.storage.send_batch(
            chat_id, [(q.user_id, q.text, q.client_id) for q in items]
        )
        if result is None:  # a repeat committed concurrently elsewhere: one by one
            for q in items:
                await _settle(q.future, self._send_one(chat_id, q.user_id, q.text, q.client_id))
        else:
            created, version, originals, joined = result
            messages = [model.message(r) for r in created]
            raws = [dumps(m) for m in messages]
            if created:
                await self._announce(chat_id, version, messages, raws)
            if joined:
                await self._joined(chat_id, sorted(joined))
            # Created rows come back in input order (seq follows ordinality),
            # so one walk pairs each item with its row, its original or a refusal.
            i = 0
            for q in items:
                row = created[i] if i < len(created) else None
                if row is not None and (row[3], row[4], row[5]) == (q.user_id, q.text, q.client_id):
                    _resolve(q.future, Posted(messages[i], raws[i], True))
                    i += 1
                elif q.client_id is not None and (q.user_id, q.client_id) in originals:
                    message = model.message(originals[(q.user_id, q.client_id)])
                    _resolve(q.future, Posted(message, dumps(message), False))
                else:
                    _fail(q.future, chat_not_found())
        for repeat, first in repeats:
            _settle_as_repeat(first.future, repeat.future)

    async def history(
        self,
        user_id: str,
        chat_id: object,
        *,
        limit: int | None = None,
        before_seq: int | None = None,
        after_seq: int | None = None,
        include_deleted: bool = False,
    ) -> Page:
        chat_id = validate.chat_id(chat_id)
        limit = DEFAULT_PAGE if limit is None else limit
        if not 1 <= limit <= MAX_PAGE:
            raise BadRequest(f"limit must be between 1 and {MAX_PAGE}")
        if before_seq is not None and after_seq is not None:
            raise BadRequest("give at most one of before_seq and after_seq")
        newest = before_seq is None and after_seq is None

        if newest and limit < self.cache.rows and self.cache.enabled:
            page = await self._newest_cached(user_id, chat_id, limit, include_deleted)
            if page is not None:
                return page
        else:
            await self.readable(user_id, chat_id)

        rows = await self.storage.history(
            chat_id,
            limit=limit + 1,
            before_seq=before_seq,
            after_seq=after_seq,
            include_deleted=include_deleted,
        )
        has_more = len(rows) > limit
        rows = rows[:limit]
        if after_seq is None:
            rows.reverse()
        return Page([dumps(model.message(r)) for r in rows], has_more)

    async def _newest_cached(
        self, user_id: str, chat_id: str, limit: int, include_deleted: bool
    ) -> Page | None:
        """The newest page from the cache (or refilled from one snapshot), or None
        when the cached window cannot answer it (too many tombstones)."""
        # The cache read and the access check (submitted by readable() before
        # it first waits) go out in this iteration's batches, side by side.
        pending = self.cache.read_soon(chat_id, limit, include_deleted)
        try:
            access = await self.readable(user_id, chat_id)
        except BaseException:
            self.cache.drop(pending)
            raise
        cached = await self.cache.page(pending)
        if cached is not None and cached.version == access.version:
            self.cache.hits += 1
            if cached.joined is None:
                return None
            return Page.joined(cached.joined, cached.has_more)
        self.cache.misses += 1
        filled = await self.storage.cache_fill(chat_id, self.cache.rows)
        if filled is None:
            raise chat_not_found()
        version, last_seq, newest_first = filled
        rows = [dumps(model.message(r)) for r in reversed(newest_first)]
        # seq is gapless from 1 and tombstones keep their rows, so the window
        # holds every message exactly when it has last_seq rows.
        complete = len(rows) >= last_seq
        self._spawn(self.cache.fill(chat_id, version, last_seq, complete, rows))
        return _window_page(rows, complete, limit, include_deleted)

    async def latest(self, user_id: str, chat_id: object) -> Posted | None:
        """The chat's newest message (tombstone or not), for the original
        ``send-message "chat_id"`` form, which re-emits it to the room."""
        access = await self.readable(user_id, chat_id)
        row = await self.storage.latest(chat_id) if access.last_seq else None
        if row is None:
            return None
        message = model.message(row)
        raw = dumps(message)
        await self.events.message_resent(message, raw)
        return Posted(message, raw, False)

    async def _message_facts(self, user_id: str, message_id: object):
        """The message's facts for a caller who may read its chat, else
        message_not_found (a private chat's messages do not leak)."""
        mid = validate.message_id(message_id)
        facts = await self.storage.message_access(mid, user_id)
        if facts is None or (facts.role is None and facts.visibility != "public"):
            raise message_not_found()
        return facts

    async def _changed(self, chat_id: str, rows: list[tuple]) -> Posted:
        """Apply a change statement's answer (storage "LOCK; CHANGE"): each
        changed message, in version order, to the cache and the room. The
        answer is the message the caller named."""
        mine: Posted | None = None
        for row in sorted(rows, key=lambda r: r[1 + 8] or 0):
            what = row[0]
            if what == "same":
                message = model.message(row[1:])
                mine = Posted(message, dumps(message), False)
                continue
            message = model.message(row[1:])
            raw = dumps(message)
            await self.cache.replaced(chat_id, message["version"], message["seq"], raw)
            if what == "m" and message["deleted"]:
                await self.events.message_deleted(
                    chat_id, message["id"], message["seq"], message["version"]
                )
            else:
                await self.events.message_updated(message, raw)
            if what == "m":
                replaced = row[1 + model.N_MSG] if len(row) > 1 + model.N_MSG else None
                mine = Posted(message, raw, True, replaced)
        assert mine is not None
        return mine

    async def _commit(self, chat_id: str, change: Change, limit: str = "") -> Posted | None:
        """Commit a change to the chat's messages and apply it (cache, events).

        Group commit, as for sends: while a change of this chat is in flight
        in this process, further ones queue in the chat's change lane and go
        together in the next transaction (one commit for up to MAX_BATCH; a
        chat's changes serialise on its row lock anyway, so one commit each
        would bound a chat to one change per fsync). Each is then applied in
        order under the chat's _Order. ``limit``: the Conflict message for a
        'full' answer. None: no such message (or, for a delete, already
        deleted)."""
        lane = self._change_lanes.get(chat_id)
        if lane is not None:
            future = asyncio.get_running_loop().create_future()
            lane.append((change, limit, future))
            return await future
        self._change_lanes[chat_id] = lane = []
        try:
            async with self._order.hold(chat_id):
                return await self._finish(chat_id, await self.storage.apply(change), limit)
        finally:
            if lane:
                self._spawn(self._drain_changes(chat_id, lane))
            else:
                del self._change_lanes[chat_id]

    async def _drain_changes(self, chat_id: str, lane: list) -> None:
        try:
            while lane:
                batch = lane[:MAX_BATCH]
                del lane[:MAX_BATCH]
                async with self._order.hold(chat_id):
                    try:
                        if len(batch) == 1:
                            results = [await self.storage.apply(batch[0][0])]
                        else:
                            results = await self.storage.apply_together(
                                chat_id, [change for change, _, _ in batch]
                            )
                    except Exception as exc:
                        for _, _, future in batch:
                            _fail(future, exc)
                        continue
                    for (_, limit, future), rows in zip(batch, results, strict=True):
                        await _settle(future, self._finish(chat_id, rows, limit))
        finally:
            del self._change_lanes[chat_id]

    async def _finish(self, chat_id: str, rows: list[tuple], limit: str) -> Posted | None:
        if not rows:
            return None
        if rows[0][0] == "full":
            raise Conflict(limit)
        return await self._changed(chat_id, rows)

    async def edit(self, user_id: str, message_id: object, content: object) -> Posted:
        text = validate.content(content, self.max_message_length)
        facts = await self._message_facts(user_id, message_id)
        if facts.sender_id != user_id:
            raise Forbidden("only the sender may edit a message")
        if facts.deleted:
            raise message_not_found()
        posted = await self._commit(
            facts.chat_id, self.storage.edit_change(facts.chat_id, facts.id, text)
        )
        if posted is None:  # deleted in the meantime
            raise message_not_found()
        if posted.created:
            # Only the users the edit newly mentions are told (docs/API-NOTES.md),
            # against the mentions it replaced, read in its own transaction.
            earlier = set(posted.replaced_mentions or ())
            await self._mentioned(
                posted.message, [u for u in posted.message["mentions"] if u not in earlier]
            )
        return posted

    async def delete(self, user_id: str, message_id: object) -> None:
        facts = await self._message_facts(user_id, message_id)
        if facts.sender_id != user_id and facts.role not in PRIVILEGED:
            raise Forbidden("only the sender or the chat's owners and admins may delete it")
        if facts.deleted:
            return  # deleting twice is fine (204 again)
        # None: someone else deleted it just now (204 all the same)
        await self._commit(facts.chat_id, self.storage.delete_change(facts.chat_id, facts.id))

    async def react(self, user_id: str, message_id: object, emoji: object,
                    remove: bool = False) -> Posted:  # fmt: skip
        """The caller's reaction on (or off): 200 + the message either way;
        the same again changes nothing."""
        emoji = validate.emoji(emoji)
        facts = await self._message_facts(user_id, message_id)
        if facts.role is None:
            raise Forbidden("only members may react")
        if facts.deleted and not remove:
            raise message_not_found()
        if remove:
            change = self.storage.unreact_change(facts.chat_id, facts.id, user_id, emoji)
        else:
            change = self.storage.react_change(facts.chat_id, facts.id, user_id, emoji, MAX_EMOJI)
        posted = await self._commit(
            facts.chat_id, change, f"a message has at most {MAX_EMOJI} different emoji"
        )
        if posted is None:  # deleted in the meantime
            raise message_not_found()
        return posted

    async def pin(self, user_id: str, chat_id: object, message_id: object,
                  unpin: bool = False) -> Posted:  # fmt: skip
        chat_id = validate.chat_id(chat_id)
        mid = validate.message_id(message_id)
        access = await self.readable(user_id, chat_id)
        if access.role not in PRIVILEGED:
            raise Forbidden("only owners and admins may pin messages")
        if unpin:
            change = self.storage.unpin_change(chat_id, mid)
        else:
            change = self.storage.pin_change(chat_id, mid, MAX_PINS)
        posted = await self._commit(
            chat_id, change, f"a chat has at most {MAX_PINS} pinned messages"
        )
        if posted is None:
            raise message_not_found()
        return posted

    async def pins(self, user_id: str, chat_id: object) -> Page:
        chat_id = validate.chat_id(chat_id)
        await self.readable(user_id, chat_id)
        rows = await self.storage.pins(chat_id, MAX_PINS)
        return Page([dumps(model.message(r)) for r in rows], False)

    async def changes(self, user_id: str, chat_id: object, since_version: int | None,
                      limit: int | None = None) -> tuple[Page, int]:  # fmt: skip
        """The messages changed after ``since_version`` (absent: 0), in their
        current state, ascending by version; and the chat's version."""
        chat_id = validate.chat_id(chat_id)
        limit = DEFAULT_CHANGES_PAGE if limit is None else limit
        if not 1 <= limit <= MAX_CHANGES_PAGE:
            raise BadRequest(f"limit must be between 1 and {MAX_CHANGES_PAGE}")
        page, version, _last_seq, _covered = await self._changes(
            user_id, chat_id, since_version or 0, limit
        )
        return page, version

    async def _changes(self, user_id: str, chat_id: str, since: int,
                       limit: int) -> tuple[Page, int, int, int]:  # fmt: skip
        """(page, chat version, last_seq, highest version the page covers)."""
        _access, found = await asyncio.gather(
            self.readable(user_id, chat_id), self.storage.changes(chat_id, since, limit + 1)
        )
        if found is None:
            raise chat_not_found()
        version, last_seq, rows = found
        has_more = len(rows) > limit
        rows = rows[:limit]
        # Everything up to the chat's version (in this snapshot) is in the
        # answer, or, when there is more, up to its last row's version.
        covered = rows[-1][8] if has_more else max(version, since)
        return Page([dumps(model.message(r)) for r in rows], has_more), version, last_seq, covered

    async def catch_up_versions(self, user_id: str, chat_id: object,
                                since_version: int) -> VersionCatchUp:  # fmt: skip
        """The join-chat {since_version} ack (the caller has already joined
        the room; see catch_up)."""
        chat_id = validate.chat_id(chat_id)
        page, version, last_seq, covered = await self._changes(
            user_id, chat_id, since_version, MAX_CHANGED
        )
        return VersionCatchUp(last_seq, version, page, covered)

    async def replies(self, user_id: str, message_id: object, limit: int | None = None,
                      after_seq: int | None = None) -> Page:  # fmt: skip
        limit = DEFAULT_PAGE if limit is None else limit
        if not 1 <= limit <= MAX_PAGE:
            raise BadRequest(f"limit must be between 1 and {MAX_PAGE}")
        facts = await self._message_facts(user_id, message_id)
        rows = await self.storage.replies(facts.id, after_seq or 0, limit + 1)
        return Page([dumps(model.message(r)) for r in rows[:limit]], len(rows) > limit)

    async def edit_history(self, user_id: str, message_id: object) -> dict:
        """The texts the message had, oldest first, then its current one (a
        tombstone has none)."""
        facts = await self._message_facts(user_id, message_id)
        rows = await self.storage.edit_history(facts.id)
        return {"versions": [{"content": c, "at": at} for c, at in rows]}

    async def catch_up(self, user_id: str, chat_id: object, since_seq: int | None) -> CatchUp:
        """The join-chat ack: the chat's last seq and what came after since_seq.
        The caller has already joined the room, so anything committed after
        this read reaches it as an event."""
        chat_id = validate.chat_id(chat_id)
        if since_seq is None:
            access = await self.readable(user_id, chat_id)
            return CatchUp(access.last_seq, Page([], False))
        access, rows = await asyncio.gather(
            self.readable(user_id, chat_id),
            self.storage.history(
                chat_id, limit=MAX_MISSED + 1, after_seq=since_seq, include_deleted=True
            ),
        )
        has_more = len(rows) > MAX_MISSED
        rows = rows[:MAX_MISSED]
        # seq is gapless, so the caller now has every message up to the last
        # row; with no rows, up to since_seq (capped by last_seq, so a client
        # that claims more than exists is not denied what comes next).
        covered = rows[-1][2] if rows else min(since_seq, access.last_seq)
        last_seq = max(access.last_seq, covered)
        page = Page([dumps(model.message(r)) for r in rows], has_more)
        return CatchUp(last_seq, page, covered)

    async def typing(self, user_id: str, chat_id: object) -> bool:
        """Tell the chat's other sockets that the user is typing, at most once
        per TYPING_INTERVAL_MS per user and chat (across processes). The caller
        must already know the user may read the chat (the socket transport
        checks that the socket has joined the chat's room, which join-chat only
        allows to readers and a member's removal undoes). False: throttled."""
        chat_id = validate.chat_id(chat_id)
        if not await self.gate.allow(f"typing:{chat_id}:{user_id}", TYPING_INTERVAL_MS):
            return False
        await self.events.typing(chat_id, user_id)
        return True

    # -- chats ------------------------------------------------------------------

    async def create_chat(self, user_id: str, body: object) -> dict:
        body = validate.json_object(body)
        raw_id = body.get("id")
        chat_id = secrets.token_urlsafe(9) if raw_id is None else validate.chat_id(raw_id, "id")
        if DIRECT_ID_RE.fullmatch(chat_id):
            raise Conflict(f"chat id {chat_id!r} is reserved for a direct chat")
        title = validate.title(body.get("title"))
        visibility = validate.visibility(body.get("visibility"))
        others = list(
            dict.fromkeys(u for u in validate.members(body.get("members")) if u != user_id)
        )
        chat_row, member_rows = await self.storage.create_chat(
            chat_id, title, visibility, user_id, others
        )
        chat = model.chat(chat_row)
        await self.events.chat_added(chat, [r[0] for r in member_rows])
        return {**chat, "members": [model.member(r) for r in member_rows]}

    async def get_chat(self, user_id: str, chat_id: object) -> dict:
        await self.readable(user_id, chat_id)
        chat_row, member_rows = await asyncio.gather(
            self.storage.chat(chat_id), self.storage.members(chat_id)
        )
        if chat_row is None:  # deleted in the meantime
            raise chat_not_found()
        return model.chat(chat_row, [model.member(r) for r in member_rows])

    async def list_chats(self, user_id: str) -> list[dict]:
        out = []
        for row in await self.storage.user_chats(user_id):
            n = model.N_CHAT
            chat = model.chat(row[:n])
            chat["role"] = row[n]
            chat["last_read_seq"] = row[n + 1]
            chat["unread_count"] = row[n + 2]
            chat["unread_mentions"] = row[n + 3]
            first = n + 4
            chat["last_message"] = model.message(row[first:]) if row[first] is not None else None
            out.append(chat)
        return out

    async def put_member(self, user_id: str, chat_id: object, target: object, body: object) -> dict:
        chat_id = validate.chat_id(chat_id)
        target = validate.user_id(target)
        body = {} if body is None else validate.json_object(body)
        role = validate.role(body.get("role"))
        access = await self.readable(user_id, chat_id)
        chat_row = await self.storage.chat(chat_id)
        if chat_row is not None and chat_row[model.N_CHAT - 1] == "direct":
            raise Conflict("a direct chat's members and roles cannot change")
        if access.role == "owner":
            if target == user_id and role != "owner":
                await self._keep_an_owner(chat_id)
        elif access.role == "admin":
            if role != "member":
                raise Forbidden("only an owner may grant the admin or owner role")
            current = await self.storage.member(chat_id, target)
            if current is not None and current[1] in PRIVILEGED and target != user_id:
                raise Forbidden("admins may not change the role of owners or other admins")
        elif not (access.visibility == "public" and target == user_id and role == "member"):
            raise Forbidden("only owners and admins may add members")
        row, added = await self.storage.upsert_member(chat_id, target, role)
        if added:  # a role change is not a membership change
            await self._joined(chat_id, [target])
        return model.member(row)

    async def remove_member(self, user_id: str, chat_id: object, target: object) -> None:
        chat_id = validate.chat_id(chat_id)
        target = validate.user_id(target)
        access = await self.readable(user_id, chat_id)
        if target == user_id:
            if access.role is None:
                return
            if access.role == "owner":
                await self._keep_an_owner(chat_id)
        elif access.role in PRIVILEGED:
            current = await self.storage.member(chat_id, target)
            if current is None:
                return
            if access.role == "admin" and current[1] in PRIVILEGED:
                raise Forbidden("admins may not remove owners or other admins")
        else:
            raise Forbidden("only owners and admins may remove other members")
        if await self.storage.remove_member(chat_id, target):
            await self.events.member_removed(chat_id, target)

    # -- search, mentions, direct chats -------------------------------------------

    async def search(self, user_id: str, q: object, chat_id: object = None,
                     limit: int | None = None, before_id: int | None = None) -> Page:  # fmt: skip
        """Messages matching ``q`` in the caller's chats (or in ``chat_id``,
        which the caller must be able to read), newest first."""
        q = validate.search_query(q, MAX_QUERY_LENGTH)
        limit = _feed_limit(limit)
        if chat_id is not None:
            chat_id = validate.chat_id(chat_id)
            await self.readable(user_id, chat_id)  # the 404; the query checks again
        rows = await self.storage.search(
            user_id, q, chat_id, _NO_ID if before_id is None else before_id, limit + 1
        )
        return Page([dumps(model.message(r)) for r in rows[:limit]], len(rows) > limit)

    async def mentions(self, user_id: str, limit: int | None = None,
                       before_id: int | None = None, unread: bool = False) -> Page:  # fmt: skip
        limit = _feed_limit(limit)
        rows = await self.storage.mentions(
            user_id, _NO_ID if before_id is None else before_id, unread, limit + 1
        )
        return Page([dumps(model.message(r)) for r in rows[:limit]], len(rows) > limit)

    async def open_direct(self, user_id: str, other: object) -> tuple[dict, bool]:
        """The caller's direct chat with ``other`` (created, or the caller
        brought back into it): (Chat with members, created)."""
        other = validate.user_id(other)
        chat_id = direct_chat_id(user_id, other)
        users = list(dict.fromkeys((user_id, other)))
        created, joined, chat_row, member_rows = await self.storage.open_direct(
            chat_id, user_id, users
        )
        if chat_row is None or chat_row[model.N_CHAT - 1] != "direct":
            raise Conflict(f"chat id {chat_id!r} is taken by a group chat")
        chat = model.chat(chat_row)
        if joined:
            await self.events.chat_added(chat, joined)
        return {**chat, "members": [model.member(r) for r in member_rows]}, created

    async def _keep_an_owner(self, chat_id: str) -> None:
        if await self.storage.owner_count(chat_id) <= 1:
            raise Conflict("a chat needs an owner: make someone else owner first")

    async def mark_read(self, user_id: str, chat_id: object, seq: object) -> None:
        chat_id = validate.chat_id(chat_id)
        seq = validate.json_int(seq, "seq")
        moved = await self.storage.mark_read(chat_id, user_id, seq)
        if moved is None:
            access = await self.readable(user_id, chat_id)
            if access.role is None:
                raise Forbidden("only members have a read marker")
            return  # not forward: nothing to tell
        await self.events.read_moved(chat_id, user_id, moved)

    async def socket_event(self, user_id: str) -> None:
        """Count one socket event of ``user_id`` against RATE_LIMIT_EVENTS."""
        if self.limiter is not None:
            await self.limiter.check(user_id, EVENTS)

    # -- plumbing ---------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background cache writes (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _feed_limit(limit: int | None) -> int:
    limit = DEFAULT_FEED_PAGE if limit is None else limit
    if not 1 <= limit <= MAX_FEED_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_FEED_PAGE}")
    return limit


def _window_page(
    rows: list[bytes], complete: bool, limit: int, include_deleted: bool
) -> Page | None:
    visible = rows if include_deleted else [r for r in rows if not is_tombstone(r)]
    if len(visible) > limit:
        return Page(visible[-limit:], True)
    if complete:
        return Page(visible, False)
    return None
