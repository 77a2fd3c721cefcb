"""What happened, told by the domain after a commit; the realtime layer turns
it into Socket.IO emits. The domain never imports socketio, so chatctl can use
the domain with :class:`NullEvents` (or a write-only emitter) and no server.
"""

from __future__ import annotations

from typing import Protocol


class Announcement(Protocol):
    """New messages of one chat, on their way to every socket in its room.

    ``remote`` is what other processes must receive (the chat's channel, a
    ready payload and the command that publishes it), so that the caller can
    publish it in the same Redis round trip as its own write (the page
    cache's append script does); when it could not, it calls
    :meth:`publish`. Then :meth:`deliver` hands them to this process's
    sockets.
    """

    remote: tuple[str, bytes, str] | None

    async def publish(self) -> None: ...

    async def deliver(self) -> None: ...


class Events(Protocol):
    def created(self, messages: list[dict], raws: list[bytes]) -> Announcement:
        """Messages just committed to one chat, ascending by seq (``raws``:
        the same messages as JSON)."""

    async def message_resent(self, message: dict, raw: bytes) -> None:
        """An existing message shown to the room again (the original
        ``send-message "chat_id"`` form): the same new-message, not a new one."""

    async def message_updated(self, message: dict, raw: bytes) -> None: ...

    async def message_deleted(
        self, chat_id: str, message_id: int, seq: int, version: int
    ) -> None: ...

    async def member_removed(self, chat_id: str, user_id: str) -> None:
        """The user is no longer a member: their sockets leave the chat's room
        and get ``chat-removed``, on every process."""

    async def chat_added(self, chat: dict, user_ids: list[str]) -> None:
        """The users became members of ``chat`` (a Chat object without
        members): ``chat-added`` to each one's sockets, on every process."""

    async def mentioned(self, user_id: str, message: dict) -> None:
        """``message`` mentions the user: ``mention`` {"chat_id", "message"}
        to every socket of theirs, joined to the chat or not, on every process."""

    async def read_moved(self, chat_id: str, user_id: str, seq: int) -> None: ...

    async def typing(self, chat_id: str, user_id: str) -> None: ...


class Silence:
    """An announcement that goes nowhere."""

    remote = None

    async def publish(self) -> None:
        pass

    async def deliver(self) -> None:
        pass


SILENCE = Silence()


class NullEvents:
    """Events that go nowhere (tools that run without a realtime layer)."""

    def created(self, messages: list[dict], raws: list[bytes]) -> Announcement:
        return SILENCE

    async def message_resent(self, message: dict, raw: bytes) -> None:
        pass

    async def message_updated(self, message: dict, raw: bytes) -> None:
        pass

    async def message_deleted(self, chat_id: str, message_id: int, seq: int, version: int) -> None:
        pass

    async def member_removed(self, chat_id: str, user_id: str) -> None:
        pass

    async def chat_added(self, chat: dict, user_ids: list[str]) -> None:
        pass

    async def mentioned(self, user_id: str, message: dict) -> None:
        pass

    async def read_moved(self, chat_id: str, user_id: str, seq: int) -> None:
        pass

    async def typing(self, chat_id: str, user_id: str) -> None:
        pass
