"""The OpenAPI 3 document of the REST API (GET /openapi.json).

Written by hand from API.md and docs/API-NOTES.md, as a Python dict so that it
ships inside the package. tests/test_openapi.py keeps it honest: every route
the app serves is here, every response code listed here is produced by a real
request, and openapi-spec-validator accepts the document.

405 is not listed per operation: it is what a method *not* listed gets.
"""

from __future__ import annotations

from functools import cache

import orjson

_TS = {"type": "string", "format": "date-time", "example": "2026-11-24T09:30:12.345Z"}
_CHAT_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$", "example": "general"}
_SAFE_INT = {"type": "integer", "minimum": 0, "maximum": 9007199254740991}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS = {
    "Message": {
        "type": "object",
        "required": ["id", "chat_id", "seq", "sender_id", "content", "client_id",
                     "created_at", "edited_at", "version", "reply_to", "reply_count",
                     "mentions", "reactions", "pinned", "deleted"],
        "properties": {
            "id": {**_SAFE_INT, "description": "unique across the service"},
            "chat_id": _CHAT_ID,
            "seq": {**_SAFE_INT, "description": "per chat, from 1, gapless, in commit order"},
            "sender_id": {"type": "string"},
            "content": {"type": "string", "nullable": True,
                        "description": "null for a deleted message (tombstone)"},
            "client_id": {"type": "string", "nullable": True, "maxLength": 64},
            "created_at": _TS,
            "edited_at": {**_TS, "nullable": True},
            "version": {**_SAFE_INT, "description": "the chat's version at this message's "
                        "latest change (send, edit, delete, reaction, pin, reply_count)"},
            "reply_to": {**_SAFE_INT, "nullable": True,
                         "description": "the message of the same chat this one answers"},
            "reply_count": {**_SAFE_INT, "description": "non-deleted messages answering it"},
            "mentions": {"type": "array", "items": {"type": "string"}, "maxItems": 50,
                         "description": "the members named as @user_id, unique, in order"},
            "reactions": {"type": "array", "items": _ref("Reaction"), "maxItems": 20,
                          "description": "per emoji, in the order each was first added"},
            "pinned": {"type": "boolean"},
            "deleted": {"type": "boolean"},
        },
    },
    "Reaction": {
        "type": "object",
        "required": ["emoji", "count", "users"],
        "properties": {
            "emoji": {"type": "string", "description": "one emoji, or :shortcode:"},
            "count": {**_SAFE_INT, "description": "exact"},
            "users": {"type": "array", "items": {"type": "string"}, "maxItems": 20,
                      "description": "the first 20 who reacted, in order"},
        },
    },
    "Changes": {
        "type": "object",
        "required": ["messages", "has_more", "version"],
        "properties": {
            "messages": {"type": "array", "items": _ref("Message"),
                         "description": "current state, ascending by version, tombstones in"},
            "has_more": {"type": "boolean"},
            "version": {**_SAFE_INT, "description": "the chat's latest version"},
        },
    },
    "Pins": {
        "type": "object",
        "required": ["messages"],
        "properties": {"messages": {"type": "array", "items": _ref("Message"), "maxItems": 50,
                                    "description": "the most recently pinned first"}},
    },
    "EditHistory": {
        "type": "object",
        "required": ["versions"],
        "properties": {"versions": {"type": "array", "items": {
            "type": "object", "required": ["content", "at"],
            "properties": {"content": {"type": "string"}, "at": _TS}},
            "description": "the original, then each edit, oldest first; [] for a tombstone"}},
    },
    "Member": {
        "type": "object",
        "required": ["user_id", "role", "joined_at", "last_read_seq"],
        "properties": {
            "user_id": {"type": "string"},
            "role": {"type": "string", "enum": ["owner", "admin", "member"]},
            "joined_at": _TS,
            "last_read_seq": _SAFE_INT,
        },
    },
    "Chat": {
        "type": "object",
        "required": ["id", "title", "visibility", "created_by", "created_at", "last_seq",
                     "version", "kind"],
        "properties": {
            "id": _CHAT_ID,
            "title": {"type": "string", "maxLength": 200,
                      "description": "1-200 characters; \"\" for a direct chat"},
            "visibility": {"type": "string", "enum": ["private", "public"]},
            "created_by": {"type": "string"},
            "created_at": _TS,
            "last_seq": _SAFE_INT,
            "version": {**_SAFE_INT, "description": "the latest version of its messages"},
            "kind": {"type": "string", "enum": ["group", "direct"]},
            "members": {"type": "array", "items": _ref("Member")},
        },
    },
    "ChatListItem": {
        "allOf": [
            _ref("Chat"),
            {
                "type": "object",
                "required": ["role", "last_read_seq", "unread_count", "unread_mentions",
                             "last_message"],
                "properties": {
                    "role": {"type": "string", "enum": ["owner", "admin", "member"]},
                    "last_read_seq": _SAFE_INT,
                    "unread_count": _SAFE_INT,
                    "unread_mentions": {**_SAFE_INT, "description": "messages above the read "
                                        "marker that mention the caller"},
                    "last_message": {"$ref": "#/components/schemas/NullableMessage"},
                },
            },
        ]
    },
    "ChatList": {
        "type": "object",
        "required": ["chats"],
        "properties": {"chats": {"type": "array", "items": _ref("ChatListItem")}},
    },
    "MessagePage": {
        "type": "object",
        "required": ["messages", "has_more"],
        "properties": {
            "messages": {"type": "array", "items": _ref("Message"),
                         "description": "ascending by seq"},
            "has_more": {"type": "boolean",
                         "description": "more exist beyond the page in the paging direction"},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": [
                        "invalid_json", "validation_error", "unauthorized", "token_expired",
                        "forbidden", "chat_not_found", "message_not_found", "not_found",
                        "method_not_allowed", "request_timeout", "conflict",
                        "payload_too_large", "uri_too_long", "headers_too_large",
                        "rate_limited", "unavailable"]},
                    "message": {"type": "string"},
                },
            }
        },
    },
    "Ok": {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}},
    "SendMessage": {
        "type": "object",
        "required": ["content"],
        "properties": {
            "content": {"type": "string", "description": "trimmed; 1-MAX_MESSAGE_LENGTH, no NUL"},
            "client_id": {"type": "string", "maxLength": 64,
                          "description": "makes the send idempotent per sender and chat"},
            "reply_to": {**_SAFE_INT, "description": "a live message of this chat"},
        },
    },
    "EditMessage": {
        "type": "object", "required": ["content"], "properties": {"content": {"type": "string"}},
    },
    "CreateChat": {
        "type": "object",
        "required": ["title"],
        "properties": {
            "id": _CHAT_ID,
            "title": {"type": "string", "minLength": 1, "maxLength": 200},
            "visibility": {"type": "string", "enum": ["private", "public"], "default": "private"},
            "members": {"type": "array", "items": {"type": "string"}, "maxItems": 1000},
        },
    },
    "PutMember": {
        "type": "object",
        "properties": {"role": {"type": "string", "enum": ["owner", "admin", "member"],
                                "default": "member"}},
    },
    "MarkRead": {"type": "object", "required": ["seq"], "properties": {"seq": _SAFE_INT}},
}  # fmt: skip

