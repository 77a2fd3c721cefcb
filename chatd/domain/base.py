"""The service's state and what every part needs: who may read a chat or a
message, and background tasks."""

from __future__ import annotations

import asyncio

from .. import validate
from ..cache import PageCache
from ..errors import chat_not_found, message_not_found
from ..events import Events, NullEvents
from ..limits import RateLimiter
from ..presence import Gate
from ..storage import Access, Storage
from .common import _Order, _Queued


class ServiceBase:
    """The state every part of ChatService shares, and the access checks."""

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

    async def readable(self, user_id: str, chat_id: object) -> Access:
        """The caller's access to a chat they may read; chat_not_found otherwise."""
        access = await self.storage.access(validate.chat_id(chat_id), user_id)
        if access is None or (access.role is None and access.visibility != "public"):
            raise chat_not_found()
        return access

    async def _message_facts(self, user_id: str, message_id: object):
        """The message's facts for a caller who may read its chat, else
        message_not_found (a private chat's messages do not leak)."""
        mid = validate.message_id(message_id)
        facts = await self.storage.message_access(mid, user_id)
        if facts is None or (facts.role is None and facts.visibility != "public"):
            raise message_not_found()
        return facts

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background cache writes (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
