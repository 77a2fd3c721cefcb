"""Rooms: ``chat:{chat_id}`` for a chat's events, ``user:{user_id}`` for all the
sockets of one user; and the pub/sub messages that carry emits to those
rooms between processes (python-socketio's message format, and chatd's batch)."""

from __future__ import annotations

import orjson

# A pub/sub message carrying several emits, in order (a group commit's new
# messages): one PUBLISH, and one message to read on every process.
BATCH = "chatd:batch"


def chat_room(chat_id: str) -> str:
    return f"chat:{chat_id}"


def user_room(user_id: str) -> str:
    return f"user:{user_id}"


def emit_message(event: str, data, room: str, host_id: str) -> dict:
    """python-socketio's pub/sub message for a plain emit to a room."""
    return {
        "method": "emit", "event": event, "data": [data], "binary": False, "namespace": "/",
        "room": room, "skip_sid": None, "callback": None, "host_id": host_id,
    }  # fmt: skip


def publication(emits: list[dict], host_id: str) -> bytes:
    """The payload that tells other processes about ``emits`` (in order)."""
    if len(emits) == 1:
        return orjson.dumps(emits[0])
    # host_id last, as in python-socketio's own messages (see RedisChatManager._unbatch)
    return orjson.dumps({"method": BATCH, "messages": emits, "host_id": host_id})
