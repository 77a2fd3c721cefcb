"""Errors that reach a client.

    ApiError(status, code, message)       every error a client may see
     ├── BadRequest          400 validation_error
     │    └── InvalidJson    400 invalid_json
     ├── Unauthorized        401 unauthorized / token_expired
     ├── Forbidden           403 forbidden
     ├── NotFound            404 chat_not_found / message_not_found / not_found
     ├── MethodNotAllowed    405 method_not_allowed
     ├── Conflict            409 conflict
     ├── PayloadTooLarge     413 payload_too_large
     ├── RateLimited         429 rate_limited (+ Retry-After)
     └── Unavailable         503 unavailable (a backing store is down)

Application code raises these; the HTTP layer turns them into
``{"error": {"code", "message"}}`` with the status, the socket layer into
``{"ok": false, "error": {...}}``. Anything else that escapes is a bug and is
answered 500 ``internal`` (and logged with its traceback).
"""

from __future__ import annotations

import re

# A file path in a message (a store's error quotes its socket path, e.g.
# ``connection to server on socket "/var/lib/chatd/postgres/.s.PGSQL.5432"
# failed``): what a client is told carries no path of the server's disk.
_PATH_RE = re.compile(r"(?<![\w:/.~-])/[^\s\"'/]*(?:/[^\s\"']*)*[^\s\"'.,;:)]")


def without_paths(message: str) -> str:
    return _PATH_RE.sub("<path>", message) if "/" in message else message


class ApiError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}

    @property
    def public_message(self) -> str:
        """The message as a client sees it (logs and chatctl get ``message``)."""
        return self.message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.public_message}}


class BadRequest(ApiError):
    status = 400
    code = "validation_error"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class InvalidJson(BadRequest):
    code = "invalid_json"


class MethodNotAllowed(ApiError):
    status = 405
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class RateLimited(ApiError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float):
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(message, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


class Unavailable(ApiError):
    status = 503
    code = "unavailable"

    @property
    def public_message(self) -> str:
        # A store's error quotes its socket or file paths: clients get none.
        return without_paths(self.message)


def chat_not_found() -> NotFound:
    return NotFound("chat not found", code="chat_not_found")


def message_not_found() -> NotFound:
    return NotFound("message not found", code="message_not_found")
