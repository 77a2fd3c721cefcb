"""What happened, told by the domain after a commit; the realtime layer turns
it into Socket.IO emits. The domain never imports socketio, so chatctl can use
the domain with :class:`NullEvents` (or a write-only emitter) and no server.
"""

from __future__ import annotations

from typing import Protocol


class Events(Protocol):
    async def message_created(self, message: dict, raw: bytes) -> None: ...

    async def message_resent(self, message: dict, raw: bytes) -> None:
        """An existing message shown to the room again (the original
        ``send-message "chat_id"`` form): the same new-message, not a new one."""

    async def message_updated(self, message: dict, raw: bytes) -> None: ...

    async def message_deleted(self, chat_id: str, message_id: int, seq: int) -> None: ...

    async def member_removed(self, chat_id: str, user_id: str) -> None: ...

    async def read_moved(self, chat_id: str, user_id: str, seq: int) -> None: ...

    async def typing(self, chat_id: str, user_id: str) -> None: ...


class NullEvents:
    """Events that go nowhere (tools that run without a realtime layer)."""

    async def message_created(self, message: dict, raw: bytes) -> None:
        pass

    async def message_resent(self, message: dict, raw: bytes) -> None:
        pass

    async def message_updated(self, message: dict, raw: bytes) -> None:
        pass

    async def message_deleted(self, chat_id: str, message_id: int, seq: int) -> None:
        pass

    async def member_removed(self, chat_id: str, user_id: str) -> None:
        pass

    async def read_moved(self, chat_id: str, user_id: str, seq: int) -> None:
        pass

    async def typing(self, chat_id: str, user_id: str) -> None:
        pass
