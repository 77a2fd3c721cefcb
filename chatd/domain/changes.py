"""Changes to messages (edit, delete, react, pin): each takes the chat's
next version, committed in groups per chat and applied in version order."""

from __future__ import annotations

import asyncio

from .. import model, validate
from ..errors import Conflict, Forbidden, message_not_found
from ..storage import Change
from .base import ServiceBase
from .common import MAX_BATCH, MAX_EMOJI, MAX_PINS, PRIVILEGED, Posted, _fail, _settle, dumps


class Changes(ServiceBase):
    """Edits, deletes, reactions and pins: a version each, in order per chat."""

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
