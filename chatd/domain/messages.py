"""Sending: validation, the rate limit, group commit per chat, and what a
new message tells the cache, the room and the users it mentions."""

from __future__ import annotations

import asyncio

from .. import model, validate
from ..errors import BadRequest, Forbidden, chat_not_found
from ..limits import EVENTS, SENDS
from .base import ServiceBase
from .common import (
    MAX_BATCH,
    TYPING_INTERVAL_MS,
    Posted,
    _fail,
    _Queued,
    _resolve,
    _settle,
    _settle_as_repeat,
    dumps,
)


class Messages(ServiceBase):
    """Sending (one at a time per chat in flight, the rest in group commits)."""

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