# OpenAPI 3.0 ignores "nullable" next to a $ref or allOf: a nullable Message is
# a copy of Message that says so (last_message of a chat without messages).
SCHEMAS["NullableMessage"] = {**SCHEMAS["Message"], "nullable": True}

_ERROR_TEXT = {
    400: "invalid_json or validation_error",
    401: "unauthorized or token_expired",
    403: "forbidden",
    404: "chat_not_found, message_not_found or not_found",
    408: "request_timeout: the body did not arrive within BODY_TIMEOUT",
    409: "conflict",
    413: "payload_too_large: the body is over 64 KiB (checked before anything else)",
    414: "uri_too_long: the request line alone is over 64 KiB",
    429: "rate_limited: over the sender's RATE_LIMIT_SENDS budget; retry after Retry-After",
    431: "headers_too_large: the request line and headers are over 64 KiB",
    503: "unavailable: a backing store is down",
}


def _json(schema: str, description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": _ref(schema)}}}  # fmt: skip


def _op(summary: str, ok: dict, errors: tuple[int, ...], *, public: bool = False,
        body: str | None = None, params: list | None = None) -> dict:  # fmt: skip
    responses = dict(ok)
    codes = set(errors) | {413}
    if not public:
        codes |= {401}
    for code in sorted(codes):
        responses[str(code)] = {"$ref": f"#/components/responses/E{code}"}
    op = {"summary": summary, "responses": responses}
    if public:
        op["security"] = []
    if body:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": _ref(body)}}}  # fmt: skip
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, schema: dict) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema,
            "description": description}  # fmt: skip


