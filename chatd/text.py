"""Text rules of version 2's search, mentions and direct chats (API.md):
pure functions, used by the domain and by storage to fill statement
parameters.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import orjson

# A mention: "@" at the start or after whitespace, then the user id, which
# ends at whitespace, the end, or one of .,:;!?) (API.md "mentions").
_MENTION = re.compile(r"(?:^|(?<=\s))@([^\s.,:;!?)]+)")


def fold(text: str) -> str:
    """What search compares: Unicode NFKD, combining marks dropped, casefold.

    Applied to a message's content when it is written and to the query when
    it is read, so "Café", "CAFE" and "cafe" are one word, on any PostgreSQL
    (the embedded one has no unaccent extension)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def mention_candidates(content: str) -> list[str]:
    """The user ids ``content`` names as @user_id, unique, in order of first
    appearance. Which of them are members (and so mentions, at most 50) is
    decided by the statement that writes the message, under the chat's lock."""
    return list(dict.fromkeys(_MENTION.findall(content)))


def candidates_json(content: str) -> str:
    return orjson.dumps(mention_candidates(content)).decode() if "@" in content else "[]"


# Ids of this shape belong to direct chats: POST /chats may not take one.
DIRECT_ID_RE = re.compile(r"dm-[0-9a-f]{40}")


def direct_chat_id(a: str, b: str) -> str:
    """The id of the direct chat of users a and b: the same for (a, b) and
    (b, a), derived from the pair alone, 43 characters of [a-z0-9-]."""
    pair = orjson.dumps(sorted((a, b)))
    return "dm-" + hashlib.sha256(pair).hexdigest()[:40]
