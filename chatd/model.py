"""The wire shapes of API.md ("Objects"), built from storage rows.

Key order follows API.md's examples so the JSON a client sees is stable.
Timestamps arrive from PostgreSQL already formatted (see storage.TS), so no
datetime objects are built on the hot path.
"""

from __future__ import annotations

from typing import Any

MESSAGE_KEYS = (
    "id",
    "chat_id",
    "seq",
    "sender_id",
    "content",
    "client_id",
    "created_at",
    "edited_at",
    "deleted",
)


def message(row: tuple) -> dict[str, Any]:
    """A message object from the 9 columns of storage.MSG_COLS."""
    return dict(zip(MESSAGE_KEYS, row[:9], strict=True))


def member(row: tuple) -> dict[str, Any]:
    user_id, role, joined_at, last_read_seq = row
    return {
        "user_id": user_id,
        "role": role,
        "joined_at": joined_at,
        "last_read_seq": last_read_seq,
    }


def chat(row: tuple, members: list[dict] | None = None) -> dict[str, Any]:
    chat_id, title, visibility, created_by, created_at, last_seq = row[:6]
    out: dict[str, Any] = {
        "id": chat_id,
        "title": title,
        "visibility": visibility,
        "created_by": created_by,
        "created_at": created_at,
        "last_seq": last_seq,
    }
    if members is not None:
        out["members"] = members
    return out
