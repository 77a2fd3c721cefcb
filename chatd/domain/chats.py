"""Chats and members: creating, reading and listing chats, roles, and direct
chats."""

from __future__ import annotations

import asyncio
import secrets

from .. import model, validate
from ..errors import Conflict, Forbidden, chat_not_found
from ..text import DIRECT_ID_RE, direct_chat_id
from .base import ServiceBase
from .common import PRIVILEGED


class Chats(ServiceBase):
    """Chats, their members and roles, and direct chats."""

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

    async def _keep_an_owner(self, chat_id: str) -> None:
        if await self.storage.owner_count(chat_id) <= 1:
            raise Conflict("a chat needs an owner: make someone else owner first")

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