_NO_CONTENT = {"204": {"description": "done"}}
_CHAT = _path_param("chat_id", _CHAT_ID)
_USER = _path_param("user_id", {"type": "string", "maxLength": 128})
_MSG = _path_param("id", _SAFE_INT)
_PINNED = _path_param("message_id", _SAFE_INT)
_EMOJI = _path_param("emoji", {"type": "string", "description": "URL-encoded"})
_LIMIT_PAGE = _query("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                     "page size")  # fmt: skip


_LIMIT_FEED = _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                     "page size")  # fmt: skip


def document() -> dict:
    paths = {
        "/chats": {
            "get": _op("The caller's chats, most recently active first",
                       {"200": _json("ChatList", "the chats")}, (503,)),
            "post": _op("Create a chat; the caller is its owner",
                        {"201": _json("Chat", "created, with members")}, (400, 409, 503),
                        body="CreateChat"),
        },
        "/chats/{chat_id}": {
            "get": _op("A chat with its members", {"200": _json("Chat", "the chat")},
                       (400, 404, 503), params=[_CHAT]),
        },
        "/chats/{chat_id}/messages": {
            "get": _op(
                "A history page", {"200": _json("MessagePage", "ascending by seq")},
                (400, 404, 503),
                params=[_CHAT,
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 200,
                                         "default": 50}, "page size"),
                        _query("before_seq", _SAFE_INT, "messages before this seq"),
                        _query("after_seq", _SAFE_INT, "messages after this seq"),
                        _query("include_deleted", {"type": "boolean", "default": False},
                               "tombstones in place")],
            ),
            "post": _op(
                "Send a message",
                {"201": _json("Message", "committed (then broadcast as new-message)"),
                 "200": _json("Message", "a repeat of client_id: the original message")},
                (400, 404, 429, 503), body="SendMessage", params=[_CHAT],
            ),
        },
        "/chats/{chat_id}/members/{user_id}": {
            "put": _op("Add or re-role a member", {"200": _json("Member", "the member")},
                       (400, 403, 404, 409, 503), body="PutMember", params=[_CHAT, _USER]),
            "delete": _op("Remove a member (or leave)", _NO_CONTENT, (400, 403, 404, 409, 503),
                          params=[_CHAT, _USER]),
        },
        "/chats/{chat_id}/read": {
            "post": _op("Move the caller's read marker forward", _NO_CONTENT,
                        (400, 403, 404, 503), body="MarkRead", params=[_CHAT]),
        },
        "/message/": {
            "delete": _op("Delete a message (the original service's path)", _NO_CONTENT,
                          (400, 403, 404, 503),
                          params=[_query("id", _SAFE_INT, "the message id", required=True)]),
        },
        "/messages/{id}": {
            "delete": _op("Delete a message", _NO_CONTENT, (400, 403, 404, 503), params=[_MSG]),
            "patch": _op("Edit a message (its sender only)",
                         {"200": _json("Message", "the edited message")},
                         (400, 403, 404, 503), body="EditMessage", params=[_MSG]),
        },
        "/chats/{chat_id}/changes": {
            "get": _op(
                "The messages changed since a version (exact sync)",
                {"200": _json("Changes", "ascending by version")}, (400, 404, 503),
                params=[_CHAT,
                        _query("since_version", _SAFE_INT, "absent: 0"),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 500,
                                         "default": 100}, "page size")],
            ),
        },
        "/chats/{chat_id}/pins": {
            "get": _op("The chat's pinned messages", {"200": _json("Pins", "newest pin first")},
                       (400, 404, 503), params=[_CHAT]),
        },
        "/chats/{chat_id}/pins/{message_id}": {
            "put": _op("Pin a message (owners and admins)",
                       {"200": _json("Message", "pinned (again: unchanged)")},
                       (400, 403, 404, 409, 503), params=[_CHAT, _PINNED]),
            "delete": _op("Unpin a message (owners and admins)",
                          {"200": _json("Message", "unpinned (not pinned: unchanged)")},
                          (400, 403, 404, 503), params=[_CHAT, _PINNED]),
        },
        "/messages/{id}/replies": {
            "get": _op("The messages that answer it", {"200": _json("MessagePage", "by seq")},
                       (400, 404, 503),
                       params=[_MSG, _LIMIT_PAGE,
                               _query("after_seq", _SAFE_INT, "replies after this seq")]),
        },
        "/messages/{id}/history": {
            "get": _op("A message's texts, oldest first",
                       {"200": _json("EditHistory", "the original, then each edit")},
                       (400, 404, 503), params=[_MSG]),
        },
        "/messages/{id}/reactions/{emoji}": {
            "put": _op("React (members)", {"200": _json("Message", "with the reaction")},
                       (400, 403, 404, 409, 503), params=[_MSG, _EMOJI]),
            "delete": _op("Take the caller's reaction off",
                          {"200": _json("Message", "without it")}, (400, 403, 404, 503),
                          params=[_MSG, _EMOJI]),
        },
        "/search": {
            "get": _op(
                "Full-text search in the caller's chats, newest first",
                {"200": _json("MessagePage", "newest first")}, (400, 404, 503),
                params=[_query("q", {"type": "string", "minLength": 1, "maxLength": 500},
                               "web-search syntax: words, \"a phrase\", -word, or",
                               required=True),
                        _query("chat_id", _CHAT_ID, "only this chat (readable by the caller)"),
                        _LIMIT_FEED,
                        _query("before_id", _SAFE_INT, "results with a smaller id")],
            ),
        },
        "/mentions": {
            "get": _op(
                "The messages that mention the caller, newest first",
                {"200": _json("MessagePage", "newest first")}, (400, 503),
                params=[_LIMIT_FEED,
                        _query("before_id", _SAFE_INT, "results with a smaller id"),
                        _query("unread", {"type": "boolean", "default": False},
                               "only those above the read marker")],
            ),
        },
        "/direct/{user_id}": {
            "put": _op(
                "The caller's direct chat with that user",
                {"201": _json("Chat", "created, with members"),
                 "200": _json("Chat", "it exists (the caller is a member again)")},
                (400, 409, 503), params=[_USER],
            ),
        },
        "/healthz": {
            "get": _op("The process is alive", {"200": _json("Ok", "alive")}, (), public=True),
        },
        "/readyz": {
            "get": _op("PostgreSQL and Redis answer", {"200": _json("Ok", "ready")}, (503,),
                       public=True),
        },
        "/metrics": {
            "get": _op("Prometheus metrics",
                       {"200": {"description": "Prometheus text format",
                                "content": {"text/plain": {"schema": {"type": "string"}}}}},
                       (), public=True),
        },
        "/openapi.json": {
            "get": _op("This document",
                       {"200": {"description": "OpenAPI 3",
                                "content": {"application/json": {"schema": {"type": "object"}}}}},
                       (), public=True),
        },
    }  # fmt: skip
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "chatd",
            "version": "2",
            "description": "REST API of chatd (Socket.IO events are in API.md). Every non-2xx "
            "answer is an Error; 405 method_not_allowed answers methods not listed here. Any "
            "request may also be answered 408, 414 or 431 (components.responses), and a "
            "malformed one 400, by the HTTP layer before it reaches an operation.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (HS256)"}
            },
            "responses": _error_responses(),
        },
    }


def _error_responses() -> dict:
    out = {f"E{code}": _json("Error", text) for code, text in _ERROR_TEXT.items()}
    out["E429"]["headers"] = {
        "Retry-After": {
            "description": "seconds until the budget has room again",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    return out


@cache
def document_bytes() -> bytes:
    return orjson.dumps(document())
