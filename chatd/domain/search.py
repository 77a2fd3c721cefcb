"""Search and the mentions feed."""

from __future__ import annotations

from .. import model, validate
from ..errors import BadRequest
from .base import ServiceBase
from .common import _NO_ID, DEFAULT_FEED_PAGE, MAX_FEED_PAGE, MAX_QUERY_LENGTH, Page, dumps


class Search(ServiceBase):
    """Full-text search and the mentions feed."""

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


def _feed_limit(limit: int | None) -> int:
    limit = DEFAULT_FEED_PAGE if limit is None else limit
    if not 1 <= limit <= MAX_FEED_PAGE:
        raise BadRequest(f"limit must be between 1 and {MAX_FEED_PAGE}")
    return limit
