"""Input validation shared by every transport (REST, sockets, chatctl).

Each function takes what a client sent (already JSON-decoded, or a raw query
string value) and returns the clean value or raises :class:`BadRequest` with
a message that names the field. Nothing here touches a store.
"""

from __future__ import annotations

import re

from .errors import BadRequest

CHAT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# JavaScript's Number.MAX_SAFE_INTEGER: ids and seqs must survive JSON.parse.
MAX_SAFE_INT = 2**53 - 1
MAX_CLIENT_ID = 64
MAX_USER_ID = 128
MAX_TITLE = 200
MAX_MEMBERS_AT_CREATE = 1000
ROLES = ("owner", "admin", "member")
# API.md: a reaction is one emoji character sequence or a :shortcode:.
SHORTCODE_RE = re.compile(r":[a-z0-9_+-]{1,32}:")
# The longest emoji sequence in Unicode's data is 10 code points (a tag flag);
# this bounds the look-up for hostile input.
MAX_EMOJI_CHARS = 16
VISIBILITIES = ("private", "public")


def chat_id(value: object, field: str = "chat_id") -> str:
    if not isinstance(value, str) or not CHAT_ID_RE.fullmatch(value):
        raise BadRequest(f"{field} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def user_id(value: object, field: str = "user_id") -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_USER_ID
        or not value.isprintable()
    ):
        raise BadRequest(f"{field} must be a printable string of 1-{MAX_USER_ID} characters")
    return value


def _unicode(value: str) -> bool:
    """False for a string with lone surrogates, which cannot be stored or sent
    as UTF-8 (sockets can deliver them; REST bodies cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def content(value: object, max_length: int) -> str:
    if not isinstance(value, str):
        raise BadRequest("content must be a string")
    if not _unicode(value):
        raise BadRequest("content must be valid Unicode (no lone surrogates)")
    text = value.strip()
    if not text:
        raise BadRequest("content must not be empty")
    if "\x00" in text:
        raise BadRequest("content must not contain NUL characters")
    if len(text) > max_length:
        raise BadRequest(f"content must be at most {max_length} characters")
    return text


def search_query(value: object, max_length: int) -> str:
    """GET /search's q: a non-blank string of at most ``max_length`` characters."""
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("q must not be empty")
    if not _unicode(value) or "\x00" in value:
        raise BadRequest("q must be valid Unicode without NUL characters")
    if len(value) > max_length:
        raise BadRequest(f"q must be at most {max_length} characters")
    return value.strip()


def client_id(value: object) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_CLIENT_ID
        or "\x00" in value
        or not _unicode(value)
    ):
        raise BadRequest(f"client_id must be a string of 1-{MAX_CLIENT_ID} characters")
    return value


def title(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("title must be a non-empty string")
    text = value.strip()
    if len(text) > MAX_TITLE or "\x00" in text:
        raise BadRequest(f"title must be at most {MAX_TITLE} characters, without NUL")
    return text


def visibility(value: object) -> str:
    if value is None:
        return "private"
    if value not in VISIBILITIES:
        raise BadRequest("visibility must be 'private' or 'public'")
    return value


def role(value: object, default: str = "member") -> str:
    if value is None:
        return default
    if value not in ROLES:
        raise BadRequest("role must be 'owner', 'admin' or 'member'")
    return value


def members(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_MEMBERS_AT_CREATE:
        raise BadRequest(f"members must be a list of at most {MAX_MEMBERS_AT_CREATE} user ids")
    return [user_id(v, "members[]") for v in value]


def json_int(value: object, field: str, lo: int = 0, hi: int = MAX_SAFE_INT) -> int:
    """An integer from a JSON body (bool is not an integer, 3.0 is not either)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{field} must be an integer")
    if not lo <= value <= hi:
        raise BadRequest(f"{field} must be between {lo} and {hi}")
    return value


def query_int(value: str | None, field: str, lo: int = 0, hi: int = MAX_SAFE_INT) -> int | None:
    """An integer from a query string or a path; None when absent."""
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 16:
        raise BadRequest(f"{field} must be a non-negative integer")
    number = int(value)
    if not lo <= number <= hi:
        raise BadRequest(f"{field} must be between {lo} and {hi}")
    return number


def message_id(value: object) -> int:
    if isinstance(value, str):
        number = query_int(value, "id", 1)
        assert number is not None
        return number
    return json_int(value, "id", 1)


def query_bool(value: str | None, field: str) -> bool:
    if value is None:
        return False
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise BadRequest(f"{field} must be true or false")


def json_object(value: object, what: str = "body") -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def emoji(value: object) -> str:
    """One emoji (a single grapheme of Unicode's emoji data, e.g. 👍🏽, ❤️)
    or a ``:shortcode:`` of 1-32 of ``[a-z0-9_+-]``."""
    import emoji as emoji_data  # imported on first use: chatctl seldom needs it

    if not isinstance(value, str) or not value:
        raise BadRequest("emoji must be a non-empty string")
    if SHORTCODE_RE.fullmatch(value):
        return value
    if len(value) <= MAX_EMOJI_CHARS and emoji_data.is_emoji(value):
        return value
    raise BadRequest("emoji must be one emoji or a :shortcode: of 1-32 of [a-z0-9_+-]")
