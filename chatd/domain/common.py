"""What the domain's parts share: the limits API.md sets, the page and
message shapes they answer with, and the per-chat order of changes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

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
