"""Reading and catching up: history pages (the newest from the cache),
join-chat's catch-up by seq or by version, the changes feed, replies, edit
history and pins."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .. import model, validate
from ..errors import BadRequest, chat_not_found
from .base import ServiceBase
from .common import (
    DEFAULT_CHANGES_PAGE,
    DEFAULT_PAGE,
    MAX_CHANGED,
    MAX_CHANGES_PAGE,
    MAX_MISSED,
    MAX_PAGE,
    MAX_PINS,
    Page,
    dumps,
    is_tombstone,
)


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


class Sync(ServiceBase):
    """History, catch-up by seq or by version, the changes feed, replies, pins."""

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

    async def pins(self, user_id: str, chat_id: object) -> Page:
        chat_id = validate.chat_id(chat_id)
        await self.readable(user_id, chat_id)
        rows = await self.storage.pins(chat_id, MAX_PINS)
        return Page([dumps(model.message(r)) for r in rows], False)


def _window_page(
    rows: list[bytes], complete: bool, limit: int, include_deleted: bool
) -> Page | None:
    visible = rows if include_deleted else [r for r in rows if not is_tombstone(r)]
    if len(visible) > limit:
        return Page(visible[-limit:], True)
    if complete:
        return Page(visible, False)
    return None
