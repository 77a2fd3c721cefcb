"""Access-token verification (API.md, "Auth").

HS256 only (the algorithm is pinned, so ``none`` and RS/ES tokens are refused),
``exp`` required, ``aud``/``iss`` checked when configured; the user id is the
first present claim of ``JWT_USER_CLAIMS``, as a string.

Verified tokens are cached until they expire: a frontend sends the same token
with every request, and an HMAC check plus JSON decode per request is most of a
small request's CPU. The cache holds only what verification proved (token ->
user id, expiry), so it cannot accept a token that verification would refuse.
"""

from __future__ import annotations

import time
import warnings

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from .errors import Unauthorized

# The auth service chooses the secret; chatd warns about a short one once at
# start-up (server.py) instead of on every token.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

# A JWT is a few hundred bytes; anything far larger is not a token we issued
# and is refused before any decoding work (and never cached).
MAX_TOKEN_LENGTH = 8192
_CACHE_MAX = 10_000


class TokenVerifier:
    def __init__(
        self,
        secret: str,
        user_claims: tuple[str, ...] = ("sub", "id", "userId"),
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
    ):
        if not secret:
            raise ValueError("an access token secret is required")
        self._secret = secret
        self._claims = user_claims
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._cache: dict[str, tuple[str, float]] = {}

    def verify(self, token: object) -> str:
        """The user id a valid token names; :class:`Unauthorized` otherwise."""
        if not isinstance(token, str) or not token:
            raise Unauthorized("missing access token")
        hit = self._cache.get(token)
        if hit is not None:
            user_id, exp = hit
            if time.time() < exp:
                return user_id
            del self._cache[token]
            raise Unauthorized("access token expired", code="token_expired")
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("access token too large")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": ["exp"],
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("access token expired", code="token_expired") from None
        except jwt.PyJWTError:
            raise Unauthorized("invalid access token") from None
        user_id = self._user_of(claims)
        exp = float(claims["exp"])
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (user_id, exp)
        return user_id

    def _user_of(self, claims: dict) -> str:
        for name in self._claims:
            value = claims.get(name)
            if value is None or value == "" or isinstance(value, (dict, list, bool)):
                continue
            user_id = str(value)
            if len(user_id) > 128:
                raise Unauthorized("user id in access token is too long")
            # The same rule as a user id in a path (validate.user_id): a NUL
            # cannot even be stored in PostgreSQL, and answering 500 to a
            # signed but odd token is not an answer.
            if not user_id.isprintable():
                raise Unauthorized("user id in access token is not printable")
            return user_id
        raise Unauthorized("access token names no user")


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def mint(secret: str, user_id: str, ttl: float = 3600.0, claims: dict | None = None) -> str:
    """An HS256 access token for ``user_id`` (chatctl token, tests, the bench)."""
    now = int(time.time())
    payload = {"sub": user_id, "iat": now, "exp": now + int(ttl)}
    if claims:
        payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")
