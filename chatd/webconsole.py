"""The web console: a single-page client served at ``/`` (issue 15).

Static files from chatd/console/ (HTML, CSS, plain JavaScript modules and the
vendored socket.io browser client; no build step, nothing from a CDN), with a
Content-Security-Policy that allows nothing but this origin, and two small
endpoints the page uses:

- ``GET /console/info``: what this chatd offers the console
  (``{"sign_in_as": bool, "max_message_length": n}``).
- ``POST /console/token`` ``{"user_id"}``: a short-lived access token for that
  name. It exists ONLY when chatd runs with the secret it generated itself
  (the embedded default, where ``chatctl token NAME`` works with no setup):
  with a configured ACCESS_TOKEN_SECRET the auth service owns identities and
  this route is a 404 like any unknown path.

``CHATD_CONSOLE=off`` serves none of it (``/`` is then the JSON 404 again).
"""

from __future__ import annotations

from pathlib import Path

import tornado.web

from . import validate
from .auth import mint
from .config import Settings
from .errors import NotFound
from .web import BaseHandler, http_date

STATIC_DIR = Path(__file__).resolve().parent / "console"
# How long a token from "sign in as NAME" lives; the page mints a new one
# when it runs out (it keeps the name, never the secret).
SIGN_IN_TTL = 3600

# Nothing but this origin: no inline script or style, no plugins, no framing.
# connect-src 'self' covers the page's own ws:// and wss:// (CSP level 3).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class Console:
    """What the console's handlers need to know of the settings."""

    def __init__(self, settings: Settings):
        self.sign_in_as = settings.own_secret and bool(settings.access_token_secret)
        self._secret = settings.access_token_secret if self.sign_in_as else ""
        self._claims = {
            k: v for k, v in (("aud", settings.jwt_audience), ("iss", settings.jwt_issuer)) if v
        }
        self.max_message_length = settings.max_message_length

    def mint(self, user_id: str) -> str:
        return mint(self._secret, user_id, SIGN_IN_TTL, self._claims or None)


class StaticHandler(tornado.web.StaticFileHandler):
    """The console's files. ``Cache-Control: no-cache``: a browser keeps them
    and revalidates each load (ETag / Last-Modified answer 304), so a chatd
    upgrade is seen at once while an unchanged file is never sent twice."""

    ROUTE = "/console/"

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Date", http_date())

    def write_error(self, status_code: int, **kwargs) -> None:
        # As every chatd error: JSON, never Tornado's HTML page.
        from .web import _from_http_status

        exc = _from_http_status(status_code, kwargs.get("exc_info", (None, None, None))[1])
        import orjson

        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(orjson.dumps(exc.body()))


class IndexHandler(StaticHandler):
    ROUTE = "/"


class InfoHandler(BaseHandler):
    METHODS = ("GET",)
    PUBLIC = True
    ROUTE = "/console/info"

    def get(self) -> None:
        console: Console = self.ctx.extra["console"]
        self.set_header("Cache-Control", "no-store")
        self.send_json(
            {"sign_in_as": console.sign_in_as, "max_message_length": console.max_message_length}
        )


class TokenHandler(BaseHandler):
    METHODS = ("POST",)
    PUBLIC = True
    ROUTE = "/console/token"

    async def prepare(self) -> None:
        if not self.ctx.extra["console"].sign_in_as:
            self._check_length()  # as the JSON 404 of any unknown path
            raise NotFound("no such route")
        await super().prepare()

    def post(self) -> None:
        console: Console = self.ctx.extra["console"]
        body = validate.json_object(self.json_body())
        user = validate.user_id(body.get("user_id"))
        self.set_header("Cache-Control", "no-store")
        self.send_json({"token": console.mint(user), "user_id": user, "expires_in": SIGN_IN_TTL})


def routes(ctx) -> list:
    static = {"path": str(STATIC_DIR)}
    return [
        (r"/console/info", InfoHandler, {"ctx": ctx}),
        (r"/console/token", TokenHandler, {"ctx": ctx}),
        (r"/()", IndexHandler, {**static, "default_filename": "index.html"}),
        (r"/console/(.+)", StaticHandler, static),
    ]
