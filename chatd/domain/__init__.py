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

The service is one class assembled from its parts, one module each:
:mod:`.messages` (sending, group commit), :mod:`.changes` (edits, deletes,
reactions, pins), :mod:`.sync` (history, catch-up, changes feed),
:mod:`.chats` (chats, members, direct chats) and :mod:`.search`; what they
share (limits, pages, the per-chat order) is in :mod:`.common`, and the
state and access checks in :mod:`.base`.
"""

from __future__ import annotations

from .changes import Changes
from .chats import Chats
from .common import (
    DEFAULT_PAGE,
    MAX_EMOJI,
    MAX_PAGE,
    Page,
    Posted,
    dumps,
    is_tombstone,
    orjson_split,
)
from .messages import Messages
from .search import Search
from .sync import CatchUp, Sync, VersionCatchUp


class ChatService(Messages, Changes, Sync, Chats, Search):
    """Every rule of chatd: REST, Socket.IO and chatctl call this."""


__all__ = [
    "DEFAULT_PAGE",
    "MAX_EMOJI",
    "MAX_PAGE",
    "CatchUp",
    "ChatService",
    "Page",
    "Posted",
    "VersionCatchUp",
    "dumps",
    "is_tombstone",
    "orjson_split",
]
