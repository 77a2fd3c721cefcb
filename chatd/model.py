"""The wire shapes of API.md ("Objects"), built from storage rows.

Key order follows API.md's examples so the JSON a client sees is stable.
Timestamps arrive from PostgreSQL already formatted (see storage.TS), so no
datetime objects are built on the hot path.

The message keeps ``deleted`` as its LAST key (after the version 2 fields):
the page cache and chatd.domain.is_tombstone recognise a tombstone by the
bytes it ends with. JSON objects are unordered; docs/API-NOTES.md says so.
"""

from __future__ import annotations

from typing import Any

import orjson

MESSAGE_KEYS = (
    "id",
    "chat_id",
    "seq",
    "sender_id",
    "content",
    "client_id",
    "created_at",
    "edited_at",
    "version",
    "reply_to",
    "reply_count",
    "mentions",
    "reactions",
    "pinned",
    "deleted",
)
N_MSG = len(MESSAGE_KEYS)
_REACTIONS = MESSAGE_KEYS.index("reactions")


def message(row: tuple) -> dict[str, Any]:
    """A message object from the 15 columns of queries.MSG_COLS."""
    out = dict(zip(MESSAGE_KEYS, row[:N_MSG], strict=True))
    reactions = row[_REACTIONS]
    # Text from PostgreSQL; most messages have none, so parse only when needed.
    out["reactions"] = [] if reactions == "[]" else orjson.loads(reactions)
    return out


def member(row: tuple) -> dict[str, Any]:
    user_id, role, joined_at, last_read_seq = row
    return {
        "user_id": user_id,
        "role": role,
        "joined_at": joined_at,
        "last_read_seq": last_read_seq,
    }


N_CHAT = 8


def chat(row: tuple, members: list[dict] | None = None) -> dict[str, Any]:
    chat_id, title, visibility, created_by, created_at, last_seq, version, kind = row[:N_CHAT]
    out: dict[str, Any] = {
        "id": chat_id,
        "title": title,
        "visibility": visibility,
        "created_by": created_by,
        "created_at": created_at,
        "last_seq": last_seq,
        "version": version,
        "kind": kind,
    }
    if members is not None:
        out["members"] = members
    return out
